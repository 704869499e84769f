"""Focused tests of the pool engine: the contract rules one at a time, with exact numbers.

The stateful model (test_pool_model.py) finds odd interleavings; these tests pin the rules whose
failure would be silent in production: exclusive gets, refused puts leaving no stale copy, shared
pool authorisation, weighted fairness, caps, quotas, the host budget, compression slot choice and
rebuilding from the arena after a crash (including a corrupted slot).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag
from hostagent.arena import (
    CLASS_FOR_LENGTH,
    FLAG_CHECKSUM,
    REF_SHIFT,
    SLOT_LIVE,
    SLOT_SIZES,
    Arena,
    crc32_checksum,
)
from hostagent.pool import (
    Client,
    ClientSettings,
    PoolDenied,
    PoolEngine,
    TableError,
    UnknownPool,
)

RAW = SLOT_SIZES[-1]  # arena bytes of a page stored raw (slot header included)
SMALLEST = SLOT_SIZES[0]
EPH = 0
PERS = int(PoolFlag.PERSISTENT)
PERS_X = int(PoolFlag.PERSISTENT | PoolFlag.EXCLUSIVE_GETS)
SHARED = int(PoolFlag.SHARED)
SHARED_PERS = int(PoolFlag.SHARED | PoolFlag.PERSISTENT)
SHARED_PERS_X = int(PoolFlag.SHARED | PoolFlag.PERSISTENT | PoolFlag.EXCLUSIVE_GETS)

U1 = bytes.fromhex("6f1c0000000000000000000000000001")
U2 = bytes.fromhex("6f1c0000000000000000000000000002")
U3 = bytes.fromhex("6f1c0000000000000000000000000003")
ACL = {U1: ("g1", "g2"), U2: ("g1", "g2"), U3: ("g2",)}


def oid(n: int) -> bytes:
    return n.to_bytes(24, "little")


def random_page(seed: int) -> bytes:
    return random.Random(seed).randbytes(PAGE_SIZE)


def same_page(word: int) -> bytes:
    return struct.pack("<Q", word) * (PAGE_SIZE // 8)


def text_page(seed: int) -> bytes:
    """English-ish text: compresses with lz4, but not to nothing."""
    rnd = random.Random(seed)
    words = (
        "memory",
        "page",
        "guest",
        "host",
        "the",
        "of",
        "a",
        "pool",
        "cache",
        "swap",
        "kernel",
        "returns",
        "object",
        "index",
        "when",
        "is",
        "not",
        "evicted",
        "flush",
        "put",
        "get",
    )
    parts: list[str] = []
    while sum(map(len, parts)) < PAGE_SIZE:
        parts.append(rnd.choice(words) + rnd.choice((" ", " ", ", ", ".\n")) + str(rnd.randrange(99)))
    return "".join(parts).encode()[:PAGE_SIZE]


class Harness:
    """An arena directory with engines opened on it, so a test can 'restart' in-process."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.arenas: list[Arena] = []
        self.engines: list[PoolEngine] = []

    def open(
        self,
        limit: int = 64 << 20,
        *,
        host_reserve: int = 0,
        acl: Mapping[bytes, Collection[str]] = ACL,
        capacity: int | None = None,
    ) -> PoolEngine:
        arena = Arena(self.root / "arena", capacity_bytes=capacity or limit + (8 << 20))
        engine = PoolEngine(arena, limit_bytes=limit, host_reserve_bytes=host_reserve, shared_acl=acl)
        self.arenas.append(arena)
        self.engines.append(engine)
        return engine

    def close_all(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):  # an abandoned engine may be half-closed
                engine.close()
        for arena in self.arenas:
            arena.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    root = Path(tempfile.mkdtemp(prefix="tmem-engine-", dir="/dev/shm"))
    h = Harness(root)
    try:
        yield h
    finally:
        h.close_all()
        shutil.rmtree(root, ignore_errors=True)


def gstats(engine: PoolEngine, name: str, kind: str) -> dict[str, Any]:
    guests: dict[str, Any] = dict(engine.stats()["guests"])
    result: dict[str, Any] = guests[name][kind]
    return result


def used(engine: PoolEngine) -> int:
    return int(engine.stats()["pool"]["used_bytes"])


def client(engine: PoolEngine, name: str, **kw: Any) -> Client:
    return engine.client(name, ClientSettings(**kw))


def shared_members(engine: PoolEngine, kind: int, uuid: bytes) -> tuple[Client, int, Client, int]:
    """g1 and g2 joined to the shared pool `uuid`: (g1, g1's pool id, g2, g2's pool id)."""
    a, b = client(engine, "g1"), client(engine, "g2")
    return a, engine.new_pool(a, kind, uuid), b, engine.new_pool(b, kind, uuid)


def persistent_pages(engine: PoolEngine, count: int) -> tuple[Client, int, list[bytes]]:
    """g1's persistent pool holding `count` raw (incompressible) pages of object 1: (g1, pool, pages)."""
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS)
    pages = [random_page(i) for i in range(count)]
    for i, page in enumerate(pages):
        assert engine.put(a, pid, oid(1), i, page)
    return a, pid, pages


