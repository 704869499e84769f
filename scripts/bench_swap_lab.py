"""Swap benchmark in the lab: one unmodified memory hog, three ways to swap, in one run.

Prints ONE JSON object. Runs its own one-guest lab (`scripts/lab down` first and at the end) with the
guest disk `<iotune>`-limited (200 read and 200 write IOPS by default). The workload is
scripts/swap_hog.c (compiled in the guest): `--hog-mib` MiB (default 2x the guest's memory) written,
`--ops` random page reads-and-checks and rewrites, then every page checked; the same seed, so the
same accesses, in each case, in the same guest with the same memory:

- kernel: the kernel swaps to swap files on the guest's disk (the image's /swapfile and a bench
  file /swapbench, both on vda); the pool's device is swapped off, zswap off;
- zswap: the same, with the guest kernel's zswap on (Debian's defaults: its pool takes up to
  max_pool_percent of the guest's own memory);
- pool: the pool's swap device (the host agent, over NBD) is the first swap, zswap off.

Per case: seconds (and the fill's), major faults, pages that reached any disk (`swap_disk_writes`,
`swap_disk_reads`: the guest's swap-file traffic, i.e. pswpout/pswpin less the device's own, plus,
for the pool, the host's spill-file writes and reads), host memory used (the arena's resident bytes
at their peak over the case), the guest memory zswap's pool took (its peak), and host-agent CPU
seconds. See docs/preswap-device.md for what TCG skews.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

from scripts import lab

GUEST = "tmem-1"
HOG = "/root/swap_hog"
DEVICE = "/dev/vdb"
BENCH_SWAP = "/swapbench"


def run(*argv: str, timeout: float = 600, stdin: bytes | None = None) -> str:
    dom = lab.connect().lookupByName(GUEST)
    rc, out, err = lab.guest_exec(dom, list(argv), timeout=timeout, stdin=stdin)
    if rc != 0:
        raise SystemExit(f"bench swap_lab: {' '.join(argv)} exited {rc}: {out}{err}")
    return out


def vmstat() -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in run("cat", "/proc/vmstat").splitlines())}


def written_pages(dev: str) -> tuple[int, int]:
    """(pages read, pages written) through a guest block device, from its sector counts."""
    f = run("cat", f"/sys/block/{dev}/stat").split()
    return int(f[2]) // 8, int(f[6]) // 8


def device() -> dict[str, Any]:
    g = next(g for g in lab.stats()["guests"].values() if g.get("name") == GUEST)
    return g["swapdev"] or {}


def zswap_bytes() -> int:
    try:
        return int(run("cat", "/sys/kernel/debug/zswap/pool_total_size"))
    except SystemExit:
        return 0


def swap_areas(pool: bool) -> None:
    """Every case starts from empty swap: all areas off (what earlier cases left there comes back in,
    and the per-CPU swap-slot caches, which hold slots of the areas in use before, are emptied), then
    the case's own areas on, the pool's device first when it is the case's."""
    run("swapoff", "-a")
    if pool:
        run("swapon", "--discard=pages", "--priority=100", DEVICE)
    run("swapon", "--priority=10", "/swapfile")
    run("swapon", "--priority=5", BENCH_SWAP)


