"""One guest churning persistent pools must not stall the others (the agent has one event loop).

Why: creating or destroying a persistent pool used to rewrite the whole pool table (every
persistent pool of every guest) on the loop, so a guest creating 1,024 pools in one write stalled
every other guest for seconds. Real processes: `hostagent run`, an attacker process speaking the
wire protocol as g1, and a victim in the test measuring every round trip as g2. Then SIGKILL and a
restart: the pools the attacker kept, and their pages, are all there (the journal is replayed).
"""

from __future__ import annotations

import multiprocessing
import random
import statistics
import time

from guestagent.protocol import wire
from guestagent.protocol.wire import Frame, Op, PoolFlag, Status
from tests.support.host_agent import HostAgentProcess
from tests.support.wire_guest import WireGuest, connected, oid, page

PERS = int(PoolFlag.PERSISTENT)
BATCH = 1000  # pools created (then destroyed) per write; the per-guest limit is 1024
ATTACK_SECONDS = 4.0
KEEP = 300  # pools the attacker keeps at the end, one page each, for the restart check
BOUND = 0.050  # target: no stall of another guest over 50 ms (p99 here; see docs/hostile-guest.md)
WORST = 0.250  # the worst single round trip: this shared 2-core machine alone makes ~70 ms


def attacker(socket_path: str, seconds: float, result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    """Child process: NEW_POOL x BATCH in one write, read the replies, DESTROY_POOL x BATCH in one
    write, until the time is up; then KEEP pools with a page each."""
    g = WireGuest(socket_path, timeout=60)
    g.hello("attacker")
    spec = wire.pool_spec_payload(PERS, bytes(16))
    cycles = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        g.send(*[Frame(Op.NEW_POOL, request_id=g.rid(), payload=spec) for _ in range(BATCH)])
        pools = []
        for _ in range(BATCH):
            reply = g.recv()
            assert reply.status == Status.OK, reply
            pools.append(reply.pool)
        g.send(*[Frame(Op.DESTROY_POOL, request_id=g.rid(), pool=p) for p in pools])
        for _ in range(BATCH):
            assert g.recv().status == Status.OK
        cycles += 1
    kept = [g.new_pool(PERS) for _ in range(KEEP)]
    for i, p in enumerate(kept):
        assert g.put(p, i, 0, page(i)) == Status.OK
    g.close()
    result.put((cycles, kept))


def victim_latencies(agent: HostAgentProcess, seconds: float) -> list[float]:
    """Round trips (a put, then a get of it) as g2, each timed, for `seconds`."""
    out: list[float] = []
    with connected(agent, "g2") as g:
        pool = g.new_pool(0)
        data = page(7)
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            assert g.put(pool, 1, i % 64, data) == Status.OK
            g.get(pool, 1, i % 64)
            out.append(time.perf_counter() - t0)
            i += 1
    return out


def test_a_guest_churning_persistent_pools_does_not_stall_another(
    host_agent_stopped: HostAgentProcess,
) -> None:
    agent = host_agent_stopped
    agent.start()
    with connected(agent, "g3") as g3:  # persistent pools of another guest make the table big
        for _ in range(1000):
            g3.new_pool(PERS)
    quiet = victim_latencies(agent, 1.0)
    ctx = multiprocessing.get_context("fork")
    result = ctx.Queue()
    proc = ctx.Process(target=attacker, args=(agent.sockets["g1"], ATTACK_SECONDS, result))
    proc.start()
    time.sleep(0.2)  # the attack is under way
    loaded = victim_latencies(agent, ATTACK_SECONDS - 0.5)
    cycles, kept = result.get(timeout=120)
    proc.join(30)
    assert proc.exitcode == 0
    worst, p99 = max(loaded), statistics.quantiles(loaded, n=100)[98]
    print(
        f"victim round trips: quiet worst {max(quiet) * 1e3:.1f} ms; under attack ({cycles} cycles of "
        f"{BATCH} pools created and destroyed) n={len(loaded)} worst {worst * 1e3:.1f} ms, "
        f"p99 {p99 * 1e3:.2f} ms"
    )
    assert cycles >= 2, "the attack never got going"
    assert p99 < BOUND and worst < WORST, (
        f"another guest stalled {worst * 1e3:.0f} ms (p99 {p99 * 1e3:.1f} ms)"
    )

    agent.kill()  # SIGKILL: whatever the journal holds is all there is
    agent.start()
    with connected(agent, "g1") as g:
        for i, p in enumerate(kept):
            assert g.query_pool(p) == PERS
            assert g.get(p, i, 0) == page(i), f"pool {p} lost its page"
    pools = agent.request("pools")
    assert sum(1 for p in pools if p["owner"] == "g3") == 1000
    assert sum(1 for p in pools if p["owner"] == "g1") == KEEP


def rss_anon_kib(pid: int) -> int:
    """The process's anonymous resident memory (its heap: the arena is a shared file mapping)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/PID/status")


def hostile_round(agent: HostAgentProcess, rng: random.Random, frames: int, bad_channels: int) -> None:
    """Valid but useless frames on random keys (puts, gets, flushes, queries of pools that do not
    exist, STATS reports with fresh names every time), then channels that send garbage."""
    data = rng.randbytes(wire.PAGE_SIZE)
    with connected(agent, "g1") as g:
        eph, pers = g.new_pool(0), g.new_pool(PERS)
        sent = 0
        while sent < frames:
            batch: list[Frame] = []
            for _ in range(500):
                k, op = rng.randrange(1 << 40), rng.randrange(6)
                pool = eph if k & 1 else pers
                if op == 0:
                    batch.append(
                        Frame(
                            Op.PUT,
                            request_id=g.rid(),
                            pool=pool,
                            oid=oid(k),
                            index=rng.randrange(1 << 20),
                            payload=data,
                        )
                    )
                elif op == 1:
                    batch.append(Frame(Op.GET, request_id=g.rid(), pool=pool, oid=oid(k), index=k & 0xFFFF))
                elif op == 2:
                    batch.append(Frame(Op.FLUSH_OBJECT, request_id=g.rid(), pool=pool, oid=oid(k)))
                elif op == 3:
                    batch.append(
                        Frame(Op.FLUSH_PAGE, request_id=g.rid(), pool=pool, oid=oid(k), index=k & 0xFFFF)
                    )
                elif op == 4:
                    batch.append(
                        Frame(
                            Op.STATS,
                            payload=wire.stats_payload({f"x{rng.randrange(1 << 40)}": 1 for _ in range(50)}),
                        )
                    )
                else:
                    batch.append(Frame(Op.QUERY_POOL, request_id=g.rid(), pool=rng.randrange(1 << 30)))
            g.send(*batch)
            for _ in range(sum(1 for f in batch if f.opcode != Op.STATS)):
                g.recv()
            sent += len(batch)
    for i in range(bad_channels):
        with WireGuest(agent.sockets["g2"]) as g:
            if i % 2:
                g.hello("hostile")
            g.send_raw(rng.randbytes(128))  # a header with a bad magic (or worse)
            g.expect_error()


def test_the_agents_memory_stays_bounded_under_hostile_frames(host_agent: HostAgentProcess) -> None:
    """Issue 15 saw the agent's RSS creep from 27 to 37 MiB over 1.2 M hostile frames. The arena
    is a file mapping bounded by the pool limit; the agent's own heap (RssAnon) must level off:
    after a first round (the pools fill, caches warm up) five more rounds of 100,000 frames and
    500 garbage channels each may add at most 2 MiB."""
    rng = random.Random(15)
    hostile_round(host_agent, rng, 100_000, 500)
    first = rss_anon_kib(host_agent.pid)
    sizes = []
    for _ in range(5):
        hostile_round(host_agent, rng, 100_000, 500)
        sizes.append(rss_anon_kib(host_agent.pid))
    print(
        f"agent RssAnon after each round of 100,000 frames and 500 garbage channels: "
        f"{first / 1024:.1f} MiB, then {', '.join(f'{s / 1024:.1f}' for s in sizes)} MiB"
    )
    assert max(sizes) - first < 2048, (first, sizes)