def held_get(engine: PoolEngine, key: int, index: int, page: bytes) -> tuple[Client, int, list[Any]]:
    """g1's exclusive persistent pool with `page` put and then got with a `held` list (the reply not
    yet known delivered): (g1, pool id, held)."""
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS_X)
    assert engine.put(a, pid, oid(key), index, page)
    held: list[Any] = []
    assert engine.get(a, pid, oid(key), index, held) == page
    return a, pid, held


# -- gets ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "uuid", "exclusive"),
    [
        (EPH, None, True),
        (SHARED, U1, False),
        (PERS, None, False),
        (PERS_X, None, True),
        (SHARED_PERS_X, U2, True),
    ],
)
def test_a_get_is_exclusive_exactly_where_the_contract_says(
    harness: Harness, kind: int, uuid: bytes | None, exclusive: bool
) -> None:
    """Private ephemeral pools and EXCLUSIVE_GETS pools give a page up on a get, others keep it;
    a shared pool's get (by g2 here) acts for every member (g1 then reads it, or finds it gone)."""
    engine = harness.open()
    if uuid is None:
        a = b = client(engine, "g1")
        pa = pb = engine.new_pool(a, kind)
    else:
        a, pa, b, pb = shared_members(engine, kind, uuid)
    page = random_page(kind) if kind & PERS else text_page(kind)
    assert engine.put(a, pa, oid(1), 3, page)
    assert engine.get(b, pb, oid(1), 3) == page
    assert engine.get(a, pa, oid(1), 3) == (None if exclusive else page)
    if uuid is None:  # a private pool's pages are charged to its guest
        charged = gstats(engine, "g1", "persistent" if kind & PERS else "ephemeral")["pages"]
        assert charged == (0 if exclusive else 1)


# -- refused puts -------------------------------------------------------------------------------


def test_refused_duplicate_persistent_put_flushes_older_copy(harness: Harness) -> None:
    """Quota full: overwriting a tiny (same-filled) page with a raw one is refused -> key empty."""
    engine = harness.open()
    c = client(engine, "g1", quota_bytes=8 * RAW, compress=False)
    pid = engine.new_pool(c, PERS)
    assert engine.put(c, pid, oid(0), 0, bytes(PAGE_SIZE))
    n = 1
    while engine.put(c, pid, oid(1), n, random_page(n)):
        n += 1
        assert n < 20, "quota never refused a put"
    k = 0
    while engine.put(c, pid, oid(2), k, same_page(k + 1)):
        k += 1
        assert k < 200, "quota never refused a same-filled put"
    left = 8 * RAW - gstats(engine, "g1", "persistent")["bytes"]
    assert left < SMALLEST
    assert engine.put(c, pid, oid(0), 0, random_page(99)) is False
    assert engine.get(c, pid, oid(0), 0) is None
    # the refusal touched nothing else
    assert all(engine.get(c, pid, oid(1), i) == random_page(i) for i in range(1, n))
    assert gstats(engine, "g1", "persistent")["puts_refused"] >= 3


def test_refused_duplicate_ephemeral_put_flushes_older_copy(harness: Harness) -> None:
    """A cap below one raw slot: the raw put is refused and the earlier copy must not survive."""
    engine = harness.open()
    c = client(engine, "g1", cap_bytes=4 * RAW, compress=False)
    pid = engine.new_pool(c, EPH)
    assert engine.put(c, pid, oid(1), 1, random_page(1))
    engine.configure("g1", cap_bytes=RAW - 1)
    assert engine.put(c, pid, oid(1), 1, random_page(2)) is False
    assert engine.get(c, pid, oid(1), 1) is None
    # a same-filled page still fits in the smallest slot
    assert engine.put(c, pid, oid(1), 2, same_page(7))
    assert engine.get(c, pid, oid(1), 2) == same_page(7)


# -- shared pools and ownership -----------------------------------------------------------------


def test_shared_pool_authorisation_failures_raise(harness: Harness) -> None:
    engine = harness.open()
    a, b = client(engine, "g1"), client(engine, "g2")
    unknown_uuid = b"\xaa" * 16
    with pytest.raises(PoolDenied):
        engine.new_pool(a, SHARED, unknown_uuid)
    with pytest.raises(PoolDenied):
        engine.new_pool(a, SHARED, U3)  # authorised for g2 only
    with pytest.raises(PoolDenied):
        engine.new_pool(a, SHARED_PERS, U3)
    assert engine.owned_pools(a) == {}
    # existing shared pool joined with the other persistence
    pb = engine.new_pool(b, SHARED_PERS, U2)
    with pytest.raises(PoolDenied):
        engine.new_pool(a, SHARED, U2)
    assert engine.owned_pools(a) == {}
    pa = engine.new_pool(a, SHARED_PERS, U2)
    assert int(engine.owned_pools(a)[pa]) == SHARED_PERS
    assert engine.put(b, pb, oid(1), 1, random_page(1))
    assert engine.get(a, pa, oid(1), 1) == random_page(1)


def test_unknown_pool_ids(harness: Harness) -> None:
    engine = harness.open()
    a, b = client(engine, "g1"), client(engine, "g2")
    pa = engine.new_pool(a, EPH)
    assert pa >= 1
    for bad in (0, pa + 100):
        assert engine.pool_flags(a, bad) is None
        with pytest.raises(UnknownPool):
            engine.put(a, bad, oid(1), 0, bytes(PAGE_SIZE))
    if pa not in engine.owned_pools(b):
        with pytest.raises(UnknownPool):
            engine.get(b, pa, oid(1), 0)
    engine.destroy_pool(a, pa)
    ops: list[Callable[[], object]] = [
        lambda: engine.get(a, pa, oid(1), 0),
        lambda: engine.flush_page(a, pa, oid(1), 0),
        lambda: engine.flush_object(a, pa, oid(1)),
        lambda: engine.destroy_pool(a, pa),
    ]
    for op in ops:
        with pytest.raises(UnknownPool):
            op()


