"""A verifying workload on a preswap region: random reads and writes, every page checked.

    python -m guestagent.preswap_workload --socket S --pages 4096 --budget 1024 --ops 200000

Each page holds a version; version 0 is all zeros (never written), version v > 0 is a header
(page, version) and 4080 bytes cut from a random buffer at an offset derived from both, so no two
versions look alike and nothing compresses.  Every operation compares the whole page with what it
must hold, then (half the time) writes the next version.  A final pass checks every page.  Prints
one JSON line: operations, mismatches (must be 0), seconds, and the agent's counters.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
from collections.abc import Sequence
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


def run(socket_path: str, pages: int, budget: int, ops: int, *, seed: int = 1,
        write_ratio: float = 0.5, hot_pages: float = 0.0, hot_ops: float = 0.0,
        progress: bool = False) -> dict[str, Any]:  # fmt: skip
    """`hot_ops` of the operations go to the first `hot_pages` (a fraction) of the region."""
    pattern = Pattern(seed)
    rng = random.Random(seed + 1)
    versions = [0] * pages
    mismatches = 0
    started = time.perf_counter()
    with preswap.Region(pages * PAGE, socket_path, budget_pages=budget) as region:
        if progress:
            print(json.dumps({"region": region.id}), flush=True)
        buf = region.buf
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
        elapsed = time.perf_counter() - started
        agent = preswap.stats(socket_path)["regions"][str(region.id)]
    return {"ops": ops + pages, "mismatches": mismatches, "seconds": round(elapsed, 3),
            "agent": agent}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m guestagent.preswap_workload")
    parser.add_argument("--socket", default=preswap.DEFAULT_SOCKET)
    parser.add_argument("--pages", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--ops", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write-ratio", type=float, default=0.5)
    parser.add_argument("--hot-pages", type=float, default=0.0, help="fraction of pages that are hot")
    parser.add_argument("--hot-ops", type=float, default=0.0, help="fraction of operations on them")
    parser.add_argument("--progress", action="store_true", help="print the region id once created")
    args = parser.parse_args(argv)
    result = run(args.socket, args.pages, args.budget, args.ops, seed=args.seed,
                 write_ratio=args.write_ratio, hot_pages=args.hot_pages, hot_ops=args.hot_ops,
                 progress=args.progress)  # fmt: skip
    print(json.dumps(result), flush=True)
    sys.exit(1 if result["mismatches"] else 0)


if __name__ == "__main__":
    main()
