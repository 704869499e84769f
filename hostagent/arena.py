"""The page arena: page data in a tmpfs-backed file, in self-describing slots.

Why a file and not Python objects: the pool's memory must be measurable, returnable to the host
(punch-hole) and must outlive the host agent process, so that a host agent killed with SIGKILL and
started again finds every persistent page it had acknowledged.

Layout: the file is cut into slabs of `SLAB_SIZE` bytes. A slab in use belongs to one size class and
starts with a slab header naming the class; its slots follow back to back. Every slot starts with a
header that names its page (pool handle, object id, index), its encoding and length, a generation
(a global counter: the higher one wins when two slots claim one key after a crash) and a checksum over
key, generation and data. Slots are reused while their slab is in use (first-touch faults of fresh tmpfs
memory cost ~10x a warm write). A slab whose last slot is freed stays mapped and reusable until the
owner trims: `trim(keep)` returns empty slabs beyond `keep` bytes to the host with MADV_REMOVE
(punch-hole on tmpfs), `release_empty_slabs()` all of them. Punching on every emptied slab would make
a pool that fills and drains fault every page in again.
"""

from __future__ import annotations

import heapq
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

import xxhash

from guestagent.protocol.wire import PAGE_SIZE

SLAB_SHIFT: Final = 18
SLAB_SIZE: Final = 1 << SLAB_SHIFT  # 256 KiB

SLAB_MAGIC: Final = 0x42414C53  # "SLAB"
SLAB_HEADER: Final = struct.Struct("<IIQ")  # magic, size class, check (0 in older arenas)
SLAB_HEADER_SIZE: Final = 64  # slots start here

SLOT_LIVE: Final = 0x45564C53  # "SLVE"
SLOT_FREE: Final = 0
# state, pool handle, generation, object id, index, checksum, data length, encoding, flags
SLOT_HEADER: Final = struct.Struct("<IIQ24sIIHBB")
SLOT_HEADER_SIZE: Final = SLOT_HEADER.size  # 52
# The same bytes packed as six fields (state | handle << 32, generation, oid, index, checksum,
# length | encoding << 16 | flags << 24): every field a put passes is boxed and parsed, so fewer
# fields make the put's header write cheaper.
_SLOT_PACK: Final = struct.Struct("<QQ24sIII")
if _SLOT_PACK.size != SLOT_HEADER_SIZE:  # pragma: no cover - layout guard
    raise ImportError("the merged slot header layout does not match SLOT_HEADER")
_STATE_GEN = struct.Struct("<I4xQ")
_GEN = struct.Struct("<Q")
_GEN_OFFSET: Final = 8

# A slot with a checksum (persistent pages) is rebuilt after a restart; others are not.
FLAG_CHECKSUM: Final = 1  # CRC-32 (`crc32_checksum`): written by earlier versions, still verified
FLAG_XXH3: Final = 2  # xxh3-64 (`checksum`), what puts write now: ~5x cheaper per page than CRC-32

