"""The guest channel: sessions with the host agent, reconnect, pool restore, the request API.

A `Channel` keeps one `Connection` at a time (see guestagent/channel/connection.py for how
its fd is driven), says HELLO on each (the rules are the protocol's `GuestSession`), restores
the pools after a reconnect, and turns pool operations into requests: the lone-request and
pipelining fast paths start here and finish in the connection.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Final, TypeVar

import trio
from trio.lowlevel import current_task, reschedule, wait_task_rescheduled

from guestagent.channel.connection import Connection
from guestagent.channel.errors import Broken, ChannelClosed, ChannelError, Fatal, PoolLost
from guestagent.channel.handle import PoolHandle
from guestagent.channel.requests import Request, complete, status_name
from guestagent.channel.transport import close_fd, open_transport, resolve_channel_path
from guestagent.protocol import wire
from guestagent.protocol.headers import OK, PERSISTENT, pack_request
from guestagent.protocol.session import GuestSession, HandshakeRefused
from guestagent.protocol.wire import NO_OID

__all__ = ["Channel", "open_channel"]

log = logging.getLogger("guestagent.channel")

_HANDSHAKE_TIMEOUT: Final = 10.0  # a host that accepts but never answers HELLO is retried
_MAX_BACKOFF_FACTOR: Final = 8  # reconnect delay grows to retry_interval * this
_STABLE_SESSION: Final = 2.0  # a session that lasted this long resets the backoff
_HOST_ERROR_STRIKES: Final = 3  # re-sends of one request into host ERRORs before giving up
_NOTICE_BUFFER: Final = 64
# A task pipelining requests (`PoolHandle.start_put`/`start_get`) may not yield for a long
# while; once this many parts are queued it writes them itself, so the host works on them
# meanwhile instead of the two sides taking turns.
_FLUSH_PARTS: Final = 16

_R = TypeVar("_R", bound=Request)


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
        self._protocol: GuestSession[Request] = GuestSession(name)
        if not retry_interval > 0 or not math.isfinite(retry_interval):
            raise ValueError("retry_interval must be a positive number of seconds")
        self._reconnect = reconnect
        self._retry_interval = retry_interval
        self.generation = 0
        self._conn: Connection | None = None
        self._ready = False  # handshake done and pools restored on self._conn
        self._ready_event = trio.Event()
        self._pending = self._protocol.pending  # one dict, read inline on the hot paths
        self._pools: dict[PoolHandle, None] = {}  # insertion-ordered set of live pools
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

    async def new_pool(self, flags: int, uuid: bytes | None = None) -> PoolHandle:
        """Create a pool on the host (waits for a connection); see `PoolHandle`."""
        spec = wire.pool_spec_payload(flags, uuid if uuid is not None else bytes(16))
        pool = PoolHandle(self, flags, spec[4:])
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
                raise ChannelError(f"host refused the pool (flags {flags:#x}): {status_name(frame.status)}")
            if self._fresh(generation):
                return self._adopt(pool, frame.pool)
            if pool.persistent:
                adopt = frame.pool

    async def reclaim_pool(self, remote: int, flags: int) -> PoolHandle | None:
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
            return self._adopt(PoolHandle(self, flags, bytes(16)), remote)

    def granted(self, feature: wire.Feature) -> bool:
        """The host of the current session serves `feature` (it said so in its HELLO reply)."""
        return self._ready and self._protocol.granted(feature)

    async def device_stats(self) -> dict[str, int] | None:
        """The host's counters of this guest's swap device (the host answers for the guest its
        channel belongs to, nothing else); None if it has no device for us, or if it does not serve
        the request at all (`granted`): then nothing is sent, since an older host would take the
        unknown opcode for a broken guest and close the channel."""
        while True:
            await self.wait_connected()
            generation, conn = self.generation, self._conn
            assert conn is not None
            if not self._protocol.granted(wire.Feature.DEVICE_STATS):
                return None
            frame = await self._request(conn, None, wire.Op.DEVICE_STATS, 0, b"")
            if frame is None or not self._fresh(generation):
                continue  # the connection broke meanwhile: ask the next one
            return wire.parse_stats(frame.payload) if frame.status == OK else None

    async def report_stats(self, values: Mapping[str, int]) -> None:
        """Send a STATS report (no reply); dropped while disconnected, it is only advisory."""
        payload = wire.stats_payload(values)
        self._check_open()
        await trio.lowlevel.checkpoint()
        conn = self._conn
        if self._ready and conn is not None:
            head = pack_request(int(wire.Op.STATS), 0, 0, 0, NO_OID, 0, len(payload))
            conn.send(head, payload)

    # ----------------------------------------------------------------- request machinery

    def _check_open(self) -> None:
        if self._closed:
            raise ChannelClosed("channel closed")
        if self._fatal is not None:
            raise ChannelError(str(self._fatal))

    def _check_pool(self, pool: PoolHandle) -> None:
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

    def _adopt(self, pool: PoolHandle, remote: int) -> PoolHandle:
        pool._remote = remote
        self._pools[pool] = None
        return pool

    def _submit(
        self,
        conn: Connection,
        pool: PoolHandle | None,
        op: int,
        remote: int,
        oid: bytes,
        index: int,
        body: bytes,
    ) -> Request:
        rid = self._protocol.next_rid()
        head = pack_request(op, 0, rid, remote, oid, index, len(body))
        req = self._pending[rid] = Request(rid, head, body, pool, self._pending)
        conn.send(head, body)
        return req

    def _pipeline(self, kind: type[_R], pool: PoolHandle, op: int, oid: bytes, index: int, body: bytes) -> _R:
        """Queue a request of `kind` for `PoolHandle.start_put`/`start_get`; never reads a reply.

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
                complete(dropped, None)
                return dropped
            req = self._pending[rid] = kind(rid, head, body, pool, self._pending)
            return req
        pending = self._pending
        req = pending[rid] = kind(rid, head, body, pool, pending)
        q = conn.outq  # Connection.send, inline
        q.append(head)
        if body:
            q.append(body)
        if conn.writer is not None:
            conn.wake_writer()
        if len(q) >= _FLUSH_PARTS and not conn.writing:
            conn.flush()
        return req

    def _catch_up(self, req: Request) -> None:
        """A task awaits a pipelined request whose reply is not in yet: send what it queued
        and read replies in its own step (`Connection.await_sync`), rather than a scheduler pass that
        parks it, runs the writer and the reader, and wakes it again.

        That pass costs about as much as a tenth of the requests a window keeps in flight,
        and a task pipelining requests makes one every few replies.  The queue is written
        unless the writer holds parts (nothing may overtake them); the replies are read only
        if all of it went out (else the request may not be out) and within `Connection.await_sync`'s
        limits (the writer may be runnable: its queue is empty once we wrote it).
        """
        conn = self._conn
        if conn is None or not self._ready or conn.writing or conn.error is not None:
            return
        if conn.outq and not conn.flush():
            return
        conn.await_sync(req, pipelined=True)

    async def _wait(self, req: Request) -> wire.Frame | None:
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

    async def _gate(self, pool: PoolHandle, destroying: bool) -> bool:
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
        self, pool: PoolHandle, op: int, oid: bytes, index: int, body: bytes, destroying: bool = False
    ) -> Request | None:
        """Send a request for the calling task, which must park right after (on `req.abort`)
        unless the reply already came (`req.done`: see `Connection.await_sync`).

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
        req = pending[rid] = Request(rid, head, body, pool, pending)
        if lone:
            conn.send_now(head, body)
            if conn.error is None:
                conn.await_sync(req)
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
        self, pool: PoolHandle, op: int, oid: bytes, index: int, body: bytes, *, destroying: bool = False
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
        self, pool: PoolHandle, op: int, parts: Sequence[tuple[int, bytes]]
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
        self, conn: Connection, pool: PoolHandle | None, op: int, remote: int, body: bytes
    ) -> wire.Frame | None:
        """A channel-level request on `conn`, not gated on readiness (used by the handshake)."""
        frame: wire.Frame | None = await self._wait(self._submit(conn, pool, op, remote, NO_OID, 0, body))
        return frame

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

    def _on_break(self, conn: Connection) -> None:
        """`conn` is unusable: requests wait (or are sent nowhere) until the next handshake."""
        if self._conn is conn and self._ready:
            self._ready = False
            self._ready_event = trio.Event()

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
                    fd = await open_transport(self.transport, self.path)
                except OSError as exc:
                    problem: BaseException = exc
                else:
                    problem = await self._session(fd, on_ready)
                    if isinstance(problem, Fatal):
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
            log.log(
                logging.ERROR if self._reconnect else logging.DEBUG,
                "channel %s gave up: %s",
                self.spec,
                reason,
            )
            if not started:
                task_status.started()

    async def _session(self, fd: int, on_ready: Callable[[], None]) -> BaseException:
        """Serve one connection until it breaks; returns why it ended."""
        conn = Connection(
            fd,
            self.transport == "virtio",
            self._protocol.reader(),
            self._pending,
            self._notice,
            self._on_break,
        )
        self._conn = conn
        try:
            with conn.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(conn.read_loop)
                    nursery.start_soon(conn.write_loop)
                    try:
                        with trio.fail_after(_HANDSHAKE_TIMEOUT):
                            await self._handshake(conn)
                    except trio.TooSlowError:
                        conn.fail(Broken("no answer to the handshake"))
                    except (ChannelError, wire.ProtocolError, Broken) as exc:
                        conn.fail(exc)  # a Fatal ends up in conn.error, see _run
                    else:
                        self._go_ready(conn)
                        on_ready()
        finally:
            self._conn = None
            if self._ready:
                self._ready = False
                self._ready_event = trio.Event()
            self._stall_or_drop(conn)
            close_fd(fd)
        return conn.error if conn.error is not None else Broken("connection ended")

    async def _handshake(self, conn: Connection) -> None:
        """HELLO, then bring every pool back: re-create ephemeral ones, re-check persistent."""
        session = self._protocol
        session.restart()
        hello = self._submit(conn, None, wire.Op.HELLO, 0, NO_OID, session.offered, session.hello())
        frame = await self._wait(hello)
        if frame is None:
            raise Broken("channel broke during the handshake")
        try:
            session.welcomed_by(frame)
        except HandshakeRefused as err:
            raise Fatal(str(err)) from None
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
                raise Broken("channel broke while restoring pools")
            if pool.persistent:
                if not self._same_pool(frame, pool.flags):
                    pool._lost = f"persistent pool {pool._remote} did not survive the host restart"
                    log.warning("%s", pool._lost)
            elif frame.status == OK:
                pool._remote = frame.pool
            else:
                pool._lost = f"host refused to re-create the pool: {status_name(frame.status)}"
                log.warning("%s", pool._lost)
        for pool in pools:
            if pool._lost is not None:
                self._pools.pop(pool, None)

    def _go_ready(self, conn: Connection) -> None:
        """Re-send the persistent requests stalled by the last break, in order; open the gate."""
        for rid, req in list(self._pending.items()):
            pool = req.pool
            if pool is not None and pool._lost is not None:
                del self._pending[rid]
                complete(req, None, PoolLost(pool._lost))
            else:
                conn.send(req.head, req.body)
        self.generation += 1
        self._ready = True
        self._ready_event.set()
        log.info("channel %s connected (generation %d)", self.spec, self.generation)

    def _stall_or_drop(self, conn: Connection) -> None:
        """After a break: requests on persistent pools wait for a re-send, the rest are dropped."""
        host_error = isinstance(conn.error, Broken) and conn.error.host_error
        for rid, req in list(self._pending.items()):
            pool = req.pool
            if pool is not None and pool.persistent:
                if host_error:
                    req.strikes += 1
                if req.strikes < _HOST_ERROR_STRIKES:
                    continue
                del self._pending[rid]
                complete(req, None, ChannelError(f"host agent rejected it: {conn.error}"))
            else:
                del self._pending[rid]
                complete(req, None)

    def _fail_all(self, make: Callable[[], ChannelError]) -> None:
        """Complete every pending request with an error and wake everyone waiting to send."""
        pending = list(self._pending.values())
        self._pending.clear()
        for req in pending:
            complete(req, None, make())
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
