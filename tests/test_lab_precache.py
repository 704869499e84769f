"""Precache in a real lab guest: the guest agent daemon serves a `[[precache]]` mount from
/etc/tmem/guestagent.toml over the guest's virtio-serial port, behind the guest's own page cache:
pages the guest drops come back from tmem, every read verified by checksum, the hits counted in the
guest (`guestagent stats`) and on the host (the guest's STATS report, `hostagent stats`).

First with the image's default configuration, as `scripts/lab up` leaves a guest: the mount covers
/usr itself, the toolchain and the build area under it (/srv/precache is a symlink there); the guest
booted with it, and re-reads after the guest dropped its page cache make the guest's hits grow in
`hostagent stats`.  Then a build (zlib, the image's demo project: gcc, cc1, as, ld and the headers
all exec'd and read through the mount) with the daemon killed mid-build: /usr stays usable (the
keeper detaches the mount, guestagent.mountkeeper), the build finishes from the backing files, the
daemon comes back and the pool serves the next build's re-reads.  Then with a configuration of the
test's own.  A lab of its own (one guest), torn down at the end; no skips.
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
from scripts.guest import AGENT_UNIT, Guest

WORKLOAD = (Path(__file__).parent / "guest" / "precache_reread.py").read_bytes()
NAME = "tmem-1"
G = Guest(NAME)
FILES, FILE_PAGES = 40, 64  # 10 MiB
PASSES = 3
DEFAULT_FILES, DEFAULT_PAGES = 40, 128  # 20 MiB
COVERED = "/usr"  # the image's default mount covers it (scripts/build_image.py)
AREA = "/srv/precache"  # the build area: a symlink to a directory under /usr
PROJECT = f"{AREA}/zlib"  # the image's demo project, configured at image build time
BUILD = "make -s clean && make -s libz.a example minigzip && ./example >/dev/null"
CONFIG = """\
[[precache]]
backing = "/srv/precache"
mountpoint = "/mnt/pc"
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


def covered() -> int:
    """How many precache mounts cover /usr in the guest (0 or 1)."""
    return int(G.run("sh", "-c", f"grep -c '^precache {COVERED} fuse' /proc/mounts || true").strip())


def test_default_mount_shows_precache_hits_growing_in_hostagent_stats(running: dict[str, Any]) -> None:
    """The image's own config: mount (over /usr itself) and pool up with no step of ours, the guest
    booted with it; re-reads of a file set after the guest dropped its page cache make the hits grow
    in `hostagent stats`, run after run."""
    G.wait_until(mounted, 120, "the image's default precache mount and its pool")
    st = G.agent_stats()
    assert st["precache"]["mountpoint"] == COVERED and st["precache"]["backing"] == COVERED
    assert covered() == 1
    for old in (AREA, "/mnt/precache"):  # the old paths lead to the build area, under the mount
        assert G.run("readlink", "-f", old).strip() == "/usr/local/src/precache"
    assert G.run("stat", "-c", "%m", "/usr/local/src/precache/.").strip() == COVERED
    assert st["preswap"]["running"] is True  # the default's other half
    # the guest came up with /usr served by the daemon: no unit failed, and the daemon itself runs
    # where /usr is the tree underneath (its own mount namespace)
    print("system state:", G.exec("systemctl", "is-system-running")[1].strip())
    assert G.run("systemctl", "--failed", "--no-legend", "--plain").strip() == ""
    pid = G.agent_pid()
    assert G.run("readlink", f"/proc/{pid}/ns/mnt") != G.run("readlink", "/proc/1/ns/mnt")
    assert G.exec("grep", "-q", " /usr fuse", f"/proc/{pid}/mounts")[0] != 0
    made = json.loads(
        G.run(
            "python3",
            "-",
            "make",
            f"{AREA}/reread",
            str(DEFAULT_FILES),
            str(DEFAULT_PAGES),
            stdin=WORKLOAD,
        )
    )
    sums = f"{AREA}/sums.json"  # `make` writes it beside the file set's directory
    hits = []
    for _ in range(2):
        G.drop_caches()  # the guest's page cache lets the set go; the pool has it
        out = json.loads(
            G.run("python3", "-", "read", f"{AREA}/reread", "1", sums, stdin=WORKLOAD, timeout=900)
        )
        assert out["bad"] == [], out
        hits_now = G.agent_stats()["precache"]["hits"]
        G.wait_until(partial(hits_reported, hits_now), 30, "a report with the hits")
        cells = precache_row(NAME)
        hits.append(G.reported()["precache_hits"])
        assert statsview.count(hits[-1]) == cells[2], cells  # GUEST gets HITS ...
        print(f"a pass over {made['bytes'] >> 20} MiB in {out['seconds']} s: {hits[-1]} hits reported")
    # the set was written through the mount, so its pages were put as written: both passes after
    # the drop find (nearly) all of them in tmem
    assert hits[0] > 0 and hits[1] - hits[0] >= 0.9 * made["bytes"] // 4096, hits
    G.run("rm", "-rf", f"{AREA}/reread", sums)


