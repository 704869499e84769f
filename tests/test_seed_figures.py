"""scripts/seed_figures: the seed benchmark's figures from counter snapshots, ratios and targets."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from scripts import seed_figures as sf

MIB = 1 << 20


def guest_snap(
    *,
    pgpgin: int = 0,
    pswpout: int = 0,
    pswpin: int = 0,
    rd_req: int = 0,
    rd_bytes: int = 0,
    wr_req: int = 0,
    qemu_read: int = 0,
    builds: int = 0,
    memory_kib: int = 400 * 1024,
    vcpu: float = 0.0,
    agent_cpu: float = 0.0,
    report: dict[str, int] | None = None,
    swaps: list[str] | None = None,
    blocks: dict[str, dict[str, int]] | None = None,
    failed_builds: int = 0,
) -> dict[str, Any]:
    return {
        "probe": {
            "vmstat": {"pgpgin": pgpgin, "pswpout": pswpout, "pswpin": pswpin},
            "blocks": blocks or {},
            "swaps": swaps or ["/swapfile"],
            "agent": {"cpu_seconds": agent_cpu, "rss_kib": 30 * 1024},
            "build": (
                [{"ok": True, "seconds": 20.0}] * builds + [{"ok": False, "seconds": 1.0}] * failed_builds
            ),
            "preswap": [],
        },
        "block": {"rd_req": rd_req, "rd_bytes": rd_bytes, "wr_req": wr_req, "wr_bytes": 0},
        "qemu": {"read_bytes": qemu_read, "write_bytes": 0, "cpu_seconds": vcpu * 1.1},
        "vcpu_seconds": vcpu,
        "memory_kib": memory_kib,
        "report": report or {},
    }


def snap(
    guests: dict[str, dict[str, Any]], *, agent_cpu: float = 0.0, pool_bytes: int = 0, disk_cache_kib: int = 0
) -> dict[str, Any]:
    return {
        "guests": guests,
        "host": {
            "agent_cpu_seconds": agent_cpu,
            "pool_bytes": pool_bytes,
            "cached_kib": 0,
            "disk_cache_kib": disk_cache_kib,
        },
    }


def test_counts_are_differences_over_the_window() -> None:
    a = snap(
        {
            "g": guest_snap(
                pgpgin=400, rd_req=10, rd_bytes=40960, qemu_read=40960, wr_req=5, builds=2, vcpu=100.0
            )
        },
        agent_cpu=1.0,
    )
    b = snap(
        {
            "g": guest_snap(
                pgpgin=4400,
                rd_req=110,
                rd_bytes=4136960,
                qemu_read=4136960,
                wr_req=55,
                builds=5,
                vcpu=160.0,
                pswpout=30,
            )
        },
        agent_cpu=1.06,
    )
    f = sf.config_figures(a, b, 60.0)
    assert (f["disk_reads"], f["disk_writes"], f["disk_ops"]) == (100, 50, 150)
    assert f["storage_reads"] == 100  # cache='none': every read QEMU passed on reached storage
    assert f["builds"] == 3 and f["build_mean_seconds"] == 20.0
    assert f["page_ins_from_disk"] == 1000 and f["page_ins_from_pool"] == 0
    assert f["pool_share_of_page_ins"] == 0.0
    assert f["swap_pages_to_disk"] == 30
    assert f["guest_cpu_seconds"] == 60.0
    assert f["host_agent_cpu_pct_of_guest"] == pytest.approx(0.1)


def test_failed_builds_are_not_counted_as_builds() -> None:
    a = snap({"g": guest_snap(builds=1)})
    b = snap({"g": guest_snap(builds=1)})
    b["guests"]["g"]["probe"]["build"] = [
        {"ok": True, "seconds": 20.0},
        {"ok": False, "seconds": 3.0},
        {"ok": True, "seconds": 30.0},
    ]
    f = sf.config_figures(a, b, 60.0)
    assert (f["builds"], f["builds_failed"], f["build_mean_seconds"]) == (1, 1, 30.0)


def test_host_page_cache_reads_count_only_the_bytes_that_reached_storage() -> None:
    a = snap({"g": guest_snap()})
    b = snap(
        {"g": guest_snap(rd_req=1000, rd_bytes=100 * MIB, qemu_read=25 * MIB, wr_req=10)},
        disk_cache_kib=300 * 1024,
    )
    f = sf.config_figures(a, b, 60.0)
    assert f["disk_reads"] == 1000 and f["storage_reads"] == 250 and f["storage_ops"] == 260
    assert f["host_memory_mib"] == 300.0


def test_pool_page_ins_count_precache_hits_preswap_gets_and_pool_swap_device_reads() -> None:
    before = guest_snap(
        report={"precache_hits": 100, "preswap_gets": 10, "preswap_puts": 0},
        swaps=["/dev/vdb", "/swapfile"],
        blocks={"vdb": {"read_sectors": 0, "write_sectors": 0}},
    )
    after = guest_snap(
        report={"precache_hits": 400, "preswap_gets": 110, "preswap_puts": 50},
        swaps=["/dev/vdb", "/swapfile"],
        blocks={
            "vdb": {"read_sectors": 800, "write_sectors": 1600},
            "vdc": {"read_sectors": 8000, "write_sectors": 8000},
        },
        # the swap device's reads are in pgpgin, its writes in pswpout
        pgpgin=4 * (100 + 600),
        pswpout=200 + 20,
    )
    before["probe"]["pool_swap"] = after["probe"]["pool_swap"] = "/dev/vdb"
    before["swapdev"], after["swapdev"] = (
        {"spill_reads": 5, "spill_writes": 0},
        {"spill_reads": 5, "spill_writes": 0},
    )
    f = sf.config_figures(snap({"g": before}), snap({"g": after}, pool_bytes=8 * MIB), 60.0)
    assert f["page_ins_from_pool"] == 300 + 100 + 100
    assert f["page_ins_from_disk"] == 600  # pgpgin less the pool swap device's reads
    assert f["swap_pages_to_disk"] == 20 and f["swap_pages_to_pool"] == 200 + 50
    # pages the device read from and wrote to its spill file on host storage are not the pool's
    after["swapdev"] = {"spill_reads": 45, "spill_writes": 30}
    f = sf.config_figures(snap({"g": before}), snap({"g": after}, pool_bytes=8 * MIB), 60.0)
    assert f["page_ins_from_pool"] == 300 + 100 + 100 - 40 and f["page_ins_from_disk"] == 640
    assert f["swap_pages_to_pool"] == 170 + 50 and f["swap_pages_to_host_spill"] == 30
    assert f["pool_share_of_page_ins"] == pytest.approx(460 / 1100, abs=1e-3)


def test_a_counter_that_went_back_counts_nothing() -> None:
    f = sf.config_figures(snap({"g": guest_snap(rd_req=50)}), snap({"g": guest_snap(rd_req=10)}), 60.0)
    assert f["disk_reads"] == 0


def configs(**over: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Five configurations' figures, 60 s each, as config_figures makes them (the keys targets use)."""
    base = {
        "seconds": 60.0,
        "builds": 10,
        "disk_ops": 1000,
        "storage_ops": 1000,
        "disk_reads": 800,
        "disk_writes": 200,
        "swap_pages_to_disk": 100,
        "page_ins_from_disk": 1000,
        "page_ins": 1000,
        "page_ins_from_pool": 0,
        "pool_share_of_page_ins": 0.0,
        "swap_pages_to_pool": 0,
        "pool_mib_end": 0.0,
        "host_memory_mib": 0.0,
        "host_agent_cpu_pct_of_guest": None,
        "host_agent_cpu_seconds": 0.0,
        "guest_cpu_seconds": 100.0,
        "guest_agent_cpu_pct_of_guest": None,
    }
    out = {n: copy.deepcopy(base) for n in sf.CONFIGS}
    out["plain"].update(storage_ops=400, disk_ops=400)
    for name, values in over.items():
        out[name].update(values)
    return out


