"""The guest channel client against a real `hostagent run` process over real unix sockets.

Each test drives trio with `trio.run` (no pytest plugin needed) under a hard deadline.  Host
agent outages are real: SIGSTOP freezes the agent so that requests are provably in flight,
SIGKILL ends it without cleanup, and a restart on the same config and arena brings back the
persistent pages.  Blocking agent control runs in a thread so the channel keeps running.
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from guestagent.channel import (
    Channel,
    ChannelClosed,
    ChannelError,
    PoolHandle,
    PoolLost,
    open_channel,
    resolve_channel_path,
)
from guestagent.channel import connection as channel_mod
from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, PoolFlag, Status
from tests.support.host_agent import SHARED_UUID, HostAgentProcess
from tests.support.wire_guest import oid, page

PERSISTENT = int(PoolFlag.PERSISTENT)
DEADLINE = 30.0  # per test; a hang is a failure, not a stuck suite
RETRY = 0.05  # reconnect interval in tests (backoff grows to 8x)


def run(main: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with trio.fail_after(DEADLINE):
            await main()

    trio.run(bounded)


async def in_thread(fn: Callable[[], Any]) -> Any:
    return await trio.to_thread.run_sync(fn)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def agent_pools(agent: HostAgentProcess, guest: str = "g1") -> list[dict[str, Any]]:
    pools: list[dict[str, Any]] = await in_thread(lambda: agent.request("pools"))
    return [p for p in pools if p["owner"] == guest]


def test_resolve_channel_path() -> None:
    assert resolve_channel_path("org.tmem.0") == ("virtio", "/dev/virtio-ports/org.tmem.0")
    assert resolve_channel_path("/run/tmem/guests/g1.sock") == ("unix", "/run/tmem/guests/g1.sock")
    assert resolve_channel_path("./g1.sock") == ("unix", "./g1.sock")
    assert resolve_channel_path("/dev/vport1p1") == ("virtio", "/dev/vport1p1")
    with pytest.raises(ValueError):
        resolve_channel_path("")


# -- round trips ----------------------------------------------------------------------------------


def test_every_op_round_trips(host_agent: HostAgentProcess) -> None:
    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"], name="t-ops") as ch:
            assert ch.connected and ch.generation == 1
            assert ch.welcome == wire.Welcome(
                wire.VERSION,
                wire.PAGE_SIZE,
                host_agent.max_payload,
                host_agent.max_vector,
                wire.Feature.DEVICE_STATS,
            )
            eph = await ch.new_pool(0)
            per = await ch.new_pool(PERSISTENT)
            assert (eph.persistent, per.persistent) == (False, True)
            assert len(await agent_pools(host_agent)) == 2
            for n, pool in enumerate((eph, per)):
                base = 100 * n
                assert await pool.get(oid(1), 0) is None
                assert await pool.put(oid(1), 0, page(base + 1))
                assert await pool.put(oid(1), 1, page(base + 2))
                assert await pool.put(oid(2), 0, page(base + 3))
                assert await pool.get(oid(1), 0) == page(base + 1)
                await pool.flush_page(oid(1), 1)
                assert await pool.get(oid(1), 1) is None
                assert await pool.put(oid(1), 5, page(base + 4))
                await pool.flush_object(oid(1))
                assert await pool.get(oid(1), 5) is None
                assert await pool.get(oid(2), 0) == page(base + 3)
            # NOREPLY put: queued ahead of the get, so the host has it when the get arrives
            eph.put_nowait(oid(3), 7, page(9))
            assert await eph.get(oid(3), 7) == page(9)
            with pytest.raises(ValueError):
                per.put_nowait(oid(3), 7, page(9))
            # local mistakes are ValueErrors and never reach the host (the channel stays up)
            with pytest.raises(ValueError):
                await per.put(oid(4), 0, b"short")
            with pytest.raises(ValueError):
                await per.get(b"short oid", 0)
            with pytest.raises(ValueError):
                await per.get(oid(4), 1 << 32)
            await ch.report_stats({"pages_cached": 12, "faults": -1})
            await until(
                lambda: (
                    (host_agent.stats()["guests"]["g1"]["report"] or {}).get("values")
                    == {"pages_cached": 12, "faults": -1}
                ),
                "the STATS report",
            )
            await eph.destroy()
            await per.destroy()
            await per.destroy()  # idempotent
            assert await agent_pools(host_agent) == []
            with pytest.raises(ChannelError):
                await eph.get(oid(2), 0)
            assert ch.connected and ch.generation == 1
        with pytest.raises(ChannelClosed):
            await ch.new_pool(0)

    run(main)


def test_many_concurrent_requests_are_pipelined(
    host_agent: HostAgentProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 tasks at once: every reply reaches its own caller, and the writer batches."""
    sends = 0
    send_all = trio.SocketStream.send_all

    async def counting_send_all(self: trio.SocketStream, data: Any) -> None:
        nonlocal sends
        sends += 1
        await send_all(self, data)

    monkeypatch.setattr(trio.SocketStream, "send_all", counting_send_all)
    tasks, per_task = 200, 5

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            pool = await ch.new_pool(PERSISTENT)
            nonlocal sends
            sends = 0

            async def worker(i: int) -> None:
                for j in range(per_task):
                    assert await pool.put(oid(i), j, page(i * per_task + j))
                for j in reversed(range(per_task)):
                    assert await pool.get(oid(i), j) == page(i * per_task + j)

            async with trio.open_nursery() as nursery:
                for i in range(tasks):
                    nursery.start_soon(worker, i)
            requests = tasks * per_task * 2
            assert sends * 4 <= requests, f"{sends} send_all calls for {requests} requests"

    run(main)


