"""systemd readiness (Type=notify) without systemd: a real host agent and a real datagram socket
standing in for the service manager's $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from hostagent import control, sdnotify
from tests.support.host_agent import HostAgentProcess


def messages(sock: socket.socket, until: str, timeout: float = 15.0) -> list[dict[str, str]]:
    """Datagrams received until one has the field `until`."""
    out = []
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in data.split("\n"))
        out.append(fields)
        if until in fields:
            return out


def test_ready_after_the_sockets_listen_and_stopping_on_sigterm(host_agent_stopped: HostAgentProcess) -> None:
    agent = host_agent_stopped
    path = str(agent.workdir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        env = {**os.environ, "NOTIFY_SOCKET": path}
        with agent.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "hostagent", "run", "--config", str(agent.config_path)],
                stdout=log,
                stderr=log,
                env=env,
            )
        try:
            ready = messages(sock, "READY")[-1]
            # READY=1 means serving: the control socket answers at once
            assert control.is_listening(agent.control)
            assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
            assert ready["STATUS"].startswith("serving 3 guest(s)"), ready
            proc.send_signal(signal.SIGTERM)
            stopping = messages(sock, "STOPPING")[-1]
            assert stopping["STOPPING"] == "1"
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_abstract_address_and_no_socket() -> None:
    assert sdnotify.address("@/org/x") == b"\0/org/x"
    assert sdnotify.address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.address("") is None and sdnotify.address("vsock:2:1") is None
    assert sdnotify.message(READY=1, STATUS="a\nb") == b"READY=1\nSTATUS=a b"


def test_abstract_namespace_socket_receives() -> None:
    name = f"tmem-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        os.environ["NOTIFY_SOCKET"] = "@" + name
        try:
            assert sdnotify.notify(READY=1)
        finally:
            del os.environ["NOTIFY_SOCKET"]
        sock.settimeout(5)
        assert sock.recv(100) == b"READY=1"
    assert not sdnotify.notify(READY=1)  # no $NOTIFY_SOCKET: nothing to tell
