"""preswap wired into the guest agent: `[preswap]` in its config, the swapper served by `guestagent run`
over the daemon's own channel, its counters in `guestagent stats` and merged into the daemon's STATS
reports (so in `hostagent stats`, one report per guest).

Real processes throughout: a `hostagent run`, the daemon (`--channel` = guest g1's unix socket, as in
tests/test_guest_daemon.py), an application using `guestagent.preswap.Region` in a process of its own.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from guestagent import config as configmod
from hostagent import statsview
from scripts.wait import wait_until
from tests.support.guest_daemon import GuestDaemon
from tests.support.host_agent import HostAgentProcess, stats_json

PAGE = 4096
BUDGET_PAGES = 256  # default_budget_mib = 1
REGION_PAGES = 4 * BUDGET_PAGES

APP = """\
import struct, sys
from guestagent import preswap
pages = int(sys.argv[2])
def page(p): return struct.pack("<QQ", p, p * 7919) * 256
with preswap.Region(pages * 4096, sys.argv[1]) as r:
    for p in range(pages):
        r.buf[p * 4096:(p + 1) * 4096] = page(p)
    bad = [p for p in range(pages) if bytes(r.buf[p * 4096:(p + 1) * 4096]) != page(p)]
    print(f"verified {pages - len(bad)} bad {len(bad)}", flush=True)
    sys.stdin.readline()  # hold the region until the test has looked
    bad = [p for p in range(pages) if bytes(r.buf[p * 4096:(p + 1) * 4096]) != page(p)]
    print(f"verified {pages - len(bad)} bad {len(bad)}", flush=True)
"""


def test_preswap_table_defaults_and_validation(tmp_path: Path) -> None:
    cfg = configmod.Config()
    assert not cfg.preswap and cfg.preswap_socket == "/run/tmem/preswap.sock"
    assert cfg.preswap_swap_file == "/var/lib/tmem/preswap.swap"
    assert cfg.preswap_default_budget_mib == 4 and cfg.preswap_guest_budget_mib == 0
    (tmp_path / "ga.toml").write_text(
        '[preswap]\nenabled = true\nsocket = "p.sock"\nswap_file = "swap"\n'
        "default_budget_mib = 2\nguest_budget_mib = 64\n"
    )
    got = configmod.load(tmp_path / "ga.toml")
    assert (got.preswap, got.preswap_socket, got.preswap_swap_file) == (
        True,
        str(tmp_path / "p.sock"),
        str(tmp_path / "swap"),
    )
    assert (got.preswap_default_budget_mib, got.preswap_guest_budget_mib) == (2, 64)
    example = configmod.load(Path(configmod.__file__).with_name("guestagent.example.toml"))
    assert example == configmod.Config()  # the example shows the defaults
    for table, message in [
        ({"enabled": 1}, "preswap.enabled"),
        ({"socket": ""}, "preswap.socket"),
        ({"swap_file": 3}, "preswap.swap_file"),
        ({"socket": "/" + "x" * 120}, "longer"),
        ({"default_budget_mib": 0}, "preswap.default_budget_mib"),
        ({"guest_budget_mib": -1}, "preswap.guest_budget_mib"),
        ({"guest_budget_mib": True}, "preswap.guest_budget_mib"),
        ({"budget": 1}, "preswap.budget: unknown setting"),
    ]:
        with pytest.raises(configmod.ConfigError, match=message):
            configmod.parse({"preswap": table})


@pytest.fixture
def daemon(host_agent: HostAgentProcess, tmp_path: Path, daemons: list[GuestDaemon]) -> GuestDaemon:
    d = GuestDaemon(tmp_path, host_agent.sockets["g1"])
    with d.config.open("a") as f:
        f.write(
            f'[preswap]\nenabled = true\nsocket = "{tmp_path / "preswap.sock"}"\n'
            f'swap_file = "{tmp_path / "preswap.swap"}"\ndefault_budget_mib = 1\n'
        )
    daemons.append(d)
    return d


def daemon_preswap(d: GuestDaemon) -> dict[str, Any]:
    out: dict[str, Any] = d.stats()["preswap"]
    return out


def test_daemon_serves_preswap_regions_and_reports_them(
    host_agent: HostAgentProcess, daemon: GuestDaemon, tmp_path: Path
) -> None:
    daemon.start()
    sock = tmp_path / "preswap.sock"
    wait_until(lambda: daemon_preswap(daemon)["running"] and sock.exists(), timeout=10, what="the swapper")

    def guest() -> dict[str, Any]:
        g: dict[str, Any] = stats_json(host_agent)["guests"]["g1"]
        return g

    def reported() -> dict[str, int]:
        report = guest()["report"]
        return report["values"] if report else {}

    app = subprocess.Popen(
        [sys.executable, "-c", APP, str(sock), str(REGION_PAGES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None and app.stdin is not None
        assert app.stdout.readline() == f"verified {REGION_PAGES} bad 0\n"
        local = daemon_preswap(daemon)
        (region,) = local["regions"].values()
        assert region["limit"] == BUDGET_PAGES and local["totals"]["puts"] >= REGION_PAGES - BUDGET_PAGES
        assert local["totals"]["gets"] > 0  # the read-back faulted pages in from tmem
        assert guest()["persistent"]["pages"] > 0
        wait_until(
            lambda: reported().get("preswap_regions") == 1 and reported().get("preswap_in_tmem", 0) > 0,
            timeout=10,
            what="preswap counters in the host's report",
        )
        values = reported()
        assert values["preswap_puts"] > 0 and "memavailable_kib" in values  # merged, not instead
        table = statsview.format_stats(stats_json(host_agent))  # `hostagent stats` has a preswap table
        row = next(line for line in table.split("preswap (")[1].splitlines() if line.startswith("g1"))
        assert row.split()[1] == statsview.count(values["preswap_puts"]), table
        assert daemon.status()["preswap"]["running"]
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.stdout.readline() == f"verified {REGION_PAGES} bad 0\n"
        assert app.wait(30) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    wait_until(
        lambda: guest()["persistent"]["pages"] == 0, timeout=10, what="the region's tmem pages flushed"
    )
    wait_until(
        lambda: reported().get("preswap_regions") == 0 and reported().get("preswap_in_tmem") == 0,
        timeout=10,
        what="a report without the region",
    )
    local = daemon_preswap(daemon)
    assert local["released"] == 1 and local["regions"] == {} and local["swap_slots_used"] == 0
    assert daemon.stop() == 0
    assert "preswap: serving regions" in daemon.log()


def preswap_request(sock: Path, req: dict[str, Any]) -> dict[str, Any]:
    """One request on the swapper's socket (as root or the agent's user: budget, shrink)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall((json.dumps(req) + "\n").encode())
        buf = b""
        while b"\n" not in buf:
            data = s.recv(65536)
            assert data, "the swapper closed the socket"
            buf += data
    reply: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
    assert reply["ok"], reply
    return reply


