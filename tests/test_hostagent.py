"""The host agent end to end: a real `hostagent run` process, real unix sockets, the real CLI."""

from __future__ import annotations

import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable

import pytest

from guestagent.protocol import wire
from guestagent.protocol.wire import Flag, Frame, Op, PoolFlag, Status
from scripts.wait import wait_until
from tests.support.host_agent import SHARED_UUID, HostAgentProcess, stats_json
from tests.support.wire_guest import WireGuest, connected, oid, page

PERSISTENT = int(PoolFlag.PERSISTENT)


def raw_header(
    op: int,
    *,
    flags: int = 0,
    status: int = 0,
    rid: int = 1,
    pool: int = 0,
    index: int = 0,
    length: int = 0,
    magic: int = wire.MAGIC,
) -> bytes:
    """A header encode() would refuse to build: the bad-input tests need those."""
    return wire.HEADER.pack(magic, wire.VERSION, op, flags, status, 0, rid, pool, wire.NO_OID, index, length)


# -- handshake ------------------------------------------------------------------------------------


def test_handshake_reports_limits_and_marks_guest_connected(host_agent: HostAgentProcess) -> None:
    with connected(host_agent, "g1") as g:
        w = g.welcome
        assert w == wire.Welcome(
            version=wire.VERSION,
            page_size=wire.PAGE_SIZE,
            max_payload=host_agent.max_payload,
            max_vector=host_agent.max_vector,
        )
        guests = host_agent.stats()["guests"]
        assert guests["g1"]["connected"] is True
        assert guests["g1"]["connected_since"] is not None
        assert guests["g2"]["connected"] is False
    wait_until(lambda: not host_agent.stats()["guests"]["g1"]["connected"], what="g1 disconnected")


def test_hello_without_common_version_is_refused(host_agent: HostAgentProcess) -> None:
    with connected(host_agent, "g1") as g0:  # g1 stays connected; a refused g2 must not matter
        g0.new_pool()
    g = WireGuest(host_agent.sockets["g2"])
    rid = g.rid()
    g.send(
        Frame(
            Op.HELLO,
            request_id=rid,
            payload=wire.hello_payload(
                wire.Hello(wire.VERSION + 1, wire.VERSION + 5, wire.PAGE_SIZE, "future")
            ),
        )
    )
    reply = g.recv()
    assert (reply.opcode, reply.request_id, reply.status) == (Op.HELLO, rid, Status.INVALID)
    err = g.expect_error()
    assert b"version" in err.payload
    assert host_agent.alive


# -- basic operations -----------------------------------------------------------------------------


