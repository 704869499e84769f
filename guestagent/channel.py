"""Guest side of the tmem channel: a pipelined trio client for the host agent.

One `Channel` owns one connection (a unix socket, or a virtio-serial port inside a VM) and
multiplexes every request over it: callers in many tasks each get a request id, a single
writer task sends everything queued since its last wakeup in one writev, and a single
reader task decodes replies and wakes the waiting callers by id.  No task is spawned per
request, and a waiting caller is parked with `wait_task_rescheduled` rather than an Event,
because the per-request overhead is what decides the round trip time of a page fault.  For
the same reason a lone request (nothing else in flight, writer idle, not part of a burst)
is written by its caller directly, sparing the writer's scheduler pass, and its caller
also reads the reply itself (`_await_sync`): a bounded poll on the fd instead of waking the
reader task and then the caller, two scheduler passes that cost more than the transport's
own round trip under emulation.  A task awaiting a pipelined reply does the same
(`_catch_up`).  Neither happens while trio's run queue holds another task or the caller is
cancelled, and a task's step holds the event loop this way for about _SYNC_SLICE at most.

The channel survives the host agent going away.  On EOF, a transport error or an ERROR
frame it reconnects with backoff and a fresh HELLO, then restores the pools: ephemeral pools
are re-created (their contents were dropped by the host anyway, so in-flight gets on them
simply miss and in-flight puts are dropped), persistent pools are re-checked with QUERY_POOL
and their in-flight requests are re-sent, so a fault handler waiting for a page completes
once the host is back.  A persistent pool the host no longer has is *lost*: its operations
raise `PoolLost`.

Everything above the transport is identical for unix sockets and virtio-serial ports, so
the whole client is tested over unix sockets against a real host agent.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Protocol, TypeVar, cast

import trio
from trio.lowlevel import (
    Abort,
    Task,
    current_statistics,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

from guestagent.protocol import wire
from guestagent.protocol.headers import (
    FLUSH_OBJECT,
    FLUSH_PAGE,
    GET,
    NO_SPACE,
    NOREPLY,
    NOT_FOUND,
    NOTICE,
    OK,
    PERSISTENT,
    PUT,
    REPLY,
    pack_request,
    payload_length,
)
from guestagent.protocol.session import GuestSession, HandshakeRefused
from guestagent.protocol.wire import HEADER_SIZE, NO_OID, PAGE_SIZE

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "PendingGet",
    "PendingPut",
    "Pool",
    "PoolLost",
    "open_channel",
    "resolve_channel_path",
]

log = logging.getLogger(__name__)

VIRTIO_PORTS_DIR: Final = "/dev/virtio-ports"

_RECV_SIZE: Final = 1 << 16  # bytes asked of the transport per receive
_HANDSHAKE_TIMEOUT: Final = 10.0  # a host that accepts but never answers HELLO is retried
_MAX_BACKOFF_FACTOR: Final = 8  # reconnect delay grows to retry_interval * this
_STABLE_SESSION: Final = 2.0  # a session that lasted this long resets the backoff
_HOST_ERROR_STRIKES: Final = 3  # re-sends of one request into host ERRORs before giving up
_NOWAIT_QUEUE_LIMIT: Final = 4096  # queued parts above which put_nowait degrades to a flush
_NOTICE_BUFFER: Final = 64
_IOV_MAX: Final = 1024  # buffers per writev (Linux UIO_MAXIOV)
# virtio_console has no write_iter: a writev is one write, one virtqueue buffer and one kick to
# QEMU per buffer, and a write takes at most 32 KiB.  On a port, queued parts are joined into
# writes of up to this size instead.
_PORT_WRITE: Final = 32 << 10
# A task pipelining requests (`Pool.start_put`/`start_get`) may not yield for a long while; once
# this many parts are queued it writes them itself, so the host works on them meanwhile instead
# of the two sides taking turns.
_FLUSH_PARTS: Final = 16
# A caller waiting for a reply (a lone request's, or the oldest of a pipelining task's) polls
# for it at most this long before parking as usual.  Within one step of a task (from when trio
# ran it until it yields), such waits stop once _SYNC_SLICE has passed since the step's first,
# so however busy the caller is between waits the event loop runs at least that often: trio
# cannot show us every runnable task (those later in the batch being run are not in its run
# queue), so this bound is what they wait at most.
_SYNC_WAIT: Final = 0.002
_SYNC_SLICE: Final = 0.001



class ChannelError(Exception):
    """The channel cannot do what was asked (host refused, protocol failure, no reconnect)."""


class PoolLost(ChannelError):
    """A persistent pool did not survive a host-agent restart; its pages are gone."""


class ChannelClosed(ChannelError):
    """The channel was closed by its owner (the `open_channel` block was left)."""


class _Broken(Exception):
    """Internal: this connection is unusable; `host_error` if the host sent ERROR."""

    def __init__(self, message: str, *, host_error: bool = False) -> None:
        super().__init__(message)
        self.host_error = host_error


class _Fatal(ChannelError):
    """Internal: reconnecting cannot help (e.g. the host rejects our protocol version)."""


def resolve_channel_path(spec: str) -> tuple[str, str]:
    """Map a channel spec to (transport, path).

    A bare name is a virtio-serial port (what QEMU's `name=` property exposes in the guest,
    via udev's /dev/virtio-ports/NAME link); a path under /dev/ is a port's device node
    (/dev/vportNpM, for guests without that link); any other path is a unix socket, which
    is how the tests and host-side tools reach the host agent.
    """
    if not spec:
        raise ValueError("empty channel spec")
    if "/" not in spec:
        return "virtio", f"{VIRTIO_PORTS_DIR}/{spec}"
    if spec.startswith("/dev/"):
        return "virtio", spec
    return "unix", spec


async def _open_transport(kind: str, path: str) -> int:
    """A non-blocking, close-on-exec fd for the channel, which we own from here on.

    Both transports end up as a bare fd driven with trio.lowlevel.wait_readable/wait_writable
    and os.readv/os.writev: the stream wrappers add two scheduler passes per receive and a
    copy per send, which a page fault's round trip cannot afford.
    """
    if kind == "unix":
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return sock.detach()
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    # A port opens whether or not its host side is connected; while it is not, poll says
    # POLLHUP (reads return 0, writes block).  Count that as "host agent not reachable", so
    # the reconnect loop backs off instead of sending a HELLO that can go nowhere.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if any(events & select.POLLHUP for _, events in poller.poll(0)):
        os.close(fd)
        raise ConnectionRefusedError(f"the host side of {path} is not connected")
    return fd


class Budget(Protocol):
    """What `hold_budget` returns: seconds a caller may hold the event loop right now."""

    def __call__(self, spare: Task | None = None) -> float: ...


def hold_budget(most: float = _SYNC_WAIT) -> Budget:
    """How long a caller may hold trio's event loop in a synchronous wait (`_await_sync`, the
    preswap fault loop's poll): 0 while the calling task is cancelled (it must reach a
    checkpoint) or trio's run queue holds another task or a run_sync_soon callback waits, else
    up to `most` seconds, within the next cancel deadline.  `spare`, a task that may be runnable
    without that counting (a writer whose queue the caller just wrote itself), is optional.
    Tasks later in the batch trio is running are not in its run queue: callers bound their
    holds per step as well (_SYNC_SLICE, the fault loop's FAULT_SLICE).

    It reads trio's run queue, entry queue and deadline heap directly (the same fields in
    trio 0.22, which the guest image ships, and today's): current_statistics() builds two
    objects and asks the I/O backend for its figures on every call, which under emulation
    costs as much as a tenth of the round trip it is meant to shorten.  A trio without
    those fields gets current_statistics() instead.
    """
    try:
        from trio._core._run import GLOBAL_RUN_CONTEXT

        runner = GLOBAL_RUN_CONTEXT.runner
        entry_size = runner.entry_queue.size
        next_deadline = runner.deadlines.next_deadline
        now = runner.clock.current_time
        _ = (len(runner.runq), entry_size(), next_deadline(), now(),  # the shape we rely on
             current_task()._cancel_status.effectively_cancelled)
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - another trio

        def public(spare: Task | None = None) -> float:
            stats = current_statistics()
            if stats.tasks_runnable or stats.run_sync_soon_queue_size:
                return 0.0
            return max(0.0, min(most, stats.seconds_to_next_deadline,
                                trio.current_effective_deadline() - trio.current_time()))

        return public

    def budget(spare: Task | None = None) -> float:
        runq = runner.runq
        if ((runq and (len(runq) > 1 or runq[0] is not spare)) or entry_size()
                or current_task()._cancel_status.effectively_cancelled):
            # (a cancelled scope's deadline has left the deadline heap: ask the task itself)
            return 0.0
        deadline = next_deadline()
        return most if deadline == math.inf else min(most, deadline - now())

    return budget


def _close_fd(fd: int) -> None:
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


def _unwritten(parts: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """What is left of `parts` after a write that took only `n` bytes of them."""
    for i, part in enumerate(parts):
        if n < len(part):
            return [memoryview(part)[n:], *parts[i + 1 :]]
        n -= len(part)
    return []


def _take_batch(q: list[bytes | memoryview], join: bool) -> list[bytes | memoryview]:
    """Take the next write's parts off the front of `q`: up to _IOV_MAX buffers for writev on
    a socket; on a virtio port, whose writev costs a round to QEMU per buffer, parts joined
    into one write of at most _PORT_WRITE bytes."""
    if not join:
        parts = q[:_IOV_MAX]
        del q[: len(parts)]
        return parts
    size = count = 0
    for part in q:
        if count and size + len(part) > _PORT_WRITE:
            break
        size += len(part)
        count += 1
    parts = q[:count]
    del q[:count]
    return [b"".join(parts)] if count > 1 else parts


def _wake_writer(conn: _Conn) -> None:
    """Reschedule the writer if it is parked on an empty queue."""
    writer = conn.writer
    if writer is not None:
        conn.writer = None
        reschedule(writer)


def _status_name(status: int) -> str:
    try:
        return wire.Status(status).name
    except ValueError:
        return str(status)


class _Req:
    """One request awaiting its reply; kept (with its bytes) until answered or given up.

    It doubles as the outcome its parked caller is resumed with: trio hands the value given
    to `reschedule` back to `wait_task_rescheduled`, which returns `value.unwrap()`.  Passing
    the request itself saves allocating an `outcome.Value` for every reply.
    """

    __slots__ = (
        "body", "done", "error", "frame", "head", "pending", "pool", "rid", "strikes", "task",
    )  # fmt: skip

    def __init__(
        self, rid: int, head: bytes, body: bytes, pool: Pool | None, pending: dict[int, _Req]
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


class PendingPut(_Req):
    """A put sent by `Pool.start_put`: `await` it for what `Pool.put` returns.

    Any number may be in flight from one task (requests pipeline by id), and a reply that
    arrives before the await wakes no task at all.  Once `done`, `result()` gives the same
    answer without an await (a windowed loop's common case, at a third of the cost).
    """

    __slots__ = ()

    def result(self) -> bool:
        """The answer of a `done` put; raises what it failed with."""
        return _put_answer(self._reply())

    def __await__(self) -> Generator[Any, Any, bool]:
        yield from self._parked()
        return self.result()


class PendingGet(_Req):
    """A get sent by `Pool.start_get`: `await` it (or, once `done`, call `result()`) for
    what `Pool.get` returns."""

    __slots__ = ()

    def result(self) -> bytes | None:
        """The answer of a `done` get; raises what it failed with."""
        return _get_answer(self._reply())

    def __await__(self) -> Generator[Any, Any, bytes | None]:
        yield from self._parked()
        return self.result()


_R = TypeVar("_R", bound=_Req)


def _failed(frame: wire.Frame) -> ChannelError:
    return ChannelError(
        f"{wire.Op(frame.opcode).name} on pool {frame.pool} failed: {_status_name(frame.status)}"
    )


def _put_answer(frame: wire.Frame | None) -> bool:
    """What a put's reply means: stored, refused (or dropped), or an error."""
    if frame is None:
        return False
    status = frame.status
    if status == OK:
        return True
    if status == NO_SPACE:
        return False
    raise _failed(frame)


def _get_answer(frame: wire.Frame | None) -> bytes | None:
    """What a get's reply means: the page, a miss (or dropped), or an error."""
    if frame is None:
        return None
    status = frame.status
    if status == OK:
        return frame.payload
    if status == NOT_FOUND:
        return None
    raise _failed(frame)


def _complete(req: _Req, frame: wire.Frame | None, error: ChannelError | None = None) -> None:
    """Record the result; wake the caller if it is parked (a vector op may not be yet)."""
    req.frame = frame
    req.error = error
    req.done = True
    task = req.task
    if task is not None:
        req.task = None
        reschedule(task, cast(Any, req))  # see the class docstring


class _Conn:
    """State of one transport connection; a reconnect gets a fresh one."""

    __slots__ = (
        "budget", "buf", "error", "fd", "frames_in", "join", "outq", "poller", "scope", "view", "woken",
        "writer", "writer_task", "writing",
    )  # fmt: skip

    def __init__(self, fd: int, join: bool, frames_in: wire.FrameReader) -> None:
        self.fd = fd
        self.join = join  # a virtio port: join a request's parts into one write (see _PORT_WRITE)
        # Receive state, shared by the reader task and a caller reading its own reply
        self.frames_in = frames_in
        self.buf = bytearray(_RECV_SIZE)
        self.view = memoryview(self.buf)
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.budget = hold_budget()
        self.outq: list[bytes | memoryview] = []
        self.writer: Task | None = None  # the writer task while it is parked on an empty queue
        self.writer_task: Task | None = None  # the writer task, parked or not
        self.writing = False  # the writer holds parts taken off outq that are not all written
        self.woken = 0  # callers woken by the last read: more than one means a burst follows
        self.scope = trio.CancelScope()
        self.error: BaseException | None = None


class Pool:
    """A local handle on a host pool; it stays valid while the remote id changes.

    Obtain one with `Channel.new_pool`.  Operations on an ephemeral pool never block on a
    missing host: while disconnected a get misses and a put is dropped, which is exactly
    what the host would do with a pool it dropped.  Operations on a persistent pool wait
    for the host and raise `PoolLost` if it comes back without the pool.
    """

    __slots__ = ("_ch", "_destroyed", "_lost", "_remote", "_uuid", "flags", "persistent")

    def __init__(self, channel: Channel, flags: int, uuid: bytes) -> None:
        self._ch = channel
        self.flags = flags
        self.persistent = bool(flags & PERSISTENT)
        self._uuid = uuid
        self._remote = 0
        self._lost: str | None = None
        self._destroyed = False

    def __repr__(self) -> str:
        kind = "persistent" if self.persistent else "ephemeral"
        state = " lost" if self._lost else " destroyed" if self._destroyed else ""
        return f"<Pool {kind} flags={self.flags:#x} remote={self._remote}{state}>"

    @property
    def remote_id(self) -> int:
        """The host's id for this pool on the current connection (changes on reconnect)."""
        return self._remote

    async def put(self, oid: bytes, index: int, page: bytes) -> bool:
        """Store one page; True if stored, False if the host refused (or it was dropped)."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"page is {len(page)} bytes, want {PAGE_SIZE}")
        ch = self._ch
        req = ch._start(self, PUT, oid, index, page)
        if req is not None:
            frame: wire.Frame | None = (
                req.unwrap() if req.done else await wait_task_rescheduled(req.abort))
        else:
            frame = await ch._call(self, PUT, oid, index, page)
        return _put_answer(frame)

    def put_nowait(self, oid: bytes, index: int, page: bytes) -> None:
        """Queue a NOREPLY put on an ephemeral pool and return at once.

        Safe to lose, so it is dropped while disconnected (the pool comes back empty).  If
        the host is not draining the queue it degrades to a NOREPLY flush of that key: the
        page is not cached, and no older copy of it can be served stale.
        """
        if self.persistent:
            raise ValueError("put_nowait is only for ephemeral pools (a lost put is data loss)")
        if len(page) != PAGE_SIZE:
            raise ValueError(f"page is {len(page)} bytes, want {PAGE_SIZE}")
        ch = self._ch
        ch._check_pool(self)
        conn = ch._conn
        if not ch._ready or conn is None:
            return
        if len(conn.outq) < _NOWAIT_QUEUE_LIMIT:
            ch._send(conn, pack_request(PUT, NOREPLY, 0, self._remote, oid, index, PAGE_SIZE), page)
        else:
            ch._send(conn, pack_request(FLUSH_PAGE, NOREPLY, 0, self._remote, oid, index, 0), b"")

    async def get(self, oid: bytes, index: int) -> bytes | None:
        """The page stored under (oid, index), or None on a miss."""
        ch = self._ch
        req = ch._start(self, GET, oid, index, b"")
        if req is not None:  # the fast path, without a coroutine of its own
            frame: wire.Frame | None = (
                req.unwrap() if req.done else await wait_task_rescheduled(req.abort))
        else:
            frame = await ch._call(self, GET, oid, index, b"")
        return _get_answer(frame)

    def start_put(self, oid: bytes, index: int, page: bytes) -> PendingPut:
        """Send a put without waiting for its reply; `await` the result for `put`'s answer.

        This is pipelining from one task: keep a window of requests in flight and await the
        oldest, as a stream of puts and gets would.  Requests on a channel are applied in
        order, so a get started after a put of the same key sees that put.  It never blocks:
        while the host is away an ephemeral pool's put completes as dropped (False) and a
        persistent pool's is sent once the host is back (see `Channel._pipeline`).
        """
        if len(page) != PAGE_SIZE:
            raise ValueError(f"page is {len(page)} bytes, want {PAGE_SIZE}")
        return self._ch._pipeline(PendingPut, self, PUT, oid, index, page)

    def start_get(self, oid: bytes, index: int) -> PendingGet:
        """Send a get without waiting for its reply; `await` the result for `get`'s answer."""
        return self._ch._pipeline(PendingGet, self, GET, oid, index, b"")

    async def flush_page(self, oid: bytes, index: int) -> None:
        """Drop one page from the pool."""
        frame = await self._ch._call(self, FLUSH_PAGE, oid, index, b"")
        if frame is not None and frame.status != OK:
            raise _failed(frame)

    async def flush_object(self, oid: bytes) -> None:
        """Drop every page of an object (e.g. a file that was truncated or deleted)."""
        frame = await self._ch._call(self, FLUSH_OBJECT, oid, 0, b"")
        if frame is not None and frame.status != OK:
            raise _failed(frame)

    async def put_many(self, items: Sequence[tuple[bytes, int, bytes]]) -> list[bool]:
        """Store many pages with PUT_VEC frames (split to the host's limits, pipelined)."""
        parts: list[tuple[int, bytes]] = []
        step = self._ch._protocol.chunk
        for start in range(0, len(items), step):
            part = items[start : start + step]
            keys = [(oid, index) for oid, index, _ in part]
            body = wire.put_vec_payload(keys, [page for _, _, page in part])
            parts.append((len(part), body))
        frames = await self._ch._call_vector(self, wire.Op.PUT_VEC, parts)
        out: list[bool] = []
        for (n, _), frame in zip(parts, frames, strict=True):
            if frame is None or (frame.status == NO_SPACE and not frame.payload):
                out.extend([False] * n)
            elif frame.status != OK:
                raise _failed(frame)
            else:
                for status in frame.payload:
                    if status not in (OK, NO_SPACE):
                        raise ChannelError(f"PUT_VEC key failed: {_status_name(status)}")
                    out.append(status == OK)
        return out

    async def get_many(self, keys: Sequence[tuple[bytes, int]]) -> list[bytes | None]:
        """Fetch many pages with GET_VEC frames; None for each miss."""
        parts = self._key_parts(keys)
        frames = await self._ch._call_vector(self, wire.Op.GET_VEC, parts)
        out: list[bytes | None] = []
        for (n, _), frame in zip(parts, frames, strict=True):
            if frame is None:
                out.extend([None] * n)
            elif frame.status != OK:
                raise _failed(frame)
            else:
                out.extend(wire.parse_get_vec_reply(frame.payload, n))
        return out

    async def flush_many(self, keys: Sequence[tuple[bytes, int]]) -> None:
        """Drop many pages with FLUSH_VEC frames."""
        parts = self._key_parts(keys)
        for frame in await self._ch._call_vector(self, wire.Op.FLUSH_VEC, parts):
            if frame is not None and frame.status != OK:
                raise _failed(frame)

    async def destroy(self) -> None:
        """Drop the pool and its pages on the host; the handle is unusable afterwards."""
        ch = self._ch
        if self._destroyed or self._lost is not None:
            self._destroyed = True
            ch._pools.pop(self, None)
            await trio.lowlevel.checkpoint()
            return
        ch._check_open()
        self._destroyed = True
        if not self.persistent:
            # an ephemeral pool dies with its connection, so it must not be re-created
            ch._pools.pop(self, None)
        try:
            frame = await ch._call(self, wire.Op.DESTROY_POOL, NO_OID, 0, b"", destroying=True)
        except PoolLost:
            frame = None
        finally:
            ch._pools.pop(self, None)
        if frame is not None and frame.status != OK:
            raise _failed(frame)

    def _key_parts(self, keys: Sequence[tuple[bytes, int]]) -> list[tuple[int, bytes]]:
        step = self._ch._protocol.chunk
        parts = []
        for start in range(0, len(keys), step):
            part = keys[start : start + step]
            parts.append((len(part), wire.keys_payload(part)))
        return parts


class Channel:
    """A connection to the host agent, kept alive across host-agent restarts.

    Create it with `open_channel`; the attributes below describe the live connection.
    """

    generation: int  # increments on every (re)connect
    notices: trio.MemoryReceiveChannel[tuple[wire.Notice, int]]  # host notices, oldest dropped

    def __init__(self, spec: str, *, name: str, reconnect: bool, retry_interval: float) -> None:
        self.spec = spec
        self.transport, self.path = resolve_channel_path(spec)
        self.name = name
        # HELLO first, the host's limits, request ids and the pending table (the protocol's rules)
        self._protocol: GuestSession[_Req] = GuestSession(name)
        if not retry_interval > 0 or not math.isfinite(retry_interval):
            raise ValueError("retry_interval must be a positive number of seconds")
        self._reconnect = reconnect
        self._retry_interval = retry_interval
        self.generation = 0
        self._conn: _Conn | None = None
        self._ready = False  # handshake done and pools restored on self._conn
        self._ready_event = trio.Event()
        self._pending = self._protocol.pending  # one dict, read inline on the hot paths
        self._pools: dict[Pool, None] = {}  # insertion-ordered set of live pools
        # The step a synchronous wait last ran in (task, its trio schedule points) and when
        # that step's first one began: `_await_sync` bounds a step's waits by _SYNC_SLICE.
        self._sync_task: Task | None = None
        self._sync_step = -1
        self._sync_since = 0.0
        self._closed = False
        self._fatal: ChannelError | None = None
        self._notice_send, self.notices = trio.open_memory_channel[tuple[wire.Notice, int]](_NOTICE_BUFFER)

    def __repr__(self) -> str:
        state = "connected" if self._ready else "closed" if self._closed else "disconnected"
        return f"<Channel {self.spec!r} {state} generation={self.generation}>"

    @property
    def welcome(self) -> wire.Welcome:
        """The host's limits, from the last handshake."""
        return self._protocol.welcome

    @property
    def connected(self) -> bool:
        """True while a handshaken connection with restored pools is up."""
        return self._ready

    async def wait_connected(self) -> None:
        """Wait until connected; raises ChannelClosed/ChannelError if that cannot happen."""
        await trio.lowlevel.checkpoint()
        while not self._ready:
            self._check_open()
            await self._ready_event.wait()
        self._check_open()

    async def new_pool(self, flags: int, uuid: bytes | None = None) -> Pool:
        """Create a pool on the host (waits for a connection); see `Pool`."""
        spec = wire.pool_spec_payload(flags, uuid if uuid is not None else bytes(16))
        pool = Pool(self, flags, spec[4:])
        adopt = 0  # a persistent pool the host created for us on a connection that then broke
        while True:
            await self.wait_connected()
            generation, conn = self.generation, self._conn
            assert conn is not None
            if adopt:
                frame = await self._request(conn, None, wire.Op.QUERY_POOL, adopt, b"")
                if frame is None:
                    continue
                if self._fresh(generation) and self._same_pool(frame, flags):
                    return self._adopt(pool, adopt)
                adopt = 0
                continue
            frame = await self._request(conn, None, wire.Op.NEW_POOL, 0, spec)
            if frame is None:
                continue
            if frame.status != OK:
                raise ChannelError(f"host refused the pool (flags {flags:#x}): {_status_name(frame.status)}")
            if self._fresh(generation):
                return self._adopt(pool, frame.pool)
            if pool.persistent:
                adopt = frame.pool

    async def reclaim_pool(self, remote: int, flags: int) -> Pool | None:
        """A handle on persistent pool `remote` that an earlier session of this guest made (a
        killed agent's: persistent pools outlive their session), if the host still has it with
        exactly these flags; None if it has not.  The caller usually destroys it."""
        if not flags & PERSISTENT:
            raise ValueError("only a persistent pool outlives its session")
        while True:
            await self.wait_connected()
            generation, conn = self.generation, self._conn
            assert conn is not None
            frame = await self._request(conn, None, wire.Op.QUERY_POOL, remote, b"")
            if frame is None or not self._fresh(generation):
                continue  # the connection broke meanwhile: ask the next one
            if not self._same_pool(frame, flags):
                return None
            return self._adopt(Pool(self, flags, bytes(16)), remote)

    async def report_stats(self, values: Mapping[str, int]) -> None:
        """Send a STATS report (no reply); dropped while disconnected, it is only advisory."""
        payload = wire.stats_payload(values)
        self._check_open()
        await trio.lowlevel.checkpoint()
        conn = self._conn
        if self._ready and conn is not None:
            head = pack_request(int(wire.Op.STATS), 0, 0, 0, NO_OID, 0, len(payload))
            self._send(conn, head, payload)

    # ----------------------------------------------------------------- request machinery

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed("channel closed")
        if self._fatal is not None:
            raise ChannelError(str(self._fatal))

    def _check_pool(self, pool: Pool) -> None:
        self._check_open()
        if pool._lost is not None:
            raise PoolLost(pool._lost)
        if pool._destroyed:
            raise ChannelError("pool was destroyed")

    def _fresh(self, generation: int) -> bool:
        return self._ready and self.generation == generation

    @staticmethod
    def _same_pool(frame: wire.Frame, flags: int) -> bool:
        return frame.status == OK and wire.parse_pool_flags(frame.payload) == flags

    def _adopt(self, pool: Pool, remote: int) -> Pool:
        pool._remote = remote
        self._pools[pool] = None
        return pool

    def _send(self, conn: _Conn, head: bytes, body: bytes) -> None:
        """Queue bytes for the writer and wake it if it sleeps (no checkpoint, no task)."""
        q = conn.outq
        q.append(head)
        if body:
            q.append(body)
        _wake_writer(conn)

    def _send_now(self, conn: _Conn, head: bytes, body: bytes) -> None:
        """Write a lone request straight to the fd, saving the writer's scheduler pass.

        Only called while the writer is parked on an empty queue, so nothing can be
        reordered; whatever the kernel does not take is queued for the writer.  "Lone" also
        means the last read woke at most one caller: when it woke many, their requests are
        a burst, and one write for all of it beats waking the host for the first alone.
        """
        try:
            if not body:
                n = os.write(conn.fd, head)
            else:
                n = os.writev(conn.fd, (head + body,) if conn.join else (head, body))
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self._break(conn, exc)  # the caller's request stays pending: stalled or dropped
            return
        if n < len(head):
            self._send(conn, head[n:], body)
        elif n < len(head) + len(body):
            self._send(conn, memoryview(body)[n - len(head) :].tobytes(), b"")

    def _submit(
        self, conn: _Conn, pool: Pool | None, op: int, remote: int, oid: bytes, index: int,
        body: bytes,
    ) -> _Req:  # fmt: skip
        rid = self._protocol.next_rid()
        head = pack_request(op, 0, rid, remote, oid, index, len(body))
        req = self._pending[rid] = _Req(rid, head, body, pool, self._pending)
        self._send(conn, head, body)
        return req

    def _pipeline(
        self, kind: type[_R], pool: Pool, op: int, oid: bytes, index: int, body: bytes
    ) -> _R:
        """Queue a request of `kind` for `Pool.start_put`/`start_get`; never reads a reply.

        Unlike `_start` there is no lone-request shortcut (its caller would wait for this
        reply in place, the opposite of pipelining).  Without a connection an ephemeral
        pool's request completes at once as dropped; a persistent pool's is registered
        pending, and `_go_ready` sends it after the next handshake (or fails it with
        PoolLost), as it does for requests a break interrupted.
        """
        if self._closed or self._fatal is not None or pool._lost is not None or pool._destroyed:
            self._check_pool(pool)  # raises
        rid = self._protocol.next_rid()
        head = pack_request(op, 0, rid, pool._remote, oid, index, len(body))
        conn = self._conn
        if not self._ready or conn is None:
            if not pool.persistent:
                dropped = kind(0, head, body, pool, {})
                _complete(dropped, None)
                return dropped
            req = self._pending[rid] = kind(rid, head, body, pool, self._pending)
            return req
        pending = self._pending
        req = pending[rid] = kind(rid, head, body, pool, pending)
        q = conn.outq  # _send, inline
        q.append(head)
        if body:
            q.append(body)
        if conn.writer is not None:
            _wake_writer(conn)
        if len(q) >= _FLUSH_PARTS and not conn.writing:
            self._flush(conn)
        return req

    def _catch_up(self, req: _Req) -> None:
        """A task awaits a pipelined request whose reply is not in yet: send what it queued
        and read replies in its own step (`_await_sync`), rather than a scheduler pass that
        parks it, runs the writer and the reader, and wakes it again.

        That pass costs about as much as a tenth of the requests a window keeps in flight,
        and a task pipelining requests makes one every few replies.  The queue is written
        unless the writer holds parts (nothing may overtake them); the replies are read only
        if all of it went out (else the request may not be out) and within `_await_sync`'s
        limits (the writer may be runnable: its queue is empty once we wrote it).
        """
        conn = self._conn
        if conn is None or not self._ready or conn.writing or conn.error is not None:
            return
        if conn.outq and not self._flush(conn):
            return
        self._await_sync(conn, req, pipelined=True)

    async def _wait(self, req: _Req) -> wire.Frame | None:
        """The reply frame (None if dropped by a break), or the error it completed with.

        A pool's request (a vector op's chunk) is caught up on like a pipelined one; the
        channel's own (handshake, NEW_POOL) simply park.
        """
        if not req.done and req.pool is not None:
            self._catch_up(req)
        if req.done:
            return req.unwrap()
        req.task = current_task()
        frame: wire.Frame | None = await wait_task_rescheduled(req.abort)
        return frame

    async def _gate(self, pool: Pool, destroying: bool) -> bool:
        """Wait until `pool` may send; False means "drop it" (ephemeral, disconnected)."""
        while True:
            self._check_open()
            if pool._lost is not None:
                raise PoolLost(pool._lost)
            if pool._destroyed and not destroying:
                raise ChannelError("pool was destroyed")
            if self._ready:
                return True
            if not pool.persistent:
                await trio.lowlevel.checkpoint()
                return False
            await self._ready_event.wait()

    def _start(
        self, pool: Pool, op: int, oid: bytes, index: int, body: bytes, destroying: bool = False
    ) -> _Req | None:
        """Send a request for the calling task, which must park right after (on `req.abort`)
        unless the reply already came (`req.done`: see `_await_sync`).

        None if it may not be sent right now (not connected, pool lost or destroyed): then
        `_call` sorts it out.  The hot path of every page operation, hence all inline, and
        callable without a coroutine of its own.
        """
        if not self._ready or (pool._destroyed and not destroying) or pool._lost is not None:
            return None
        conn = self._conn
        assert conn is not None
        rid = self._protocol.next_rid()
        head = pack_request(op, 0, rid, pool._remote, oid, index, len(body))
        pending = self._pending
        lone = not pending and conn.writer is not None and conn.woken <= 1
        req = pending[rid] = _Req(rid, head, body, pool, pending)
        if lone:
            self._send_now(conn, head, body)
            if conn.error is None:
                self._await_sync(conn, req)
            if req.done:
                return req
        else:
            q = conn.outq
            q.append(head)
            if body:
                q.append(body)
            writer = conn.writer
            if writer is not None:
                conn.writer = None
                reschedule(writer)
        req.task = current_task()
        return req

    async def _call(
        self, pool: Pool, op: int, oid: bytes, index: int, body: bytes, *, destroying: bool = False
    ) -> wire.Frame | None:
        """One request on a pool: the reply, or None if dropped (ephemeral pool, no host)."""
        req = self._start(pool, op, oid, index, body, destroying)
        if req is None:
            may_send = await self._gate(pool, destroying)
            if not may_send:
                return None
            req = self._start(pool, op, oid, index, body, destroying)
            assert req is not None  # _gate checked the same conditions, and nothing ran since
        if req.done:
            return req.unwrap()
        frame: wire.Frame | None = await wait_task_rescheduled(req.abort)
        return frame

    async def _call_vector(
        self, pool: Pool, op: int, parts: Sequence[tuple[int, bytes]]
    ) -> list[wire.Frame | None]:
        """Send every chunk at once (one batch for the writer), then collect the replies."""
        if not parts:
            self._check_pool(pool)
            await trio.lowlevel.checkpoint()
            return []
        if not await self._gate(pool, False):
            return [None] * len(parts)
        conn = self._conn
        assert conn is not None
        sent = [self._submit(conn, pool, op, pool._remote, NO_OID, n, body) for n, body in parts]
        out: list[wire.Frame | None] = []
        try:
            for req in sent:
                out.append(await self._wait(req))
        finally:
            for req in sent[len(out) :]:
                self._pending.pop(req.rid, None)
        return out

    async def _request(
        self, conn: _Conn, pool: Pool | None, op: int, remote: int, body: bytes
    ) -> wire.Frame | None:
        """A channel-level request on `conn`, not gated on readiness (used by the handshake)."""
        frame: wire.Frame | None = await self._wait(self._submit(conn, pool, op, remote, NO_OID, 0, body))
        return frame

    # ----------------------------------------------------------------- connection tasks

    async def _reader(self, conn: _Conn) -> None:
        """Decode replies and wake their callers; any failure breaks the connection.

        Reads first and waits only when the fd is dry: no scheduler pass for data that is
        already there.  This cannot starve other tasks, as the host only sends replies to
        requests, and the callers we wake must run before they can make more.
        """
        fd = conn.fd
        buffers = (conn.buf,)
        readv = os.readv
        wait_readable = trio.lowlevel.wait_readable
        received = self._received
        try:
            while True:
                try:
                    n = readv(fd, buffers)
                except BlockingIOError:
                    await wait_readable(fd)
                    continue
                conn.woken = received(conn, n)
        except (_Broken, wire.ProtocolError, trio.ClosedResourceError, OSError) as exc:
            self._break(conn, exc)

    def _received(self, conn: _Conn, n: int) -> int:
        """Decode `n` bytes just read into conn.buf and complete their requests.

        Returns how many parked callers it woke; raises _Broken or ProtocolError when the
        connection is finished.
        """
        frames_in = conn.frames_in
        if not n:
            frames_in.eof()
            raise _Broken("host agent closed the channel")
        try:
            frames = frames_in.feed(conn.view[:n])
        except wire.ProtocolError as err:
            self._dispatch(err.frames)
            raise
        return self._deliver(frames)

    def _deliver(self, frames: Iterable[wire.Frame]) -> int:
        """Complete the requests these frames answer; returns how many parked callers it woke."""
        pending = self._pending
        woken = 0
        for frame in frames:  # _dispatch, inlined for the common case
            if frame.flags & REPLY:
                req = pending.pop(frame.request_id, None)
                if req is not None:  # else: its caller was cancelled
                    req.frame = frame
                    req.done = True
                    task = req.task
                    if task is not None:
                        req.task = None
                        reschedule(task, req)  # type: ignore[arg-type]  # see _Req
                        woken += 1
            else:
                self._dispatch((frame,))
        return woken

    def _await_sync(self, conn: _Conn, req: _Req, pipelined: bool = False) -> None:
        """Try to read a request's reply in the caller's own step, without parking (a lone
        request, or the oldest a pipelining caller awaits: `_catch_up`).

        Only while trio's run queue holds no other task (a blocked poll would delay it) and
        the caller is not cancelled (it must reach a checkpoint), within the next trio
        deadline, for at most _SYNC_WAIT; and not once _SYNC_SLICE has passed since the
        first such wait in the caller's current step (a pipelined wait stays within it), so
        the event loop runs other tasks and serves their I/O at least that often.  The
        reader task stays parked on the same fd meanwhile; epoll does not report an fd
        whose data we consumed first, and a spurious wakeup only costs it an EAGAIN.

        A reply larger than one read (a page through virtio-serial comes in 4 KiB buffers)
        is gathered in conn.buf behind its first part and decoded once, rather than each
        part copied into the decoder's own buffer and its header parsed twice.
        """
        monotonic = time.monotonic
        began = monotonic()
        task = current_task()
        step = getattr(task, "_schedule_points", -1)  # counts the task's yields (trio >= 0.22)
        if step != self._sync_step or task is not self._sync_task:
            if step < 0:
                return  # another trio: steps cannot be told apart, so never hold the loop
            self._sync_task, self._sync_step, self._sync_since = task, step, began  # a new step
        elif began - self._sync_since > _SYNC_SLICE:
            return
        # the writer may be runnable when the caller wrote the queue itself (`_catch_up`)
        left = conn.budget(conn.writer_task if pipelined else None)
        if left <= 0:
            return
        if pipelined:  # a window's reply is due soon if at all: wait within the slice
            left = min(left, self._sync_since + _SYNC_SLICE - began)
        deadline = began + left
        poll = conn.poller.poll
        fd = conn.fd
        buf = conn.buf
        view = conn.view
        size = len(buf)
        frames_in = conn.frames_in
        gather = not frames_in.buffered  # else the decoder holds a partial frame: feed it all
        have = 0  # bytes read into conn.buf but not yet fed to the decoder
        # A lone request's reply cannot be in yet: poll first.  A window's often is (the host
        # answered while we were busy): read first, and poll only when the fd is dry.
        polled = not pipelined
        try:
            while True:
                if polled and not poll(left * 1000):
                    break
                polled = True
                try:
                    n = os.readv(fd, (view[have:],) if have else (buf,))
                except BlockingIOError:
                    n = -1
                if n == 0:
                    if have:
                        self._received(conn, have)
                        have = 0
                    self._received(conn, 0)  # raises: the host closed the channel
                if n > 0:
                    have += n
                    if not gather or (
                        have >= HEADER_SIZE
                        and not have < HEADER_SIZE + payload_length(buf) <= size
                    ):  # not one partial frame that fits behind what we have: decode it now
                        end, have = have, 0
                        frame = frames_in.feed_one(view[:end]) if gather else None
                        if frame is None:
                            conn.woken = self._received(conn, end)
                        elif frame.request_id == req.rid and frame.flags & REPLY:
                            self._pending.pop(req.rid, None)  # the usual: our reply, alone
                            req.frame = frame
                            req.done = True
                            conn.woken = 0
                        else:
                            conn.woken = self._deliver((frame,))
                        if req.done:
                            break
                        gather = not frames_in.buffered
                left = deadline - monotonic()
                if left <= 0:
                    break
            if have:  # out of time with part of a frame: the decoder keeps it for the reader
                conn.woken = self._received(conn, have)
        except (_Broken, wire.ProtocolError, OSError) as exc:
            self._break(conn, exc)  # the request stays pending: stalled or dropped by the session

    def _dispatch(self, frames: Iterable[wire.Frame]) -> None:
        for frame in frames:
            if frame.flags & REPLY:
                req = self._pending.pop(frame.request_id, None)
                if req is not None:  # else: its caller was cancelled
                    _complete(req, frame)
            elif frame.opcode == NOTICE:
                self._notice(frame)
            else:  # ERROR: the host closes the channel after it
                reason = wire.parse_error(frame.payload)
                raise _Broken(
                    f"host agent sent ERROR ({_status_name(frame.status)}): {reason}",
                    host_error=True,
                )

    def _notice(self, frame: wire.Frame) -> None:
        """Queue a host notice; when nobody keeps up, the oldest goes (the newest matters)."""
        try:
            item = wire.parse_notice(frame.payload)
        except wire.ProtocolError as err:
            log.warning("ignoring host notice: %s", err)  # a newer host; not worth a reconnect
            return
        try:
            try:
                self._notice_send.send_nowait(item)
            except trio.WouldBlock:
                self.notices.receive_nowait()
                self._notice_send.send_nowait(item)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _writer(self, conn: _Conn) -> None:
        """Send everything queued since the last wakeup with one writev (and its tail, if the
        kernel took only part of it).

        writev rather than join+write on a socket: pages go from the callers' bytes straight
        to the kernel, and no batch-sized buffer (often above malloc's mmap threshold) is
        built.  On a virtio port, whose writev costs a round to QEMU per buffer, the parts are
        joined into writes of at most _PORT_WRITE bytes.
        """
        q = conn.outq
        fd = conn.fd
        join = conn.join
        writev = os.writev
        wait_writable = trio.lowlevel.wait_writable
        conn.writer_task = current_task()

        def abort(_: Any) -> Abort:
            conn.writer = None
            return Abort.SUCCEEDED

        try:
            while True:
                if not q:
                    conn.writer = current_task()
                    await wait_task_rescheduled(abort)
                    continue
                parts = _take_batch(q, join)
                conn.writing = True  # holding parts: nobody else may write until they are out
                while True:
                    try:
                        n = writev(fd, parts)
                    except BlockingIOError:
                        await wait_writable(fd)
                        continue
                    if n == sum(map(len, parts)):
                        break
                    parts = _unwritten(parts, n)
                conn.writing = False
        except (trio.ClosedResourceError, OSError) as exc:
            self._break(conn, exc)

    def _flush(self, conn: _Conn) -> bool:
        """Write the queue now, from the caller's step (see _FLUSH_PARTS); only while the
        writer holds no parts of its own, so nothing is reordered.  True if all of it went
        out; what the kernel does not take stays queued, in order, for the writer."""
        q = conn.outq
        while q:  # a batch is bounded (_IOV_MAX parts; on a port, _PORT_WRITE bytes)
            parts = _take_batch(q, conn.join)
            try:
                n = os.writev(conn.fd, parts)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self._break(conn, exc)  # the requests stay pending: stalled or dropped
                return False
            if n != sum(map(len, parts)):
                q[:0] = _unwritten(parts, n)
                _wake_writer(conn)
                return False
        return True

    def _break(self, conn: _Conn, exc: BaseException) -> None:
        """Mark `conn` dead and stop its tasks.

        The first reason wins, except that a fatal one always does: a host refusing our
        HELLO sends its reply and an ERROR in one write, and the reader sees the ERROR
        before the handshake sees the refusal, yet retrying could never succeed.
        """
        if conn.error is None or isinstance(exc, _Fatal):
            conn.error = exc
        if self._conn is conn and self._ready:
            self._ready = False
            self._ready_event = trio.Event()
        conn.scope.cancel()

    # ----------------------------------------------------------------- connection lifecycle

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, serve, reconnect; reports started after the first handshake (or failure)."""
        started = False

        def on_ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        failures = 0
        try:
            while True:
                began = trio.current_time()
                generation = self.generation
                try:
                    fd = await _open_transport(self.transport, self.path)
                except OSError as exc:
                    problem: BaseException = exc
                else:
                    problem = await self._session(fd, on_ready)
                    if isinstance(problem, _Fatal):
                        raise problem
                if self.generation != generation:  # it was up: an outage starts
                    log.warning("channel %s lost: %s", self.spec, problem)
                elif failures == 0:  # later attempts of the same outage are not news
                    log.info("host agent not reachable at %s: %s", self.spec, problem)
                if not self._reconnect:
                    raise ChannelError(f"channel {self.spec}: {problem}")
                if trio.current_time() - began >= _STABLE_SESSION:
                    failures = 0
                delay = (
                    0.0
                    if failures == 0
                    else self._retry_interval * min(2 ** (failures - 1), _MAX_BACKOFF_FACTOR)
                )
                failures += 1
                await trio.sleep(delay)
        except ChannelError as exc:
            reason = str(exc)
            self._fatal = exc
            self._fail_all(lambda: ChannelError(reason))
            # without reconnect the caller gets the error itself; with it, this is an outage
            log.log(logging.ERROR if self._reconnect else logging.DEBUG,
                    "channel %s gave up: %s", self.spec, reason)  # fmt: skip
            if not started:
                task_status.started()

    async def _session(self, fd: int, on_ready: Callable[[], None]) -> BaseException:
        """Serve one connection until it breaks; returns why it ended."""
        conn = _Conn(fd, self.transport == "virtio", self._protocol.reader())
        self._conn = conn
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._reader, conn)
                    nursery.start_soon(self._writer, conn)
                    try:
                        with trio.fail_after(_HANDSHAKE_TIMEOUT):
                            await self._handshake(conn)
                    except trio.TooSlowError:
                        self._break(conn, _Broken("no answer to the handshake"))
                    except (ChannelError, wire.ProtocolError, _Broken) as exc:
                        self._break(conn, exc)  # a _Fatal ends up in conn.error, see _run
                    else:
                        self._go_ready(conn)
                        on_ready()
        finally:
            self._conn = None
            if self._ready:
                self._ready = False
                self._ready_event = trio.Event()
            self._stall_or_drop(conn)
            _close_fd(fd)
        return conn.error if conn.error is not None else _Broken("connection ended")

    async def _handshake(self, conn: _Conn) -> None:
        """HELLO, then bring every pool back: re-create ephemeral ones, re-check persistent."""
        session = self._protocol
        session.restart()
        frame = await self._request(conn, None, wire.Op.HELLO, 0, session.hello())
        if frame is None:
            raise _Broken("channel broke during the handshake")
        try:
            session.welcomed_by(frame)
        except HandshakeRefused as err:
            raise _Fatal(str(err)) from None
        # persistent pools first: the host answers in order, so their QUERY_POOLs cannot see
        # an ephemeral pool re-created under a reused id
        pools = sorted((p for p in self._pools if p._lost is None), key=lambda p: not p.persistent)
        sent = []
        for pool in pools:  # all at once: restoring many pools costs one round trip
            if pool.persistent:
                sent.append(self._submit(conn, None, wire.Op.QUERY_POOL, pool._remote, NO_OID, 0, b""))
            else:
                spec = wire.pool_spec_payload(pool.flags, pool._uuid)
                sent.append(self._submit(conn, None, wire.Op.NEW_POOL, 0, NO_OID, 0, spec))
        for pool, req in zip(pools, sent, strict=True):
            frame = await self._wait(req)
            if frame is None:
                raise _Broken("channel broke while restoring pools")
            if pool.persistent:
                if not self._same_pool(frame, pool.flags):
                    pool._lost = f"persistent pool {pool._remote} did not survive the host restart"
                    log.warning("%s", pool._lost)
            elif frame.status == OK:
                pool._remote = frame.pool
            else:
                pool._lost = f"host refused to re-create the pool: {_status_name(frame.status)}"
                log.warning("%s", pool._lost)
        for pool in pools:
            if pool._lost is not None:
                self._pools.pop(pool, None)

    def _go_ready(self, conn: _Conn) -> None:
        """Re-send the persistent requests stalled by the last break, in order; open the gate."""
        for rid, req in list(self._pending.items()):
            pool = req.pool
            if pool is not None and pool._lost is not None:
                del self._pending[rid]
                _complete(req, None, PoolLost(pool._lost))
            else:
                self._send(conn, req.head, req.body)
        self.generation += 1
        self._ready = True
        self._ready_event.set()
        log.info("channel %s connected (generation %d)", self.spec, self.generation)

    def _stall_or_drop(self, conn: _Conn) -> None:
        """After a break: requests on persistent pools wait for a re-send, the rest are dropped."""
        host_error = isinstance(conn.error, _Broken) and conn.error.host_error
        for rid, req in list(self._pending.items()):
            pool = req.pool
            if pool is not None and pool.persistent:
                if host_error:
                    req.strikes += 1
                if req.strikes < _HOST_ERROR_STRIKES:
                    continue
                del self._pending[rid]
                _complete(req, None, ChannelError(f"host agent rejected it: {conn.error}"))
            else:
                del self._pending[rid]
                _complete(req, None)

    def _fail_all(self, make: Callable[[], ChannelError]) -> None:
        """Complete every pending request with an error and wake everyone waiting to send."""
        pending = list(self._pending.values())
        self._pending.clear()
        for req in pending:
            _complete(req, None, make())
        self._ready = False
        self._ready_event.set()
        self._notice_send.close()

    def _shutdown(self) -> None:
        self._closed = True
        self._fail_all(lambda: ChannelClosed("channel closed"))


@asynccontextmanager
async def open_channel(
    spec: str, *, name: str = "", reconnect: bool = True, retry_interval: float = 0.5
) -> AsyncIterator[Channel]:
    """Connect to the host agent and keep the channel up for the duration of the block.

    Returns once the first handshake is done; with reconnect=True it waits for an absent
    host agent (bound it with trio.move_on_after), with reconnect=False it raises
    ChannelError instead and any later break fails requests rather than reconnecting.
    """
    channel = Channel(spec, name=name, reconnect=reconnect, retry_interval=retry_interval)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(channel._run)
            if channel._fatal is not None:
                raise ChannelError(str(channel._fatal))
            try:
                yield channel
            finally:
                channel._shutdown()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # our tasks never raise, so a lone exception is the caller's (or ours above): unwrap
        # it rather than make every caller handle an ExceptionGroup
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
