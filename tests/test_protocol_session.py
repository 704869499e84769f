"""The protocol's session rules, sans-IO: frames in, decisions out (no sockets, no agents)."""

from __future__ import annotations

import struct

import pytest

from guestagent.protocol import wire
from guestagent.protocol.session import GuestSession, HandshakeRefused, HostSession, SessionError
from guestagent.protocol.wire import Frame, Op, Status


def _hello(
    name: str = "g",
    lo: int = wire.VERSION,
    hi: int = wire.VERSION,
    page_size: int = wire.PAGE_SIZE,
    rid: int = 7,
) -> Frame:
    return Frame(Op.HELLO, request_id=rid, payload=wire.hello_payload(wire.Hello(lo, hi, page_size, name)))


def _decode_one(data: bytes, role: wire.Role) -> list[Frame]:
    return wire.FrameReader(role).feed(data)


def test_host_answers_hello_with_its_limits_and_the_guest_takes_them() -> None:
    host = HostSession(max_payload=1 << 20, max_vector=16)
    guest: GuestSession[object] = GuestSession("vm1")
    request = Frame(Op.HELLO, request_id=guest.next_rid(), payload=guest.hello())
    reply = _decode_one(host.receive_hello(request), wire.Role.GUEST)
    assert host.welcomed and host.hello_name == "vm1"
    assert len(reply) == 1 and reply[0].request_id == request.request_id and reply[0].status == Status.OK
    welcome = guest.welcomed_by(reply[0])
    assert guest.welcomed
    assert (welcome.max_payload, welcome.max_vector) == (1 << 20, 16)
    assert guest.chunk == 16  # the vector limit binds


def test_guest_chunk_is_bounded_by_the_host_payload_limit() -> None:
    host = HostSession(max_payload=4 * (wire.KEY_SIZE + wire.PAGE_SIZE) + 10, max_vector=64)
    guest: GuestSession[object] = GuestSession("")
    (reply,) = _decode_one(host.receive_hello(_hello()), wire.Role.GUEST)
    guest.welcomed_by(reply)
    assert guest.chunk == 4


def test_host_wants_hello_first() -> None:
    host = HostSession(1 << 20, 64)
    with pytest.raises(SessionError, match="first frame must be HELLO, got GET") as err:
        host.receive_hello(Frame(Op.GET, request_id=1))
    assert err.value.status == Status.PROTOCOL and not host.welcomed


def test_host_refuses_a_hello_without_a_common_version_and_says_so_first() -> None:
    host = HostSession(1 << 20, 64)
    with pytest.raises(HandshakeRefused, match="no common protocol") as err:
        host.receive_hello(_hello(lo=wire.VERSION + 1, hi=wire.VERSION + 2))
    (refusal,) = _decode_one(err.value.reply, wire.Role.GUEST)
    assert (refusal.opcode, refusal.status, refusal.request_id) == (Op.HELLO, Status.INVALID, 7)
    assert err.value.status == Status.INVALID and not host.welcomed
    guest: GuestSession[object] = GuestSession("")
    with pytest.raises(HandshakeRefused, match="refused the handshake: INVALID"):
        guest.welcomed_by(refusal)
    assert not guest.welcomed


def test_a_new_hello_restarts_the_host_session() -> None:
    host = HostSession(1 << 20, 64)
    host.receive_hello(_hello("first"))
    host.restart()
    assert not host.welcomed
    host.receive_hello(_hello("second"))
    assert host.welcomed and host.hello_name == "second"


def test_guest_request_ids_wrap_and_skip_zero() -> None:
    guest: GuestSession[str] = GuestSession("")
    assert [guest.next_rid() for _ in range(3)] == [1, 2, 3]
    guest.rid = 0xFFFF_FFFE
    assert [guest.next_rid(), guest.next_rid()] == [0xFFFF_FFFF, 1]


def test_guest_matches_replies_to_pending_requests_once() -> None:
    guest: GuestSession[str] = GuestSession("")
    rid = guest.next_rid()
    guest.pending[rid] = "the request"
    reply = Frame(Op.GET, wire.Flag.REPLY, Status.NOT_FOUND, rid)
    assert guest.match(Frame(Op.NOTICE, payload=wire.notice_payload(wire.Notice.BALLOON_TARGET, 1))) is None
    assert guest.match(reply) == "the request"
    assert guest.match(reply) is None  # answered already (or its caller gave up)
    assert not guest.pending


def test_guest_name_is_bounded() -> None:
    with pytest.raises(ValueError, match="longer than 64"):
        GuestSession("x" * 65)


def test_features_are_granted_only_when_offered_and_served() -> None:
    """The guest offers features in its HELLO header's index; the host grants what it serves too."""
    guest: GuestSession[object] = GuestSession("vm1")
    assert guest.offered == wire.Feature.DEVICE_STATS
    request = Frame(Op.HELLO, request_id=1, index=guest.offered, payload=guest.hello())
    (reply,) = _decode_one(HostSession(1 << 20, 64).receive_hello(request), wire.Role.GUEST)
    assert guest.welcomed_by(reply).features == wire.Feature.DEVICE_STATS
    assert guest.granted(wire.Feature.DEVICE_STATS)
    # a host that serves nothing beyond version 1 grants nothing
    no_features = HostSession(1 << 20, 64, features=0)
    (reply,) = _decode_one(no_features.receive_hello(request), wire.Role.GUEST)
    assert guest.welcomed_by(reply).features == 0 and not guest.granted(wire.Feature.DEVICE_STATS)
    # a guest that offers nothing (one from before features) gets 0 where it requires 0
    host = HostSession(1 << 20, 64)
    raw = host.receive_hello(_hello())
    assert host.features == 0
    assert struct.unpack_from("<H", raw, wire.HEADER_SIZE + 2) == (0,)


def test_an_old_hosts_welcome_grants_nothing() -> None:
    """A version-1 host's reply, as it packed it (the field was reserved, always 0)."""
    old = struct.pack("<HHIII", wire.VERSION, 0, wire.PAGE_SIZE, 1 << 20, 64)
    reply = Frame(Op.HELLO, wire.Flag.REPLY, Status.OK, 1, payload=old)
    (reply,) = _decode_one(wire.encode(reply), wire.Role.GUEST)
    guest: GuestSession[object] = GuestSession("vm1")
    assert not guest.granted(wire.Feature.DEVICE_STATS)  # nor before any welcome
    guest.welcomed_by(reply)
    assert guest.welcomed and not guest.granted(wire.Feature.DEVICE_STATS)


def test_a_host_granting_what_was_not_offered_breaks_the_protocol() -> None:
    guest: GuestSession[object] = GuestSession("vm1", features=0)
    grant = wire.welcome_payload(wire.Welcome(wire.VERSION, wire.PAGE_SIZE, 1 << 20, 64, 1))
    (reply,) = _decode_one(
        wire.encode(Frame(Op.HELLO, wire.Flag.REPLY, Status.OK, 1, payload=grant)), wire.Role.GUEST
    )
    with pytest.raises(wire.ProtocolError, match="granted features 0x1, we offered 0x0"):
        guest.welcomed_by(reply)
