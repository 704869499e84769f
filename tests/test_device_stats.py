"""A guest learns its own swap device's counters over its channel (DEVICE_STATS), and only its own.

Real host agents (this tree's, and the one from before the request existed, run from git), QEMU's NBD
client writing to the devices, the guest agent's channel client and its daemon.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import trio

from guestagent.channel import open_channel
from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, Status
from tests.support.guest_daemon import GuestDaemon
from tests.support.host_agent import START_TIMEOUT, HostAgentProcess
from tests.support.process import reap, wait_serving
from tests.support.wire_guest import WireGuest
from tests.test_swapdev_nbd import device_stats, qemu_io, swap_toml, verified, writes

# The host agent just before DEVICE_STATS (main at the branch point of issue 17's counters).
OLD_HOST_COMMIT = "3ddf1fb2c79d6a64657735798f65ffbcd5b2e32b"
REPO = Path(__file__).resolve().parent.parent


async def channel_counters(socket: str) -> tuple[bool, dict[str, int] | None]:
    async with open_channel(socket, name="t", reconnect=False) as ch:
        return ch.granted(wire.Feature.DEVICE_STATS), await ch.device_stats()


def host_counters(agent: HostAgentProcess, guest: str) -> dict[str, int]:
    figures = dict(device_stats(agent, guest))
    del figures["spill_file"]
    return figures


def test_each_guest_gets_its_own_device_counters_only(tmp_path: Path) -> None:
    agent = HostAgentProcess(tmp_path, tmp_path / "arena", extra_toml=swap_toml(tmp_path))
    agent.start()
    try:
        sock = tmp_path / "swap.sock"
        assert verified(qemu_io(sock, "g1", *writes(8)))  # 512 pages into g1's device
        granted, g1 = trio.run(channel_counters, agent.sockets["g1"])
        assert granted and g1 is not None
        assert g1 == host_counters(agent, "g1")
        assert g1["pool_pages"] == 512 and g1["puts"] >= 512 and g1["refusals"] == 0
        # g2 has no device yet: g1's exists, but g2 is never told of it
        assert trio.run(channel_counters, agent.sockets["g2"]) == (True, None)
        assert verified(qemu_io(sock, "g2", *writes(1)))
        _, g2 = trio.run(channel_counters, agent.sockets["g2"])
        assert g2 == host_counters(agent, "g2") and g2 is not None and g2["pool_pages"] == 64
        # whatever the frame says (another pool, a guest's name in the oid), the socket decides
        with WireGuest(agent.sockets["g2"]) as raw:
            raw.hello("g1")
            reply = raw.call(Op.DEVICE_STATS, pool=0xFFFF_FFFF, oid=b"g1".ljust(24, b"\0"), index=1)
            assert reply.status == Status.OK and wire.parse_stats(reply.payload)["pool_pages"] == 64
        # a guest from before features offers none and gets the 0 its parser requires
        with WireGuest(agent.sockets["g3"]) as old:
            assert old.hello().features == 0
    finally:
        agent.stop()


def test_guestagent_stats_shows_the_hosts_counters(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    agent = HostAgentProcess(tmp_path, tmp_path / "arena", extra_toml=swap_toml(tmp_path))
    agent.start()
    daemon = GuestDaemon(tmp_path, agent.sockets["g1"])
    try:
        daemon.start()
        assert verified(qemu_io(tmp_path / "swap.sock", "g1", *writes(4)))
        dev = daemon.stats()["swap_device"]
        assert dev["host"] == host_counters(agent, "g1") and dev["host"]["pool_pages"] == 256
        assert dev["host_error"] is None
        assert dev["guest"] is None  # this machine has no /dev/disk/by-id/virtio-tmem-swap
        assert daemon.stats()["generation"] == 1
    finally:
        daemon.stop()
        reap(request, daemon, "guestagent")
        agent.stop()


class OldHostAgent(HostAgentProcess):
    """The host agent at OLD_HOST_COMMIT, run from its sources (`git archive`) in `tree`."""

    def __init__(self, tree: Path, workdir: Path) -> None:
        super().__init__(workdir, workdir / "arena", extra_toml=swap_toml(workdir))
        self.tree = tree

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hostagent", "run", "--config", str(self.config_path)],
                cwd=self.tree,  # its packages, not this tree's (python -m puts the cwd first)
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        wait_serving(self, self.control, START_TIMEOUT, "old hostagent")


def old_host_tree(dest: Path) -> Path:
    git = shutil.which("git")
    assert git is not None and (REPO / ".git").exists(), "this test needs the project's git history"
    archive = subprocess.run(
        [git, "-C", str(REPO), "archive", OLD_HOST_COMMIT, "hostagent", "guestagent"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_an_older_host_is_never_sent_the_request(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """The old host would take the unknown opcode for a broken guest and close the channel (shown
    below with a raw guest); the guest agent, told nothing in the old host's HELLO reply, never
    sends it, says why in `guestagent stats`, and keeps its one session."""
    work = tmp_path / "w"
    work.mkdir()
    agent = OldHostAgent(old_host_tree(tmp_path / "old"), work)
    agent.start()
    daemon = GuestDaemon(work, agent.sockets["g1"])
    try:
        assert verified(qemu_io(work / "swap.sock", "g1", *writes(2)))  # it has a device, all the same
        daemon.start()
        dev = daemon.stats()["swap_device"]
        assert dev["host"] is None and "older version" in dev["host_error"]
        assert daemon.request("check")["ok"]
        stats = daemon.stats()
        assert stats["connected"] and stats["generation"] == 1 and stats["channel_failures"] == 0
        assert trio.run(channel_counters, agent.sockets["g2"]) == (False, None)
        assert "unknown opcode" not in agent.log()
        with WireGuest(agent.sockets["g3"]) as raw:  # what sending it anyway would cost
            raw.hello()
            raw.send(Frame(Op.DEVICE_STATS, request_id=5))
            assert "unknown opcode 15" in raw.expect_error().payload.decode()
    finally:
        daemon.stop()
        reap(request, daemon, "guestagent")
        agent.stop()
