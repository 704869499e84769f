"""The agents' control sockets: one JSON object per line over a unix socket.

Both agents answer `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}` to each request
line (`answer`); their CLIs ask with `request`. Stdlib only, so the host agent shares it without
trio.
"""

from __future__ import annotations

import errno
import inspect
import json
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, Final

MAX_REPLY: Final = 64 << 20  # stats of many guests stay far below it


class ControlError(Exception):
    """A request the agent refused, or could not be asked: the message is for the user."""


class NotRunning(ControlError):
    """Nothing answers on the control socket."""


def is_listening(path: str) -> bool:
    """True if something accepts connections on the unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


async def answer(
    line: bytes, handler: Callable[[Mapping[str, Any]], Any], log: logging.Logger
) -> dict[str, Any]:
    """The reply to one request line: `handler`'s result (awaited if it is awaitable: the guest's
    handlers are trio coroutines, some of the host's asyncio ones), or the error. ControlError's
    message is for the user; any other exception is logged with its traceback and reported."""
    try:
        req = json.loads(line)
    except ValueError:
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(req, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    try:
        result = handler(req)
        if inspect.isawaitable(result):
            result = await result
        return {"ok": True, "result": result}
    except ControlError as err:
        return {"ok": False, "error": str(err)}
    except Exception as err:
        log.exception("control request %r failed", req.get("cmd"))
        return {"ok": False, "error": f"internal error: {type(err).__name__}: {err}"}


def encode_line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def request(
    path: str,
    req: Mapping[str, Any],
    *,
    peer: str,
    timeout: float,
    not_running: type[NotRunning] = NotRunning,
) -> Any:
    """Send one request to the `peer` ("host agent", "guest agent") at `path`; return its result.

    Raises `not_running` when nothing listens there, ControlError with the reason otherwise.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ECONNREFUSED):
                raise not_running(f"{peer} not running at {path}") from None
            raise ControlError(f"cannot reach the {peer} at {path}: {err.strerror or err}") from None
        try:
            s.sendall(encode_line(req))
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    raise ControlError(f"the {peer} at {path} closed the connection")
                buf += chunk
                if len(buf) > MAX_REPLY:
                    raise ControlError(f"reply from the {peer} at {path} is too long")
        except TimeoutError:
            raise ControlError(f"no answer from the {peer} at {path} in {timeout:g} s") from None
        except OSError as err:
            raise ControlError(f"talking to the {peer} at {path}: {err.strerror or err}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"the {peer} at {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ControlError(f"the {peer} at {path} sent a malformed reply")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "request failed")))
    return reply.get("result")
