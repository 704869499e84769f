"""The session rules of the tmem protocol, sans-IO, in the style of h11's `Connection`.

One object per side: `GuestSession` (the guest agent's role) and `HostSession` (the host
agent's, one per guest connection).  They own what the codec cannot see frame by frame: HELLO
comes first, the limits the host announces in its reply bound what the guest may send (and so
the vector chunk it splits requests into), request ids are allocated and replies matched to
them.  No sockets, no clocks, no logging: the agents do the I/O and feed frames in, so the
rules are the same on both sides and testable byte by byte.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from guestagent.protocol.headers import REPLY, pack_reply
from guestagent.protocol.wire import (
    ALL_FEATURES,
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_VECTOR,
    KEY_SIZE,
    MAX_NAME,
    PAGE_SIZE,
    VERSION,
    Feature,
    Frame,
    FrameReader,
    Hello,
    Op,
    ProtocolError,
    Role,
    Status,
    Welcome,
    hello_payload,
    parse_hello,
    parse_welcome,
    welcome_payload,
)

__all__ = ["GuestSession", "HandshakeRefused", "HostSession", "SessionError"]

# What the guest accepts from the host: the host is trusted for size, and the vectors a guest
# sends bound what comes back.
GUEST_READ_MAX_PAYLOAD = 1 << 24
GUEST_READ_MAX_VECTOR = 1024
_MAX_RID = 0xFFFF_FFFF

_R = TypeVar("_R")


class SessionError(Exception):
    """The peer broke a session rule; `status` is for the ERROR frame the host then sends."""

    def __init__(self, reason: str, status: Status = Status.PROTOCOL) -> None:
        super().__init__(reason)
        self.status = status


class HandshakeRefused(SessionError):
    """No common protocol: retrying with the same peer cannot help.

    On the host, `reply` is the refusal to send the guest before the ERROR frame.
    """

    def __init__(self, reason: str, status: Status = Status.INVALID, reply: bytes = b"") -> None:
        super().__init__(reason, status)
        self.reply = reply


class GuestSession(Generic[_R]):
    """The guest's side: its HELLO, the host's limits, request ids and the pending table.

    One object for the channel's life: request ids keep counting across reconnects (a
    request stalled by a break is re-sent under its id), and `pending` maps each id to the
    caller's request object (of type `_R`) until `match` hands it its reply.  `restart`
    begins a new connection: the host's limits are unknown again until its WELCOME.
    """

    def __init__(self, name: str, features: int = ALL_FEATURES) -> None:
        if len(name.encode("utf-8")) > MAX_NAME:
            raise ValueError(f"channel name is longer than {MAX_NAME} utf-8 bytes")
        self.name = name
        self.offered = features  # the HELLO header's `index`: what we can use if the host grants it
        self.welcome = Welcome(VERSION, PAGE_SIZE, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_VECTOR)
        self.chunk = DEFAULT_MAX_VECTOR  # keys per vectored request, within the host's limits
        self.welcomed = False
        self.pending: dict[int, _R] = {}
        self.rid = 0  # the last request id handed out

    def next_rid(self) -> int:
        """The id for the next request (1..2**32-1, wrapping; 0 is for notices)."""
        rid = self.rid + 1 if self.rid < _MAX_RID else 1
        self.rid = rid
        return rid

    def reader(self) -> FrameReader:
        """A decoder for one connection's host-to-guest frames."""
        return FrameReader(Role.GUEST, GUEST_READ_MAX_PAYLOAD, GUEST_READ_MAX_VECTOR)

    def restart(self) -> None:
        """A new connection: HELLO must be answered again before anything else is sent."""
        self.welcomed = False

    def hello(self) -> bytes:
        """The HELLO request's payload (send it with `offered` as the header's index)."""
        return hello_payload(Hello(VERSION, VERSION, PAGE_SIZE, self.name))

    def granted(self, feature: Feature) -> bool:
        """The host of this session serves `feature` (a host without it says 0: never ask it)."""
        return self.welcomed and bool(self.welcome.features & feature)

    def welcomed_by(self, frame: Frame) -> Welcome:
        """Take the host's reply to HELLO: its limits now bound what we send.

        Raises HandshakeRefused when no session can be had with this host, ProtocolError when
        the reply is malformed.
        """
        if frame.status != Status.OK:
            raise HandshakeRefused(f"host agent refused the handshake: {_status_name(frame.status)}")
        welcome = parse_welcome(frame.payload)
        if welcome.version != VERSION or welcome.page_size != PAGE_SIZE:
            raise HandshakeRefused(f"host agent speaks {welcome}, we need version {VERSION}")
        if welcome.features & ~self.offered:
            raise ProtocolError(f"host granted features {welcome.features:#x}, we offered {self.offered:#x}")
        self.welcome = welcome
        per_key = KEY_SIZE + PAGE_SIZE
        self.chunk = max(1, min(welcome.max_vector, GUEST_READ_MAX_VECTOR, welcome.max_payload // per_key))
        self.welcomed = True
        return welcome

    def match(self, frame: Frame) -> _R | None:
        """The pending request a reply answers (now no longer pending); None if it is not a
        reply, or its request was given up (a cancelled caller)."""
        if not frame.flags & REPLY:
            return None
        return self.pending.pop(frame.request_id, None)


class HostSession:
    """The host's side of one guest connection: HELLO first, then the limits it announced.

    `receive_hello` answers a HELLO; a frame other than HELLO before it is a `SessionError`.
    A HELLO on a welcomed session starts a new one (a restarted guest agent on a virtio port,
    which never closes): the caller drops what the old session had, then answers it.
    """

    def __init__(self, max_payload: int, max_vector: int, features: int = ALL_FEATURES) -> None:
        self.max_payload = max_payload
        self.max_vector = max_vector
        self.supported = features  # what this host serves
        self.features = 0  # what it granted this session: the guest's offer (HELLO's index) and ours
        self.welcomed = False
        self.hello_name = ""  # what the guest calls itself

    def reader(self) -> FrameReader:
        """A decoder for the guest's frames, bounded by the limits this host announces."""
        return FrameReader(Role.HOST, max_payload=self.max_payload, max_vector=self.max_vector)

    def receive_hello(self, f: Frame) -> bytes:
        """The reply to the guest's first frame, which must be a HELLO we can serve.

        Raises SessionError for any other frame; HandshakeRefused (carrying the refusal to send
        first) for a HELLO without a common version and page size.
        """
        if f.opcode != Op.HELLO:
            raise SessionError(f"first frame must be HELLO, got {_op_name(f.opcode)}")
        hello = parse_hello(f.payload)
        if not hello.min_version <= VERSION <= hello.max_version or hello.page_size != PAGE_SIZE:
            raise HandshakeRefused(
                f"no common protocol: guest offers versions {hello.min_version}.."
                f"{hello.max_version} and page size {hello.page_size}, host speaks {VERSION} "
                f"with {PAGE_SIZE}",
                Status.INVALID,
                pack_reply(f.opcode, Status.INVALID, f.request_id, f.pool, f.oid, f.index, 0),
            )
        # A guest that offers nothing (one from before features) gets 0 there, as it requires.
        self.features = f.index & self.supported
        payload = welcome_payload(
            Welcome(VERSION, PAGE_SIZE, self.max_payload, self.max_vector, self.features)
        )
        self.welcomed = True
        self.hello_name = hello.name
        return pack_reply(f.opcode, Status.OK, f.request_id, f.pool, f.oid, f.index, len(payload)) + payload

    def restart(self) -> None:
        """The guest said HELLO again on this connection: a new session begins."""
        self.welcomed = False


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)


def _status_name(status: int) -> str:
    try:
        return Status(status).name
    except ValueError:
        return str(status)
