"""Precache in a real lab guest: the guest agent daemon serves a `[[precache]]` mount from
/etc/tmem/guestagent.toml over the guest's virtio-serial port, and a file set 2.5x the shim's cache,
re-read through the mount, comes back from tmem: every read verified by checksum, the hits counted
in the guest (`guestagent stats`) and on the host (the guest's STATS report, `hostagent stats`).

First with the image's default configuration, as `scripts/lab up` leaves a guest (issue 4's check:
the guest's `hostagent stats` row shows precache hits growing under the re-read workload), then
with a configuration of the test's own. A lab of its own (one guest), torn down at the end; no skips.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from hostagent import statsview
from scripts import lab
from scripts.guest import Guest

WORKLOAD = (Path(__file__).parent / "guest" / "precache_reread.py").read_bytes()
NAME = "tmem-1"
G = Guest(NAME)
CACHE_PAGES = 1024  # 4 MiB of shim cache
FILES, FILE_PAGES = 40, 64  # 10 MiB: 2.5x the cache
PASSES = 3
DEFAULT_CACHE_PAGES = 2048  # the image's default mount (scripts/build_image.py)
DEFAULT_FILES = 40  # with DEFAULT_CACHE_PAGES: 2.5x its cache, pages as below
CONFIG = f"""\
[[precache]]
backing = "/srv/precache"
mountpoint = "/mnt/precache"
cache_pages = {CACHE_PAGES}
"""


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()  # leftovers of an interrupted run (or of tests/test_lab.py's lab)
    with lab.lab_running(lab.default_lab(1)) as info:
        yield info


def precache_row(name: str) -> list[str]:
    """The guest's row of the precache table in `hostagent stats`, as its cells."""
    table = statsview.format_stats(lab.stats())
    print(table)
    assert "precache (FUSE" in table, table
    row = next(line for line in table.split("precache (FUSE")[1].splitlines() if line.startswith(name))
    return row.split()


def mounted() -> bool:
    """The guest agent's precache mount is up and has its pool."""
    return bool((G.agent_stats().get("precache") or {}).get("connected"))


def hits_reported(at_least: int) -> bool:
    return G.reported().get("precache_hits", 0) >= at_least


def test_default_mount_shows_precache_hits_growing_in_hostagent_stats(running: dict[str, Any]) -> None:
    """The image's own config: mount and pool up with no step of ours; re-reads of a file set 2.5x
    its shim cache make the guest's hits grow in `hostagent stats`, run after run."""
    G.wait_until(mounted, 120, "the image's default precache mount and its pool")
    st = G.agent_stats()
    assert st["precache"]["mountpoint"] == "/mnt/precache" and st["precache"]["backing"] == "/srv/precache"
    assert st["precache"]["cache_limit"] == DEFAULT_CACHE_PAGES
    assert st["preswap"]["running"] is True  # the default's other half
    pages = DEFAULT_CACHE_PAGES * 5 // 2 // DEFAULT_FILES
    made = json.loads(
        G.run("python3", "-", "make", "/srv/precache/reread", str(DEFAULT_FILES), str(pages), stdin=WORKLOAD)
    )
    sums = "/srv/precache/sums.json"  # `make` writes it beside the file set's directory
    hits = []
    for passes in (2, 1):  # cold + a re-read, then one more re-read
        out = json.loads(
            G.run(
                "python3", "-", "read", "/mnt/precache/reread", str(passes), sums, stdin=WORKLOAD, timeout=900
            )
        )
        assert out["bad"] == [], out
        hits_now = G.agent_stats()["precache"]["hits"]
        G.wait_until(partial(hits_reported, hits_now), 30, "a report with the hits")
        cells = precache_row(NAME)
        hits.append(G.reported()["precache_hits"])
        assert statsview.count(hits[-1]) == cells[2], cells  # GUEST gets HITS ...
        print(
            f"after {passes} pass(es) over {made['bytes'] >> 20} MiB in {out['seconds']} s: "
            f"{hits[-1]} hits in hostagent stats"
        )
    assert hits[0] > 0, hits
    assert hits[1] - hits[0] >= 0.5 * made["bytes"] // 4096, hits  # most of a pass came from tmem
    G.run("rm", "-rf", "/srv/precache/reread", sums)


def test_precache_mount_in_a_guest_serves_rereads_from_tmem(running: dict[str, Any]) -> None:
    made = json.loads(
        G.run("python3", "-", "make", "/srv/precache", str(FILES), str(FILE_PAGES), stdin=WORKLOAD)
    )
    G.run("mkdir", "-p", "/mnt/precache")
    G.write_agent_config(CONFIG)
    G.wait_until(mounted, 120, "the daemon's precache mount and its pool")
    assert G.run("grep", "-c", "^precache /mnt/precache fuse", "/proc/mounts").strip() == "1"
    G.drop_caches()  # the first pass from the disk
    before = G.agent_stats()["precache"]

    out = json.loads(
        G.run(
            "python3",
            "-",
            "read",
            "/mnt/precache",
            str(PASSES),
            "/srv/sums.json",
            stdin=WORKLOAD,
            timeout=900,
        )
    )
    print(f"guest re-read: {out}; file set {made['bytes'] >> 20} MiB, shim cache {CACHE_PAGES * 4 >> 10} MiB")
    assert out["bad"] == [], out  # every read of every pass matched its checksum
    per_pass = out["pages"] // PASSES

    after = G.agent_stats()["precache"]
    delta = {
        k: after[k] - before[k]
        for k in ("gets", "hits", "misses", "puts", "bytes_from_tmem", "bytes_from_disk")
    }
    print(f"precache in the guest: {delta}")
    # the first pass reads the disk; the two re-reads find (nearly) every page in tmem, since the cache
    # holds 40% of the set and a sequential scan evicts each page before it is read again
    assert delta["bytes_from_disk"] >= made["bytes"]
    assert delta["puts"] >= per_pass
    # (measured under TCG: exactly every re-read page; a get slower than precache.GET_TIMEOUT is a miss)
    assert delta["hits"] >= 0.9 * (PASSES - 1) * per_pass, delta
    assert delta["bytes_from_tmem"] >= 0.9 * (PASSES - 1) * made["bytes"], delta
    assert delta["bytes_from_disk"] <= 1.1 * made["bytes"] + 2 * 4096 * FILES, delta

    # the host sees them in the guest's reports, and `hostagent stats` shows the precache row
    G.wait_until(partial(hits_reported, after["hits"]), 30, "a report with the hits")
    assert G.reported()["precache_bytes_from_tmem"] >= after["bytes_from_tmem"]
    assert statsview.count(G.reported()["precache_hits"]) in precache_row(NAME)

    # a restart of the daemon unmounts cleanly and mounts again
    G.restart_agent()
    G.wait_until(mounted, 120, "the mount again")
    again = json.loads(
        G.run("python3", "-", "read", "/mnt/precache", "1", "/srv/sums.json", stdin=WORKLOAD, timeout=600)
    )
    assert again["bad"] == [], again
    assert G.run("grep", "-c", "^precache /mnt/precache fuse", "/proc/mounts").strip() == "1"


def test_teardown_lab(running: dict[str, Any]) -> None:
    """Last: without a config file the daemon runs with no mount (every key has a default)."""
    G.write_agent_config(None)
    G.wait_until(
        lambda: G.agent_stats().get("precache") is None and "uptime" in G.agent_stats(),
        60,
        "the daemon without a mount",
    )
    assert G.run("sh", "-c", "grep -c ' /mnt/precache ' /proc/mounts || true").strip() == "0"
    lab.down()
