"""The preswap socket protocol, both ends: an application (or a tool) and the guest agent.

One JSON object per line over a local unix socket; a `region` request carries the region's
memfd and userfaultfd with it (SCM_RIGHTS), and its connection then stays open for the region's
lifetime.  Requests: `region` (size, addr, budget), `stats`, and, for root or the agent's own
user only, `shrink` (pages) and `budget` (pages or null).  Every reply is `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`.  The application's end is blocking (plain sockets, no event
loop of its own); the agent's is trio.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any, Final

import trio

__all__ = [
    "DEFAULT_SOCKET",
    "PREFIX_MAX",
    "PreswapError",
    "privileged",
    "read_reply",
    "read_request",
    "reply",
    "send_request",
]

DEFAULT_SOCKET: Final = "/run/tmem/preswap.sock"
PREFIX_MAX: Final = 65536  # longest request line


class PreswapError(Exception):
    """The agent refused the region, or is not reachable."""


# --------------------------------------------------------------------------- the application's end


def send_request(sock: socket.socket, request: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one request line, with `fds` (a region's memfd and uffd) if any."""
    line = (json.dumps(request) + "\n").encode()
    if fds:
        socket.send_fds(sock, [line], list(fds))
    else:
        sock.sendall(line)


def read_reply(sock: socket.socket) -> dict[str, Any]:
    """The agent's reply line; PreswapError if it refused or went away."""
    buf = b""
    while b"\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise PreswapError("the guest agent closed the preswap socket")
        buf += data
    answer = json.loads(buf.split(b"\n", 1)[0])
    if not isinstance(answer, dict):
        raise PreswapError(f"unexpected reply {answer!r}")
    if not answer.get("ok"):
        raise PreswapError(str(answer.get("error")))
    return answer


# --------------------------------------------------------------------------- the agent's end


async def read_request(conn: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """One JSON line and the fds that came with it (SCM_RIGHTS)."""
    buf = b""
    fds: list[int] = []
    space = socket.CMSG_SPACE(8 * 4)
    while b"\n" not in buf:
        data, ancdata, _, _ = await conn.recvmsg(PREFIX_MAX, space)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(int.from_bytes(payload[i : i + 4], sys.byteorder) for i in range(0, usable, 4))
        if not data:
            for fd in fds:
                os.close(fd)
            raise ValueError("connection closed before a request")
        buf += data
        if len(buf) > PREFIX_MAX:
            for fd in fds:
                os.close(fd)
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0], fds


async def reply(conn: trio.socket.SocketType, obj: dict[str, Any]) -> None:
    """Send one JSON line."""
    data = (json.dumps(obj) + "\n").encode()
    while data:
        sent = await conn.send(data)
        data = data[sent:]


def privileged(conn: trio.socket.SocketType) -> bool:
    """The peer is root or runs as we do (SO_PEERCRED): allowed to steer other regions."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (0, os.getuid())
