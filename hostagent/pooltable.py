"""The pool table, `pools.json` beside the arena: who owns each persistent pool, for a restart.

The arena's slots say which pool handle each persistent page belongs to; this file says which
guest (and, for a shared pool, which members under which ids) each handle is. The engine keeps
it current and rebuilds from it; the file I/O is here, so the engine stays logic over the arena.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Final, NamedTuple

__all__ = ["POOL_TABLE", "PoolRecord", "PoolTable", "TableUnreadable", "read", "write"]

POOL_TABLE: Final = "pools.json"


class TableUnreadable(Exception):
    """The table exists but cannot be read or parsed; the message says what to do."""


class PoolRecord(NamedTuple):
    """One persistent pool: its arena handle, flags, uuid, owner and members (name -> pool id)."""

    handle: int
    flags: int
    uuid: bytes
    owner: str
    members: dict[str, int]


class PoolTable(NamedTuple):
    next_handle: int
    next_ids: dict[str, int]  # per guest, the next pool id it gets
    pools: list[PoolRecord]


def write(path: Path, table: PoolTable) -> None:
    """Replace the table at `path` atomically (write a temp file, then rename it over)."""
    pools = [
        {"handle": p.handle, "flags": p.flags, "uuid": p.uuid.hex(), "owner": p.owner,
         "members": p.members}
        for p in table.pools
    ]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"version": 1, "next_handle": table.next_handle, "next_ids": table.next_ids,
                   "pools": pools}, f)
    os.replace(tmp, path)


def read(path: Path) -> PoolTable | None:
    """The table at `path`, or None if there is none; TableUnreadable if it is damaged."""
    if not path.exists():
        return None
    # Without the table every persistent page would be dropped as unowned: refuse to
    # start rather than lose them silently.
    try:
        table = json.loads(path.read_text())
        pools = [PoolRecord(int(e["handle"]), int(e["flags"]), bytes.fromhex(e["uuid"]), str(e["owner"]),
                            {str(n): int(i) for n, i in e["members"].items()})
                 for e in table.get("pools", [])]
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise TableUnreadable(
            f"the pool table {path} cannot be read ({type(err).__name__}: {err}); "
            "it names the owners of the persistent pages in the arena. Restore it, or "
            "move it and the arena aside to start empty") from None
    next_ids = {str(name): int(i) for name, i in table.get("next_ids", {}).items()}
    return PoolTable(int(table.get("next_handle", 1)), next_ids, pools)
