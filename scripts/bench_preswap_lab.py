"""Preswap benchmark in the lab: one region workload in a guest, with preswap against the kernel's own
swap on the guest's disk, in one run.

Prints ONE JSON object.  Runs its own one-guest lab (`scripts/lab down` first and at the end); the
guest's disk may be `<iotune>`-limited (`--read-iops`, `--write-iops`; 0 = no limit).  The workload is
`scripts.preswap_workload --fill`: `--pages` pages written once, `--ops` random reads and writes
(half writes), then every page checked; the same seed, so the same accesses, in both cases:

- kernel swap: the pattern on plain anonymous memory (`--anonymous`) in a systemd scope with
  `MemoryMax` = the process's own memory (measured first) + the budget + a little slack, so the
  kernel swaps the rest to /swapfile on the guest's disk;
- preswap: the pattern on a preswap region with a resident budget of `--budget-mib`, served by the
  guest daemon (`[preswap]`) over the virtio-serial port to the host agent, in the same scope.

Figures per case: seconds (fill, and random + check), major faults (kernel) or tmem faults and gets
(preswap), the guest's pswpin/pswpout, disk requests (/sys/block/vda/stat).  `speedup` = seconds with
kernel swap / seconds with preswap (> 1: preswap is faster).  Under TCG every guest instruction is
emulated, the preswap agent is Python and the kernel's swap path is not, so the comparison is skewed
towards the kernel; under KVM guest code runs at native speed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from scripts import lab
from scripts.guest import PYTHON, Guest

GUEST = Guest("tmem-1")
WORKLOAD = [*PYTHON, "-m", "scripts.preswap_workload"]
SLACK_MIB = 4  # above the process's own memory and the budget: page tables, the kernel's bits

# the workload's own memory before its buffer: the interpreter, the pattern's noise, the versions list
OVERHEAD = r"""
from scripts import preswap_workload as w
pattern, versions = w.Pattern(1), [0] * int(sys.argv[1])
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")))
"""


def preswap_running() -> bool:
    return bool((GUEST.agent_stats().get("preswap") or {}).get("running"))


def case(limit_kib: int, argv: list[str]) -> dict[str, Any]:
    """One workload run in a memory-limited scope, with the disk requests it caused."""
    GUEST.drop_caches()
    disk0 = GUEST.disk_stat()
    out = GUEST.run(
        "systemd-run",
        "--scope",
        "--quiet",
        "-p",
        f"MemoryMax={limit_kib}K",
        "-p",
        "MemorySwapMax=infinity",
        *WORKLOAD,
        *argv,
        timeout=7200,
    )
    disk1 = GUEST.disk_stat()
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result["mismatches"]:
        raise SystemExit(f"bench preswap_lab: {result['mismatches']} pages did not verify: {result}")
    result["random_seconds"] = round(result["seconds"] - result["fill_seconds"], 3)
    result["disk_reads"], result["disk_writes"] = disk1.reads - disk0.reads, disk1.writes - disk0.writes
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--memory-mib", type=int, default=512, help="the guest's memory")
    ap.add_argument("--pages", type=int, default=16384, help="the region (default 64 MiB)")
    ap.add_argument("--budget-mib", type=int, default=16, help="resident memory for the region's data")
    ap.add_argument("--ops", type=int, default=20000, help="random reads and writes after the fill")
    ap.add_argument("--read-iops", type=int, default=200, help="the guest disk's read_iops_sec (0: none)")
    ap.add_argument("--write-iops", type=int, default=200, help="the guest disk's write_iops_sec (0: none)")
    args = ap.parse_args()
    budget = args.budget_mib * 256
    spec = lab.Lab(
        (
            lab.GuestSpec(
                name=GUEST.name,
                memory_mib=args.memory_mib,
                max_memory_mib=args.memory_mib,
                read_iops_sec=args.read_iops or None,
                write_iops_sec=args.write_iops or None,
            ),
        ),
        {},
    )
    common = ["--pages", str(args.pages), "--budget", str(budget), "--ops", str(args.ops), "--fill"]
    lab.down()
    try:
        lab.up(spec)
        GUEST.write_agent_config("[preswap]\nenabled = true\n")
        GUEST.wait_until(preswap_running, 120, "the preswap agent")
        overhead_kib = int(GUEST.python(OVERHEAD, str(args.pages)))
        limit_kib = overhead_kib + (args.budget_mib + SLACK_MIB) * 1024
        kernel = case(limit_kib, [*common, "--anonymous"])
        print(f"[bench] kernel swap: {json.dumps(kernel)}", file=sys.stderr)
        preswap = case(limit_kib, common)
        print(f"[bench] preswap: {json.dumps(preswap)}", file=sys.stderr)
        final = lab.stats()
        host = next(g for g in final["guests"].values() if g.get("name") == GUEST.name)["persistent"]
        virt = final.get("agent", {})
    finally:
        lab.down()
    agent = preswap.pop("agent")
    kernel.pop("agent")
    result = {
        "guest": {
            "memory_mib": args.memory_mib,
            "read_iops_sec": args.read_iops or None,
            "write_iops_sec": args.write_iops or None,
            "region_mib": args.pages * 4 >> 10,
            "budget_mib": args.budget_mib,
            "scope_memory_max_kib": limit_kib,
            "process_overhead_kib": overhead_kib,
            "ops": args.ops,
        },
        "kernel_swap": {**kernel, "faults": kernel["majflt"]},
        "preswap": {
            **preswap,
            "faults": agent["tmem_faults"] + agent["disk_faults"],
            "zero_faults": agent["zero_faults"],
            "readahead_pages": agent["readahead"],
            "puts": agent["puts"],
            "gets": agent["gets"],
            "puts_refused": agent["puts_refused"],
            "host_persistent_puts": host["puts"],
            "host_persistent_gets": host["gets"],
        },
        "host_agent_cpu_seconds": virt.get("cpu_seconds"),
        "speedup": round(kernel["seconds"] / max(preswap["seconds"], 1e-9), 2),
        "speedup_random_phase": round(kernel["random_seconds"] / max(preswap["random_seconds"], 1e-9), 2),
        "targets_met": {
            "preswap_no_guest_swap_traffic": preswap["swap"] == {"pswpin": 0, "pswpout": 0},
            "kernel_case_swapped": kernel["swap"]["pswpout"] > 0,
            "preswap_beats_kernel_swap": kernel["seconds"] > preswap["seconds"],
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
