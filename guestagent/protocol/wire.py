"""Sans-IO codec for the tmem wire protocol, shared unchanged by the guest and host agents.

No sockets, threads, clocks or logging live here: bytes go in, `Frame`s come out, and
`encode(frame)` gives bytes back.  Keeping I/O out means both agents (one on trio, one a
plain guest daemon) run exactly the same validation, and the tests can drive it byte by byte.

Every frame is a fixed 48-byte little-endian header (`HEADER`) followed by `length` payload
bytes.  `FrameReader` enforces the whole framing contract for the side that *receives*: a
frame it returns has a known opcode, legal flags and status for its direction, and a payload
whose size (and, for the rare structured ops, whose content) the matching `parse_*` helper
accepts.  Anything else is a `ProtocolError`, after which the channel must be closed.

Decoded frames carry plain ints (not enum members) in `opcode`, `flags` and `status`:
converting through the enums would double the cost of decoding a PUT, and `IntEnum`
members compare equal to those ints anyway.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, IntFlag
from typing import NamedTuple

__all__ = [
    "ALL_FEATURES",
    "DEFAULT_MAX_PAYLOAD",
    "DEFAULT_MAX_VECTOR",
    "HEADER",
    "HEADER_SIZE",
    "KEY",
    "KEY_SIZE",
    "MAGIC",
    "MAX_NAME",
    "NOREPLY_OPS",
    "NO_OID",
    "PAGE_SIZE",
    "PORT_NAME",
    "REQUEST_OPS",
    "VECTOR_OPS",
    "VERSION",
    "Feature",
    "Flag",
    "Frame",
    "FrameReader",
    "Hello",
    "Notice",
    "Op",
    "PoolFlag",
    "ProtocolError",
    "Role",
    "Status",
    "Welcome",
    "encode",
    "error_payload",
    "get_vec_reply_payload",
    "hello_payload",
    "keys_payload",
    "notice_payload",
    "parse_error",
    "parse_get_vec_reply",
    "parse_hello",
    "parse_keys",
    "parse_notice",
    "parse_pool_flags",
    "parse_pool_spec",
    "parse_put_vec",
    "parse_stats",
    "parse_status_vector",
    "parse_welcome",
    "pool_flags_payload",
    "pool_spec_payload",
    "put_vec_payload",
    "reply_to",
    "stats_payload",
    "status_vector_payload",
    "welcome_payload",
]

# --------------------------------------------------------------------------- constants

PAGE_SIZE = 4096
PORT_NAME = "org.tmem.0"  # the virtio-serial port (QEMU's `name=`) the channel runs over
VERSION = 1
MAGIC = 0x6D74
# magic u16, version u8, opcode u8, flags u8, status u8, reserved u16 (must be 0),
# request_id u32, pool u32, oid 24 bytes, index u32, length u32 (payload bytes that follow)
HEADER = struct.Struct("<HBBBBHII24sII")
HEADER_SIZE = 48
DEFAULT_MAX_PAYLOAD = 1 << 20  # 1 MiB
DEFAULT_MAX_VECTOR = 64  # keys per vectored frame
NO_OID = bytes(24)

KEY = struct.Struct("<24sI")  # one (oid, index) key of a vectored frame
KEY_SIZE = 28
MAX_NAME = 64  # longest HELLO display name, in utf-8 bytes

_HELLO = struct.Struct("<HHI")
_WELCOME = struct.Struct("<HHIII")
_POOL_SPEC = struct.Struct("<I16s")
_POOL_FLAGS = struct.Struct("<I")
_NOTICE = struct.Struct("<BQ")
_STAT_VALUE = struct.Struct("<q")

if HEADER.size != HEADER_SIZE or KEY.size != KEY_SIZE:  # pragma: no cover - layout guard
    raise ImportError("wire header layout does not match the contract")


# --------------------------------------------------------------------------- enums


class Op(IntEnum):
    """Opcodes; 1..11 and 15 are guest requests, 12..14 are one-way messages."""

    HELLO = 1
    NEW_POOL = 2
    DESTROY_POOL = 3
    QUERY_POOL = 4
    PUT = 5
    GET = 6
    FLUSH_PAGE = 7
    FLUSH_OBJECT = 8
    PUT_VEC = 9
    GET_VEC = 10
    FLUSH_VEC = 11
    STATS = 12  # guest -> host report, never answered
    NOTICE = 13  # host -> guest, unsolicited, request_id 0
    ERROR = 14  # host -> guest just before the host closes the channel; payload = utf-8 reason
    # guest request, no payload: its swap device's counters (reply: STATS encoding, or NOT_FOUND);
    # sent only to a host that granted Feature.DEVICE_STATS (an older one closes on an unknown op)
    DEVICE_STATS = 15


class Status(IntEnum):
    OK = 0
    NOT_FOUND = 1
    NO_SPACE = 2
    DENIED = 3
    INVALID = 4
    NO_POOL = 5
    PROTOCOL = 6


class Flag(IntFlag):
    REPLY = 0x01  # set on every host reply to a request
    NOREPLY = 0x02  # guest asks for no reply (only on the ops in NOREPLY_OPS)


class PoolFlag(IntFlag):
    PERSISTENT = 1
    SHARED = 2
    EXCLUSIVE_GETS = 4


class Feature(IntFlag):
    """What a guest may use beyond version 1's ops: offered in its HELLO's header `index`, granted in
    the host's reply (the Welcome's `features`, a field hosts without features send as 0)."""

    DEVICE_STATS = 1  # the DEVICE_STATS request


class Notice(IntEnum):
    SHRINK_PERSISTENT = 1  # value = persistent pages the guest should move out of tmem
    BALLOON_TARGET = 2  # value = new balloon target in KiB


REQUEST_OPS: frozenset[Op] = frozenset({*(Op(i) for i in range(Op.HELLO, Op.FLUSH_VEC + 1)), Op.DEVICE_STATS})
NOREPLY_OPS: frozenset[Op] = frozenset({Op.PUT, Op.PUT_VEC, Op.FLUSH_PAGE, Op.FLUSH_OBJECT, Op.FLUSH_VEC})
VECTOR_OPS: frozenset[Op] = frozenset({Op.PUT_VEC, Op.GET_VEC, Op.FLUSH_VEC})

_MAX_OP = max(Op)
_MAX_STATUS = max(Status)
_ALL_FLAGS = int(Flag.REPLY | Flag.NOREPLY)
_ALL_POOL_FLAGS = int(PoolFlag.PERSISTENT | PoolFlag.SHARED | PoolFlag.EXCLUSIVE_GETS)
ALL_FEATURES = int(Feature.DEVICE_STATS)
_U8 = 0xFF


# --------------------------------------------------------------------------- frames


class Frame(NamedTuple):
    """One wire message; a NamedTuple so building and unpacking it stays cheap."""

    opcode: int
    flags: int = 0
    status: int = 0
    request_id: int = 0
    pool: int = 0
    oid: bytes = NO_OID  # exactly 24 bytes
    index: int = 0  # type: ignore[assignment]  # shadows tuple.index; name fixed by contract
    payload: bytes = b""


class ProtocolError(Exception):
    """The peer broke the protocol: close that channel and log str(err).

    `status` is the code to put in the ERROR frame sent before closing (usually PROTOCOL).
    `frames` holds the valid frames the failing `feed` call decoded before the bad one, so a
    caller that cares (e.g. about NOREPLY puts) can still act on them.
    """

    status: Status
    frames: list[Frame]

    def __init__(self, message: str, status: Status = Status.PROTOCOL) -> None:
        super().__init__(message)
        self.status = status
        self.frames = []


def _op_name(op: int) -> str:
    return Op(op).name if 1 <= op <= _MAX_OP else str(op)


def _describe(frame: Frame) -> str:
    """Frame repr without a 4 KiB payload dump, for error messages."""
    return (
        f"Frame(opcode={frame.opcode!r}, flags={frame.flags!r}, status={frame.status!r}, "
        f"request_id={frame.request_id!r}, pool={frame.pool!r}, oid={frame.oid!r}, "
        f"index={frame.index!r}, payload=<{type(frame.payload).__name__}>)"
    )


def encode(frame: Frame) -> bytes:
    """Serialise a locally built frame; a malformed one is our bug, so ValueError.

    Only header-level checks happen here (they are cheap integer compares); whether the
    payload suits the op is the receiving `FrameReader`'s job.
    """
    opcode, flags, status, request_id, pool, oid, index, payload = frame
    try:
        if (
            len(oid) != 24
            or not 1 <= opcode <= _MAX_OP
            or flags & ~_ALL_FLAGS
            or not 0 <= status <= _MAX_STATUS
        ):
            raise ValueError(f"cannot encode {_describe(frame)}: bad oid length, opcode, flags or status")
        return (
            HEADER.pack(MAGIC, VERSION, opcode, flags, status, 0, request_id, pool, oid, index, len(payload))
            + payload
        )
    except (struct.error, TypeError) as exc:
        raise ValueError(f"cannot encode {_describe(frame)}: {exc}") from None


def reply_to(request: Frame, status: int = Status.OK, payload: bytes = b"", pool: int | None = None) -> Frame:
    """The host's reply to `request`: REPLY flag, same opcode/request_id/oid/index echoed.

    Echoing `index` matters for vectored ops: it is the key count `n` the guest's reader
    needs to check the status vector.  `pool` defaults to the request's (NEW_POOL passes
    the new pool id).
    """
    return Frame(
        request.opcode,
        Flag.REPLY,
        status,
        request.request_id,
        request.pool if pool is None else pool,
        request.oid,
        request.index,
        payload,
    )


# --------------------------------------------------------------------------- payload helpers


@dataclass(frozen=True, slots=True)
class Hello:
    min_version: int
    max_version: int
    page_size: int
    name: str


@dataclass(frozen=True, slots=True)
class Welcome:
    version: int
    page_size: int
    max_payload: int
    max_vector: int
    features: int = 0  # Feature bits the host grants (only ones the guest offered)


def _pack(s: struct.Struct, *values: object) -> bytes:
    """struct.pack that reports a local mistake as ValueError, like encode()."""
    try:
        return s.pack(*values)
    except struct.error as exc:
        raise ValueError(f"cannot pack {values!r}: {exc}") from None


def hello_payload(h: Hello) -> bytes:
    name = h.name.encode("utf-8")
    if len(name) > MAX_NAME:
        raise ValueError(f"HELLO name is {len(name)} utf-8 bytes, limit {MAX_NAME}")
    return _pack(_HELLO, h.min_version, h.max_version, h.page_size) + name


def parse_hello(p: bytes) -> Hello:
    if not _HELLO.size <= len(p) <= _HELLO.size + MAX_NAME:
        raise ProtocolError(f"HELLO payload is {len(p)} bytes, want 8..{8 + MAX_NAME}")
    lo, hi, page_size = _HELLO.unpack_from(p)
    try:
        name = bytes(p[_HELLO.size :]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("HELLO name is not valid utf-8") from None
    return Hello(lo, hi, page_size, name)


def welcome_payload(w: Welcome) -> bytes:
    if w.features & ~ALL_FEATURES or w.features < 0:
        raise ValueError(f"unknown features {w.features:#x}")
    return _pack(_WELCOME, w.version, w.features, w.page_size, w.max_payload, w.max_vector)


def parse_welcome(p: bytes) -> Welcome:
    """The host's limits. `features` is the u16 that version-1 hosts send as 0 (it was reserved)."""
    if len(p) != _WELCOME.size:
        raise ProtocolError(f"HELLO reply payload is {len(p)} bytes, want {_WELCOME.size}")
    version, features, page_size, max_payload, max_vector = _WELCOME.unpack(p)
    if features & ~ALL_FEATURES:
        raise ProtocolError(f"HELLO reply grants unknown features {features:#x}")
    return Welcome(version, page_size, max_payload, max_vector, features)