def test_one_task_pipelines_a_window_of_requests(host_agent: HostAgentProcess) -> None:
    """start_put/start_get from one task: 300 requests in flight at once, applied in order (a
    get started right after a put of its key sees that page, one started after a flush does
    not), each answer the same whether read with result() or awaited, few writes."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            pool = await ch.new_pool(PERSISTENT)
            eph = await ch.new_pool(0)
            puts = [pool.start_put(oid(7), i, page(i)) for i in range(100)]
            gets = [pool.start_get(oid(7), i) for i in range(100)]
            flush = pool.start_put(oid(7), 100, page(100))
            miss = pool.start_get(oid(8), 0)
            eph_put = eph.start_put(oid(9), 0, page(9))
            eph_get = eph.start_get(oid(9), 0)
            eph_gone = eph.start_get(oid(9), 0)  # private ephemeral gets are exclusive
            assert not any(p.done for p in puts), "nothing can be answered before we yield"
            with pytest.raises(RuntimeError):
                gets[0].result()
            assert [await p for p in puts] == [True] * 100
            assert [await g for g in gets] == [page(i) for i in range(100)]
            assert all(g.done and g.result() == page(i) for i, g in enumerate(gets))
            assert await flush is True
            assert await miss is None
            assert await eph_put is True
            assert await eph_get == page(9)
            assert await eph_gone is None
            await pool.flush_page(oid(7), 0)
            assert await pool.start_get(oid(7), 0) is None
            with pytest.raises(ValueError):
                pool.start_put(oid(7), 0, b"short")

    run(main)


class _Wakeups(trio.abc.Instrument):
    """Counts how often each task was rescheduled, i.e. parked and woken by the scheduler."""

    def __init__(self) -> None:
        self.counts: collections.Counter[trio.lowlevel.Task] = collections.Counter()

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        self.counts[task] += 1


async def _window(pool: PoolHandle, pairs: int, most: int = 16) -> None:
    """Put+get pairs with up to `most` pairs in flight, each awaited oldest first."""
    window: collections.deque[tuple[int, Any, Any]] = collections.deque()
    for i in range(pairs):
        window.append((i, pool.start_put(oid(5), i % 32, page(i)), pool.start_get(oid(5), i % 32)))
        while len(window) >= most or (i == pairs - 1 and window):
            n, put, get = window.popleft()
            assert await put is True
            assert await get == page(n)


@pytest.mark.parametrize("join", [False, True], ids=["socket", "port-writes"])
def test_a_pipelining_task_reads_its_own_replies(
    host_agent: HostAgentProcess, monkeypatch: pytest.MonkeyPatch, join: bool
) -> None:
    """Awaiting the oldest of its window (or a vector op), a task alone on the loop reads
    replies in its own step instead of parking for the reader task each time (a scheduler pass
    per await costs more than the requests); it still parks every _SYNC_SLICE, and another
    task that is runnable all the time keeps running at least that often.  `port-writes`
    writes as on a virtio port (parts joined into bounded writes: a vector op's body alone)."""
    real_slice = channel_mod._SYNC_SLICE
    # The park counts are checked with a longer slice, so that parks forced by the slice
    # stay few next to the hundreds a scheduler pass per await would make, however slow
    # the machine; the runnable neighbour is checked with the real one.
    monkeypatch.setattr(channel_mod, "_SYNC_SLICE", 0.005)
    if join:
        init = channel_mod.Connection.__init__
        monkeypatch.setattr(
            channel_mod.Connection, "__init__", lambda self, fd, join, *rest: init(self, fd, True, *rest)
        )

    async def main() -> None:
        wakeups = _Wakeups()
        trio.lowlevel.add_instrument(wakeups)
        async with open_channel(host_agent.sockets["g1"]) as ch:
            assert ch._conn is not None and ch._conn.join is join
            pool = await ch.new_pool(PERSISTENT)
            me = trio.lowlevel.current_task()
            await _window(pool, 100)  # warm up
            before, t0 = wakeups.counts[me], time.monotonic()
            await _window(pool, 1000)  # 2000 requests
            parks, elapsed = wakeups.counts[me] - before, time.monotonic() - t0
            # a park per scheduler pass would be one per few replies: hundreds
            assert parks <= 10 + 2 * elapsed / channel_mod._SYNC_SLICE, (parks, elapsed)

            # vector ops too: each put_many/get_many would park at least once
            keys = [(oid(6), i) for i in range(16)]
            before, t0 = wakeups.counts[me], time.monotonic()
            for n in range(100):
                assert await pool.put_many([(o, i, page(n + i)) for o, i in keys]) == [True] * 16
                assert await pool.get_many(keys) == [page(n + i) for _, i in keys]
            parks, elapsed = wakeups.counts[me] - before, time.monotonic() - t0
            assert parks <= 10 + 2 * elapsed / channel_mod._SYNC_SLICE, (parks, elapsed)

            monkeypatch.setattr(channel_mod, "_SYNC_SLICE", real_slice)
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.sleep(0)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                await trio.sleep(0)
                t0 = time.monotonic()
                await _window(pool, 1000)
                elapsed = time.monotonic() - t0
                nursery.cancel_scope.cancel()
            # each stretch without a park is at most a slice (and a little work): the ticker,
            # when trio runs it after us in a batch, cannot be seen in the run queue
            assert ticks >= elapsed / (2 * real_slice) - 2, (ticks, elapsed)

    run(main)


def test_lone_requests_between_waits_elsewhere_read_their_replies(
    host_agent: HostAgentProcess,
) -> None:
    """A fault handler waits on its own fd between faults, then gets a page: every get reads
    its reply in the caller's step, however long the wait in between (the slice counts
    within a step, not since the channel last parked)."""

    async def main() -> None:
        wakeups = _Wakeups()
        trio.lowlevel.add_instrument(wakeups)
        async with open_channel(host_agent.sockets["g1"]) as ch:
            pool = await ch.new_pool(PERSISTENT)
            assert await pool.put(oid(1), 0, page(1))
            me = trio.lowlevel.current_task()
            for gap in (0.0, 0.003, 0.008):  # within, past the slice; past the old 5 ms one
                before = wakeups.counts[me]
                for _ in range(30):
                    assert await pool.get(oid(1), 0) == page(1)
                    await trio.sleep(gap)  # one wakeup of ours
                parks = wakeups.counts[me] - before - 30
                assert parks <= 3, (gap, parks)

    run(main)


def test_a_cancelled_caller_does_not_catch_up(host_agent: HostAgentProcess) -> None:
    """Reading its replies in its own step must not let a cancelled task run on: awaiting a
    request or a vector op in a cancelled scope raises Cancelled, as a park would."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            pool = await ch.new_pool(PERSISTENT)
            await _window(pool, 50)  # the caller's step has caught up just now
            ops: list[Callable[[], Awaitable[object]]] = [
                lambda: pool.start_get(oid(5), 0),
                lambda: pool.put_many([(oid(6), j, page(j)) for j in range(4)]),
                lambda: pool.get(oid(5), 0),
            ]
            for op in ops:
                done = 0
                with trio.CancelScope() as scope:
                    scope.cancel()
                    for _ in range(20):
                        await op()
                        done += 1
                assert scope.cancelled_caught and done == 0, done
            assert await pool.get(oid(5), 1) == page(33)  # the channel is fine (_window's last)

    run(main)


def test_pipelined_puts_past_a_full_socket_stay_in_order(host_agent: HostAgentProcess) -> None:
    """With the agent frozen, 400 started puts (1.6 MiB) overflow the socket: the caller's own
    writes stop short and leave the rest queued, in order, for the writer; once the agent runs
    again every put lands and the last one of each key wins."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            pool = await ch.new_pool(PERSISTENT)
            os.kill(host_agent.pid, signal.SIGSTOP)
            try:
                puts = [pool.start_put(oid(3), i % 100, page(i)) for i in range(400)]
                await trio.sleep(0.2)
                assert not any(p.done for p in puts)
                conn = ch._conn
                # the socket is full: the writer holds the tail, waiting for room
                assert conn is not None and conn.writing, "the socket never filled"
            finally:
                os.kill(host_agent.pid, signal.SIGCONT)
            assert [await p for p in puts] == [True] * 400
            gets = [pool.start_get(oid(3), i) for i in range(100)]
            assert [await g for g in gets] == [page(300 + i) for i in range(100)]

    run(main)


def test_pipelined_requests_across_a_host_restart(host_agent: HostAgentProcess) -> None:
    """Started while the agent is frozen or gone: a persistent pool's requests wait and are sent
    after the next handshake, an ephemeral pool's complete at once as dropped."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"], retry_interval=RETRY) as ch:
            per = await ch.new_pool(PERSISTENT)
            eph = await ch.new_pool(0)
            assert await per.start_put(oid(1), 0, page(1))
            os.kill(host_agent.pid, signal.SIGSTOP)
            in_flight = per.start_get(oid(1), 0)
            await trio.sleep(0.1)
            await in_thread(host_agent.kill)
            await until(lambda: not ch.connected, "the channel to notice")
            put_down = per.start_put(oid(1), 1, page(2))
            get_down = per.start_get(oid(1), 1)
            eph_put = eph.start_put(oid(2), 0, page(3))
            eph_get = eph.start_get(oid(2), 0)
            assert eph_put.done and eph_put.result() is False
            assert eph_get.done and eph_get.result() is None
            assert not put_down.done
            await in_thread(host_agent.start)
            assert await in_flight == page(1)
            assert await put_down is True
            assert await get_down == page(2)
            assert ch.generation == 2

    run(main)


def test_vectored_ops_split_by_max_vector(host_agent: HostAgentProcess) -> None:
    n = 2 * host_agent.max_vector + 22  # three PUT_VEC frames

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            for flags in (PERSISTENT, 0):
                pool = await ch.new_pool(flags)
                items = [(oid(i // 10), i % 10, page(i)) for i in range(n)]
                keys = [(o, i) for o, i, _ in items]
                pages = [p for _, _, p in items]
                assert await pool.put_many(items) == [True] * n
                got = await pool.get_many([*keys, (oid(999), 0)])
                assert got == [*pages, None]
                if flags:  # persistent gets are not exclusive: the pages are still there
                    await pool.flush_many(keys[: n // 2])
                    assert await pool.get_many(keys) == [None] * (n // 2) + pages[n // 2 :]
                else:  # a private ephemeral pool is a victim cache: gets took the pages
                    assert await pool.get_many(keys[:3]) == [None] * 3
                assert await pool.put_many([]) == []
                assert await pool.get_many([]) == []
                await pool.flush_many([])
                with pytest.raises(ValueError):
                    await pool.put_many([(oid(1), 0, b"short")])

    run(main)


def test_shared_pool_between_guests(host_agent: HostAgentProcess) -> None:
    async def main() -> None:
        async with (
            open_channel(host_agent.sockets["g1"]) as ch1,
            open_channel(host_agent.sockets["g2"]) as ch2,
            open_channel(host_agent.sockets["g3"]) as ch3,
        ):
            a = await ch1.new_pool(int(PoolFlag.SHARED), SHARED_UUID)
            b = await ch2.new_pool(int(PoolFlag.SHARED), SHARED_UUID)
            assert await a.put(oid(1), 0, page(1))
            assert await b.get(oid(1), 0) == page(1)
            with pytest.raises(ChannelError, match="DENIED"):
                await ch3.new_pool(int(PoolFlag.SHARED), SHARED_UUID)
            assert ch3.connected  # a refusal is an answer, not a channel failure

    run(main)


# -- outages --------------------------------------------------------------------------------------


def test_persistent_get_survives_host_agent_restart(host_agent: HostAgentProcess) -> None:
    """A get in flight when the agent dies, and one issued while it is down, both complete
    with the right bytes once it is back; the ephemeral pool keeps working, empty."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"], retry_interval=RETRY) as ch:
            per = await ch.new_pool(PERSISTENT)
            eph = await ch.new_pool(0)
            assert await per.put(oid(1), 0, page(1))
            assert await per.put(oid(1), 1, page(2))
            assert await eph.put(oid(2), 0, page(3))
            per_id = per.remote_id
            got: dict[str, bytes | None] = {}

            async def fetch(label: str, pool: PoolHandle, key: int, index: int) -> None:
                got[label] = await pool.get(oid(key), index)

            async with trio.open_nursery() as nursery:
                os.kill(host_agent.pid, signal.SIGSTOP)  # frozen: requests stay in flight
                nursery.start_soon(fetch, "persistent in flight", per, 1, 0)
                nursery.start_soon(fetch, "ephemeral in flight", eph, 2, 0)
                await trio.sleep(0.2)
                assert got == {}
                await in_thread(host_agent.kill)
                await until(lambda: not ch.connected, "the channel to notice")
                await until(lambda: "ephemeral in flight" in got, "the ephemeral get to miss")
                assert got == {"ephemeral in flight": None}
                nursery.start_soon(fetch, "persistent while down", per, 1, 1)
                # ephemeral ops do not wait for the host: misses and dropped puts
                assert await eph.get(oid(2), 0) is None
                assert await eph.put(oid(2), 0, page(4)) is False
                eph.put_nowait(oid(2), 0, page(4))
                await trio.sleep(0.3)
                assert "persistent in flight" not in got
                await in_thread(host_agent.start)
            assert got == {
                "ephemeral in flight": None,
                "persistent in flight": page(1),
                "persistent while down": page(2),
            }
            assert ch.connected and ch.generation == 2
            assert per.remote_id == per_id
            assert await eph.get(oid(2), 0) is None  # the old contents are gone
            assert await eph.put(oid(2), 0, page(5))
            assert await eph.get(oid(2), 0) == page(5)
            assert len(await agent_pools(host_agent)) == 2

    run(main)


