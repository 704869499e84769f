"""Precache in a real lab guest: the guest agent daemon serves a `[[precache]]` mount from
/etc/tmem/guestagent.toml over the guest's virtio-serial port, and a file set 2.5x the shim's cache,
re-read three times through the mount, comes back from tmem: every read verified by checksum, the
hits counted in the guest (`guestagent stats`) and on the host (the guest's STATS report).

A lab of its own (one guest), torn down at the end; no skips.
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

import lab  # noqa: E402

from hostagent import statsview  # noqa: E402
from tests.test_lab import GUESTAGENT, domain, guest, run, wait_for  # noqa: E402

WORKLOAD = (Path(__file__).parent / "guest" / "precache_reread.py").read_bytes()
NAME = "tmem-1"
CACHE_PAGES = 1024  # 4 MiB of shim cache
FILES, FILE_PAGES = 40, 64  # 10 MiB: 2.5x the cache
PASSES = 3
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


def guest_stats() -> dict[str, Any]:
    """`guestagent stats` in the guest; {} while the daemon is not answering (restarting)."""
    rc, out, _ = lab.guest_exec(domain(NAME), [GUESTAGENT, "stats"], timeout=60)
    result: dict[str, Any] = json.loads(out) if rc == 0 else {}
    return result


def test_precache_mount_in_a_guest_serves_rereads_from_tmem(running: dict[str, Any]) -> None:
    made = json.loads(run(NAME, "python3", "-", "make", "/srv/precache", str(FILES), str(FILE_PAGES),
                          stdin=WORKLOAD))  # fmt: skip
    run(NAME, "mkdir", "-p", "/mnt/precache", "/etc/tmem")
    run(NAME, "sh", "-c", "cat > /etc/tmem/guestagent.toml", stdin=CONFIG.encode())
    run(NAME, "systemctl", "restart", "tmem-guestagent")
    wait_for(lambda: (guest_stats().get("precache") or {}).get("connected", False), 120,
             "the daemon's precache mount and its pool")
    assert run(NAME, "grep", "-c", "^precache /mnt/precache fuse", "/proc/mounts").strip() == "1"
    run(NAME, "sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches")  # the first pass from the disk
    before = guest_stats()["precache"]

    out = json.loads(run(NAME, "python3", "-", "read", "/mnt/precache", str(PASSES), "/srv/sums.json",
                         stdin=WORKLOAD, timeout=900))  # fmt: skip
    print(f"guest re-read: {out}; file set {made['bytes'] >> 20} MiB, shim cache {CACHE_PAGES * 4 >> 10} MiB")
    assert out["bad"] == [], out  # every read of every pass matched its checksum
    per_pass = out["pages"] // PASSES

    after = guest_stats()["precache"]
    delta = {k: after[k] - before[k] for k in ("gets", "hits", "misses", "puts", "bytes_from_tmem",
                                               "bytes_from_disk")}  # fmt: skip
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
    def reported() -> dict[str, int]:
        report = guest(NAME)["report"]
        return report["values"] if report else {}

    wait_for(lambda: reported().get("precache_hits", 0) >= after["hits"], 30, "a report with the hits")
    assert reported()["precache_bytes_from_tmem"] >= after["bytes_from_tmem"]
    table = statsview.format_stats(lab.stats())
    print(table)
    row = next(line for line in table.split("precache (FUSE")[1].splitlines() if line.startswith(NAME))
    assert statsview.count(reported()["precache_hits"]) in row.split()

    # a restart of the daemon unmounts cleanly and mounts again
    run(NAME, "systemctl", "restart", "tmem-guestagent")
    wait_for(lambda: (guest_stats().get("precache") or {}).get("connected", False), 120, "the mount again")
    again = json.loads(run(NAME, "python3", "-", "read", "/mnt/precache", "1", "/srv/sums.json",
                           stdin=WORKLOAD, timeout=600))  # fmt: skip
    assert again["bad"] == [], again
    assert run(NAME, "grep", "-c", "^precache /mnt/precache fuse", "/proc/mounts").strip() == "1"


def test_teardown_lab(running: dict[str, Any]) -> None:
    """Last: restore the default guest config (no mount) before the lab goes down."""
    run(NAME, "rm", "-f", "/etc/tmem/guestagent.toml")
    run(NAME, "systemctl", "restart", "tmem-guestagent")
    wait_for(lambda: guest_stats().get("precache") is None, 60, "the daemon without a mount")
    assert run(NAME, "sh", "-c", "grep -c ' /mnt/precache ' /proc/mounts || true").strip() == "0"
    lab.down()