def test_put_get_flush_on_ephemeral_and_persistent_pools(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        eph = g.new_pool(0)
        pers = g.new_pool(PERSISTENT)
        assert eph != pers
        assert g.query_pool(eph) == 0
        assert g.query_pool(pers) == PERSISTENT

        # ephemeral private: gets are exclusive
        assert g.put(eph, 1, 0, page(1)) == Status.OK
        assert g.get(eph, 1, 0) == page(1)
        assert g.get(eph, 1, 0) is None
        # flush page / flush object
        assert g.put(eph, 1, 0, page(2, compressible=True)) == Status.OK
        assert g.put(eph, 1, 1, page(3)) == Status.OK
        assert g.call(Op.FLUSH_PAGE, pool=eph, oid=oid(1), index=0).status == Status.OK
        assert g.get(eph, 1, 0) is None
        assert g.call(Op.FLUSH_OBJECT, pool=eph, oid=oid(1)).status == Status.OK
        assert g.get(eph, 1, 1) is None

        # persistent without EXCLUSIVE_GETS: a get leaves the page; a put overwrites
        assert g.put(pers, 7, 3, page(4)) == Status.OK
        assert g.get(pers, 7, 3) == page(4)
        assert g.put(pers, 7, 3, page(5, compressible=True)) == Status.OK
        assert g.get(pers, 7, 3) == page(5, compressible=True)
        assert g.get(pers, 7, 4) is None

        assert g.call(Op.DESTROY_POOL, pool=pers).status == Status.OK
        assert g.query_pool(pers) is None

        s = host_agent.stats()["guests"]["g1"]
        assert s["ephemeral"]["puts"] == 3
        assert s["ephemeral"]["hits"] == 1
        assert s["persistent"]["puts"] == 2


def test_vector_operations(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        pool = g.new_pool(PERSISTENT)
        keys = [(oid(1), 0), (oid(1), 1), (oid(2), 5)]
        pages = [page(10), page(11, compressible=True), page(12)]
        reply = g.call(Op.PUT_VEC, pool=pool, index=3, payload=wire.put_vec_payload(keys, pages))
        assert reply.status == Status.OK
        assert list(reply.payload) == [Status.OK] * 3

        ask = [keys[0], (oid(9), 9), keys[2], keys[1]]
        reply = g.call(Op.GET_VEC, pool=pool, index=4, payload=wire.keys_payload(ask))
        assert wire.parse_get_vec_reply(reply.payload, 4) == [pages[0], None, pages[2], pages[1]]

        reply = g.call(Op.FLUSH_VEC, pool=pool, index=2, payload=wire.keys_payload(keys[:2]))
        assert reply.status == Status.OK
        reply = g.call(Op.GET_VEC, pool=pool, index=3, payload=wire.keys_payload(keys))
        assert wire.parse_get_vec_reply(reply.payload, 3) == [None, None, pages[2]]


def test_pipelined_frames_in_one_write_are_answered_in_order(host_agent: HostAgentProcess) -> None:
    n = 300
    with connected(host_agent) as g:
        pool = g.new_pool(PERSISTENT)
        frames = [
            Frame(Op.PUT, request_id=1000 + i, pool=pool, oid=oid(i), payload=page(i)) for i in range(n)
        ]
        frames += [Frame(Op.GET, request_id=2000 + i, pool=pool, oid=oid(i)) for i in range(n)]
        frames.append(Frame(Op.GET, request_id=3000, pool=pool, oid=oid(n)))  # a miss
        g.send(*frames)  # one sendall
        for i in range(n):
            r = g.recv()
            assert (r.opcode, r.request_id, r.status) == (Op.PUT, 1000 + i, Status.OK)
        for i in range(n):
            r = g.recv()
            assert (r.opcode, r.request_id, r.status) == (Op.GET, 2000 + i, Status.OK)
            assert r.payload == page(i)
        r = g.recv()
        assert (r.request_id, r.status) == (3000, Status.NOT_FOUND)


def test_noreply_puts_get_no_reply_but_are_applied(host_agent: HostAgentProcess) -> None:
    n = 100
    with connected(host_agent) as g:
        pool = g.new_pool(0)
        g.send(
            *[
                Frame(Op.PUT, flags=Flag.NOREPLY, request_id=10 + i, pool=pool, oid=oid(i), payload=page(i))
                for i in range(n)
            ]
        )
        # The next frame received must answer the GET: nothing was sent back for the puts.
        rid = g.rid()
        g.send(Frame(Op.GET, request_id=rid, pool=pool, oid=oid(n - 1)))
        r = g.recv()
        assert (r.opcode, r.request_id, r.status) == (Op.GET, rid, Status.OK)
        assert r.payload == page(n - 1)
        assert host_agent.stats()["guests"]["g1"]["ephemeral"]["puts"] == n


def test_query_unknown_pool_is_no_pool_not_an_error(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        assert g.query_pool(12345) is None
        assert g.new_pool() >= 1  # the channel is still open


def test_shared_pool_needs_authorisation(host_agent: HostAgentProcess) -> None:
    with (
        connected(host_agent, "g1") as g1,
        connected(host_agent, "g2") as g2,
        connected(host_agent, "g3") as g3,
    ):
        spec = wire.pool_spec_payload(PoolFlag.SHARED | PoolFlag.PERSISTENT, SHARED_UUID)
        denied = g3.call(Op.NEW_POOL, payload=spec)
        assert denied.status == Status.DENIED
        p1 = g1.new_pool(PoolFlag.SHARED | PoolFlag.PERSISTENT, SHARED_UUID)
        assert g1.put(p1, 1, 0, page(1)) == Status.OK
        p2 = g2.new_pool(PoolFlag.SHARED | PoolFlag.PERSISTENT, SHARED_UUID)
        assert g2.get(p2, 1, 0) == page(1)
        assert g3.query_pool(p1) is None


def test_guest_stats_report_is_kept_with_its_age(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        values = {"committed_as_kib": 1048576, "memavailable_kib": 524288, "pswpin": 7}
        g.send(Frame(Op.STATS, payload=wire.stats_payload(values)))
        assert g.query_pool(1) is None  # a round trip: the STATS frame has been applied
        report = stats_json(host_agent)["guests"]["g1"]["report"]
        assert report["values"] == values
        assert 0 <= report["age"] < 10
        time.sleep(0.2)
        g.send(Frame(Op.STATS, payload=wire.stats_payload({**values, "pswpin": 107})))
        assert g.query_pool(1) is None
        rates = stats_json(host_agent)["guests"]["g1"]["rates"]
        assert 0 < rates["pswpin"] <= 100 / 0.2  # 100 pages in >= 0.2 s
        row = next(
            line
            for line in host_agent.cli("stats").stdout.splitlines()
            if line.startswith("g1 ") and "ago" in line
        )
        assert row.split()[3:5] == ["1024", "512"]  # committed and available, MiB


# -- bad input: only that guest's channel is closed -----------------------------------------------


def _send_garbage(g: WireGuest) -> None:
    g.send_raw(b"GET / HTTP/1.1\r\nHost: tmem\r\n\r\n" + bytes(range(64)))


def _send_oversize(g: WireGuest) -> None:
    # Only the header: the agent must refuse on the length alone, not wait for 1 GiB.
    g.send_raw(raw_header(Op.PUT, pool=1, length=1 << 30))


def _send_unknown_opcode(g: WireGuest) -> None:
    g.send_raw(raw_header(99))


def _send_unowned_pool(g: WireGuest) -> None:
    g.send(Frame(Op.GET, request_id=5, pool=4242, oid=oid(1)))


def _send_reply_flag(g: WireGuest) -> None:
    g.send(Frame(Op.GET, flags=Flag.REPLY, request_id=5, pool=1, oid=oid(1)))


def _send_truncated_then_eof(g: WireGuest) -> None:
    frame = wire.encode(Frame(Op.PUT, request_id=5, pool=1, oid=oid(1), payload=page(1)))
    g.send_raw(frame[:100])
    g.sock.shutdown(socket.SHUT_WR)


BAD_INPUTS: dict[str, tuple[bool, Callable[[WireGuest], None], bytes]] = {
    # name: (say HELLO first, send the bad input, a word the ERROR reason must contain)
    "garbage": (True, _send_garbage, b"magic"),
    "oversize-length": (True, _send_oversize, b"exceeds"),
    "unknown-opcode": (True, _send_unknown_opcode, b"opcode"),
    "unowned-pool": (True, _send_unowned_pool, b"4242"),
    "reply-flag-on-request": (True, _send_reply_flag, b"REPLY"),
    "request-before-hello": (False, _send_unowned_pool, b"HELLO"),
    "truncated-frame-then-eof": (True, _send_truncated_then_eof, b"truncated"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_closes_only_that_channel(host_agent: HostAgentProcess, case: str) -> None:
    hello, send_bad, reason = BAD_INPUTS[case]
    with connected(host_agent, "g2") as good:
        pool = good.new_pool(0)
        assert good.put(pool, 1, 0, page(1)) == Status.OK

        bad = host_agent.connect("g1", hello=hello)
        mine = bad.new_pool(0) if hello else 0
        send_bad(bad)
        err = bad.expect_error()
        assert err.status == Status.PROTOCOL
        assert reason in err.payload, err.payload
        bad.close()

        assert host_agent.alive
        assert good.get(pool, 1, 0) == page(1)  # the other guest is untouched
        wait_until(lambda: not host_agent.stats()["guests"]["g1"]["connected"], what="g1 gone")
        assert "guest g1: closing channel" in host_agent.log()

    with connected(host_agent, "g1") as again:  # the bad guest may come back
        if hello:
            assert again.query_pool(mine) is None  # its ephemeral pool went with the channel
        p = again.new_pool(0)
        assert again.put(p, 1, 0, page(2)) == Status.OK


def test_a_new_hello_restarts_the_session(host_agent: HostAgentProcess) -> None:
    """On a virtio-serial port the host cannot see the guest agent restart: a new HELLO says so."""
    with connected(host_agent, "g1") as g:
        eph = g.new_pool(0)
        pers = g.new_pool(PERSISTENT)
        assert g.put(eph, 1, 0, page(1)) == Status.OK
        assert g.put(pers, 1, 0, page(2)) == Status.OK
        g.send(
            Frame(
                Op.HELLO, request_id=77, payload=wire.hello_payload(wire.Hello(1, 1, wire.PAGE_SIZE, "again"))
            )
        )
        reply = g.recv()
        assert (reply.opcode, reply.request_id, reply.status) == (Op.HELLO, 77, Status.OK)
        assert g.query_pool(eph) is None  # ephemeral pools went with the old session
        assert g.get(pers, 1, 0) == page(2)  # persistent pages stay
        assert host_agent.alive
    assert "new session on the open channel" in host_agent.log()


def test_good_frames_before_a_bad_one_are_still_applied(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        pool = g.new_pool(PERSISTENT)
        g.send_raw(
            wire.encode(
                Frame(Op.PUT, flags=Flag.NOREPLY, request_id=9, pool=pool, oid=oid(1), payload=page(1))
            )
            + raw_header(99)
        )
        g.expect_error()
    with connected(host_agent) as g:
        assert g.get(pool, 1, 0) == page(1)


# -- connections come and go ----------------------------------------------------------------------


def test_second_connection_replaces_the_first(host_agent: HostAgentProcess) -> None:
    first = host_agent.connect("g1")
    eph = first.new_pool(0)
    assert first.put(eph, 1, 0, page(1)) == Status.OK
    with connected(host_agent, "g1") as second:
        err = first.expect_error()
        assert b"replaced" in err.payload
        first.close()
        assert second.query_pool(eph) is None  # the old channel's ephemeral pool is gone
        p = second.new_pool(0)
        assert second.put(p, 1, 0, page(2)) == Status.OK
        assert second.get(p, 1, 0) == page(2)
        assert host_agent.stats()["guests"]["g1"]["connected"] is True
    assert "replaces the current one" in host_agent.log()


def test_persistent_pages_survive_reconnect_ephemeral_pools_do_not(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        eph = g.new_pool(0)
        pers = g.new_pool(PERSISTENT | PoolFlag.EXCLUSIVE_GETS)
        assert g.put(eph, 1, 0, page(1)) == Status.OK
        assert g.put(pers, 2, 0, page(2)) == Status.OK
        assert g.put(pers, 2, 1, page(3)) == Status.OK
    wait_until(lambda: not host_agent.stats()["guests"]["g1"]["connected"], what="g1 gone")
    assert host_agent.stats()["guests"]["g1"]["ephemeral"]["pages"] == 0
    with connected(host_agent) as g:
        assert g.query_pool(eph) is None
        assert g.query_pool(pers) == PERSISTENT | PoolFlag.EXCLUSIVE_GETS
        assert g.get(pers, 2, 0) == page(2)
        assert g.get(pers, 2, 0) is None  # exclusive gets
        # an ephemeral pool id that is gone is not the guest's any more: using it is an error
        g.send(Frame(Op.GET, request_id=g.rid(), pool=eph, oid=oid(1)))
        g.expect_error()


def test_persistent_pages_survive_an_agent_restart(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        pers = g.new_pool(PERSISTENT)
        for i in range(20):
            assert g.put(pers, i, 0, page(i, compressible=bool(i % 2))) == Status.OK
    assert host_agent.stop() == 0
    host_agent.start()
    with connected(host_agent) as g:
        assert g.query_pool(pers) == PERSISTENT
        for i in range(20):
            assert g.get(pers, i, 0) == page(i, compressible=bool(i % 2))


def test_an_unreadable_pool_table_stops_the_start_and_loses_nothing(host_agent: HostAgentProcess) -> None:
    """Starting without the table would drop every persistent page as unowned: the agent says why
    and exits instead; with the table restored, the pages are there."""
    with connected(host_agent) as g:
        pers = g.new_pool(PERSISTENT)
        assert g.put(pers, 1, 0, page(1)) == Status.OK
    host_agent.kill()
    table = host_agent.arena_dir / "pools.json"
    saved = table.read_bytes()
    table.write_bytes(saved[: len(saved) // 2])  # torn
    with pytest.raises(AssertionError, match=r"pool table .*pools.json cannot be read"):
        host_agent.start()
    assert host_agent.proc is not None and host_agent.proc.returncode != 0
    table.write_bytes(saved)
    host_agent.start()
    with connected(host_agent) as g:
        assert g.get(pers, 1, 0) == page(1)


def test_a_guest_that_never_reads_cannot_grow_host_memory(host_agent: HostAgentProcess) -> None:
    """Flow control: with replies piling up the agent stops reading, so the guest's sends block."""
    limit = 4 << 20  # bytes of GET requests; unbounded, 4 MiB of GETs would queue ~350 MB
    with connected(host_agent) as g:
        pool = g.new_pool(PERSISTENT)
        assert g.put(pool, 1, 0, page(1)) == Status.OK
        get = wire.encode(Frame(Op.GET, request_id=7, pool=pool, oid=oid(1)))
        chunk = get * 1024
        sent = 0
        g.sock.setblocking(False)
        while sent < limit:
            try:
                sent += g.sock.send(chunk[sent % len(chunk) :])
            except BlockingIOError:
                _, writable, _ = select.select([], [g.sock], [], 0.5)
                if not writable:
                    break  # the agent stopped reading for half a second
        assert sent < limit, "the agent kept reading while its replies piled up"

        # Now read: the agent resumes, and every complete GET is answered.
        g.sock.setblocking(True)
        rest = -sent % len(get)
        done = threading.Event()

        def finish() -> None:  # completes the last partial frame while we drain
            g.sock.sendall(get[len(get) - rest :] if rest else b"")
            done.set()

        t = threading.Thread(target=finish)
        t.start()
        expected = (sent + rest) // len(get)
        for _ in range(expected):
            r = g.recv()
            assert (r.request_id, r.status) == (7, Status.OK)
        t.join()
        assert done.is_set()
        assert g.query_pool(pool) == PERSISTENT  # and the channel still works


# -- process lifecycle ----------------------------------------------------------------------------


def test_sigterm_removes_sockets_and_exits_zero(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        g.new_pool(0)
        assert host_agent.stop() == 0
        assert b"shutting down" in g.expect_error().payload
    for path in [host_agent.control, *host_agent.sockets.values()]:
        assert not os.path.exists(path), path
    assert "Traceback" not in host_agent.log()


def test_stale_socket_files_are_replaced(host_agent_stopped: HostAgentProcess) -> None:
    agent = host_agent_stopped
    for path in [agent.control, agent.sockets["g1"]]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()  # leaves the file behind, nobody listening
    agent.start()
    assert oct(os.stat(agent.sockets["g1"]).st_mode & 0o777) == oct(0o600)
    assert oct(os.stat(agent.control).st_mode & 0o777) == oct(0o600)
    with connected(agent, "g1") as g:
        assert g.new_pool() >= 1


def test_a_second_agent_on_the_same_control_socket_is_refused(host_agent: HostAgentProcess) -> None:
    res = host_agent.cli("run", "--config", str(host_agent.config_path), control_flag=False)
    assert res.returncode == 1
    assert "another host agent is running" in res.stderr
    assert "Traceback" not in res.stderr
    with connected(host_agent) as g:  # the first one is unharmed
        assert g.new_pool() >= 1


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_help_works_without_an_agent(host_agent_stopped: HostAgentProcess) -> None:
    res = host_agent_stopped.cli("--help", control_flag=False)
    assert res.returncode == 0
    for cmd in ("run", "stats", "pools", "set", "reserve"):
        assert cmd in res.stdout


def test_cli_run_with_a_bad_config_names_the_key(host_agent_stopped: HostAgentProcess) -> None:
    bad = host_agent_stopped.workdir / "bad.toml"
    bad.write_text("[pool]\nlimit_mib = 0\n")
    res = host_agent_stopped.cli("run", "--config", str(bad), control_flag=False)
    assert res.returncode == 1
    assert res.stderr.strip() == f"hostagent: {bad}: pool.limit_mib: must be at least 1, got 0"


def test_cli_without_an_agent_says_so(host_agent_stopped: HostAgentProcess) -> None:
    res = host_agent_stopped.cli("stats")
    assert res.returncode == 1
    assert res.stderr.strip() == f"hostagent: host agent not running at {host_agent_stopped.control}"


def test_cli_stats(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        pool = g.new_pool(0)
        for i in range(5):
            assert g.put(pool, i, 0, page(i)) == Status.OK
        assert g.get(pool, 0, 0) == page(0)

        s = stats_json(host_agent)
        assert set(s["guests"]) == {"g1", "g2", "g3"}
        g1 = s["guests"]["g1"]
        assert g1["connected"] is True
        assert (g1["ephemeral"]["puts"], g1["ephemeral"]["gets"], g1["ephemeral"]["hits"]) == (5, 1, 1)
        assert g1["ephemeral"]["pages"] == 4
        assert s["pool"]["pages"] == 4
        assert s["agent"]["pid"] == host_agent.pid
        assert s["agent"]["cpu_seconds"] > 0

        res = host_agent.cli("stats")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        row = next(line for line in lines if line.startswith("g1 "))
        assert row.split()[1:6] == ["yes", "5", "1", "1", "0"]  # conn, puts, gets, hits, flushes
        assert any(line.startswith("g2 ") and line.split()[1] == "no" for line in lines)
        assert any(line.startswith("pool:") and " 4 pages (4 ephemeral" in line for line in lines)

    # --config alone finds the control socket
    res = host_agent.cli("stats", "--json", "--config", str(host_agent.config_path), control_flag=False)
    assert res.returncode == 0, res.stderr
    assert "g1" in json.loads(res.stdout)["guests"]


def test_cli_stats_watch_repeats(host_agent: HostAgentProcess) -> None:
    import subprocess

    proc = subprocess.Popen(
        host_agent.cli_argv("stats", "--json", "--watch", "0.1"), stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert second["agent"]["uptime"] > first["agent"]["uptime"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_cli_set_changes_what_stats_shows(host_agent: HostAgentProcess) -> None:
    res = host_agent.cli("set", "g1", "weight=3", "compress=off")
    assert res.returncode == 0, res.stderr
    assert "weight=3" in res.stdout and "compress=off" in res.stdout
    g1 = stats_json(host_agent)["guests"]["g1"]
    assert (g1["weight"], g1["compress"]) == (3, False)
    assert stats_json(host_agent)["guests"]["g2"]["weight"] == 1

    res = host_agent.cli("set", "g2", "cap=100", "quota=64")
    assert res.returncode == 0, res.stderr
    g2 = stats_json(host_agent)["guests"]["g2"]
    assert (g2["cap_bytes"], g2["quota_bytes"]) == (100 << 20, 64 << 20)


def test_cli_set_quota_is_enforced(host_agent: HostAgentProcess) -> None:
    assert host_agent.cli("set", "g1", "quota=0").returncode == 0
    with connected(host_agent) as g:
        pool = g.new_pool(PERSISTENT)
        assert g.put(pool, 1, 0, page(1)) == Status.NO_SPACE
        assert g.get(pool, 1, 0) is None
    assert host_agent.cli("set", "g1", "quota=1").returncode == 0
    with connected(host_agent) as g:
        assert g.put(pool, 1, 0, page(1)) == Status.OK


@pytest.mark.parametrize(
    "args",
    [
        ["weight"],
        ["weight=x"],
        ["weight=0"],
        ["cap=-1"],
        ["compress=maybe"],
        ["speed=9"],
        ["weight=2", "weight=3"],
    ],
)
def test_cli_set_bad_syntax_exits_2(host_agent_stopped: HostAgentProcess, args: list[str]) -> None:
    # No agent needed: the syntax is checked before anything is sent.
    res = host_agent_stopped.cli("set", "g1", *args)
    assert res.returncode == 2
    assert res.stderr.startswith("hostagent set: ")
    assert len(res.stderr.strip().splitlines()) == 1
    assert args[0].split("=")[0] in res.stderr


def test_cli_set_unknown_guest(host_agent: HostAgentProcess) -> None:
    res = host_agent.cli("set", "nosuch", "weight=2")
    assert res.returncode == 1
    assert res.stderr.strip() == "hostagent: unknown guest 'nosuch'"


def test_cli_set_balloon_needs_the_controller_and_a_domain(host_agent: HostAgentProcess) -> None:
    res = host_agent.cli("set", "g1", "balloon=off")
    assert res.returncode == 1
    assert "balloon controller is off" in res.stderr
    res = host_agent.cli("set", "g1", "balloon=maybe")
    assert res.returncode == 2 and "balloon must be on or off" in res.stderr


def test_cli_reserve_reports(host_agent: HostAgentProcess) -> None:
    res = host_agent.cli("reserve", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("reserve 1 MiB: freed ")
    assert "host available" in res.stdout
    assert host_agent.cli("reserve", "-5").returncode == 2


def test_cli_reserve_drops_ephemeral_pages(host_agent: HostAgentProcess) -> None:
    with connected(host_agent) as g:
        eph = g.new_pool(0)
        pers = g.new_pool(PERSISTENT)
        for i in range(200):
            assert g.put(eph, i, 0, page(i)) == Status.OK
        assert g.put(pers, 1, 0, page(1)) == Status.OK
        # ask for more than the host can have: every ephemeral page goes, persistent ones stay
        res = host_agent.request("reserve", mib=1 << 30)
        assert res["freed_bytes"] > 0
        assert g.get(eph, 5, 0) is None
        assert g.get(pers, 1, 0) == page(1)
        assert host_agent.stats()["pool"]["ephemeral_pages"] == 0


def test_cli_pools_lists_a_created_pool(host_agent: HostAgentProcess) -> None:
    with connected(host_agent, "g2") as g:
        pool = g.new_pool(PERSISTENT)
        for i in range(3):
            assert g.put(pool, i, 0, page(i)) == Status.OK
        res = host_agent.cli("pools")
        assert res.returncode == 0, res.stderr
        rows = [line.split() for line in res.stdout.splitlines()]
        assert rows[0][:4] == ["GUEST", "ID", "TYPE", "PAGES"]
        assert ["g2", str(pool), "private-persistent", "3"] in [r[:4] for r in rows]
        res = host_agent.cli("pools", "--json")
        assert any(p["pages"] == 3 for p in json.loads(res.stdout))


def test_control_socket_rejects_bad_requests(host_agent: HostAgentProcess) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(host_agent.control)
    f = s.makefile("rwb")
    for line, error in [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"cmd": "explode"}', "unknown command"),
        (b'{"cmd": "set", "guest": "g1", "weight": true}', "weight"),
        (b'{"cmd": "set", "guest": "g1", "colour": 1}', "colour"),
        (b'{"cmd": "reserve"}', "mib"),
    ]:
        f.write(line + b"\n")
        f.flush()
        reply = json.loads(f.readline())
        assert reply["ok"] is False and error in reply["error"], (line, reply)
    s.close()