def test_persistent_pool_lost_with_its_arena(host_agent: HostAgentProcess) -> None:
    """Restarting on an empty arena loses persistent pools: waiting requests raise PoolLost."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"], retry_interval=RETRY) as ch:
            eph = await ch.new_pool(0)
            per = await ch.new_pool(PERSISTENT)
            assert await per.put(oid(1), 0, page(1))
            outcome: list[BaseException] = []

            async def fetch() -> None:
                try:
                    await per.get(oid(1), 0)
                except PoolLost as exc:
                    outcome.append(exc)

            async with trio.open_nursery() as nursery:
                os.kill(host_agent.pid, signal.SIGSTOP)
                nursery.start_soon(fetch)
                await trio.sleep(0.1)
                await in_thread(host_agent.kill)
                for f in host_agent.arena_dir.iterdir():
                    f.unlink()
                await in_thread(host_agent.start)
            assert len(outcome) == 1
            with pytest.raises(PoolLost):
                await per.put(oid(1), 0, page(1))
            await per.destroy()  # destroying a lost pool is fine
            assert await eph.put(oid(1), 0, page(2))  # re-created under the new agent
            fresh = await ch.new_pool(PERSISTENT)
            assert await fresh.put(oid(1), 0, page(3))
            assert await fresh.get(oid(1), 0) == page(3)

    run(main)


def test_client_started_before_host_agent(host_agent_stopped: HostAgentProcess) -> None:
    async def main() -> None:
        agent = host_agent_stopped
        started = trio.Event()

        async def start_later() -> None:
            await trio.sleep(0.4)
            await in_thread(agent.start)
            started.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_later)
            async with open_channel(agent.sockets["g1"], retry_interval=RETRY) as ch:
                assert started.is_set()  # open_channel waited for the agent
                assert ch.connected and ch.generation == 1
                pool = await ch.new_pool(PERSISTENT)
                assert await pool.put(oid(1), 0, page(1))
                assert await pool.get(oid(1), 0) == page(1)

    run(main)


def test_no_reconnect_fails_fast(host_agent: HostAgentProcess) -> None:
    async def main() -> None:
        with pytest.raises(ChannelError, match="No such file"):
            async with open_channel(host_agent.sockets["g1"] + ".missing", reconnect=False):
                pass  # pragma: no cover
        async with open_channel(host_agent.sockets["g1"], reconnect=False) as ch:
            per = await ch.new_pool(PERSISTENT)
            await in_thread(host_agent.kill)
            with pytest.raises(ChannelError):
                await per.get(oid(1), 0)  # would wait forever with reconnect
            assert not ch.connected
        await in_thread(host_agent.start)  # the fixture stops it at teardown

    run(main)


def test_host_error_frame_makes_the_channel_reconnect(host_agent: HostAgentProcess) -> None:
    """A second connection on g1's socket makes the host close ours with an ERROR frame."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"], retry_interval=RETRY) as ch:
            eph = await ch.new_pool(0)
            per = await ch.new_pool(PERSISTENT)
            assert await per.put(oid(1), 0, page(1))
            # it says nothing: our channel reconnects at once and replaces it in turn
            intruder = await in_thread(lambda: host_agent.connect("g1", hello=False))
            try:
                await until(lambda: ch.generation == 2 and ch.connected, "a reconnect")
                assert (await in_thread(intruder.expect_error)).opcode == Op.ERROR
            finally:
                intruder.close()
            assert await per.get(oid(1), 0) == page(1)
            assert await eph.put(oid(2), 0, page(2))
            assert await eph.get(oid(2), 0) == page(2)

    run(main)


