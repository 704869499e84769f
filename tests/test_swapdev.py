"""The swap device's store over a real arena and engine, and a spill file in a temp directory."""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import pytest

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag
from hostagent.agent import qemu_uuid
from hostagent.arena import Arena
from hostagent.nbd import NbdError
from hostagent.pool import ClientSettings, PoolEngine
from hostagent.spillfile import SpillFile
from hostagent.swapdev import DEVICE_POOL, SwapDevice, page_key
from tests.support.wire_guest import page

MIB = 1 << 20
_P = ParamSpec("_P")


def on_a_loop(test: Callable[_P, Coroutine[Any, Any, None]]) -> Callable[_P, None]:
    """Run an async test body on an event loop of its own (the device does its file I/O in threads)."""

    @functools.wraps(test)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def open_engine(root: Path) -> PoolEngine:
    arena = Arena(root / "arena", 32 * MIB)
    return PoolEngine(arena, limit_bytes=16 * MIB)


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[PoolEngine]:
    e = open_engine(tmp_path)
    yield e
    e.close()


def device(
    engine: PoolEngine, root: Path, quota: int = 8 * MIB, size: int = 4 * MIB, compress: bool = False
) -> SwapDevice:
    client = engine.client("vm1", ClientSettings(quota_bytes=quota, compress=compress))
    return SwapDevice(engine, client, SpillFile(root / "spill" / "vm1.swap", size), size)


