"""The guest agent daemon as a real process: `guestagent run` against a real `hostagent run`.

On the host the daemon's channel is the guest's unix socket (`--channel`) instead of a
virtio-serial port; everything else is what runs in a VM: the STATS reports, the control
socket with `guestagent status|stats|check`, reconnecting when the host agent is SIGKILLed
and restarted, and waiting for a host agent that is not there yet.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from guestagent import config as configmod
from guestagent import control
from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, Status
from scripts.wait import wait_until
from tests.support.guest_daemon import GuestDaemon, guestagent_cli
from tests.support.host_agent import HostAgentProcess, stats_json

RECONNECT_LIMIT = 5.0  # seconds from "host agent serving again" to "daemon reporting again"


def new_daemon(daemons: list[GuestDaemon], workdir: Path, channel: str) -> GuestDaemon:
    d = GuestDaemon(workdir, channel)
    daemons.append(d)
    return d


def host_guest(agent: HostAgentProcess, guest: str = "g1") -> dict[str, Any]:
    """`hostagent stats --json`'s entry for one guest (through the real CLI)."""
    entry: dict[str, Any] = stats_json(agent)["guests"][guest]
    return entry


def host_has_fresh_report(agent: HostAgentProcess, guest: str = "g1") -> bool:
    g = host_guest(agent, guest)
    report = g.get("report")
    return bool(
        g["connected"] and report and report["values"].get("committed_as_kib", 0) > 0 and report["age"] < 1.0
    )


# -- connected ------------------------------------------------------------------------------------


def test_daemon_reports_and_serves_status_check_stats(
    host_agent: HostAgentProcess, daemons: list[GuestDaemon]
) -> None:
    d = new_daemon(daemons, host_agent.workdir, host_agent.sockets["g1"])
    d.start()
    wait_until(lambda: host_has_fresh_report(host_agent), 10, "the daemon's report on the host")
    g = host_guest(host_agent)
    assert g["name_in_hello"] == "daemon-test"
    values = g["report"]["values"]
    with open("/proc/meminfo") as f:  # same kernel: the report is this machine's
        memtotal = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert values["memtotal_kib"] == memtotal
    assert {"memavailable_kib", "swaptotal_kib", "pgpgin", "pgpgout", "pswpin", "pswpout"} <= set(values)
    assert stat.S_IMODE(os.stat(d.control).st_mode) == 0o600

    res = d.cli("status")
    assert res.returncode == 0, res.stdout + res.stderr
    status = json.loads(res.stdout)
    assert status["connected"] is True and status["state"] == "connected"
    assert status["channel"] == host_agent.sockets["g1"] and status["transport"] == "unix"
    assert status["generation"] == 1 and status["name"] == "daemon-test"
    assert status["welcome"]["page_size"] == wire.PAGE_SIZE
    assert status["last_report"]["values"]["committed_as_kib"] > 0

    res = d.cli("check")
    assert res.returncode == 0, res.stdout + res.stderr
    check = json.loads(res.stdout)
    assert check["ok"] is True and check["via"] == "daemon" and check["generation"] == 1
    for kind in ("ephemeral", "persistent"):
        part = check[kind]
        assert part["ok"] and part["put"] and part["get"] and part["flush"], part
        assert all(part[k] > 0 for k in ("put_rtt_us", "get_rtt_us", "flush_rtt_us")), part
    assert [p for p in host_agent.request("pools") if p["owner"] == "g1"] == []  # nothing left behind

    res = d.cli("stats")
    assert res.returncode == 0, res.stdout + res.stderr
    counters = json.loads(res.stdout)
    assert counters["checks"] == 1 and counters["checks_failed"] == 0
    assert counters["reports_sent"] >= 1 and counters["report_errors"] == 0
    assert counters["generation"] == 1 and counters["reconnects"] == 0 and counters["connected"]

    with pytest.raises(control.ControlError, match="unknown command"):
        d.request("frobnicate")
    with pytest.raises(control.ControlError, match="timeout"):
        d.request("check", timeout="soon")

    # a second daemon must not take over the control socket (nor, in a VM, fight for the port)
    res = guestagent_cli("run", "--config", str(d.config), "--channel", host_agent.sockets["g2"])
    assert res.returncode == 1 and "already serving" in res.stderr, res.stderr
    assert d.status()["connected"]

    assert d.stop() == 0
    assert not os.path.exists(d.control)
    assert "Traceback" not in d.log(), d.log()
    wait_until(lambda: not host_guest(host_agent)["connected"], 5, "the host to see the daemon go")


