"""The guest's handle on one host pool: the page API callers use.

A `PoolHandle` stays valid while the host's id for the pool changes (a reconnect re-creates an
ephemeral pool, re-checks a persistent one); its operations go through the channel's request
machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio
from trio.lowlevel import wait_task_rescheduled

from guestagent.channel.errors import ChannelError, PoolLost
from guestagent.channel.requests import PendingGet, PendingPut, failed, get_answer, put_answer, status_name
from guestagent.protocol import wire
from guestagent.protocol.headers import (
    FLUSH_OBJECT,
    FLUSH_PAGE,
    FLUSH_VEC,
    GET,
    NO_SPACE,
    NOREPLY,
    OK,
    PERSISTENT,
    PUT,
    PUT_VEC,
    pack_request,
)
from guestagent.protocol.wire import NO_OID, PAGE_SIZE

if TYPE_CHECKING:
    from guestagent.channel.client import Channel

__all__ = ["PoolHandle"]

_NOWAIT_QUEUE_LIMIT: Final = 4096  # queued parts above which put_nowait degrades to a flush


class PoolHandle:
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
        return f"<PoolHandle {kind} flags={self.flags:#x} remote={self._remote}{state}>"

    @property
    def remote_id(self) -> int:
        """The host's id for this pool on the current connection (changes on reconnect)."""
        return self._remote

    @property
    def connected(self) -> bool:
        """Whether its channel has a live session with the host (else gets miss, puts drop)."""
        return self._ch.connected

    async def put(self, oid: bytes, index: int, page: bytes) -> bool:
        """Store one page; True if stored, False if the host refused (or it was dropped)."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"page is {len(page)} bytes, want {PAGE_SIZE}")
        ch = self._ch
        req = ch._start(self, PUT, oid, index, page)
        if req is not None:
            frame: wire.Frame | None = req.unwrap() if req.done else await wait_task_rescheduled(req.abort)
        else:
            frame = await ch._call(self, PUT, oid, index, page)
        return put_answer(frame)

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
            conn.send(pack_request(PUT, NOREPLY, 0, self._remote, oid, index, PAGE_SIZE), page)
        else:
            conn.send(pack_request(FLUSH_PAGE, NOREPLY, 0, self._remote, oid, index, 0), b"")

    def put_many_nowait(self, items: Sequence[tuple[bytes, int, bytes]]) -> None:
        """`put_nowait` for many pages: NOREPLY PUT_VEC frames (split to the host's limit), one
        frame instead of one per page.  Past the queue limit it degrades to NOREPLY flushes."""
        if self.persistent:
            raise ValueError("put_many_nowait is only for ephemeral pools (a lost put is data loss)")
        for _, _, page in items:
            if len(page) != PAGE_SIZE:
                raise ValueError(f"page is {len(page)} bytes, want {PAGE_SIZE}")
        ch = self._ch
        ch._check_pool(self)
        conn = ch._conn
        if not ch._ready or conn is None or not items:
            return
        step = ch._protocol.chunk
        for start in range(0, len(items), step):
            part = items[start : start + step]
            keys = [(oid, index) for oid, index, _ in part]
            if len(conn.outq) < _NOWAIT_QUEUE_LIMIT:
                op, body = PUT_VEC, wire.put_vec_payload(keys, [page for _, _, page in part])
            else:
                op, body = FLUSH_VEC, wire.keys_payload(keys)
            conn.send(pack_request(op, NOREPLY, 0, self._remote, NO_OID, len(part), len(body)), body)

    async def get(self, oid: bytes, index: int) -> bytes | None:
        """The page stored under (oid, index), or None on a miss."""
        ch = self._ch
        req = ch._start(self, GET, oid, index, b"")
        if req is not None:  # the fast path, without a coroutine of its own
            frame: wire.Frame | None = req.unwrap() if req.done else await wait_task_rescheduled(req.abort)
        else:
            frame = await ch._call(self, GET, oid, index, b"")
        return get_answer(frame)

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
            raise failed(frame)

    async def flush_object(self, oid: bytes) -> None:
        """Drop every page of an object (e.g. a file that was truncated or deleted)."""
        frame = await self._ch._call(self, FLUSH_OBJECT, oid, 0, b"")
        if frame is not None and frame.status != OK:
            raise failed(frame)

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
                raise failed(frame)
            else:
                for status in frame.payload:
                    if status not in (OK, NO_SPACE):
                        raise ChannelError(f"PUT_VEC key failed: {status_name(status)}")
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
                raise failed(frame)
            else:
                out.extend(wire.parse_get_vec_reply(frame.payload, n))
        return out

    async def flush_many(self, keys: Sequence[tuple[bytes, int]]) -> None:
        """Drop many pages with FLUSH_VEC frames."""
        parts = self._key_parts(keys)
        for frame in await self._ch._call_vector(self, wire.Op.FLUSH_VEC, parts):
            if frame is not None and frame.status != OK:
                raise failed(frame)

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
            raise failed(frame)

    def _key_parts(self, keys: Sequence[tuple[bytes, int]]) -> list[tuple[int, bytes]]:
        step = self._ch._protocol.chunk
        parts = []
        for start in range(0, len(keys), step):
            part = keys[start : start + step]
            parts.append((len(part), wire.keys_payload(part)))
        return parts