def test_avoided_per_mib_is_against_plain_lean_at_the_configs_window() -> None:
    c = configs(
        tmem={"storage_ops": 200, "host_memory_mib": 16.0, "seconds": 30.0},
        host_cache={"storage_ops": 100, "host_memory_mib": 300.0},
    )
    r = sf.ratios(c)
    # plain_lean does 1000 ops per 60 s: 500 in tmem's 30 s, of which tmem did 200
    assert r["tmem_storage_ops_avoided_per_host_mib"] == pytest.approx(300 / 16, abs=0.01)
    assert r["host_cache_storage_ops_avoided_per_host_mib"] == pytest.approx(900 / 300, abs=0.01)
    assert r["tmem_vs_plain_lean"]["storage_ops"] == pytest.approx(0.4)
    assert r["tmem_vs_plain"]["builds"] == pytest.approx(2.0)
    assert "plain_vs_plain" not in r


def test_targets_met_when_tmem_does_what_the_issue_asks() -> None:
    c = configs(
        tmem={
            "storage_ops": 150,
            "host_memory_mib": 20.0,
            "page_ins_from_pool": 500,
            "page_ins": 1000,
            "pool_share_of_page_ins": 0.5,
            "swap_pages_to_disk": 0,
            "host_agent_cpu_pct_of_guest": 0.1,
            "guest_agent_cpu_pct_of_guest": 5.0,
        },
        host_cache={"storage_ops": 100, "host_memory_mib": 300.0},
    )
    t = sf.targets(c, sf.ratios(c))
    assert {k: v["met"] for k, v in t.items()} == {
        "pool_serves_a_third_of_page_ins": True,
        "no_swap_pages_to_disk": True,
        "disk_ops_half_of_plain_lean_and_below_plain": True,
        "avoided_per_mib_1_5x_host_cache": True,
        "host_agent_cpu_at_most_0_2pct_of_guest": True,
    }
    assert not any("why" in v for v in t.values())


