"""Channel benchmark over one lab guest's real virtio-serial port; prints ONE JSON object.

In one run, on the same guest and port:

- the limit: with the host agent stopped, an echo server on the host connects to QEMU's end of the
  tmem channel and a program in the guest (started through qemu-guest-agent, the guest agent daemon
  stopped so the port is free) writes 4144-byte messages (a frame header and a page) to the port:
  `echo_rtt_us` is the median round trip with one message in flight, `echo_throughput_mbs` the page
  bytes per second echoed with `window` messages in flight;
- through the agents: the host agent is started again and a program in the guest uses the guest
  channel client on the same port: `get_rtt_us` is the median `get` of one stored page (a persistent
  pool without exclusive gets, so every get hits), `throughput_mbs` the page bytes per second moved
  by pipelined put+get pairs with `window` requests in flight.

Ratios: `get_rtt_ratio` = get_rtt_us / echo_rtt_us (target <= 2) and `throughput_ratio` =
throughput_mbs / echo_throughput_mbs (target >= 0.5). If no lab is up, a one-guest lab is started
for the run and taken down after it. Under TCG (this machine) both sides are slow; under KVM both are
about an order of magnitude faster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any

from guestagent.protocol.jsonline import is_listening
from scripts import lab
from scripts.bench_wire import Echo
from scripts.guest import Guest

GUEST = Guest("tmem-1")
MESSAGE = 48 + 4096

GUEST_ECHO = r"""
import json, os, statistics, sys, threading, time
from guestagent.ports import find_port
samples, window, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
fd = os.open(find_port(), os.O_RDWR)
msg = os.urandom(MSG_SIZE)
def read_exact(n):
    got = 0
    while got < n:
        chunk = os.read(fd, min(65536, n - got))
        if not chunk:
            time.sleep(0.01)
            continue
        got += len(chunk)
for _ in range(20):
    os.write(fd, msg); read_exact(len(msg))
rtts = []
for _ in range(samples):
    t = time.perf_counter(); os.write(fd, msg); read_exact(len(msg)); rtts.append(time.perf_counter() - t)
inflight = threading.Semaphore(window)
stop = time.perf_counter() + seconds
sent = [0]
def writer():
    while time.perf_counter() < stop:
        inflight.acquire(); os.write(fd, msg); sent[0] += 1
t0 = time.perf_counter()
w = threading.Thread(target=writer); w.start()
done = 0
while True:
    if done >= sent[0]:  # nothing in flight: the writer is done, or about to send
        if not w.is_alive() and done >= sent[0]:
            break
        time.sleep(0.0005)
        continue
    read_exact(len(msg)); done += 1; inflight.release()
elapsed = time.perf_counter() - t0
print(json.dumps({"rtt_us": statistics.median(rtts) * 1e6, "messages": done,
                  "throughput_mbs": done * 4096 / elapsed / 1e6}))
""".replace("MSG_SIZE", str(MESSAGE))

GUEST_TMEM = r"""
import json, os, statistics, sys, time
import trio
from guestagent.protocol import wire
from guestagent.channel import open_channel
from guestagent.ports import find_port
samples, window, seconds = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
async def main():
    async with open_channel(find_port(), name="bench") as ch:
        pool = await ch.new_pool(int(wire.PoolFlag.PERSISTENT))
        page = os.urandom(4096)
        oid = os.urandom(24)
        assert await pool.put(oid, 0, page)
        for _ in range(20):
            await pool.get(oid, 0)
        rtts = []
        for _ in range(samples):
            t = time.perf_counter(); got = await pool.get(oid, 0); rtts.append(time.perf_counter() - t)
            assert got == page
        moved = [0]
        stop = time.perf_counter() + seconds
        async def worker(k):
            key = os.urandom(24)
            while time.perf_counter() < stop:
                assert await pool.put(key, k, page)
                assert await pool.get(key, k) == page
                moved[0] += 2
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for k in range(window):
                n.start_soon(worker, k)
        elapsed = time.perf_counter() - t0
        await pool.destroy()
        print(json.dumps({"rtt_us": statistics.median(rtts) * 1e6, "ops": moved[0],
                          "throughput_mbs": moved[0] * 4096 / elapsed / 1e6}))