# -- host agent outages ---------------------------------------------------------------------------


def test_daemon_reconnects_after_the_host_agent_is_killed_and_restarted(
    host_agent: HostAgentProcess, daemons: list[GuestDaemon]
) -> None:
    d = new_daemon(daemons, host_agent.workdir, host_agent.sockets["g1"])
    d.start()
    wait_until(lambda: d.status()["connected"], 10, "the daemon to connect")

    host_agent.kill()
    wait_until(lambda: not d.status()["connected"], 5, "the daemon to notice the outage")
    assert d.status()["state"] == "disconnected"
    time.sleep(0.5)  # an outage long enough for the reconnect backoff to grow
    assert d.cli("status").returncode == 1

    host_agent.start()
    back = time.monotonic()
    wait_until(lambda: d.status()["connected"], RECONNECT_LIMIT, "the daemon to reconnect")
    wait_until(lambda: host_has_fresh_report(host_agent), RECONNECT_LIMIT, "a report after the restart")
    assert time.monotonic() - back < RECONNECT_LIMIT + 2
    status = d.status()
    assert status["generation"] == 2

    res = d.cli("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout)["generation"] == 2
    counters = d.request("stats")
    assert counters["reconnects"] == 1 and counters["reports_skipped"] >= 1
    assert d.stop() == 0
    assert "Traceback" not in d.log(), d.log()


def test_daemon_started_before_the_host_agent_connects_when_it_appears(
    host_agent_stopped: HostAgentProcess, daemons: list[GuestDaemon]
) -> None:
    agent = host_agent_stopped
    d = new_daemon(daemons, agent.workdir, agent.sockets["g1"])
    d.start()  # the guest socket does not exist yet
    time.sleep(0.5)
    res = d.cli("status")
    assert res.returncode == 1
    status = json.loads(res.stdout)
    assert status["connected"] is False and status["state"] == "connecting" and status["generation"] == 0

    res = d.cli("check", "--timeout", "1")
    assert res.returncode == 1
    check = json.loads(res.stdout)
    assert check["ok"] is False and "not done within 1 s" in check["error"]

    agent.start()
    back = time.monotonic()
    wait_until(lambda: d.status()["connected"], RECONNECT_LIMIT, "the daemon to connect")
    wait_until(lambda: host_has_fresh_report(agent), RECONNECT_LIMIT, "the first report")
    assert time.monotonic() - back < RECONNECT_LIMIT + 2
    assert d.status()["generation"] == 1
    res = d.cli("check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert d.stop() == 0
    assert "Traceback" not in d.log(), d.log()


# -- host notices ---------------------------------------------------------------------------------


class NoticeHost:
    """A wire-level host on a unix socket: welcomes one guest, sends it notices, keeps its reports."""

    def __init__(self, path: str, notices: list[tuple[wire.Notice, int]], refuse: bool = False) -> None:
        self.path = path
        self.notices = notices
        self.refuse = refuse  # answer HELLO with INVALID, as a host of another protocol version would
        self.reports: list[dict[str, int]] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(0.1)
        reader = wire.FrameReader(wire.Role.HOST)
        welcome = wire.welcome_payload(wire.Welcome(wire.VERSION, wire.PAGE_SIZE, 1 << 20, 64))
        with conn:
            while not self.stop.is_set():
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return
                for f in reader.feed(data):
                    if f.opcode == Op.HELLO and self.refuse:
                        conn.sendall(wire.encode(wire.reply_to(f, Status.INVALID)))
                    elif f.opcode == Op.HELLO:
                        out = wire.encode(wire.reply_to(f, payload=welcome))
                        for kind, value in self.notices:
                            out += wire.encode(Frame(Op.NOTICE, payload=wire.notice_payload(kind, value)))
                        conn.sendall(out)
                    elif f.opcode == Op.STATS:
                        self.reports.append(wire.parse_stats(f.payload))
                    else:
                        conn.sendall(wire.encode(wire.reply_to(f, Status.INVALID)))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()


def test_host_notices_are_logged_and_counted(daemons: list[GuestDaemon]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tmem-ga", dir="/tmp"))
    host = NoticeHost(
        str(workdir / "host.sock"),
        [
            (wire.Notice.BALLOON_TARGET, 262144),
            (wire.Notice.SHRINK_PERSISTENT, 17),
        ],
    )
    try:
        d = new_daemon(daemons, workdir, host.path)
        d.start()
        wait_until(lambda: d.request("stats")["notices"] == 2, 5, "both notices")
        last = d.status()["last_notice"]
        assert last["kind"] == "shrink_persistent" and last["value"] == 17
        wait_until(lambda: bool(host.reports), 5, "a report at the wire-level host")
        assert host.reports[0]["committed_as_kib"] > 0
        assert d.stop() == 0
        log = d.log()
        assert "balloon target is now 262144 KiB" in log and "move 17 persistent pages" in log
    finally:
        host.close()
        shutil.rmtree(workdir, ignore_errors=True)


def test_a_host_that_refuses_us_is_reported_and_retried_not_fatal(daemons: list[GuestDaemon]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="tmem-ga", dir="/tmp"))
    host = NoticeHost(str(workdir / "host.sock"), [], refuse=True)
    try:
        d = new_daemon(daemons, workdir, host.path)
        d.start()
        wait_until(lambda: d.status()["state"] == "failed", 5, "the daemon to give up on this host")
        status = d.status()
        assert "refused the handshake" in status["error"] and not status["connected"]
        assert d.request("stats")["channel_failures"] == 1
        res = d.cli("check", "--timeout", "1")  # answered, not hung: the daemon is alive
        assert res.returncode == 1 and json.loads(res.stdout)["ok"] is False
        assert d.stop() == 0
        assert "Traceback" not in d.log(), d.log()
    finally:
        host.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- configuration and CLI errors -----------------------------------------------------------------


def test_config_defaults_and_full_file(tmp_path: Path) -> None:
    assert configmod.parse({}) == configmod.Config(
        port="org.tmem.0",
        channel="",
        name="",
        retry_interval=0.25,
        report_interval=2.0,
        control_socket="/run/tmem/guestagent.sock",
    )
    example = Path(configmod.__file__).with_name("guestagent.example.toml")
    assert configmod.load(example) == configmod.Config()  # the reference shows the defaults
    path = tmp_path / "ga.toml"
    path.write_text(
        '[channel]\nport = "org.tmem.1"\npath = "/dev/vport1p2"\nname = "g"\n'
        'retry_interval = 1\n[report]\ninterval = 5\n[control]\nsocket = "ga.sock"\n'
    )
    assert configmod.load(path) == configmod.Config(
        port="org.tmem.1",
        channel="/dev/vport1p2",
        name="g",
        retry_interval=1.0,
        report_interval=5.0,
        control_socket=str(tmp_path / "ga.sock"),
    )


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"report": {"interval": 0}}, "report.interval"),
        ({"report": {"interval": True}}, "report.interval"),
        ({"report": {"period": 1}}, "report.period"),
        ({"channel": {"port": ""}}, "channel.port"),
        ({"channel": {"name": "x" * 65}}, "channel.name"),
        ({"channel": {"retry_interval": "1"}}, "channel.retry_interval"),
        ({"control": {"socket": "/" + "s" * 120}}, "control.socket"),
        ({"control": "x"}, "control"),
        ({"daemon": {}}, "daemon"),
    ],
)
def test_config_errors_name_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(configmod.ConfigError, match=f"^{key}:"):
        configmod.parse(doc)


def test_cli_errors(tmp_path: Path) -> None:
    res = guestagent_cli("status", "--control", str(tmp_path / "none.sock"))
    assert res.returncode == 1 and "guest agent not running" in res.stderr and not res.stdout
    res = guestagent_cli("check", "--control", str(tmp_path / "none.sock"))
    assert res.returncode == 1 and "guest agent not running" in res.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[report]\ninterval = -1\n")
    res = guestagent_cli("run", "--config", str(bad))
    assert res.returncode == 1 and "report.interval" in res.stderr and "Traceback" not in res.stderr
    res = guestagent_cli("run", "--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 1 and "no such file" in res.stderr
    res = guestagent_cli("--help")
    assert res.returncode == 0 and all(c in res.stdout for c in ("run", "status", "stats", "check"))