def test_destroying_shared_pool_only_leaves_it(harness: Harness) -> None:
    engine = harness.open()
    a, pa, b, pb = shared_members(engine, SHARED, U1)
    assert engine.put(a, pa, oid(1), 1, text_page(1))
    engine.destroy_pool(a, pa)
    assert engine.get(b, pb, oid(1), 1) == text_page(1)
    assert engine.pool_flags(a, pa) is None


def test_disconnect_drops_ephemeral_keeps_persistent(harness: Harness) -> None:
    engine = harness.open()
    a, b = client(engine, "g1"), client(engine, "g2")
    eph = engine.new_pool(a, EPH)
    pers = engine.new_pool(a, PERS)
    sh_a = engine.new_pool(a, SHARED, U1)
    sh_b = engine.new_pool(b, SHARED, U1)
    for pid in (eph, pers, sh_a):
        assert engine.put(a, pid, oid(1), 1, random_page(pid))
    engine.disconnect(a)
    a = engine.client("g1")
    assert dict(engine.owned_pools(a)) == {pers: PERS}
    assert engine.get(a, pers, oid(1), 1) == random_page(pers)
    with pytest.raises(UnknownPool):
        engine.get(a, eph, oid(1), 1)
    assert engine.get(b, sh_b, oid(1), 1) == random_page(sh_a)
    assert engine.stats()["pool"]["ephemeral_pages"] == 1


def test_remove_drops_every_pool(harness: Harness) -> None:
    engine = harness.open()
    a = client(engine, "g1")
    pers = engine.new_pool(a, PERS)
    assert engine.put(a, pers, oid(1), 1, random_page(1))
    engine.remove(a)
    assert engine.stats()["pool"]["pages"] == 0
    assert used(engine) == 0
    assert engine.owned_pools(engine.client("g1")) == {}


# -- space: fairness, cap, quota, budget, reserve -----------------------------------------------


