"""The pool table on disk: which persistent pools exist, so a restarted agent can rebuild them.

Why a snapshot and a journal: the agent serves every guest from one event loop, and rewriting the
whole table (every persistent pool of every guest) at each pool created or destroyed let one guest
stall all the others for seconds (issue 15). A change now appends one line to `pools.log`
(O(1), before the guest's reply is sent, so an acknowledged pool survives a SIGKILL); the
snapshot `pools.json` is rewritten only when the journal has grown past the table's own size, from
records kept serialized, so the cost per change stays bounded and small.

Files (next to the arena): `pools.json`, `{"version": 2, "next_handle", "next_ids", "pools": [...]}`
(version 1, the old whole-table file, reads the same); `pools.log`, one JSON object a line:
`{"set": record}` or `{"del": handle}`, with `next_handle` and `next_ids` to merge. A record is the
whole state of one pool, so replaying a journal over a snapshot that already holds it changes
nothing: a crash between replacing the snapshot and emptying the journal loses nothing. A last line
without its newline is a write the crash cut short (its change was never acknowledged): ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ["JOURNAL", "SNAPSHOT", "PoolRecord", "PoolTable", "TableError", "TableState"]

SNAPSHOT: Final = "pools.json"
JOURNAL: Final = "pools.log"
MIN_JOURNAL: Final = 256  # journal lines always allowed before a compaction


def _quote(name: str) -> str:
    """A guest name as a JSON string (names are few: remembered)."""
    q = _QUOTED.get(name)
    if q is None:
        q = _QUOTED[name] = json.dumps(name)
    return q


_QUOTED: dict[str, str] = {}


class TableError(Exception):
    """The pool table cannot be trusted at a restart: starting anyway would drop persistent pages."""


@dataclass(frozen=True)
class PoolRecord:
    """One persistent pool: its handle, flags, shared-pool UUID, owner and members (guest -> id)."""

    handle: int
    flags: int
    uuid: bytes
    owner: str
    members: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return {
            "handle": self.handle,
            "flags": self.flags,
            "uuid": self.uuid.hex(),
            "owner": self.owner,
            "members": self.members,
        }

    def text(self) -> str:
        """`as_json` as JSON text, formatted directly: this runs on the loop for every change."""
        members = ", ".join(f"{_quote(n)}: {int(i)}" for n, i in self.members.items())
        return (
            f'{{"handle": {int(self.handle)}, "flags": {int(self.flags)}, "uuid": "{self.uuid.hex()}", '
            f'"owner": {_quote(self.owner)}, "members": {{{members}}}}}'
        )

    @staticmethod
    def from_json(e: Any) -> PoolRecord:
        return PoolRecord(
            int(e["handle"]),
            int(e["flags"]),
            bytes.fromhex(e["uuid"]),
            str(e["owner"]),
            {str(n): int(i) for n, i in e["members"].items()},
        )


@dataclass
class TableState:
    """What the table says: the pools, the next pool handle, each guest's next pool id."""

    pools: dict[int, PoolRecord] = field(default_factory=dict)
    next_handle: int = 1
    next_ids: dict[str, int] = field(default_factory=dict)
    exists: bool = False  # a snapshot was found