def pool_spec_payload(flags: int, uuid: bytes = bytes(16)) -> bytes:
    if flags & ~_ALL_POOL_FLAGS or flags < 0:
        raise ValueError(f"unknown pool flags {flags:#x}")
    if len(uuid) != 16:
        raise ValueError(f"pool uuid is {len(uuid)} bytes, want 16")
    return _pack(_POOL_SPEC, flags, uuid)


def parse_pool_spec(p: bytes) -> tuple[int, bytes]:
    if len(p) != _POOL_SPEC.size:
        raise ProtocolError(f"NEW_POOL payload is {len(p)} bytes, want {_POOL_SPEC.size}")
    flags, uuid = _POOL_SPEC.unpack(p)
    if flags & ~_ALL_POOL_FLAGS:
        raise ProtocolError(f"NEW_POOL has unknown pool flags {flags:#x}")
    return flags, uuid


def pool_flags_payload(flags: int) -> bytes:
    """QUERY_POOL reply payload: the pool's PoolFlag as `<I`."""
    if flags & ~_ALL_POOL_FLAGS or flags < 0:
        raise ValueError(f"unknown pool flags {flags:#x}")
    return _pack(_POOL_FLAGS, flags)


def parse_pool_flags(p: bytes) -> int:
    if len(p) != _POOL_FLAGS.size:
        raise ProtocolError(f"QUERY_POOL reply payload is {len(p)} bytes, want 4")
    (flags,) = _POOL_FLAGS.unpack(p)
    if flags & ~_ALL_POOL_FLAGS:
        raise ProtocolError(f"QUERY_POOL reply has unknown pool flags {flags:#x}")
    return int(flags)


