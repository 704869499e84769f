"""A blocking wire-level test guest, built directly on `guestagent.protocol.wire` (not on the guest
agent's channel client), so tests see exactly the frames the host agent sends."""

from __future__ import annotations

import contextlib
import random
import socket
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, Status

if TYPE_CHECKING:
    from tests.support.host_agent import HostAgentProcess


def oid(n: int) -> bytes:
    return n.to_bytes(24, "little")


def page(seed: int, compressible: bool = False) -> bytes:
    """A distinct page per seed; compressible pages look like text, the others are random."""
    if compressible:
        return (f"page {seed} ".encode() * 1000)[: wire.PAGE_SIZE]
    return random.Random(seed).randbytes(wire.PAGE_SIZE)


class WireGuest:
    """A guest speaking the wire protocol over a blocking unix socket, one request at a time
    (or pipelined with `send` + `recv`)."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.reader = wire.FrameReader(wire.Role.GUEST)
        self.pending: deque[Frame] = deque()
        self.next_rid = 1
        self.welcome: wire.Welcome | None = None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> WireGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rid(self) -> int:
        self.next_rid += 1
        return self.next_rid - 1

    def send(self, *frames: Frame) -> None:
        self.sock.sendall(b"".join(wire.encode(f) for f in frames))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> Frame:
        """The next frame from the host; EOFError when the host closed the channel."""
        while not self.pending:
            data = self.sock.recv(1 << 18)
            if not data:
                self.reader.eof()
                raise EOFError("host closed the channel")
            self.pending.extend(self.reader.feed(data))
        return self.pending.popleft()

    def at_eof(self) -> bool:
        """True if the host closed the channel and nothing is left to read."""
        try:
            frame = self.recv()
        except EOFError:
            return True
        raise AssertionError(f"expected EOF, got {frame}")

    def expect_error(self) -> Frame:
        """The host must send ERROR (after any replies) and then close the channel."""
        while True:
            frame = self.recv()
            if frame.opcode == Op.ERROR:
                assert self.at_eof()
                return frame

    def call(self, op: Op, **fields: Any) -> Frame:
        rid = self.rid()
        self.send(Frame(op, request_id=rid, **fields))
        reply = self.recv()
        assert reply.opcode == op and reply.request_id == rid, reply
        return reply

    def hello(
        self, name: str = "test", min_version: int = wire.VERSION, max_version: int = wire.VERSION
    ) -> wire.Welcome:
        reply = self.call(
            Op.HELLO, payload=wire.hello_payload(wire.Hello(min_version, max_version, wire.PAGE_SIZE, name))
        )
        assert reply.status == Status.OK, reply
        self.welcome = wire.parse_welcome(reply.payload)
        return self.welcome

    def new_pool(self, flags: int = 0, uuid: bytes = bytes(16)) -> int:
        reply = self.call(Op.NEW_POOL, payload=wire.pool_spec_payload(flags, uuid))
        assert reply.status == Status.OK, reply
        return reply.pool

    def put(self, pool: int, key: int, index: int, data: bytes) -> Status:
        return Status(self.call(Op.PUT, pool=pool, oid=oid(key), index=index, payload=data).status)

    def get(self, pool: int, key: int, index: int) -> bytes | None:
        reply = self.call(Op.GET, pool=pool, oid=oid(key), index=index)
        assert reply.status in (Status.OK, Status.NOT_FOUND), reply
        return reply.payload if reply.status == Status.OK else None

    def query_pool(self, pool: int) -> int | None:
        reply = self.call(Op.QUERY_POOL, pool=pool)
        if reply.status == Status.NO_POOL:
            return None
        assert reply.status == Status.OK, reply
        return wire.parse_pool_flags(reply.payload)


@contextlib.contextmanager
def connected(agent: HostAgentProcess, guest: str = "g1") -> Iterator[WireGuest]:
    g = agent.connect(guest)
    try:
        yield g
    finally:
        g.close()
