"""The guest's memory report: /proc/meminfo and /proc/vmstat text in, wire STATS names out."""

from __future__ import annotations

from pathlib import Path

from guestagent import reporter
from guestagent.protocol import wire

MEMINFO = """\
MemTotal:         401232 kB
MemFree:           23456 kB
MemAvailable:     187654 kB
Buffers:            4096 kB
Cached:           150000 kB
SwapCached:            0 kB
Active(anon):      12345 kB
SwapTotal:        524284 kB
SwapFree:         520000 kB
Committed_AS:     612340 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
"""

VMSTAT = """\
nr_free_pages 5864
pgpgin 1048576
pgpgout 20480
pswpin 17
pswpout 1042
pgfault 9876543
pgmajfault 321
workingset_refault_anon 5
workingset_refault_file 4321
"""


def test_parse_meminfo_keeps_every_field_in_kib_or_count() -> None:
    parsed = reporter.parse_meminfo(MEMINFO)
    assert parsed["MemTotal"] == 401232
    assert parsed["Committed_AS"] == 612340
    assert parsed["Active(anon)"] == 12345
    assert parsed["HugePages_Total"] == 0  # a count, no unit
    assert reporter.parse_meminfo("garbage\nMemTotal: x kB\nNoValue:\n") == {}


def test_parse_vmstat() -> None:
    parsed = reporter.parse_vmstat(VMSTAT)
    assert parsed["pgpgin"] == 1048576 and parsed["pswpout"] == 1042 and parsed["nr_free_pages"] == 5864
    assert reporter.parse_vmstat("pgpgin\npgpgout 1 2\npswpin x\n") == {}


def test_report_names_and_values() -> None:
    report = reporter.build_report(reporter.parse_meminfo(MEMINFO), reporter.parse_vmstat(VMSTAT))
    assert report == {
        "committed_as_kib": 612340,
        "memtotal_kib": 401232,
        "memfree_kib": 23456,
        "memavailable_kib": 187654,
        "cached_kib": 150000,
        "swaptotal_kib": 524284,
        "swapfree_kib": 520000,
        "pgpgin": 1048576,
        "pgpgout": 20480,
        "pswpin": 17,
        "pswpout": 1042,
        "pgfault": 9876543,
        "pgmajfault": 321,
        "workingset_refault_anon": 5,
        "workingset_refault_file": 4321,
    }
    # every name travels in a STATS frame: lower-case ascii, round-trips through the codec
    assert all(name == name.lower() and name.isascii() for name in report)
    assert wire.parse_stats(wire.stats_payload(report)) == report


def test_old_kernel_counters_are_left_out_not_zeroed() -> None:
    old_vmstat = "pgpgin 10\npgpgout 20\npswpin 0\npswpout 0\npgmajfault 3\nworkingset_refault 99\n"
    report = reporter.build_report({"MemTotal": 1000, "Committed_AS": 500}, reporter.parse_vmstat(old_vmstat))
    assert report["workingset_refault"] == 99
    assert "workingset_refault_file" not in report and "memavailable_kib" not in report
    assert report["committed_as_kib"] == 500


def test_read_report_from_a_proc_dir(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text(MEMINFO)
    (tmp_path / "vmstat").write_text(VMSTAT)
    assert reporter.read_report(str(tmp_path))["committed_as_kib"] == 612340


def test_read_report_from_the_running_kernel() -> None:
    report = reporter.read_report()
    for name in ("committed_as_kib", "memtotal_kib", "memavailable_kib", "pgpgin", "pgpgout", "pswpin"):
        assert name in report
    assert report["memtotal_kib"] > 0 and report["memavailable_kib"] <= report["memtotal_kib"]
