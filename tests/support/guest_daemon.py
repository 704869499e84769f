"""A real guest agent daemon for tests: `guestagent run --channel PATH` against a host agent's
guest socket (what a VM's virtio-serial port is on the host), and the `daemons` fixture."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guestagent import control
from tests.support.process import read_log, reap, spawn, wait_serving

START_TIMEOUT = 10.0


class GuestDaemon:
    """A `guestagent run --channel PATH --config FILE` subprocess with a private control socket."""

    def __init__(self, workdir: Path, channel: str, name: str = "daemon-test") -> None:
        self.workdir = workdir
        self.channel = channel
        self.config = workdir / "guestagent.toml"
        self.control = str(workdir / "ga.sock")
        self.log_path = workdir / "guestagent.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.config.write_text(
            f'[channel]\nname = "{name}"\nretry_interval = 0.1\n'
            f"[report]\ninterval = 0.2\n"
            f'[control]\nsocket = "{self.control}"\n'
        )

    def start(self) -> None:
        self.proc = spawn(
            [
                sys.executable,
                "-m",
                "guestagent",
                "run",
                "--config",
                str(self.config),
                "--channel",
                self.channel,
                "--log-level",
                "DEBUG",
            ],
            self.log_path,
        )
        wait_serving(self, self.control, START_TIMEOUT, "guestagent")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def log(self) -> str:
        return read_log(self.log_path)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return guestagent_cli(*args, "--config", str(self.config))

    def request(self, cmd: str, **fields: Any) -> Any:
        return control.request(self.control, {"cmd": cmd, **fields})

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("status")
        return result

    def stats(self) -> dict[str, Any]:
        """`guestagent stats` through the real CLI, parsed."""
        res = self.cli("stats")
        assert res.returncode == 0, res.stderr
        result: dict[str, Any] = json.loads(res.stdout)
        return result


def guestagent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guestagent", *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[list[GuestDaemon]]:
    """Daemons the test creates (appended); killed at teardown, their logs shown on failure and
    checked for tracebacks."""
    made: list[GuestDaemon] = []
    yield made
    for d in made:
        reap(request, d, "guestagent")
