"""The guest channel's transport: which device or socket a spec names, opening it as a bare
non-blocking fd, and cutting the send queue into writes that suit it."""

from __future__ import annotations

import os
import select
import socket
from typing import Final

import trio

__all__ = [
    "IOV_MAX",
    "PORT_WRITE",
    "VIRTIO_PORTS_DIR",
    "close_fd",
    "open_transport",
    "resolve_channel_path",
    "take_batch",
    "unwritten",
]

VIRTIO_PORTS_DIR: Final = "/dev/virtio-ports"
IOV_MAX: Final = 1024  # buffers per writev (Linux UIO_MAXIOV)
# virtio_console has no write_iter: a writev is one write, one virtqueue buffer and one kick to
# QEMU per buffer, and a write takes at most 32 KiB.  On a port, queued parts are joined into
# writes of up to this size instead.
PORT_WRITE: Final = 32 << 10


def resolve_channel_path(spec: str) -> tuple[str, str]:
    """Map a channel spec to (transport, path).

    A bare name is a virtio-serial port (what QEMU's `name=` property exposes in the guest,
    via udev's /dev/virtio-ports/NAME link); a path under /dev/ is a port's device node
    (/dev/vportNpM, for guests without that link); any other path is a unix socket, which
    is how the tests and host-side tools reach the host agent.
    """
    if not spec:
        raise ValueError("empty channel spec")
    if "/" not in spec:
        return "virtio", f"{VIRTIO_PORTS_DIR}/{spec}"
    if spec.startswith("/dev/"):
        return "virtio", spec
    return "unix", spec


async def open_transport(kind: str, path: str) -> int:
    """A non-blocking, close-on-exec fd for the channel, which we own from here on.

    Both transports end up as a bare fd driven with trio.lowlevel.wait_readable/wait_writable
    and os.readv/os.writev: the stream wrappers add two scheduler passes per receive and a
    copy per send, which a page fault's round trip cannot afford.
    """
    if kind == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock.detach()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    # A port opens whether or not its host side is connected; while it is not, poll says
    # POLLHUP (reads return 0, writes block).  Count that as "host agent not reachable", so
    # the reconnect loop backs off instead of sending a HELLO that can go nowhere.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if any(events & select.POLLHUP for _, events in poller.poll(0)):
        os.close(fd)
        raise ConnectionRefusedError(f"the host side of {path} is not connected")
    return fd


def close_fd(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


def unwritten(parts: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """What is left of `parts` after a write that took only `n` bytes of them."""
    for i, part in enumerate(parts):
        if n < len(part):
            return [memoryview(part)[n:], *parts[i + 1 :]]
        n -= len(part)
    return []


def take_batch(q: list[bytes | memoryview], join: bool) -> list[bytes | memoryview]:
    """Take the next write's parts off the front of `q`: up to IOV_MAX buffers for writev on
    a socket; on a virtio port, whose writev costs a round to QEMU per buffer, parts joined
    into one write of at most PORT_WRITE bytes."""
    if not join:
        parts = q[:IOV_MAX]
        del q[: len(parts)]
        return parts
    size = count = 0
    for part in q:
        if count and size + len(part) > PORT_WRITE:
            break
        size += len(part)
        count += 1
    parts = q[:count]
    del q[:count]
    return [b"".join(parts)] if count > 1 else parts
