"""The tmem pool engine: clients, pools, pages, eviction, quotas and the budget.

Pure logic over the arena: no sockets, no clocks, no libvirt, so tests drive it directly and the host
agent calls it from one event loop. The contract it implements is DESIGN.md section 3:

- put overwrites or refuses; a refused put leaves no older copy readable;
- gets are exclusive on private ephemeral pools and on persistent pools created with EXCLUSIVE_GETS;
- flushes and destroys always succeed;
- ephemeral pages may vanish (eviction), persistent pages never do and survive a host-agent restart.

Index layout, chosen for memory (<= 128 bytes of Python heap per stored page) and speed: each pool maps
object id -> {index: slot reference} (arena offset, length and encoding in one int, so a get reads no
header). The key of a slot is stored in the slot itself, so eviction needs no reverse map. Ephemeral
pools keep an insertion log of offset << 24 | generation (low 24 bits) in an `array`; an entry is stale
when its slot's generation changed or the index no longer points at the slot, so gets and flushes never
search the log.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag

from . import compress
from .arena import (
    CLASS_FOR_LENGTH,
    FLAG_XXH3,
    MAX_COMPRESSED,
    REF_SHIFT,
    SLOT_SIZES,
    Arena,
    ArenaFull,
    checksum,
)
from .poolstats import CounterStats, EngineStats, PoolInfo, SharedPoolStats
from .pooltable import PoolRecord, PoolTable, TableError

NO_UUID: Final = bytes(16)
_LOG_SHIFT: Final = 24
_REF_LOW: Final = (1 << REF_SHIFT) - 1  # a slot reference's length and encoding bits
_LOG_GEN: Final = (1 << _LOG_SHIFT) - 1
_FRESH_BATCH: Final = 256
_POOL_FLAGS: Final = int(PoolFlag.PERSISTENT | PoolFlag.SHARED | PoolFlag.EXCLUSIVE_GETS)


log = logging.getLogger("hostagent.pool")

MAX_POOLS_PER_CLIENT: Final = 1024


class EngineError(Exception):
    """Base of the engine's errors."""


class UnknownPool(EngineError):
    """The client does not own this pool id: for a channel, a protocol error."""


class PoolDenied(EngineError):
    """A shared pool the client is not authorised for: never a silent private pool."""


class OutOfSpace(EngineError):
    """The client has reached its limit of pools."""


@dataclass
class ClientSettings:
    """Per-guest policy, all changeable at run time (`hostagent set`)."""

    weight: int = 1
    cap_bytes: int = 0  # ephemeral arena bytes; 0 = no cap
    quota_bytes: int = 256 << 20  # persistent arena bytes
    compress: bool = True


class Counters:
    """Per client and pool type: operations by the client, storage charged to it."""

    __slots__ = ("evicted", "flushes", "gets", "hits", "pages", "puts", "puts_refused", "stored")

    def __init__(self) -> None:
        self.puts = 0
        self.puts_refused = 0
        self.gets = 0
        self.hits = 0
        self.flushes = 0
        self.evicted = 0
        self.pages = 0
        self.stored = 0  # arena bytes

    def as_dict(self) -> CounterStats:
        return {
            "puts": self.puts,
            "puts_refused": self.puts_refused,
            "gets": self.gets,
            "hits": self.hits,
            "flushes": self.flushes,
            "evicted": self.evicted,
            "pages": self.pages,
            "bytes": self.stored,
            "raw_bytes": self.pages * PAGE_SIZE,
        }


class Client:
    """One guest, known by name (the channel it arrives on decides which)."""

    def __init__(self, name: str, settings: ClientSettings) -> None:
        self.name = name
        self.settings = settings
        self.pools: dict[int, Pool] = {}
        self.next_pool_id = 1
        self.eph = Counters()
        self.pers = Counters()


