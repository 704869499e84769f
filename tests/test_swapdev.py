"""The swap device's store over a real arena and engine, and a spill file in a temp directory."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag
from hostagent.agent import qemu_uuid
from hostagent.arena import Arena
from hostagent.pool import ClientSettings, PoolEngine
from hostagent.swapdev import DEVICE_POOL, SwapDevice, page_key
from tests.support.wire_guest import page

MIB = 1 << 20


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
    return SwapDevice(engine, client, root / "spill" / "vm1.swap", size)


def test_pages_go_to_the_pool_and_come_back(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    for p in range(20):
        d.write(p * PAGE_SIZE, page(p), False)
    assert [d.read(p * PAGE_SIZE, PAGE_SIZE) for p in range(20)] == [page(p) for p in range(20)]
    f = d.figures()
    assert (f["puts"], f["refusals"], f["gets"], f["pool_pages"], f["storage_pages"]) == (20, 0, 20, 20, 0)
    assert os.stat(d.spill_path).st_blocks == 0  # nothing reached storage
    assert d.read(100 * PAGE_SIZE, PAGE_SIZE) == bytes(PAGE_SIZE)  # never written: zeros


def test_the_guest_channel_cannot_name_the_device_pool(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    assert DEVICE_POOL < 0 and DEVICE_POOL in d.client.pools
    with pytest.raises(ValueError):
        engine.new_pool(d.client, PoolFlag.PERSISTENT, pool_id=5)
    assert engine.new_pool(d.client, PoolFlag.PERSISTENT) == 1  # the guest's own ids unchanged


def test_quota_smaller_than_the_data_spills_and_loses_nothing(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path, quota=64 * 1024)  # 16 raw pages
    n = 100
    for p in range(n):
        d.write(p * PAGE_SIZE, page(p), False)
    assert d.read(0, n * PAGE_SIZE) == b"".join(page(p) for p in range(n))
    f = d.figures()
    kept = f["puts"]
    assert 10 <= kept < 16 and f["refusals"] == n - kept  # slots carry a header: < 16 fit
    assert f["pool_pages"] == kept and f["storage_pages"] == n - kept
    assert f["gets"] == kept and f["spill_reads"] == n - kept


def test_a_refused_put_leaves_no_older_pool_copy(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path, quota=4 * PAGE_SIZE)
    d.write(0, page(1), False)
    d.write(PAGE_SIZE, page(2), False)
    assert d.figures()["pool_pages"] == 2
    engine.configure("vm1", quota_bytes=PAGE_SIZE)
    d.write(0, page(3), False)  # refused: the spill file has it, the pool's old copy is gone
    assert d.read(0, PAGE_SIZE) == page(3)
    assert d.figures()["pool_pages"] == 1 and d.figures()["storage_pages"] == 1
    engine.configure("vm1", quota_bytes=8 * MIB)
    d.write(0, page(4), False)  # back in the pool: the spill copy is punched
    assert d.read(0, PAGE_SIZE) == page(4)
    assert d.figures()["storage_pages"] == 0 and os.stat(d.spill_path).st_blocks == 0


def test_sub_page_writes_and_reads(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    d.write(0, page(1) + page(2), False)
    d.write(100, b"x" * 5000, False)  # spans pages 0 and 1
    want = bytearray(page(1) + page(2) + bytes(PAGE_SIZE))
    want[100:5100] = b"x" * 5000
    assert d.read(0, 3 * PAGE_SIZE) == bytes(want)
    assert d.read(4000, 200) == bytes(want[4000:4200])
    d.write_zeroes(50, 2 * PAGE_SIZE)  # partial, whole, partial
    want[50 : 50 + 2 * PAGE_SIZE] = bytes(2 * PAGE_SIZE)
    assert d.read(0, 3 * PAGE_SIZE) == bytes(want)


def test_trim_frees_pool_pages_and_punches_the_spill(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path, quota=4 * PAGE_SIZE)
    for p in range(8):
        d.write(p * PAGE_SIZE, page(p), False)
    assert d.figures()["pool_pages"] == 3 and d.figures()["storage_pages"] == 5
    d.trim(100, 8 * PAGE_SIZE - 100)  # page 0 only partly covered: kept
    assert d.read(0, PAGE_SIZE) == page(0)
    assert d.read(PAGE_SIZE, 7 * PAGE_SIZE) == bytes(7 * PAGE_SIZE)
    f = d.figures()
    assert (f["pool_pages"], f["storage_pages"], f["trims"]) == (1, 0, 7)
    assert os.stat(d.spill_path).st_blocks == 0
    assert engine.client("vm1").pers.pages == 1


def test_shrink_moves_pages_to_storage(engine: PoolEngine, tmp_path: Path) -> None:
    d = device(engine, tmp_path)
    for p in range(10):
        d.write(p * PAGE_SIZE, page(p), False)
    assert d.shrink(6) == 6
    f = d.figures()
    assert (f["pool_pages"], f["storage_pages"], f["shrunk"]) == (4, 6, 6)
    assert d.read(0, 10 * PAGE_SIZE) == b"".join(page(p) for p in range(10))
    assert d.shrink(100) == 4 and d.figures()["pool_pages"] == 0


def test_restart_keeps_pool_and_spill_pages(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path, quota=16 * PAGE_SIZE)
    for p in range(40):
        d.write(p * PAGE_SIZE, page(p), False)
    kept = d.figures()["pool_pages"]
    assert 10 <= kept < 16
    d.close()
    engine.close()  # the arena's file stays, as after a SIGKILL (no shutdown step writes anything)
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path, quota=16 * PAGE_SIZE)
    f = d.figures()
    assert (f["pool_pages"], f["storage_pages"]) == (kept, 40 - kept)
    assert d.read(0, 40 * PAGE_SIZE) == b"".join(page(p) for p in range(40))
    d.destroy()
    assert not d.spill_path.exists() and engine.client("vm1").pers.pages == 0
    engine.close()


def test_a_page_in_pool_and_spill_after_a_crash_keeps_the_pool_copy(tmp_path: Path) -> None:
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path)
    d.write(0, page(1), False)
    os.pwrite(os.open(d.spill_path, os.O_WRONLY), page(9), 0)  # the stale copy a crash could leave
    d.close()
    engine.close()
    engine = open_engine(tmp_path)
    d = device(engine, tmp_path)
    assert d.read(0, PAGE_SIZE) == page(1) and d.figures()["storage_pages"] == 0
    engine.close()


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