def test_fairness_weights_1_and_3(harness: Harness) -> None:
    """Both clients put without end at the same rate; the pool converges near 1:3 in bytes.

    8 MiB of pool: the engine allows a client a little slack above its share (share/32 + 32 KiB)
    before it stops evicting by plain LRU, which skews a pool of a few hundred pages (~1:2.5).
    """
    limit = 2000 * RAW
    engine = harness.open(limit)
    a = client(engine, "g1", weight=1, compress=False)
    b = client(engine, "g2", weight=3, compress=False)
    pa, pb = engine.new_pool(a, EPH), engine.new_pool(b, EPH)
    for i in range(8000):
        page = random_page(i % 3000)
        assert engine.put(a, pa, oid(i // 256), i % 256, page)
        assert engine.put(b, pb, oid(i // 256), i % 256, page)
        if i % 100 == 99:
            assert used(engine) <= limit
    ea = gstats(engine, "g1", "ephemeral")["bytes"]
    eb = gstats(engine, "g2", "ephemeral")["bytes"]
    assert ea + eb > 0.9 * limit, "the pool should stay nearly full"
    assert 2.6 <= eb / ea <= 3.4, f"weights 1:3 gave {ea}:{eb} bytes"
    assert engine.stats()["pool"]["evictions"] > 0


def test_cap_holds_and_evicts_own_oldest_first(harness: Harness) -> None:
    engine = harness.open()
    a = client(engine, "g1", cap_bytes=10 * RAW, compress=False)
    b = client(engine, "g2", compress=False)
    pa, pb = engine.new_pool(a, EPH), engine.new_pool(b, EPH)
    for i in range(20):
        assert engine.put(b, pb, oid(2), i, random_page(1000 + i))
    for i in range(50):
        assert engine.put(a, pa, oid(1), i, random_page(i))
        assert gstats(engine, "g1", "ephemeral")["bytes"] <= 10 * RAW
    present = [i for i in range(50) if engine.get(a, pa, oid(1), i) is not None]
    assert present == list(range(40, 50))
    assert gstats(engine, "g1", "ephemeral")["evicted"] == 40
    # the cap is g1's business: g2 lost nothing
    assert all(engine.get(b, pb, oid(2), i) == random_page(1000 + i) for i in range(20))


def test_cap_below_one_slot_refuses(harness: Harness) -> None:
    engine = harness.open()
    a = client(engine, "g1", cap_bytes=RAW - 1, compress=False)
    pa = engine.new_pool(a, EPH)
    assert engine.put(a, pa, oid(1), 0, random_page(0)) is False
    assert gstats(engine, "g1", "ephemeral")["puts_refused"] == 1
    assert gstats(engine, "g1", "ephemeral")["bytes"] == 0


def test_quota_holds(harness: Harness) -> None:
    engine = harness.open()
    a = client(engine, "g1", quota_bytes=10 * RAW, compress=False)
    pid = engine.new_pool(a, PERS)
    results = [engine.put(a, pid, oid(1), i, random_page(i)) for i in range(15)]
    assert results == [True] * 10 + [False] * 5
    st = gstats(engine, "g1", "persistent")
    assert st["bytes"] == 10 * RAW
    assert st["pages"] == 10
    assert st["puts_refused"] == 5
    assert all(engine.get(a, pid, oid(1), i) == random_page(i) for i in range(10))
    engine.flush_page(a, pid, oid(1), 0)
    assert engine.put(a, pid, oid(1), 20, random_page(20))
    # lowering the quota never drops persistent pages; flushes still work
    engine.configure("g1", quota_bytes=RAW)
    assert engine.put(a, pid, oid(1), 21, random_page(21)) is False
    assert engine.get(a, pid, oid(1), 5) == random_page(5)
    engine.flush_object(a, pid, oid(1))
    assert gstats(engine, "g1", "persistent")["bytes"] == 0


def test_persistent_put_evicts_ephemeral_when_budget_full(harness: Harness) -> None:
    """Ephemeral pages are the pool's slack: a full budget makes room for persistent pages."""
    engine = harness.open(10 * RAW)
    a = client(engine, "g1", compress=False)
    b = client(engine, "g2", compress=False)
    pa, pb = engine.new_pool(a, EPH), engine.new_pool(b, PERS)
    for i in range(10):
        assert engine.put(a, pa, oid(1), i, random_page(i))
    assert used(engine) == 10 * RAW
    assert engine.put(b, pb, oid(2), 0, random_page(100))
    assert used(engine) <= 10 * RAW
    assert gstats(engine, "g1", "ephemeral")["pages"] == 9
    # once only persistent pages are left, the budget refuses
    for i in range(1, 11):
        engine.put(b, pb, oid(2), i, random_page(100 + i))
    assert gstats(engine, "g2", "persistent")["pages"] == 10
    assert gstats(engine, "g1", "ephemeral")["pages"] == 0
    assert engine.put(b, pb, oid(2), 50, random_page(50)) is False


def test_global_lru_when_nobody_is_over_share(harness: Harness) -> None:
    """A non-exclusive get on a shared ephemeral pool counts as a use."""
    engine = harness.open(10 * RAW)
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, SHARED, U1)
    for i in range(10):
        assert engine.put(a, pid, oid(1), i, random_page(i))
    assert engine.get(a, pid, oid(1), 0) == random_page(0)
    assert engine.put(a, pid, oid(1), 10, random_page(10))
    assert engine.get(a, pid, oid(1), 1) is None
    assert all(engine.get(a, pid, oid(1), i) == random_page(i) for i in (0, *range(2, 11)))


def test_host_budget_limits_growth(harness: Harness) -> None:
    reserve = 16 * RAW
    engine = harness.open(64 << 20, host_reserve=reserve)
    a = client(engine, "g1", compress=False)
    b = client(engine, "g2", compress=False)
    pa, pb = engine.new_pool(a, EPH), engine.new_pool(b, PERS)
    assert engine.stats()["pool"]["budget_bytes"] == 64 << 20  # before any feed: limit only
    engine.set_host_available(reserve + 40 * RAW)
    assert engine.stats()["pool"]["budget_bytes"] == 40 * RAW
    for i in range(200):
        assert engine.put(a, pa, oid(1), i, random_page(i))
        assert used(engine) <= 40 * RAW
    assert engine.stats()["pool"]["ephemeral_pages"] == 40
    # growing the pool does not grow the budget until the host reports more memory
    for i in range(50):
        engine.put(b, pb, oid(2), i, random_page(i))
        assert used(engine) <= 40 * RAW
    assert gstats(engine, "g2", "persistent")["pages"] == 40
    assert gstats(engine, "g1", "ephemeral")["pages"] == 0
    assert engine.put(b, pb, oid(2), 100, random_page(100)) is False
    # more host memory, more budget (capped by the limit)
    engine.set_host_available(reserve + 10 * RAW)
    assert engine.stats()["pool"]["budget_bytes"] == 50 * RAW
    assert engine.put(b, pb, oid(2), 100, random_page(100))
    engine.set_host_available(1 << 40)
    assert engine.stats()["pool"]["budget_bytes"] == 64 << 20


def test_reserve_frees_what_it_reports(harness: Harness) -> None:
    """reserve() reports arena memory given back to the host (whole slabs), never persistent pages."""
    engine = harness.open(64 << 20)
    a = client(engine, "g1", compress=False)
    b = client(engine, "g2", compress=False)
    pa, pb = engine.new_pool(a, EPH), engine.new_pool(b, PERS)
    for i in range(2000):
        assert engine.put(a, pa, oid(i // 256), i % 256, random_page(i))
    for i in range(10):
        assert engine.put(b, pb, oid(9), i, random_page(i))
    avail = 1000 * RAW
    engine.set_host_available(avail)
    assert engine.reserve(avail) == 0  # already there: nothing dropped
    assert engine.stats()["pool"]["ephemeral_pages"] == 2000

    before = engine.stats()["pool"]
    freed = engine.reserve(avail + 30 * RAW)
    after = engine.stats()["pool"]
    assert freed >= 30 * RAW
    assert before["resident_bytes"] - after["resident_bytes"] == freed
    assert before["used_bytes"] - after["used_bytes"] >= freed * 0.99
    assert after["persistent_pages"] == 10
    # it dropped what the host asked for, not the whole pool
    assert 1000 < after["ephemeral_pages"] < 2000, after["ephemeral_pages"]
    assert freed < 4 << 20

    # asking for more than all ephemeral pages drops them all and no persistent page
    freed = engine.reserve(1 << 40)
    final = engine.stats()["pool"]
    assert freed == after["resident_bytes"] - final["resident_bytes"] > 0
    assert final["ephemeral_pages"] == 0
    assert final["persistent_pages"] == 10
    assert final["used_bytes"] == 10 * RAW
    assert all(engine.get(b, pb, oid(9), i) == random_page(i) for i in range(10))


# -- compression --------------------------------------------------------------------------------


def slot_cost(engine: PoolEngine, c: Client, pid: int, page: bytes, index: int) -> int:
    before = used(engine)
    assert engine.put(c, pid, oid(7), index, page)
    return used(engine) - before


def test_compression_slot_choice(harness: Harness) -> None:
    engine = harness.open()
    on = client(engine, "g1", compress=True)
    off = client(engine, "g2", compress=False)
    pon, poff = engine.new_pool(on, PERS), engine.new_pool(off, PERS)
    assert slot_cost(engine, on, pon, bytes(PAGE_SIZE), 0) == SMALLEST
    assert slot_cost(engine, on, pon, same_page(0xDEADBEEF01234567), 1) == SMALLEST
    assert slot_cost(engine, on, pon, random_page(1), 2) == RAW  # incompressible: raw
    text = text_page(5)
    text_cost = slot_cost(engine, on, pon, text, 3)
    assert text_cost < RAW * 0.75, f"text page took {text_cost} bytes"
    assert slot_cost(engine, off, poff, text, 3) == RAW  # compression off: raw
    st = gstats(engine, "g1", "persistent")
    assert st["raw_bytes"] == 4 * PAGE_SIZE
    assert st["bytes"] == 2 * SMALLEST + RAW + text_cost
    for i, page in enumerate((bytes(PAGE_SIZE), same_page(0xDEADBEEF01234567), random_page(1), text)):
        assert engine.get(on, pon, oid(7), i) == page
    assert engine.get(off, poff, oid(7), 3) == text


def test_compress_switch_applies_to_later_puts(harness: Harness) -> None:
    engine = harness.open()
    c = client(engine, "g1", compress=True)
    pid = engine.new_pool(c, PERS)
    small = slot_cost(engine, c, pid, text_page(1), 0)
    engine.configure("g1", compress=False)
    assert engine.stats()["guests"]["g1"]["compress"] is False
    assert slot_cost(engine, c, pid, text_page(1), 1) == RAW
    assert small < RAW
    assert engine.get(c, pid, oid(7), 0) == engine.get(c, pid, oid(7), 1) == text_page(1)


# -- restart from the arena ---------------------------------------------------------------------


def test_restart_keeps_persistent_drops_ephemeral(harness: Harness) -> None:
    """The old engine is abandoned without close(), as after SIGKILL."""
    engine = harness.open()
    a = client(engine, "g1", compress=True)
    b = client(engine, "g2", compress=False)
    eph = engine.new_pool(a, EPH)
    pers = engine.new_pool(a, PERS)
    pers_x = engine.new_pool(b, PERS_X)
    shared = engine.new_pool(b, SHARED_PERS, U2)
    expected: dict[tuple[str, int, int], bytes] = {}
    for i in range(30):
        page = (random_page, text_page, same_page)[i % 3](i)
        assert engine.put(a, eph, oid(1), i, page)
        assert engine.put(a, pers, oid(1), i, page)
        assert engine.put(b, pers_x, oid(2), i, page)
        assert engine.put(b, shared, oid(3), i, page)
        expected.update({("g1", pers, i): page, ("g2", pers_x, i): page, ("g2", shared, i): page})
    # overwrite, flush, consume: none of the old versions may come back
    for i in range(0, 30, 5):
        assert engine.put(a, pers, oid(1), i, random_page(500 + i))
        expected[("g1", pers, i)] = random_page(500 + i)
    engine.flush_page(a, pers, oid(1), 1)
    del expected[("g1", pers, 1)]
    assert engine.get(b, pers_x, oid(2), 2) is not None
    del expected[("g2", pers_x, 2)]
    engine.flush_object(b, shared, oid(3))
    for i in range(30):
        expected.pop(("g2", shared, i))
    assert engine.put(b, shared, oid(4), 0, text_page(77))
    expected[("g2", shared, 0)] = text_page(77)
    flags_before = {n: dict(engine.owned_pools(engine.client(n))) for n in ("g1", "g2")}

    engine2 = harness.open()
    a2, b2 = engine2.client("g1"), engine2.client("g2")
    assert dict(engine2.owned_pools(a2)) == {pers: PERS}
    assert dict(engine2.owned_pools(b2)) == flags_before["g2"]
    assert flags_before["g1"][pers] == PERS
    with pytest.raises(UnknownPool):
        engine2.get(a2, eph, oid(1), 0)
    for i in range(30):
        assert engine2.get(a2, pers, oid(1), i) == expected.get(("g1", pers, i)), i
    for i in range(30):
        assert engine2.get(b2, pers_x, oid(2), i) == expected.get(("g2", pers_x, i)), i
    assert engine2.get(b2, shared, oid(4), 0) == text_page(77)
    assert engine2.get(b2, shared, oid(3), 0) is None
    stats = engine2.stats()["pool"]
    assert stats["ephemeral_pages"] == 0
    # pers_x pages were consumed by the gets above; pers and shared pages remain
    assert stats["persistent_pages"] == 29 + 1
    # the rebuilt engine keeps working: new pools do not collide with surviving ids
    new = engine2.new_pool(a2, EPH)
    assert new != pers
    assert engine2.put(a2, new, oid(1), 0, random_page(1))
    assert engine2.get(a2, pers, oid(1), 0) == expected[("g1", pers, 0)]


def test_restart_after_clean_close(harness: Harness) -> None:
    engine = harness.open()
    a = client(engine, "g1")
    pid = engine.new_pool(a, PERS_X)
    assert engine.put(a, pid, oid(1), 1, text_page(1))
    engine.close()
    harness.arenas[-1].close()
    engine2 = harness.open()
    a2 = engine2.client("g1")
    assert engine2.pool_flags(a2, pid) == PERS_X
    assert engine2.get(a2, pid, oid(1), 1) == text_page(1)
    assert engine2.get(a2, pid, oid(1), 1) is None


def test_corrupted_slot_is_not_served_after_restart(harness: Harness) -> None:
    engine = harness.open()
    _, pid, pages = persistent_pages(engine, 5)
    path = harness.arenas[-1].path
    data = path.read_bytes()
    victim = data.find(pages[2])
    assert victim >= 0, "raw page not found in the arena file"
    assert data.find(pages[2], victim + 1) < 0
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([data[victim + 1000] ^ 0x40]), victim + 1000)
    finally:
        os.close(fd)

    engine2 = harness.open()
    a2 = engine2.client("g1")
    assert engine2.get(a2, pid, oid(1), 2) is None
    for i in (0, 1, 3, 4):
        assert engine2.get(a2, pid, oid(1), i) == pages[i]
    assert engine2.stats()["pool"]["persistent_pages"] == 4


def test_store_writes_the_documented_slot_header(harness: Harness) -> None:
    """store() packs the header as merged fields; the bytes must be SLOT_HEADER's layout."""
    arena = Arena(harness.root / "layout", 1 << 20)
    harness.arenas.append(arena)
    data = random_page(3)[:1000]
    ref = arena.store(
        CLASS_FOR_LENGTH[len(data)], 0x1234_5678, 2**40 + 7, oid(9), 0xFFFF_FFFE, 1, data, 0xDEAD_BEEF, 3
    )
    offset = ref >> REF_SHIFT
    assert arena.header(offset) == (
        SLOT_LIVE,
        0x1234_5678,
        2**40 + 7,
        oid(9),
        0xFFFF_FFFE,
        0xDEAD_BEEF,
        len(data),
        1,
        3,
    )
    assert arena.read(ref) == (1, data)


def test_crc32_slots_of_an_older_arena_are_still_verified(harness: Harness) -> None:
    """Arenas written before xxh3 carry CRC-32 slots (FLAG_CHECKSUM): an upgrade keeps them."""
    engine = harness.open()
    _, pid, pages = persistent_pages(engine, 4)
    arena = harness.arenas[-1]
    pool = next(p for p in engine._pools.values() if p.persistent)
    for i, ref in pool.objects[oid(1)].items():  # rewrite each header as the old version did
        offset = ref >> REF_SHIFT
        h = arena.header(offset)
        crc = crc32_checksum(h.handle, h.generation, h.oid, h.index, h.encoding, pages[i])
        bad = 1 if i == 3 else 0  # slot 3: a bad checksum
        arena.write(offset, h._replace(crc=crc ^ bad, flags=FLAG_CHECKSUM), pages[i])

    engine2 = harness.open()
    a2 = engine2.client("g1")
    for i in range(3):
        assert engine2.get(a2, pid, oid(1), i) == pages[i]
    assert engine2.get(a2, pid, oid(1), 3) is None
    assert engine2.rejected_slots == 1


def test_held_exclusive_get_is_freed_only_when_delivered(harness: Harness) -> None:
    """An exclusive persistent get with `held`: gone from the index, but its slot stays live and
    charged until release (reply delivered) or restore (it may not have been)."""
    engine = harness.open()
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS_X)
    assert engine.put(a, pid, oid(1), 0, random_page(0))
    assert engine.put(a, pid, oid(1), 1, random_page(1))
    held: list[Any] = []
    assert engine.get(a, pid, oid(1), 0, held) == random_page(0)
    assert engine.get(a, pid, oid(1), 0, held) is None  # consumed for the guest
    assert gstats(engine, "g1", "persistent")["pages"] == 2  # still charged
    engine.restore_held(held)  # the channel died before the reply left
    assert held == []
    assert engine.get(a, pid, oid(1), 0) == random_page(0)  # back, and now really taken
    assert engine.get(a, pid, oid(1), 1, held) == random_page(1)
    engine.release_held(held)  # delivered
    assert gstats(engine, "g1", "persistent")["pages"] == 0
    assert engine.get(a, pid, oid(1), 1) is None


def test_held_page_survives_a_crash_before_release(harness: Harness) -> None:
    engine = harness.open()
    _, pid, _ = held_get(engine, 2, 5, random_page(5))
    # the host agent dies here, before the reply was known delivered: a restart rebuilds the page
    again = harness.open()
    assert again.get(again.client("g1"), pid, oid(2), 5) == random_page(5)


def test_restore_after_the_key_was_put_again_keeps_the_new_page(harness: Harness) -> None:
    engine = harness.open()
    a, pid, held = held_get(engine, 3, 0, random_page(0))
    assert engine.put(a, pid, oid(3), 0, random_page(9))
    engine.restore_held(held)
    assert engine.get(a, pid, oid(3), 0) == random_page(9)
    assert gstats(engine, "g1", "persistent")["pages"] == 0


@pytest.mark.parametrize("later", ["flush_page", "put_flush", "flush_object", "destroy"])
def test_a_held_page_the_guest_flushed_never_comes_back(harness: Harness, later: str) -> None:
    """GET, then PUT/FLUSH of the same key before the GET's reply is known delivered: neither a
    restore (channel lost) nor a restart may resurrect the old page, and it stops being charged."""
    engine = harness.open()
    a, pid, held = held_get(engine, 4, 0, random_page(1))
    if later == "flush_page":
        engine.flush_page(a, pid, oid(4), 0)
    elif later == "put_flush":
        assert engine.put(a, pid, oid(4), 0, random_page(2))
        engine.flush_page(a, pid, oid(4), 0)
    elif later == "flush_object":
        engine.flush_object(a, pid, oid(4))
    else:
        engine.destroy_pool(a, pid)
        pid = engine.new_pool(a, PERS_X)
    assert gstats(engine, "g1", "persistent")["pages"] == 0
    assert engine.arena.slots_in_use == 0  # freed (and marked free in the file) already
    engine.restore_held(held)  # the channel died before the reply left: nothing goes back
    assert engine.get(a, pid, oid(4), 0) is None
    assert gstats(engine, "g1", "persistent")["pages"] == 0
    again = harness.open()  # or the host agent was killed: no live copy of the key is rebuilt
    assert again.get(again.client("g1"), pid, oid(4), 0) is None
    assert again.rebuilt_pages == 0


# -- damage found at a restart ------------------------------------------------------------------


def slot_of(engine: PoolEngine, pid: int, client_: Client, key: bytes, index: int) -> int:
    """The arena offset of a stored page's slot."""
    ref: int = client_.pools[pid].objects[key][index]
    return ref >> REF_SHIFT


def test_a_torn_slot_generation_does_not_become_the_counter(harness: Harness) -> None:
    """A slot whose header kept its live state but got a garbage generation fails its checksum;
    its generation must not become the engine's (the next put would overflow the header)."""
    engine = harness.open()
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS)
    for k in range(4):
        assert engine.put(a, pid, oid(1), k, random_page(k))
    offset = slot_of(engine, pid, a, oid(1), 3)
    with open(harness.root / "arena", "r+b") as f:
        f.seek(offset + 8)  # the generation field
        f.write(b"\xff" * 8)
    again = harness.open()
    a2 = again.client("g1")
    assert (again.rebuilt_pages, again.rejected_slots) == (3, 1)
    assert again.put(a2, pid, oid(1), 3, random_page(9))
    assert again.put(again.client("g2"), again.new_pool(again.client("g2"), EPH), oid(1), 0, random_page(1))
    assert again.get(a2, pid, oid(1), 3) == random_page(9)


@pytest.mark.parametrize("damage", ["magic", "size class"])
def test_a_slab_with_a_damaged_header_never_brings_old_pages_back(harness: Harness, damage: str) -> None:
    """Its pages are lost (nothing in it can be trusted), and the slab is punched: reused later, its
    old slot headers must not look live at the next restart (flushed pages back, old copies winning)."""
    engine = harness.open()
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS)
    for k in range(10):
        assert engine.put(a, pid, oid(1), k, random_page(k))
    base = slot_of(engine, pid, a, oid(1), 0) >> 18 << 18
    with open(harness.root / "arena", "r+b") as f:
        f.seek(base if damage == "magic" else base + 4)
        f.write(b"\xde\xad\xbe\xef" if damage == "magic" else (1).to_bytes(4, "little"))
    second = harness.open()
    a2 = second.client("g1")
    assert second.rebuilt_pages == 0 and second.arena.damaged_slabs == 1
    for k in range(9):
        second.flush_page(a2, pid, oid(1), k)
    assert second.put(a2, pid, oid(1), 9, random_page(109))  # the slab is handed out again
    third = harness.open()
    a3 = third.client("g1")
    assert third.get(a3, pid, oid(1), 9) == random_page(109)
    assert [third.get(a3, pid, oid(1), k) for k in range(9)] == [None] * 9


def test_a_shared_pool_member_the_config_no_longer_authorises_loses_it(harness: Harness) -> None:
    engine = harness.open()
    a, pa, _, pb = shared_members(engine, SHARED_PERS, U1)
    assert engine.put(a, pa, oid(1), 0, random_page(1))
    narrowed = harness.open(acl={U1: ("g1",)})  # restarted with g2 taken off the pool's list
    with pytest.raises(UnknownPool):
        narrowed.get(narrowed.client("g2"), pb, oid(1), 0)
    assert narrowed.get(narrowed.client("g1"), pa, oid(1), 0) == random_page(1)
    nobody = harness.open(acl={})  # nobody may use it: the pool and its pages are gone
    with pytest.raises(UnknownPool):
        nobody.get(nobody.client("g1"), pa, oid(1), 0)
    assert nobody.arena.slots_in_use == 0


@pytest.mark.parametrize("table", ["garbage", "missing"])
def test_a_restart_without_a_usable_pool_table_refuses_and_keeps_the_pages(
    harness: Harness, table: str
) -> None:
    """The table names the owners of the persistent pages: without it they would all be dropped
    as unowned. Refuse to start instead, and lose nothing: with the table back, they are served."""
    engine = harness.open()
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS)
    assert engine.put(a, pid, oid(1), 0, random_page(1))
    path = harness.root / "pools.json"
    saved = path.read_bytes()
    if table == "garbage":
        path.write_bytes(b"{not json")
    else:
        path.unlink()
    with pytest.raises(TableError, match=r"pools\.json"):
        harness.open()
    path.write_bytes(saved)
    again = harness.open()
    assert again.get(again.client("g1"), pid, oid(1), 0) == random_page(1)


