"""The swap device served by a real host agent to QEMU's own NBD client (qemu-io, qemu-utils).

Data integrity, a quota smaller than the data (the excess in the spill file, nothing lost), a
SIGKILLed and restarted agent (every acknowledged page kept, QEMU's client reconnecting), and hostile
bytes on the device's socket (an error or a close; other guests' pages untouched, the agent alive).
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hostagent import nbd
from tests.support.host_agent import HostAgentProcess

QEMU_IO = shutil.which("qemu-io")
MIB = 1 << 20


def swap_toml(root: Path, size_mib: int = 64) -> str:
    return (
        f'[swap]\nenabled = true\nsocket = "{root / "swap.sock"}"\n'
        f'spill_dir = "{root / "spill"}"\nsize_mib = {size_mib}\n'
    )


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[HostAgentProcess]:
    a = HostAgentProcess(tmp_path, tmp_path / "arena", extra_toml=swap_toml(tmp_path))
    a.start()
    yield a
    if a.alive:
        a.stop()


def qemu_io(sock: Path, export: str, *cmds: str, timeout: float = 120) -> str:
    """Run qemu-io commands against the export; its output (it exits 0 even when a read does not
    verify, so callers check the text)."""
    assert QEMU_IO, "qemu-io (Debian qemu-utils) is required: scripts/setup installs it"
    args = [QEMU_IO, "-f", "raw", f"nbd+unix:///{export}?socket={sock}"]
    for c in cmds:
        args += ["-c", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


def verified(out: str) -> bool:
    return "verification failed" not in out.lower() and "error" not in out.lower()


def device_stats(agent: HostAgentProcess, guest: str) -> dict[str, int]:
    dev = agent.stats()["guests"][guest]["swapdev"]
    assert dev is not None
    return dev  # type: ignore[no-any-return]


def writes(n: int, size: str = "256k", step: int = 256 * 1024) -> list[str]:
    return [f"write -P {0x10 + i} {i * step} {size}" for i in range(n)]


def reads(n: int, size: str = "256k", step: int = 256 * 1024) -> list[str]:
    return [f"read -P {0x10 + i} {i * step} {size}" for i in range(n)]


def test_qemu_writes_and_reads_pages_in_the_pool(agent: HostAgentProcess, tmp_path: Path) -> None:
    sock = tmp_path / "swap.sock"
    out = qemu_io(
        sock,
        "g1",
        *writes(16),
        *reads(16),
        "read -P 0 8M 64k",
        "write -P 0x77 100 5000",
        "read -P 0x77 100 5000",
        "read -P 0x10 0 100",
        "read -P 0x10 5100 100",
    )
    assert verified(out), out
    dev = device_stats(agent, "g1")
    assert dev["pool_pages"] == 16 * 64 and dev["storage_pages"] == 0 and dev["refusals"] == 0
    assert dev["puts"] >= 16 * 64 and dev["gets"] >= 16 * 64
    assert (tmp_path / "spill" / "g1.swap").stat().st_blocks == 0
    text = agent.cli("stats").stdout
    assert "swap devices" in text and "g1" in text
    out = qemu_io(sock, "g1", "discard 0 1M", "read -P 0 0 1M", "write -z 1M 1M", "read -P 0 1M 1M")
    assert verified(out), out
    assert device_stats(agent, "g1")["pool_pages"] == 16 * 64 - 512


def qemu_img(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("qemu-img")
    assert tool, "qemu-img (Debian qemu-utils) is required: scripts/setup installs it"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=timeout)


def test_quota_smaller_than_the_data_spills_and_loses_nothing(tmp_path: Path) -> None:
    """4 MiB of random pages (incompressible: raw slots) into a device with a 1 MiB quota."""
    a = HostAgentProcess(
        tmp_path,
        tmp_path / "arena",
        guests=("g1",),
        extra_toml=swap_toml(tmp_path) + "[defaults]\nquota_mib = 1\n",
    )
    a.start()
    try:
        url = f"nbd+unix:///g1?socket={tmp_path / 'swap.sock'}"
        src = tmp_path / "src.raw"
        with src.open("wb") as f:
            f.write(random.Random(1).randbytes(4 * MIB))
            f.truncate(64 * MIB)
        done = qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(src), url)
        assert done.returncode == 0, done.stderr
        dev = device_stats(a, "g1")
        assert 0 < dev["pool_pages"] < 256 and dev["refusals"] > 0
        assert dev["pool_pages"] + dev["storage_pages"] == 1024
        assert (tmp_path / "spill" / "g1.swap").stat().st_blocks * 512 >= dev["storage_pages"] * 4096
        done = qemu_img("compare", "-f", "raw", "-F", "raw", str(src), url)
        assert done.returncode == 0, done.stdout + done.stderr
        moved = a.request("shrink", guest="g1", pages=100)
        assert moved["swapdev_moved"] == 100
        after = device_stats(a, "g1")
        assert after["pool_pages"] == dev["pool_pages"] - 100
        assert after["storage_pages"] == dev["storage_pages"] + 100
        done = qemu_img("compare", "-f", "raw", "-F", "raw", str(src), url)
        assert done.returncode == 0, done.stdout + done.stderr
        with src.open("r+b") as f:  # the check can fail: one byte changed
            f.seek(3 * MIB)
            f.write(b"\x00")
        assert qemu_img("compare", "-f", "raw", "-F", "raw", str(src), url).returncode == 1
    finally:
        a.stop()


def test_sigkill_and_restart_keeps_every_page(agent: HostAgentProcess, tmp_path: Path) -> None:
    sock = tmp_path / "swap.sock"
    assert verified(qemu_io(sock, "g2", *writes(8), "flush"))
    agent.kill()
    agent.start()
    assert verified(qemu_io(sock, "g2", *reads(8)))
    assert device_stats(agent, "g2")["pool_pages"] == 8 * 64


def test_qemu_reconnects_across_an_agent_restart(agent: HostAgentProcess, tmp_path: Path) -> None:
    """One qemu-io process, its NBD client with reconnect-delay: the agent is SIGKILLed between two
    commands and restarted; the next read waits for it and gets every page. (qemu-io takes one
    command per read of its stdin, so each is sent after the previous one's output.)"""
    assert QEMU_IO
    sock = tmp_path / "swap.sock"
    log = tmp_path / "qemu-io.out"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                QEMU_IO,
                "--image-opts",
                f"driver=nbd,server.type=unix,server.path={sock},export=g3,reconnect-delay=30",
            ],
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    assert proc.stdin is not None
    done = 0

    def command(cmd: str, timeout: float = 60) -> None:
        nonlocal done
        assert proc.stdin is not None
        proc.stdin.write(cmd + "\n")
        proc.stdin.flush()
        done += 1
        deadline = time.monotonic() + timeout
        while log.read_text().count("qemu-io> ") < done + 1:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{cmd!r} did not finish:\n{log.read_text()}"
            time.sleep(0.05)

    try:
        for cmd in [*writes(4), "flush"]:
            command(cmd)
        assert device_stats_or_none(agent, "g3") == 4 * 64
        agent.kill()
        time.sleep(1.0)
        killed = time.monotonic()
        threading.Timer(2.0, agent.start).start()  # the read below waits for it
        command(reads(4)[0])
        assert time.monotonic() - killed > 2.0
        for cmd in [*reads(4)[1:], "write -P 0x99 2M 64k", "read -P 0x99 2M 64k"]:
            command(cmd)
        proc.stdin.write("quit\n")
        proc.stdin.close()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert verified(text) and text.count("read 262144/262144") == 4, text
    assert device_stats_or_none(agent, "g3") == 4 * 64 + 16