class PoolTable:
    """The snapshot and journal under `directory`; `load` first, then `set`/`drop` per change."""

    def __init__(self, directory: Path) -> None:
        self.snapshot = directory / SNAPSHOT
        self.journal = directory / JOURNAL
        self._records: dict[int, str] = {}  # handle -> the record as JSON text
        self._next_handle = 1
        self._next_ids: dict[str, int] = {}
        self._fd = -1  # the journal, open for appending once a snapshot exists
        self._lines = 0
        self.compactions = 0
        self.bytes_written = 0  # snapshot and journal bytes, for tests and benchmarks

    # -- reading -----------------------------------------------------------------------------------

    def load(self) -> TableState:
        """The table as the last run left it; TableError if a file exists and cannot be read."""
        state = TableState()
        if not self.snapshot.exists():
            return state
        state.exists = True
        try:
            self._merge(state, json.loads(self.snapshot.read_text()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
            raise TableError(self._unreadable(self.snapshot, err)) from None
        try:
            text = self.journal.read_text() if self.journal.exists() else ""
        except (OSError, ValueError) as err:
            raise TableError(self._unreadable(self.journal, err)) from None
        lines = text.split("\n")
        for n, line in enumerate(lines[:-1], 1):  # lines[-1]: "" or a write cut short
            try:
                self._merge(state, json.loads(line))
            except (ValueError, TypeError, KeyError, AttributeError) as err:
                raise TableError(self._unreadable(self.journal, err, f" line {n}")) from None
        return state

    @staticmethod
    def _merge(state: TableState, doc: Any) -> None:
        if not isinstance(doc, dict):
            raise TypeError(f"a JSON object was expected, not {type(doc).__name__}")
        for e in doc.get("pools", []):
            rec = PoolRecord.from_json(e)
            state.pools[rec.handle] = rec
        if "set" in doc:
            rec = PoolRecord.from_json(doc["set"])
            state.pools[rec.handle] = rec
        if "del" in doc:
            state.pools.pop(int(doc["del"]), None)
        state.next_handle = max(state.next_handle, int(doc.get("next_handle", 1)))
        for name, n in doc.get("next_ids", {}).items():
            state.next_ids[str(name)] = max(state.next_ids.get(str(name), 0), int(n))

    def _unreadable(self, path: Path, err: Exception, where: str = "") -> str:
        return (
            f"the pool table {path}{where} cannot be read ({type(err).__name__}: {err}); it names "
            "the owners of the persistent pages in the arena. Restore it, or move the pool table "
            f"({self.snapshot.name}, {self.journal.name}) and the arena aside to start empty"
        )

    # -- writing -----------------------------------------------------------------------------------

    def rewrite(self, records: list[PoolRecord], next_handle: int, next_ids: dict[str, int]) -> None:
        """Start from this whole table (after a rebuild): a new snapshot, an empty journal."""
        self._records = {r.handle: r.text() for r in records}
        self._next_handle = next_handle
        self._next_ids = dict(next_ids)
        self._compact()

    def set(self, record: PoolRecord, next_handle: int, next_ids: dict[str, int]) -> None:
        """A pool was created or its membership changed."""
        text = record.text()
        self._records[record.handle] = text
        self._append(f'{{"set": {text}', next_handle, next_ids)

    def drop(self, handle: int, next_handle: int, next_ids: dict[str, int]) -> None:
        """A pool is gone."""
        self._records.pop(handle, None)
        self._append(f'{{"del": {handle}', next_handle, next_ids)

    def _append(self, head: str, next_handle: int, next_ids: dict[str, int]) -> None:
        self._next_handle = max(self._next_handle, next_handle)
        for name, n in next_ids.items():
            self._next_ids[name] = max(self._next_ids.get(name, 0), n)
        if self._fd < 0 or self._lines >= max(MIN_JOURNAL, len(self._records)):
            self._compact()  # amortised: at most one snapshot per len(table) changes
            return
        ids = ", ".join(f"{_quote(n)}: {int(i)}" for n, i in next_ids.items())
        line = f'{head}, "next_handle": {int(next_handle)}, "next_ids": {{{ids}}}}}\n'
        data = line.encode()
        self.bytes_written += len(data)
        while data:  # one write in practice; a short write is finished, never left torn
            data = data[os.write(self._fd, data) :]
        self._lines += 1

    def _compact(self) -> None:
        """The whole table into a new snapshot (atomic rename), then an empty journal. The records
        are kept as JSON text, so this is a join and one write, not a serialisation of every pool."""
        head = json.dumps({"version": 2, "next_handle": self._next_handle, "next_ids": self._next_ids})
        body = head[:-1] + ', "pools": [' + ", ".join(self._records.values()) + "]}\n"
        tmp = self.snapshot.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(body)
        self.bytes_written += len(body)
        os.replace(tmp, self.snapshot)
        if self._fd < 0:
            self._fd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, 0)
        self._lines = 0
        self.compactions += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
