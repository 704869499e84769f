"""A host agent killed with SIGKILL in the middle of persistent puts loses no acknowledged page.

Why this test exists: preswap drops its own copy of a page as soon as the host acknowledges the
persistent put, so an acknowledged page that a host-agent crash loses is lost memory in a guest.
Real processes throughout: `hostagent run`, writer processes speaking the wire protocol over the
agent's sockets, SIGKILL, and a second `hostagent run` on the same config and arena.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from guestagent.protocol import wire
from guestagent.protocol.wire import PAGE_SIZE, Op, PoolFlag, Status
from scripts.wait import wait_until
from tests.support.host_agent import HostAgentProcess
from tests.support.wire_guest import WireGuest, oid

KEYS_OBJECTS = 16  # writers cycle over 16 objects x 64 indexes, so pages get overwritten
KEYS_INDEXES = 64
MIN_ACKS = 400  # acknowledged puts per writer before the kill
MAX_OPS = 500_000  # a writer that gets this far was never interrupted: the test is broken
PERS = int(PoolFlag.PERSISTENT)
PERS_X = int(PoolFlag.PERSISTENT | PoolFlag.EXCLUSIVE_GETS)

Held = dict[tuple[int, int], int | None]  # key (object, index) -> seed of the page it holds

_WORDS = ("swap", "page", "the", "guest", "host", "memory", "of", "a", "kernel", "index", "pool")


def make_page(seed: int) -> bytes:
    """The page for a seed: random (stored raw), text-like (lz4) or same-filled, by seed."""
    kind = seed % 3
    rnd = random.Random(seed)
    if kind == 0:
        return rnd.randbytes(PAGE_SIZE)
    if kind == 1:
        parts: list[str] = []
        while sum(map(len, parts)) < PAGE_SIZE:
            parts.append(f"{rnd.choice(_WORDS)} {rnd.randrange(1000)} ")
        return "".join(parts).encode()[:PAGE_SIZE]
    return struct.pack("<Q", seed * 0x9E3779B97F4A7C15 & (2**64 - 1)) * (PAGE_SIZE // 8)


def writer(socket_path: str, log_path: str, pool: int, flags: int, first_seed: int) -> None:
    """Child process: persistent puts (and some flushes) until the channel breaks.

    Every operation is logged before it is sent ("P"/"PF") and again once the host acknowledged it
    ("A"/"AF"; "R" for a refused put), each line written with os.write so it is in the file before
    the next request goes out. At most one operation is ever in flight.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def log(line: str) -> None:
        os.write(fd, (line + "\n").encode())

    rnd = random.Random(first_seed)
    try:
        g = WireGuest(socket_path)
        g.hello("restart-writer")
        if pool == 0:
            pool = g.new_pool(flags)
        log(f"POOL {pool}")
        for seq in range(MAX_OPS):
            key, index = rnd.randrange(KEYS_OBJECTS), rnd.randrange(KEYS_INDEXES)
            if seq % 16 == 15:
                log(f"PF {key} {index}")
                reply = g.call(Op.FLUSH_PAGE, pool=pool, oid=oid(key), index=index)
                assert reply.status == Status.OK, reply
                log(f"AF {key} {index}")
                continue
            seed = first_seed + seq
            log(f"P {key} {index} {seed}")
            status = g.put(pool, key, index, make_page(seed))
            assert status in (Status.OK, Status.NO_SPACE), status
            log(f"{'A' if status == Status.OK else 'R'} {key} {index} {seed}")
        log("DONE")
    except (EOFError, OSError, wire.ProtocolError) as err:
        log(f"BROKEN {type(err).__name__}")  # the host agent was killed: expected
    except BaseException as err:  # a wrong reply: make the parent fail loudly
        log(f"ERROR {err!r}")
        os._exit(2)
    os._exit(0)


@dataclass
class Expected:
    """What a writer's log says each key must hold after the restart."""

    pool: int = 0
    acked: int = 0
    # key -> the pages the key may hold (None = empty): one if the log is unambiguous, two if the
    # last operation on the key was in flight when the agent died (applied or not).
    allowed: dict[tuple[int, int], set[int | None]] = field(default_factory=dict)
    broken: bool = False


def read_log(path: Path, initial: Held | None = None) -> Expected:
    """Replay a writer's log over `initial` (what each key held before this writer started)."""
    exp = Expected()
    state: Held = dict(initial or {})
    pending: tuple[tuple[int, int], int | None] | None = None
    for line in path.read_text().splitlines():
        word, *rest = line.split()
        if word == "POOL":
            exp.pool = int(rest[0])
        elif word in ("P", "PF"):
            key = (int(rest[0]), int(rest[1]))
            pending = (key, int(rest[2]) if word == "P" else None)
        elif word in ("A", "AF", "R"):
            key = (int(rest[0]), int(rest[1]))
            assert pending is not None and pending[0] == key, line
            state[key] = int(rest[2]) if word == "A" else None
            exp.acked += word == "A"
            pending = None
        elif word == "BROKEN":
            exp.broken = True
        else:
            raise AssertionError(f"writer log: {line}")
    exp.allowed = {key: {value} for key, value in state.items()}
    if pending is not None:
        key, value = pending
        exp.allowed.setdefault(key, {None}).add(value)
    return exp