def test_a_build_in_the_covered_tree_survives_the_daemon_and_its_rereads_come_from_tmem(
    running: dict[str, Any],
) -> None:
    """zlib builds in the covered tree with the covered toolchain; the daemon is SIGKILLed mid-build:
    the keeper detaches the mount, /usr underneath is usable at once, and the build, run again,
    finishes from the backing files; systemd brings the daemon back, the mount returns, and after
    the guest dropped its page cache the next build's re-reads of the compiler, its headers and
    libraries, and the sources come from the pool."""
    G.wait_until(mounted, 120, "the precache mount")
    cc1 = G.run("gcc", "-print-prog-name=cc1").strip()
    assert G.run("stat", "-c", "%m", cc1).strip() == COVERED, cc1  # the compiler, through the mount
    G.run("sh", "-c", f"cd {PROJECT} && {BUILD}", timeout=1800)  # a whole build, through the mount
    pid = G.spawn("sh", "-c", f"cd {PROJECT} && {BUILD}")
    G.wait_until(lambda: G.exec("test", "-e", f"{PROJECT}/adler32.o")[0] == 0, 600, "the build under way")
    killed = G.agent_pid()
    G.agent_systemctl("kill", "-s", "KILL", "--kill-whom=main", AGENT_UNIT)
    rc, out, err = G.wait(pid, 1800, "the interrupted build")
    print(f"the build the daemon died under: exit {rc} {(out + err)[-300:]!r}")
    # the tree is usable again at once (fusermount3 unmounted it, or the new daemon cleared a dead
    # mount and mounted again): a build started now finishes, from the files underneath or through
    # the mount again if systemd brought the daemon back first
    G.wait_until(lambda: G.exec("test", "-e", f"{PROJECT}/Makefile")[0] == 0, 60, "the tree usable")
    G.run("sh", "-c", f"cd {PROJECT} && {BUILD}", timeout=1800)
    G.wait_until(mounted, 120, "the daemon and its mount back (systemd)")
    assert G.agent_pid() != killed
    assert covered() == 1
    G.run("sh", "-c", f"cd {PROJECT} && {BUILD}", timeout=1800)  # through the new mount: puts
    before = G.agent_stats()["precache"]
    G.drop_caches()
    G.run("sh", "-c", f"cd {PROJECT} && {BUILD}", timeout=1800)
    after = G.agent_stats()["precache"]
    delta = {
        k: after[k] - before[k]
        for k in ("gets", "hits", "bytes_from_tmem", "bytes_from_disk", "written_puts")
    }
    print(f"the re-build after a drop of the guest's page cache: {delta}")
    assert delta["hits"] > 0.5 * delta["gets"] > 0, delta  # sources and headers from the pool
    assert delta["bytes_from_tmem"] > delta["bytes_from_disk"], delta
    assert delta["written_puts"] > 0, delta  # the objects it wrote, kept clean in the pool
    # far more than the project's own files: the toolchain's pages came from the pool too
    project_bytes = int(G.run("du", "-sb", f"{PROJECT}/.").split()[0])
    assert delta["bytes_from_tmem"] > 2 * project_bytes, (delta, project_bytes)


def test_precache_mount_in_a_guest_serves_rereads_from_tmem(running: dict[str, Any]) -> None:
    G.write_agent_config(None)  # no mount over /srv/precache while the set is written
    made = json.loads(
        G.run("python3", "-", "make", "/srv/precache", str(FILES), str(FILE_PAGES), stdin=WORKLOAD)
    )
    G.run("mkdir", "-p", "/mnt/pc")
    G.write_agent_config(CONFIG)
    G.wait_until(mounted, 120, "the daemon's precache mount and its pool")
    assert G.run("grep", "-c", "^precache /mnt/pc fuse", "/proc/mounts").strip() == "1"
    G.drop_caches()  # the first pass from the disk
    before = G.agent_stats()["precache"]

    passes = []
    for _ in range(PASSES):
        G.drop_caches()  # the guest lets the set go between passes: each pass pages it in
        out = json.loads(
            G.run("python3", "-", "read", "/mnt/pc", "1", "/srv/sums.json", stdin=WORKLOAD, timeout=900)
        )
        assert out["bad"] == [], out  # every read of every pass matched its checksum
        passes.append(out)
    print(f"guest re-reads: {passes}; file set {made['bytes'] >> 20} MiB")
    per_pass = passes[0]["pages"]

    after = G.agent_stats()["precache"]
    delta = {
        k: after[k] - before[k]
        for k in ("gets", "hits", "misses", "puts", "bytes_from_tmem", "bytes_from_disk")
    }
    print(f"precache in the guest: {delta}")
    # the first pass reads the disk and puts every page; the next ones find (nearly) every page in tmem
    assert delta["bytes_from_disk"] >= made["bytes"]
    assert delta["puts"] >= per_pass
    # (a get slower than precache.GET_TIMEOUT is a miss)
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
        G.run("python3", "-", "read", "/mnt/pc", "1", "/srv/sums.json", stdin=WORKLOAD, timeout=600)
    )
    assert again["bad"] == [], again
    assert G.run("grep", "-c", "^precache /mnt/pc fuse", "/proc/mounts").strip() == "1"


def test_teardown_lab(running: dict[str, Any]) -> None:
    """Last: without a config file the daemon runs with no mount (every key has a default)."""
    G.write_agent_config(None)
    G.wait_until(
        lambda: G.agent_stats().get("precache") is None and "uptime" in G.agent_stats(),
        60,
        "the daemon without a mount",
    )
    assert G.run("sh", "-c", "grep -c '^precache ' /proc/mounts || true").strip() == "0"
    lab.down()
