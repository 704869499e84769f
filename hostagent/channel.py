"""One guest's channel: an asyncio Protocol feeding the wire decoder and dispatching to the engine.

This is the host's hot path. Every `data_received` decodes all complete frames, applies them to the
engine in order and answers with ONE write of all the replies, so a pipelining guest costs one read
and one write per wakeup. Nothing here logs per frame.

The guest is the socket the connection arrived on (`Guest`), never a field it sends. A guest that
breaks the protocol gets an ERROR frame and loses its channel; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from guestagent.protocol import wire
from guestagent.protocol.headers import (
    FLUSH_OBJECT,
    FLUSH_PAGE,
    FLUSH_VEC,
    GET,
    GET_VEC,
    HELLO,
    NO_SPACE,
    NOREPLY,
    NOT_FOUND,
    OK,
    PUT,
    PUT_VEC,
    STATS,
    pack_reply,
)
from guestagent.protocol.session import HandshakeRefused, HostSession, SessionError
from guestagent.protocol.wire import Op, PoolFlag, Status
from hostagent.pool import Client, EngineError, Held, OutOfSpace, PoolDenied, PoolEngine, UnknownPool

log = logging.getLogger("hostagent.channel")

# Replies queued in the transport above HIGH_WATER bytes stop reading from the guest until they
# are all in the kernel: a guest that never reads its replies must not grow host memory.
HIGH_WATER = 1 << 20
CHECK_EVERY = 16  # frames applied between measurements of the replies waiting to be written
# A closed channel whose guest does not read the last replies and the ERROR is dropped after this
# long, or at once when the guest connects again: lingering connections must not pile up.
LINGER_SECONDS = 5.0

# Longest reason text sent in an ERROR frame (keeps it far below any guest's max_payload).
_MAX_REASON = 512

_KNOWN_POOL_FLAGS = int(PoolFlag.PERSISTENT | PoolFlag.SHARED | PoolFlag.EXCLUSIVE_GETS)

# guest name -> its swap device's counters, or None if it has none (hostagent/swapserve.py)
DeviceCounters = Callable[[str], "Mapping[str, int] | None"]


class ChannelError(Exception):
    """A reason to close one guest's channel, with the status code its ERROR frame carries."""

    def __init__(self, reason: str, status: Status = Status.PROTOCOL) -> None:
        super().__init__(reason)
        self.status = status


# Counters in guest reports that `hostagent stats` shows per second.
RATE_KEYS = (
    "pgpgin",
    "pgpgout",
    "pswpin",
    "pswpout",
    "pgmajfault",
    "workingset_refault_file",
    "workingset_refault_anon",
    "workingset_refault",
)


class Guest:
    """The host's view of one guest: engine client, live channel, last report.

    `name` is the engine client's name, the guest's identity: a configured name for a socket guest,
    the domain UUID for a libvirt domain (whose name is then only `display`).
    """

    def __init__(
        self, name: str, socket_path: str, client: Client, *, display: str = "", domain: str | None = None
    ) -> None:
        self.name = name
        self.display = display or name
        self.domain = domain  # libvirt domain UUID, if the guest is a domain
        self.socket_path = socket_path
        self.client = client
        self.channel: GuestChannel | None = None
        self.connected_since: float | None = None  # wall clock (time.time()) of the connection
        self.lingering: set[GuestChannel] = set()  # closed, still flushing their last replies
        self.hello_name = ""  # the display name the guest sent in HELLO
        self.report: dict[str, int] | None = None  # latest STATS values
        self.report_time = 0.0  # time.monotonic() when `report` arrived
        self.rates: dict[str, float] = {}  # per second, between the last two reports

    def record_report(self, values: dict[str, int], now: float) -> None:
        old, then = self.report, self.report_time
        if old is not None and now > then:
            self.rates = {
                k: round((values[k] - old[k]) / (now - then), 2)
                for k in RATE_KEYS
                if k in values and k in old and values[k] >= old[k]
            }
        self.report, self.report_time = values, now

    @property
    def connected(self) -> bool:
        """A session is up: the channel is open and the guest's agent has shaken hands."""
        return self.channel is not None and self.channel.session.welcomed

    def send_notice(self, kind: wire.Notice, value: int) -> bool:
        """Send a NOTICE if the guest is connected; False if it is not (nothing is queued)."""
        return self.channel is not None and self.channel.send_notice(kind, value)

    def close_channel(self, reason: str) -> None:
        if self.channel is not None:
            self.channel.close(reason, Status.INVALID)


