"""What the guest tells the host every interval: its memory commitment and paging activity.

The host's balloon controller needs Committed_AS (virtio-balloon stats do not carry it), and
`hostagent stats` shows each guest's disk page-ins/outs and swap traffic next to what tmem
absorbed.  Both come from /proc/meminfo and /proc/vmstat; the parsers are pure functions of
the file text so that tests feed them samples.

Report names are lower-case ascii (the wire's STATS names): meminfo fields get a `_kib`
suffix because the kernel reports them in KiB; vmstat counters keep the kernel's names and
units (pgpgin/pgpgout count KiB, pswpin/pswpout count pages, the rest count events or pages).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = [
    "MEMINFO_FIELDS",
    "VMSTAT_FIELDS",
    "build_report",
    "parse_meminfo",
    "parse_vmstat",
    "read_report",
]

# /proc/meminfo field -> report name (values in KiB)
MEMINFO_FIELDS: Final[Mapping[str, str]] = {
    "Committed_AS": "committed_as_kib",
    "MemTotal": "memtotal_kib",
    "MemFree": "memfree_kib",
    "MemAvailable": "memavailable_kib",
    "Cached": "cached_kib",
    "SwapTotal": "swaptotal_kib",
    "SwapFree": "swapfree_kib",
}

# /proc/vmstat counters reported under their own names, when the kernel has them
VMSTAT_FIELDS: Final[tuple[str, ...]] = (
    "pgpgin",  # KiB read from block devices
    "pgpgout",  # KiB written to block devices
    "pswpin",  # pages swapped in
    "pswpout",  # pages swapped out
    "pgfault",
    "pgmajfault",
    "workingset_refault_file",  # Linux >= 5.9: evicted file pages read back
    "workingset_refault_anon",
    "workingset_refault",  # Linux < 5.9: the same, undivided
)


def parse_meminfo(text: str) -> dict[str, int]:
    """Every `Name:  value [kB]` line of /proc/meminfo, values as given (KiB, or a count)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields:
            continue
        try:
            out[name.strip()] = int(fields[0])
        except ValueError:
            continue
    return out


def parse_vmstat(text: str) -> dict[str, int]:
    """Every `name value` line of /proc/vmstat."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2:
            continue
        try:
            out[fields[0]] = int(fields[1])
        except ValueError:
            continue
    return out


def build_report(meminfo: Mapping[str, int], vmstat: Mapping[str, int]) -> dict[str, int]:
    """The STATS report: the selected fields under their report names; absent ones are left out
    (an old kernel's missing counter is not a zero)."""
    report = {name: meminfo[field] for field, name in MEMINFO_FIELDS.items() if field in meminfo}
    report.update((name, vmstat[name]) for name in VMSTAT_FIELDS if name in vmstat)
    return report


def read_report(proc_dir: str = "/proc") -> dict[str, int]:
    """Read and build the report from the running kernel (or a fake /proc for tests)."""
    with open(os.path.join(proc_dir, "meminfo"), encoding="ascii", errors="replace") as f:
        meminfo = parse_meminfo(f.read())
    with open(os.path.join(proc_dir, "vmstat"), encoding="ascii", errors="replace") as f:
        vmstat = parse_vmstat(f.read())
    return build_report(meminfo, vmstat)
