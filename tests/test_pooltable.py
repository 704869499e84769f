"""The pool table's snapshot and journal (hostagent/pooltable.py), on real files.

Why: the table is what lets a restarted agent give persistent pages back to their owners, and
rewriting all of it per change let one guest stall the others (issue 15): a change must cost
O(1) bytes, and whatever order a crash cuts the writes in, the table read back is the last one
acknowledged.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from guestagent.protocol.wire import PoolFlag
from hostagent.arena import Arena
from hostagent.pool import PoolEngine
from hostagent.pooltable import JOURNAL, SNAPSHOT, PoolRecord, PoolTable, TableError

PERS = int(PoolFlag.PERSISTENT)


def rec(handle: int, owner: str = "g1", pool_id: int = 1) -> PoolRecord:
    return PoolRecord(handle, PERS, bytes(16), owner, {owner: pool_id})


def test_changes_are_journalled_and_read_back_over_the_snapshot(tmp_path: Path) -> None:
    t = PoolTable(tmp_path)
    assert not t.load().exists
    t.rewrite([rec(1)], 2, {"g1": 2})
    t.set(rec(2, pool_id=2), 3, {"g1": 3})
    t.set(rec(3, "g2"), 4, {"g2": 2})
    t.drop(1, 4, {"g1": 3})
    assert (tmp_path / JOURNAL).read_text().count("\n") == 3  # the snapshot was not rewritten
    state = PoolTable(tmp_path).load()
    assert state.exists and sorted(state.pools) == [2, 3]
    assert state.pools[3] == rec(3, "g2") and state.next_handle == 4
    assert state.next_ids == {"g1": 3, "g2": 2}


def test_a_write_cut_short_is_ignored_and_a_bad_line_refuses(tmp_path: Path) -> None:
    t = PoolTable(tmp_path)
    t.rewrite([], 1, {})
    t.set(rec(1), 2, {"g1": 2})
    t.close()
    journal = tmp_path / JOURNAL
    whole = journal.read_text()
    journal.write_text(whole + '{"set": {"handle": 2, "fl')  # SIGKILL in the middle of a write
    assert sorted(PoolTable(tmp_path).load().pools) == [1]
    journal.write_text('{"set": oops}\n' + whole)
    with pytest.raises(TableError, match=r"pools\.log line 1"):
        PoolTable(tmp_path).load()


def test_a_crash_between_snapshot_and_journal_truncation_loses_nothing(tmp_path: Path) -> None:
    """The compaction replaces the snapshot, then empties the journal: a crash in between replays
    a journal the snapshot already holds, which must change nothing."""
    t = PoolTable(tmp_path)
    t.rewrite([rec(1)], 2, {"g1": 2})
    t.set(rec(2, pool_id=2), 3, {"g1": 3})
    t.drop(1, 3, {"g1": 3})
    old_journal = (tmp_path / JOURNAL).read_bytes()
    t.rewrite([rec(2, pool_id=2)], 3, {"g1": 3})  # the compacted state
    (tmp_path / JOURNAL).write_bytes(old_journal)  # as if the truncation never happened
    state = PoolTable(tmp_path).load()
    assert sorted(state.pools) == [2] and state.next_handle == 3


def test_a_pool_change_writes_bytes_independent_of_the_table_size() -> None:
    """6,000 persistent pools of other guests; one guest creates and destroys 1,000 pools twice.
    The old code rewrote the whole table per change (~600 KB each, a new pools.json each time);
    now a change appends a line, and the snapshot is rewritten once per table-size changes."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="tmem-pt"))
    try:
        engine = PoolEngine(Arena(root / "arena", 16 << 20), limit_bytes=16 << 20)
        for g in range(6):
            c = engine.client(f"other{g}")
            for _ in range(1000):
                engine.new_pool(c, PERS)
        snapshot, journal = root / SNAPSHOT, root / JOURNAL
        assert snapshot.stat().st_size + journal.stat().st_size > 400_000  # a big table: 6,000 pools
        c = engine.client("churner")
        rewrites, changes, journal_bytes = 0, 0, 0
        ino = snapshot.stat().st_ino
        for _ in range(2):
            ids = []
            for _ in range(1000):
                ids.append(engine.new_pool(c, PERS))
                journal_bytes = max(journal_bytes, journal.stat().st_size if journal.exists() else 0)
                rewrites += snapshot.stat().st_ino != ino
                ino = snapshot.stat().st_ino
            for i in ids:
                engine.destroy_pool(c, i)
                journal_bytes = max(journal_bytes, journal.stat().st_size if journal.exists() else 0)
                rewrites += snapshot.stat().st_ino != ino
                ino = snapshot.stat().st_ino
            changes += 2000
        assert rewrites <= changes // 6000 + 1, f"the whole table was rewritten {rewrites} times"
        assert journal_bytes < 400 * 6000, f"the journal grew to {journal_bytes} bytes"
        engine.close()
        again = PoolEngine(Arena(root / "arena", 16 << 20), limit_bytes=16 << 20)
        assert len(again.pools_info()) == 6000
        again.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
