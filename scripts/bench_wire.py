"""Wire benchmark: the guest `Channel` against a raw echo baseline, measured in one run.

Prints ONE JSON object.  Every figure is taken on this machine in this run, over unix
sockets, with the messages a page operation moves (48-byte header + 4096-byte page):

baseline (what the transport alone costs; the echo server is a separate process using the
host agent's I/O machinery, an asyncio Protocol that writes back whatever it receives; the
client uses the Channel's machinery: a unix socket fd connected by trio, os.write and
os.readv into a 64 KiB buffer, trio.lowlevel.wait_writable/wait_readable when the fd is
full/dry, one task):
- `echo_rtt_us`: median time to send one 4144-byte message and read all 4144 bytes back,
  one message in flight, over `rtt_samples` samples.
- `echo_throughput_mbs`: with `window` messages in flight (a single trio task sends W, then
  tops the window up as complete echoes arrive) for about `seconds` seconds:
  completed messages * 4096 / elapsed / 1e6.  Counting 4096 page bytes per message is the
  same unit as ours, although an echo moves a full message in *both* directions.

ours (a real `hostagent run` subprocess: temp config, arena in a tmp dir on /dev/shm; client
= `open_channel` + `PoolHandle`, on guest "bench", whose `compress = false`: the compressor is the
engine's business and `scripts/bench pool` measures it, this measures the channel):
- `get_rtt_us`: median `PoolHandle.get` of one stored page on a persistent pool created WITHOUT
  EXCLUSIVE_GETS (so every get hits), one request in flight, `rtt_samples` samples.
- `throughput_mbs`: one task keeping `window` requests in flight, as the echo client does:
  `start_put(k)` then `start_get(k)` (the get must return the put's page), awaiting the oldest
  pair once `window` requests are out, over 64 keys, for about `seconds` seconds:
  (puts + gets) * 4096 / elapsed / 1e6 (page bytes moved).
- `throughput_tasks_mbs` (information): `window` tasks, each looping `await put(k)` then
  `await get(k)`, i.e. also `window` requests in flight, each parked on its own reply.
- `throughput_vector16_mbs` (information): the same page bytes moved with PUT_VEC/GET_VEC of 16
  pages per request, `window`/16 requests in flight (see `vector_throughput`).
- `throughput_lz4_mbs` (information, no target): the same on guest "bench_lz4", which has
  the default `compress = true`.
- `client_cpu_us_per_op` / `host_cpu_us_per_op`: CPU time (user + system) of this process /
  of the host agent during the `throughput_mbs` run, per put or get.  When their sum is
  close to the wall time per op, the two processes took turns on the CPU (a ping-pong of
  batches, or one free core on a busy machine): then that sum, not the wire, is the limit.

Pages are half random bytes, half zeros.  The measurements are interleaved over `rounds`
rounds; each figure is the median of its rounds, and each ratio the median of the per-round
ratios (each pair measured back to back), so a burst of noise on a busy machine hits both
sides alike.  `loadavg_before` tells how busy the machine was.

ratios: `get_rtt_ratio` = get_rtt_us / echo_rtt_us (target <= 3) and `throughput_ratio` =
throughput_mbs / echo_throughput_mbs (target >= 0.25); `targets_met` holds one boolean each.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import trio

from guestagent.channel import PendingGet, PendingPut, PoolHandle, open_channel
from guestagent.protocol import wire
from guestagent.protocol.jsonline import is_listening
from scripts.processes import bench_config, hostagent, stop, wait_started

ROOT = Path(__file__).resolve().parent.parent

MESSAGE = wire.HEADER_SIZE + wire.PAGE_SIZE
RECV_SIZE = 1 << 16  # the Channel reads this much per readv: same machinery, same size
RTT_TARGET = 3.0
THROUGHPUT_TARGET = 0.25
KEYS_PER_TASK = 64


def _page(seed: int) -> bytes:
    return os.urandom(wire.PAGE_SIZE // 2) + bytes(wire.PAGE_SIZE // 2 - 4) + seed.to_bytes(4)


# ------------------------------------------------------------------------- echo server process


class Echo(asyncio.Protocol):
    """The baseline peer: echoes every byte, on the host agent's I/O path (an asyncio Protocol)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def echo_server(path: str) -> None:
    """The baseline peer as a server on `path`."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_unix_server(Echo, path)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ------------------------------------------------------------------------- measurements


async def _connect(path: str) -> int:
    """A connected non-blocking unix socket fd, opened the way the Channel opens its own."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(path)
    return sock.detach()


