"""Precache benchmark in the lab: a memory-constrained guest re-reading a file set larger than its
cache, without and with precache, its disk limited by `<iotune>` to a cloud-like read IOPS rate.

Prints ONE JSON object.  Runs its own one-guest lab (`scripts/lab down` first and at the end):
the guest's disk has `read_iops_sec` (default 200).  A file set of `set_mib` (default 3x `cache_mib`)
is written into /srv/precache, then, in one run:

- without precache: the reader runs in a systemd scope with `MemoryMax=cache_mib` (its page cache
  is charged to it, so the guest keeps `cache_mib` of these files), reading the backing directory;
- with precache: the daemon serves /srv/precache at /mnt/precache (`[[precache]]`, `cache_pages` =
  `cache_mib`; files are direct_io, so the shim's cache is the guest's one copy), the reader in the
  same scope reads the mount.

Each case drops the guest's caches, reads the set once (cold), then `passes` more times (measured).
Figures for the measured passes: seconds, disk read requests (/sys/block/vda/stat), pages paged in.
`precache_share` = precache hits / precache gets (the share of the shim's page-ins served from tmem;
target >= 0.5, the seed talk reached a third); `disk_reads_avoided_per_s` = (disk reads without -
disk reads with) / seconds with; `speedup` = seconds without / seconds with (information).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scripts import lab
from scripts.guest import Guest

GUEST = Guest("tmem-1")
BACKING, MOUNT = "/srv/precache", "/mnt/precache"

READER = r"""
import json, os, sys, time
root, passes = sys.argv[1], int(sys.argv[2])
names = sorted(os.listdir(root))

def disk():
    with open("/sys/block/vda/stat") as f:
        v = f.read().split()
    return int(v[0]), int(v[2]) * 512  # read requests completed, bytes read

def read_all():
    n = 0
    for name in names:
        with open(os.path.join(root, name), "rb", buffering=0) as f:
            while chunk := f.read(1 << 17):
                n += len(chunk)
    return n

read_all()  # cold
ios0, bytes0 = disk()
t0 = time.monotonic()
total = sum(read_all() for _ in range(passes))
seconds = time.monotonic() - t0
ios1, bytes1 = disk()
print(json.dumps({"seconds": round(seconds, 2), "bytes_read": total, "disk_reads": ios1 - ios0,
                  "disk_bytes": bytes1 - bytes0}))
"""


def precache_counters() -> dict[str, Any]:
    pc: dict[str, Any] = GUEST.agent_stats().get("precache") or {}
    return pc


def read_case(root: str, cache_mib: int, passes: int) -> dict[str, Any]:
    GUEST.drop_caches()
    out = GUEST.run(
        "systemd-run",
        "--scope",
        "--quiet",
        "-p",
        f"MemoryMax={cache_mib}M",
        "python3",
        "-",
        root,
        str(passes),
        stdin=READER,
        timeout=3600,
    )
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-mib", type=int, default=32, help="the guest's cache of the set, both cases")
    ap.add_argument("--set-mib", type=int, default=0, help="the file set (default: 3x --cache-mib)")
    ap.add_argument("--passes", type=int, default=2, help="measured re-reads after the cold read")
    ap.add_argument("--read-iops", type=int, default=200, help="the guest disk's read_iops_sec")
    args = ap.parse_args()
    set_mib = args.set_mib or 3 * args.cache_mib
    spec = lab.Lab((lab.GuestSpec(name=GUEST.name, read_iops_sec=args.read_iops),), {})
    lab.down()
    try:
        lab.up(spec)
        files = max(1, set_mib // 4)
        GUEST.run(
            "sh",
            "-c",
            f"mkdir -p {BACKING} {MOUNT} && for i in $(seq {files}); do "
            f"head -c {4 << 20} /dev/urandom > {BACKING}/f$i; done; sync",
            timeout=1800,
        )
        without = read_case(BACKING, args.cache_mib, args.passes)
        print(f"[bench] without precache: {without}", file=sys.stderr)
        config = (
            f'[[precache]]\nbacking = "{BACKING}"\nmountpoint = "{MOUNT}"\n'
            f"cache_pages = {args.cache_mib * 256}\n"
        )
        GUEST.write_agent_config(config)
        GUEST.wait_until(lambda: precache_counters().get("connected"), 120, "the precache mount")
        before = precache_counters()
        GUEST.drop_caches()
        # the cold pass here, so that the counters from `mid` on cover re-reads only (read_case's own
        # "cold" pass is then a re-read too; its disk figures cover the measured passes alone)
        GUEST.run(
            "python3",
            "-c",
            f"import os\nfor n in sorted(os.listdir('{MOUNT}')):\n"
            f"    open(os.path.join('{MOUNT}', n), 'rb').read()\n",
            timeout=3600,
        )
        mid = precache_counters()
        with_pc = read_case(MOUNT, args.cache_mib, args.passes)
        after = precache_counters()
        print(f"[bench] with precache: {with_pc}", file=sys.stderr)
    finally:
        lab.down()
    delta = {
        k: after[k] - mid[k] for k in ("gets", "hits", "misses", "puts", "bytes_from_tmem", "bytes_from_disk")
    }
    share = delta["hits"] / delta["gets"] if delta["gets"] else 0.0
    result = {
        "guest": {
            "read_iops_sec": args.read_iops,
            "cache_mib": args.cache_mib,
            "set_mib": files * 4,
            "passes": args.passes,
        },
        "without": without,
        "with": {**with_pc, "precache": delta, "cold_pass": {k: mid[k] - before[k] for k in delta}},
        "precache_share": round(share, 3),
        "disk_reads_avoided_per_s": round(
            (without["disk_reads"] - with_pc["disk_reads"]) / max(with_pc["seconds"], 1e-9), 1
        ),
        "speedup": round(without["seconds"] / max(with_pc["seconds"], 1e-9), 2),
        "targets_met": {"precache_share_at_least_half": share >= 0.5},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