@on_a_loop
async def test_pages_go_to_the_pool_and_come_back(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    for p in range(20):
        await d.write(p * PAGE_SIZE, page(p), False)
    assert [await d.read(p * PAGE_SIZE, PAGE_SIZE) for p in range(20)] == [page(p) for p in range(20)]
    f = d.figures()
    assert (f["puts"], f["refusals"], f["gets"], f["pool_pages"], f["storage_pages"]) == (20, 0, 20, 20, 0)
    assert os.stat(d.spill_path).st_blocks == 0  # nothing reached storage
    assert await d.read(100 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)  # never written: zeros


def test_the_guest_channel_cannot_name_the_device_pool(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    assert DEVICE_POOL < 0 and DEVICE_POOL in d.client.pools
    with pytest.raises(ValueError):
        engine.new_pool(d.client, PoolFlag.PERSISTENT, pool_id=5)
    assert engine.new_pool(d.client, PoolFlag.PERSISTENT) == 1  # the guest's own ids unchanged


@on_a_loop
async def test_quota_smaller_than_the_data_spills_and_loses_nothing(
    engine: PoolEngine, tmp_path: Path
) -> None:
    d = device(engine, tmp_path, quota=64 * 1024)  # 16 raw pages
    n = 100
    for p in range(n):
        await d.write(p * PAGE_SIZE, page(p), False)
    assert await d.read(0, n * PAGE_SIZE) == b"".join(page(p) for p in range(n))
    f = d.figures()
    kept = f["puts"]
    assert 10 <= kept < 16 and f["refusals"] == n - kept  # slots carry a header: < 16 fit
    assert f["pool_pages"] == kept and f["storage_pages"] == n - kept
    assert f["gets"] == kept and f["spill_reads"] == n - kept


@on_a_loop
async def test_a_refused_put_leaves_no_older_pool_copy(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path, quota=4 * PAGE_SIZE)
    await d.write(0, page(1), False)
    await d.write(PAGE_SIZE, page(2), False)
    assert d.figures()["pool_pages"] == 2
    engine.configure("vm1", quota_bytes=PAGE_SIZE)
    await d.write(0, page(3), False)  # refused: the spill file has it, the pool's old copy is gone
    assert await d.read(0, PAGE_SIZE) == page(3)
    assert d.figures()["pool_pages"] == 1 and d.figures()["storage_pages"] == 1
    engine.configure("vm1", quota_bytes=8 * MIB)
    await d.write(0, page(4), False)  # back in the pool: the spill copy is punched
    assert await d.read(0, PAGE_SIZE) == page(4)
    assert d.figures()["storage_pages"] == 0 and os.stat(d.spill_path).st_blocks == 0


@on_a_loop
async def test_sub_page_writes_and_reads(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    await d.write(0, page(1) + page(2), False)
    await d.write(100, b"x" * 5000, False)  # spans pages 0 and 1
    want = bytearray(page(1) + page(2) + bytes(PAGE_SIZE))
    want[100:5100] = b"x" * 5000
    assert await d.read(0, 3 * PAGE_SIZE) == bytes(want)
    assert await d.read(4000, 200) == bytes(want[4000:4200])
    await d.write_zeroes(50, 2 * PAGE_SIZE)  # partial, whole, partial
    want[50 : 50 + 2 * PAGE_SIZE] = bytes(2 * PAGE_SIZE)
    assert await d.read(0, 3 * PAGE_SIZE) == bytes(want)


@on_a_loop
async def test_trim_frees_pool_pages_and_punches_the_spill(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path, quota=4 * PAGE_SIZE)
    for p in range(8):
        await d.write(p * PAGE_SIZE, page(p), False)
    assert d.figures()["pool_pages"] == 3 and d.figures()["storage_pages"] == 5
    await d.trim(100, 8 * PAGE_SIZE - 100)  # page 0 only partly covered: kept
    assert await d.read(0, PAGE_SIZE) == page(0)
    assert await d.read(PAGE_SIZE, 7 * PAGE_SIZE) == bytes(7 * PAGE_SIZE)
    f = d.figures()
    assert (f["pool_pages"], f["storage_pages"], f["trims"]) == (1, 0, 7)
    assert os.stat(d.spill_path).st_blocks == 0
    assert engine.client("vm1").pers.pages == 1


@on_a_loop
async def test_shrink_moves_pages_to_storage(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    for p in range(10):
        await d.write(p * PAGE_SIZE, page(p), False)
    assert await d.shrink(6) == 6
    f = d.figures()
    assert (f["pool_pages"], f["storage_pages"], f["shrunk"]) == (4, 6, 6)
    assert await d.read(0, 10 * PAGE_SIZE) == b"".join(page(p) for p in range(10))
    assert await d.shrink(100) == 4 and d.figures()["pool_pages"] == 0


@on_a_loop
async def test_restart_keeps_pool_and_spill_pages(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path, quota=16 * PAGE_SIZE)
    for p in range(40):
        await d.write(p * PAGE_SIZE, page(p), False)
    kept = d.figures()["pool_pages"]
    assert 10 <= kept < 16
    d.close()
    engine.close()  # the arena's file stays, as after a SIGKILL (no shutdown step writes anything)
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path, quota=16 * PAGE_SIZE)
    f = d.figures()
    assert (f["pool_pages"], f["storage_pages"]) == (kept, 40 - kept)
    assert await d.read(0, 40 * PAGE_SIZE) == b"".join(page(p) for p in range(40))
    d.destroy()
    assert not d.spill_path.exists() and engine.client("vm1").pers.pages == 0
    engine.close()


@on_a_loop
async def test_a_page_in_pool_and_spill_after_a_crash_keeps_the_pool_copy(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path)
    await d.write(0, page(1), False)
    os.pwrite(os.open(d.spill_path, os.O_WRONLY), page(9), 0)  # the stale copy a crash could leave
    d.close()
    engine.close()
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path)
    assert await d.read(0, PAGE_SIZE) == page(1) and d.figures()["storage_pages"] == 0
    engine.close()


class SlowSpill(SpillFile):
    """A spill file on a disk that takes DELAY per call (the real I/O, then a sleep); it notes the
    threads that call it."""

    DELAY = 0.5

    def __init__(self, path: Path, size: int) -> None:
        super().__init__(path, size)
        self.threads: set[int] = set()
        self.calls = 0

    def _slow(self) -> None:
        self.threads.add(threading.get_ident())
        self.calls += 1
        time.sleep(self.DELAY)

    def read(self, pages: Sequence[int]) -> list[bytes]:
        self._slow()
        return super().read(pages)

    def update(self, writes: Iterable[tuple[int, bytes]], punches: Iterable[int], sync: bool = False) -> None:
        self._slow()
        super().update(writes, punches, sync)

    def sync(self) -> None:
        self._slow()
        super().sync()


@on_a_loop
async def test_spill_io_runs_off_the_event_loop(engine: PoolEngine, tmp_path: Path) -> None:
    """Refusals, spill reads, flushes and a shrink on a slow disk: the loop keeps ticking meanwhile
    (a 10 ms timer never waits a DELAY), and a guest write racing the shrink wins on its page."""
    client = engine.client("vm1", ClientSettings(quota_bytes=4 * PAGE_SIZE, compress=False))
    spill = SlowSpill(tmp_path / "spill" / "vm1.swap", 4 * MIB)
    d = SwapDevice(engine, client, spill, 4 * MIB)
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def tick() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            gaps.append(loop.time() - last)
            last = loop.time()

    ticker = asyncio.create_task(tick())
    await d.write(0, b"".join(page(p) for p in range(8)), False)  # 3 kept, 5 refused: one spill call
    await d.flush()
    assert await d.read(0, 8 * PAGE_SIZE) == b"".join(page(p) for p in range(8))
    assert d.figures()["storage_pages"] == 5 and spill.calls == 3
    engine.configure("vm1", quota_bytes=8 * MIB)
    shrink = asyncio.create_task(d.shrink(3))
    await asyncio.sleep(0.1)  # the shrink's batch is in the worker thread
    await d.write(0, page(100), False)  # waits for the batch, then goes to the pool
    assert await shrink == 3
    ticker.cancel()
    assert await d.read(0, 8 * PAGE_SIZE) == b"".join(page(100 if p == 0 else p) for p in range(8))
    assert d.figures()["shrunk"] == 3 and d.figures()["pool_pages"] == 1
    assert threading.get_ident() not in spill.threads and len(gaps) > 100
    assert max(gaps) < SlowSpill.DELAY / 2, max(gaps)


@on_a_loop
async def test_release_or_cancel_mid_io_waits_for_the_workers_call(
    engine: PoolEngine, tmp_path: Path
) -> None:
    """The file is not closed under a running call (its fd could be reused), and a cancelled
    caller keeps the device's lock until the call is back (two calls never overlap on a page)."""
    client = engine.client("vm1", ClientSettings(quota_bytes=PAGE_SIZE, compress=False))
    spill = SlowSpill(tmp_path / "spill" / "vm1.swap", 4 * MIB)
    d = SwapDevice(engine, client, spill, 4 * MIB)
    write = asyncio.create_task(d.write(0, page(1) + page(2), False))  # refused: the slow call
    await asyncio.sleep(0.1)
    write.cancel()
    await asyncio.sleep(0.1)
    assert d.lock.locked() and not write.done()
    with pytest.raises(asyncio.CancelledError):
        await write
    assert not d.lock.locked() and spill.calls == 1
    write = asyncio.create_task(d.write(2 * PAGE_SIZE, page(3), False))
    await asyncio.sleep(0.1)
    d.destroy()  # the guest is gone while its file is being written
    assert spill._fd >= 0 and not d.spill_path.exists()
    await write
    await asyncio.sleep(0)  # the call's done-callback
    assert spill._fd == -1
    with pytest.raises(NbdError):
        await d.read(0, PAGE_SIZE)


def test_page_key_is_unique_over_index_overflow() -> None:
    assert page_key(5) != page_key(5 + (1 << 32))
    assert page_key((1 << 32) + 5) == ((1).to_bytes(24, "little"), 5)


def test_a_domain_peer_is_known_by_its_qemu_command_line() -> None:
    """The agent's check of a domain's swap-device connection: the peer's `-uuid`, read from /proc."""
    uuid = "2b7c3e0a-1111-4222-8333-444455556666"
    code = "import time; time.sleep(30)"
    fake = subprocess.Popen(
        ["qemu-system-x86_64", "-c", code, "-uuid", uuid.upper()], executable=sys.executable
    )
    other = subprocess.Popen(["python3", "-c", code, "-uuid", uuid], executable=sys.executable)
    try:
        for proc, argv0 in ((fake, b"qemu-system-x86_64"), (other, b"python3")):
            deadline = time.monotonic() + 10  # until the child has exec'd (a fork shows ours)
            while not Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(argv0 + b"\0"):
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert qemu_uuid(fake.pid) == uuid
        assert qemu_uuid(other.pid) is None  # not a QEMU
        assert qemu_uuid(os.getpid()) is None
    finally:
        for p in (fake, other):
            p.kill()
            p.wait()
    assert qemu_uuid(fake.pid) is None  # gone