async def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


async def _read_some(fd: int, buf: bytearray) -> int:
    while True:
        try:
            return os.readv(fd, (buf,))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def echo_rtt(path: str, samples: int) -> float:
    fd = await _connect(path)
    message = _page(0) + bytes(wire.HEADER_SIZE)
    buf = bytearray(RECV_SIZE)
    times = []
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            await _write_all(fd, message)
            got = 0
            while got < MESSAGE:
                got += await _read_some(fd, buf)
            times.append(time.perf_counter() - t0)
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    return statistics.median(times) * 1e6


async def echo_throughput(path: str, window: int, seconds: float) -> float:
    fd = await _connect(path)
    message = _page(0) + bytes(wire.HEADER_SIZE)
    buf = bytearray(RECV_SIZE)
    try:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        await _write_all(fd, message * window)
        sent, received = window, 0
        while True:
            received += await _read_some(fd, buf)
            done = received // MESSAGE
            if time.perf_counter() >= deadline:
                break
            more = window - (sent - done)
            if more > 0:
                await _write_all(fd, message * more)
                sent += more
        elapsed = time.perf_counter() - t0
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)
    return done * wire.PAGE_SIZE / elapsed / 1e6


async def get_rtt(pool: PoolHandle, samples: int) -> float:
    oid = b"rtt".ljust(24, b"\0")
    page = _page(1)
    if not await pool.put(oid, 0, page):
        raise RuntimeError("the host refused the RTT page")
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        got = await pool.get(oid, 0)
        times.append(time.perf_counter() - t0)
        if got != page:
            raise RuntimeError("get returned the wrong page")
    return statistics.median(times) * 1e6


async def channel_throughput(pool: PoolHandle, window: int, seconds: float) -> tuple[float, int]:
    """(MB/s of page bytes moved, operations done)."""
    pages = [_page(i) for i in range(KEYS_PER_TASK)]
    ops = 0
    deadline = time.perf_counter() + seconds

    async def worker(task: int) -> None:
        nonlocal ops
        oid = task.to_bytes(4) + bytes(20)
        i = 0
        while time.perf_counter() < deadline:
            key = i % KEYS_PER_TASK
            stored = await pool.put(oid, key, pages[key])
            got = await pool.get(oid, key)
            if stored and got != pages[key]:
                raise RuntimeError("get returned the wrong page")
            ops += 2
            i += 1

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for task in range(window):
            nursery.start_soon(worker, task)
    elapsed = time.perf_counter() - t0
    return ops * wire.PAGE_SIZE / elapsed / 1e6, ops


