"""The /metrics endpoint: a minimal HTTP/1.x server on the host agent's own asyncio loop.

prometheus_client's own servers run in a thread, and the engine may only be touched from the loop;
so this server reads one request per connection on the loop and takes a stats snapshot there (the
same call the `stats` control command makes). Rendering the text is the slow part (about 70 ms for
200 guests here, most of it prometheus_client's generate_latest), so it runs in a worker thread on
that snapshot, a plain dict nobody else holds, one scrape at a time: the loop keeps serving
channels meanwhile. A request is bounded in size and time, so a slow or hostile client costs a
connection, never the loop; any failure is a 500 for that scrape and a log line, never an exception
in the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from hostagent import metrics, streams

log = logging.getLogger("hostagent.metrics")

MAX_REQUEST = 8192  # bytes of request line and headers
REQUEST_TIMEOUT = 10.0
# What metrics.render() writes (prometheus_client's CONTENT_TYPE_LATEST moved on to 1.0.0 in 0.22).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

StatsSource = Callable[[], Mapping[str, Any]]


class MetricsServer:
    """Serve GET /metrics from `source()` on (address, port); port 0 picks a free one."""

    def __init__(self, address: str, port: int, source: StatsSource) -> None:
        self.address = address
        self.port = port
        self.source = source
        self._server: asyncio.AbstractServer | None = None
        self._render = asyncio.Lock()  # one render at a time: scrapes cannot pile up CPU
        self.scrapes = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            streams.cancellable(self._serve), self.address, self.port, limit=MAX_REQUEST, reuse_address=True
        )
        sock = self._server.sockets[0]
        self.port = int(sock.getsockname()[1])
        log.info("metrics: serving http://%s/metrics", self.url_host())

    def url_host(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT)
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ValueError,
        ):
            status, ctype, body = "400 Bad Request", "text/plain", b"bad request\n"
        try:
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            writer.write(head + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/metrics", "/"):
            return "404 Not Found", "text/plain", b"not found: try /metrics\n"
        if method != "GET":
            return "405 Method Not Allowed", "text/plain", b"GET only\n"
        if target == "/":
            return "200 OK", "text/html", b'<a href="/metrics">/metrics</a>\n'
        try:
            async with self._render:
                snapshot = self.source()  # on the loop: the engine's figures at one moment
                body = await asyncio.to_thread(metrics.render, snapshot)
        except Exception:
            log.exception("metrics: rendering failed")
            return "500 Internal Server Error", "text/plain", b"internal error\n"
        self.scrapes += 1
        return "200 OK", CONTENT_TYPE, body