def test_put_nowait_degrades_to_a_flush_when_the_host_lags(host_agent: HostAgentProcess) -> None:
    """With the host not reading, the queue stops growing by pages: a put_nowait becomes a
    flush of its key (never a silent drop, which would leave the older page to be served)."""

    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            eph = await ch.new_pool(0)
            assert await eph.put(oid(1), 0, page(1))
            os.kill(host_agent.pid, signal.SIGSTOP)
            try:
                for i in range(3000):  # far more than the socket buffers hold
                    eph.put_nowait(oid(2), i, page(i))
                eph.put_nowait(oid(1), 0, page(2))  # the queue is full: this one is a flush
            finally:
                os.kill(host_agent.pid, signal.SIGCONT)
            assert await eph.get(oid(1), 0) is None  # not the old page(1)
            assert await eph.get(oid(2), 0) == page(0)  # the first ones did go out
            assert ch.generation == 1

    run(main)


def test_cancelled_request_leaves_the_channel_usable(host_agent: HostAgentProcess) -> None:
    async def main() -> None:
        async with open_channel(host_agent.sockets["g1"]) as ch:
            per = await ch.new_pool(PERSISTENT)
            assert await per.put(oid(1), 0, page(1))
            os.kill(host_agent.pid, signal.SIGSTOP)
            try:
                with trio.move_on_after(0.2) as scope:
                    await per.get(oid(1), 0)
                assert scope.cancelled_caught
            finally:
                os.kill(host_agent.pid, signal.SIGCONT)
            # the late reply to the cancelled get must not be taken for this one
            assert await per.put(oid(1), 1, page(2))
            assert await per.get(oid(1), 1) == page(2)
            assert ch.generation == 1

    run(main)


