"""An exclusive persistent get is freed when its reply is in the kernel, and only then.

The host agent keeps such a page's slot live ("held") until the reply is handed to the kernel, so a
host agent killed in between does not lose the guest's only copy. These tests pin both sides of that
line with a real agent: a delivered page must be gone (not charged, not rebuilt by a restart, not put
back when the channel closes), an undelivered one must stay. And a guest that stops reading must not
be able to pile up closed connections in the agent by connecting again and again.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from functools import partial

import psutil

from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, PoolFlag, Status
from scripts.wait import wait_until
from tests.support.host_agent import HostAgentProcess
from tests.support.wire_guest import oid, page

PERS_X = int(PoolFlag.PERSISTENT | PoolFlag.EXCLUSIVE_GETS)


def persistent_pages(agent: HostAgentProcess, guest: str = "g1") -> int:
    pages: int = agent.stats()["guests"][guest]["persistent"]["pages"]
    return pages


def closed_since(agent: HostAgentProcess, closes: int) -> bool:
    """The agent has logged more than `closes` disconnects of g1."""
    return agent.log().count("g1: disconnected") > closes


def test_a_vector_get_larger_than_the_socket_buffer_is_released_once_it_drains(
    host_agent_stopped: HostAgentProcess,
) -> None:
    """64 raw pages in one GET_VEC: the reply (256 KiB) outgrows the kernel's socket buffer, so
    it is still partly queued when the request is done. Once the guest has read it all, the pages
    must be freed, and a SIGKILLed agent must not rebuild them."""
    agent = host_agent_stopped
    agent.start()
    g = agent.connect("g1")
    pool = g.new_pool(PERS_X)
    for k in range(64):
        assert g.put(pool, 0, k, page(k)) == Status.OK
    keys = [(oid(0), k) for k in range(64)]
    g.send(Frame(Op.GET_VEC, request_id=g.rid(), pool=pool, index=64, payload=wire.keys_payload(keys)))
    time.sleep(0.3)  # not reading yet: the kernel's buffer fills, the rest waits in the agent
    reply = g.recv()
    assert wire.parse_get_vec_reply(reply.payload, 64) == [page(k) for k in range(64)]
    wait_until(lambda: persistent_pages(agent) == 0, what="the delivered pages to be freed")
    g.close()
    agent.kill()
    agent.start()
    with agent.connect("g1") as again:
        assert [again.get(pool, 0, k) for k in range(64)] == [None] * 64


def test_a_get_whose_reply_never_left_keeps_the_page(host_agent_stopped: HostAgentProcess) -> None:
    """The guest sends GET and closes before the agent runs (it is stopped): writing the reply
    fails, so the page was not delivered and must still be there for the next connection."""
    agent = host_agent_stopped
    agent.start()
    with agent.connect("g1") as g:
        pool = g.new_pool(PERS_X)
        for k in range(5):
            assert g.put(pool, 0, k, page(k)) == Status.OK
    for k in range(5):
        gone = agent.log().count("g1: disconnected")
        g = agent.connect("g1")
        os.kill(agent.pid, signal.SIGSTOP)
        try:
            g.send(Frame(Op.GET, request_id=g.rid(), pool=pool, oid=oid(0), index=k))
            g.close()
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        wait_until(partial(closed_since, agent, gone), what="the close")
    with agent.connect("g1") as g:
        assert [g.get(pool, 0, k) for k in range(5)] == [page(k) for k in range(5)]
    assert persistent_pages(agent) == 0


def test_a_get_answered_before_a_protocol_error_is_not_put_back(host_agent: HostAgentProcess) -> None:
    """GET then a bad frame in one read: the agent writes the GET's reply and the ERROR, then
    closes. The guest got the page, so the page must not return to the pool."""
    g = host_agent.connect("g1")
    pool = g.new_pool(PERS_X)
    assert g.put(pool, 0, 7, page(7)) == Status.OK
    g.send(
        Frame(Op.GET, request_id=g.rid(), pool=pool, oid=oid(0), index=7),
        Frame(Op.GET, request_id=g.rid(), pool=999, oid=oid(0), index=7),
    )
    reply = g.recv()
    assert (reply.opcode, reply.status, reply.payload) == (Op.GET, Status.OK, page(7))
    assert b"does not own" in g.expect_error().payload
    g.close()
    with host_agent.connect("g1") as again:
        assert again.get(pool, 0, 7) is None
    assert persistent_pages(host_agent) == 0


def flood_unread(g: socket.socket, request: bytes, seconds: float = 1.0) -> None:
    """Send requests until the agent stops reading them (its replies pile up unread)."""
    g.setblocking(False)
    blob = request * 64
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            g.send(blob)
        except BlockingIOError:
            time.sleep(0.02)


def test_a_guest_that_stops_reading_cannot_pile_up_closed_connections(host_agent: HostAgentProcess) -> None:
    """Each new connection replaces the last, whose replies the guest never reads: the replaced
    one is dropped when the guest connects again, so the agent holds at most one of them."""
    proc = psutil.Process(host_agent.pid)
    neighbour = host_agent.connect("g2")
    p2 = neighbour.new_pool(int(PoolFlag.PERSISTENT))
    assert neighbour.put(p2, 5, 0, page(5)) == Status.OK
    first = host_agent.connect("g1")
    pool = first.new_pool(int(PoolFlag.PERSISTENT))
    for k in range(64):
        assert first.put(pool, 1, k, page(k)) == Status.OK
    request = wire.encode(
        Frame(
            Op.GET_VEC,
            request_id=9,
            pool=pool,
            index=64,
            payload=wire.keys_payload([(oid(1), k) for k in range(64)]),
        )
    )
    flood_unread(first.sock, request)
    open_guests = [first]
    fds = proc.num_fds()
    for _ in range(6):
        g = host_agent.connect("g1")  # replaces the previous connection, which lingers unread
        assert g.query_pool(pool) is not None
        flood_unread(g.sock, request)
        open_guests.append(g)
    assert host_agent.log().count("dropping a closed connection: the guest connected again") >= 5
    assert proc.num_fds() <= fds + 1  # one lingering connection at most, not one per reconnect
    assert neighbour.get(p2, 5, 0) == page(5)
    for g in open_guests:
        g.close()
    neighbour.close()


def test_a_protocol_error_waiting_behind_unread_replies_closes_the_channel_cleanly(
    host_agent: HostAgentProcess,
) -> None:
    """16 vector gets (4 MiB of replies) and a bad frame in one send: the agent stops reading at
    1 MiB queued, so the bad frame waits until the guest has read; applying it then closes the
    channel with an ERROR, and nothing goes wrong in the agent (the fixture checks its log)."""
    g = host_agent.connect("g1")
    pool = g.new_pool(int(PoolFlag.PERSISTENT))
    for k in range(64):
        assert g.put(pool, 1, k, page(k)) == Status.OK
    keys = wire.keys_payload([(oid(1), k) for k in range(64)])
    g.send(
        *[Frame(Op.GET_VEC, request_id=g.rid(), pool=pool, index=64, payload=keys) for _ in range(16)],
        Frame(Op.GET, request_id=g.rid(), pool=999, oid=oid(1), index=0),
    )
    time.sleep(0.3)
    for _ in range(16):
        assert g.recv().opcode == Op.GET_VEC
    assert b"does not own" in g.expect_error().payload
    g.close()
    with host_agent.connect("g1") as again:
        assert again.get(pool, 1, 0) == page(0)