def keys_payload(keys: Sequence[tuple[bytes, int]]) -> bytes:
    if not keys:
        raise ValueError("a vectored frame needs at least one key")
    out = []
    for oid, index in keys:
        if len(oid) != 24:
            raise ValueError(f"oid is {len(oid)} bytes, want 24")
        out.append(_pack(KEY, oid, index))
    return b"".join(out)


def parse_keys(p: bytes | memoryview, n: int) -> list[tuple[bytes, int]]:
    """The first n keys of p (keys are a prefix: PUT_VEC puts its pages after them)."""
    if n < 1:
        raise ProtocolError(f"vector of {n} keys")
    if len(p) < n * KEY_SIZE:
        raise ProtocolError(f"{len(p)} bytes cannot hold {n} keys of {KEY_SIZE} bytes")
    unpack = KEY.unpack_from
    return [unpack(p, i) for i in range(0, n * KEY_SIZE, KEY_SIZE)]


def _check_page(page: bytes) -> None:
    if len(page) != PAGE_SIZE:
        raise ValueError(f"page is {len(page)} bytes, want {PAGE_SIZE}")


def put_vec_payload(keys: Sequence[tuple[bytes, int]], pages: Sequence[bytes]) -> bytes:
    """PUT_VEC request payload: n keys then n pages (send it with index = n)."""
    if len(keys) != len(pages):
        raise ValueError(f"{len(keys)} keys but {len(pages)} pages")
    for page in pages:
        _check_page(page)
    return keys_payload(keys) + b"".join(pages)