async def pipelined_throughput(pool: PoolHandle, window: int, seconds: float) -> tuple[float, int]:
    """(MB/s of page bytes moved, operations done) with one task keeping `window` requests in
    flight, as the echo client does: start put(k) and get(k) back to back (the channel applies
    them in order, so the get must see the put), await the oldest pair once the window is full.
    """
    pages = [_page(i) for i in range(KEYS_PER_TASK)]
    oid = b"pipe".ljust(24, b"\0")
    pairs: collections.deque[tuple[int, PendingPut, PendingGet]] = collections.deque()
    most = max(1, window // 2)
    start_put, start_get = pool.start_put, pool.start_get
    ops = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    i = 0
    starting = True
    while starting or pairs:
        if starting:
            key = i % KEYS_PER_TASK
            pairs.append((key, start_put(oid, key, pages[key]), start_get(oid, key)))
            i += 1
            if len(pairs) < most:
                continue
            starting = i % 64 != 0 or time.perf_counter() < deadline
        key, put, get = pairs.popleft()
        stored = put.result() if put.done else await put
        got = get.result() if get.done else await get
        if got != pages[key] and stored:
            raise RuntimeError("a pipelined get returned the wrong page")
        ops += 2
    elapsed = time.perf_counter() - t0
    return ops * wire.PAGE_SIZE / elapsed / 1e6, ops


async def vector_throughput(
    pool: PoolHandle, window: int, seconds: float, batch: int = 16
) -> tuple[float, int]:
    """(MB/s of page bytes moved, pages moved) with PUT_VEC/GET_VEC of `batch` pages.

    The same page bytes as `channel_throughput`, moved by the protocol's vectored requests (what a
    guest evicting or faulting a run of pages sends): `window` / `batch` tasks, so about the same
    number of page bytes are in flight.
    """
    pages = [_page(i) for i in range(batch)]
    moved = 0
    deadline = time.perf_counter() + seconds

    async def worker(task: int) -> None:
        nonlocal moved
        oid = (1000 + task).to_bytes(4) + bytes(20)
        keys = [(oid, k) for k in range(batch)]
        while time.perf_counter() < deadline:
            stored = await pool.put_many([(o, k, pages[k]) for o, k in keys])
            got = await pool.get_many(keys)
            if any(ok and g != pages[k] for (_, k), ok, g in zip(keys, stored, got, strict=True)):
                raise RuntimeError("get_many returned a wrong page")
            moved += 2 * batch

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for task in range(max(1, window // batch)):
            nursery.start_soon(worker, task)
    elapsed = time.perf_counter() - t0
    return moved * wire.PAGE_SIZE / elapsed / 1e6, moved


# ------------------------------------------------------------------------- processes


def _start(argv: list[str], ready: Callable[[], bool], what: str, **kw: Any) -> subprocess.Popen[bytes]:
    proc: subprocess.Popen[bytes] = subprocess.Popen(argv, **kw)
    wait_started(proc, ready, what)
    return proc


def _config(tmp: Path, shm: Path) -> Path:
    guests = '[[guest]]\nname = "bench"\ncompress = false\n[[guest]]\nname = "bench_lz4"\ncompress = true\n'
    return bench_config(tmp, shm / "arena", 256, guests)


async def measure(args: argparse.Namespace, echo_path: str, guests: dict[str, str]) -> dict[str, object]:
    host = psutil.Process(args.host_pid)
    rounds: dict[str, list[float]] = {
        k: []
        for k in (
            "echo_rtt",
            "get_rtt",
            "echo_tp",
            "tp",
            "tp_lz4",
            "tp_vec",
            "tp_tasks",
            "client_cpu",
            "host_cpu",
        )
    }
    async with (
        open_channel(guests["bench"], name="bench", reconnect=False) as channel,
        open_channel(guests["bench_lz4"], name="bench_lz4", reconnect=False) as channel_lz4,
    ):
        pool = await channel.new_pool(wire.PoolFlag.PERSISTENT)
        pool_lz4 = await channel_lz4.new_pool(wire.PoolFlag.PERSISTENT)
        for _ in range(args.rounds):
            rounds["echo_rtt"].append(await echo_rtt(echo_path, args.rtt_samples))
            rounds["get_rtt"].append(await get_rtt(pool, args.rtt_samples))
            rounds["echo_tp"].append(await echo_throughput(echo_path, args.window, args.seconds))
            client0, host0 = time.process_time(), sum(host.cpu_times()[:2])
            mbs, ops = await pipelined_throughput(pool, args.window, args.seconds)
            rounds["tp"].append(mbs)
            rounds["client_cpu"].append((time.process_time() - client0) / ops * 1e6)
            rounds["host_cpu"].append((sum(host.cpu_times()[:2]) - host0) / ops * 1e6)
            rounds["tp_tasks"].append((await channel_throughput(pool, args.window, args.seconds))[0])
            rounds["tp_lz4"].append((await pipelined_throughput(pool_lz4, args.window, args.seconds))[0])
            rounds["tp_vec"].append((await vector_throughput(pool, args.window, args.seconds))[0])
        await pool.destroy()
        await pool_lz4.destroy()
    med = {k: statistics.median(v) for k, v in rounds.items()}

    # ratios per round (each pair measured back to back), then the median
    def ratio(ours: str, echo: str) -> float:
        return statistics.median(o / e for o, e in zip(rounds[ours], rounds[echo], strict=True))

    rtt_ratio = ratio("get_rtt", "echo_rtt")
    tp_ratio = ratio("tp", "echo_tp")
    tp_lz4_ratio = ratio("tp_lz4", "echo_tp")
    tp_vec_ratio = ratio("tp_vec", "echo_tp")
    tp_tasks_ratio = ratio("tp_tasks", "echo_tp")
    return {
        "echo_rtt_us": round(med["echo_rtt"], 1),
        "get_rtt_us": round(med["get_rtt"], 1),
        "echo_throughput_mbs": round(med["echo_tp"], 1),
        "throughput_mbs": round(med["tp"], 1),
        "get_rtt_ratio": round(rtt_ratio, 2),
        "throughput_ratio": round(tp_ratio, 3),
        "targets": {"get_rtt_ratio_max": RTT_TARGET, "throughput_ratio_min": THROUGHPUT_TARGET},
        "targets_met": {
            "get_rtt": rtt_ratio <= RTT_TARGET,
            "throughput": tp_ratio >= THROUGHPUT_TARGET,
        },
        "throughput_lz4_mbs": round(med["tp_lz4"], 1),
        "throughput_lz4_ratio": round(tp_lz4_ratio, 3),
        "throughput_tasks_mbs": round(med["tp_tasks"], 1),
        "throughput_tasks_ratio": round(tp_tasks_ratio, 3),
        "throughput_vector16_mbs": round(med["tp_vec"], 1),
        "throughput_vector16_ratio": round(tp_vec_ratio, 3),
        "client_cpu_us_per_op": round(med["client_cpu"], 2),
        "host_cpu_us_per_op": round(med["host_cpu"], 2),
        "rounds": {k: [round(x, 1) for x in v] for k, v in rounds.items()},
        "params": {
            "window": args.window,
            "rtt_samples": args.rtt_samples,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "message_bytes": MESSAGE,
            "page": "2048 random + 2048 zero bytes",
            "cpus": os.cpu_count(),
            "loadavg_before": [round(x, 2) for x in args.loadavg],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--window", type=int, default=32, help="requests in flight (W)")
    parser.add_argument("--rtt-samples", type=int, default=2000, help="round trips per round (N)")
    parser.add_argument("--seconds", type=float, default=1.5, help="length of a throughput run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median kept)")
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return 0
    with (
        tempfile.TemporaryDirectory(prefix="bench-wire-") as tmpdir,
        tempfile.TemporaryDirectory(prefix="bench-wire-", dir="/dev/shm") as shmdir,
    ):
        tmp, shm = Path(tmpdir), Path(shmdir)
        echo_path = str(tmp / "echo.sock")
        guests = {name: str(tmp / "guests" / f"{name}.sock") for name in ("bench", "bench_lz4")}
        log = open(tmp / "hostagent.log", "wb")  # noqa: SIM115 - closed below
        procs = []
        try:
            procs.append(
                _start(
                    [sys.executable, "-m", "scripts.bench_wire", "--echo-server", echo_path],
                    lambda: is_listening(echo_path),
                    "echo server",
                    stdout=subprocess.DEVNULL,
                    cwd=ROOT,
                )
            )
            procs.append(
                _start(
                    hostagent("run", "--config", str(_config(tmp, shm)), "--log-level", "WARNING"),
                    lambda: all(is_listening(path) for path in guests.values()),
                    "hostagent run",
                    stderr=log,
                )
            )
            args.host_pid = procs[-1].pid
            args.loadavg = os.getloadavg()
            result = trio.run(measure, args, echo_path, guests)
        except BaseException:
            log.flush()
            sys.stderr.write((tmp / "hostagent.log").read_text())
            raise
        finally:
            for proc in procs:
                stop(proc, 5)
            log.close()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
