"""A swap device's spill file: the pages the pool did not keep, on host storage.

Plain blocking file I/O on a sparse file, one page per 4 KiB at its page number's offset; holes are
pages not on storage. The device (hostagent/swapdev.py) calls these methods from a worker thread, never
on the agent's event loop: a disk that takes 10 ms per write would otherwise stall every guest's channel
for as long. Each call takes a batch, so a request of many pages costs one thread hop.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from guestagent.protocol.wire import PAGE_SIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_PUNCH: Final = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (Python has no wrapper)
_ZERO: Final = bytes(PAGE_SIZE)


class SpillFile:
    """The file, open for the device's life; `size` bytes long (sparse)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)

    def pages(self) -> set[int]:
        """Pages with data in the file: its data extents (SEEK_DATA/SEEK_HOLE), from a previous run."""
        end = os.fstat(self._fd).st_size
        found: set[int] = set()
        pos = 0
        while pos < end:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(self._fd, start, os.SEEK_HOLE)
            found.update(range(start // PAGE_SIZE, -(-stop // PAGE_SIZE)))
            pos = stop
        return found

    def read(self, pages: Sequence[int]) -> list[bytes]:
        out = []
        for page in pages:
            data = os.pread(self._fd, PAGE_SIZE, page * PAGE_SIZE)
            out.append(data + bytes(PAGE_SIZE - len(data)))
        return out

    def update(self, writes: Iterable[tuple[int, bytes]], punches: Iterable[int], sync: bool = False) -> None:
        """Write pages, punch others out, and with `sync` make it all durable before returning."""
        for page, data in writes:
            os.pwrite(self._fd, data, page * PAGE_SIZE)
        self.punch(punches)
        if sync:
            self.sync()

    def punch(self, pages: Iterable[int]) -> None:
        for page in pages:
            if _libc.fallocate(self._fd, _PUNCH, page * PAGE_SIZE, PAGE_SIZE) != 0:
                os.pwrite(self._fd, _ZERO, page * PAGE_SIZE)  # a file system without holes

    def sync(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


__all__ = ["SpillFile"]
