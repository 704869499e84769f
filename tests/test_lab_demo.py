"""The demo's guest workloads in a real lab guest (`scripts/demo` runs them in three guests for
minutes; here one round each in one guest, so the suite stays short).

The guest is the first of vmconfigs/demo.toml (384 MiB, IOPS-limited disk, the host agent's balloon
controller on) with the image's default guest-agent config. One build of zlib inside the precache
mount succeeds, zlib's own tests pass and the mount's counters move, in the guest and in its reports
to the host; one run of the preswap memory user verifies every page and puts pages to tmem; and the
demo's summary, computed from the host's stats before and after, shows both. No skips.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from scripts import demo, lab
from scripts.guest import Guest

SCRIPT = demo.GUEST_SCRIPT
SPEC = lab.load_lab(demo.DEFAULT_LAB)
NAME = SPEC.guests[0].name
G = Guest(NAME)


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()  # leftovers of an interrupted run (or of another lab test module)
    with lab.lab_running(lab.Lab(SPEC.guests[:1], SPEC.host)) as info:
        demo.wait_tmem_ready(G)
        yield {**info, "before": demo.ours(lab.stats(), [NAME])}


def test_the_demo_lab_has_the_balloon_controller_on(running: dict[str, Any]) -> None:
    stats = lab.stats()
    assert stats["balloon"]["enabled"] is True, stats["balloon"]
    g = G.host_stats()
    assert g["balloon"] is not None and g["balloon"]["enabled"] is True, g["balloon"]
    assert g["domain"]["max_kib"] == SPEC.guests[0].max_memory_mib * 1024


def test_a_build_round_in_the_precache_mount(running: dict[str, Any]) -> None:
    before = G.agent_stats()["precache"]
    out = G.run(
        "python3",
        "-",
        "build",
        demo.PROJECT,
        "/var/tmp/build.log",
        "--rounds",
        "1",
        stdin=SCRIPT,
        timeout=900,
    )
    log = G.run("cat", "/var/tmp/build.log")
    print(f"build: {out.strip()}; log: {log.strip()}")
    assert json.loads(out) == {**json.loads(out), "rounds": 1, "failed": 0}, log
    G.run("test", "-s", f"{demo.PROJECT}/libz.a")  # the library, built in the mount
    after = G.agent_stats()["precache"]
    moved = {k: after[k] - before[k] for k in ("reads", "gets", "misses", "bytes_from_disk")}
    print(f"precache during the build: {moved}")
    assert moved["reads"] > 100 and moved["gets"] > 100, moved  # sources, headers, objects read
    assert moved["bytes_from_disk"] > 100 * 4096, moved
    G.wait_until(lambda: G.reported().get("precache_gets", 0) >= after["gets"], 30, "a report with them")


def test_the_preswap_user_verifies_its_pages(running: dict[str, Any]) -> None:
    out = G.run(
        "python3",
        "-",
        "preswap",
        "/run/tmem/preswap.sock",
        "/var/tmp/preswap.log",
        "--rounds",
        "1",
        "--pages",
        "2048",
        "--budget",
        "256",
        "--ops",
        "3000",
        stdin=SCRIPT,
        timeout=600,
    )
    record = json.loads(G.run("cat", "/var/tmp/preswap.log").splitlines()[-1])
    print(f"preswap: {out.strip()}; {record}")
    assert json.loads(out)["failed"] == 0 and record["ok"] is True, record
    assert record["mismatches"] == 0 and record["agent"]["lost"] == 0, record
    assert record["agent"]["puts"] > 0 and record["agent"]["tmem_faults"] > 0, record
    G.wait_until(
        lambda: G.reported().get("preswap_puts", 0) >= record["agent"]["puts"],
        30,
        "a report with the preswap puts",
    )


def test_the_demo_summary_from_these_counters(running: dict[str, Any]) -> None:
    after = demo.ours(lab.stats(), [NAME])
    s = demo.summary(running["before"], after, 60.0, {NAME: SPEC.guests[0].memory_mib * 1024}, {})
    print(demo.format_summary(s))
    g = s["per_guest"][NAME]
    assert g["precache_gets"] > 100 and s["precache"]["misses"] > 0, s
    assert s["swap"]["preswap_puts"] > 0 and s["swap"]["preswap_lost"] == 0, s
    assert s["tmem_pages_per_second"]["puts"] > 0, s  # a count of tmem's traffic, not a saving
    assert s["disk"] is None and s["vs_baseline"] is None, s  # no disk figures given: no benefit stated
    assert "counts, not benefits" in demo.format_summary(s)
    assert s["cpu"]["guest_seconds"] > 0 and s["cpu"]["agent_share_of_guest_pct"] is not None, s
    assert g["balloon"]["source"] == "balloon controller", g["balloon"]
    assert s["balloon"]["enabled"] is True and s["balloon"]["given_back_mib"] is not None, s
    lab.down()