def test_targets_missed_say_why_with_the_numbers() -> None:
    c = configs(
        tmem={
            "storage_ops": 1200,
            "host_memory_mib": 3.0,
            "page_ins_from_pool": 100,
            "pool_share_of_page_ins": 0.1,
            "swap_pages_to_disk": 535,
            "host_agent_cpu_pct_of_guest": 0.5,
            "host_agent_cpu_seconds": 0.5,
        },
        host_cache={"storage_ops": 100, "host_memory_mib": 300.0},
    )
    t = sf.targets(c, sf.ratios(c))
    assert not any(v["met"] for v in t.values())
    assert "535 swap pages" in t["no_swap_pages_to_disk"]["why"]
    assert "100 of 1000 page-ins" in t["pool_serves_a_third_of_page_ins"]["why"]
    assert t["avoided_per_mib_1_5x_host_cache"]["value"]["tmem"] < 0  # it did more IO than plain_lean


def test_below_half_of_plain_lean_is_not_enough_when_plain_does_fewer() -> None:
    c = configs(tmem={"storage_ops": 450})  # plain: 400
    assert sf.targets(c, sf.ratios(c))["disk_ops_half_of_plain_lean_and_below_plain"]["met"] is False


def test_table_has_a_row_per_configuration_in_order() -> None:
    a = snap({"g": guest_snap()})
    b = snap({"g": guest_snap(rd_req=1234, builds=2)})
    figs = {n: sf.config_figures(a, b, 60.0) for n in ("zswap", "plain", "tmem")}
    lines = sf.markdown_table(figs).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["plain", "tmem", "zswap"]
    assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
    assert "1,234" in lines[2] and "| 2 (2.0) |" in lines[2]
