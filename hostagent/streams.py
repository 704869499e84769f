"""asyncio stream-server handlers that may be cancelled at shutdown without a logged traceback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def cancellable(handler: Handler) -> Handler:
    """Wrap a `start_server` client handler so that cancelling it ends it quietly.

    Python 3.11's stream server calls `task.exception()` on a finished handler task, which raises
    (and is logged as an error with a traceback) when the task was cancelled, as every open
    connection's handler is when the agent stops (fixed in 3.12). The wrapper closes the
    connection and returns instead.
    """

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:
            writer.close()

    return serve
