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
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402
import lab  # noqa: E402

from tests.test_lab import guest, run, wait_for  # noqa: E402

SCRIPT = (ROOT / "scripts" / "demo_guest.py").read_bytes()
SPEC = lab.load_lab(demo.DEFAULT_LAB)
NAME = SPEC.guests[0].name


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()  # leftovers of an interrupted run (or of another lab test module)
    with lab.lab_running(lab.Lab(SPEC.guests[:1], SPEC.host)) as info:
        dom = lab.connect().lookupByName(NAME)
        demo.wait_tmem_ready(dom)
        yield {**info, "before": demo.ours(lab.stats(), [NAME])}


def values(name: str) -> dict[str, int]:
    report = guest(name)["report"]
    return report["values"] if report else {}


def test_the_demo_lab_has_the_balloon_controller_on(running: dict[str, Any]) -> None:
    stats = lab.stats()
    assert stats["balloon"]["enabled"] is True, stats["balloon"]
    g = guest(NAME)
    assert g["balloon"] is not None and g["balloon"]["enabled"] is True, g["balloon"]
    assert g["domain"]["max_kib"] == SPEC.guests[0].max_memory_mib * 1024


def test_a_build_round_in_the_precache_mount(running: dict[str, Any]) -> None:
    dom = lab.connect().lookupByName(NAME)
    before = demo.guest_daemon_stats(dom)["precache"]
    out = run(NAME, "python3", "-", "build", demo.PROJECT, "/var/tmp/build.log", "--rounds", "1",
              stdin=SCRIPT, timeout=900)  # fmt: skip
    log = run(NAME, "cat", "/var/tmp/build.log")
    print(f"build: {out.strip()}; log: {log.strip()}")
    assert json.loads(out) == {**json.loads(out), "rounds": 1, "failed": 0}, log
    run(NAME, "test", "-s", f"{demo.PROJECT}/libz.a")  # the library, built in the mount
    after = demo.guest_daemon_stats(dom)["precache"]
    moved = {k: after[k] - before[k] for k in ("reads", "gets", "misses", "bytes_from_disk")}
    print(f"precache during the build: {moved}")
    assert moved["reads"] > 100 and moved["gets"] > 100, moved  # sources, headers, objects read
    assert moved["bytes_from_disk"] > 100 * 4096, moved
    wait_for(lambda: values(NAME).get("precache_gets", 0) >= after["gets"], 30, "a report with them")


def test_the_preswap_user_verifies_its_pages(running: dict[str, Any]) -> None:
    out = run(NAME, "python3", "-", "preswap", "/run/tmem/preswap.sock", "/var/tmp/preswap.log",
              "--rounds", "1", "--pages", "2048", "--budget", "256", "--ops", "3000",
              stdin=SCRIPT, timeout=600)  # fmt: skip
    record = json.loads(run(NAME, "cat", "/var/tmp/preswap.log").splitlines()[-1])
    print(f"preswap: {out.strip()}; {record}")
    assert json.loads(out)["failed"] == 0 and record["ok"] is True, record
    assert record["mismatches"] == 0 and record["agent"]["lost"] == 0, record
    assert record["agent"]["puts"] > 0 and record["agent"]["tmem_faults"] > 0, record
    wait_for(lambda: values(NAME).get("preswap_puts", 0) >= record["agent"]["puts"], 30,
             "a report with the preswap puts")


def test_the_demo_summary_from_these_counters(running: dict[str, Any]) -> None:
    after = demo.ours(lab.stats(), [NAME])
    s = demo.summary(running["before"], after, 60.0, {NAME: SPEC.guests[0].memory_mib * 1024}, {})
    print(demo.format_summary(s))
    g = s["per_guest"][NAME]
    assert g["precache_gets"] > 100 and s["precache"]["misses"] > 0, s
    assert s["swap"]["preswap_puts"] > 0 and s["swap"]["preswap_lost"] == 0, s
    assert s["disk_ios_avoided_per_second"]["writes"] > 0, s
    assert s["cpu"]["guest_seconds"] > 0 and s["cpu"]["agent_share_of_guest_pct"] is not None, s
    assert g["balloon"]["source"] == "balloon controller", g["balloon"]
    assert s["balloon"]["enabled"] is True and s["balloon"]["given_back_mib"] is not None, s
    lab.down()
