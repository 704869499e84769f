"""The local control socket: one JSON object per line in, one per line out.

A unix socket (mode 0600) rather than a TCP port: only root on the host may steer the pool. The
server side is an asyncio stream server that hands each decoded request to a handler owned by the
agent; the client side is a blocking function for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from guestagent.protocol import jsonline
from hostagent import streams

log = logging.getLogger("hostagent.control")

# A request line longer than this is refused (the control protocol's requests are tiny).
MAX_LINE = 64 << 10

Handler = Callable[[Mapping[str, Any]], Any]


ControlError = jsonline.ControlError
is_listening = jsonline.is_listening


class AgentNotRunning(jsonline.NotRunning):
    """No host agent answers on the control socket."""


class ControlServer:
    """Serve `handler` on a unix socket; it returns a JSON-able result or raises ControlError."""

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; the path must be free (the agent removes a stale socket file first)."""
        self._server = await asyncio.start_unix_server(
            streams.cancellable(self._serve), path=self.path, limit=MAX_LINE
        )
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # over MAX_LINE
                    writer.write(_line({"ok": False, "error": "request too long"}))
                    break
                if not line:
                    break
                # the handler may return an awaitable: `reserve` waits for balloons
                writer.write(_line(await jsonline.answer(line, self.handler, log)))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def request(path: str, req: Mapping[str, Any], timeout: float = 10.0) -> Any:
    """Send one request to the agent at `path`; return its result or raise ControlError."""
    return jsonline.request(path, req, peer="host agent", timeout=timeout, not_running=AgentNotRunning)


_line = jsonline.encode_line