def test_closing_fails_waiting_requests(host_agent: HostAgentProcess) -> None:
    async def main() -> None:
        errors: list[BaseException] = []

        async def blocked(pool: PoolHandle) -> None:
            try:
                await pool.get(oid(1), 0)
            except ChannelClosed as exc:
                errors.append(exc)

        async with (
            trio.open_nursery() as nursery,
            open_channel(host_agent.sockets["g1"], retry_interval=RETRY) as ch,
        ):
            per = await ch.new_pool(PERSISTENT)
            await in_thread(host_agent.kill)
            await until(lambda: not ch.connected, "the channel to notice")
            nursery.start_soon(blocked, per)
            await trio.sleep(0.1)
            assert errors == []
        assert len(errors) == 1
        with pytest.raises(ChannelClosed):
            await per.get(oid(1), 0)
        await in_thread(host_agent.start)

    run(main)


# -- a scripted peer, for what the real agent has no trigger for yet -------------------------------


async def scripted_host(
    path: str,
    script: Callable[[trio.SocketStream], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept one connection on `path` and run `script` on it."""
    sock = trio.socket.socket(trio.socket.AF_UNIX)
    await sock.bind(path)
    sock.listen()
    async with trio.SocketListener(sock) as listener:
        task_status.started()
        async with await listener.accept() as stream:
            await script(stream)


async def read_frame(stream: trio.SocketStream, reader: wire.FrameReader) -> Frame:
    while True:
        if frames := reader.feed(await stream.receive_some(1 << 16)):
            assert len(frames) == 1
            return frames[0]


def test_notices_and_refused_handshake(tmp_path: Any) -> None:
    """NOTICE frames reach `channel.notices`; a host refusing HELLO is fatal, not retried."""
    path = str(tmp_path / "peer.sock")

    async def welcome_then_notify(stream: trio.SocketStream) -> None:
        hello = await read_frame(stream, wire.FrameReader(wire.Role.HOST))
        assert wire.parse_hello(hello.payload).name == "scripted"
        welcome = wire.welcome_payload(wire.Welcome(1, wire.PAGE_SIZE, 1 << 20, 64))
        await stream.send_all(
            wire.encode(wire.reply_to(hello, payload=welcome))
            + wire.encode(Frame(Op.NOTICE, payload=wire.notice_payload(wire.Notice(2), 1 << 20)))
            + wire.encode(Frame(Op.NOTICE, payload=wire.notice_payload(wire.Notice(1), 300)))
        )
        await trio.sleep_forever()

    async def refuse(stream: trio.SocketStream) -> None:
        hello = await read_frame(stream, wire.FrameReader(wire.Role.HOST))
        # like the real host agent: the refusal, then ERROR and close, in one write
        await stream.send_all(
            wire.encode(wire.reply_to(hello, Status.INVALID))
            + wire.encode(Frame(Op.ERROR, status=Status.INVALID, payload=b"no common version"))
        )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(scripted_host, path, welcome_then_notify)
            ch: Channel
            async with open_channel(path, name="scripted") as ch:
                assert await ch.notices.receive() == (wire.Notice.BALLOON_TARGET, 1 << 20)
                assert await ch.notices.receive() == (wire.Notice.SHRINK_PERSISTENT, 300)
            nursery.cancel_scope.cancel()
        os.unlink(path)
        async with trio.open_nursery() as nursery:
            await nursery.start(scripted_host, path, refuse)
            with pytest.raises(ChannelError, match="refused the handshake: INVALID"):
                async with open_channel(path, retry_interval=RETRY):
                    pass  # pragma: no cover
            nursery.cancel_scope.cancel()

    run(main)


def test_lone_replies_arriving_in_pieces(tmp_path: Any) -> None:
    """A page's reply through virtio-serial comes in 4 KiB parts; a lone caller reading its own
    reply gathers them.  The host here is a thread (it must answer while that caller holds the
    event loop) that cuts each GET reply as its script says, sometimes with a NOTICE behind it
    or the next reply's first bytes, and pauses between the parts."""
    path = str(tmp_path / "pieces.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    notice = wire.encode(Frame(Op.NOTICE, payload=wire.notice_payload(wire.Notice(1), 77)))
    welcome = wire.welcome_payload(wire.Welcome(1, wire.PAGE_SIZE, 1 << 20, 64))
    whole = wire.HEADER_SIZE + wire.PAGE_SIZE
    cuts = [[4096], [10], [47, 48, 4000], [whole], [1000, 3000]]  # where each GET reply is cut
    pages: dict[int, bytes] = {}

    def host() -> None:
        conn, _ = listener.accept()
        reader = wire.FrameReader(wire.Role.HOST)
        n = 0
        with conn:
            while data := conn.recv(1 << 16):
                for f in reader.feed(data):
                    if f.opcode == Op.HELLO:
                        conn.sendall(wire.encode(wire.reply_to(f, payload=welcome)))
                    elif f.opcode == Op.NEW_POOL:
                        conn.sendall(wire.encode(wire.reply_to(f, pool=7)))
                    elif f.opcode == Op.PUT:
                        pages[f.index] = f.payload
                        conn.sendall(wire.encode(wire.reply_to(f)))
                    elif f.opcode == Op.GET:
                        out = wire.encode(wire.reply_to(f, payload=pages[f.index]))
                        if n % 3 == 1:
                            out += notice  # a notice right behind the reply
                        at = [0, *cuts[n % len(cuts)], len(out)]
                        for a, b in itertools.pairwise(at):
                            conn.sendall(out[a:b])
                            time.sleep(0.001)
                        n += 1
                    else:
                        conn.sendall(wire.encode(wire.reply_to(f)))

    thread = threading.Thread(target=host, daemon=True)
    thread.start()

    async def main() -> None:
        async with open_channel(path, name="pieces", reconnect=False) as ch:
            pool = await ch.new_pool(PERSISTENT)
            for i in range(4):
                assert await pool.put(oid(1), i, page(i))
            for n in range(20):
                assert await pool.get(oid(1), n % 4) == page(n % 4), n
            got = 0
            while True:  # every third reply brought a notice along
                try:
                    assert ch.notices.receive_nowait() == (wire.Notice(1), 77)
                except trio.WouldBlock:
                    break
                got += 1
            assert got == 7

    try:
        run(main)
    finally:
        listener.close()
        thread.join(5)


def test_character_device_transport() -> None:
    """A virtio-serial port is a character device: the same client over a raw pty, with the
    test playing the host on the master side (the port is under /dev/, so it is "virtio")."""
    master, slave = os.openpty()
    tty.setraw(slave)  # no line discipline games with binary frames
    path = os.ttyname(slave)
    assert resolve_channel_path(path) == ("virtio", path)
    os.set_blocking(master, False)
    welcome = wire.welcome_payload(wire.Welcome(1, wire.PAGE_SIZE, 1 << 20, 64))

    async def host() -> None:
        reader = wire.FrameReader(wire.Role.HOST)
        store: dict[tuple[bytes, int], bytes] = {}
        while True:
            try:
                data = os.read(master, 1 << 16)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(master)
                continue
            out = b""
            for f in reader.feed(data):
                if f.opcode == Op.HELLO:
                    out += wire.encode(wire.reply_to(f, payload=welcome))
                elif f.opcode == Op.NEW_POOL:
                    out += wire.encode(wire.reply_to(f, pool=7))
                elif f.opcode == Op.PUT:
                    store[f.oid, f.index] = f.payload
                    out += wire.encode(wire.reply_to(f))
                elif f.opcode == Op.GET and (f.oid, f.index) in store:
                    out += wire.encode(wire.reply_to(f, payload=store[f.oid, f.index]))
                else:
                    out += wire.encode(wire.reply_to(f, Status.NOT_FOUND))
            view = memoryview(out)
            while view:
                try:
                    view = view[os.write(master, view) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(master)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(host)
            async with open_channel(path, name="pty", reconnect=False) as ch:
                pool = await ch.new_pool(PERSISTENT)
                assert pool.remote_id == 7
                pages = [page(i) for i in range(8)]
                async with trio.open_nursery() as puts:
                    for i, p in enumerate(pages):
                        puts.start_soon(pool.put, oid(1), i, p)
                assert [await pool.get(oid(1), i) for i in range(9)] == [*pages, None]
            nursery.cancel_scope.cancel()

    try:
        run(main)
    finally:
        os.close(master)
        os.close(slave)


# -- the CLI --------------------------------------------------------------------------------------


def guestagent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guestagent", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_check_cli(host_agent: HostAgentProcess) -> None:
    res = guestagent_cli("check", host_agent.sockets["g2"], "--name", "cli")
    assert res.returncode == 0, res.stdout + res.stderr
    result = json.loads(res.stdout)
    assert result["ok"] is True
    assert result["transport"] == "unix"
    assert result["welcome"]["page_size"] == wire.PAGE_SIZE
    for kind in ("ephemeral", "persistent"):
        assert result[kind] | {"pool": 0, "get_rtt_us": 0} == {
            "ok": True,
            "put": True,
            "get": True,
            "flush": True,
            "pool": 0,
            "get_rtt_us": 0,
        }
    assert [p for p in host_agent.request("pools") if p["owner"] == "g2"] == []  # cleaned up

    res = guestagent_cli("check", host_agent.sockets["g2"] + ".missing", "--timeout", "5")
    assert res.returncode == 1
    result = json.loads(res.stdout)
    assert result["ok"] is False and "No such file" in result["error"]

    res = guestagent_cli("--help")
    assert res.returncode == 0 and "check" in res.stdout
    res = guestagent_cli()
    assert res.returncode == 2
