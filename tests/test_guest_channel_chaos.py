"""The guest channel under a hostile transport: several tasks pipelining through a proxy that
cuts the host's bytes into odd pieces, stalls now and then, and drops the connection every
few megabytes.  Every answer must be right and nothing may hang.

Why: the channel's fast paths (a caller writing its own queue, reading its own replies,
gathering a frame across reads) each touch the connection's state outside the writer and
reader tasks; a lost byte, a reply handed to the wrong request or a stuck request shows up
here as a wrong page or a timeout.
"""

from __future__ import annotations

import collections
import contextlib
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from guestagent.channel import PendingGet, PendingPut, PoolHandle, open_channel
from guestagent.protocol.wire import PoolFlag
from tests.support.host_agent import HostAgentProcess
from tests.support.wire_guest import oid, page

SECONDS = 3.0

PERSISTENT = int(PoolFlag.PERSISTENT)
PIECES = (1, 7, 50, 4096, 4150, 9000, 1 << 16)  # around a header, a page, a frame


class ChoppingProxy:
    """Unix socket proxy: guest to host as is; host to guest in random pieces with random
    stalls, cut after a random number of bytes (the channel must reconnect)."""

    def __init__(self, upstream: str, seed: int) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tmem-chaos-"))
        self.path = str(self.dir / "proxy.sock")
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.cuts = 0
        self.stopping = False
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.stopping = True
        self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _accept(self) -> None:
        while True:
            try:
                guest, _ = self.listener.accept()
            except OSError:
                return
            host = socket.socket(socket.AF_UNIX)
            host.connect(self.upstream)
            done = threading.Event()

            def kill(
                guest: socket.socket = guest, host: socket.socket = host, done: threading.Event = done
            ) -> None:
                if not done.is_set():
                    done.set()
                    for s in (guest, host):
                        with contextlib.suppress(OSError):
                            s.shutdown(socket.SHUT_RDWR)

            threading.Thread(target=self._up, args=(guest, host, kill), daemon=True).start()
            threading.Thread(
                target=self._down,
                daemon=True,
                args=(
                    guest,
                    host,
                    kill,
                    random.Random(self.rng.random()),
                    self.rng.randrange(100_000, 3_000_000),
                ),
            ).start()

    @staticmethod
    def _up(guest: socket.socket, host: socket.socket, kill: Callable[[], None]) -> None:
        try:
            while data := guest.recv(1 << 16):
                host.sendall(data)
        except OSError:
            pass
        kill()

    def _down(
        self,
        guest: socket.socket,
        host: socket.socket,
        kill: Callable[[], None],
        rng: random.Random,
        budget: int,
    ) -> None:
        try:
            while data := host.recv(1 << 16):
                at = 0
                while at < len(data):
                    n = rng.choice(PIECES)
                    guest.sendall(data[at : at + n])
                    at += n
                    budget -= n
                    if budget <= 0 and not self.stopping:
                        self.cuts += 1
                        kill()
                        return
                    if rng.random() < 0.05:
                        time.sleep(rng.choice((0.0001, 0.001, 0.003)))
        except OSError:
            pass
        kill()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pipelining_tasks_through_a_chopping_cutting_proxy(host_agent: HostAgentProcess, seed: int) -> None:
    proxy = ChoppingProxy(host_agent.sockets["g1"], seed)
    rounds: collections.Counter[str] = collections.Counter()

    async def window(pool: PoolHandle, name: str, o: int, most: int, end: float) -> None:
        inflight: collections.deque[tuple[int, PendingPut, PendingGet]] = collections.deque()
        i = 0
        while time.monotonic() < end or inflight:
            if time.monotonic() < end:
                inflight.append((i, pool.start_put(oid(o), i % 64, page(i)), pool.start_get(oid(o), i % 64)))
                i += 1
            while len(inflight) >= most or (inflight and time.monotonic() >= end):
                n, put, get = inflight.popleft()
                assert await put is True
                assert await get == page(n), (name, n)
                rounds[name] += 1

    async def vectors(pool: PoolHandle, end: float) -> None:
        keys = [(oid(12), i) for i in range(40)]
        n = 0
        while time.monotonic() < end:
            assert await pool.put_many([(o, i, page(n + i)) for o, i in keys]) == [True] * 40
            assert await pool.get_many(keys) == [page(n + i) for _, i in keys]
            n += 1
            rounds["vectors"] += 1

    async def lone(pool: PoolHandle, end: float) -> None:
        n = 0
        while time.monotonic() < end:
            assert await pool.put(oid(13), n % 8, page(n))
            assert await pool.get(oid(13), n % 8) == page(n)
            n += 1
            rounds["lone"] += 1
            if n % 5 == 0:
                await trio.sleep(0.001)  # waits elsewhere, like a fault handler

    async def main() -> None:
        with trio.fail_after(60):
            async with open_channel(proxy.path, retry_interval=0.01) as ch:
                pool = await ch.new_pool(PERSISTENT)
                end = time.monotonic() + SECONDS
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(window, pool, "window16", 10, 16, end)
                    nursery.start_soon(window, pool, "window3", 11, 3, end)
                    nursery.start_soon(vectors, pool, end)
                    nursery.start_soon(lone, pool, end)
                proxy.stopping = True
                assert ch.generation > 1, "the proxy never cut the connection"

    try:
        trio.run(main)
    finally:
        proxy.close()
    assert proxy.cuts >= 1
    assert set(rounds) == {"window16", "window3", "vectors", "lone"}, rounds
