"""Tests for the sans-IO wire codec: feed bytes, check frames (no sockets anywhere)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guestagent.protocol import wire
from guestagent.protocol.wire import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_VECTOR,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    NO_OID,
    PAGE_SIZE,
    VERSION,
    Feature,
    Flag,
    Frame,
    FrameReader,
    Hello,
    Notice,
    Op,
    PoolFlag,
    ProtocolError,
    Role,
    Status,
    Welcome,
    encode,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUICK = settings(max_examples=100, deadline=None)

OID = bytes(range(1, 25))
OID2 = bytes(range(101, 125))
PAGE_A = bytes(range(256)) * 16
PAGE_B = bytes(reversed(range(256))) * 16
UUID = bytes(range(16))
R, NR = int(Flag.REPLY), int(Flag.NOREPLY)


def raw(
    op: int,
    *,
    flags: int = 0,
    status: int = 0,
    rid: int = 0,
    pool: int = 0,
    oid: bytes = NO_OID,
    index: int = 0,
    payload: bytes = b"",
    magic: int = MAGIC,
    version: int = VERSION,
    reserved: int = 0,
    length: int | None = None,
) -> bytes:
    """Pack a frame bypassing encode()'s checks, so tests can build any bad header."""
    n = len(payload) if length is None else length
    return HEADER.pack(magic, version, op, flags, status, reserved, rid, pool, oid, index, n) + (payload)


def decode_all(role: Role, data: bytes, **kw: int) -> list[Frame]:
    reader = FrameReader(role, **kw)
    frames = reader.feed(data)
    reader.eof()
    return frames


# --------------------------------------------------------------------------- sample frames

HELLO = Hello(1, 1, PAGE_SIZE, "guest-ü-1")
WELCOME = Welcome(1, PAGE_SIZE, DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_VECTOR)
KEYS3 = [(OID, 0), (OID2, 7), (NO_OID, 0xFFFF_FFFF)]

REQUESTS: list[Frame] = [
    Frame(Op.HELLO, request_id=1, payload=wire.hello_payload(HELLO)),
    Frame(Op.HELLO, request_id=1, payload=wire.hello_payload(Hello(1, 3, 8192, ""))),
    Frame(Op.NEW_POOL, request_id=2, payload=wire.pool_spec_payload(PoolFlag.PERSISTENT)),
    Frame(
        Op.NEW_POOL,
        request_id=3,
        payload=wire.pool_spec_payload(PoolFlag.SHARED | PoolFlag.EXCLUSIVE_GETS, UUID),
    ),
    Frame(Op.DESTROY_POOL, request_id=4, pool=3),
    Frame(Op.QUERY_POOL, request_id=5, pool=3),
    Frame(Op.PUT, request_id=6, pool=3, oid=OID, index=9, payload=PAGE_A),
    Frame(Op.PUT, NR, request_id=0xFFFF_FFFF, pool=0xFFFF_FFFF, oid=OID2, payload=PAGE_B),
    Frame(Op.GET, request_id=7, pool=3, oid=OID, index=9),
    Frame(Op.FLUSH_PAGE, request_id=8, pool=3, oid=OID, index=9),
    Frame(Op.FLUSH_PAGE, NR, request_id=9, pool=3, oid=OID, index=9),
    Frame(Op.FLUSH_OBJECT, request_id=10, pool=3, oid=OID),
    Frame(Op.FLUSH_OBJECT, NR, request_id=11, pool=3, oid=OID2),
    Frame(
        Op.PUT_VEC,
        request_id=12,
        pool=3,
        index=2,
        payload=wire.put_vec_payload(KEYS3[:2], [PAGE_A, PAGE_B]),
    ),
    Frame(Op.PUT_VEC, NR, pool=3, index=1, payload=wire.put_vec_payload(KEYS3[2:], [PAGE_B])),
    Frame(Op.GET_VEC, request_id=13, pool=3, index=3, payload=wire.keys_payload(KEYS3)),
    Frame(Op.FLUSH_VEC, request_id=14, pool=3, index=3, payload=wire.keys_payload(KEYS3)),
    Frame(Op.FLUSH_VEC, NR, pool=3, index=1, payload=wire.keys_payload(KEYS3[:1])),
    Frame(Op.STATS, payload=wire.stats_payload({"puts": 5, "gets_missed": -(2**63)})),
    Frame(Op.STATS),
    Frame(Op.DEVICE_STATS, request_id=15),
]


def _reply(op: Op, status: Status = Status.OK, payload: bytes = b"", **kw: int) -> Frame:
    return Frame(op, R, status, kw.pop("request_id", 42), payload=payload, **kw)  # type: ignore[arg-type]


