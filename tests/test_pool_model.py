"""Stateful property test: the pool engine against a small reference model of the tmem contract.

Why a model: the contract (exclusive vs non-exclusive gets, refused puts flushing the older copy,
shared pools joined by UUID, disconnect keeping persistent pools) has many interacting rules; random
operation sequences over a tiny key space find the combinations hand-written tests miss.

Two variants share the machine: a roomy budget where every answer is exact, and a tight
limit/quota/cap where evictions and refusals happen and ephemeral answers may be "None or the latest
value". Both check accounting invariants after every step.
"""

from __future__ import annotations

import random
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag
from hostagent.arena import SLOT_SIZES, Arena
from hostagent.pool import ClientSettings, PoolDenied, PoolEngine, UnknownPool

NAMES = ("g1", "g2", "g3")
PERS = int(PoolFlag.PERSISTENT)
OIDS = (bytes(24), bytes(range(24)))
INDEXES = (0, 1, 2**32 - 1)
MAX_POOLS = 5  # per client; far below any sane per-client pool limit

# Shared pool UUIDs with one fixed flag set each, so a join never has to guess whose flags win.
U_EPH = b"E" * 16
U_PERS = b"P" * 16
U_PERS_X = b"X" * 16
U_G1_ONLY = b"1" * 16
U_NOBODY = b"N" * 16
SHARED_FLAGS = {
    U_EPH: PoolFlag.SHARED,
    U_PERS: PoolFlag.SHARED | PoolFlag.PERSISTENT,
    U_PERS_X: PoolFlag.SHARED | PoolFlag.PERSISTENT | PoolFlag.EXCLUSIVE_GETS,
    U_G1_ONLY: PoolFlag.SHARED,
}
ACL: dict[bytes, tuple[str, ...]] = {
    U_EPH: ("g1", "g2", "g3"),
    U_PERS: ("g1", "g2"),
    U_PERS_X: ("g2", "g3"),
    U_G1_ONLY: ("g1",),
    U_NOBODY: (),
}
ALL_UUIDS = (U_EPH, U_PERS, U_PERS_X, U_G1_ONLY, U_NOBODY)

# A raw 4 KiB page occupies one slot of about this size; budgets below are counted in such slots.
SLOT = PAGE_SIZE + 64
RAW_SLOT = SLOT_SIZES[-1]

_TEXT = (
    "the page cache kernel guest host memory pool swap file object index flush put get "
    "return value error lock thread queue buffer write read offset length struct self def "
    "import class for while if else None True False and or not in is with as yield"
)
WORDS = tuple(_TEXT.split(" "))


def make_page(kind: str, seed: int) -> bytes:
    """A deterministic 4 KiB page of one of the kinds the engine encodes differently."""
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "same":
        word = struct.pack("<Q", 0x0101010101010101 * (seed % 255 + 1) ^ seed)
        return word * (PAGE_SIZE // 8)
    rnd = random.Random(seed)
    if kind == "random":
        return rnd.randbytes(PAGE_SIZE)
    out: list[str] = []
    size = 0
    while size < PAGE_SIZE:
        w = rnd.choice(WORDS) + rnd.choice((" ", " ", " ", "\n", "_", "(", ", "))
        out.append(w)
        size += len(w)
    return "".join(out).encode()[:PAGE_SIZE]


page_specs = st.tuples(st.sampled_from(("random", "zero", "same", "text")), st.integers(0, 5))
keys = st.tuples(st.sampled_from(OIDS), st.sampled_from(INDEXES))


@dataclass(eq=False)
class MPool:
    """The model of one pool: its flags and the pages that may (or must) be readable."""

    flags: int
    uuid: bytes | None = None
    pages: dict[tuple[bytes, int], bytes] = field(default_factory=dict)
    members: set[str] = field(default_factory=set)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & PoolFlag.PERSISTENT)

    @property
    def exclusive(self) -> bool:
        """Whether a get consumes the page (private ephemeral always; persistent by flag)."""
        if self.persistent:
            return bool(self.flags & PoolFlag.EXCLUSIVE_GETS)
        return self.uuid is None


def kind_of(pool: MPool) -> str:
    return "persistent" if pool.persistent else "ephemeral"


