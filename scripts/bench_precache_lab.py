"""Precache benchmark in the lab: a memory-constrained guest re-reading a file set larger than its
memory share, without and with precache, at equal guest memory, its disk limited by `<iotune>` to a
cloud-like read IOPS rate.

Prints ONE JSON object.  Runs its own one-guest lab (`scripts/lab down` first and at the end):
the guest's disk has `read_iops_sec` (default 200).  A file set of `set_mib` (default 3x `cache_mib`)
is written into /srv/precache, then, in one run and in the same guest:

- without precache (a guest agent config without `[[precache]]`): the reader runs in a systemd
  scope with `MemoryMax=cache_mib` (its page cache is charged to it, so the guest keeps `cache_mib`
  of these files), reading the backing directory;
- with precache: the daemon serves /srv/precache (the build area, a symlink into /usr) over itself
  (`[[precache]]`; the image's default covers all of /usr), the reader in the same scope reads it:
  the kernel's page cache of the mount's files is charged to the same scope, and the shim drops the
  backing files' own page cache after each read, so the guest holds as much of the set as without;
  pages the kernel drops come from the pool.

Each case drops the guest's caches, reads the set once (cold), then `passes` more times (measured).
Figures for the measured passes: seconds, disk read requests that reached the rate-limited disk
(libvirt's `blockStats` of vda, on the host) and pages the guest read from its disks (`pgpgin`).
`share_of_all_page_ins` = pool hits / (pool hits + pages the guest read from disk), from counters
over the measured passes with precache (target >= 1/3, the seed talk's figure); `precache_share`
= hits / gets (information); `speedup` = seconds without / seconds with (information).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scripts import lab
from scripts.guest import Guest

GUEST = Guest("tmem-1")
BACKING = MOUNT = "/srv/precache"  # the mount covers the tree it serves
SET = "bench"  # the file set's directory in it (the image keeps its demo project beside it)

READER = r"""
import json, os, sys, time
root, passes = sys.argv[1], int(sys.argv[2])
names = sorted(os.listdir(root))

def disk():
    with open("/proc/vmstat") as f:
        v = dict(line.split() for line in f)
    return int(v["pgpgin"]) // 4, 0  # pages read from block devices (pgpgin counts KiB)

def read_all():
    n = 0
    for name in names:
        with open(os.path.join(root, name), "rb", buffering=0) as f:
            while chunk := f.read(1 << 17):
                n += len(chunk)
    return n

read_all()  # cold
open("/run/bench-precache.ready", "w").close()  # the host notes libvirt's block stats, then says go
while not os.path.exists("/run/bench-precache.go"):
    time.sleep(0.1)
pages0, _ = disk()
t0 = time.monotonic()
total = sum(read_all() for _ in range(passes))
seconds = time.monotonic() - t0
pages1, _ = disk()
print(json.dumps({"seconds": round(seconds, 2), "bytes_read": total, "page_ins": pages1 - pages0}))
"""


def precache_counters() -> dict[str, Any]:
    pc: dict[str, Any] = GUEST.agent_stats().get("precache") or {}
    return pc


COUNTERS = ("reads", "gets", "hits", "misses", "puts", "put_backs", "bytes_from_tmem", "bytes_from_disk")


def disk_reads() -> int:
    """Read requests the guest's disk served, as libvirt counts them on the host (blockStats)."""
    rd_req, _rd_bytes, _wr_req, _wr_bytes, _errs = GUEST.domain().blockStats("vda")
    return int(rd_req)


def read_case(root: str, cache_mib: int, passes: int) -> dict[str, Any]:
    """Drop the guest's caches, read the set cold, then measure `passes` re-reads, in one scope."""
    GUEST.run("rm", "-f", "/run/bench-precache.ready", "/run/bench-precache.go")
    GUEST.drop_caches()
    pid = GUEST.spawn(
        "systemd-run",
        "--scope",
        "--quiet",
        "-p",
        f"MemoryMax={cache_mib}M",
        "python3",
        "-",
        f"{root}/{SET}",
        str(passes),
        stdin=READER,
    )
    # (a scope runs the command in place: the pid is the reader's)
    ready_or_gone = f"test -e /run/bench-precache.ready || ! kill -0 {pid}"
    GUEST.wait_until(lambda: GUEST.exec("sh", "-c", ready_or_gone)[0] == 0, 3600, "the cold pass")
    if GUEST.exec("test", "-e", "/run/bench-precache.ready")[0] != 0:
        rc, out, err = GUEST.wait(pid, 60, "the reader")
        raise RuntimeError(f"the reader failed before its measured passes ({rc}): {(out + err)[-2000:]}")
    counters0 = precache_counters()
    before = disk_reads()
    GUEST.run("touch", "/run/bench-precache.go")
    rc, out, err = GUEST.wait(pid, 3600, "the measured passes")
    after = disk_reads()
    counters1 = precache_counters()
    if rc != 0:
        raise RuntimeError(f"the reader failed ({rc}): {(out + err)[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["disk_reads"] = after - before
    if counters0 and counters1:
        result["precache"] = {k: counters1[k] - counters0[k] for k in COUNTERS}
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
        GUEST.write_agent_config("")  # no precache mount over the backing directory
        GUEST.run(
            "sh",
            "-c",
            f"mkdir -p {BACKING}/{SET} && for i in $(seq {files}); do "
            f"head -c {4 << 20} /dev/urandom > {BACKING}/{SET}/f$i; done; sync",
            timeout=1800,
        )
        without = read_case(BACKING, args.cache_mib, args.passes)
        print(f"[bench] without precache: {without}", file=sys.stderr)
        config = f'[[precache]]\nbacking = "{BACKING}"\nmountpoint = "{MOUNT}"\n'
        GUEST.write_agent_config(config)
        GUEST.wait_until(lambda: precache_counters().get("connected"), 120, "the precache mount")
        GUEST.drop_caches()  # the cold read from the disk puts every page to the pool
        GUEST.run(
            "python3",
            "-c",
            f"import os\nd = '{MOUNT}/{SET}'\nfor n in sorted(os.listdir(d)):\n"
            f"    open(os.path.join(d, n), 'rb').read()\n",
            timeout=3600,
        )
        with_pc = read_case(MOUNT, args.cache_mib, args.passes)
        print(f"[bench] with precache: {with_pc}", file=sys.stderr)
    finally:
        lab.down()
    delta = with_pc["precache"]  # over the measured passes, as the page-ins and disk reads
    share = delta["hits"] / delta["gets"] if delta["gets"] else 0.0
    all_ins = delta["hits"] + with_pc["page_ins"]
    share_all = delta["hits"] / all_ins if all_ins else 0.0
    result = {
        "guest": {
            "read_iops_sec": args.read_iops,
            "cache_mib": args.cache_mib,
            "set_mib": files * 4,
            "passes": args.passes,
            "memory_mib": spec.guests[0].memory_mib,
        },
        "without": without,
        "with": with_pc,
        "share_of_all_page_ins": round(share_all, 3),
        "precache_share": round(share, 3),
        "disk_reads_without": without["disk_reads"],
        "disk_reads_with": with_pc["disk_reads"],
        "speedup": round(without["seconds"] / max(with_pc["seconds"], 1e-9), 2),
        "targets_met": {
            "share_of_all_page_ins_at_least_a_third": share_all >= 1 / 3,
            "fewer_disk_reads": with_pc["disk_reads"] < without["disk_reads"],
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
