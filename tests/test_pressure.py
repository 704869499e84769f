"""The memory-pressure follower against a fake /proc (a real file it re-reads every interval)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import trio

from guestagent.pressure import follow_meminfo


def _meminfo(proc: Path, available_kib: int) -> None:
    (proc / "meminfo").write_text(f"MemTotal: 1048576 kB\nMemAvailable: {available_kib} kB\n")


def test_it_hands_each_fresh_reading_on(tmp_path: Path) -> None:
    seen: list[int] = []

    async def apply(info: Mapping[str, int]) -> None:
        seen.append(info["MemAvailable"])
        _meminfo(tmp_path, info["MemAvailable"] + 1)  # the next read must see the change

    async def main() -> None:
        _meminfo(tmp_path, 100)
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: follow_meminfo(apply, proc_dir=str(tmp_path), interval=0.01))
                while len(seen) < 3:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert seen[:3] == [100, 101, 102]


def test_a_failed_read_is_retried_or_ends_the_follower(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[int] = []

    async def apply(info: Mapping[str, int]) -> None:
        calls.append(info["MemAvailable"])

    async def main() -> None:
        with trio.fail_after(5):  # stop_on_error: returns at the first failure
            await follow_meminfo(apply, proc_dir=str(tmp_path), interval=0.01, stop_on_error=True)
        assert "cannot follow memory pressure" in caplog.text
        async with trio.open_nursery() as nursery:  # otherwise: it keeps trying
            nursery.start_soon(lambda: follow_meminfo(apply, proc_dir=str(tmp_path), interval=0.01))
            await trio.sleep(0.05)
            _meminfo(tmp_path, 7)
            with trio.fail_after(5):
                while not calls:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert calls and calls[0] == 7