trio.run(main)
"""


GUEST_BLOCKING = r"""
import json, os, select, statistics, sys, time
from guestagent.protocol import wire
from guestagent.ports import find_port
samples = int(sys.argv[1])
fd = os.open(find_port(), os.O_RDWR)
reader = wire.FrameReader(wire.Role.GUEST)
def call(frame):
    os.write(fd, wire.encode(frame))
    while True:
        select.select([fd], [], [])
        frames = reader.feed(os.read(fd, 65536))
        if frames:
            return frames[0]
call(wire.Frame(wire.Op.HELLO, request_id=1,
                payload=wire.hello_payload(wire.Hello(1, 1, wire.PAGE_SIZE, "bench"))))
pool = call(wire.Frame(wire.Op.NEW_POOL, request_id=2,
                       payload=wire.pool_spec_payload(int(wire.PoolFlag.PERSISTENT)))).pool
page, oid = os.urandom(4096), os.urandom(24)
call(wire.Frame(wire.Op.PUT, request_id=3, pool=pool, oid=oid, payload=page))
rtts = []
for i in range(samples):
    t = time.perf_counter()
    got = call(wire.Frame(wire.Op.GET, request_id=10 + i, pool=pool, oid=oid))
    rtts.append(time.perf_counter() - t)
    assert got.payload == page
call(wire.Frame(wire.Op.DESTROY_POOL, request_id=5, pool=pool))
print(json.dumps({"rtt_us": statistics.median(rtts) * 1e6}))
"""


def run_echo_server(socket_path: str, stop: threading.Event, ready: threading.Event) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(Echo, socket_path)
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        transport.close()

    asyncio.run(main())


def guest_run(program: str, args: list[str], timeout: float) -> dict[str, Any]:
    """A program in the guest (the project importable); its last line of output, as JSON."""
    out = GUEST.python(program, *args, timeout=timeout)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    params = [str(args.samples), str(args.window), str(args.seconds)]
    conn = lab.connect() if is_listening(lab.LIBVIRT_SOCK) else None
    own_lab = conn is None or GUEST.name not in {d.name() for d in lab.lab_domains(conn)}
    if own_lab:
        print("[bench] starting a one-guest lab", file=sys.stderr)
        lab.down()
        lab.up(lab.default_lab(1))
    try:
        GUEST.stop_agent()
        # 1. the limit: raw echo over the port, the host agent out of the way
        lab.stop_hostagent()
        socket_path = str(lab.STATE / "sockets" / f"{GUEST.name}.tmem")
        stop, ready = threading.Event(), threading.Event()
        server = threading.Thread(target=run_echo_server, args=(socket_path, stop, ready))
        server.start()
        if not ready.wait(10):
            raise SystemExit("bench channel: cannot connect the echo server to " + socket_path)
        time.sleep(0.5)
        echo = guest_run(GUEST_ECHO, params, timeout=300)
        stop.set()
        server.join()
        # 2. through the agents, same port
        lab.start_hostagent(lab.default_lab(1))
        time.sleep(1.0)
        ours = guest_run(GUEST_TMEM, params, timeout=300)
        blocking = guest_run(GUEST_BLOCKING, params[:1], timeout=300)
        GUEST.start_agent()
    finally:
        if own_lab:
            lab.down()
    from scripts.domain import detect_virt_type

    result = {
        "guest": GUEST.name,
        "virt_type": detect_virt_type(),
        "echo_rtt_us": round(echo["rtt_us"], 1),
        "echo_throughput_mbs": round(echo["throughput_mbs"], 2),
        "get_rtt_us": round(ours["rtt_us"], 1),
        "throughput_mbs": round(ours["throughput_mbs"], 2),
        "get_rtt_ratio": round(ours["rtt_us"] / echo["rtt_us"], 3),
        # information: the same get from a minimal blocking client (select + read, no event loop),
        # which shows what the guest's trio client costs under emulation
        "get_rtt_blocking_client_us": round(blocking["rtt_us"], 1),
        "get_rtt_blocking_client_ratio": round(blocking["rtt_us"] / echo["rtt_us"], 3),
        "throughput_ratio": round(ours["throughput_mbs"] / echo["throughput_mbs"], 3),
        "params": {
            "samples": args.samples,
            "window": args.window,
            "seconds": args.seconds,
            "message_bytes": MESSAGE,
        },
    }
    result["targets_met"] = {
        "get_rtt_le_2x_echo": result["get_rtt_ratio"] <= 2.0,
        "throughput_ge_half_echo": result["throughput_ratio"] >= 0.5,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
