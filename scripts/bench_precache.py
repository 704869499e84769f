"""Precache benchmark (host side): a page read served from tmem through the FUSE shim, against the
same read from the backing file with O_DIRECT (the disk) and from the kernel page cache.

Prints ONE JSON object.  Everything runs on this machine in this run: a real `hostagent run`
(temp config, arena on /dev/shm, guest "bench", compression off), and `python -m
guestagent.precache` mounting a temp backing directory (on the file system of /var/tmp, a real
disk).  One file of `pages` random pages; every figure is the median latency of single 4 KiB
`pread`s at random page offsets:

- `tmem_read_us`: through the mount, each page served from tmem (before each pass the kernel drops
  its cached pages of the mount's files through the `user.tmem.precache.evict` hook, and the reader
  asks for no read-ahead (POSIX_FADV_RANDOM), so every read is a page-in and an exclusive get that
  hits, then put back).
- `odirect_read_us`: the backing file opened with O_DIRECT (the disk, without the page cache).
- `pagecache_read_us`: the backing file, plain reads with the page cache warm.
- `shim_hit_us`: through the mount, each page served from the guest's page cache (the hot path:
  the shim is not asked).
- `seq_tmem_mbs` / `seq_odirect_mbs` (information): sequential 4 KiB reads of the whole file from
  tmem through the mount (the kernel's read-ahead) / with O_DIRECT.

Measurements are interleaved over `rounds`; each figure is the median of its rounds, each ratio
the median of the per-round ratios.  Ratios: `tmem_vs_disk` = tmem_read_us / odirect_read_us
(target < 1: the tmem path must beat the disk) and `shim_hot_overhead` = shim_hit_us /
pagecache_read_us (FUSE's page cache against the backing file's; information).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from guestagent.protocol.jsonline import is_listening
from scripts.processes import bench_config, hostagent, stop, wait_started

PAGE = 4096


def _stats(mnt: Path) -> dict[str, int]:
    result: dict[str, int] = json.loads(os.getxattr(mnt, "user.tmem.precache.stats"))
    return result


def _preads(fd: int, order: list[int], buf: mmap.mmap | None = None) -> float:
    """Median microseconds of one 4 KiB pread per page in `order`."""
    times = []
    for i in order:
        t0 = time.perf_counter_ns()
        if buf is not None:
            os.preadv(fd, [buf], i * PAGE)
        else:
            os.pread(fd, PAGE, i * PAGE)
        times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1000


def _sequential(path: Path, flags: int = 0) -> float:
    """MB/s of 4 KiB reads from start to end."""
    fd = os.open(path, os.O_RDONLY | flags)
    buf = mmap.mmap(-1, PAGE)
    t0 = time.perf_counter()
    n = 0
    while (k := os.preadv(fd, [buf], n)) > 0:
        n += k
    elapsed = time.perf_counter() - t0
    os.close(fd)
    return n / elapsed / 1e6


def measure(args: argparse.Namespace, tmp: Path, mnt: Path, backing: Path) -> dict[str, object]:
    rng = random.Random(1)
    order = list(range(args.pages))
    file = backing / "f"
    buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    rounds: list[dict[str, float]] = []
    for _ in range(args.rounds):
        r: dict[str, float] = {}
        rng.shuffle(order)
        with open(mnt / "f", "rb") as f:  # read once: every page is put to tmem
            f.read()
        os.setxattr(mnt, "user.tmem.precache.evict", b"1")  # the kernel drops its copy
        before = _stats(mnt)
        fd = os.open(mnt / "f", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one page per page-in
        r["tmem_read_us"] = _preads(fd, order)
        after = _stats(mnt)
        if after["hits"] - before["hits"] != args.pages:
            raise RuntimeError(f"expected {args.pages} tmem hits, got {after['hits'] - before['hits']}")
        r["shim_hit_us"] = _preads(fd, order)
        os.close(fd)
        fd = os.open(file, os.O_RDONLY | os.O_DIRECT)
        r["odirect_read_us"] = _preads(fd, order, buf)
        os.close(fd)
        fd = os.open(file, os.O_RDONLY)
        _preads(fd, order)  # warm
        r["pagecache_read_us"] = _preads(fd, order)
        os.close(fd)
        os.setxattr(mnt, "user.tmem.precache.evict", b"1")
        r["seq_tmem_mbs"] = _sequential(mnt / "f")
        r["seq_odirect_mbs"] = _sequential(file, os.O_DIRECT)
        r["tmem_vs_disk"] = r["tmem_read_us"] / r["odirect_read_us"]
        r["shim_hot_overhead"] = r["shim_hit_us"] / r["pagecache_read_us"]
        rounds.append(r)
    figures = {k: round(statistics.median(r[k] for r in rounds), 2) for k in rounds[0]}
    out: dict[str, object] = dict(figures)
    out["pages"] = args.pages
    out["rounds"] = args.rounds
    out["loadavg_before"] = os.getloadavg()[0]
    out["counters"] = _stats(mnt)
    out["targets_met"] = {"tmem_vs_disk": figures["tmem_vs_disk"] < 1}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=2048, help="pages in the file (default 2048)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tmem-bench-", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="tmem-bench-", dir="/dev/shm"))
    disk = Path(tempfile.mkdtemp(prefix="tmem-bench-", dir="/var/tmp"))
    config = bench_config(tmp, shm / "arena", 256, '[[guest]]\nname = "bench"\ncompress = false\n')
    backing, mnt = disk / "backing", tmp / "mnt"
    backing.mkdir()
    mnt.mkdir()
    (backing / "f").write_bytes(random.Random(2).randbytes(args.pages * PAGE))
    os.sync()
    agent = subprocess.Popen(
        hostagent("run", "--config", str(config)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shim: subprocess.Popen[bytes] | None = None
    try:
        wait_started(agent, lambda: is_listening(f"{tmp}/control.sock"), "hostagent")
        shim = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guestagent.precache",
                str(backing),
                str(mnt),
                "--channel",
                f"{tmp}/guests/bench.sock",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_started(shim, lambda: os.path.ismount(mnt) and bool(_stats(mnt)["connected"]), "precache")
        print(json.dumps(measure(args, tmp, mnt, backing), indent=1))
    finally:
        if shim is not None:
            stop(shim)
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        stop(agent)
        for d in (tmp, shm, disk):
            shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
