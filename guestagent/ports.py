"""The guest's end of the tmem virtio-serial port: find it, and wait for its host side.

QEMU exposes a `virtserialport` with `name=org.tmem.0` to the guest as a character device
/dev/vportNpM; the name is only in sysfs (/sys/class/virtio-ports/vportNpM/name).  udev
usually adds a /dev/virtio-ports/NAME symlink, but a guest without udev rules (or an
initramfs) has only the device node, so the port is found through sysfs first.

A port differs from a unix socket in one way that matters to a client: it exists, and opens,
whether or not anything is connected on the host side (QEMU's chardev socket and, behind it,
the host agent).  Linux's virtio_console driver reports the host side's state only through
poll: while the host is not connected, poll() returns POLLHUP (with POLLIN; read() returns 0,
as at EOF) and a write blocks, or fails with EAGAIN on a non-blocking fd, never with EPIPE.
The state changes on a VIRTIO_CONSOLE_PORT_OPEN control message from QEMU.  So after opening
the port the client waits here until POLLHUP clears, instead of sending a handshake that can
go nowhere or spinning on reads that return 0.
"""

from __future__ import annotations

import logging
import os
import select
from typing import Final

import trio

__all__ = [
    "BY_NAME_DIR",
    "DEFAULT_PORT_NAME",
    "SYSFS_PORTS_DIR",
    "PortNotFound",
    "find_port",
    "host_connected",
    "wait_host_connected",
]

log = logging.getLogger(__name__)

DEFAULT_PORT_NAME: Final = "org.tmem.0"
SYSFS_PORTS_DIR: Final = "/sys/class/virtio-ports"
BY_NAME_DIR: Final = "/dev/virtio-ports"
HOST_POLL_INTERVAL: Final = 0.2  # seconds between looks at the host side while it is away


class PortNotFound(LookupError):
    """No virtio-serial port of that name (yet): the VM may lack it, or it is being hot-plugged."""


def find_port(
    name: str = DEFAULT_PORT_NAME,
    *,
    sysfs_dir: str = SYSFS_PORTS_DIR,
    dev_dir: str = "/dev",
    by_name_dir: str = BY_NAME_DIR,
) -> str:
    """The device path (/dev/vportNpM) of the virtio-serial port called `name`.

    sysfs is the authority (every port lists its name there, udev or not); the udev symlink
    /dev/virtio-ports/NAME is the fallback when sysfs is not mounted.  The directories are
    parameters so that tests can build a fake tree.
    """
    if not name or "/" in name:
        raise ValueError(f"bad virtio-serial port name {name!r}")
    try:
        entries = sorted(os.listdir(sysfs_dir))
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(sysfs_dir, entry, "name"), encoding="utf-8", errors="replace") as f:
                found = f.read().strip()
        except OSError:  # a port being removed, or an entry without a name
            continue
        if found != name:
            continue
        device = os.path.join(dev_dir, entry)
        if os.path.exists(device):
            return device
        # devtmpfs creates the node with the port: missing means "not yet" (hot-plug) or no devtmpfs
        raise PortNotFound(f"virtio-serial port {name!r} is {entry} in {sysfs_dir}, but {device} is missing")
    link = os.path.join(by_name_dir, name)
    if os.path.exists(link):
        return os.path.realpath(link)
    raise PortNotFound(
        f"no virtio-serial port named {name!r} (looked in {sysfs_dir}/*/name and {link}); "
        f"the VM needs a virtserialport with name={name}"
    )


def host_connected(fd: int) -> bool:
    """True unless poll() reports POLLHUP on the port, i.e. nothing is connected on the host."""
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLOUT)
    return not any(revents & select.POLLHUP for _, revents in poller.poll(0))


async def wait_host_connected(fd: int, interval: float = HOST_POLL_INTERVAL, label: str = "") -> None:
    """Return once the host side of the port `fd` is connected; checks every `interval` s.

    A sleep loop, because nothing better is on offer: while the host is away poll() returns
    POLLHUP at once (level-triggered, and epoll reports HUP whatever was asked for), so
    waiting for readability would spin.  Five looks a second cost nothing and bound the
    added reconnect latency to `interval`.
    """
    if host_connected(fd):
        await trio.lowlevel.checkpoint()
        return
    log.info("waiting for the host side of %s to connect", label or f"fd {fd}")
    while not host_connected(fd):
        await trio.sleep(interval)
    log.info("host side of %s connected", label or f"fd {fd}")
