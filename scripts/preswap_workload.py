"""A verifying workload on a preswap region: random reads and writes, every page checked.

    python -m scripts.preswap_workload --socket S --pages 4096 --budget 1024 --ops 200000

Not product: the tests, the demo and the benchmarks run it, on the host from the repository root
and in lab guests, whose image installs it beside the guest agent (/opt/tmem/scripts/, see
scripts/build_image.py `guest_code`); it needs only `guestagent.preswap`.

Each page holds a version; version 0 is all zeros (never written), version v > 0 is a header
(page, version) and 4080 bytes cut from a random buffer at an offset derived from both, so no two
versions look alike and nothing compresses.  Every operation compares the whole page with what it
must hold, then (half the time) writes the next version.  A final pass checks every page.  Prints
one JSON line: operations, mismatches (must be 0), seconds, the agent's counters, and the guest's
swap traffic meanwhile (/proc/vmstat pswpin/pswpout, this process's major faults).

`--fill` writes every page once before the random operations, so the region holds its full size
in data.  `--anonymous` runs the same pattern on plain anonymous memory instead of a region: the
kernel's own swap is then what pages it out (the baseline; run it under a memory limit).
"""

from __future__ import annotations

import argparse
import json
import mmap
import random
import resource
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from guestagent import preswap

PAGE = preswap.PAGE
_HEAD = struct.Struct("<QQ")
_NOISE_SIZE = 1 << 20


class Pattern:
    """The content of (page, version), cheap to make and to compare."""

    def __init__(self, seed: int) -> None:
        self.noise = random.Random(seed).randbytes(_NOISE_SIZE)
        self.zero = bytes(PAGE)

    def page(self, p: int, version: int) -> bytes:
        if version == 0:
            return self.zero
        off = (p * 7919 + version * 104729) % (_NOISE_SIZE - PAGE)
        return _HEAD.pack(p, version) + self.noise[off : off + PAGE - _HEAD.size]


def swap_counters(proc_dir: str = "/proc") -> dict[str, int]:
    """The guest's pages swapped in and out so far (the kernel's swap, not preswap)."""
    out = {"pswpin": 0, "pswpout": 0}
    with open(f"{proc_dir}/vmstat") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if key in out:
                out[key] = int(value)
    return out


class _Memory:
    """The buffer exercised, and the agent's counters of its region once done."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.agent: dict[str, Any] | None = None


@contextmanager
def _buffer(socket: str, nbytes: int, budget: int, anonymous: bool, progress: bool) -> Iterator[_Memory]:
    """The memory to exercise: a preswap region (and its agent's counters afterwards), or plain
    anonymous memory (the kernel's swap pages it out: the baseline)."""
    if not anonymous:
        with preswap.Region(nbytes, socket, budget_pages=budget) as region:
            if progress:
                print(json.dumps({"region": region.id}), flush=True)
            memory = _Memory(region.buf)
            yield memory
            memory.agent = preswap.stats(socket)["regions"][str(region.id)]
        return
    mm = mmap.mmap(-1, nbytes, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with memoryview(mm) as buf:
            yield _Memory(buf)
    finally:
        mm.close()


def run(
    socket: str,
    pages: int,
    budget: int,
    ops: int,
    *,
    seed: int = 1,
    write_ratio: float = 0.5,
    hot_pages: float = 0.0,
    hot_ops: float = 0.0,
    progress: bool = False,
    fill: bool = False,
    anonymous: bool = False,
) -> dict[str, Any]:
    """`hot_ops` of the operations go to the first `hot_pages` (a fraction) of the region."""
    pattern = Pattern(seed)
    versions = [0] * pages
    swap0, majflt0 = swap_counters(), resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    started = time.perf_counter()
    with _buffer(socket, pages * PAGE, budget, anonymous, progress) as memory:
        out = _exercise(
            memory.buf,
            pattern,
            versions,
            ops,
            seed=seed,
            write_ratio=write_ratio,
            hot_pages=hot_pages,
            hot_ops=hot_ops,
            fill=fill,
        )
        out["seconds"] = round(time.perf_counter() - started, 3)
    out["agent"] = memory.agent
    swap1 = swap_counters()
    out["swap"] = {k: swap1[k] - swap0[k] for k in swap1}
    out["majflt"] = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - majflt0
    return out


def _exercise(
    buf: memoryview,
    pattern: Pattern,
    versions: list[int],
    ops: int,
    *,
    seed: int,
    write_ratio: float,
    hot_pages: float,
    hot_ops: float,
    fill: bool,
) -> dict[str, Any]:
    """The fill (if asked), the random operations, the final check of every page."""
    rng = random.Random(seed + 1)
    pages = len(versions)
    mismatches = 0
    started = time.perf_counter()
    if fill:
        for p in range(pages):
            versions[p] = 1
            buf[p * PAGE : (p + 1) * PAGE] = pattern.page(p, 1)
    fill_seconds = time.perf_counter() - started
    hot = max(1, int(pages * hot_pages))
    for _ in range(ops):
        p = rng.randrange(hot) if rng.random() < hot_ops else rng.randrange(pages)
        at = p * PAGE
        if buf[at : at + PAGE] != pattern.page(p, versions[p]):
            mismatches += 1
        if rng.random() < write_ratio:
            versions[p] += 1
            buf[at : at + PAGE] = pattern.page(p, versions[p])
    for p in range(pages):
        at = p * PAGE
        if buf[at : at + PAGE] != pattern.page(p, versions[p]):
            mismatches += 1
    return {
        "ops": ops + pages * (2 if fill else 1),
        "mismatches": mismatches,
        "fill_seconds": round(fill_seconds, 3),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m scripts.preswap_workload")
    parser.add_argument("--socket", default=preswap.DEFAULT_SOCKET)
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write-ratio", type=float, default=0.5)
    parser.add_argument("--hot-pages", type=float, default=0.0, help="fraction of pages that are hot")
    parser.add_argument("--hot-ops", type=float, default=0.0, help="fraction of operations on them")
    parser.add_argument("--progress", action="store_true", help="print the region id once created")
    parser.add_argument("--fill", action="store_true", help="write every page once first")
    parser.add_argument(
        "--anonymous",
        action="store_true",
        help="plain anonymous memory instead of a region (the kernel's swap)",
    )
    result = run(**vars(parser.parse_args(argv)))
    print(json.dumps(result), flush=True)
    sys.exit(1 if result["mismatches"] else 0)


if __name__ == "__main__":
    main()
