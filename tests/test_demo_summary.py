"""scripts/demo's summary states benefits only against a baseline (a `scripts/bench seed` JSON)."""

from __future__ import annotations

from typing import Any

import pytest

from scripts import demo

BASELINE = {
    "configs": {
        "plain": {"seconds": 120.0, "builds": 30, "disk_reads": 200, "disk_writes": 1000},
        "plain_lean": {"seconds": 60.0, "builds": 10, "disk_reads": 6000, "disk_writes": 3000},
        "tmem": {"seconds": 60.0, "builds": 1, "disk_reads": 1, "disk_writes": 1},
    }
}


def test_ratios_are_per_second_against_each_plain_configuration() -> None:
    vs = demo.vs_baseline(builds=5, reads=1500, writes=1500, seconds=60.0, baseline=BASELINE)
    assert vs is not None and set(vs) == {"plain", "plain_lean"}
    assert vs["plain"]["builds"] == pytest.approx(5 / 15, abs=0.005)  # plain: 15 builds per 60 s
    assert vs["plain"]["disk_ops"] == pytest.approx(3000 / 600, abs=0.005)
    assert vs["plain_lean"]["disk_reads"] == pytest.approx(0.25)
    assert vs["plain_lean"]["disk_writes"] == pytest.approx(0.5)


def test_without_a_baseline_no_benefit_is_stated() -> None:
    assert demo.vs_baseline(5, 10, 10, 60.0, None) is None
    assert "counts, not benefits" in demo._baseline_text(None)


def stats(puts: int, hits: int, agent_cpu: float) -> dict[str, Any]:
    report = {"values": {"precache_hits": hits, "precache_gets": hits, "preswap_puts": puts}}
    return {
        "guests": {"u": {"name": "g", "report": report, "domain": {"cpu_seconds": 0}, "balloon": None}},
        "agent": {"cpu_seconds": agent_cpu, "guest_cpu_seconds": 100.0, "cpu_ratio": None},
        "pool": {"pages": 0, "evictions": 0},
        "balloon": {"enabled": False},
    }


def test_the_summary_labels_tmem_traffic_as_counts_and_compares_disk_ops() -> None:
    work = {"g": {"build": {"rounds": 4, "failed": 1}, "preswap": {"rounds": 2, "failed": 0}}}
    s = demo.summary(
        stats(0, 0, 1.0),
        stats(600, 1200, 1.1),
        60.0,
        {"g": 400 * 1024},
        work,
        {"g": {"reads": 600, "writes": 300}},
        BASELINE,
    )
    assert s["tmem_pages_per_second"] == {"gets_served": 20.0, "puts": 10.0}
    assert "disk_ios_avoided_per_second" not in s
    assert s["builds"] == 3 and s["disk"] == {"reads": 600, "writes": 300, "ops_per_second": 15.0}
    assert s["vs_baseline"]["plain_lean"]["disk_ops"] == pytest.approx(0.1)
    text = demo.format_summary(s)
    assert "counts, not savings" in text and "vs plain_lean: builds/s x0.3, disk ops/s x0.1" in text