class Pool:
    """A tmem pool.

    A private pool's pages are charged to its owner (its cap and quota apply). A shared pool's pages are
    charged to the pool itself, bounded by the shared-pool quota and the global LRU: no member can be
    pushed over its own limits by what other members put, or by a member leaving.
    """

    __slots__ = (
        "charged",
        "exclusive",
        "flags",
        "fresh",
        "handle",
        "held",
        "log",
        "log_head",
        "members",
        "objects",
        "owner",
        "persistent",
        "shared",
        "storage",
        "uuid",
    )

    def __init__(self, handle: int, flags: int, uuid: bytes, owner: Client) -> None:
        self.handle = handle
        self.flags = flags
        self.persistent = bool(flags & PoolFlag.PERSISTENT)
        self.shared = bool(flags & PoolFlag.SHARED)
        # Private ephemeral gets are always exclusive (a victim cache); persistent ones on request.
        self.exclusive = (not self.persistent and not self.shared) or bool(flags & PoolFlag.EXCLUSIVE_GETS)
        self.uuid = uuid
        self.owner = owner  # creator, or the longest remaining member: its compress switch applies
        self.charged: Client | None = None if self.shared else owner
        self.storage = Counters() if self.shared else owner.pers if self.persistent else owner.eph
        self.members: dict[str, int] = {}  # client name -> that client's id for this pool
        self.objects: dict[bytes, dict[int, int]] = {}
        # Pages got exclusively whose replies are not yet known delivered (see PoolEngine.get): out
        # of `objects`, slots still live. A later put or flush of the key drops the held copy.
        # oid -> index -> (slot ref, hold id)
        self.held: dict[bytes, dict[int, tuple[int, int]]] = {}
        self.log = array("Q")  # ephemeral only: offset << 24 | generation & 0xFFFFFF, oldest first
        # The youngest entries, moved into `log` in batches: a list append is a native op in the
        # compiled engine, an array append a method call (about a tenth of a raw put).
        self.fresh: list[int] = []
        self.log_head = 0

    def remember(self, entry: int) -> None:
        """Log a page as the pool's youngest (ephemeral pools' LRU)."""
        fresh = self.fresh
        fresh.append(entry)
        if len(fresh) >= _FRESH_BATCH:
            self.settle_log()

    def settle_log(self) -> None:
        """Move the young entries into `log`, after everything there (they are younger)."""
        self.log.fromlist(self.fresh)
        self.fresh.clear()

    @property
    def kind(self) -> str:
        return ("shared-" if self.shared else "private-") + ("persistent" if self.persistent else "ephemeral")


class Held(NamedTuple):
    """An exclusive persistent get whose reply is not yet known delivered.

    `hold`, unique per get, tells this hold from a later one of the same key: a slot ref comes
    back when the slot is reused, so it cannot.
    """

    pool: Pool
    oid: bytes
    index: int  # type: ignore[assignment]  # shadows tuple.index; the key's name
    ref: int  # the slot
    hold: int  # the hold's id