def device_stats_or_none(agent: HostAgentProcess, guest: str) -> int | None:
    dev = agent.stats()["guests"].get(guest, {}).get("swapdev")
    return None if dev is None else int(dev["pool_pages"])


def raw_connect(sock: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock))
    assert len(recv_exactly(s, 18)) == 18
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def at_eof(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_hostile_bytes_get_errors_or_a_close(agent: HostAgentProcess, tmp_path: Path) -> None:
    sock = tmp_path / "swap.sock"
    assert verified(qemu_io(sock, "g1", *writes(4)))
    before = device_stats(agent, "g1")
    # garbage instead of the client flags
    s = raw_connect(sock)
    s.sendall(b"\xff" * 64)
    assert at_eof(s)
    # an export that is no guest: refused, the handshake goes on
    s = raw_connect(sock)
    name = b"../g1"
    s.sendall(
        struct.pack(">I", 3)
        + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 4 + len(name) + 2)
        + struct.pack(">I", len(name))
        + name
        + b"\0\0"
    )
    magic, _, kind, length = struct.unpack(">QIII", recv_exactly(s, 20))
    assert magic == nbd.REPLY_MAGIC and kind == nbd.REP_ERR_UNKNOWN
    recv_exactly(s, length)
    # g2's own device: requests out of range and a write into it beyond its end
    name = b"g2"
    s.sendall(
        struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, 4 + len(name) + 2)
        + struct.pack(">I", len(name))
        + name
        + b"\0\0"
    )
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exactly(s, 20))
        recv_exactly(s, length)
        if kind == nbd.REP_ACK:
            break
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 64 * MIB, 4096) + b"\xee" * 4096)
    assert struct.unpack(">IIQ", recv_exactly(s, 16)) == (nbd.SIMPLE_REPLY_MAGIC, nbd.ENOSPC, 1)
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, 77, 2, 0, 0))
    assert struct.unpack(">IIQ", recv_exactly(s, 16)) == (nbd.SIMPLE_REPLY_MAGIC, nbd.EINVAL, 2)
    s.sendall(struct.pack(">IHHQQI", 0xBAD, 0, nbd.CMD_READ, 3, 0, 4096))
    assert at_eof(s)
    # a write longer than the limit: closed before its payload is read
    s = raw_connect(sock)
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 2) + b"g2")
    recv_exactly(s, 10)
    s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 4, 0, 1 << 31))
    assert at_eof(s)
    assert agent.alive
    assert device_stats(agent, "g1") == before
    assert verified(qemu_io(sock, "g1", *reads(4)))
    assert "connection closed" in agent.log()