def count_acks(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.count(b"\nA ") + data.startswith(b"A ")


def run_writers_and_kill(
    agent: HostAgentProcess, tmp: Path, round_no: int, plans: dict[str, tuple[int, int, Held]]
) -> dict[str, Expected]:
    """Start one writer per guest, SIGKILL the agent once each has MIN_ACKS acks, read the logs.

    plans: guest -> (existing pool id or 0 to create one, flags for a new pool, what the pool's
    keys hold before the writer starts).
    """
    ctx = multiprocessing.get_context("fork")
    procs: dict[str, multiprocessing.process.BaseProcess] = {}
    logs: dict[str, Path] = {}
    for n, (guest, (pool, flags, _)) in enumerate(plans.items()):
        logs[guest] = tmp / f"writer-{guest}-{round_no}.log"
        seed0 = (round_no * 10 + n) * 1_000_000
        procs[guest] = ctx.Process(
            target=writer, args=(agent.sockets[guest], str(logs[guest]), pool, flags, seed0), daemon=True
        )
        procs[guest].start()
    try:

        def acknowledged() -> bool:
            assert all(p.is_alive() for p in procs.values()), "a writer died before the kill"
            return min(count_acks(p) for p in logs.values()) >= MIN_ACKS

        wait_until(acknowledged, 60, f"{MIN_ACKS} acknowledged puts per writer", interval=0.01)
        assert all(p.is_alive() for p in procs.values()), "a writer finished before the kill"
        agent.kill()  # SIGKILL mid-load: no shutdown code runs in the agent
        for guest, p in procs.items():
            p.join(15)
            assert p.exitcode == 0, f"writer {guest} exit {p.exitcode}: {logs[guest].read_text()[-500:]}"
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
                p.join(5)
    result = {guest: read_log(path, plans[guest][2]) for guest, path in logs.items()}
    for guest, exp in result.items():
        assert exp.broken, f"writer {guest} was not interrupted by the kill"
        assert exp.acked >= MIN_ACKS
        in_flight = sum(len(v) > 1 for v in exp.allowed.values())
        print(
            f"round {round_no} {guest}: {exp.acked} acknowledged puts, "
            f"{len(exp.allowed)} keys, {in_flight} in flight at the kill"
        )
    return result


def verify(agent: HostAgentProcess, guest: str, exp: Expected, flags: int) -> Held:
    """Every key holds a page the log allows, byte-exact; returns what each key holds (a seed)."""
    observed: Held = {}
    with WireGuest(agent.sockets[guest]) as g:
        g.hello(f"verify-{guest}")
        assert g.query_pool(exp.pool) == flags, f"{guest}: pool {exp.pool} did not survive"
        for key in range(KEYS_OBJECTS):
            for index in range(KEYS_INDEXES):
                got = g.get(exp.pool, key, index)
                allowed = exp.allowed.get((key, index), {None})
                if got is None:
                    assert None in allowed, f"{guest}: acknowledged page {key}/{index} lost"
                    observed[(key, index)] = None
                    continue
                seeds = [s for s in allowed if s is not None and make_page(s) == got]
                assert seeds, (
                    f"{guest}: page {key}/{index} has the wrong contents "
                    f"(allowed seeds {sorted(s for s in allowed if s is not None)})"
                )
                observed[(key, index)] = seeds[0]
    return observed


def present(observed: Held) -> int:
    return sum(seed is not None for seed in observed.values())


def test_sigkill_mid_load_loses_no_acknowledged_page(
    host_agent_stopped: HostAgentProcess, tmp_path: Path
) -> None:
    agent = host_agent_stopped
    agent.start()
    # an ephemeral pool that must not survive, next to the persistent ones
    with WireGuest(agent.sockets["g3"]) as g3:
        g3.hello("g3")
        eph = g3.new_pool(0)
        assert g3.put(eph, 1, 1, make_page(1)) == Status.OK

    first = run_writers_and_kill(agent, tmp_path, 1, {"g1": (0, PERS, {}), "g2": (0, PERS_X, {})})
    agent.start()
    with WireGuest(agent.sockets["g3"]) as g3:
        g3.hello("g3")
        assert g3.query_pool(eph) is None, "an ephemeral pool survived the restart"
    # g1's pool has plain gets: verifying leaves its pages in place for a second crash
    held = verify(agent, "g1", first["g1"], PERS)
    assert present(held) > 0
    stats = agent.stats()
    assert stats["pool"]["ephemeral_pages"] == 0
    assert stats["guests"]["g1"]["persistent"]["pages"] == present(held)

    # round 2: more load on the rebuilt pool, another SIGKILL, another rebuild
    second = run_writers_and_kill(agent, tmp_path, 2, {"g1": (first["g1"].pool, PERS, held)})
    agent.start()
    assert second["g1"].pool == first["g1"].pool
    held = verify(agent, "g1", second["g1"], PERS)
    assert agent.stats()["guests"]["g1"]["persistent"]["pages"] == present(held)
    # g2's pool has exclusive gets: verified last, as the gets consume its pages
    assert present(verify(agent, "g2", first["g2"], PERS_X)) > 0
    with WireGuest(agent.sockets["g2"]) as g2:
        g2.hello("g2")
        assert all(
            g2.get(first["g2"].pool, k, i) is None for k in range(KEYS_OBJECTS) for i in range(KEYS_INDEXES)
        )
    assert agent.stats()["guests"]["g2"]["persistent"]["pages"] == 0
