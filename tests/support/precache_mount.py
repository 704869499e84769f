"""A precache mount as a real process (`python -m guestagent.precache`) and the fixture that makes them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.wait import wait_until
from tests.support.host_agent import HostAgentProcess
from tests.support.process import read_log, reap

PAGE = 4096
STATS = "user.tmem.precache.stats"
MOUNT_TIMEOUT = 15.0


class PrecacheMount:
    """One `python -m guestagent.precache` process and its mount point."""

    def __init__(
        self, backing: Path, mountpoint: Path, channel: str, log: Path, allow_other: bool = False
    ) -> None:
        self.allow_other = allow_other
        self.backing = backing
        self.mountpoint = mountpoint
        self.channel = channel
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, connected: bool = True) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "guestagent.precache",
                    str(self.backing),
                    str(self.mountpoint),
                    "--channel",
                    self.channel,
                    "--log-level",
                    "INFO",
                    *(["--allow-other"] if self.allow_other else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

        def mounted() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"precache exited with {self.proc.returncode}:\n{self.log()}")
            return os.path.ismount(self.mountpoint) and (not connected or bool(self.stats()["connected"]))

        try:
            wait_until(mounted, MOUNT_TIMEOUT, "the precache mount")
        except TimeoutError as err:
            raise AssertionError(f"{err}:\n{self.log()}") from None

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(os.getxattr(self.mountpoint, STATS))
        return result

    def evict(self) -> None:
        """Make the kernel drop its cached pages of the mount's files (memory pressure on demand)."""
        os.setxattr(self.mountpoint, "user.tmem.precache.evict", b"1")

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self) -> None:
        """SIGTERM (it unmounts); whatever happens, nothing stays mounted."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
        finally:
            if os.path.ismount(self.mountpoint):
                subprocess.run(["fusermount3", "-u", str(self.mountpoint)], check=False, capture_output=True)
            if os.path.ismount(self.mountpoint):
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False, capture_output=True)


@pytest.fixture
def precache(
    host_agent: HostAgentProcess, request: pytest.FixtureRequest
) -> Iterator[Callable[..., PrecacheMount]]:
    """A factory: precache(populate=None) mounts a fresh backing dir as guest g1 (or `guest`: the host
    agent keeps one channel a guest, so mounts in use at once need a guest each).

    `tmpfs=True` puts the backing dir on /dev/shm: for tests whose subject is the shim, not the
    disk (an fsync on the ext4 /tmp here costs more than the shim's own work)."""
    work = Path(tempfile.mkdtemp(prefix="tmem-pc", dir="/tmp"))
    shm = Path(tempfile.mkdtemp(prefix="tmem-pc", dir="/dev/shm"))
    mounts: list[PrecacheMount] = []

    def make(
        populate: Callable[[Path], None] | None = None,
        allow_other: bool = False,
        tmpfs: bool = False,
        guest: str = "g1",
    ) -> PrecacheMount:
        n = len(mounts)
        backing, mountpoint = (shm if tmpfs else work) / f"backing{n}", work / f"mnt{n}"
        backing.mkdir()
        mountpoint.mkdir()
        if populate is not None:
            populate(backing)
        m = PrecacheMount(
            backing, mountpoint, host_agent.sockets[guest], work / f"precache{n}.log", allow_other
        )
        mounts.append(m)
        m.start()
        return m

    try:
        yield make
    finally:
        for m in mounts:
            m.stop()
        for m in mounts:
            reap(request, m, "precache")
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)


def pool_pages(agent: HostAgentProcess) -> int:
    """Pages in g1's ephemeral pools on the host (the mount's pool is g1's only pool)."""
    pools: list[dict[str, Any]] = agent.request("pools")
    return sum(p["pages"] for p in pools if p["owner"] == "g1" and p["kind"].endswith("ephemeral"))


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()