def start_app(sock: Path) -> subprocess.Popen[str]:
    """APP on a region of REGION_PAGES, once it has written and verified every page."""
    app = subprocess.Popen(
        [sys.executable, "-c", APP, str(sock), str(REGION_PAGES)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert app.stdout is not None
    assert app.stdout.readline() == f"verified {REGION_PAGES} bad 0\n"
    return app


def host_g1(agent: HostAgentProcess) -> dict[str, Any]:
    g: dict[str, Any] = stats_json(agent)["guests"]["g1"]
    return g


def g1_pools(agent: HostAgentProcess) -> list[dict[str, Any]]:
    return [p for p in agent.request("pools") if p["owner"] == "g1"]


def test_host_shrink_notice_moves_pages_out_of_tmem(
    host_agent: HostAgentProcess, daemon: GuestDaemon, tmp_path: Path
) -> None:
    """`hostagent shrink g1 N`: the daemon hands the notice to its swapper, which moves N pages out
    of tmem, into the region while its budget has room and to the swap file after that."""
    with daemon.config.open("a") as f:
        f.write("guest_budget_mib = 64\n")  # a fixed guest budget: the test moves it, not MemAvailable
    daemon.start()
    sock = tmp_path / "preswap.sock"
    wait_until(lambda: daemon_preswap(daemon)["running"] and sock.exists(), timeout=10, what="the swapper")
    app = start_app(sock)
    try:
        # squeeze the region to 64 resident pages, then give it its 256 back: room for ~200 pages
        preswap_request(sock, {"cmd": "budget", "pages": 64})
        wait_until(lambda: daemon_preswap(daemon)["resident"] <= 64, timeout=10, what="the region to shrink")
        preswap_request(sock, {"cmd": "budget", "pages": None})
        (region,) = daemon_preswap(daemon)["regions"].values()
        room = region["limit"] - region["resident"]
        assert region["limit"] == BUDGET_PAGES and room >= 150, region
        before = host_g1(host_agent)["persistent"]["pages"]
        assert before == region["in_tmem"] and before >= 2 * room, (before, region)
        n = room + 100
        res = host_agent.cli("shrink", "g1", str(n))
        assert res.returncode == 0, res.stderr
        assert f"g1: asked to move {n} persistent pages out of tmem (it holds {before} now)" in res.stdout
        wait_until(
            lambda: daemon.request("stats")["shrinks"] == 1, timeout=20, what="the daemon to act on it"
        )
        stats = daemon.request("stats")
        assert stats["shrunk_pages"] == n and stats["notices"] == 1
        wait_until(
            lambda: host_g1(host_agent)["persistent"]["pages"] == before - n,
            timeout=10,
            what=f"the host's persistent pages to drop by {n}",
        )
        (region,) = daemon_preswap(daemon)["regions"].values()
        assert region["shrunk_to_memory"] == room and region["shrunk_to_disk"] == 100, region
        assert region["on_disk"] == 100 and region["in_tmem"] == before - n and region["lost"] == 0
        assert region["resident"] == BUDGET_PAGES
        assert app.stdin is not None and app.stdout is not None
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.stdout.readline() == f"verified {REGION_PAGES} bad 0\n"  # every page, wherever it was
        assert app.wait(30) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    assert "host notice: move" in daemon.log()
    assert "asked to move" in host_agent.log()
    # a shrink for a guest that is not there is an error, and says so
    res = host_agent.cli("shrink", "g3", "10")
    assert res.returncode == 1 and "not connected" in res.stderr
    res = host_agent.cli("shrink", "nobody", "10")
    assert res.returncode == 1 and "unknown guest" in res.stderr
    assert daemon.stop() == 0


def test_a_killed_daemons_pool_is_destroyed_by_the_next(
    host_agent: HostAgentProcess, daemon: GuestDaemon, tmp_path: Path
) -> None:
    """Persistent pools outlive their session: a daemon SIGKILLed with pages in tmem leaves its pool on
    the host, and its restarted swapper destroys it (the state file beside the swap file names it)."""
    daemon.start()
    sock = tmp_path / "preswap.sock"
    state = tmp_path / "preswap.swap.pool"
    wait_until(lambda: daemon_preswap(daemon)["running"] and sock.exists(), timeout=10, what="the swapper")
    app = start_app(sock)
    (old,) = g1_pools(host_agent)
    assert "persistent" in old["kind"] and old["exclusive_gets"], old
    assert old["pages"] >= REGION_PAGES - BUDGET_PAGES - 64
    assert json.loads(state.read_text())["pool"] >= 1
    assert daemon.proc is not None
    daemon.proc.kill()  # no chance to flush or destroy anything
    daemon.proc.wait(10)
    app.kill()
    app.wait()
    time.sleep(0.5)
    (left,) = g1_pools(host_agent)
    assert left["handle"] == old["handle"] and left["pages"] == old["pages"]  # the leak this fixes

    daemon.start()
    wait_until(lambda: daemon_preswap(daemon)["running"], timeout=10, what="the restarted swapper")
    (new,) = g1_pools(host_agent)  # the old pool is gone, only the new one is there
    assert new["handle"] != old["handle"] and new["pages"] == 0
    assert host_g1(host_agent)["persistent"]["pages"] == 0
    assert "destroyed preswap pool" in daemon.log()

    app = start_app(sock)  # the new pool serves as before
    try:
        held = daemon_preswap(daemon)["totals"]
        in_tmem = sum(r["in_tmem"] for r in daemon_preswap(daemon)["regions"].values())
        assert held["puts"] > 0 and host_g1(host_agent)["persistent"]["pages"] == in_tmem
        assert app.stdin is not None
        app.stdin.write("\n")
        app.stdin.flush()
        assert app.wait(30) == 0
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
    wait_until(lambda: host_g1(host_agent)["persistent"]["pages"] == 0, timeout=10, what="the region flushed")
    assert daemon.stop() == 0
    assert g1_pools(host_agent) == [] and not state.exists()  # a clean stop destroys it and forgets it
