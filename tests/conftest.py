"""Shared fixtures: a real `hostagent run` process, and a blocking wire-level test guest.

The host agent runs as a subprocess on a temp config (arena under /dev/shm, sockets under a short
/tmp dir: unix socket paths are limited to 107 bytes). Tests talk to it over its real sockets; the
test guest is built directly on `guestagent.protocol.wire`, not on the guest agent's channel client.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, Status
from hostagent import control

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
GUESTS = ("g1", "g2", "g3")
SHARED_UUID = bytes.fromhex("6f1c2a943b5e4c1d9a8f0e2d4b6c8a10")  # authorised for g1 and g2


class HostAgentProcess:
    """A `hostagent run` subprocess on its own temp config, arena and sockets.

    `start`/`stop`/`kill` may be called repeatedly: the config and arena stay, so a restart finds
    the persistent pages of the previous run.
    """

    def __init__(self, workdir: Path, arena_dir: Path, guests: Sequence[str] = GUESTS,
                 extra_toml: str = "") -> None:
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
            shared = (f'[[shared_pool]]\nuuid = "{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-'
                      f'{uuid[16:20]}-{uuid[20:]}"\nguests = ["g1", "g2"]\n')
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
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hostagent", "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not control.is_listening(self.control):
            if self.proc.poll() is not None:
                raise AssertionError(f"hostagent exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"hostagent not ready after {START_TIMEOUT} s:\n{self.log()}")
            time.sleep(0.02)

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
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

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
        extra = ["--control", self.control] if control_flag else []
        return subprocess.run([sys.executable, "-W", "ignore::UserWarning", "-m", "hostagent",
                               *args, *extra],
                              capture_output=True, text=True, timeout=30, check=False)

    def connect(self, guest: str = "g1", hello: bool = True) -> WireGuest:
        g = WireGuest(self.sockets[guest])
        if hello:
            g.hello(f"test-{guest}")
        return g


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's outcome on the item, so fixtures can tell a failed test at teardown."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


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
            assert "Traceback" not in agent.log(), agent.log()
    finally:
        if agent.alive:
            agent.kill()
        call = getattr(request.node, "rep_call", None)
        if call is None or call.failed:
            print(f"---- hostagent log ({agent.log_path}) ----\n{agent.log()}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(arena_dir, ignore_errors=True)


@pytest.fixture
def host_agent(host_agent_stopped: HostAgentProcess) -> HostAgentProcess:
    """A running host agent (guests g1, g2, g3; g1 and g2 share SHARED_UUID)."""
    host_agent_stopped.start()
    return host_agent_stopped


# -- a blocking test guest ------------------------------------------------------------------------


def oid(n: int) -> bytes:
    return n.to_bytes(24, "little")


def page(seed: int, compressible: bool = False) -> bytes:
    """A distinct page per seed; compressible pages look like text, the others are random."""
    if compressible:
        return (f"page {seed} ".encode() * 1000)[: wire.PAGE_SIZE]
    return random.Random(seed).randbytes(wire.PAGE_SIZE)


class WireGuest:
    """A guest speaking the wire protocol over a blocking unix socket, one request at a time
    (or pipelined with `send` + `recv`)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = wire.FrameReader(wire.Role.GUEST)
        self.pending: deque[Frame] = deque()
        self.next_rid = 1
        self.welcome: wire.Welcome | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rid(self) -> int:
        self.next_rid += 1
        return self.next_rid - 1

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(wire.encode(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Frame:
        """The next frame from the host; EOFError when the host closed the channel."""
        while not self.pending:
            data = self.sock.recv(1 << 18)
            if not data:
                self.reader.eof()
                raise EOFError("host closed the channel")
            self.pending.extend(self.reader.feed(data))
        return self.pending.popleft()

    def at_eof(self) -> bool:
        """True if the host closed the channel and nothing is left to read."""
        try:
            frame = self.recv()
        except EOFError:
            return True
        raise AssertionError(f"expected EOF, got {frame}")

    def expect_error(self) -> Frame:
        """The host must send ERROR (after any replies) and then close the channel."""
        while True:
            frame = self.recv()
            if frame.opcode == Op.ERROR:
                assert self.at_eof()
                return frame

    def call(self, op: Op, **fields: Any) -> Frame:
        rid = self.rid()
        self.send(Frame(op, request_id=rid, **fields))
        reply = self.recv()
        assert reply.opcode == op and reply.request_id == rid, reply
        return reply

    def hello(self, name: str = "test", min_version: int = wire.VERSION,
              max_version: int = wire.VERSION) -> wire.Welcome:
        reply = self.call(Op.HELLO, payload=wire.hello_payload(
            wire.Hello(min_version, max_version, wire.PAGE_SIZE, name)))
        assert reply.status == Status.OK, reply
        self.welcome = wire.parse_welcome(reply.payload)
        return self.welcome

    def new_pool(self, flags: int = 0, uuid: bytes = bytes(16)) -> int:
        reply = self.call(Op.NEW_POOL, payload=wire.pool_spec_payload(flags, uuid))
        assert reply.status == Status.OK, reply
        return reply.pool

    def put(self, pool: int, key: int, index: int, data: bytes) -> Status:
        return Status(self.call(Op.PUT, pool=pool, oid=oid(key), index=index, payload=data).status)

    def get(self, pool: int, key: int, index: int) -> bytes | None:
        reply = self.call(Op.GET, pool=pool, oid=oid(key), index=index)
        assert reply.status in (Status.OK, Status.NOT_FOUND), reply
        return reply.payload if reply.status == Status.OK else None

    def query_pool(self, pool: int) -> int | None:
        reply = self.call(Op.QUERY_POOL, pool=pool)
        if reply.status == Status.NO_POOL:
            return None
        assert reply.status == Status.OK, reply
        return wire.parse_pool_flags(reply.payload)


@contextlib.contextmanager
def connected(agent: HostAgentProcess, guest: str = "g1") -> Iterator[WireGuest]:
    g = agent.connect(guest)
    try:
        yield g
    finally:
        g.close()


def stats_json(agent: HostAgentProcess) -> dict[str, Any]:
    """`hostagent stats --json` through the CLI, parsed."""
    res = agent.cli("stats", "--json")
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)