def parse_put_vec(p: bytes | memoryview, n: int) -> tuple[list[tuple[bytes, int]], list[bytes]]:
    if n < 1 or len(p) != n * (KEY_SIZE + PAGE_SIZE):
        raise ProtocolError(f"PUT_VEC payload of {len(p)} bytes does not hold {n} keys and pages")
    keys = parse_keys(p, n)
    mv = memoryview(p)
    base = n * KEY_SIZE
    pages = [bytes(mv[i : i + PAGE_SIZE]) for i in range(base, len(p), PAGE_SIZE)]
    return keys, pages


def status_vector_payload(statuses: Sequence[int]) -> bytes:
    """PUT_VEC reply payload (and the head of a GET_VEC reply): one status byte per key."""
    if not statuses:
        raise ValueError("a status vector needs at least one entry")
    for s in statuses:
        if not 0 <= s <= _MAX_STATUS:
            raise ValueError(f"unknown status {s}")
    return bytes(statuses)


def parse_status_vector(p: bytes | memoryview, n: int) -> list[Status]:
    """The first n status bytes of p, as Status members."""
    if n < 1 or len(p) < n:
        raise ProtocolError(f"{len(p)} bytes cannot hold a status vector of {n}")
    head = bytes(p[:n])
    if max(head) > _MAX_STATUS:
        raise ProtocolError(f"unknown status {max(head)} in status vector")
    return [Status(s) for s in head]


def get_vec_reply_payload(statuses: Sequence[int], pages: Sequence[bytes | None]) -> bytes:
    """GET_VEC reply payload: n status bytes, then the page of each OK entry, in order.

    `pages` may either hold just the OK entries' pages, or be aligned with `statuses`
    (entries at non-OK positions are ignored, so None is fine there).
    """
    head = status_vector_payload(statuses)
    n_ok = head.count(0)
    if len(pages) == len(statuses):
        found = [pages[i] for i, s in enumerate(head) if s == Status.OK]
    elif len(pages) == n_ok:
        found = list(pages)
    else:
        raise ValueError(f"{len(pages)} pages for {len(statuses)} statuses ({n_ok} OK)")
    body = []
    for page in found:
        if page is None:
            raise ValueError("missing page for an OK status")
        _check_page(page)
        body.append(page)
    return head + b"".join(body)


def parse_get_vec_reply(p: bytes | memoryview, n: int) -> list[bytes | None]:
    """One entry per key: the page for OK statuses, None otherwise."""
    statuses = parse_status_vector(p, n)
    if len(p) != n + statuses.count(Status.OK) * PAGE_SIZE:
        raise ProtocolError(f"GET_VEC reply of {len(p)} bytes does not match its statuses")
    mv = memoryview(p)
    out: list[bytes | None] = []
    at = n
    for s in statuses:
        if s == Status.OK:
            out.append(bytes(mv[at : at + PAGE_SIZE]))
            at += PAGE_SIZE
        else:
            out.append(None)
    return out