class PoolModel(RuleBasedStateMachine):
    """Engine vs model. Subclasses choose the budget (`TIGHT`)."""

    TIGHT = False

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="tmem-model-", dir="/dev/shm"))
        if self.TIGHT:
            self.limit = 10 * SLOT
            specs = {
                "g1": ClientSettings(weight=1, cap_bytes=3 * SLOT, quota_bytes=3 * SLOT),
                "g2": ClientSettings(weight=2, cap_bytes=0, quota_bytes=5 * SLOT, compress=False),
                "g3": ClientSettings(weight=1, cap_bytes=2 * SLOT, quota_bytes=2 * SLOT),
            }
        else:
            self.limit = 64 << 20
            specs = {
                "g1": ClientSettings(weight=1, quota_bytes=64 << 20),
                "g2": ClientSettings(weight=2, quota_bytes=64 << 20, compress=False),
                "g3": ClientSettings(weight=1, quota_bytes=64 << 20),
            }
        try:
            self.arena = Arena(self.tmp / "arena", capacity_bytes=max(self.limit, 16 << 20))
            self.engine = PoolEngine(self.arena, limit_bytes=self.limit, shared_acl=ACL)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)  # teardown() never runs for this example
            raise
        self.settings = specs
        for name in NAMES:
            self.engine.client(name, specs[name])
        self.pools: dict[str, dict[int, MPool]] = {name: {} for name in NAMES}
        self.shared: dict[bytes, MPool] = {}
        # (client, kind) -> [gets, hits]
        self.counts: dict[tuple[str, str], list[int]] = {
            (n, k): [0, 0] for n in NAMES for k in ("ephemeral", "persistent")
        }

    def teardown(self) -> None:
        try:
            self.engine.close()
        finally:
            self.arena.close()
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------

    def pick(self, name: str, choice: int) -> tuple[int, MPool] | None:
        owned = sorted(self.pools[name].items())
        if not owned:
            return None
        return owned[choice % len(owned)]

    def leave(self, name: str, pid: int) -> None:
        pool = self.pools[name].pop(pid)
        if pool.uuid is not None:
            pool.members.discard(name)
            if not pool.members:
                del self.shared[pool.uuid]

    def distinct_pools(self) -> list[MPool]:
        seen: dict[int, MPool] = {}
        for owned in self.pools.values():
            for pool in owned.values():
                seen[id(pool)] = pool
        return list(seen.values())

    # -- pool lifecycle ---------------------------------------------------------------------------

    @initialize(exclusive=st.booleans())
    def some_pools(self, exclusive: bool) -> None:
        """Start with every pool type in use, so page rules have somewhere to go from step one."""
        for name in NAMES:
            self.new_private(name, persistent=False, exclusive=False)
            self.new_private(name, persistent=True, exclusive=exclusive)
        self.join_shared("g1", U_EPH)
        self.join_shared("g2", U_EPH)
        self.join_shared("g2", U_PERS)

    @rule(who=st.sampled_from(NAMES), persistent=st.booleans(), exclusive=st.booleans())
    def new_private(self, who: str, persistent: bool, exclusive: bool) -> None:
        if len(self.pools[who]) >= MAX_POOLS:
            return
        flags = PoolFlag(0)
        if persistent:
            flags |= PoolFlag.PERSISTENT
            if exclusive:
                flags |= PoolFlag.EXCLUSIVE_GETS
        pid = self.engine.new_pool(self.engine.client(who), int(flags))
        assert pid >= 1
        assert pid not in self.pools[who], f"pool id {pid} handed out twice to {who}"
        self.pools[who][pid] = MPool(int(flags))

    @rule(who=st.sampled_from(NAMES), uuid=st.sampled_from(ALL_UUIDS))
    def join_shared(self, who: str, uuid: bytes) -> None:
        if len(self.pools[who]) >= MAX_POOLS:
            return
        client = self.engine.client(who)
        if who not in ACL[uuid]:
            before = self.engine.owned_pools(client)
            flags = SHARED_FLAGS.get(uuid, PoolFlag.SHARED)
            with pytest.raises(PoolDenied):
                self.engine.new_pool(client, int(flags), uuid)
            assert self.engine.owned_pools(client) == before, "denied join left a pool behind"
            event("shared join denied")
            return
        pool = self.shared.get(uuid)
        if pool is not None and who in pool.members:
            return  # joining twice is not part of the contract
        flags = SHARED_FLAGS[uuid]
        pid = self.engine.new_pool(client, int(flags), uuid)
        assert pid >= 1
        assert pid not in self.pools[who]
        if pool is None:
            pool = self.shared[uuid] = MPool(int(flags), uuid=uuid)
        pool.members.add(who)
        self.pools[who][pid] = pool

    @rule(who=st.sampled_from(NAMES), uuid=st.sampled_from((U_EPH, U_PERS, U_PERS_X)))
    def join_shared_wrong_persistence(self, who: str, uuid: bytes) -> None:
        """Joining an existing shared pool with the other PERSISTENT flag is refused."""
        pool = self.shared.get(uuid)
        if pool is None or who not in ACL[uuid] or who in pool.members:
            return
        client = self.engine.client(who)
        before = self.engine.owned_pools(client)
        with pytest.raises(PoolDenied):
            self.engine.new_pool(client, int(SHARED_FLAGS[uuid] ^ PoolFlag.PERSISTENT), uuid)
        assert self.engine.owned_pools(client) == before
        event("shared join with other persistence denied")

    @rule(who=st.sampled_from(NAMES), choice=st.integers(0, MAX_POOLS - 1))
    def destroy_pool(self, who: str, choice: int) -> None:
        picked = self.pick(who, choice)
        if picked is None:
            return
        pid, _ = picked
        self.engine.destroy_pool(self.engine.client(who), pid)
        self.leave(who, pid)

    @rule(who=st.sampled_from(NAMES))
    def disconnect(self, who: str) -> None:
        self.engine.disconnect(self.engine.client(who))
        for pid, pool in list(self.pools[who].items()):
            if not pool.persistent:
                self.leave(who, pid)

    @rule(who=st.sampled_from(NAMES), on=st.booleans())
    def set_compress(self, who: str, on: bool) -> None:
        self.engine.configure(who, compress=on)

    @rule(
        who=st.sampled_from(NAMES),
        pid=st.integers(1, 12),
        op=st.sampled_from(("put", "get", "flush_page", "flush_object", "destroy")),
    )
    def unknown_pool(self, who: str, pid: int, op: str) -> None:
        """A pool id this client does not own (never had, destroyed, or another client's)."""
        if pid in self.pools[who]:
            return
        client = self.engine.client(who)
        assert self.engine.pool_flags(client, pid) is None
        oid = OIDS[1]
        with pytest.raises(UnknownPool):
            if op == "put":
                self.engine.put(client, pid, oid, 0, bytes(PAGE_SIZE))
            elif op == "get":
                self.engine.get(client, pid, oid, 0)
            elif op == "flush_page":
                self.engine.flush_page(client, pid, oid, 0)
            elif op == "flush_object":
                self.engine.flush_object(client, pid, oid)
            else:
                self.engine.destroy_pool(client, pid)

    # -- page operations --------------------------------------------------------------------------

    def do_put(self, who: str, choice: int, key: tuple[bytes, int], spec: tuple[str, int]) -> None:
        picked = self.pick(who, choice)
        if picked is None:
            return
        pid, pool = picked
        page = make_page(*spec)
        before = dict(self.engine.stats()) if self.TIGHT else None
        stored = self.engine.put(self.engine.client(who), pid, key[0], key[1], page)
        assert stored in (True, False)
        if not self.TIGHT:
            assert stored, f"put refused with a roomy budget: {who} pool {pid} {spec}"
        elif not stored:
            assert before is not None
            self.check_refusal(before, who, pool, spec)
        event(f"put {kind_of(pool)} {'stored' if stored else 'refused'}")
        if stored:
            pool.pages[key] = page
        else:
            pool.pages.pop(key, None)

    def check_refusal(self, before: dict[str, Any], who: str, pool: MPool, spec: tuple[str, int]) -> None:
        """A refused put must have a reason: no room even with every ephemeral page evicted, or
        the quota. Judged with the largest slot (RAW), so only refusals that cannot be right fail."""
        st_pool = before["pool"]
        eph_bytes = sum(g["ephemeral"]["bytes"] for g in before["guests"].values()) + sum(
            e["bytes"] for e in before.get("shared", {}).values() if not e["kind"].endswith("persistent")
        )
        budget_full = st_pool["used_bytes"] - eph_bytes + RAW_SLOT > st_pool["budget_bytes"]
        if pool.persistent and pool.uuid is None:
            quota_full = (
                before["guests"][who]["persistent"]["bytes"] + RAW_SLOT > self.settings[who].quota_bytes
            )
            assert budget_full or quota_full, f"persistent put refused without reason: {spec}"
        else:
            assert budget_full, f"{kind_of(pool)} put refused though ephemeral pages could go: {spec}"
        event(f"put {kind_of(pool)} refused (justified)")

    @rule(who=st.sampled_from(NAMES), choice=st.integers(0, MAX_POOLS - 1), key=keys, spec=page_specs)
    def put(self, who: str, choice: int, key: tuple[bytes, int], spec: tuple[str, int]) -> None:
        self.do_put(who, choice, key, spec)

    @rule(
        who=st.sampled_from(NAMES),
        choice=st.integers(0, MAX_POOLS - 1),
        items=st.lists(st.tuples(keys, page_specs), min_size=2, max_size=5),
    )
    def put_burst(
        self, who: str, choice: int, items: list[tuple[tuple[bytes, int], tuple[str, int]]]
    ) -> None:
        """Several puts in a row to one pool: fills caps, quotas and the budget."""
        for key, spec in items:
            self.do_put(who, choice, key, spec)

    @rule(who=st.sampled_from(NAMES), choice=st.integers(0, MAX_POOLS - 1), key=keys)
    def get(self, who: str, choice: int, key: tuple[bytes, int]) -> None:
        picked = self.pick(who, choice)
        if picked is not None:
            self.do_get(who, picked[0], picked[1], key)

    @rule(who=st.sampled_from(NAMES), choice=st.integers(0, MAX_POOLS - 1), n=st.integers(0, 5))
    def get_stored(self, who: str, choice: int, n: int) -> None:
        """A get of a key the model holds a page for: where eviction and exclusivity show."""
        picked = self.pick(who, choice)
        if picked is not None and picked[1].pages:
            stored = sorted(picked[1].pages)
            self.do_get(who, picked[0], picked[1], stored[n % len(stored)])

    def do_get(self, who: str, pid: int, pool: MPool, key: tuple[bytes, int]) -> None:
        got = self.engine.get(self.engine.client(who), pid, key[0], key[1])
        expected = pool.pages.get(key)
        exact = pool.persistent or not self.TIGHT
        if got is not None:
            assert isinstance(got, bytes)
            assert len(got) == PAGE_SIZE
        if exact:
            assert got == expected, (
                f"{who} pool {pid} flags {pool.flags} key {key[1]}: "
                f"{'None' if got is None else 'a page'} != "
                f"{'None' if expected is None else 'expected page'}"
                f"{' (wrong contents)' if got is not None and expected is not None else ''}"
            )
        else:
            assert got is None or got == expected, "ephemeral get returned a stale/other page"
        event(
            f"get {kind_of(pool)} {'hit' if got is not None else 'miss'}"
            f"{' (evicted)' if got is None and expected is not None else ''}"
        )
        if got is None:
            pool.pages.pop(key, None)  # once None, the page is gone for good
        elif pool.exclusive:
            del pool.pages[key]
        counter = self.counts[(who, kind_of(pool))]
        counter[0] += 1
        counter[1] += got is not None

    @rule(who=st.sampled_from(NAMES), choice=st.integers(0, MAX_POOLS - 1), key=keys)
    def flush_page(self, who: str, choice: int, key: tuple[bytes, int]) -> None:
        picked = self.pick(who, choice)
        if picked is None:
            return
        pid, pool = picked
        self.engine.flush_page(self.engine.client(who), pid, key[0], key[1])
        pool.pages.pop(key, None)

    @rule(who=st.sampled_from(NAMES), choice=st.integers(0, MAX_POOLS - 1), oid=st.sampled_from(OIDS))
    def flush_object(self, who: str, choice: int, oid: bytes) -> None:
        picked = self.pick(who, choice)
        if picked is None:
            return
        pid, pool = picked
        self.engine.flush_object(self.engine.client(who), pid, oid)
        for key in [k for k in pool.pages if k[0] == oid]:
            del pool.pages[key]

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def pools_match(self) -> None:
        for name in NAMES:
            owned = self.engine.owned_pools(self.engine.client(name))
            expected = {pid: pool.flags for pid, pool in self.pools[name].items()}
            assert {pid: int(f) for pid, f in owned.items()} == expected, name
            for pid, flags in expected.items():
                got = self.engine.pool_flags(self.engine.client(name), pid)
                assert got is not None and int(got) == flags

    @invariant()
    def accounting(self) -> None:
        """Stats agree with the model; caps, quotas and the budget hold.

        Private pools are charged to their guest, shared pools to themselves ("shared" by uuid).
        """
        stats: dict[str, Any] = dict(self.engine.stats())
        pool = stats["pool"]
        if pool["evictions"]:
            event("evictions happened")
        pools = self.distinct_pools()
        pers_total = sum(len(p.pages) for p in pools if p.persistent)
        eph_total = sum(len(p.pages) for p in pools if not p.persistent)

        assert pool["persistent_pages"] == pers_total
        if self.TIGHT:
            assert 0 <= pool["ephemeral_pages"] <= eph_total
        else:
            assert pool["ephemeral_pages"] == eph_total
            assert pool["evictions"] == 0
        assert pool["pages"] == pool["ephemeral_pages"] + pool["persistent_pages"]
        assert pool["limit_bytes"] == self.limit
        assert 0 <= pool["used_bytes"] <= pool["budget_bytes"] <= self.limit
        assert pool["raw_bytes"] == pool["pages"] * PAGE_SIZE

        used = 0
        sums = {"ephemeral": 0, "persistent": 0}

        def check(where: str, counters: dict[str, Any], mpools: list[MPool]) -> None:
            nonlocal used
            held = sum(len(p.pages) for p in mpools)
            if (mpools and mpools[0].persistent) or not self.TIGHT:
                assert counters["pages"] == held, where
            else:
                assert counters["pages"] <= held, where
            assert counters["raw_bytes"] == counters["pages"] * PAGE_SIZE, where
            assert counters["bytes"] >= counters["pages"] * 64, where  # smallest slot
            used += counters["bytes"]

        shared = stats.get("shared", {})
        assert set(shared) == {uuid.hex() for uuid in self.shared}
        for uuid, mpool in self.shared.items():
            entry = shared[uuid.hex()]
            assert sorted(entry["members"]) == sorted(mpool.members)
            check(f"shared {uuid!r}", entry, [mpool])
            sums[kind_of(mpool)] += entry["pages"]
            if not self.TIGHT:
                assert entry["evicted"] == 0

        guests = stats["guests"]
        assert set(NAMES) <= set(guests)
        for name in NAMES:
            g = guests[name]
            s = self.settings[name]
            private = [p for p in self.pools[name].values() if p.uuid is None]
            for kind in ("ephemeral", "persistent"):
                mine = [p for p in private if kind_of(p) == kind]
                # an empty list still checks "no pages": give check() the kind to judge exactness
                check(f"{name} {kind}", g[kind], mine or [MPool(PERS if kind == "persistent" else 0)])
                sums[kind] += g[kind]["pages"]
                gets, hits = self.counts[(name, kind)]
                assert g[kind]["gets"] == gets, (name, kind)
                assert g[kind]["hits"] == hits, (name, kind)
            assert g["persistent"]["evicted"] == 0, name
            if not self.TIGHT:
                assert g["ephemeral"]["evicted"] == 0, name
            assert g["persistent"]["bytes"] <= s.quota_bytes, name
            if s.cap_bytes:
                assert g["ephemeral"]["bytes"] <= s.cap_bytes, name
        assert sums["persistent"] == pool["persistent_pages"]
        assert sums["ephemeral"] == pool["ephemeral_pages"]
        assert used == pool["used_bytes"], "guest and shared-pool bytes do not add up to used bytes"


class RoomyPoolModel(PoolModel):
    TIGHT = False


class TightPoolModel(PoolModel):
    TIGHT = True


_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

TestRoomyPoolModel = RoomyPoolModel.TestCase
TestRoomyPoolModel.settings = _SETTINGS
TestTightPoolModel = TightPoolModel.TestCase
TestTightPoolModel.settings = _SETTINGS