REPLIES: list[Frame] = [
    _reply(Op.HELLO, payload=wire.welcome_payload(WELCOME)),
    _reply(Op.HELLO, Status.INVALID),
    _reply(Op.NEW_POOL, pool=7),
    _reply(Op.NEW_POOL, Status.DENIED),
    _reply(Op.NEW_POOL, Status.NO_SPACE),
    _reply(Op.DESTROY_POOL, pool=7),
    _reply(Op.QUERY_POOL, pool=7, payload=wire.pool_flags_payload(PoolFlag.PERSISTENT)),
    _reply(Op.QUERY_POOL, Status.NO_POOL, pool=7),
    _reply(Op.PUT, pool=7),
    _reply(Op.PUT, Status.NO_SPACE, pool=7),
    _reply(Op.GET, pool=7, payload=PAGE_A, index=5),
    _reply(Op.GET, Status.NOT_FOUND, pool=7),
    _reply(Op.FLUSH_PAGE),
    _reply(Op.FLUSH_OBJECT),
    _reply(Op.PUT_VEC, index=2, payload=wire.status_vector_payload([Status.OK, Status.NO_SPACE])),
    _reply(Op.PUT_VEC, Status.NO_POOL, index=2),
    _reply(
        Op.GET_VEC,
        index=3,
        payload=wire.get_vec_reply_payload([Status.OK, Status.NOT_FOUND, Status.OK], [PAGE_A, PAGE_B]),
    ),
    _reply(Op.GET_VEC, index=1, payload=bytes([Status.NOT_FOUND])),
    _reply(Op.GET_VEC, Status.NO_POOL, index=4),
    _reply(Op.FLUSH_VEC, index=3),
    Frame(Op.NOTICE, payload=wire.notice_payload(Notice.SHRINK_PERSISTENT, 1000)),
    Frame(Op.NOTICE, payload=wire.notice_payload(Notice.BALLOON_TARGET, 2**64 - 1)),
    Frame(Op.ERROR, status=Status.PROTOCOL, payload=wire.error_payload("bad magic")),
    Frame(Op.ERROR, status=Status.INVALID, request_id=9),
    _reply(Op.HELLO, payload=wire.welcome_payload(Welcome(1, PAGE_SIZE, 1 << 20, 64, Feature.DEVICE_STATS))),
    _reply(Op.DEVICE_STATS, payload=wire.stats_payload({"puts": 3, "pool_pages": 2})),
    _reply(Op.DEVICE_STATS, Status.NOT_FOUND),
]

SAMPLES = [(Role.HOST, f) for f in REQUESTS] + [(Role.GUEST, f) for f in REPLIES]
HOST_STREAM = b"".join(encode(f) for f in REQUESTS)
GUEST_STREAM = b"".join(encode(f) for f in REPLIES)
STREAMS = {Role.HOST: (HOST_STREAM, REQUESTS), Role.GUEST: (GUEST_STREAM, REPLIES)}


def test_samples_cover_every_op_in_its_direction() -> None:
    assert {f.opcode for f in REQUESTS} == set(wire.REQUEST_OPS) | {Op.STATS}
    assert {f.opcode for f in REPLIES} == set(wire.REQUEST_OPS) | {Op.NOTICE, Op.ERROR}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize(("role", "frame"), SAMPLES, ids=lambda x: getattr(x, "name", None))
def test_round_trip_every_op(role: Role, frame: Frame) -> None:
    data = encode(frame)
    assert len(data) == HEADER_SIZE + len(frame.payload)
    assert HEADER.unpack_from(data)[-1] == len(frame.payload)
    (got,) = decode_all(role, data)
    assert got == frame
    assert type(got.payload) is bytes and type(got.oid) is bytes


def test_decoded_structured_payloads_parse_back() -> None:
    host = {f.opcode: f for f in decode_all(Role.HOST, HOST_STREAM)}  # keeps the last of each
    assert wire.parse_hello(host[Op.HELLO].payload) == Hello(1, 3, 8192, "")
    assert wire.parse_pool_spec(host[Op.NEW_POOL].payload) == (
        PoolFlag.SHARED | PoolFlag.EXCLUSIVE_GETS,
        UUID,
    )
    assert wire.parse_keys(host[Op.FLUSH_VEC].payload, 1) == KEYS3[:1]
    assert wire.parse_put_vec(host[Op.PUT_VEC].payload, 1) == (KEYS3[2:], [PAGE_B])
    assert wire.parse_stats(host[Op.STATS].payload) == {}
    guest = decode_all(Role.GUEST, GUEST_STREAM)
    assert wire.parse_welcome(guest[0].payload) == WELCOME
    assert wire.parse_pool_flags(guest[6].payload) == PoolFlag.PERSISTENT
    assert wire.parse_status_vector(guest[14].payload, 2) == [Status.OK, Status.NO_SPACE]
    assert wire.parse_get_vec_reply(guest[16].payload, 3) == [PAGE_A, None, PAGE_B]
    assert wire.parse_notice(guest[21].payload) == (Notice.BALLOON_TARGET, 2**64 - 1)
    assert wire.parse_error(guest[22].payload) == "bad magic"


def test_reply_to_echoes_the_request() -> None:
    req = Frame(Op.GET_VEC, request_id=77, pool=3, index=3, payload=wire.keys_payload(KEYS3))
    rep = wire.reply_to(req, payload=wire.get_vec_reply_payload([1, 1, 1], [None] * 3))
    assert rep == Frame(Op.GET_VEC, R, 0, 77, 3, NO_OID, 3, bytes([1, 1, 1]))
    assert decode_all(Role.GUEST, encode(rep)) == [rep]
    new_pool = wire.reply_to(Frame(Op.NEW_POOL, request_id=5), pool=9)
    assert (new_pool.pool, new_pool.flags, new_pool.request_id) == (9, R, 5)


# Hypothesis strategies for arbitrary valid frames in each direction.
u32 = st.integers(0, 0xFFFF_FFFF)
oids = st.binary(min_size=24, max_size=24)
pages = st.sampled_from([PAGE_A, PAGE_B, bytes(PAGE_SIZE)])
keys = st.tuples(oids, u32)
statuses = st.sampled_from(list(Status))


