"""precache: what a write, a preallocation and many files do to the shim, on a real mount.

Why: a write used to drop the whole file's pages from the shim's cache and tmem (a random
read/write mix got 27 hits in 148k gets); programs that preallocate must work; and the shim's
state must not grow with every file ever read once the kernel has forgotten them (issue 15).
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from scripts.wait import wait_until
from tests.support.host_agent import HostAgentProcess
from tests.support.precache_mount import PAGE, PrecacheMount, read


def test_a_write_drops_only_the_pages_it_wrote(
    host_agent: HostAgentProcess,
    precache: Callable[..., PrecacheMount],
) -> None:
    """64 pages, the kernel dropping its cached pages now and then, so most reads reach the pool.
    Random one-page writes among random reads: the pages not written are still served by tmem,
    the ones written come back as written, and every read is right."""
    pages = 64
    rng = random.Random(5)
    ref = bytearray(rng.randbytes(pages * PAGE))
    m = precache(lambda d: (d / "f").write_bytes(bytes(ref)))
    path = m.mountpoint / "f"
    assert read(path) == ref
    m.evict()
    s0 = m.stats()
    with open(path, "r+b", buffering=0) as f:
        for step in range(600):
            i = rng.randrange(pages)
            if step % 4 == 0:
                data = rng.randbytes(PAGE)
                os.pwrite(f.fileno(), data, i * PAGE)
                ref[i * PAGE : (i + 1) * PAGE] = data
            else:
                if step % 3 == 0:
                    m.evict()
                assert os.pread(f.fileno(), PAGE, i * PAGE) == ref[i * PAGE : (i + 1) * PAGE], step
    assert read(path) == ref
    s1 = m.stats()
    gets, hits = s1["gets"] - s0["gets"], s1["hits"] - s0["hits"]
    assert gets > 100 and hits > gets // 2, f"{hits} hits in {gets} gets"


def test_posix_fallocate_works_through_the_mount_and_reads_back_right(
    precache: Callable[..., PrecacheMount],
) -> None:
    """pyfuse3 has no fallocate operation, so the kernel answers fallocate(2) with EOPNOTSUPP;
    glibc's posix_fallocate then writes the range itself, through the shim's write path: the
    file grows, its old bytes stay, the new ones read as zeros (the old last page, cached cut to
    the old length, must not survive)."""
    m = precache(lambda d: (d / "f").write_bytes(b"a" * 5000))
    path = m.mountpoint / "f"
    assert read(path) == b"a" * 5000  # the last page is now in the pool, 904 bytes long
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 3 * PAGE + 10)
        assert os.fstat(fd).st_size == 3 * PAGE + 10
        assert os.pread(fd, 4 * PAGE, 0) == b"a" * 5000 + bytes(3 * PAGE + 10 - 5000)
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(8 * PAGE))
        assert rc == -1 and ctypes.get_errno() == errno.EOPNOTSUPP  # the known limit (docs/precache.md)
    finally:
        os.close(fd)
    assert (m.backing / "f").read_bytes() == b"a" * 5000 + bytes(3 * PAGE + 10 - 5000)


def test_the_shim_forgets_files_the_kernel_forgot_within_a_bound(
    precache: Callable[..., PrecacheMount],
) -> None:
    """Read 6,000 small files (their pages are put to tmem), then make the
    kernel forget the inodes: the shim keeps state for at most FORGOTTEN_OBJECTS of them, and a
    file read again afterwards is still right."""
    from guestagent.precache import FORGOTTEN_OBJECTS

    n = FORGOTTEN_OBJECTS + 2000

    def populate(d: Path) -> None:
        for i in range(n):
            (d / f"f{i}").write_bytes(f"file {i}\n".encode() * 10)

    m = precache(populate)
    t0 = time.monotonic()
    for i in range(n):
        assert read(m.mountpoint / f"f{i}") == f"file {i}\n".encode() * 10
    took = time.monotonic() - t0
    # the kernel forgets unused inodes (dentries and inodes only; no page cache is dropped)
    subprocess.run(["sh", "-c", "echo 2 > /proc/sys/vm/drop_caches"], check=True)
    wait_until(
        lambda: m.stats()["objects"] <= FORGOTTEN_OBJECTS + 1,
        timeout=20,
        what="the shim to let forgotten files go",
    )
    assert read(m.mountpoint / "f0") == b"file 0\n" * 10
    assert read(m.mountpoint / f"f{n - 1}") == f"file {n - 1}\n".encode() * 10
    print(f"{n} files read in {took:.1f} s; objects after the kernel forgot them: {m.stats()['objects']}")


def test_an_unexpected_error_in_an_operation_is_answered_eio_not_fatal(tmp_path: Path) -> None:
    """Defence in depth for the class of issue 15's first defect (a ValueError in read() ended
    pyfuse3's main loop, and the mount with it): any exception but FUSEError becomes EIO, logged.
    Driven directly (no mount), with the read path made to fail."""
    import pyfuse3
    import trio

    from guestagent import precache as pc

    (tmp_path / "f").write_bytes(b"x" * 10)
    fs = pc.PrecacheFS(str(tmp_path))

    async def go() -> None:
        entry = await fs.lookup(pyfuse3.ROOT_INODE, pyfuse3.FileNameT(b"f"), None)
        info = await fs.open(entry.st_ino, pyfuse3.FlagT(os.O_RDONLY), None)
        assert await fs.read(info.fh, 0, 10) == b"x" * 10
        kept = fs._files[info.fh]
        fs._files[info.fh] = (kept[0], None)  # type: ignore[assignment]  # the next read fails inside
        try:
            await fs.read(info.fh, 0, 10)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.EIO
        else:
            raise AssertionError("a broken read answered normally")
        fs._files[info.fh] = kept
        with pytest.raises(pyfuse3.FUSEError) as missing:  # FUSEErrors pass through as they are
            await fs.lookup(pyfuse3.ROOT_INODE, pyfuse3.FileNameT(b"nothing"), None)
        assert missing.value.errno == errno.ENOENT
        await fs.release(info.fh)

    trio.run(go)
    fs.close()