def stats_payload(values: Mapping[str, int]) -> bytes:
    out = []
    for name, value in values.items():
        try:
            raw = name.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(f"stat name {name!r} is not ascii") from None
        if not 1 <= len(raw) <= _U8:
            raise ValueError(f"stat name {name!r} must be 1..255 bytes")
        out.append(bytes((len(raw),)) + raw + _pack(_STAT_VALUE, value))
    return b"".join(out)


def parse_stats(p: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    at, end = 0, len(p)
    while at < end:
        size = p[at]
        stop = at + 1 + size
        if size == 0 or stop + _STAT_VALUE.size > end:
            raise ProtocolError(f"STATS entry at offset {at} is empty or overruns the payload")
        try:
            name = bytes(p[at + 1 : stop]).decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"STATS name at offset {at} is not ascii") from None
        (out[name],) = _STAT_VALUE.unpack_from(p, stop)
        at = stop + _STAT_VALUE.size
    return out


def notice_payload(kind: Notice, value: int) -> bytes:
    try:
        kind = Notice(kind)
    except ValueError:
        raise ValueError(f"unknown notice kind {kind!r}") from None
    return _pack(_NOTICE, kind, value)


def parse_notice(p: bytes) -> tuple[Notice, int]:
    if len(p) != _NOTICE.size:
        raise ProtocolError(f"NOTICE payload is {len(p)} bytes, want {_NOTICE.size}")
    kind, value = _NOTICE.unpack(p)
    try:
        return Notice(kind), value
    except ValueError:
        raise ProtocolError(f"unknown NOTICE kind {kind}") from None


def error_payload(reason: str) -> bytes:
    return reason.encode("utf-8")


def parse_error(p: bytes) -> str:
    """Lenient on purpose: the channel is closing anyway, and the reason is only logged."""
    return bytes(p).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- the decoder


class Role(Enum):
    """The side that *receives* the frames a FrameReader decodes."""

    HOST = "host"
    GUEST = "guest"


_VAR = -1  # payload length not fixed by the header alone

# (reader, opcode, status, request_id, index, length) -> None; raises ProtocolError
_HeaderCheck = Callable[["FrameReader", int, int, int, int, int], None]
# (reader, opcode, status, index, payload) -> None; raises ProtocolError
_PayloadCheck = Callable[["FrameReader", int, int, int, bytes], None]


class _Rule(NamedTuple):
    """What one opcode may look like in one direction."""

    flag_mask: int  # flag bits that must equal `flags_required` (the rest are optional)
    flags_required: int
    max_status: int
    len_ok: int  # payload length when status is OK, or _VAR
    len_fail: int  # payload length when status is not OK, or _VAR
    header_check: _HeaderCheck | None  # extra checks needing only the header
    payload_check: _PayloadCheck | None  # extra checks needing the payload


def _vector_request(reader: FrameReader, op: int, status: int, rid: int, n: int, length: int) -> None:
    reader._check_n(op, n)
    per_key = KEY_SIZE + PAGE_SIZE if op == Op.PUT_VEC else KEY_SIZE
    if length != n * per_key:
        raise ProtocolError(f"{_op_name(op)} payload is {length} bytes, want {n}*{per_key}")


def _flush_object(reader: FrameReader, op: int, status: int, rid: int, index: int, length: int) -> None:
    if index != 0:
        raise ProtocolError(f"FLUSH_OBJECT with index {index}, must be 0")


def _hello_request(reader: FrameReader, op: int, status: int, rid: int, index: int, length: int) -> None:
    if not _HELLO.size <= length <= _HELLO.size + MAX_NAME:
        raise ProtocolError(f"HELLO payload is {length} bytes, want 8..{8 + MAX_NAME}")


def _vector_reply(reader: FrameReader, op: int, status: int, rid: int, n: int, length: int) -> None:
    if length == 0:
        if status == Status.OK:
            raise ProtocolError(f"{_op_name(op)} reply with status OK has no status vector")
        return  # the whole request failed (e.g. NO_POOL)
    reader._check_n(op, n)
    if op == Op.PUT_VEC:
        ok = length == n
    else:
        ok = n <= length <= n * (1 + PAGE_SIZE) and (length - n) % PAGE_SIZE == 0
    if not ok:
        raise ProtocolError(f"{_op_name(op)} reply payload of {length} bytes does not fit n={n}")