@st.composite
def requests(draw: st.DrawFn) -> Frame:
    op = draw(st.sampled_from([*wire.REQUEST_OPS, Op.STATS]))
    flags = NR if op in wire.NOREPLY_OPS and draw(st.booleans()) else 0
    rid, pool, oid, index = draw(u32), draw(u32), draw(oids), draw(u32)
    payload = b""
    if op == Op.HELLO:
        name = draw(st.text(max_size=16))
        payload = wire.hello_payload(Hello(draw(u32) & 0xFFFF, 1, draw(u32), name))
    elif op == Op.NEW_POOL:
        payload = wire.pool_spec_payload(draw(st.integers(0, 7)), draw(st.binary(min_size=16, max_size=16)))
    elif op == Op.PUT:
        payload = draw(pages)
    elif op == Op.FLUSH_OBJECT:
        index = 0
    elif op in wire.VECTOR_OPS:
        ks = draw(st.lists(keys, min_size=1, max_size=5))
        index = len(ks)
        if op == Op.PUT_VEC:
            payload = wire.put_vec_payload(ks, draw(st.lists(pages, min_size=index, max_size=index)))
        else:
            payload = wire.keys_payload(ks)
    elif op == Op.STATS:
        names = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=9)
        payload = wire.stats_payload(
            draw(st.dictionaries(names, st.integers(-(2**63), 2**63 - 1), max_size=4))
        )
    return Frame(op, flags, 0, rid, pool, oid, index, payload)


@st.composite
def replies(draw: st.DrawFn) -> Frame:
    op = draw(st.sampled_from([*wire.REQUEST_OPS, Op.NOTICE, Op.ERROR]))
    rid, pool, oid, index = draw(u32), draw(u32), draw(oids), draw(u32)
    if op == Op.NOTICE:
        kind = draw(st.sampled_from(list(Notice)))
        return Frame(op, 0, 0, 0, pool, oid, index, wire.notice_payload(kind, draw(u32)))
    status = draw(statuses)
    if op == Op.ERROR:
        return Frame(op, 0, status, rid, pool, oid, index, draw(st.text()).encode())
    payload = b""
    if op in (Op.PUT_VEC, Op.GET_VEC) and (status == Status.OK or draw(st.booleans())):
        vec = draw(st.lists(statuses, min_size=1, max_size=5))
        index = len(vec)
        if op == Op.PUT_VEC:
            payload = wire.status_vector_payload(vec)
        else:
            payload = wire.get_vec_reply_payload(vec, [draw(pages) for _ in vec])
    elif status == Status.OK:
        if op == Op.HELLO:
            payload = wire.welcome_payload(Welcome(1, draw(u32), draw(u32), draw(u32)))
        elif op == Op.QUERY_POOL:
            payload = wire.pool_flags_payload(draw(st.integers(0, 7)))
        elif op == Op.GET:
            payload = draw(pages)
    return Frame(op, R, status, rid, pool, oid, index, payload)


@pytest.mark.parametrize(("frames", "role"), [(requests(), Role.HOST), (replies(), Role.GUEST)])
@QUICK
@given(data=st.data())
def test_random_frames_round_trip_in_random_chunks(
    frames: st.SearchStrategy[Frame], role: Role, data: st.DataObject
) -> None:
    """Requests as the host reads them, replies as the guest does, cut anywhere."""
    drawn = data.draw(st.lists(frames, max_size=6))
    stream = b"".join(encode(f) for f in drawn)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    assert feed_chunks(role, stream, cuts) == drawn


def feed_chunks(role: Role, stream: bytes, cuts: list[int]) -> list[Frame]:
    reader = FrameReader(role)
    out: list[Frame] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out += reader.feed(stream[a:b])
    reader.eof()
    assert reader.buffered == 0
    return out


# --------------------------------------------------------------------------- split points


@pytest.mark.parametrize("role", list(Role))
def test_stream_fed_one_byte_at_a_time(role: Role) -> None:
    stream, frames = STREAMS[role]
    reader = FrameReader(role)
    out: list[Frame] = []
    for i in range(len(stream)):
        out += reader.feed(stream[i : i + 1])
    reader.eof()
    assert out == frames


@pytest.mark.parametrize("role", list(Role))
def test_stream_fed_at_every_two_way_split(role: Role) -> None:
    stream, frames = STREAMS[role]
    for cut in range(len(stream) + 1):
        reader = FrameReader(role)
        first = reader.feed(stream[:cut])
        assert reader.buffered == cut - sum(HEADER_SIZE + len(f.payload) for f in first)
        rest = reader.feed(stream[cut:])
        reader.eof()
        assert first + rest == frames, cut


@pytest.mark.parametrize("view", [False, True], ids=["bytearray", "memoryview"])
def test_non_bytes_input_and_caller_buffer_reuse(view: bool) -> None:
    stream, frames = STREAMS[Role.HOST]
    reader = FrameReader(Role.HOST)
    out: list[Frame] = []
    for at in range(0, len(stream), 5000):
        scratch = bytearray(stream[at : at + 5000])
        out += reader.feed(memoryview(scratch) if view else scratch)
        scratch[:] = bytes(len(scratch))  # the caller reuses its buffer: frames must not alias it
    reader.eof()
    assert out == frames


@pytest.mark.parametrize(("role", "frame"), SAMPLES)
def test_feed_one_decodes_plain_frames_alone_or_declines(role: Role, frame: Frame) -> None:
    data = bytearray(encode(frame))
    reader = FrameReader(role)
    one = reader.feed_one(memoryview(data))
    plain = (
        frame.opcode
        in (Op.NEW_POOL, Op.DESTROY_POOL, Op.PUT, Op.GET, Op.FLUSH_PAGE, Op.FLUSH_OBJECT, Op.FLUSH_VEC)
        and role is Role.GUEST
    )
    if plain or (
        role is Role.HOST
        and frame.opcode in (Op.DESTROY_POOL, Op.QUERY_POOL, Op.PUT, Op.GET, Op.FLUSH_PAGE, Op.DEVICE_STATS)
    ):
        assert one == frame
        data[:] = bytes(len(data))  # the caller reuses its buffer: the frame must not alias it
        assert one == frame
    else:  # checked kinds (and the variable-length ones) are left to feed
        assert one is None
    assert reader.buffered == 0
    assert reader.feed(encode(frame)) == [frame]  # the reader is as it was


