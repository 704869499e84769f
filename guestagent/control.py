"""The guest daemon's local control socket: one JSON object per line in, one per line out.

Only one process can open a virtio-serial port, and the daemon holds it; everything else in
the guest that wants tmem, and every test run inside a VM through qemu-guest-agent, asks the
daemon here.  A unix socket with mode 0600: only root in the guest may use the channel.
The server is trio (it runs in the daemon's loop); the client is a blocking function for
the CLI.  Replies are `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import trio

from guestagent.protocol import jsonline

__all__ = ["ControlError", "DaemonNotRunning", "is_listening", "request", "serve"]

log = logging.getLogger(__name__)

MAX_LINE: Final = 64 << 10  # requests are tiny; a longer line is refused

Handler = Callable[[Mapping[str, Any]], Awaitable[Any]]


ControlError = jsonline.ControlError
is_listening = jsonline.is_listening


class DaemonNotRunning(jsonline.NotRunning):
    """Nothing answers on the control socket."""


async def serve(
    path: str, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `path` (mode 0600) and answer each request line with `handler`'s result.

    A stale socket file from a killed daemon is replaced, a live one is not: two daemons
    would fight over the port.  The socket file is removed when serving stops.
    """
    if is_listening(path):
        raise ControlError(f"another guest agent is already serving {path}")
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no window in which others could connect
    try:
        await sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        task_status.started()

        async def serve_one(stream: trio.SocketStream) -> None:
            await _serve_connection(stream, handler)

        await trio.serve_listeners(serve_one, [listener])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await listener.aclose()


async def _serve_connection(stream: trio.SocketStream, handler: Handler) -> None:
    buf = bytearray()
    try:
        async with stream:
            while True:
                while b"\n" not in buf:
                    if len(buf) > MAX_LINE:
                        await stream.send_all(_line({"ok": False, "error": "request too long"}))
                        return
                    data = await stream.receive_some(MAX_LINE)
                    if not data:
                        return
                    buf += data
                line, _, rest = bytes(buf).partition(b"\n")
                buf = bytearray(rest)
                await stream.send_all(_line(await jsonline.answer(line, handler, log)))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def request(path: str, req: Mapping[str, Any], timeout: float = 30.0) -> Any:
    """Send one request to the daemon at `path`; its result, or ControlError with the reason."""
    return jsonline.request(path, req, peer="guest agent", timeout=timeout, not_running=DaemonNotRunning)


_line = jsonline.encode_line
