"""systemd's readiness protocol (sd_notify), spoken by hand: one datagram to $NOTIFY_SOCKET.

The unit is `Type=notify`, so systemd considers the agent started only once it says READY=1 (after
its sockets listen), shows its STATUS= line in `systemctl status`, and knows a stop is under way
(STOPPING=1). The protocol is a single AF_UNIX datagram of newline-separated KEY=VALUE lines; an
address starting with '@' is in the abstract namespace. Without $NOTIFY_SOCKET (not under systemd,
as in the lab) every call is a no-op, and a failed send is logged, never fatal: readiness reporting
must not take the pool down.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("hostagent.sdnotify")

ENV = "NOTIFY_SOCKET"


def address(value: str) -> str | bytes | None:
    """The socket address $NOTIFY_SOCKET names: a path, an abstract name (b'\\0...'), or None."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock (vsock:CID:PORT) and relative paths are not supported here


def message(**fields: str | int) -> bytes:
    """`message(READY=1, STATUS="x")` -> b"READY=1\\nSTATUS=x"; newlines in a value are flattened."""
    return "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items()).encode()


def notify(**fields: str | int) -> bool:
    """Send one notification to the service manager; False if there is none or the send failed."""
    addr = address(os.environ.get(ENV, ""))
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message(**fields), addr)
    except OSError as err:
        log.warning("sd_notify to %s failed: %s", os.environ.get(ENV), err)
        return False
    return True