def test_feed_one_declines_partial_extra_or_buffered_input() -> None:
    get = encode(REPLIES[10])
    reader = FrameReader(Role.GUEST)
    assert reader.feed_one(memoryview(get[:-1])) is None
    assert reader.feed_one(memoryview(get + get)) is None
    assert reader.feed_one(memoryview(get[: HEADER_SIZE - 1])) is None
    assert reader.feed(get[:100]) == []
    assert reader.feed_one(memoryview(get)) is None  # a partial frame is buffered: feed it all
    assert reader.feed(get[100:]) == [REPLIES[10]]
    assert reader.feed_one(memoryview(get)) == REPLIES[10]
    with pytest.raises(ProtocolError):
        reader.feed(b"\0" * HEADER_SIZE)
    assert reader.feed_one(memoryview(get)) is None  # a broken reader stays broken


def test_buffer_is_compacted_and_bounded() -> None:
    put = encode(Frame(Op.PUT, NR, pool=1, oid=OID, payload=PAGE_A))
    stream = put * 200
    reader = FrameReader(Role.HOST)
    got = 0
    peak = 0
    for at in range(0, len(stream), 3000):  # frames straddle feeds, so the buffer path is used
        got += len(reader.feed(bytearray(stream[at : at + 3000])))
        peak = max(peak, len(reader._buf))
        assert reader.buffered < len(put)
    assert got == 200
    assert peak <= wire._COMPACT_AT + len(put) + 3000


# --------------------------------------------------------------------------- fuzzing


def run_reader(role: Role, data: bytes, chunk: int) -> tuple[list[Frame], ProtocolError | None]:
    """Feed data in chunks; collect frames and the first ProtocolError (anything else fails)."""
    reader = FrameReader(role)
    out: list[Frame] = []
    try:
        for at in range(0, len(data), chunk):
            out += reader.feed(data[at : at + chunk])
        reader.eof()
    except ProtocolError as err:
        out += err.frames
        with pytest.raises(ProtocolError):
            reader.feed(b"")
        with pytest.raises(ProtocolError):
            reader.feed(encode(REQUESTS[0] if role is Role.HOST else REPLIES[0]))
        with pytest.raises(ProtocolError):
            reader.eof()
        return out, err
    return out, None


def check_outcome(role: Role, data: bytes) -> None:
    whole = run_reader(role, data, max(len(data), 1))
    for chunk in (1, 7, 4096):
        frames, err = run_reader(role, data, chunk)
        assert frames == whole[0]
        assert (err is None) == (whole[1] is None)
    for f in whole[0]:  # whatever the reader let through, it accepts again after re-encoding
        assert decode_all(role, encode(f)) == [f]
    one = FrameReader(role).feed_one(memoryview(data))
    if one is not None:  # the shortcut admits nothing that feed would not, and decodes it alike
        assert whole == ([one], None)


