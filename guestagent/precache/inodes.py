"""The shim's inode table: FUSE inode numbers for the backing tree's files, the paths each was
found under, and the kernel's lookup counts.  Plain code (no I/O): the file system feeds it what
lstat said and what the kernel asked."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

import pyfuse3

__all__ = ["ROOT", "InodeTable", "Node", "moved"]

ROOT: Final = int(pyfuse3.ROOT_INODE)

Key = tuple[int, int]  # (st_dev, st_ino) on the backing file system


@dataclass
class Node:
    """A FUSE inode: a (st_dev, st_ino) of the backing tree and the paths it was found under."""

    key: Key
    paths: set[str] = field(default_factory=set)
    lookups: int = 0


def moved(path: str, old: str, new: str) -> str | None:
    """`path` with its prefix `old` replaced by `new`, or None if it is not under `old`."""
    if path == old:
        return new
    if path.startswith(old + "/"):
        return new + path[len(old) :]
    return None


class InodeTable:
    """ino <-> (st_dev, st_ino) and paths; the root is inode 1 and never forgotten."""

    def __init__(self, root_path: str, root_key: Key) -> None:
        self._nodes: dict[int, Node] = {ROOT: Node(root_key, {root_path}, 1)}
        self._by_key: dict[Key, int] = {root_key: ROOT}
        self._next_ino = ROOT + 1

    def __len__(self) -> int:
        return len(self._nodes)

    def path(self, ino: int) -> str | None:
        """One path of inode `ino` (None: unknown, or every path of it is gone)."""
        node = self._nodes.get(ino)
        if node is None or not node.paths:
            return None
        return next(iter(node.paths))

    def ino_for(self, key: Key) -> int:
        """The inode of `key`: its own if known, else the one `remember` would give it next."""
        return self._by_key.get(key, self._next_ino)

    def known(self, key: Key) -> bool:
        return key in self._by_key

    def inodes(self) -> Iterator[int]:
        """Every inode but the root (a copy: the table may change while it is walked)."""
        return iter([ino for ino in self._nodes if ino != ROOT])

    def remember(self, path: str, key: Key) -> int:
        """Count a lookup of `path` (the file `key`) and return its inode."""
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._nodes[ino] = Node(key)
            self._by_key[key] = ino
        node = self._nodes[ino]
        node.paths.add(path)
        node.lookups += 1
        return ino

    def forget(self, ino: int, n: int) -> Key | None:
        """The kernel forgot `n` lookups of `ino`: the key of the file if that was its last."""
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return None
        node.lookups -= n
        if node.lookups > 0:
            return None
        del self._nodes[ino]
        self._by_key.pop(node.key, None)
        return node.key

    def rename(self, old: str, new: str) -> None:
        """`old` (and everything under it) is now `new`."""
        prefix = old + "/"
        for node in self._nodes.values():
            if old in node.paths or any(p.startswith(prefix) for p in node.paths):
                node.paths = {moved(p, old, new) or p for p in node.paths}

    def exchange(self, a: str, b: str) -> None:
        """RENAME_EXCHANGE: what was under `a` is under `b`, and the other way round."""
        for node in self._nodes.values():
            node.paths = {moved(p, a, b) or moved(p, b, a) or p for p in node.paths}

    def drop_path(self, path: str) -> None:
        for node in self._nodes.values():
            node.paths.discard(path)