def test_a_shared_ephemeral_pool_is_bounded_by_the_shared_quota(harness: Harness) -> None:
    """Its pages are charged to the pool, not to a member's cap: the shared-pool quota bounds it,
    the pool's own oldest pages going first; a member's private pages are not touched."""
    engine = harness.open()
    engine.shared_quota_bytes = 8 * RAW
    a = client(engine, "g1", compress=False, cap_bytes=4 * RAW)
    own = engine.new_pool(a, EPH)
    for k in range(4):
        assert engine.put(a, own, oid(2), k, random_page(k))
    shared = engine.new_pool(a, SHARED, U1)
    for k in range(20):
        assert engine.put(a, shared, oid(1), k, random_page(100 + k))
    info = engine.stats()["shared"][U1.hex()]
    assert (info["pages"], info["bytes"], info["quota_bytes"]) == (8, 8 * RAW, 8 * RAW)
    assert [engine.get(a, shared, oid(1), k) is not None for k in range(20)] == [False] * 12 + [True] * 8
    assert [engine.get(a, own, oid(2), k) for k in range(4)] == [random_page(k) for k in range(4)]


def test_a_guest_cannot_pin_the_arena_with_one_page_per_slab(harness: Harness) -> None:
    """Persistent pages are never evicted, so a guest that keeps one page in every slab would hold
    the whole arena with a tiny quota. A put that finds no free slab compacts instead: the pinned
    pages move together (intact, and found again after a restart) and the slabs they left serve."""
    engine = harness.open(capacity=1 << 20)  # ~40 slabs; the budget is not what runs out
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS)
    n = 0
    while engine.put(a, pid, oid(1), n, random_page(n)):
        n += 1
    kept: dict[int, int] = {}  # slab -> the one key kept in it
    for k in range(n):
        slab = slot_of(engine, pid, a, oid(1), k) >> 18
        if slab in kept:
            engine.flush_page(a, pid, oid(1), k)
        else:
            kept[slab] = k
    assert len(kept) > 30 and gstats(engine, "g1", "persistent")["pages"] == len(kept)
    b = client(engine, "g2")
    eph = engine.new_pool(b, EPH)
    text = bytes(range(256)) * 16  # compresses: another size class, which needs a slab of its own
    assert engine.put(b, eph, oid(2), 0, text)
    assert engine.compactions >= 1
    assert engine.get(b, eph, oid(2), 0) == text
    assert {engine.get(a, pid, oid(1), k) == random_page(k) for k in kept.values()} == {True}
    # together in at most two slabs (a class's newest slab is never emptied)
    assert len({slot_of(engine, pid, a, oid(1), k) >> 18 for k in kept.values()}) <= 2
    again = harness.open(capacity=1 << 20)
    a2 = again.client("g1")
    assert again.rebuilt_pages == len(kept)
    assert {again.get(a2, pid, oid(1), k) == random_page(k) for k in kept.values()} == {True}


