"""Requests awaiting their replies, and what a reply means to the caller.

A `Request` is what the channel keeps per request id until the reply comes (with its bytes,
for a re-send after a reconnect) and what its parked caller is resumed with; `PendingPut` and
`PendingGet` are the awaitable ones a pipelining task holds.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, cast

from trio.lowlevel import Abort, Task, current_task, reschedule, wait_task_rescheduled

from guestagent.channel.errors import ChannelError
from guestagent.protocol import wire
from guestagent.protocol.headers import NO_SPACE, NOT_FOUND, OK

if TYPE_CHECKING:
    from guestagent.channel.handle import PoolHandle

__all__ = [
    "PendingGet",
    "PendingPut",
    "Request",
    "complete",
    "failed",
    "get_answer",
    "put_answer",
    "status_name",
]


def status_name(status: int) -> str:
    try:
        return wire.Status(status).name
    except ValueError:
        return str(status)


class Request:
    """One request awaiting its reply; kept (with its bytes) until answered or given up.

    It doubles as the outcome its parked caller is resumed with: trio hands the value given
    to `reschedule` back to `wait_task_rescheduled`, which returns `value.unwrap()`.  Passing
    the request itself saves allocating an `outcome.Value` for every reply.
    """

    __slots__ = (
        "body",
        "done",
        "error",
        "frame",
        "head",
        "pending",
        "pool",
        "rid",
        "strikes",
        "task",
    )

    def __init__(
        self, rid: int, head: bytes, body: bytes, pool: PoolHandle | None, pending: dict[int, Request]
    ) -> None:
        self.rid = rid
        self.head = head
        self.body = body
        self.pool = pool  # None for the channel's own requests (handshake, NEW_POOL)
        self.pending = pending
        self.task: Task | None = None
        self.done = False
        self.frame: wire.Frame | None = None  # the reply; None = dropped by a break
        self.error: ChannelError | None = None
        self.strikes = 0

    def unwrap(self) -> wire.Frame | None:
        """The reply, or raise what the request failed with (the outcome protocol)."""
        if self.error is not None:
            raise self.error
        return self.frame

    def abort(self, _: Any) -> Abort:
        """Cancelled while waiting: forget the request, so a late reply is ignored."""
        self.task = None
        self.pending.pop(self.rid, None)
        return Abort.SUCCEEDED

    def _parked(self) -> Generator[Any, Any, None]:
        """Park the awaiting task until the reply (or failure) is in, unless it already is, or
        comes in while the caller reads replies in its own step (`Channel._catch_up`)."""
        if not self.done:
            pool = self.pool
            if pool is not None:
                pool._ch._catch_up(self)
                if self.done:
                    return
            self.task = current_task()
            yield from wait_task_rescheduled(self.abort).__await__()

    def _reply(self) -> wire.Frame | None:
        """The reply of a `done` request (`Pending*.result`); `unwrap`, inline."""
        if not self.done:
            raise RuntimeError("the request has no reply yet: await it")
        if self.error is not None:
            raise self.error
        return self.frame


class PendingPut(Request):
    """A put sent by `PoolHandle.start_put`: `await` it for what `PoolHandle.put` returns.

    Any number may be in flight from one task (requests pipeline by id), and a reply that
    arrives before the await wakes no task at all.  Once `done`, `result()` gives the same
    answer without an await (a windowed loop's common case, at a third of the cost).
    """

    __slots__ = ()

    def result(self) -> bool:
        """The answer of a `done` put; raises what it failed with."""
        return put_answer(self._reply())

    def __await__(self) -> Generator[Any, Any, bool]:
        yield from self._parked()
        return self.result()


class PendingGet(Request):
    """A get sent by `PoolHandle.start_get`: `await` it (or, once `done`, call `result()`) for
    what `PoolHandle.get` returns."""

    __slots__ = ()

    def result(self) -> bytes | None:
        """The answer of a `done` get; raises what it failed with."""
        return get_answer(self._reply())

    def __await__(self) -> Generator[Any, Any, bytes | None]:
        yield from self._parked()
        return self.result()


def failed(frame: wire.Frame) -> ChannelError:
    return ChannelError(
        f"{wire.Op(frame.opcode).name} on pool {frame.pool} failed: {status_name(frame.status)}"
    )


def put_answer(frame: wire.Frame | None) -> bool:
    """What a put's reply means: stored, refused (or dropped), or an error."""
    if frame is None:
        return False
    status = frame.status
    if status == OK:
        return True
    if status == NO_SPACE:
        return False
    raise failed(frame)


def get_answer(frame: wire.Frame | None) -> bytes | None:
    """What a get's reply means: the page, a miss (or dropped), or an error."""
    if frame is None:
        return None
    status = frame.status
    if status == OK:
        return frame.payload
    if status == NOT_FOUND:
        return None
    raise failed(frame)


def complete(req: Request, frame: wire.Frame | None, error: ChannelError | None = None) -> None:
    """Record the result; wake the caller if it is parked (a vector op may not be yet)."""
    req.frame = frame
    req.error = error
    req.done = True
    task = req.task
    if task is not None:
        req.task = None
        reschedule(task, cast(Any, req))  # see the class docstring