class PoolEngine:
    """All pools of all guests over one arena."""

    def __init__(
        self,
        arena: Arena,
        *,
        limit_bytes: int,
        host_reserve_bytes: int = 0,
        shared_acl: Mapping[bytes, Collection[str]] | None = None,
        shared_quota_bytes: int = 256 << 20,
    ) -> None:
        self.arena = arena
        self.shared_quota_bytes = shared_quota_bytes
        self.limit_bytes = limit_bytes
        self.host_reserve_bytes = host_reserve_bytes
        self.shared_acl: dict[bytes, frozenset[str]] = {
            bytes(k): frozenset(v) for k, v in (shared_acl or {}).items()
        }
        self.host_available: int | None = None
        self._host_budget: int | None = None
        self._budget = limit_bytes
        self._clients: dict[str, Client] = {}
        self._pools: dict[int, Pool] = {}  # by handle
        self._shared: dict[bytes, Pool] = {}
        self._next_handle = 1
        self._generation = 0
        self.evictions = 0
        self._holds = 0  # hold ids handed out (see Held)
        self.compactions = 0  # times a put found no free slab and compacted a size class
        self.eph_bytes = 0
        self._table = PoolTable(Path(arena.path).parent)
        self.rebuilt_pages = 0
        self.rejected_slots = 0
        self._rebuild()

    # -- clients ----------------------------------------------------------------------------------

    def client(self, name: str, settings: ClientSettings | None = None) -> Client:
        """The client for guest `name`, created on first use; `settings` replace its policy."""
        c = self._clients.get(name)
        if c is None:
            c = self._clients[name] = Client(name, settings or ClientSettings())
        elif settings is not None:
            c.settings = settings
        return c

    def configure(
        self,
        name: str,
        *,
        weight: int | None = None,
        cap_bytes: int | None = None,
        quota_bytes: int | None = None,
        compress: bool | None = None,
    ) -> Client:
        c = self.client(name)
        s = c.settings
        if weight is not None:
            if weight < 1:
                raise ValueError("weight must be >= 1")
            s.weight = weight
        if cap_bytes is not None:
            if cap_bytes < 0:
                raise ValueError("cap must be >= 0")
            s.cap_bytes = cap_bytes
            self._enforce_cap(c)
        if quota_bytes is not None:
            if quota_bytes < 0:
                raise ValueError("quota must be >= 0")
            s.quota_bytes = quota_bytes
        if compress is not None:
            s.compress = compress
        return c

    def clients(self) -> Iterable[Client]:
        return self._clients.values()

    # -- pools ------------------------------------------------------------------------------------

    def new_pool(self, client: Client, flags: int, uuid: bytes = NO_UUID, pool_id: int | None = None) -> int:
        """A new pool's id. A private pool may be given `pool_id` outside the wire's u32 range (the
        host's own pools, such as the swap device's): the guest's channel can then never name it."""
        flags &= _POOL_FLAGS
        if pool_id is not None and (
            flags & PoolFlag.SHARED or pool_id in client.pools or 0 <= pool_id < 1 << 32
        ):
            raise ValueError(f"pool id {pool_id} is taken, or in the guest's range")
        if len(client.pools) >= MAX_POOLS_PER_CLIENT:
            raise OutOfSpace(f"{client.name} has {MAX_POOLS_PER_CLIENT} pools")
        if flags & PoolFlag.SHARED:
            uuid = bytes(uuid)
            if uuid == NO_UUID or client.name not in self.shared_acl.get(uuid, ()):
                raise PoolDenied(f"{client.name} is not authorised for shared pool {uuid.hex()}")
            pool = self._shared.get(uuid)
            if pool is not None and pool.flags != flags:
                raise PoolDenied(f"shared pool {uuid.hex()} exists with other flags")
            if pool is not None and client.name in pool.members:
                return pool.members[client.name]
        else:
            uuid, pool = NO_UUID, None
        if pool_id is None:
            pool_id = client.next_pool_id
            client.next_pool_id += 1
        if pool is None:
            pool = Pool(self._next_handle, flags, uuid, client)
            self._next_handle += 1
            self._pools[pool.handle] = pool
            if pool.shared:
                self._shared[uuid] = pool
        pool.members[client.name] = pool_id
        client.pools[pool_id] = pool
        if pool.persistent:
            self._table.set(self._record(pool), self._next_handle, {client.name: client.next_pool_id})
        return pool_id

    def pool_flags(self, client: Client, pool_id: int) -> int | None:
        pool = client.pools.get(pool_id)
        return None if pool is None else pool.flags

    def owned_pools(self, client: Client) -> dict[int, int]:
        return {pid: pool.flags for pid, pool in client.pools.items()}

    def destroy_pool(self, client: Client, pool_id: int) -> None:
        """Destroy a private pool, or leave a shared one (its pages live while members remain)."""
        pool = self._pool(client, pool_id)
        del client.pools[pool_id]
        del pool.members[client.name]
        if pool.members:
            if pool.owner is client:
                pool.owner = self._clients[next(iter(pool.members))]
        else:
            self._drop_pool(pool)
        if pool.persistent:
            ids = {client.name: client.next_pool_id}
            if pool.members:
                self._table.set(self._record(pool), self._next_handle, ids)
            else:
                self._table.drop(pool.handle, self._next_handle, ids)

    def _drop_pool(self, pool: Pool) -> None:
        free = self.arena.free
        storage = pool.storage
        mark = pool.persistent
        refs = [ref for pages in pool.objects.values() for ref in pages.values()]
        refs += [ref for pages in pool.held.values() for ref, _ in pages.values()]
        for ref in refs:
            size = free(ref, mark)
            storage.pages -= 1
            storage.stored -= size
            if not pool.persistent:
                self.eph_bytes -= size
        pool.objects.clear()
        pool.held.clear()
        del pool.log[:]
        pool.fresh.clear()
        pool.log_head = 0
        self._pools.pop(pool.handle, None)
        if pool.shared:
            self._shared.pop(pool.uuid, None)

    def _pool(self, client: Client, pool_id: int) -> Pool:
        pool = client.pools.get(pool_id)
        if pool is None:
            raise UnknownPool(f"pool {pool_id} is not owned by {client.name}")
        return pool

    # -- pages ------------------------------------------------------------------------------------

    def put(  # noqa: C901 (the hot path (mypyc): split only with bench pool)
        self,
        client: Client,
        pool_id: int,
        oid: bytes,
        index: int,
        page: bytes | bytearray | memoryview,
    ) -> bool:
        """Store a page (True) or refuse it (False, and no older copy stays readable)."""
        pool = client.pools.get(pool_id)
        if pool is None:
            raise UnknownPool(f"pool {pool_id} is not owned by {client.name}")
        # A name typed bytes (not the parameter's union) lets the compiled code index it natively.
        raw: bytes = page if type(page) is bytes else bytes(page)
        if len(raw) != PAGE_SIZE:
            raise ValueError(f"a page is {PAGE_SIZE} bytes, not {len(raw)}")
        persistent = pool.persistent
        (client.pers if persistent else client.eph).puts += 1
        if pool.held:
            self._drop_held(pool, oid, index)
        objects = pool.objects
        pages = objects.get(oid)
        if pages is not None:
            old = pages.get(index)  # get + del: no method lookup, unlike pop(index, None)
            if old is not None:
                del pages[index]
                self._forget(pool, old)
                if not pages:
                    del objects[oid]
                    pages = None
        word = compress.fill_word(raw)
        if word is not None:
            encoding, data = compress.FILL, word
        elif pool.owner.settings.compress:
            encoding, data = compress.pack(raw, MAX_COMPRESSED)
        else:
            encoding, data = compress.RAW, raw
        size_class = CLASS_FOR_LENGTH[len(data)]
        size = SLOT_SIZES[size_class]
        storage = pool.storage
        arena = self.arena
        charged = pool.charged
        if persistent:
            quota = self.shared_quota_bytes if charged is None else charged.settings.quota_bytes
            if storage.stored + size > quota:
                return self._refuse(client, persistent)
        elif charged is not None and charged.settings.cap_bytes:
            cap = charged.settings.cap_bytes
            while storage.stored + size > cap:
                if not self._evict_lru(charged):
                    return self._refuse(client, persistent)
                pages = objects.get(oid)
        elif charged is None:  # shared ephemeral: the shared-pool quota, the pool's own LRU first
            while storage.stored + size > self.shared_quota_bytes:
                oldest = self._oldest(pool)
                if oldest is None:
                    return self._refuse(client, persistent)
                self._evict(pool, oldest[1], oldest[2], oldest[3])
                pages = objects.get(oid)
        if arena.used_bytes + size > self._budget:
            while arena.used_bytes + size > self._budget:
                if not self._evict_one():
                    return self._refuse(client, persistent)
            pages = objects.get(oid)
        self._generation = generation = self._generation + 1
        handle = pool.handle
        try:
            if persistent:
                crc = checksum(handle, generation, oid, index, encoding, data)
                ref = arena.store(size_class, handle, generation, oid, index, encoding, data, crc, FLAG_XXH3)
            else:
                ref = arena.store(size_class, handle, generation, oid, index, encoding, data, 0, 0)
        except ArenaFull:
            return self._store_fragmented(client, pool, oid, index, raw)
        if not persistent:
            pool.remember((ref >> REF_SHIFT) << _LOG_SHIFT | (generation & _LOG_GEN))
            self.eph_bytes += size
        if pages is None:
            pages = objects[oid] = {}
        pages[index] = ref
        storage.pages += 1
        storage.stored += size
        return True

    def _store_fragmented(self, client: Client, pool: Pool, oid: bytes, index: int, page: bytes) -> bool:
        """Slow path: no slab left for the slot's class; make one free, then put again.

        Compaction comes first: without it, a guest keeping one persistent page per slab could pin
        the whole arena with a tiny quota, and ephemeral pages would be evicted in vain.
        """
        while not self.arena.release_empty_slabs():
            if not self._compact() and not self._evict_one():
                return self._refuse(client, pool.persistent)
        (client.pers if pool.persistent else client.eph).puts -= 1  # counted again by the retry
        return self.put(client, pool.members[client.name], oid, index, page)

    def _compact(self) -> bool:
        """Empty the sparsest slabs of the most fragmented size class: their persistent pages move
        into free slots of the class's other slabs, their ephemeral pages are evicted. A slab with
        a held page (unlinked, awaiting delivery) stays. True if a slab was emptied."""
        arena = self.arena
        victims, targets = arena.compaction_plan()
        if not victims:
            return False
        self.compactions += 1
        emptied = False
        for slab in victims:
            for offset in arena.live_offsets(slab):
                h = arena.header(offset)
                handle, oid, index = h.handle, h.oid, h.index
                pool = self._pools.get(handle)
                pages = pool.objects.get(oid) if pool is not None else None
                ref = pages.get(index) if pages is not None else None
                if pool is None or pages is None or ref is None or ref >> REF_SHIFT != offset:
                    if pool is not None and pool.persistent:
                        break  # a held page (persistent frees are marked): the slab stays
                    continue  # an ephemeral slot freed without marking its header
                if pool.persistent:
                    if not targets:
                        break
                    target = targets.pop()
                    arena.move(offset, target)
                    pages[index] = target << REF_SHIFT | ref & _REF_LOW
                else:
                    del pages[index]
                    if not pages:
                        del pool.objects[oid]
                    pool.storage.evicted += 1
                    self.evictions += 1
                    self._forget(pool, ref)
            emptied = emptied or arena.slab_live(slab) == 0
        arena.return_slots(targets)
        return emptied

    def _refuse(self, client: Client, persistent: bool) -> bool:
        (client.pers if persistent else client.eph).puts_refused += 1
        return False

    def _forget(self, pool: Pool, ref: int) -> None:
        """Free one page's slot and uncharge its owner (the index entry is already gone)."""
        size = self.arena.free(ref, pool.persistent)
        storage = pool.storage
        storage.pages -= 1
        storage.stored -= size
        if not pool.persistent:
            self.eph_bytes -= size

    def get(
        self, client: Client, pool_id: int, oid: bytes, index: int, held: list[Held] | None = None
    ) -> bytes | None:
        """The page, or None. With `held`, an exclusive get on a PERSISTENT pool only unlinks the page:
        its slot stays live (charged, and rebuilt by a restart) until `release_held` says the reply
        reached the guest, or `restore_held` puts it back because it may not have. A host agent
        killed between the get and the reply's delivery must not lose the guest's only copy. A put
        or flush of the key (or the pool's end) meanwhile frees the held copy: the guest's later
        word wins, so neither a restore nor a restart brings the old page back.
        """
        pool = client.pools.get(pool_id)
        if pool is None:
            raise UnknownPool(f"pool {pool_id} is not owned by {client.name}")
        counters = client.pers if pool.persistent else client.eph
        counters.gets += 1
        pages = pool.objects.get(oid)
        if pages is None:
            return None
        if pool.exclusive:
            ref = pages.get(index)
            if ref is None:
                return None
            del pages[index]
            if not pages:
                del pool.objects[oid]
            if held is not None and pool.persistent:
                encoding, data = self.arena.read(ref)
                self._holds = hold = self._holds + 1
                held.append(Held(pool, oid, index, ref, hold))
                held_pages = pool.held.get(oid)
                if held_pages is None:
                    held_pages = pool.held[oid] = {}
                held_pages[index] = (ref, hold)
                counters.hits += 1
                return data if encoding == compress.RAW else compress.decode(encoding, data)
            encoding, data, size = self.arena.take(ref, pool.persistent)
            storage = pool.storage
            storage.pages -= 1
            storage.stored -= size
            if not pool.persistent:
                self.eph_bytes -= size
        else:
            ref = pages.get(index)
            if ref is None:
                return None
            encoding, data = self.arena.read(ref)
            if not pool.persistent:
                self._touch(pool, ref)
        counters.hits += 1
        return data if encoding == compress.RAW else compress.decode(encoding, data)

    def release_held(self, held: list[Held]) -> None:
        """The replies of these gets reached the guest: free their slots (unless a later put or
        flush of the key, or the pool's end, freed them already)."""
        for pool, oid, index, ref, hold in held:
            if self._unhold(pool, oid, index, ref, hold):
                self._forget(pool, ref)
        held.clear()

    def restore_held(self, held: list[Held]) -> None:
        """These replies may not have reached the guest: the pages go back where they were, unless
        the key was put or flushed since (the guest's newer word wins) or the pool is gone."""
        for pool, oid, index, ref, hold in held:
            if self._unhold(pool, oid, index, ref, hold):
                pages = pool.objects.get(oid)
                if pages is None:
                    pages = pool.objects[oid] = {}
                pages[index] = ref
        held.clear()

    def _unhold(self, pool: Pool, oid: bytes, index: int, ref: int, hold: int) -> bool:
        """Take one hold out of its pool's held set; False if it is no longer there (a put or
        flush dropped it, maybe the key is held again by a later get: that hold is not ours)."""
        pages = pool.held.get(oid)
        if pages is None or pages.get(index) != (ref, hold):
            return False
        del pages[index]
        if not pages:
            del pool.held[oid]
        return True

    def _drop_held(self, pool: Pool, oid: bytes, index: int) -> None:
        """A put or flush of a key whose page is held: the held copy is stale now, free it, so
        neither a restore nor a restart can bring it back."""
        pages = pool.held.get(oid)
        if pages is not None:
            entry = pages.pop(index, None)
            if entry is not None:
                if not pages:
                    del pool.held[oid]
                self._forget(pool, entry[0])

    def _touch(self, pool: Pool, ref: int) -> None:
        """A use of a shared ephemeral page: move it to the young end of its pool's log."""
        self._generation = generation = self._generation + 1
        offset = ref >> REF_SHIFT
        self.arena.set_generation(offset, generation)
        pool.remember(offset << _LOG_SHIFT | (generation & _LOG_GEN))

    def flush_page(self, client: Client, pool_id: int, oid: bytes, index: int) -> None:
        pool = self._pool(client, pool_id)
        (client.pers if pool.persistent else client.eph).flushes += 1
        if pool.held:
            self._drop_held(pool, oid, index)
        pages = pool.objects.get(oid)
        if pages is None:
            return
        ref = pages.pop(index, None)
        if ref is not None:
            self._forget(pool, ref)
            if not pages:
                del pool.objects[oid]

    def flush_object(self, client: Client, pool_id: int, oid: bytes) -> None:
        pool = self._pool(client, pool_id)
        (client.pers if pool.persistent else client.eph).flushes += 1
        held = pool.held.pop(oid, None)
        if held:
            for ref, _ in held.values():
                self._forget(pool, ref)
        pages = pool.objects.pop(oid, None)
        if pages:
            for ref in pages.values():
                self._forget(pool, ref)

    # -- eviction ---------------------------------------------------------------------------------

    def _oldest(self, pool: Pool) -> tuple[int, int, bytes, int] | None:
        """(generation, ref, oid, index) of the pool's least recently used page, or None.

        Stale log entries met on the way (pages already got, flushed or touched) are dropped.
        """
        if pool.fresh:
            pool.settle_log()
        log = pool.log
        head = pool.log_head
        end = len(log)
        arena = self.arena
        found: tuple[int, int, bytes, int] | None = None
        while head < end:
            entry = log[head]
            offset = entry >> _LOG_SHIFT
            generation = arena.live_generation(offset)
            if generation and generation & _LOG_GEN == entry & _LOG_GEN:
                h = arena.header(offset)
                oid, index = h.oid, h.index
                pages = pool.objects.get(oid)
                ref = pages.get(index) if pages is not None else None
                if ref is not None and ref >> REF_SHIFT == offset:
                    found = (generation, ref, oid, index)
                    break
            head += 1
        if found is None:
            del log[:]
            pool.log_head = 0
            return None
        if head > 4096 and head * 2 > end:
            del log[:head]
            head = 0
        pool.log_head = head
        return found

    def _evict(self, pool: Pool, ref: int, oid: bytes, index: int) -> None:
        pages = pool.objects[oid]
        del pages[index]
        if not pages:
            del pool.objects[oid]
        pool.storage.evicted += 1
        self._forget(pool, ref)
        self.evictions += 1
        pool.log_head += 1

    def _evict_lru(self, owner: Client | None) -> bool:
        """Evict the least recently used ephemeral page (of pools charged to `owner`, if given)."""
        best: tuple[int, int, bytes, int] | None = None
        victim: Pool | None = None
        for pool in self._pools.values():
            if pool.persistent or not pool.objects or (owner is not None and pool.charged is not owner):
                continue
            oldest = self._oldest(pool)
            if oldest is not None and (best is None or oldest[0] < best[0]):
                best, victim = oldest, pool
        if best is None or victim is None:
            return False
        self._evict(victim, best[1], best[2], best[3])
        return True

    def _evict_one(self) -> bool:
        """Evict one ephemeral page: from the guest most above its weighted share, else the LRU page."""
        holders = [c for c in self._clients.values() if c.eph.stored > 0]
        if holders:
            total_weight = sum(c.settings.weight for c in holders)
            victim = max(holders, key=lambda c: c.eph.stored / c.settings.weight)
            share = sum(c.eph.stored for c in holders) * victim.settings.weight / total_weight
            # A little slack so balanced guests fall back to plain LRU, not strict alternation.
            if victim.eph.stored > share + share / 32 + 32768 and self._evict_lru(victim):
                return True
        return self._evict_lru(None)  # shared pools' pages are charged to no guest: LRU only

    def _enforce_cap(self, client: Client) -> None:
        cap = client.settings.cap_bytes
        while cap and client.eph.stored > cap and self._evict_lru(client):
            pass

    # -- budget -----------------------------------------------------------------------------------

    @property
    def budget_bytes(self) -> int:
        """What the pool may use now: the limit, and the host's available memory minus the reserve."""
        return self._budget

    def set_limit(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        host = self._host_budget
        self._budget = limit_bytes if host is None else min(limit_bytes, host)
        while self.arena.used_bytes > self._budget and self._evict_one():
            pass

    def set_host_available(self, nbytes: int) -> None:
        """Feed the host's available memory; the pool's own pages count as usable by the pool."""
        self.host_available = nbytes
        self._host_budget = max(0, self.arena.used_bytes + nbytes - self.host_reserve_bytes)
        self.set_limit(self.limit_bytes)
        # Empty slabs stay mapped for reuse up to 1/16 of the limit; the rest go back to the host.
        self.arena.trim(self.limit_bytes // 16)

    def reserve(self, nbytes: int) -> int:
        """Drop ephemeral pages until the host has `nbytes` available; returns bytes given back."""
        available = self.host_available or 0
        arena = self.arena
        before = arena.resident_bytes
        arena.release_empty_slabs()
        while available + before - arena.resident_bytes < nbytes:
            evicted = 0
            while evicted < 256 and self._evict_one():
                evicted += 1
            arena.release_empty_slabs()
            if not evicted:
                break
        given = before - arena.resident_bytes
        if self.host_available is not None:
            self.set_host_available(self.host_available + given)
        return given

    # -- guests leaving ---------------------------------------------------------------------------

    def disconnect(self, client: Client) -> None:
        """The guest's channel closed: its ephemeral pools go, persistent ones stay for it."""
        for pool_id, pool in list(client.pools.items()):
            if not pool.persistent:
                self.destroy_pool(client, pool_id)

    def remove(self, client: Client) -> None:
        """The guest is gone for good: every pool it had goes, then the client."""
        for pool_id in list(client.pools):
            self.destroy_pool(client, pool_id)
        self._clients.pop(client.name, None)

    # -- persistence ------------------------------------------------------------------------------

    @staticmethod
    def _record(pool: Pool) -> PoolRecord:
        return PoolRecord(pool.handle, pool.flags, pool.uuid, pool.owner.name, dict(pool.members))

    def _rebuild(self) -> None:  # noqa: C901 (the rebuild checks each slot in one pass)
        """Rebuild persistent pools and pages from the pool table and the arena's slots."""
        # Without the table every persistent page would be dropped as unowned: an unreadable one
        # (TableError) stops the start rather than lose them silently.
        table = self._table.load()
        pools = [(r.handle, r.flags, r.uuid, r.owner, r.members) for r in table.pools.values()]
        for handle, flags, uuid, owner_name, members in pools:
            if flags & PoolFlag.SHARED:
                allowed = self.shared_acl.get(uuid, frozenset())
                revoked = sorted(set(members) - allowed)
                if revoked:  # the config no longer authorises them: their membership ends here
                    log.warning(
                        "shared pool %s: %s no longer authorised, membership dropped",
                        uuid.hex(),
                        ", ".join(revoked),
                    )
                    members = {n: i for n, i in members.items() if n in allowed}
                if not members:
                    continue  # nobody may use it any more: its pages are freed below
                if owner_name not in members:
                    owner_name = next(iter(members))
            owner = self.client(owner_name)
            pool = Pool(handle, flags, uuid, owner)
            self._pools[pool.handle] = pool
            for name, pool_id in members.items():
                member = self.client(name)
                member.pools[int(pool_id)] = pool
                pool.members[name] = int(pool_id)
                member.next_pool_id = max(member.next_pool_id, int(pool_id) + 1)
            if pool.shared:
                self._shared[pool.uuid] = pool
        for name, next_id in table.next_ids.items():
            c = self.client(name)
            c.next_pool_id = max(c.next_pool_id, next_id)
        self._next_handle = max([table.next_handle] + [h + 1 for h in self._pools])
        rejected: list[int] = []
        best: dict[tuple[int, bytes, int], tuple[int, int]] = {}  # key -> (generation, ref)
        have_table = table.exists
        for rec in list(self.arena.scan()):
            if rec.verified and not have_table:
                raise TableError(
                    f"the arena holds persistent pages but the pool table {self._table.snapshot} is "
                    "missing: restore it, or move the arena aside to start empty"
                )
            found = self._pools.get(rec.handle)
            if found is None or not found.persistent or not rec.verified:
                if found is not None and found.persistent:
                    self.rejected_slots += 1
                rejected.append(rec.ref)
                continue
            key = (rec.handle, rec.oid, rec.index)
            old = best.get(key)
            if old is None or old[0] < rec.generation:
                if old is not None:
                    rejected.append(old[1])
                best[key] = (rec.generation, rec.ref)
            else:
                rejected.append(rec.ref)
        for ref in rejected:
            self.arena.free(ref)
        for (handle, oid, index), (_, ref) in best.items():
            pool = self._pools[handle]
            pool.objects.setdefault(oid, {})[index] = ref
            pool.storage.pages += 1
            pool.storage.stored += self.arena.size_of(ref)
        self.arena.release_unused_after_scan()
        self.rebuilt_pages = len(best)
        self._generation = self.arena.max_generation
        if self._pools or have_table:
            self._table.rewrite(
                [self._record(p) for p in self._pools.values() if p.persistent],
                self._next_handle,
                {c.name: c.next_pool_id for c in self._clients.values()},
            )

    def close(self) -> None:
        self._table.close()
        self.arena.close()

    # -- observability ----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        arena = self.arena
        eph_pages = sum(c.eph.pages for c in self._clients.values())
        pers_pages = sum(c.pers.pages for c in self._clients.values())
        for pool in self._shared.values():
            if pool.persistent:
                pers_pages += pool.storage.pages
            else:
                eph_pages += pool.storage.pages
        return {
            "pool": {
                "limit_bytes": self.limit_bytes,
                "budget_bytes": self.budget_bytes,
                "used_bytes": arena.used_bytes,
                "resident_bytes": arena.resident_bytes,
                "capacity_bytes": arena.capacity_bytes,
                "pages": eph_pages + pers_pages,
                "raw_bytes": (eph_pages + pers_pages) * PAGE_SIZE,
                "ephemeral_pages": eph_pages,
                "persistent_pages": pers_pages,
                "ephemeral_bytes": self.eph_bytes,
                "evictions": self.evictions,
                "compactions": self.compactions,
                "host_available_bytes": self.host_available,
                "host_reserve_bytes": self.host_reserve_bytes,
                "pools": len(self._pools),
                "rebuilt_pages": self.rebuilt_pages,
                "rejected_slots": self.rejected_slots,
            },
            "shared": {pool.uuid.hex(): self._shared_stats(pool) for pool in self._shared.values()},
            "guests": {
                c.name: {
                    "weight": c.settings.weight,
                    "cap_bytes": c.settings.cap_bytes,
                    "quota_bytes": c.settings.quota_bytes,
                    "compress": c.settings.compress,
                    "pools": len(c.pools),
                    "ephemeral": c.eph.as_dict(),
                    "persistent": c.pers.as_dict(),
                }
                for c in self._clients.values()
            },
        }

    def _shared_stats(self, pool: Pool) -> SharedPoolStats:
        c = pool.storage.as_dict()
        return {
            "kind": pool.kind,
            "members": sorted(pool.members),
            "quota_bytes": self.shared_quota_bytes,
            "puts": c["puts"],
            "puts_refused": c["puts_refused"],
            "gets": c["gets"],
            "hits": c["hits"],
            "flushes": c["flushes"],
            "evicted": c["evicted"],
            "pages": c["pages"],
            "bytes": c["bytes"],
            "raw_bytes": c["raw_bytes"],
        }

    def pools_info(self) -> list[PoolInfo]:
        out: list[PoolInfo] = []
        for pool in self._pools.values():
            pages = sum(len(p) for p in pool.objects.values())
            stored = sum(self.arena.size_of(r) for p in pool.objects.values() for r in p.values())
            out.append(
                {
                    "handle": pool.handle,
                    "kind": pool.kind,
                    "flags": pool.flags,
                    "uuid": pool.uuid.hex() if pool.shared else None,
                    "owner": pool.owner.name,
                    "members": dict(pool.members),
                    "objects": len(pool.objects),
                    "pages": pages,
                    "bytes": stored,
                    "raw_bytes": pages * PAGE_SIZE,
                    "exclusive_gets": pool.exclusive,
                }
            )
        return out


__all__ = [
    "Client",
    "ClientSettings",
    "Counters",
    "EngineError",
    "OutOfSpace",
    "Pool",
    "PoolDenied",
    "PoolEngine",
    "TableError",
    "UnknownPool",
]