@pytest.mark.parametrize("old_channel", ["released", "restored"])
def test_a_hold_is_told_from_a_later_hold_of_the_key_in_the_same_slot(
    harness: Harness, old_channel: str
) -> None:
    """GET K (hold A), PUT K (drops A, and takes A's freed slot back), GET K again on a new
    connection (hold B: the same slot ref). Whatever A's old channel does when it ends, B's
    page must neither be freed nor put back by it."""
    engine = harness.open()
    a = client(engine, "g1", compress=False)
    pid = engine.new_pool(a, PERS_X)
    assert engine.put(a, pid, oid(5), 0, random_page(1))
    old: list[Any] = []
    new: list[Any] = []
    assert engine.get(a, pid, oid(5), 0, old) == random_page(1)
    assert engine.put(a, pid, oid(5), 0, random_page(2))
    assert engine.get(a, pid, oid(5), 0, new) == random_page(2)
    assert old[0][3] == new[0][3]  # the same slot ref: only the hold id tells them apart
    if old_channel == "released":
        engine.release_held(old)
    else:
        engine.restore_held(old)
    assert engine.get(a, pid, oid(5), 0) is None  # B's page was not put back
    assert gstats(engine, "g1", "persistent")["pages"] == 1  # nor freed: B still holds it
    engine.restore_held(new)  # B's channel dies before delivering: the page is there again
    assert engine.get(a, pid, oid(5), 0) == random_page(2)
