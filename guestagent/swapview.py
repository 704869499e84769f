"""The guest's own view of the pool-backed swap disk, for `guestagent stats` beside the host's counters.

The host agent serves the disk (docs/preswap-device.md), so the guest agent is not on its path and
knows only what the guest kernel says: the disk's row in /proc/swaps (size, used, priority) and its
block counters in /sys/block/NAME/stat. The disk is found by the serial the host gives it. Parsing is
pure; `read_view` is the I/O edge, with its roots as arguments so tests can point it at files.
"""

from __future__ import annotations

import os
from typing import Any, Final

__all__ = ["DEVICE_LINK", "parse_block_stat", "parse_swaps", "read_view"]

DEVICE_LINK: Final = "/dev/disk/by-id/virtio-tmem-swap"  # serial "tmem-swap" (scripts/domain.py)
SECTOR: Final = 512  # /sys/block/*/stat counts 512-byte sectors whatever the disk's block size

# /sys/block/NAME/stat fields (Documentation/block/stat.rst); kernels before 4.18 stop after the
# 11th, before 5.5 after the 15th.
_STAT_FIELDS: Final = (
    "read_ios",
    "read_merges",
    "read_sectors",
    "read_ticks_ms",
    "write_ios",
    "write_merges",
    "write_sectors",
    "write_ticks_ms",
    "in_flight",
    "io_ticks_ms",
    "time_in_queue_ms",
    "discard_ios",
    "discard_merges",
    "discard_sectors",
    "discard_ticks_ms",
    "flush_ios",
    "flush_ticks_ms",
)


def parse_swaps(text: str, device: str) -> dict[str, Any] | None:
    """`device`'s row of /proc/swaps (sizes in KiB), or None if it is not swapped on."""
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[0] == device:
            return {
                "size_kib": int(fields[2]),
                "used_kib": int(fields[3]),
                "priority": int(fields[4]),
            }
    return None


def parse_block_stat(text: str) -> dict[str, int]:
    """A block device's stat line as named counters, plus the bytes read and written."""
    values = dict(zip(_STAT_FIELDS, map(int, text.split()), strict=False))
    values["read_bytes"] = values.get("read_sectors", 0) * SECTOR
    values["written_bytes"] = values.get("write_sectors", 0) * SECTOR
    return values


def read_view(
    link: str = DEVICE_LINK, proc_dir: str = "/proc", sys_dir: str = "/sys"
) -> dict[str, Any] | None:
    """The device as this guest sees it, or None if the guest has no such disk."""
    try:
        device = os.path.realpath(link, strict=True)
    except OSError:
        return None
    name = os.path.basename(device)
    with open(os.path.join(proc_dir, "swaps"), encoding="ascii") as f:
        swap = parse_swaps(f.read(), device)
    try:
        with open(os.path.join(sys_dir, "block", name, "stat"), encoding="ascii") as f:
            block: dict[str, int] | None = parse_block_stat(f.read())
    except FileNotFoundError:
        block = None
    return {"device": device, "swap": swap, "block": block}
