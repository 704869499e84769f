"""precache wired into the guest agent: `[[precache]]` in its config, the mount served by `guestagent
run` over the daemon's own channel, its counters in `guestagent stats` and in the daemon's STATS reports
(so in `hostagent stats`), and `guestagent precache mount` in the foreground.

Real processes throughout: a `hostagent run`, the daemon (`--channel` = guest g1's unix socket, as in
tests/test_guest_daemon.py), a real FUSE mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestagent import config as configmod
from hostagent import statsview
from scripts.wait import wait_until
from tests.support.guest_daemon import GuestDaemon, guestagent_cli
from tests.support.host_agent import HostAgentProcess, stats_json

PAGE = 4096
STATS = "user.tmem.precache.stats"


# ------------------------------------------------------------------------------- config


def test_precache_tables_parse_with_defaults_and_paths_relative_to_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "ga.toml"
    cfg.write_text('[[precache]]\nbacking = "data"\nmountpoint = "/mnt/data"\n')
    (mount,) = configmod.load(cfg).precache
    assert mount == configmod.PrecacheMount(str(tmp_path / "data"), "/mnt/data", False)
    full = configmod.parse({"precache": [{"backing": "/srv", "mountpoint": "/mnt", "allow_other": True}]})
    assert full.precache == (configmod.PrecacheMount("/srv", "/mnt", True),)
    over = configmod.parse({"precache": [{"backing": "/usr", "mountpoint": "/usr/"}]})  # covers it
    assert over.precache == (configmod.PrecacheMount("/usr", "/usr"),)
    assert configmod.Config().precache == ()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"mountpoint": "/mnt"}, "precache[0].backing: required"),
        ({"backing": "/srv"}, "precache[0].mountpoint: required"),
        ({"backing": "", "mountpoint": "/mnt"}, "precache[0].backing: expected a directory path"),
        ({"backing": 3, "mountpoint": "/mnt"}, "precache[0].backing: expected a directory path"),
        ({"backing": "/srv", "mountpoint": "/mnt", "cache_pages": 64}, "precache[0].cache_pages: no longer"),
        (
            {"backing": "/srv", "mountpoint": "/mnt", "kernel_cache": True},
            "precache[0].kernel_cache: no longer",
        ),
        ({"backing": "/srv", "mountpoint": "/mnt", "cache": 1}, "precache[0].cache: unknown setting"),
    ],
)
def test_bad_precache_tables_are_refused_naming_the_key(table: dict[str, Any], message: str) -> None:
    with pytest.raises(configmod.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        configmod.parse({"precache": [table]})


def test_a_second_mount_and_a_plain_table_are_refused() -> None:
    one = {"backing": "/srv", "mountpoint": "/mnt"}
    with pytest.raises(configmod.ConfigError, match="at most one"):
        configmod.parse({"precache": [one, {"backing": "/srv2", "mountpoint": "/mnt2"}]})
    with pytest.raises(configmod.ConfigError, match=r"array of tables \(\[\[precache\]\]\)"):
        configmod.parse({"precache": one})


def test_the_example_files_commented_precache_table_is_valid(tmp_path: Path) -> None:
    example = Path(configmod.__file__).with_name("guestagent.example.toml").read_text()
    start = example.index("# [[precache]]")
    table = "".join(line.removeprefix("# ") + "\n" for line in example[start:].splitlines())
    (tmp_path / "ga.toml").write_text(table)
    (mount,) = configmod.load(tmp_path / "ga.toml").precache
    assert mount == configmod.PrecacheMount("/srv/data", "/mnt/data")


# ------------------------------------------------------------------------------- the daemon


def populate(backing: Path, files: int, pages: int) -> dict[str, str]:
    """Random files (the last page of each short); returns their sha256 by name."""
    rng = random.Random(4)
    sums = {}
    for n in range(files):
        data = rng.randbytes(pages * PAGE - 100 * n - 1)
        (backing / f"f{n}").write_bytes(data)
        sums[f"f{n}"] = hashlib.sha256(data).hexdigest()
    return sums


def read_all(mountpoint: Path, sums: dict[str, str]) -> None:
    for name, digest in sums.items():
        assert hashlib.sha256((mountpoint / name).read_bytes()).hexdigest() == digest, name


def unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount3", "-u", str(mountpoint)], check=False, capture_output=True)
    if os.path.ismount(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False, capture_output=True)


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tmem-pd", dir="/tmp"))
    (path / "backing").mkdir()
    (path / "mnt").mkdir()
    try:
        yield path
    finally:
        unmount(path / "mnt")
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(host_agent: HostAgentProcess, work: Path, daemons: list[GuestDaemon]) -> GuestDaemon:
    """A daemon (not started) whose config has a [[precache]] mount of work/backing at work/mnt."""
    d = GuestDaemon(work, host_agent.sockets["g1"])
    with d.config.open("a") as f:
        f.write('[[precache]]\nbacking = "backing"\nmountpoint = "mnt"\n')
    daemons.append(d)
    return d


def test_daemon_serves_its_mount_with_tmem_and_reports_the_counters(
    host_agent: HostAgentProcess, daemon: GuestDaemon, work: Path
) -> None:
    mnt = work / "mnt"
    sums = populate(work / "backing", files=8, pages=16)
    total = sum((work / "backing" / name).stat().st_size for name in sums)
    daemon.start()
    wait_until(lambda: os.path.ismount(mnt), what="the mount")
    wait_until(lambda: daemon.stats()["precache"]["connected"], timeout=10, what="the mount's pool")

    read_all(mnt, sums)  # from the disk, and put to tmem
    before = json.loads(os.getxattr(mnt, STATS))
    assert before["bytes_from_disk"] == total and before["puts"] == 128
    os.setxattr(mnt, "user.tmem.precache.evict", b"1")  # the kernel drops its cached pages
    read_all(mnt, sums)  # every page is in tmem: none from the disk
    after = json.loads(os.getxattr(mnt, STATS))
    assert after["bytes_from_disk"] == before["bytes_from_disk"]
    assert after["bytes_from_tmem"] - before["bytes_from_tmem"] == total
    assert after["hits"] - before["hits"] == after["gets"] - before["gets"] > 0

    # `guestagent stats` shows the mount and its counters
    local = daemon.stats()["precache"]
    assert local["mounted"] and local["mountpoint"] == str(mnt) and local["backing"] == str(work / "backing")
    assert local["hits"] >= after["hits"] and local["bytes_from_tmem"] >= after["bytes_from_tmem"]

    # the daemon's STATS reports carry them to the host: `hostagent stats --json` and the table
    def reported() -> dict[str, int]:
        report = stats_json(host_agent)["guests"]["g1"]["report"]
        return report["values"] if report else {}

    wait_until(lambda: reported().get("precache_hits", 0) >= after["hits"], timeout=10, what="a report")
    values = reported()
    assert values["precache_bytes_from_tmem"] >= after["bytes_from_tmem"]
    assert values["precache_bytes_from_disk"] == after["bytes_from_disk"]
    assert "memavailable_kib" in values  # merged into the memory report, not instead of it
    table = host_agent.cli("stats")
    assert table.returncode == 0, table.stderr
    assert "precache" in table.stdout and statsview.count(values["precache_hits"]) in table.stdout

    assert daemon.stop() == 0  # SIGTERM: unmounted cleanly
    assert not os.path.ismount(mnt)
    assert "precache: " in daemon.log() and "unmounted" in daemon.log()


def test_daemon_mount_reads_the_backing_files_without_a_host_agent(
    host_agent: HostAgentProcess, daemon: GuestDaemon, work: Path
) -> None:
    host_agent.stop()
    sums = populate(work / "backing", files=4, pages=40)
    daemon.start()
    wait_until(lambda: os.path.ismount(work / "mnt"), what="the mount")
    read_all(work / "mnt", sums)
    read_all(work / "mnt", sums)
    stats = daemon.stats()["precache"]
    assert stats["connected"] is False and stats["hits"] == 0 and stats["gets"] == 0
    host_agent.start()  # the mount's pool appears with the channel; page-ins go to tmem again
    wait_until(lambda: daemon.stats()["precache"]["connected"], timeout=15, what="the mount's pool")
    os.setxattr(work / "mnt", "user.tmem.precache.evict", b"1")
    read_all(work / "mnt", sums)
    os.setxattr(work / "mnt", "user.tmem.precache.evict", b"1")
    read_all(work / "mnt", sums)
    assert daemon.stats()["precache"]["hits"] > 0
    assert daemon.stop() == 0
    assert not os.path.ismount(work / "mnt")


def test_daemon_mount_survives_a_host_agent_restart_and_a_sigkill_of_the_daemon(
    host_agent: HostAgentProcess, daemon: GuestDaemon, work: Path
) -> None:
    mnt = work / "mnt"
    sums = populate(work / "backing", files=4, pages=40)
    daemon.start()
    wait_until(lambda: daemon.stats()["precache"]["connected"], timeout=10, what="the mount's pool")
    read_all(mnt, sums)
    host_agent.kill()  # the pool and its pages are gone with it; reads come from the disk meanwhile
    read_all(mnt, sums)
    host_agent.start()
    wait_until(lambda: daemon.stats()["precache"]["connected"], timeout=15, what="the pool again")
    hits = daemon.stats()["precache"]["hits"]
    os.setxattr(mnt, "user.tmem.precache.evict", b"1")
    read_all(mnt, sums)
    os.setxattr(mnt, "user.tmem.precache.evict", b"1")
    read_all(mnt, sums)
    assert daemon.stats()["precache"]["hits"] > hits  # the re-created pool serves again

    assert daemon.proc is not None
    daemon.proc.kill()  # auto_unmount: fusermount3 unmounts it, the directory is usable at once
    daemon.proc.wait(10)
    wait_until(
        lambda: str(mnt) not in Path("/proc/self/mounts").read_text().split(),
        timeout=10,
        what="fusermount3 to unmount",
    )  # (os.path.ismount says no for a dead mount too)
    assert os.listdir(mnt) == []
    daemon.start()  # mounts again
    wait_until(lambda: daemon.stats()["precache"]["connected"], timeout=10, what="the mount again")
    read_all(mnt, sums)
    assert daemon.stop() == 0
    assert not os.path.ismount(mnt)


def test_daemon_refuses_two_mounts_and_a_missing_mountpoint(work: Path) -> None:
    cfg = work / "ga.toml"
    cfg.write_text(
        f'[control]\nsocket = "{work / "ga.sock"}"\n'
        '[[precache]]\nbacking = "backing"\nmountpoint = "mnt"\n'
        '[[precache]]\nbacking = "backing"\nmountpoint = "mnt2"\n'
    )
    res = guestagent_cli("run", "--config", str(cfg), "--channel", str(work / "none.sock"))
    assert res.returncode == 1 and "at most one" in res.stderr, res.stderr
    cfg.write_text(
        f'[control]\nsocket = "{work / "ga.sock"}"\n'
        '[[precache]]\nbacking = "backing"\nmountpoint = "nowhere"\n'
    )
    res = guestagent_cli("run", "--config", str(cfg), "--channel", str(work / "none.sock"))
    assert res.returncode == 1 and "precache" in res.stderr and "nowhere" in res.stderr, res.stderr


# ------------------------------------------------------------------------------- the CLI


def test_cli_precache_mount_in_the_foreground(host_agent: HostAgentProcess, work: Path) -> None:
    mnt = work / "mnt"
    sums = populate(work / "backing", files=4, pages=40)
    log = (work / "mount.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guestagent",
            "precache",
            "mount",
            str(work / "backing"),
            str(mnt),
            "--channel",
            host_agent.sockets["g1"],
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        wait_until(
            lambda: os.path.ismount(mnt) and json.loads(os.getxattr(mnt, STATS))["connected"],
            timeout=15,
            what="the mount",
        )
        read_all(mnt, sums)
        os.setxattr(mnt, "user.tmem.precache.evict", b"1")
        read_all(mnt, sums)
        assert json.loads(os.getxattr(mnt, STATS))["hits"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert not os.path.ismount(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
    assert "Traceback" not in (work / "mount.log").read_text()
    bad = guestagent_cli(
        "precache",
        "mount",
        str(work / "backing"),
        str(work / "nowhere"),
        "--channel",
        host_agent.sockets["g1"],
    )
    assert bad.returncode != 0 and "nowhere" in bad.stderr
    usage = guestagent_cli("precache", "mount", str(work / "backing"))
    assert usage.returncode == 2


def test_precache_line_in_the_stats_table() -> None:
    stats = {
        "guests": {
            "g1": {
                "name": "g1",
                "connected": True,
                "report": {
                    "age": 1.0,
                    "values": {
                        "memavailable_kib": 1000,
                        "precache_gets": 1500,
                        "precache_hits": 1000,
                        "precache_misses": 500,
                        "precache_puts": 2_500_000,
                        "precache_flushes": 3,
                        "precache_bytes_from_tmem": 1000 * PAGE,
                        "precache_bytes_from_disk": 3 << 20,
                    },
                },
            },
            "g2": {"name": "g2", "connected": True},
        }
    }
    text = statsview.format_stats(stats)
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("precache"))
    head, row = lines[start + 1].split(), lines[start + 2].split()
    assert head[0] == "GUEST" and row[0] == "g1"
    cells = dict(zip(head[1:], row[1:], strict=True))
    assert cells["gets"] == "1500" and cells["hits"] == "1000" and cells["misses"] == "500"
    assert cells["puts"] == "2.5M" and cells["hit%"] == "67" and cells["tmemMiB"] == "3.9"
    assert cells["diskMiB"] == "3.0"
    assert not any(line.startswith("g2") for line in lines[start:])  # no precache in g2's report
    assert "precache" not in statsview.format_stats({"guests": {"g2": {"name": "g2"}}})
