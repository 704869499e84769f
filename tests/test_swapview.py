"""The guest's own view of the swap disk: /proc/swaps and the block stat, read from files in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

from guestagent import swapview

SWAPS = """Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority
/dev/vdb                                partition\t524284\t\t10240\t\t100
/swapfile                               file\t\t262140\t\t0\t\t-2
"""
# a 5.10 kernel's line: 17 fields
STAT = "  120  0  960  40  5000  3  40000  900  0  700  950  12  0  2048  1  7  2\n"


def test_the_device_row_of_proc_swaps() -> None:
    assert swapview.parse_swaps(SWAPS, "/dev/vdb") == {"size_kib": 524284, "used_kib": 10240, "priority": 100}
    assert swapview.parse_swaps(SWAPS, "/dev/vdc") is None
    assert swapview.parse_swaps(SWAPS.splitlines()[0], "/dev/vdb") is None  # nothing swapped on


def test_block_stat_fields_of_old_and_new_kernels() -> None:
    new = swapview.parse_block_stat(STAT)
    assert (new["read_ios"], new["write_ios"], new["discard_sectors"], new["flush_ios"]) == (
        120,
        5000,
        2048,
        7,
    )
    assert (new["read_bytes"], new["written_bytes"]) == (960 * 512, 40000 * 512)
    old = swapview.parse_block_stat(" ".join(STAT.split()[:11]))
    assert "discard_ios" not in old and old["write_sectors"] == 40000


def test_read_view_follows_the_by_id_link(tmp_path: Path) -> None:
    (tmp_path / "dev" / "disk" / "by-id").mkdir(parents=True)
    (tmp_path / "dev" / "vdb").write_bytes(b"")
    link = tmp_path / "dev" / "disk" / "by-id" / "virtio-tmem-swap"
    os.symlink("../../vdb", link)
    device = str(tmp_path / "dev" / "vdb")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc" / "swaps").write_text(SWAPS.replace("/dev/vdb", device))
    (tmp_path / "sys" / "block" / "vdb").mkdir(parents=True)
    (tmp_path / "sys" / "block" / "vdb" / "stat").write_text(STAT)
    view = swapview.read_view(str(link), str(tmp_path / "proc"), str(tmp_path / "sys"))
    assert view is not None
    assert view["device"] == device and view["swap"]["used_kib"] == 10240
    assert view["block"]["written_bytes"] == 40000 * 512
    assert swapview.read_view(str(tmp_path / "missing"), str(tmp_path / "proc")) is None