class GuestChannel(asyncio.Protocol):
    """One connection of one guest. A newer connection on the same socket replaces it."""

    def __init__(
        self,
        guest: Guest,
        engine: PoolEngine,
        *,
        max_payload: int,
        max_vector: int,
        device_counters: DeviceCounters | None = None,
    ) -> None:
        self.guest = guest
        self.engine = engine
        self.device_counters = device_counters
        self.session = HostSession(max_payload, max_vector)  # HELLO first, the limits announced
        self.reader = self.session.reader()
        self.transport: asyncio.Transport | None = None
        self.attached = False  # owns guest.channel and the engine client's connection
        self.congested = False  # reading paused: more than HIGH_WATER of replies wait unwritten
        self.aborted = False  # dropped with replies unwritten (connection_lost then says exc=None)
        # Frames decoded but not yet applied because the guest is not reading its replies, and the
        # protocol error (if any) that followed them.
        self.pending: list[wire.Frame] = []
        self.pending_error: wire.ProtocolError | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Exclusive persistent gets answered but not yet handed to the kernel: freed once the
        # transport's buffer is empty, put back if the channel dies first (see PoolEngine.get).
        self.held: list[Held] = []
        self.linger: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        # Told of every write that leaves bytes queued (pause_writing) and of the moment the queue
        # is empty again (resume_writing): that moment is when held gets are delivered.
        transport.set_write_buffer_limits(high=0, low=0)
        guest = self.guest
        for stale in list(guest.lingering):
            stale.abort("the guest connected again")
        old = guest.channel
        if old is not None:
            log.warning("guest %s: a new connection replaces the current one", guest.name)
            # Synchronously, so the old channel's pools are gone before the new one says HELLO.
            old.close("replaced by a new connection on the same socket", Status.INVALID)
        guest.channel = self
        guest.connected_since = time.time()
        self.attached = True
        log.info("guest %s: connected", guest.name)

    def data_received(self, data: bytes) -> None:
        if not self.attached:
            return
        broken: wire.ProtocolError | None = None
        try:
            frames = self.reader.feed(data)
        except wire.ProtocolError as err:
            # Apply the good frames that came before the bad one: requests are applied in order.
            frames, broken = err.frames, err
        if self.pending or self.pending_error is not None:  # keep order behind frames still waiting
            self.pending.extend(frames)
            self.pending_error = self.pending_error or broken
            return
        self._apply(frames, broken)

    def _apply(self, frames: list[wire.Frame], broken: wire.ProtocolError | None) -> None:
        """Apply frames in order, answering in one write, unless the replies pile up unread.

        Every CHECK_EVERY frames the replies so far are measured; past HIGH_WATER they are written
        at once, and if the transport then says the guest is not reading, the rest of the frames
        wait in `pending` until it drains: one read of small GETs cannot make megabytes of replies.
        """
        out: list[bytes] = []
        try:
            for i, frame in enumerate(frames, 1):
                try:
                    self._handle(frame, out)
                except UnknownPool:
                    raise ChannelError(
                        f"{_op_name(frame.opcode)} on pool {frame.pool}, which this guest does not own"
                    ) from None
                if i % CHECK_EVERY == 0 and sum(map(len, out)) > HIGH_WATER:
                    self._write(out)
                    out = []
                    if self.congested and i < len(frames):
                        self.pending = frames[i:]
                        self.pending_error = broken
                        return
            if broken is not None:
                raise broken
        except (wire.ProtocolError, ChannelError) as err:
            self._fail(str(err), err.status, out)
            return
        except Exception as err:  # an engine bug must cost one channel, not the agent
            log.exception("guest %s: internal error", self.guest.name)
            self._fail(f"internal error: {type(err).__name__}", Status.INVALID, out)
            return
        if out:
            self._write(out)
        self._release_delivered()

    def _write(self, out: list[bytes]) -> None:
        """Write replies; past HIGH_WATER queued, stop reading until the queue is empty."""
        transport = self.transport
        assert transport is not None
        transport.write(b"".join(out))
        if not self.congested and transport.get_write_buffer_size() > HIGH_WATER:
            self.congested = True
            transport.pause_reading()

    def _release_delivered(self) -> None:
        """Free the slots of held gets once every reply is in the kernel (the guest will get it).

        Not on a transport that is closing: after a failed write its buffer is empty too, but
        nothing was delivered (connection_lost then restores the pages).
        """
        transport = self.transport
        if (
            self.held
            and transport is not None
            and not transport.is_closing()
            and transport.get_write_buffer_size() == 0
        ):
            self.engine.release_held(self.held)

    def abort(self, reason: str) -> None:
        """Drop the connection now, replies unwritten (their held pages go back)."""
        if self.transport is not None and not self.aborted:
            log.info("guest %s: dropping a closed connection: %s", self.guest.name, reason)
            self.aborted = True
            self.transport.abort()

    def eof_received(self) -> bool | None:
        if self.attached:
            try:
                self.reader.eof()
            except wire.ProtocolError as err:
                self._fail(str(err), err.status, [])
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.guest.lingering.discard(self)
        if self.linger is not None:
            self.linger.cancel()
        if self.held:
            # A clean end (no error, not aborted) means the transport wrote everything it was given.
            if exc is None and not self.aborted:
                self.engine.release_held(self.held)
            else:
                self.engine.restore_held(self.held)
        if self.attached:
            if exc is None or isinstance(exc, (BrokenPipeError, ConnectionResetError)):
                log.info("guest %s: disconnected", self.guest.name)  # a guest may just go away
            else:
                log.warning("guest %s: connection lost: %s", self.guest.name, exc)
            self._detach()

    def pause_writing(self) -> None:
        """Some replies wait in the transport (flow control is `_write`'s, at HIGH_WATER)."""

    def resume_writing(self) -> None:
        """Every reply written is in the kernel now.

        Frames that waited are applied in a callback of their own: this runs inside the transport's
        write handler, which must not see the transport closed under it (a protocol error among
        those frames closes the channel).
        """
        self._release_delivered()
        if self.transport is None or not self.attached or not self.congested:
            return
        self.congested = False
        asyncio.get_running_loop().call_soon(self._apply_pending)

    def _apply_pending(self) -> None:
        if self.transport is None or not self.attached or self.congested:
            return
        if self.pending or self.pending_error is not None:
            frames, broken = self.pending, self.pending_error
            self.pending, self.pending_error = [], None
            self._apply(frames, broken)
            if self.congested or not self.attached:
                return
        self.transport.resume_reading()

    # -- host-initiated ---------------------------------------------------------------------------

    def send_notice(self, kind: wire.Notice, value: int) -> bool:
        if not (self.attached and self.session.welcomed) or self.transport is None:
            return False
        self.transport.write(wire.encode(wire.Frame(Op.NOTICE, payload=wire.notice_payload(kind, value))))
        return True

    def close(self, reason: str, status: Status = Status.INVALID) -> None:
        """Close this channel from the host side, telling the guest why."""
        if self.attached:
            self._fail(reason, status, [], level=logging.INFO)

    # -- internals --------------------------------------------------------------------------------

    def _fail(self, reason: str, status: Status, out: list[bytes], level: int = logging.WARNING) -> None:
        """Send what was answered so far, then ERROR; close; drop the guest's ephemeral pools."""
        log.log(level, "guest %s: closing channel: %s", self.guest.name, reason)
        text = wire.error_payload(reason)[:_MAX_REASON]
        out.append(wire.encode(wire.Frame(Op.ERROR, status=int(status), payload=text)))
        transport = self.transport
        assert transport is not None
        transport.write(b"".join(out))
        self._release_delivered()
        transport.close()  # after what is queued is written; connection_lost then releases the rest
        if transport.get_write_buffer_size() > 0:
            self.guest.lingering.add(self)
            self.linger = asyncio.get_running_loop().call_later(
                LINGER_SECONDS, self.abort, "its guest did not read the last replies"
            )
        self._detach()

    def _detach(self) -> None:
        self.attached = False
        guest = self.guest
        if guest.channel is self:
            guest.channel = None
            guest.connected_since = None
        if self.session.welcomed:
            self.engine.disconnect(guest.client)

    def _handle(self, f: wire.Frame, out: list[bytes]) -> None:  # noqa: C901 (the opcode dispatch, most frequent first (mypyc hot path))
        """Apply one request; append its reply (if any) to `out`. Most frequent ops first."""
        op = f.opcode
        if not self.session.welcomed:
            self._hello(f, out)
            return
        engine = self.engine
        client = self.guest.client
        if op == PUT:
            ok = engine.put(client, f.pool, f.oid, f.index, f.payload)
            if not f.flags & NOREPLY:
                out.append(pack_reply(PUT, OK if ok else NO_SPACE, f.request_id, f.pool, f.oid, f.index, 0))
        elif op == GET:
            page = engine.get(client, f.pool, f.oid, f.index, self.held)
            if page is None:
                out.append(pack_reply(GET, NOT_FOUND, f.request_id, f.pool, f.oid, f.index, 0))
            else:
                out.append(pack_reply(GET, OK, f.request_id, f.pool, f.oid, f.index, len(page)))
                out.append(page)
        elif op == FLUSH_PAGE:
            engine.flush_page(client, f.pool, f.oid, f.index)
            if not f.flags & NOREPLY:
                out.append(pack_reply(op, OK, f.request_id, f.pool, f.oid, f.index, 0))
        elif op == PUT_VEC:
            keys, pages = wire.parse_put_vec(f.payload, f.index)
            pool = f.pool
            statuses = bytes(
                [
                    OK if engine.put(client, pool, oid, index, page) else NO_SPACE
                    for (oid, index), page in zip(keys, pages, strict=True)
                ]
            )
            if not f.flags & NOREPLY:
                self._reply(out, f, payload=statuses)
        elif op == GET_VEC:
            pool = f.pool
            found = [
                engine.get(client, pool, oid, index, self.held)
                for oid, index in wire.parse_keys(f.payload, f.index)
            ]
            statuses = bytes([NOT_FOUND if p is None else OK for p in found])
            self._reply(
                out,
                f,
                payload=wire.get_vec_reply_payload(list(statuses), [p for p in found if p is not None]),
            )
        elif op == FLUSH_VEC:
            pool = f.pool
            for oid, index in wire.parse_keys(f.payload, f.index):
                engine.flush_page(client, pool, oid, index)
            if not f.flags & NOREPLY:
                self._reply(out, f)
        elif op == FLUSH_OBJECT:
            engine.flush_object(client, f.pool, f.oid)
            if not f.flags & NOREPLY:
                self._reply(out, f)
        elif op == STATS:
            self.guest.record_report(wire.parse_stats(f.payload), time.monotonic())
        elif op == Op.QUERY_POOL:
            flags = engine.pool_flags(client, f.pool)
            if flags is None:
                self._reply(out, f, Status.NO_POOL)
            else:
                self._reply(out, f, payload=wire.pool_flags_payload(flags))
        elif op == Op.NEW_POOL:
            self._new_pool(f, out)
        elif op == Op.DEVICE_STATS:
            # The device of the guest this socket belongs to; the frame names nothing.
            lookup = self.device_counters
            values = None if lookup is None else lookup(self.guest.name)
            if values is None:
                self._reply(out, f, Status.NOT_FOUND)
            else:
                self._reply(out, f, payload=wire.stats_payload(values))
        elif op == Op.DESTROY_POOL:
            engine.destroy_pool(client, f.pool)
            self._reply(out, f)
        elif op == HELLO:
            # A virtio-serial port does not tell the host when the guest's agent closes and reopens
            # it: a new HELLO is how a restarted guest agent says so. Its ephemeral pools are gone
            # (as after a disconnect); persistent ones wait for it, as always.
            log.info("guest %s: new session on the open channel (guest agent restarted)", self.guest.name)
            self.engine.disconnect(client)
            self.session.restart()
            self._hello(f, out)
        else:  # the decoder admits only requests; a new opcode must be handled here
            raise ChannelError(f"opcode {_op_name(op)} is not served by this host")

    def _hello(self, f: wire.Frame, out: list[bytes]) -> None:
        """Answer the HELLO that must open a session (the rules are the protocol's session's)."""
        try:
            out.append(self.session.receive_hello(f))
        except HandshakeRefused as err:
            out.append(err.reply)
            raise ChannelError(str(err), err.status) from None
        except SessionError as err:
            raise ChannelError(str(err), err.status) from None
        guest = self.guest
        guest.hello_name = self.session.hello_name
        log.info("guest %s: handshake done (calls itself %r)", guest.name, guest.hello_name)

    def _new_pool(self, f: wire.Frame, out: list[bytes]) -> None:
        flags, uuid = wire.parse_pool_spec(f.payload)
        if flags & ~_KNOWN_POOL_FLAGS:
            self._reply(out, f, Status.INVALID)
            return
        try:
            pool_id = self.engine.new_pool(self.guest.client, flags, uuid)
        except PoolDenied as err:
            log.warning("guest %s: shared pool denied: %s", self.guest.name, err)
            self._reply(out, f, Status.DENIED)
        except OutOfSpace:
            self._reply(out, f, Status.NO_SPACE)
        except UnknownPool:
            raise
        except EngineError as err:
            log.warning("guest %s: pool refused: %s", self.guest.name, err)
            self._reply(out, f, Status.INVALID)
        else:
            out.append(pack_reply(f.opcode, OK, f.request_id, pool_id, f.oid, f.index, 0))

    @staticmethod
    def _reply(out: list[bytes], f: wire.Frame, status: int = OK, payload: bytes = b"") -> None:
        """Append a reply echoing the request's pool, oid and index (vector replies need n back)."""
        out.append(pack_reply(f.opcode, status, f.request_id, f.pool, f.oid, f.index, len(payload)))
        if payload:
            out.append(payload)


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)
