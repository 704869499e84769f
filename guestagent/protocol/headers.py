"""The fast header packers both agents use on their hot paths, and plain-int wire constants.

`wire.encode` builds a `Frame` and checks it; a page operation cannot afford either, so both
agents pack a request's or a reply's 48-byte header straight from ints (the payload travels as
its own buffer, never copied).  The constants below are the wire enums' values as plain ints,
declared here once: comparing an int to a module constant is cheaper than to an `IntEnum`
member, most of all in the mypyc-compiled host channel.
"""

from __future__ import annotations

import struct
from typing import Final

from guestagent.protocol.wire import HEADER, HEADER_SIZE, MAGIC, VERSION, Flag, Op, PoolFlag, Status

__all__ = [
    "FLUSH_OBJECT",
    "FLUSH_PAGE",
    "FLUSH_VEC",
    "GET",
    "GET_VEC",
    "HELLO",
    "LENGTH_AT",
    "NOREPLY",
    "NOTICE",
    "NOT_FOUND",
    "NO_SPACE",
    "OK",
    "PERSISTENT",
    "PUT",
    "PUT_VEC",
    "REPLY",
    "STATS",
    "pack_reply",
    "pack_request",
    "payload_length",
]

# opcodes
HELLO: Final = int(Op.HELLO)
PUT: Final = int(Op.PUT)
GET: Final = int(Op.GET)
FLUSH_PAGE: Final = int(Op.FLUSH_PAGE)
FLUSH_OBJECT: Final = int(Op.FLUSH_OBJECT)
PUT_VEC: Final = int(Op.PUT_VEC)
GET_VEC: Final = int(Op.GET_VEC)
FLUSH_VEC: Final = int(Op.FLUSH_VEC)
STATS: Final = int(Op.STATS)
NOTICE: Final = int(Op.NOTICE)
# header flags
REPLY: Final = int(Flag.REPLY)
NOREPLY: Final = int(Flag.NOREPLY)
# statuses
OK: Final = int(Status.OK)
NOT_FOUND: Final = int(Status.NOT_FOUND)
NO_SPACE: Final = int(Status.NO_SPACE)
# pool flags
PERSISTENT: Final = int(PoolFlag.PERSISTENT)

LENGTH_AT: Final = HEADER_SIZE - 4  # offset of a header's payload length, its last field
_pack = HEADER.pack
_unpack_length = struct.Struct("<I").unpack_from


def pack_request(op: int, flags: int, rid: int, pool: int, oid: bytes, index: int, length: int) -> bytes:
    """A guest request's header; bad arguments are the caller's bug, so ValueError."""
    if len(oid) != 24:
        raise ValueError(f"oid is {len(oid)} bytes, want 24")
    try:
        return _pack(MAGIC, VERSION, op, flags, 0, 0, rid, pool, oid, index, length)
    except struct.error as exc:
        raise ValueError(f"cannot encode {_op_name(op)} request: {exc}") from None


def pack_reply(op: int, status: int, rid: int, pool: int, oid: bytes, index: int, length: int) -> bytes:
    """A host reply's header (REPLY flag set); `pool`, `oid` and `index` echo the request's."""
    return _pack(MAGIC, VERSION, op, REPLY, status, 0, rid, pool, oid, index, length)


def payload_length(buf: bytes | bytearray | memoryview) -> int:
    """The payload length of the header at the start of `buf` (at least HEADER_SIZE bytes)."""
    length: int = _unpack_length(buf, LENGTH_AT)[0]
    return length


def _op_name(op: int) -> str:
    try:
        return Op(op).name
    except ValueError:
        return str(op)
