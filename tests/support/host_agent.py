"""A real `hostagent run` process for tests, and its fixtures (`host_agent`, `host_agent_stopped`).

The host agent runs as a subprocess on a temp config (arena under /dev/shm, sockets under a short
/tmp dir: unix socket paths are limited to 107 bytes). Tests talk to it over its real sockets, e.g.
with the wire-level test guest of tests/support/wire_guest.py.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from guestagent.protocol import wire
from hostagent import control
from tests.support.process import read_log, reap, spawn, wait_serving
from tests.support.wire_guest import WireGuest

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
GUESTS = ("g1", "g2", "g3")
SHARED_UUID = bytes.fromhex("6f1c2a943b5e4c1d9a8f0e2d4b6c8a10")  # authorised for g1 and g2


class HostAgentProcess:
    """A `hostagent run` subprocess on its own temp config, arena and sockets.

    `start`/`stop`/`kill` may be called repeatedly: the config and arena stay, so a restart finds
    the persistent pages of the previous run.
    """

    def __init__(
        self, workdir: Path, arena_dir: Path, guests: Sequence[str] = GUESTS, extra_toml: str = ""
    ) -> None:
        self.workdir = workdir
        self.arena_dir = arena_dir
        self.config_path = workdir / "hostagent.toml"
        self.control = str(workdir / "control.sock")
        self.sockets = {name: str(workdir / "guests" / f"{name}.sock") for name in guests}
        self.log_path = workdir / "agent.log"
        self.max_payload = wire.DEFAULT_MAX_PAYLOAD
        self.max_vector = wire.DEFAULT_MAX_VECTOR
        self.proc: subprocess.Popen[bytes] | None = None
        guest_tables = "".join(f'[[guest]]\nname = "{name}"\n' for name in guests)
        shared = ""
        if {"g1", "g2"} <= set(guests):
            uuid = SHARED_UUID.hex()
            shared = (
                f'[[shared_pool]]\nuuid = "{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-'
                f'{uuid[16:20]}-{uuid[20:]}"\nguests = ["g1", "g2"]\n'
            )
        self.config_path.write_text(
            f'[pool]\nlimit_mib = 64\nhost_reserve_mib = 0\narena_dir = "{arena_dir}"\n'
            f"sample_interval = 0.2\n"
            f'[control]\nsocket = "{self.control}"\n'
            f'[channels]\ndir = "{workdir / "guests"}"\n'
            f"max_payload = {self.max_payload}\nmax_vector = {self.max_vector}\n"
            "[libvirt]\nenabled = false\n"  # these guests are sockets, not domains
            f"{extra_toml}\n{guest_tables}{shared}"
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        """Start the agent and wait until its control socket answers (it is then fully serving)."""
        assert not self.alive
        self.proc = spawn(
            [sys.executable, "-m", "hostagent", "run", "--config", str(self.config_path)], self.log_path
        )
        wait_serving(self, self.control, START_TIMEOUT, "hostagent")

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL and wait: the agent gets no chance to clean up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)

    def log(self) -> str:
        return read_log(self.log_path)

    def request(self, cmd: str, **fields: Any) -> Any:
        return control.request(self.control, {"cmd": cmd, **fields})

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("stats")
        return result

    def cli(self, *args: str, control_flag: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the `hostagent` CLI (as `python -m hostagent`) against this agent.

        UserWarnings are silenced: the package warns when an engine module's source is newer than
        its mypyc build, which is a development condition, not CLI output under test.
        """
        return subprocess.run(
            self.cli_argv(*args, control_flag=control_flag),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    def cli_argv(self, *args: str, control_flag: bool = True) -> list[str]:
        """The argv of `cli`, for a test that runs a long command (`stats --watch`) itself."""
        extra = ["--control", self.control] if control_flag else []
        return [sys.executable, "-W", "ignore::UserWarning", "-m", "hostagent", *args, *extra]

    def connect(self, guest: str = "g1", hello: bool = True) -> WireGuest:
        g = WireGuest(self.sockets[guest])
        if hello:
            g.hello(f"test-{guest}")
        return g


@pytest.fixture
def host_agent_stopped(request: pytest.FixtureRequest) -> Iterator[HostAgentProcess]:
    """A configured host agent (guests g1, g2, g3) that the test starts itself."""
    workdir = Path(tempfile.mkdtemp(prefix="tmem-t", dir="/tmp"))
    arena_dir = Path(tempfile.mkdtemp(prefix="tmem-t", dir="/dev/shm"))
    agent = HostAgentProcess(workdir, arena_dir)
    try:
        yield agent
        if agent.proc is not None:
            rc = agent.stop()
            assert rc == 0, f"hostagent exited with {rc} on SIGTERM:\n{agent.log()}"
    finally:
        reap(request, agent, "hostagent")
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


@pytest.fixture
def host_agent(host_agent_stopped: HostAgentProcess) -> HostAgentProcess:
    """A running host agent (guests g1, g2, g3; g1 and g2 share SHARED_UUID)."""
    host_agent_stopped.start()
    return host_agent_stopped


def stats_json(agent: HostAgentProcess) -> dict[str, Any]:
    """`hostagent stats --json` through the CLI, parsed."""
    res = agent.cli("stats", "--json")
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result
