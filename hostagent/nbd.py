"""A sans-IO NBD server: bytes in, bytes out, a backend behind it.

The host agent serves each guest's swap device to QEMU's NBD client with this (docs/preswap-device.md).
Only what a swap disk needs: the fixed newstyle handshake (EXPORT_NAME, INFO, GO, LIST, ABORT; any other
option is answered NBD_REP_ERR_UNSUP, so clients fall back to simple replies) and transmission with
simple replies (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, DISC). The protocol is NetworkBlockDevice's
doc/proto.md. Nothing here raises on bad input: a request that can be answered gets an NBD error, one
that cannot (bad magic, a huge option, a write longer than the limit) closes the connection with a
reason, which the caller logs. Backend errors (`NbdError`) become the errno they carry; any other
exception from the backend is the caller's bug and propagates.

`feed` parses and checks; the requests it frames wait in a queue until the caller runs them with
`step` (or `run`), which awaits the backend: its I/O may take a worker thread's time, and the caller
keeps serving other connections meanwhile. Requests run one at a time, in order, so replies go out in
request order.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple, Protocol

NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

FLAG_FIXED_NEWSTYLE: Final = 1
FLAG_NO_ZEROES: Final = 2

OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_INFO: Final = 6
OPT_GO: Final = 7

REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_ERR_UNSUP: Final = (1 << 31) + 1
REP_ERR_POLICY: Final = (1 << 31) + 2
REP_ERR_INVALID: Final = (1 << 31) + 3
REP_ERR_UNKNOWN: Final = (1 << 31) + 6

INFO_EXPORT: Final = 0
INFO_BLOCK_SIZE: Final = 3

TF_HAS_FLAGS: Final = 1
TF_SEND_FLUSH: Final = 4
TF_SEND_FUA: Final = 8
TF_SEND_TRIM: Final = 32
TF_SEND_WRITE_ZEROES: Final = 64
TRANSMISSION_FLAGS: Final = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_WRITE_ZEROES: Final = 6
CMD_FLAG_FUA: Final = 1

EPERM: Final = 1
EIO: Final = 5
EINVAL: Final = 22
ENOSPC: Final = 28
ENOTSUP: Final = 95

MAX_OPTION: Final = 4096  # longest option payload accepted (names are short)
MAX_REQUEST: Final = 32 << 20  # longest READ/WRITE (QEMU sends at most 32 MiB)
MIN_BLOCK: Final = 1
PREFERRED_BLOCK: Final = 4096

_OPT_HEADER = struct.Struct(">QII")
_OPT_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")


class NbdError(Exception):
    """A backend's failure of one request: answered with `errno`, the connection stays."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno


class Backend(Protocol):
    """One export: a byte array of `size` bytes."""

    size: int

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: bytes, fua: bool) -> None: ...
    async def trim(self, offset: int, length: int) -> None: ...
    async def write_zeroes(self, offset: int, length: int) -> None: ...
    async def flush(self) -> None: ...