# Slot sizes including the header. The smallest holds a same-filled page (8-byte word); the largest a
# raw page. In between, steps fine enough that lz4 pages (typically 1.3-3 KiB) pack densely.
SLOT_SIZES: Final[tuple[int, ...]] = (
    64,
    128,
    256,
    512,
    768,
    1024,
    1280,
    1536,
    1792,
    2048,
    2304,
    2560,
    2816,
    3072,
    3328,
    3584,
    3840,
    SLOT_HEADER_SIZE + PAGE_SIZE,
)
RAW_CLASS: Final = len(SLOT_SIZES) - 1
# The longest compressed page worth keeping: anything longer lands in the raw class anyway.
MAX_COMPRESSED: Final = SLOT_SIZES[RAW_CLASS - 1] - SLOT_HEADER_SIZE
SLOTS_PER_SLAB: Final[tuple[int, ...]] = tuple((SLAB_SIZE - SLAB_HEADER_SIZE) // size for size in SLOT_SIZES)
# CLASS_FOR_LENGTH[n] = the smallest class whose slot holds n data bytes.
CLASS_FOR_LENGTH: Final[tuple[int, ...]] = tuple(
    next(c for c, size in enumerate(SLOT_SIZES) if size - SLOT_HEADER_SIZE >= n) for n in range(PAGE_SIZE + 1)
)

_NO_SLAB: Final = -1


def slab_check(size_class: int) -> int:
    """The slab header's check word: a damaged size class must not make a slab's slots be read at
    the wrong stride (and old slot headers inside look live). 0 marks a slab of an older version."""
    return (size_class + 1) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF


_xxh3: Final = xxhash.xxh3_64_intdigest
_xxh32: Final = xxhash.xxh32_intdigest

# A slot reference packs what a read needs into one int, so a get touches no header:
# offset << REF_SHIFT | data length << 2 | encoding.
REF_SHIFT: Final = 16
_REF_LENGTH_MASK: Final = 0x3FFF


def make_ref(offset: int, length: int, encoding: int) -> int:
    return offset << REF_SHIFT | length << 2 | encoding


def ref_offset(ref: int) -> int:
    return ref >> REF_SHIFT


class ArenaError(Exception):
    """The arena file cannot be used (wrong size, not mappable, ...)."""


class ArenaFull(ArenaError):
    """No free slab is left for a size class: the caller must free slots or refuse."""


def checksum(handle: int, generation: int, oid: bytes, index: int, encoding: int, data: bytes) -> int:
    """A slot's checksum over its key, generation, encoding and data: a torn header or page, or
    a page written at the wrong place, fails it.

    xxh3-64 of the page (low 32 bits, the header's field): on a 4 KiB page ~0.3 us against
    CRC-32's ~1.6 us here, which was a third of a persistent put.
    """
    # Written so the compiled code stays on small ints: one mask of xxh3's 64-bit result, the
    # 24-byte oid through xxh32 (a 32-bit result), the other fields shifted into 32 bits.
    return (
        (_xxh3(data, generation) & 0xFFFFFFFF)
        ^ _xxh32(oid, index)
        ^ handle << 20
        ^ encoding << 16
        ^ len(data)
    ) & 0xFFFFFFFF


def crc32_checksum(handle: int, generation: int, oid: bytes, index: int, encoding: int, data: bytes) -> int:
    """The CRC-32 checksum of slots written before FLAG_XXH3 (an arena from an older version)."""
    seed = (handle * 0x9E3779B1 ^ generation ^ (index << 7) ^ (encoding << 29) ^ len(data)) & 0xFFFFFFFF
    return zlib.crc32(data, zlib.crc32(oid, seed))


def verify(
    flags: int, crc: int, handle: int, generation: int, oid: bytes, index: int, encoding: int, data: bytes
) -> bool:
    """True if the slot carries a checksum and it matches."""
    if flags & FLAG_XXH3:
        return crc == checksum(handle, generation, oid, index, encoding, data)
    if flags & FLAG_CHECKSUM:
        return crc == crc32_checksum(handle, generation, oid, index, encoding, data)
    return False


class SlotHeader(NamedTuple):
    """A slot's header, as SLOT_HEADER lays it out."""

    state: int  # SLOT_LIVE, or a free mark
    handle: int  # the pool's arena handle
    generation: int
    oid: bytes
    index: int  # type: ignore[assignment]  # shadows tuple.index; the key's name
    crc: int  # checksum of key and data, when flags say so
    length: int  # stored bytes
    encoding: int
    flags: int


@dataclass(frozen=True, slots=True)
class SlotRecord:
    """A live slot found by `Arena.scan` (rebuild after a restart)."""

    offset: int
    ref: int
    size_class: int
    handle: int
    generation: int
    oid: bytes
    index: int
    encoding: int
    verified: bool  # carries a checksum and it matches


class Arena:
    """Slab-allocated slots in one mmap of a tmpfs file.

    Not thread-safe: the host agent owns it from one event loop.
    """

    def __init__(self, path: str | os.PathLike[str], capacity_bytes: int) -> None:
        """Open (or create) the arena file for up to `capacity_bytes` of live slots.

        The file gets room on top for partly used slabs (1/8, plus two slabs per size class); it is
        sparse, so the room costs nothing until used.
        """
        self.path = Path(path)
        room = capacity_bytes + capacity_bytes // 8 + 2 * len(SLOT_SIZES) * SLAB_SIZE
        nslabs = -(-room // SLAB_SIZE)
        if nslabs * SLAB_SIZE >= 1 << 40:
            raise ArenaError("an arena is limited to 1 TiB (slot offsets fit 40 bits in LRU logs)")
        self.capacity_bytes = nslabs * SLAB_SIZE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(self._fd).st_size
            if size > self.capacity_bytes:
                # A previous run had a larger arena: keep it whole, its slabs may hold pages.
                nslabs = -(-size // SLAB_SIZE)
                self.capacity_bytes = nslabs * SLAB_SIZE
            if size != self.capacity_bytes:
                os.ftruncate(self._fd, self.capacity_bytes)
            self._mm = mmap.mmap(self._fd, self.capacity_bytes, mmap.MAP_SHARED)
        except OSError as err:
            os.close(self._fd)
            raise ArenaError(f"cannot map arena {self.path}: {err}") from err
        self._nslabs = nslabs
        self._slab_class: list[int] = [_NO_SLAB] * nslabs
        self._slab_live: list[int] = [0] * nslabs
        self._free_slabs: list[int] = list(range(nslabs))  # a heap: lowest slabs first, file stays dense
        self._free: list[list[int]] = [[] for _ in SLOT_SIZES]  # freed slots, LIFO: warm ones reused
        self._bump: list[int] = [0] * len(SLOT_SIZES)  # next never-used slot in the class's newest slab
        self._bump_end: list[int] = [0] * len(SLOT_SIZES)
        self._empty: set[int] = set()  # slabs in use with no live slot: trim() returns them
        self.slabs_in_use = 0
        self.slots_in_use = 0
        self.used_bytes = 0  # bytes of live slots (what clients are charged)
        self.max_generation = 0
        self.damaged_slabs = 0  # slabs with a bad header found by scan() (and punched)
        self.scanned = False
        self._pack_header = _SLOT_PACK.pack_into  # bound once: saves a method lookup per put

    # -- allocation -------------------------------------------------------------------------------

    def _bump_slot(self, size_class: int) -> int:
        """A never-used slot of `size_class`, from its current slab or a new one; raises ArenaFull
        when no slab is left. Not counted in use yet: `store` does that."""
        offset = self._bump[size_class]
        if offset == 0 or offset + SLOT_SIZES[size_class] > self._bump_end[size_class]:
            offset = self._new_slab(size_class)
        self._bump[size_class] = offset + SLOT_SIZES[size_class]
        return offset

    def store(
        self,
        size_class: int,
        handle: int,
        generation: int,
        oid: bytes,
        index: int,
        encoding: int,
        data: bytes,
        crc: int,
        flags: int,
    ) -> int:
        """Allocate a slot and fill it (the put hot path: one call); returns its reference.

        A reused slot (the common case in a pool that fills and drains) is taken here without
        a call; data first, then the header that makes the slot live. (Not one struct pack of
        header and page: struct zeroes its whole target before packing, a second pass over the
        page.) Raises ArenaFull when no slot is free and no slab is left.
        """
        free = self._free[size_class]
        offset: int = free.pop() if free else self._bump_slot(size_class)
        slab = offset >> SLAB_SHIFT
        live = self._slab_live[slab]
        if live == 0:
            self._empty.discard(slab)
        self._slab_live[slab] = live + 1
        self.slots_in_use += 1
        self.used_bytes += SLOT_SIZES[size_class]
        length = len(data)
        start = offset + SLOT_HEADER_SIZE
        self._mm[start : start + length] = data
        self._pack_header(
            self._mm,
            offset,
            SLOT_LIVE | handle << 32,
            generation,
            oid,
            index,
            crc,
            length | encoding << 16 | flags << 24,
        )
        return offset << REF_SHIFT | length << 2 | encoding

    def _new_slab(self, size_class: int) -> int:
        if not self._free_slabs:
            raise ArenaFull(f"arena {self.path} has no free slab ({self.capacity_bytes} bytes)")
        slab = heapq.heappop(self._free_slabs)
        base = slab << SLAB_SHIFT
        self._slab_class[slab] = size_class
        self.slabs_in_use += 1
        SLAB_HEADER.pack_into(self._mm, base, SLAB_MAGIC, size_class, slab_check(size_class))
        first = base + SLAB_HEADER_SIZE
        self._bump_end[size_class] = first + SLOTS_PER_SLAB[size_class] * SLOT_SIZES[size_class]
        return first

    def free(self, ref: int, mark: bool = True) -> int:
        """Free a slot; returns its size (the bytes its owner is no longer charged).

        `mark` writes the free state into the slot, so a restart does not bring it back: needed for
        checksummed (persistent) slots only, since nothing else is ever rebuilt.
        """
        offset = ref >> REF_SHIFT
        if mark:
            # One byte is enough to make the state word differ from SLOT_LIVE (and cheaper
            # than packing the word).
            self._mm[offset] = SLOT_FREE
        slab = offset >> SLAB_SHIFT
        size_class = self._slab_class[slab]
        size = SLOT_SIZES[size_class]
        self.slots_in_use -= 1
        self.used_bytes -= size
        self._free[size_class].append(offset)
        live = self._slab_live[slab] - 1
        self._slab_live[slab] = live
        if live == 0:
            self._empty.add(slab)
        return size

    # -- compaction -------------------------------------------------------------------------------

    def compaction_plan(self) -> tuple[list[int], list[int]]:
        """(slabs to empty, free slots to move their live slots into), in the size class where
        that frees the most slabs; both empty if no class has a slab to spare.

        The move targets are taken off the free list (give back the unused ones with
        `return_slots`). A class's bump slab is never emptied: `trim` keeps it anyway.
        """
        by_class: list[list[int]] = [[] for _ in SLOT_SIZES]
        for slab in range(self._nslabs):
            size_class = self._slab_class[slab]
            if size_class != _NO_SLAB and self._slab_live[slab] > 0:
                by_class[size_class].append(slab)
        best: list[int] = []
        best_class = -1
        for size_class, slabs in enumerate(by_class):
            bump_slab = (self._bump_end[size_class] - 1) >> SLAB_SHIFT if self._bump_end[size_class] else -1
            slabs = sorted((s for s in slabs if s != bump_slab), key=self._slab_live.__getitem__)
            room = sum(SLOTS_PER_SLAB[size_class] - self._slab_live[s] for s in slabs)
            victims: list[int] = []
            moving = 0
            for slab in slabs:  # sparsest first, while the slabs left can take their slots in
                live = self._slab_live[slab]
                room -= SLOTS_PER_SLAB[size_class] - live
                if moving + live > room:
                    break
                victims.append(slab)
                moving += live
            if len(victims) > len(best):
                best, best_class = victims, size_class
        if not best:
            return [], []
        chosen = set(best)
        keep: list[int] = []
        targets: list[int] = []
        for offset in self._free[best_class]:
            (targets if offset >> SLAB_SHIFT not in chosen else keep).append(offset)
        self._free[best_class] = keep
        return best, targets

    def slab_live(self, slab: int) -> int:
        return self._slab_live[slab]

    def return_slots(self, offsets: list[int]) -> None:
        """Give free slots taken by `compaction_plan` back to their free lists."""
        for offset in offsets:
            self._free[self._slab_class[offset >> SLAB_SHIFT]].append(offset)

    def live_offsets(self, slab: int) -> list[int]:
        """Offsets of the live slots of a slab in use."""
        size_class = self._slab_class[slab]
        size = SLOT_SIZES[size_class]
        first = (slab << SLAB_SHIFT) + SLAB_HEADER_SIZE
        return [
            offset
            for offset in range(first, first + SLOTS_PER_SLAB[size_class] * size, size)
            if _STATE_GEN.unpack_from(self._mm, offset)[0] == SLOT_LIVE
        ]

    def move(self, offset: int, target: int) -> None:
        """Copy a live slot into a free one of the same class (from `compaction_plan`), then free
        the old one. Both are live for a moment, with the same generation and checksum: a restart
        in between keeps either, and they are equal. The caller repoints its index."""
        slab, target_slab = offset >> SLAB_SHIFT, target >> SLAB_SHIFT
        size = SLOT_SIZES[self._slab_class[slab]]
        self._mm[target : target + size] = self._mm[offset : offset + size]
        self._mm[offset] = SLOT_FREE
        live = self._slab_live[target_slab]
        if live == 0:
            self._empty.discard(target_slab)
        self._slab_live[target_slab] = live + 1
        self._free[self._slab_class[slab]].append(offset)
        live = self._slab_live[slab] - 1
        self._slab_live[slab] = live
        if live == 0:
            self._empty.add(slab)

    def _release_slab(self, slab: int) -> None:
        size_class = self._slab_class[slab]
        base = slab << SLAB_SHIFT
        first = base + SLAB_HEADER_SIZE
        if self._bump_end[size_class] == first + SLOTS_PER_SLAB[size_class] * SLOT_SIZES[size_class]:
            return  # still the class's bump slab: keep it, it is about to be used again
        self._free[size_class] = [o for o in self._free[size_class] if o >> SLAB_SHIFT != slab]
        self._empty.discard(slab)
        self._mm.madvise(mmap.MADV_REMOVE, base, SLAB_SIZE)
        self._slab_class[slab] = _NO_SLAB
        self.slabs_in_use -= 1
        heapq.heappush(self._free_slabs, slab)

    def release_empty_slabs(self) -> int:
        """Return every empty slab to the host (for `reserve`); returns bytes released."""
        return self.trim(0)

    def trim(self, keep_bytes: int) -> int:
        """Return empty slabs to the host, keeping up to `keep_bytes` of them for reuse."""
        before = self.slabs_in_use
        for slab in sorted(self._empty, reverse=True):  # highest first: the file stays dense
            if len(self._empty) * SLAB_SIZE <= keep_bytes:
                break
            self._release_slab(slab)
        return (before - self.slabs_in_use) * SLAB_SIZE

    @property
    def empty_slab_bytes(self) -> int:
        return len(self._empty) * SLAB_SIZE

    @property
    def resident_bytes(self) -> int:
        """Bytes of slabs in use: the arena's real memory footprint."""
        return self.slabs_in_use * SLAB_SIZE

    def free_slot_bytes(self) -> int:
        """Bytes of free slots inside slabs in use (internal fragmentation, reusable)."""
        return self.resident_bytes - self.used_bytes - self.slabs_in_use * SLAB_HEADER_SIZE

    # -- slot contents ----------------------------------------------------------------------------

    def write(self, offset: int, header: SlotHeader, data: bytes) -> None:
        """Fill a slot: data first, then `header` (its length taken from `data`), which makes it
        live if its state is SLOT_LIVE. For tools and tests that lay slots out themselves."""
        start = offset + SLOT_HEADER_SIZE
        self._mm[start : start + len(data)] = data
        SLOT_HEADER.pack_into(self._mm, offset, *header._replace(length=len(data)))

    def read(self, ref: int) -> tuple[int, bytes]:
        """(encoding, stored bytes) of a live slot."""
        start = (ref >> REF_SHIFT) + SLOT_HEADER_SIZE
        return ref & 3, self._mm[start : start + (ref >> 2 & _REF_LENGTH_MASK)]

    def take(self, ref: int, mark: bool) -> tuple[int, bytes, int]:
        """Read and free a slot (an exclusive get): (encoding, stored bytes, slot size)."""
        start = (ref >> REF_SHIFT) + SLOT_HEADER_SIZE
        data = self._mm[start : start + (ref >> 2 & _REF_LENGTH_MASK)]
        return ref & 3, data, self.free(ref, mark)

    def header(self, offset: int) -> SlotHeader:
        """The raw slot header at `offset`."""
        return SlotHeader(*SLOT_HEADER.unpack_from(self._mm, offset))

    def live_generation(self, offset: int) -> int:
        """The slot's generation if it is live, else 0: how LRU logs tell stale entries."""
        if self._slab_class[offset >> SLAB_SHIFT] == _NO_SLAB:
            return 0  # a released slab: reading it would fault fresh memory in
        state, generation = _STATE_GEN.unpack_from(self._mm, offset)
        return int(generation) if state == SLOT_LIVE else 0

    def set_generation(self, offset: int, generation: int) -> None:
        """Re-stamp a live slot (an LRU touch on a shared pool) without rewriting its data."""
        _GEN.pack_into(self._mm, offset + _GEN_OFFSET, generation)

    def size_of(self, ref: int) -> int:
        return SLOT_SIZES[self._slab_class[ref >> REF_SHIFT >> SLAB_SHIFT]]

    # -- rebuild ----------------------------------------------------------------------------------

    def scan(self) -> Iterator[SlotRecord]:
        """Rebuild the allocator from the file and yield every live slot, checksum verified.

        Must run once, before any allocation. Holes (never-used or punched slabs) are skipped with
        SEEK_DATA and read with pread, so scanning does not fault fresh memory in. The caller frees
        the records it does not keep.
        """
        if self.scanned or self.slabs_in_use:
            raise ArenaError("scan() must run once, on a fresh Arena, before any allocation")
        self.scanned = True
        in_use: set[int] = set()
        offset = 0
        while offset < self.capacity_bytes:
            try:
                offset = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: no data past offset
            slab = offset >> SLAB_SHIFT
            base = slab << SLAB_SHIFT
            raw = os.pread(self._fd, SLAB_SIZE, base)
            offset = base + SLAB_SIZE
            magic, size_class, check = SLAB_HEADER.unpack_from(raw, 0)
            if (
                magic != SLAB_MAGIC
                or not 0 <= size_class < len(SLOT_SIZES)
                or check not in (0, slab_check(size_class))
            ):
                # A damaged slab header: nothing in the slab can be trusted. Punch it, so old
                # slot headers cannot come back to life when the slab is handed out again.
                self.damaged_slabs += 1
                self._mm.madvise(mmap.MADV_REMOVE, base, SLAB_SIZE)
                continue
            in_use.add(slab)
            self._slab_class[slab] = size_class
            self.slabs_in_use += 1
            size = SLOT_SIZES[size_class]
            free = self._free[size_class]
            for pos in range(SLAB_HEADER_SIZE, SLAB_HEADER_SIZE + SLOTS_PER_SLAB[size_class] * size, size):
                h = SlotHeader(*SLOT_HEADER.unpack_from(raw, pos))
                length, gen = h.length, h.generation
                if h.state != SLOT_LIVE or length > size - SLOT_HEADER_SIZE:
                    free.append(base + pos)
                    continue
                data = raw[pos + SLOT_HEADER_SIZE : pos + SLOT_HEADER_SIZE + length]
                verified = verify(h.flags, h.crc, h.handle, gen, h.oid, h.index, h.encoding, data)
                self._slab_live[slab] += 1
                self.slots_in_use += 1
                self.used_bytes += size
                if verified:  # a torn header's generation must not become the engine's counter
                    self.max_generation = max(self.max_generation, gen)
                yield SlotRecord(
                    base + pos,
                    make_ref(base + pos, length, h.encoding),
                    size_class,
                    h.handle,
                    gen,
                    h.oid,
                    h.index,
                    h.encoding,
                    verified,
                )
        self._free_slabs = [s for s in range(self._nslabs) if s not in in_use]
        heapq.heapify(self._free_slabs)

    def release_unused_after_scan(self) -> None:
        """After the caller freed what it rejected, give back slabs left empty."""
        for slab in range(self._nslabs):
            if self._slab_class[slab] != _NO_SLAB and self._slab_live[slab] == 0:
                self._empty.add(slab)
        self.trim(0)

    def close(self) -> None:
        """Unmap and close; the file (and every page in it) stays for the next run."""
        if not self._mm.closed:
            self._mm.close()
            os.close(self._fd)

    def destroy(self) -> None:
        """Close and delete the file: all pages are gone."""
        self.close()
        self.path.unlink(missing_ok=True)