def _notice_header(reader: FrameReader, op: int, status: int, rid: int, index: int, length: int) -> None:
    if rid != 0:
        raise ProtocolError(f"NOTICE with request_id {rid}, must be 0")


def _check_hello(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    parse_hello(p)


def _check_pool_spec(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    parse_pool_spec(p)


def _check_stats(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    parse_stats(p)


def _check_welcome(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    if status == Status.OK:
        parse_welcome(p)


def _check_pool_flags(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    if status == Status.OK:
        parse_pool_flags(p)


def _check_vector_reply(reader: FrameReader, op: int, status: int, n: int, p: bytes) -> None:
    if not p:
        return
    if op == Op.GET_VEC:
        parse_get_vec_reply(p, n)  # statuses known and exactly one page per OK
    else:
        parse_status_vector(p, n)


def _check_device_stats(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    if status == Status.OK:
        parse_stats(p)


def _check_notice(reader: FrameReader, op: int, status: int, index: int, p: bytes) -> None:
    parse_notice(p)


def _build_rules() -> dict[Role, tuple[_Rule | None, ...]]:
    """Per-role tables indexed by the u8 opcode, so lookup needs no bounds check."""
    host: list[_Rule | None] = [None] * 256
    guest: list[_Rule | None] = [None] * 256
    request_len = {
        Op.HELLO: _VAR,
        Op.NEW_POOL: _POOL_SPEC.size,
        Op.DESTROY_POOL: 0,
        Op.QUERY_POOL: 0,
        Op.PUT: PAGE_SIZE,
        Op.GET: 0,
        Op.FLUSH_PAGE: 0,
        Op.FLUSH_OBJECT: 0,
        Op.PUT_VEC: _VAR,
        Op.GET_VEC: _VAR,
        Op.FLUSH_VEC: _VAR,
        Op.STATS: _VAR,
        Op.DEVICE_STATS: 0,
    }
    request_header: dict[Op, _HeaderCheck] = {
        Op.HELLO: _hello_request,
        Op.FLUSH_OBJECT: _flush_object,
        Op.PUT_VEC: _vector_request,
        Op.GET_VEC: _vector_request,
        Op.FLUSH_VEC: _vector_request,
    }
    request_payload: dict[Op, _PayloadCheck] = {
        Op.HELLO: _check_hello,
        Op.NEW_POOL: _check_pool_spec,
        Op.STATS: _check_stats,
    }
    for op, length in request_len.items():
        optional = int(Flag.NOREPLY) if op in NOREPLY_OPS else 0
        host[op] = _Rule(
            _U8 & ~optional,
            0,
            0,
            length,
            length,
            request_header.get(op),
            request_payload.get(op),
        )

    reply_len_ok = {Op.HELLO: _WELCOME.size, Op.QUERY_POOL: 4, Op.GET: PAGE_SIZE, Op.DEVICE_STATS: _VAR}
    reply_payload: dict[Op, _PayloadCheck] = {
        Op.HELLO: _check_welcome,
        Op.DEVICE_STATS: _check_device_stats,
        Op.QUERY_POOL: _check_pool_flags,
        Op.PUT_VEC: _check_vector_reply,
        Op.GET_VEC: _check_vector_reply,
    }
    for op in REQUEST_OPS:
        if op in (Op.PUT_VEC, Op.GET_VEC):
            guest[op] = _Rule(_U8, int(Flag.REPLY), _MAX_STATUS, _VAR, _VAR, _vector_reply, reply_payload[op])
        else:
            guest[op] = _Rule(
                _U8, int(Flag.REPLY), _MAX_STATUS, reply_len_ok.get(op, 0), 0, None, reply_payload.get(op)
            )
    guest[Op.NOTICE] = _Rule(_U8, 0, 0, _NOTICE.size, _NOTICE.size, _notice_header, _check_notice)
    guest[Op.ERROR] = _Rule(_U8, 0, _MAX_STATUS, _VAR, _VAR, None, None)
    return {Role.HOST: tuple(host), Role.GUEST: tuple(guest)}


_RULES = _build_rules()

# The decoder's hot path looks a header's first 8 bytes (magic, version, opcode, flags, status,
# reserved) up as one u64 in a table of every valid combination: one unpack of 6 fields and one
# dict lookup replace unpacking 11 and checking them one by one.  A miss is a protocol error,
# which `_diagnose` then names.
_FAST_HEADER = struct.Struct("<QII24sII")  # the 8 bytes above as one key, rid, pool, oid, index, length
_PREFIX = struct.Struct("<HBBBBH")
# key -> (opcode, flags, status, payload length or _VAR, header check, payload check)
_Fast = tuple[int, int, int, int, "_HeaderCheck | None", "_PayloadCheck | None"]


def _build_fast(rules: tuple[_Rule | None, ...]) -> dict[int, _Fast]:
    table: dict[int, _Fast] = {}
    for op, rule in enumerate(rules):
        if rule is None:
            continue
        for flags in range(_ALL_FLAGS + 1):
            if flags & rule.flag_mask != rule.flags_required:
                continue
            for status in range(rule.max_status + 1):
                key = int.from_bytes(_PREFIX.pack(MAGIC, VERSION, op, flags, status, 0), "little")
                want = rule.len_ok if status == 0 else rule.len_fail
                table[key] = (op, flags, status, want, rule.header_check, rule.payload_check)
    return table


_FAST = {role: _build_fast(rules) for role, rules in _RULES.items()}
_COMPACT_AT = 1 << 16  # consumed bytes kept at the buffer front before we move the tail down
_new_frame = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path


class FrameReader:
    """Incremental decoder for the frames one side receives.

    With nothing buffered, frames are cut straight out of the `bytes` passed to `feed` and
    only a trailing partial frame is kept.  Otherwise bytes are appended to a bytearray and
    consumed by advancing an offset; the consumed prefix is dropped only when the buffer
    empties or the prefix exceeds 64 KiB.  Either way a frame costs one header unpack and
    one payload copy, never a copy of the buffer.  `max_payload` / `max_vector` are plain
    attributes, read on every `feed`, so an agent may set them after HELLO negotiation.
    """

    def __init__(
        self,
        role: Role,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_vector: int = DEFAULT_MAX_VECTOR,
    ) -> None:
        if max_payload < 0 or max_vector < 1:
            raise ValueError("max_payload must be >= 0 and max_vector >= 1")
        self.role = role
        self.max_payload = max_payload
        self.max_vector = max_vector
        self._rules = _RULES[role]
        self._fast = _FAST[role]
        self._buf = bytearray()
        self._off = 0
        self._broken: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (a partial frame)."""
        return len(self._buf) - self._off

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Take more bytes; return every frame now complete, in order.

        Raises ProtocolError on the first violation and on every later call; frames decoded
        earlier in the failing call are attached to the error as `err.frames`.
        """
        if self._broken is not None:
            raise self._again()
        frames: list[Frame] = []
        buf = self._buf
        try:
            if self._off == len(buf):
                # Nothing buffered (the common case): decode straight out of the caller's
                # bytes and keep only the trailing partial frame, saving a copy per frame.
                if type(data) is bytes:
                    off = self._parse(data, data, 0, frames)
                else:  # a view of the caller's receive buffer: payloads are copied out of it
                    with memoryview(data) as mv:
                        off = self._parse(mv, mv, 0, frames)
                        if off != len(mv):
                            self._buf = bytearray(mv[off:])
                            self._off = 0
                    return frames
                if off != len(data):
                    self._buf = bytearray(data[off:])
                    self._off = 0
                return frames
            buf += data
            with memoryview(buf) as mv:  # released before the buffer is resized below
                off = self._parse(buf, mv, self._off, frames)
        except ProtocolError as err:
            self._fail(err)
            err.frames = frames
            raise
        if off == len(buf):
            buf.clear()
            off = 0
        elif off >= _COMPACT_AT:
            del buf[:off]
            off = 0
        self._off = off
        return frames

    def feed_one(self, data: memoryview) -> Frame | None:
        """Decode `data` if it is exactly one whole frame of a plain kind; else None, and
        `data` is untouched: pass it to `feed`, which also reports any violation.

        For a caller that gathered one reply in its receive buffer (a lone request): a
        frame that feed would return the same way, minus feed's list, loop and buffering.
        Only frames without extra header or payload checks qualify (page and flush replies).
        """
        if self._off != len(self._buf) or self._broken is not None or len(data) < HEADER_SIZE:
            return None
        key, rid, pool, oid, index, length = _FAST_HEADER.unpack_from(data)
        rule = self._fast.get(key)  # the table _parse checks headers with
        if rule is None or len(data) != HEADER_SIZE + length or length > self.max_payload:
            return None
        op, flags, status, want, header_check, payload_check = rule
        if want != length or header_check is not None or payload_check is not None:
            return None
        payload = bytes(data[HEADER_SIZE:]) if length else b""
        return _new_frame(Frame, (op, flags, status, rid, pool, oid, index, payload))

    def _parse(
        self, src: bytes | bytearray | memoryview, view: bytes | memoryview, off: int, frames: list[Frame]
    ) -> int:
        """Append the complete frames in src[off:] to frames; return the new offset.

        `view` is src itself when src is bytes (slicing bytes already copies), else a
        memoryview of it (so a payload is copied once, not twice).
        """
        end = len(src)
        fast = self._fast.get
        max_payload = self.max_payload
        unpack = _FAST_HEADER.unpack_from
        append = frames.append
        while end - off >= HEADER_SIZE:
            key, rid, pool, oid, index, length = unpack(src, off)
            rule = fast(key)
            if rule is None or length > max_payload:
                magic, version, op, flags, status, reserved = _PREFIX.unpack_from(src, off)
                raise self._diagnose(magic, version, op, flags, status, reserved, length)
            op, flags, status, want, header_check, payload_check = rule
            if want != length and want != _VAR:
                raise ProtocolError(
                    f"{_op_name(op)} {self._kind(op)} with status {status}: "
                    f"payload is {length} bytes, want {want}"
                )
            if header_check is not None:
                header_check(self, op, status, rid, index, length)
            start = off + HEADER_SIZE
            stop = start + length
            if stop > end:
                break  # header is fine; wait for the rest of the payload
            payload = bytes(view[start:stop]) if length else b""
            if payload_check is not None:
                payload_check(self, op, status, index, payload)
            append(_new_frame(Frame, (op, flags, status, rid, pool, oid, index, payload)))
            off = stop
        return off

    def eof(self) -> None:
        """The stream ended; a buffered partial frame means the peer was cut off mid-frame."""
        if self._broken is not None:
            raise self._again()
        if self.buffered:
            err = ProtocolError(f"truncated frame at end of stream ({self.buffered} bytes buffered)")
            self._fail(err)
            raise err

    # -- error helpers (off the hot path) --

    def _check_n(self, op: int, n: int) -> None:
        if not 1 <= n <= self.max_vector:
            raise ProtocolError(f"{_op_name(op)} with {n} keys, want 1..{self.max_vector}")

    def _fail(self, err: ProtocolError) -> None:
        self._broken = err
        self._buf = bytearray()
        self._off = 0

    def _again(self) -> ProtocolError:
        assert self._broken is not None
        return ProtocolError(f"reader already failed: {self._broken}", self._broken.status)

    def _kind(self, op: int) -> str:
        if op in (Op.NOTICE, Op.ERROR, Op.STATS):
            return "message"
        return "request" if self.role is Role.HOST else "reply"

    def _diagnose(
        self, magic: int, version: int, op: int, flags: int, status: int, reserved: int, length: int
    ) -> ProtocolError:
        """Name the first rule a bad header breaks (slow path, only on failure)."""
        if magic != MAGIC:
            return ProtocolError(f"bad magic {magic:#06x}, want {MAGIC:#06x}")
        if version != VERSION:
            return ProtocolError(f"unsupported version {version}, want {VERSION}")
        if reserved:
            return ProtocolError(f"reserved header field is {reserved:#x}, must be 0")
        if length > self.max_payload:
            return ProtocolError(f"payload length {length} exceeds the maximum {self.max_payload}")
        if not 1 <= op <= _MAX_OP:
            return ProtocolError(f"unknown opcode {op}")
        name = _op_name(op)
        rule = self._rules[op]
        if rule is None:
            way = "guest->host" if self.role is Role.HOST else "host->guest"
            return ProtocolError(f"opcode {name} is not valid {way}")
        if flags & ~_ALL_FLAGS:
            return ProtocolError(f"{name} has unknown flag bits {flags:#x}")
        if flags & rule.flag_mask != rule.flags_required:
            if self.role is Role.HOST:
                if flags & Flag.REPLY:
                    return ProtocolError(f"REPLY flag set on {name} request")
                return ProtocolError(f"NOREPLY not allowed on {name}")
            if op in (Op.NOTICE, Op.ERROR):
                return ProtocolError(f"{name} must have flags 0, has {flags:#x}")
            if not flags & Flag.REPLY:
                return ProtocolError(f"REPLY flag missing on {name} reply")
            return ProtocolError(f"NOREPLY not allowed on {name} reply")
        if status > _MAX_STATUS:
            return ProtocolError(f"unknown status {status} on {name}")
        return ProtocolError(f"{name} {self._kind(op)} must have status OK, has {status}")