class _Request(NamedTuple):
    """A framed request waiting for `step`; `error` is its answer if the checks already failed."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes
    error: int


# name -> the export's backend, or None if this connection may not have it
Opener = Callable[[str], "Backend | None"]


class NbdServer:
    """One connection's server side. `feed` the bytes read, send what `take_output` returns, and
    close the socket when `closed` is set (`close_reason` says why, for the log)."""

    def __init__(self, open_export: Opener, list_exports: Callable[[], list[str]]) -> None:
        self._open = open_export
        self._list = list_exports
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._state = "client_flags"
        self.backend: Backend | None = None
        self.export = ""
        self.no_zeroes = False
        self.closed = False
        self.close_reason = ""
        self.requests = 0
        self.errors = 0
        self._queue: deque[_Request] = deque()
        self.backlog = 0  # bytes of write data queued (the caller stops reading past its limit)
        self._out.append(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    # -- I/O edge -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Consume bytes from the client; replies queue up for `take_output`."""
        if self.closed:
            return
        self._buf += data
        while not self.closed:
            if self._state == "client_flags":
                progressed = self._client_flags()
            elif self._state == "options":
                progressed = self._option()
            else:
                progressed = self._request()
            if not progressed:
                break

    @property
    def has_requests(self) -> bool:
        """Requests are queued for `step` (none once the connection is closed)."""
        return bool(self._queue) and not self.closed

    async def step(self) -> None:
        """Run the oldest queued request; its reply is then in the output."""
        req = self._queue.popleft()
        self.backlog -= len(req.data)
        if req.error:
            self._answer(req.cookie, req.error)
            return
        backend = self.backend
        assert backend is not None
        cmd, cookie = req.cmd, req.cookie
        if cmd == CMD_DISC:
            self._close("client disconnected")
            return
        try:
            if cmd == CMD_READ:
                data = await backend.read(req.offset, req.length)
                self._answer(cookie, 0, data)
                return
            if cmd == CMD_WRITE:
                await backend.write(req.offset, req.data, bool(req.flags & CMD_FLAG_FUA))
            elif cmd == CMD_FLUSH:
                await backend.flush()
            elif cmd == CMD_TRIM:
                await backend.trim(req.offset, req.length)
            else:
                await backend.write_zeroes(req.offset, req.length)
        except NbdError as err:
            self._answer(cookie, err.errno)
        else:
            self._answer(cookie, 0)

    async def run(self) -> None:
        """Run every queued request."""
        while self.has_requests:
            await self.step()

    def take_output(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _close(self, reason: str) -> None:
        self.closed = True
        self.close_reason = reason
        self._buf.clear()
        self._queue.clear()
        self.backlog = 0

    # -- handshake ----------------------------------------------------------------------------

    def _client_flags(self) -> bool:
        if len(self._buf) < 4:
            return False
        (flags,) = struct.unpack_from(">I", self._buf)
        del self._buf[:4]
        if not flags & FLAG_FIXED_NEWSTYLE:
            self._close("client does not speak fixed newstyle")
        elif flags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            self._close(f"unknown client flags {flags:#x}")
        else:
            self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
            self._state = "options"
        return True

    def _reply(self, option: int, kind: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY.pack(REPLY_MAGIC, option, kind, len(data)) + data)

    def _option(self) -> bool:
        if len(self._buf) < _OPT_HEADER.size:
            return False
        magic, option, length = _OPT_HEADER.unpack_from(self._buf)
        if magic != IHAVEOPT:
            self._close(f"bad option magic {magic:#x}")
            return True
        if length > MAX_OPTION:
            self._close(f"option {option} of {length} bytes (limit {MAX_OPTION})")
            return True
        if len(self._buf) < _OPT_HEADER.size + length:
            return False
        data = bytes(self._buf[_OPT_HEADER.size : _OPT_HEADER.size + length])
        del self._buf[: _OPT_HEADER.size + length]
        if option == OPT_EXPORT_NAME:
            self._export_name(data.decode("utf-8", "replace"))
        elif option == OPT_ABORT:
            self._reply(option, REP_ACK)
            self._close("client aborted the handshake")
        elif option == OPT_LIST:
            if data:
                self._reply(option, REP_ERR_INVALID, b"LIST takes no data")
            else:
                for name in self._list():
                    raw = name.encode()
                    self._reply(option, REP_SERVER, struct.pack(">I", len(raw)) + raw)
                self._reply(option, REP_ACK)
        elif option in (OPT_INFO, OPT_GO):
            self._info(option, data)
        else:
            self._reply(option, REP_ERR_UNSUP, f"option {option} not supported".encode())
        return True

    def _export_name(self, name: str) -> None:
        backend = self._open(name)
        if backend is None:  # EXPORT_NAME has no error reply: the spec says close
            self._close(f"no export {name!r} for this client")
            return
        self._start(name, backend)
        out = struct.pack(">QH", backend.size, TRANSMISSION_FLAGS)
        self._out.append(out if self.no_zeroes else out + bytes(124))

    def _info(self, option: int, data: bytes) -> None:
        if len(data) < 6:
            self._reply(option, REP_ERR_INVALID, b"short INFO/GO request")
            return
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._reply(option, REP_ERR_INVALID, b"bad name length")
            return
        name = data[4 : 4 + nlen].decode("utf-8", "replace")
        (count,) = struct.unpack_from(">H", data, 4 + nlen)
        if len(data) != 4 + nlen + 2 + 2 * count:
            self._reply(option, REP_ERR_INVALID, b"bad information request count")
            return
        backend = self._open(name)
        if backend is None:
            self._reply(option, REP_ERR_UNKNOWN, f"no export {name!r}".encode())
            return
        self._reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, backend.size, TRANSMISSION_FLAGS))
        self._reply(
            option, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, MAX_REQUEST)
        )
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            self._start(name, backend)

    def _start(self, name: str, backend: Backend) -> None:
        self.export = name
        self.backend = backend
        self._state = "transmission"

    # -- transmission -------------------------------------------------------------------------

    def _answer(self, cookie: int, error: int, data: bytes = b"") -> None:
        if error:
            self.errors += 1
        self._out.append(_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie))
        if data:
            self._out.append(data)

    def _request(self) -> bool:
        buf = self._buf
        if len(buf) < _REQUEST.size:
            return False
        magic, flags, cmd, cookie, offset, length = _REQUEST.unpack_from(buf)
        if magic != REQUEST_MAGIC:
            self._close(f"bad request magic {magic:#x}")
            return True
        if cmd == CMD_WRITE:
            if length > MAX_REQUEST:  # its payload cannot be skipped safely: no resync possible
                self._close(f"write of {length} bytes (limit {MAX_REQUEST})")
                return True
            if len(buf) < _REQUEST.size + length:
                return False
            data = bytes(buf[_REQUEST.size : _REQUEST.size + length])
            del buf[: _REQUEST.size + length]
        else:
            data = b""
            del buf[: _REQUEST.size]
        self.requests += 1
        self._queue.append(
            _Request(cmd, flags, cookie, offset, length, data, self._check(cmd, offset, length))
        )
        self.backlog += len(data)
        return True

    def _check(self, cmd: int, offset: int, length: int) -> int:
        """The errno a framed request gets without reaching the backend, or 0."""
        backend = self.backend
        assert backend is not None
        if cmd in (CMD_DISC, CMD_FLUSH):
            return 0
        if cmd not in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES):
            return EINVAL
        if cmd == CMD_READ and length > MAX_REQUEST:
            return EINVAL
        if offset + length > backend.size:
            return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
        return 0


__all__ = ["Backend", "NbdError", "NbdServer"]