def case(name: str, mib: int, ops: int, seed: int) -> dict[str, Any]:
    swap_areas(pool=name == "pool")
    run("sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches")
    v0, vdb0, dev0 = vmstat(), written_pages("vdb"), device()
    cpu0 = lab.stats()["agent"]["cpu_seconds"]
    dom = lab.connect().lookupByName(GUEST)
    pid = lab.guest_spawn(dom, [HOG, str(mib), str(ops), str(seed)])
    peak_arena, peak_zswap, peak_pool_pages = 0, 0, 0
    while True:
        st = lab.agent_command(dom, {"execute": "guest-exec-status", "arguments": {"pid": pid}})
        s = lab.stats()
        peak_arena = max(peak_arena, s["pool"]["resident_bytes"])
        peak_pool_pages = max(peak_pool_pages, device().get("pool_pages", 0))
        if name == "zswap":
            peak_zswap = max(peak_zswap, zswap_bytes())
        if st.get("exited"):  # reported once: its output is here
            break
        time.sleep(2)
    out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
    err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
    if st.get("exitcode") != 0:
        raise SystemExit(f"bench swap_lab: {name}: swap_hog: {st}: {out}{err}")
    hog = json.loads(out.strip().splitlines()[-1])
    v1, vdb1, dev1 = vmstat(), written_pages("vdb"), device()
    cpu1 = lab.stats()["agent"]["cpu_seconds"]
    pswpout, pswpin = v1["pswpout"] - v0["pswpout"], v1["pswpin"] - v0["pswpin"]
    dev_reads, dev_writes = vdb1[0] - vdb0[0], vdb1[1] - vdb0[1]
    spill_w = dev1.get("spill_writes", 0) - dev0.get("spill_writes", 0)
    spill_r = dev1.get("spill_reads", 0) - dev0.get("spill_reads", 0)
    return {
        "seconds": hog["seconds"],
        "fill_seconds": hog["fill_seconds"],
        "major_faults": hog["major_faults"],
        "bad_pages": hog["bad_pages"],
        "pswpout": pswpout,
        "pswpin": pswpin,
        "swap_disk_writes": max(pswpout - dev_writes, 0) + spill_w,
        "swap_disk_reads": max(pswpin - dev_reads, 0) + spill_r,
        "device_pages_written": dev_writes,
        "device_pages_read": dev_reads,
        "pool_puts": dev1.get("puts", 0) - dev0.get("puts", 0),
        "pool_refusals": dev1.get("refusals", 0) - dev0.get("refusals", 0),
        "pool_gets": dev1.get("gets", 0) - dev0.get("gets", 0),
        "pool_pages_peak": peak_pool_pages,
        "host_memory_peak_bytes": peak_arena,
        "guest_zswap_pool_peak_bytes": peak_zswap,
        "host_agent_cpu_seconds": round(cpu1 - cpu0, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory-mib", type=int, default=256, help="the guest's memory")
    ap.add_argument("--hog-mib", type=int, default=0, help="the hog's memory (0: 2x the guest's)")
    ap.add_argument("--ops", type=int, default=20000, help="random page operations after the fill")
    ap.add_argument(
        "--swap-mib", type=int, default=768, help="the pool device's and the bench swap file's size"
    )
    ap.add_argument("--read-iops", type=int, default=200, help="read_iops_sec (0: none)")
    ap.add_argument("--write-iops", type=int, default=200, help="write_iops_sec (0: none)")
    args = ap.parse_args()
    mib = args.hog_mib or 2 * args.memory_mib
    spec = lab.Lab(
        (
            lab.GuestSpec(
                name=GUEST,
                memory_mib=args.memory_mib,
                max_memory_mib=args.memory_mib,
                read_iops_sec=args.read_iops or None,
                write_iops_sec=args.write_iops or None,
            ),
        ),
        {"swap_mib": args.swap_mib},
    )
    lab.down()
    cases: dict[str, Any] = {}
    try:
        lab.up(spec)
        run(
            "sh",
            "-c",
            f"gcc -O2 -o {HOG} -x c -",
            stdin=(Path(__file__).resolve().parent / "swap_hog.c").read_bytes(),
        )
        deadline = time.monotonic() + 120
        while DEVICE not in run("cat", "/proc/swaps"):
            if time.monotonic() > deadline:
                raise SystemExit("bench swap_lab: the pool's swap device was not swapped on")
            time.sleep(1)
        run(
            "sh",
            "-c",
            f"fallocate -l {args.swap_mib}M {BENCH_SWAP} && chmod 600 {BENCH_SWAP} "
            f"&& mkswap {BENCH_SWAP} >/dev/null",
        )
        run("sh", "-c", "mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug")
        zswap = "/sys/module/zswap/parameters"
        run("sh", "-c", f"echo 0 > {zswap}/enabled")
        cases["kernel"] = case("kernel", mib, args.ops, 1)
        print(f"[bench] kernel: {json.dumps(cases['kernel'])}", file=sys.stderr)
        run("sh", "-c", f"echo 1 > {zswap}/enabled")
        params = {p: run("cat", f"{zswap}/{p}").strip() for p in ("compressor", "zpool", "max_pool_percent")}
        cases["zswap"] = case("zswap", mib, args.ops, 1)
        cases["zswap"]["zswap_parameters"] = params
        print(f"[bench] zswap: {json.dumps(cases['zswap'])}", file=sys.stderr)
        run("sh", "-c", f"echo 0 > {zswap}/enabled")
        cases["pool"] = case("pool", mib, args.ops, 1)
        print(f"[bench] pool: {json.dumps(cases['pool'])}", file=sys.stderr)
        swaps = run("cat", "/proc/swaps")
        agent = lab.stats()["agent"]
    finally:
        lab.down()
    k, z, p = cases["kernel"], cases["zswap"], cases["pool"]
    result = {
        "guest": {
            "memory_mib": args.memory_mib,
            "hog_mib": mib,
            "ops": args.ops,
            "read_iops_sec": args.read_iops or None,
            "write_iops_sec": args.write_iops or None,
            "swap_mib": args.swap_mib,
            "proc_swaps_at_end": swaps,
        },
        "cases": cases,
        "host_agent_cpu_seconds_total": agent["cpu_seconds"],
        "targets_met": {
            "every_page_verified": all(c["bad_pages"] == 0 for c in cases.values()),
            "pool_no_disk_pages_while_room": p["pool_refusals"] == 0
            and p["swap_disk_writes"] == 0
            and p["swap_disk_reads"] == 0,
            "pool_faster_than_kernel": p["seconds"] < k["seconds"],
            "pool_disk_pages_at_most_zswap": p["swap_disk_writes"] + p["swap_disk_reads"]
            <= z["swap_disk_writes"] + z["swap_disk_reads"],
            "pool_faster_than_zswap": p["seconds"] < z["seconds"],
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