@FUZZ
@given(st.sampled_from(list(Role)), st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(role: Role, data: bytes) -> None:
    check_outcome(role, data)


@FUZZ
@given(st.sampled_from(list(Role)), st.binary(max_size=120))
def test_random_bytes_after_valid_magic(role: Role, data: bytes) -> None:
    check_outcome(role, struct.pack("<HB", MAGIC, VERSION) + data)


@st.composite
def mutated_streams(draw: st.DrawFn) -> tuple[Role, bytes]:
    role = draw(st.sampled_from(list(Role)))
    pool = REQUESTS if role is Role.HOST else REPLIES
    data = bytearray(b"".join(encode(f) for f in draw(st.lists(st.sampled_from(pool), max_size=4))))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif at < len(data):
            if kind == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif kind == "set":
                data[at] = draw(st.integers(0, 255))
            else:
                del data[at : at + draw(st.integers(1, 64))]
    return role, bytes(data)


@FUZZ
@given(mutated_streams())
def test_mutated_valid_frames_only_raise_protocol_error(case: tuple[Role, bytes]) -> None:
    check_outcome(*case)


def test_every_header_bit_flip_is_judged_exactly() -> None:
    """Guards against a lax reader: flip each header bit of a PUT, one at a time."""
    base = encode(REQUESTS[6])  # a PUT without NOREPLY
    accepted = set()
    for bit in range(HEADER_SIZE * 8):
        data = bytearray(base)
        data[bit // 8] ^= 1 << (bit % 8)
        frames, err = run_reader(Role.HOST, bytes(data), len(data))
        if err is None:
            assert len(frames) == 1
            accepted.add(bit)
    # only request_id, pool, oid, index (bytes 8..43) carry no invariant, plus NOREPLY on a PUT
    assert accepted == set(range(8 * 8, 44 * 8)) | {4 * 8 + 1}


# --------------------------------------------------------------------------- limits


def test_oversize_length_rejected_after_header_only() -> None:
    header = raw(Op.PUT, length=DEFAULT_MAX_PAYLOAD + 1)
    assert len(header) == HEADER_SIZE
    reader = FrameReader(Role.HOST)
    assert reader.feed(header[:-1]) == []
    with pytest.raises(ProtocolError, match="exceeds the maximum"):
        reader.feed(header[-1:])


def test_custom_max_payload_and_exact_limit() -> None:
    reader = FrameReader(Role.GUEST, max_payload=100)
    assert reader.feed(raw(Op.ERROR, status=Status.PROTOCOL, length=100)) == []
    assert reader.buffered == HEADER_SIZE
    (err,) = reader.feed(b"x" * 100)
    assert err.payload == b"x" * 100
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameReader(Role.GUEST, max_payload=100).feed(raw(Op.ERROR, length=101))


def test_custom_max_vector() -> None:
    frame = raw(Op.FLUSH_VEC, index=3, payload=wire.keys_payload(KEYS3))
    assert len(decode_all(Role.HOST, frame, max_vector=3)) == 1
    with pytest.raises(ProtocolError, match="3 keys"):
        decode_all(Role.HOST, frame, max_vector=2)


def test_reader_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        FrameReader(Role.HOST, max_vector=0)
    with pytest.raises(ValueError):
        FrameReader(Role.HOST, max_payload=-1)


# --------------------------------------------------------------------------- validation rules

H, G = Role.HOST, Role.GUEST
Fields = dict[str, object]


def pl(payload: bytes) -> Fields:
    return {"payload": payload}


KEYS2 = wire.keys_payload(KEYS3[:2])
PUT_VEC2 = wire.put_vec_payload(KEYS3[:2], [PAGE_A, PAGE_B])
STATS_ONE = wire.stats_payload({"x": 1})
NOTICE_1 = bytes([Notice.SHRINK_PERSISTENT]) + bytes(8)
# good frames the cases below start from (each must decode on its own)
PUT_: Fields = {"op": Op.PUT, "pool": 1, "oid": OID, "payload": PAGE_A}
GET_R: Fields = {"op": Op.GET, "flags": R, "payload": PAGE_A}
STATS_: Fields = {"op": Op.STATS, "payload": STATS_ONE}
HELLO_: Fields = {"op": Op.HELLO, "payload": bytes(8)}
NEW_POOL_: Fields = {"op": Op.NEW_POOL, "payload": bytes(20)}
GET_VEC_: Fields = {"op": Op.GET_VEC, "index": 2, "payload": KEYS2}
FLUSH_VEC_: Fields = {"op": Op.FLUSH_VEC, "index": 2, "payload": KEYS2}
PUT_VEC_: Fields = {"op": Op.PUT_VEC, "index": 2, "payload": PUT_VEC2}
NOTICE_: Fields = {"op": Op.NOTICE, "payload": NOTICE_1}
HELLO_R: Fields = {"op": Op.HELLO, "flags": R, "payload": wire.welcome_payload(WELCOME)}
QUERY_R: Fields = {"op": Op.QUERY_POOL, "flags": R, "payload": bytes(4)}
PUT_VEC_R: Fields = {"op": Op.PUT_VEC, "flags": R, "index": 2, "payload": b"\0\2"}
GET_VEC_R: Fields = {"op": Op.GET_VEC, "flags": R, "index": 2, "payload": bytes([0, 1]) + PAGE_A}

# (id, role, good frame fields, changed fields, error pattern)
RULES: list[tuple[str, Role, Fields, Fields, str]] = [
    ("magic", H, PUT_, {"magic": 0x746D}, "bad magic"),
    ("version", H, PUT_, {"version": 2}, "version"),
    ("version-0", G, GET_R, {"version": 0}, "version"),
    ("reserved", H, PUT_, {"reserved": 1}, "reserved"),
    ("opcode-0", H, PUT_, {"op": 0}, "unknown opcode 0"),
    ("opcode-16", G, GET_R, {"op": 16}, "unknown opcode 16"),
    ("opcode-255", H, PUT_, {"op": 255}, "unknown opcode 255"),
    ("host-gets-notice", H, {"op": Op.STATS}, {"op": Op.NOTICE}, "not valid guest->host"),
    ("host-gets-error", H, {"op": Op.STATS}, {"op": Op.ERROR}, "not valid guest->host"),
    ("guest-gets-stats", G, {"op": Op.ERROR}, {"op": Op.STATS}, "not valid host->guest"),
    ("reply-on-request", H, PUT_, {"flags": R}, "REPLY flag set"),
    ("reply-on-stats", H, {"op": Op.STATS}, {"flags": R}, "REPLY flag set"),
    ("reply-missing", G, GET_R, {"flags": 0}, "REPLY flag missing"),
    ("request-to-guest", G, {"op": Op.PUT, "flags": R}, {"flags": NR}, "REPLY flag missing"),
    ("noreply-get", H, {"op": Op.GET}, {"flags": NR}, "NOREPLY not allowed on GET"),
    ("noreply-hello", H, HELLO_, {"flags": NR}, "NOREPLY not allowed on HELLO"),
    ("noreply-new-pool", H, NEW_POOL_, {"flags": NR}, "NOREPLY not allowed on NEW_POOL"),
    ("noreply-destroy", H, {"op": Op.DESTROY_POOL}, {"flags": NR}, "NOREPLY not allowed"),
    ("noreply-query", H, {"op": Op.QUERY_POOL}, {"flags": NR}, "NOREPLY not allowed"),
    ("noreply-get-vec", H, GET_VEC_, {"flags": NR}, "NOREPLY not allowed on GET_VEC"),
    ("noreply-stats", H, {"op": Op.STATS}, {"flags": NR}, "NOREPLY not allowed on STATS"),
    ("noreply-on-reply", G, GET_R, {"flags": R | NR}, "NOREPLY not allowed"),
    ("unknown-flag", H, PUT_, {"flags": 4}, "unknown flag bits"),
    ("unknown-flag-reply", G, GET_R, {"flags": R | 0x80}, "unknown flag bits"),
    ("notice-flags", G, NOTICE_, {"flags": R}, "flags 0"),
    ("error-flags", G, {"op": Op.ERROR}, {"flags": R}, "flags 0"),
    ("put-short", H, PUT_, pl(PAGE_A[:-1]), "PUT request.*4095 bytes, want 4096"),
    ("put-long", H, PUT_, pl(PAGE_A + b"x"), "want 4096"),
    ("put-empty", H, PUT_, pl(b""), "want 4096"),
    ("get-payload", H, {"op": Op.GET}, pl(b"x"), "GET request.*want 0"),
    ("flush-page-payload", H, {"op": Op.FLUSH_PAGE}, pl(b"x"), "want 0"),
    ("flush-object-payload", H, {"op": Op.FLUSH_OBJECT}, pl(b"x"), "want 0"),
    ("destroy-payload", H, {"op": Op.DESTROY_POOL}, pl(b"x"), "want 0"),
    ("query-payload", H, {"op": Op.QUERY_POOL}, pl(b"x"), "want 0"),
    ("new-pool-size", H, NEW_POOL_, pl(bytes(19)), "want 20"),
    ("new-pool-flags", H, NEW_POOL_, pl(b"\x08" + bytes(19)), "unknown pool flags"),
    ("flush-object-index", H, {"op": Op.FLUSH_OBJECT}, {"index": 1}, "index 1, must be 0"),
    ("vec-n-0", H, GET_VEC_, {"index": 0, "payload": b""}, "0 keys"),
    ("vec-n-big", H, FLUSH_VEC_, {"index": 65, "payload": bytes(65 * 28)}, "65 keys, want 1..64"),
    ("vec-keys-short", H, FLUSH_VEC_, pl(KEYS2[:-1]), r"want 2\*28"),
    ("vec-keys-long", H, GET_VEC_, {"index": 1}, r"want 1\*28"),
    ("put-vec-size", H, PUT_VEC_, pl(PUT_VEC2[:-1]), r"want 2\*4124"),
    ("put-vec-only-keys", H, PUT_VEC_, pl(KEYS2), r"want 2\*4124"),
    ("hello-short", H, HELLO_, pl(bytes(7)), "HELLO payload is 7"),
    ("hello-long", H, HELLO_, pl(bytes(8) + b"n" * 65), "HELLO payload is 73"),
    ("hello-longest-ok", H, HELLO_, pl(bytes(8) + b"n" * 64), "NO ERROR"),
    ("hello-utf8", H, HELLO_, pl(bytes(8) + b"\xff"), "utf-8"),
    ("stats-name-overrun", H, STATS_, pl(b"\x05abc"), "overruns"),
    ("stats-value-overrun", H, STATS_, pl(STATS_ONE[:-1]), "overruns"),
    ("stats-second-overrun", H, STATS_, pl(STATS_ONE + b"\x01"), "overruns"),
    ("stats-empty-name", H, STATS_, pl(b"\x00" + bytes(8)), "empty"),
    ("stats-non-ascii", H, STATS_, pl(b"\x01\xe9" + bytes(8)), "ascii"),
    ("request-status", H, PUT_, {"status": Status.NOT_FOUND}, "must have status OK"),
    ("request-status-unknown", H, PUT_, {"status": 7}, "unknown status 7"),
    ("reply-status-unknown", G, GET_R, {"status": 7, "payload": b""}, "unknown status 7"),
    ("reply-status-255", G, {"op": Op.PUT, "flags": R}, {"status": 255}, "unknown status 255"),
    ("error-status-unknown", G, {"op": Op.ERROR}, {"status": 9}, "unknown status 9"),
    ("get-reply-short", G, GET_R, pl(PAGE_A[:100]), "GET reply.*want 4096"),
    ("get-reply-empty-ok", G, GET_R, pl(b""), "want 4096"),
    ("get-miss-with-page", G, {**GET_R, "status": 1, "payload": b""}, pl(PAGE_A), "want 0"),
    ("put-refused-payload", G, {"op": Op.PUT, "flags": R, "status": 2}, pl(b"x"), "want 0"),
    ("flush-vec-reply-payload", G, {"op": Op.FLUSH_VEC, "flags": R, "index": 2}, pl(b"\0\0"), "want 0"),
    ("hello-reply-size", G, HELLO_R, pl(bytes(15)), "want 16"),
    ("hello-reply-features", G, HELLO_R, pl(struct.pack("<HHIII", 1, 2, 4096, 1, 1)), "unknown features 0x2"),
    ("device-stats-reply", G, {"op": Op.DEVICE_STATS, "flags": R}, pl(b"\x05ab"), "overruns"),
    ("device-stats-miss", G, {"op": Op.DEVICE_STATS, "flags": R, "status": 1}, pl(b"x"), "want 0"),
    ("device-stats-payload", H, {"op": Op.DEVICE_STATS}, pl(b"x"), "want 0"),
    ("query-reply-size", G, QUERY_R, pl(bytes(5)), "want 4"),
    ("query-reply-flags", G, QUERY_R, pl(b"\x10\0\0\0"), "unknown pool flags"),
    ("get-vec-missing-page", G, GET_VEC_R, pl(bytes([0, 0]) + PAGE_A), "does not match"),
    ("get-vec-extra-page", G, GET_VEC_R, pl(bytes([1, 1]) + PAGE_A), "does not match"),
    ("get-vec-bad-size", G, GET_VEC_R, pl(bytes([0, 1]) + PAGE_A + b"x"), "does not fit"),
    ("get-vec-unknown-status", G, GET_VEC_R, pl(bytes([0, 9]) + PAGE_A), "unknown status 9"),
    ("get-vec-n-mismatch", G, GET_VEC_R, {"index": 3}, "does not fit"),
    ("get-vec-n-0", G, GET_VEC_R, {"index": 0}, "0 keys"),
    ("get-vec-ok-empty", G, {**GET_VEC_R, "status": 5, "payload": b""}, {"status": 0}, "no status vector"),
    ("put-vec-reply-size", G, PUT_VEC_R, pl(b"\0\2\0"), "does not fit"),
    ("put-vec-reply-status", G, PUT_VEC_R, pl(b"\0\7"), "unknown status 7"),
    ("notice-size", G, NOTICE_, pl(NOTICE_1[:-1]), "want 9"),
    ("notice-kind", G, NOTICE_, pl(b"\x03" + bytes(8)), "NOTICE kind 3"),
    ("notice-request-id", G, NOTICE_, {"rid": 5}, "request_id 5"),
    ("notice-status", G, NOTICE_, {"status": 1}, "must have status OK"),
]


@pytest.mark.parametrize(
    ("role", "good", "bad", "pattern"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_validation_rule(role: Role, good: Fields, bad: Fields, pattern: str) -> None:
    ok = raw(**good)  # type: ignore[arg-type]
    assert len(decode_all(role, ok)) == 1  # so the case is about `bad`, not a broken base
    broken = raw(**{**good, **bad})  # type: ignore[arg-type]
    if pattern == "NO ERROR":  # a boundary that must still be accepted
        assert len(decode_all(role, broken)) == 1
        return
    with pytest.raises(ProtocolError, match=pattern) as info:
        decode_all(role, broken)
    assert info.value.status == Status.PROTOCOL
    # same verdict when the frame trickles in (header-time vs payload-time checks)
    with pytest.raises(ProtocolError, match=pattern):
        reader = FrameReader(role)
        for i in range(0, len(broken), 13):
            reader.feed(broken[i : i + 13])
        reader.eof()


def test_every_rule_id_is_unique() -> None:
    ids = [r[0] for r in RULES]
    assert len(ids) == len(set(ids))


def test_header_errors_fire_before_payload_arrives() -> None:
    for op, fields in [(Op.PUT, {"flags": R}), (Op.GET, {"length": 1}), (Op.FLUSH_OBJECT, {"index": 2})]:
        header = raw(op, **fields)[:HEADER_SIZE]  # type: ignore[arg-type]
        with pytest.raises(ProtocolError):
            FrameReader(Role.HOST).feed(header)


def test_frames_before_the_error_are_attached_and_reader_stays_broken() -> None:
    good = [REQUESTS[6], REQUESTS[8]]
    data = b"".join(encode(f) for f in good) + raw(Op.PUT, flags=R, payload=PAGE_A)
    reader = FrameReader(Role.HOST)
    with pytest.raises(ProtocolError, match="REPLY") as info:
        reader.feed(data)
    assert info.value.frames == good
    for again in (lambda: reader.feed(encode(REQUESTS[8])), lambda: reader.feed(b""), reader.eof):
        with pytest.raises(ProtocolError, match=r"already failed.*REPLY"):
            again()


# --------------------------------------------------------------------------- eof


def test_eof() -> None:
    data = encode(REQUESTS[6])
    for cut in (1, HEADER_SIZE - 1, HEADER_SIZE, len(data) - 1):
        reader = FrameReader(Role.HOST)
        assert reader.feed(data[:cut]) == []
        assert reader.buffered == cut
        with pytest.raises(ProtocolError, match=f"truncated frame.*{cut} bytes"):
            reader.eof()
        with pytest.raises(ProtocolError):
            reader.feed(data[cut:])
    reader = FrameReader(Role.HOST)
    reader.eof()  # nothing buffered: a clean end
    assert reader.feed(data) == [REQUESTS[6]]
    reader.eof()


# --------------------------------------------------------------------------- encode


@pytest.mark.parametrize(
    "frame",
    [
        Frame(Op.GET, oid=bytes(23)),
        Frame(Op.GET, oid=bytes(25)),
        Frame(0),
        Frame(16),
        Frame(Op.GET, flags=4),
        Frame(Op.GET, flags=-1),
        Frame(Op.GET, status=7),
        Frame(Op.GET, status=-1),
        Frame(Op.GET, request_id=-1),
        Frame(Op.GET, request_id=2**32),
        Frame(Op.GET, pool=2**32),
        Frame(Op.GET, index=-1),
        Frame(Op.GET, oid="x" * 24),  # type: ignore[arg-type]
        Frame(Op.GET, oid=None),  # type: ignore[arg-type]
        Frame("5"),  # type: ignore[arg-type]
        Frame(Op.PUT, payload="x" * 4096),  # type: ignore[arg-type]
    ],
)
def test_encode_rejects_bad_local_frames(frame: Frame) -> None:
    with pytest.raises(ValueError):
        encode(frame)


def test_encode_layout() -> None:
    frame = Frame(Op.PUT, NR, 0, 0x01020304, 0x0A0B0C0D, OID, 0x11223344, PAGE_A)
    data = encode(frame)
    assert data[:2] == b"\x74\x6d" and data[2] == VERSION and data[3] == Op.PUT
    assert data[4] == NR and data[5] == 0 and data[6:8] == b"\0\0"
    assert data[8:12] == bytes.fromhex("04030201") and data[12:16] == bytes.fromhex("0d0c0b0a")
    assert data[16:40] == OID and data[40:44] == bytes.fromhex("44332211")
    assert data[44:48] == struct.pack("<I", PAGE_SIZE) and data[48:] == PAGE_A


# --------------------------------------------------------------------------- payload helpers


@QUICK
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), u32, st.text(max_size=64))
def test_hello_round_trip(lo: int, hi: int, page_size: int, name: str) -> None:
    h = Hello(lo, hi, page_size, name)
    if len(name.encode()) > 64:
        with pytest.raises(ValueError):
            wire.hello_payload(h)
    else:
        assert wire.parse_hello(wire.hello_payload(h)) == h


@QUICK
@given(st.integers(0, 0xFFFF), u32, u32, u32, st.sampled_from([0, *Feature]))
def test_welcome_round_trip(
    version: int, page_size: int, max_payload: int, max_vector: int, features: int
) -> None:
    w = Welcome(version, page_size, max_payload, max_vector, features)
    assert wire.parse_welcome(wire.welcome_payload(w)) == w


@QUICK
@given(st.integers(0, 7), st.binary(min_size=16, max_size=16))
def test_pool_spec_round_trip(flags: int, uuid: bytes) -> None:
    assert wire.parse_pool_spec(wire.pool_spec_payload(flags, uuid)) == (flags, uuid)
    assert wire.parse_pool_flags(wire.pool_flags_payload(flags)) == flags


@QUICK
@given(st.lists(keys, min_size=1, max_size=10))
def test_keys_round_trip(ks: list[tuple[bytes, int]]) -> None:
    p = wire.keys_payload(ks)
    assert len(p) == 28 * len(ks)
    assert wire.parse_keys(p, len(ks)) == ks
    assert wire.parse_keys(memoryview(p + b"tail"), len(ks)) == ks


@QUICK
@given(st.lists(st.tuples(keys, pages), min_size=1, max_size=4))
def test_put_vec_round_trip(entries: list[tuple[tuple[bytes, int], bytes]]) -> None:
    ks, ps = [k for k, _ in entries], [p for _, p in entries]
    assert wire.parse_put_vec(wire.put_vec_payload(ks, ps), len(ks)) == (ks, ps)


@QUICK
@given(st.lists(st.tuples(statuses, pages), min_size=1, max_size=6), st.booleans())
def test_get_vec_reply_round_trip(entries: list[tuple[Status, bytes]], aligned: bool) -> None:
    sts = [s for s, _ in entries]
    want = [p if s == Status.OK else None for s, p in entries]
    given_pages = want if aligned else [p for p in want if p is not None]
    p = wire.get_vec_reply_payload(sts, given_pages)
    assert wire.parse_get_vec_reply(p, len(sts)) == want
    assert wire.parse_status_vector(p, len(sts)) == sts


@QUICK
@given(
    st.dictionaries(
        st.text(st.characters(min_codepoint=0, max_codepoint=127), min_size=1, max_size=255),
        st.integers(-(2**63), 2**63 - 1),
        max_size=8,
    )
)
def test_stats_round_trip(values: dict[str, int]) -> None:
    assert wire.parse_stats(wire.stats_payload(values)) == values


@pytest.mark.parametrize("kind", list(Notice))
def test_notice_round_trip(kind: Notice) -> None:
    assert wire.parse_notice(wire.notice_payload(kind, 12345)) == (kind, 12345)


@pytest.mark.parametrize(
    ("parse", "payload"),
    [
        (wire.parse_hello, bytes(7)),
        (wire.parse_hello, bytes(8) + b"\xc3"),
        (wire.parse_welcome, bytes(15)),
        (wire.parse_pool_spec, bytes(21)),
        (wire.parse_pool_spec, b"\xff" + bytes(19)),
        (wire.parse_pool_flags, bytes(3)),
        (lambda p: wire.parse_keys(p, 2), bytes(55)),
        (lambda p: wire.parse_keys(p, 0), bytes(28)),
        (lambda p: wire.parse_put_vec(p, 1), bytes(28 + PAGE_SIZE - 1)),
        (lambda p: wire.parse_put_vec(p, 0), b""),
        (lambda p: wire.parse_status_vector(p, 3), bytes(2)),
        (lambda p: wire.parse_status_vector(p, 1), b"\x07"),
        (lambda p: wire.parse_get_vec_reply(p, 1), b"\x00"),
        (lambda p: wire.parse_get_vec_reply(p, 1), b"\x01" + PAGE_A),
        (wire.parse_stats, b"\x03ab"),
        (wire.parse_stats, b"\x01a" + bytes(7)),
        (wire.parse_notice, bytes(10)),
        (wire.parse_notice, bytes(9)),
    ],
)
def test_parsers_raise_protocol_error(parse: Callable[[bytes], object], payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse(payload)


@pytest.mark.parametrize(
    "build",
    [
        lambda: wire.hello_payload(Hello(1, 1, PAGE_SIZE, "é" * 33)),
        lambda: wire.hello_payload(Hello(-1, 1, PAGE_SIZE, "")),
        lambda: wire.welcome_payload(Welcome(1, PAGE_SIZE, 2**32, 64)),
        lambda: wire.pool_spec_payload(8),
        lambda: wire.pool_spec_payload(0, bytes(15)),
        lambda: wire.pool_flags_payload(16),
        lambda: wire.keys_payload([]),
        lambda: wire.keys_payload([(bytes(23), 0)]),
        lambda: wire.keys_payload([(OID, -1)]),
        lambda: wire.put_vec_payload([(OID, 0)], []),
        lambda: wire.put_vec_payload([(OID, 0)], [PAGE_A[:-1]]),
        lambda: wire.status_vector_payload([]),
        lambda: wire.status_vector_payload([7]),
        lambda: wire.get_vec_reply_payload([0, 1], [PAGE_A, PAGE_B, PAGE_A]),
        lambda: wire.get_vec_reply_payload([0, 0], [PAGE_A, None]),
        lambda: wire.get_vec_reply_payload([0], [b"short"]),
        lambda: wire.stats_payload({"é": 1}),
        lambda: wire.stats_payload({"": 1}),
        lambda: wire.stats_payload({"x" * 256: 1}),
        lambda: wire.stats_payload({"x": 2**63}),
        lambda: wire.notice_payload(3, 1),  # type: ignore[arg-type]
        lambda: wire.notice_payload(Notice.BALLOON_TARGET, -1),
    ],
)
def test_builders_raise_value_error(build: Callable[[], bytes]) -> None:
    with pytest.raises(ValueError):
        build()


def test_parse_error_is_lenient() -> None:
    assert wire.parse_error("bye ü".encode()) == "bye ü"
    assert wire.parse_error(b"bad \xff") == "bad \ufffd"


def test_protocol_error_defaults() -> None:
    err = ProtocolError("boom")
    assert (str(err), err.status, err.frames) == ("boom", Status.PROTOCOL, [])
    assert ProtocolError("x", Status.INVALID).status == Status.INVALID
    assert HEADER.size == HEADER_SIZE == 48
