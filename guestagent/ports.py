"""The guest's end of the tmem virtio-serial port: find its device node by name.

QEMU exposes a `virtserialport` with `name=org.tmem.0` to the guest as a character device
/dev/vportNpM; the name is only in sysfs (/sys/class/virtio-ports/vportNpM/name).  udev
usually adds a /dev/virtio-ports/NAME symlink, but a guest without udev rules (or an
initramfs) has only the device node, so the port is found through sysfs first.

A port also differs from a unix socket in that it opens whether or not anything is connected
on the host side (QEMU's chardev socket and, behind it, the host agent): Linux's
virtio_console driver then reports POLLHUP, read() returns 0 and writes block (EAGAIN when
non-blocking, never EPIPE).  The channel client treats that as "host agent not reachable"
and retries; this module only finds the device.
"""

from __future__ import annotations

import os
from typing import Final

from guestagent.protocol.wire import PORT_NAME

__all__ = [
    "BY_NAME_DIR",
    "SYSFS_PORTS_DIR",
    "PortNotFound",
    "find_port",
]

SYSFS_PORTS_DIR: Final = "/sys/class/virtio-ports"
BY_NAME_DIR: Final = "/dev/virtio-ports"


class PortNotFound(LookupError):
    """No virtio-serial port of that name (yet): the VM may lack it, or it is being hot-plugged."""


def find_port(
    name: str = PORT_NAME,
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
