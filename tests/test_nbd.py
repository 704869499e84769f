"""The sans-IO NBD server, fed bytes as a client would send them (pure logic: a bytearray backend)."""

from __future__ import annotations

import asyncio
import struct

import pytest

from hostagent import nbd
from hostagent.nbd import NbdError, NbdServer


class MemBackend:
    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        self.flushes = 0
        self.fail_reads = False

    async def read(self, offset: int, length: int) -> bytes:
        if self.fail_reads:
            raise NbdError(nbd.EIO, "broken")
        return bytes(self.data[offset : offset + length])

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        self.data[offset : offset + len(data)] = data

    async def trim(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def write_zeroes(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)

    async def flush(self) -> None:
        self.flushes += 1


def feed(s: NbdServer, data: bytes) -> None:
    """Bytes in, then every request they framed run against the backend."""
    s.feed(data)
    asyncio.run(s.run())


def server(backend: MemBackend, name: str = "vm1") -> NbdServer:
    return NbdServer(lambda n: backend if n == name else None, lambda: [name])


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data


def go_data(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def request(
    cmd: int,
    cookie: int,
    offset: int,
    length: int,
    data: bytes = b"",
    flags: int = 0,
    magic: int = nbd.REQUEST_MAGIC,
) -> bytes:
    return struct.pack(">IHHQQI", magic, flags, cmd, cookie, offset, length) + data


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """Option replies: (option, type, data)."""
    found = []
    while out:
        magic, opt, kind, length = struct.unpack_from(">QIII", out)
        assert magic == nbd.REPLY_MAGIC
        found.append((opt, kind, out[20 : 20 + length]))
        out = out[20 + length :]
    return found


def simple(out: bytes, data_len: int = 0) -> tuple[int, int, bytes, bytes]:
    magic, error, cookie = struct.unpack_from(">IIQ", out)
    assert magic == nbd.SIMPLE_REPLY_MAGIC
    return error, cookie, out[16 : 16 + data_len], out[16 + data_len :]


def connected(backend: MemBackend) -> NbdServer:
    s = server(backend)
    greeting = s.take_output()
    assert struct.unpack(">QQH", greeting) == (nbd.NBDMAGIC, nbd.IHAVEOPT, 3)
    feed(s, struct.pack(">I", 3) + option(nbd.OPT_GO, go_data("vm1", (nbd.INFO_BLOCK_SIZE,))))
    got = replies(s.take_output())
    assert got[-1][:2] == (nbd.OPT_GO, nbd.REP_ACK)
    info = [d for _, k, d in got if k == nbd.REP_INFO]
    assert struct.unpack(">HQH", info[0]) == (nbd.INFO_EXPORT, backend.size, nbd.TRANSMISSION_FLAGS)
    assert s.export == "vm1" and not s.closed
    return s


def test_go_then_write_read_flush_trim_zeroes_disc() -> None:
    b = MemBackend(1 << 20)
    s = connected(b)
    feed(s, request(nbd.CMD_WRITE, 7, 4096, 8192, b"\xab" * 8192))
    assert simple(s.take_output()) == (0, 7, b"", b"")
    feed(s, request(nbd.CMD_READ, 8, 4096, 8192))
    err, cookie, data, rest = simple(s.take_output(), 8192)
    assert (err, cookie, data, rest) == (0, 8, b"\xab" * 8192, b"")
    feed(s, request(nbd.CMD_FLUSH, 9, 0, 0))
    assert simple(s.take_output())[:2] == (0, 9) and b.flushes == 1
    feed(s, request(nbd.CMD_TRIM, 10, 4096, 4096) + request(nbd.CMD_WRITE_ZEROES, 11, 8192, 100))
    out = s.take_output()
    assert simple(out)[:2] == (0, 10) and simple(out[16:])[:2] == (0, 11)
    assert b.data[4096 : 8192 + 100] == bytes(4096 + 100) and b.data[8292] == 0xAB
    feed(s, request(nbd.CMD_DISC, 12, 0, 0))
    assert s.closed and s.take_output() == b""


def test_bytes_one_at_a_time() -> None:
    b = MemBackend(65536)
    s = server(b)
    s.take_output()
    stream = (
        struct.pack(">I", 1)
        + option(nbd.OPT_GO, go_data("vm1"))
        + request(nbd.CMD_WRITE, 1, 0, 5, b"hello")
        + request(nbd.CMD_READ, 2, 0, 5)
    )
    for i in range(len(stream)):
        feed(s, stream[i : i + 1])
    out = s.take_output()
    got = replies(out[: out.index(struct.pack(">I", nbd.SIMPLE_REPLY_MAGIC))])
    assert got[-1][1] == nbd.REP_ACK
    tail = out[out.index(struct.pack(">I", nbd.SIMPLE_REPLY_MAGIC)) :]
    assert simple(tail)[:2] == (0, 1)
    assert simple(tail[16:], 5)[:3] == (0, 2, b"hello")


def test_export_name_old_style_and_zero_padding() -> None:
    b = MemBackend(8192)
    s = server(b)
    s.take_output()
    feed(s, struct.pack(">I", 1) + option(nbd.OPT_EXPORT_NAME, b"vm1"))
    out = s.take_output()
    assert struct.unpack_from(">QH", out) == (8192, nbd.TRANSMISSION_FLAGS) and len(out) == 10 + 124
    s2 = server(b)
    s2.take_output()
    feed(s2, struct.pack(">I", 3) + option(nbd.OPT_EXPORT_NAME, b"vm1"))
    assert len(s2.take_output()) == 10


def test_export_name_unknown_closes() -> None:
    s = server(MemBackend(4096))
    s.take_output()
    feed(s, struct.pack(">I", 3) + option(nbd.OPT_EXPORT_NAME, b"other"))
    assert s.closed and "other" in s.close_reason and s.backend is None


def test_list_info_unknown_options_and_abort() -> None:
    b = MemBackend(4096)
    s = server(b)
    s.take_output()
    feed(
        s,
        struct.pack(">I", 3)
        + option(nbd.OPT_LIST)
        + option(nbd.OPT_LIST, b"x")
        + option(nbd.OPT_INFO, go_data("vm1"))
        + option(nbd.OPT_INFO, go_data("nope"))
        + option(8)
        + option(5)
        + option(99, b"junk")
        + option(nbd.OPT_INFO, b"\0\0\0\xff\0\0"),
    )
    got = replies(s.take_output())
    kinds = [(o, k) for o, k, _ in got]
    assert kinds == [
        (3, nbd.REP_SERVER),
        (3, nbd.REP_ACK),
        (3, nbd.REP_ERR_INVALID),
        (6, nbd.REP_INFO),
        (6, nbd.REP_INFO),
        (6, nbd.REP_ACK),
        (6, nbd.REP_ERR_UNKNOWN),
        (8, nbd.REP_ERR_UNSUP),
        (5, nbd.REP_ERR_UNSUP),
        (99, nbd.REP_ERR_UNSUP),
        (6, nbd.REP_ERR_INVALID),
    ]
    assert got[0][2] == b"\0\0\0\x03vm1"
    assert s.backend is None and not s.closed  # INFO does not start transmission
    feed(s, option(nbd.OPT_ABORT))
    assert replies(s.take_output()) == [(2, nbd.REP_ACK, b"")] and s.closed


@pytest.mark.parametrize(
    "stream,reason",
    [
        (struct.pack(">I", 0), "fixed newstyle"),
        (struct.pack(">I", 0x10001), "client flags"),
        (struct.pack(">I", 1) + struct.pack(">QII", 1234, 7, 0), "option magic"),
        (struct.pack(">I", 1) + struct.pack(">QII", nbd.IHAVEOPT, 7, 1 << 30), "limit"),
    ],
)
def test_bad_handshake_closes(stream: bytes, reason: str) -> None:
    s = server(MemBackend(4096))
    s.take_output()
    feed(s, stream)
    assert s.closed and reason in s.close_reason and s.backend is None


def test_bad_requests_get_errors_or_close() -> None:
    b = MemBackend(1 << 16)
    s = connected(b)
    b.data[:] = b"\x11" * len(b.data)
    feed(s, request(nbd.CMD_READ, 1, (1 << 16) - 10, 20))  # past the end
    feed(s, request(nbd.CMD_WRITE, 2, 1 << 16, 4, b"evil"))  # past the end: payload consumed
    feed(s, request(nbd.CMD_WRITE_ZEROES, 3, 1 << 64 - 1, 1))
    feed(s, request(nbd.CMD_TRIM, 4, 1 << 17, 1))
    feed(s, request(42, 5, 0, 0))  # unknown command
    feed(s, request(nbd.CMD_READ, 6, 0, nbd.MAX_REQUEST + 1))  # too long a read
    out = s.take_output()
    errs = []
    while out:
        e, c, _, out = simple(out)
        errs.append((c, e))
    assert errs == [
        (1, nbd.EINVAL),
        (2, nbd.ENOSPC),
        (3, nbd.ENOSPC),
        (4, nbd.EINVAL),
        (5, nbd.EINVAL),
        (6, nbd.EINVAL),
    ]
    assert b.data == b"\x11" * len(b.data) and not s.closed
    b.fail_reads = True
    feed(s, request(nbd.CMD_READ, 7, 0, 4096))
    assert simple(s.take_output()) == (nbd.EIO, 7, b"", b"")
    feed(s, request(nbd.CMD_WRITE, 8, 0, nbd.MAX_REQUEST + 1))
    assert s.closed and "limit" in s.close_reason
    feed(s, request(nbd.CMD_READ, 9, 0, 4))  # nothing after a close
    assert s.take_output() == b""


def test_bad_request_magic_closes() -> None:
    s = connected(MemBackend(4096))
    feed(s, request(nbd.CMD_READ, 1, 0, 4, magic=0xDEADBEEF))
    assert s.closed and "request magic" in s.close_reason and s.take_output() == b""


def test_requests_wait_for_step_and_answer_in_order() -> None:
    b = MemBackend(1 << 16)
    s = connected(b)
    s.feed(
        request(nbd.CMD_WRITE, 1, 0, 4096, b"\x01" * 4096)
        + request(nbd.CMD_READ, 2, 1 << 20, 4)  # out of range: answered in its turn, not before
        + request(nbd.CMD_READ, 3, 0, 4)
    )
    assert s.has_requests and s.backlog == 4096 and s.take_output() == b""
    assert b.data[0] == 0  # nothing ran yet
    asyncio.run(s.step())
    assert simple(s.take_output()) == (0, 1, b"", b"") and s.backlog == 0
    asyncio.run(s.run())
    out = s.take_output()
    assert simple(out)[:2] == (nbd.EINVAL, 2)
    assert simple(out[16:], 4)[:3] == (0, 3, b"\x01" * 4)
    assert not s.has_requests
    s.feed(request(nbd.CMD_READ, 4, 0, 4) + request(nbd.CMD_READ, 5, 0, 4, magic=0xBAD))
    assert s.closed and not s.has_requests  # a broken stream drops what waited: nothing answered
