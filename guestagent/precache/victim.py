"""The victim cache: which pages a page-in asks of the pool, which it puts, and what a write, a
truncate or a change behind the mount invalidates.  No FUSE here: the file system hands in the
backing file's reads and writes as callables, so a fake pool handle drives all of it in tests.

One object per backing file, keyed by (st_dev, st_ino); its object id is (st_dev, st_ino, inode
generation) as 3 x 64 bits and a page's index is its page number.  The rules (docs/precache.md):

- every page read from the backing file is put (fire-and-forget); a pool hit is put back, the
  pool keeping what the kernel may drop again; pages a write fully determines are put after it;
- a write flushes the pages it changed in part, a truncate or a change behind the mount (mtime,
  ctime or size differ from what the shim last saw) flushes the object;
- a read puts what it fetched only if no invalidation happened meanwhile (the object's epoch);
  writes and truncates of one file hold its lock, so the pool receives pages in the file's order.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Final, Protocol

import trio

from guestagent.channel import ChannelError
from guestagent.protocol import wire

__all__ = [
    "FORGOTTEN_OBJECTS",
    "GET_TIMEOUT",
    "PAGE",
    "PARTIAL_FLUSH_PAGES",
    "CachedFile",
    "Counters",
    "FileReader",
    "Pool",
    "VictimCache",
    "page_length",
    "seen",
    "written_pages",
]

log = logging.getLogger(__name__)

PAGE: Final = wire.PAGE_SIZE
GET_TIMEOUT: Final = 1.0  # a host that does not answer a get within this is a miss
FORGOTTEN_OBJECTS: Final = 4096  # files the kernel forgot whose pages the shim still tracks
PARTIAL_FLUSH_PAGES: Final = 64  # a write over more pages than this flushes the whole object

Key = tuple[int, int]  # (st_dev, st_ino) on the backing file system
Seen = tuple[int, int, int]  # (mtime_ns, ctime_ns, size)


@dataclass
class Counters:
    """What the shim did; `gets` counts pages asked of tmem (each a hit or a miss).  Only reads the
    kernel's page cache could not serve reach the shim, so `reads` counts the guest's page-ins."""

    reads: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0  # pages read from the disk or written, put to the pool
    put_backs: int = 0  # pool hits put back (exclusive gets: the pool keeps what it served)
    written_puts: int = 0  # pages a write determined, put after the backing write
    flushes: int = 0
    bytes_from_tmem: int = 0
    bytes_from_disk: int = 0
    changed_behind: int = 0  # files seen changed behind the mount (at open or read)
    objects: int = 0  # files the shim keeps state for (open, looked up, or pages in tmem)
    connected: bool = False


@dataclass
class CachedFile:
    """A backing file as the shim knows it; survives the kernel forgetting the inode."""

    oid: bytes
    seen: Seen | None = None  # at the last sync
    size: int = 0
    epoch: int = 0  # bumped by every invalidation: a read fetched under an older one is stale
    in_tmem: bool = False  # pages may have been put since the last flush
    opens: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)  # writes and truncates, one at a time


class Pool(Protocol):
    """What the cache uses of a `guestagent.channel.PoolHandle` (a private ephemeral pool)."""

    @property
    def connected(self) -> bool: ...

    def put_many_nowait(self, items: Sequence[tuple[bytes, int, bytes]]) -> None: ...

    async def get(self, oid: bytes, index: int) -> bytes | None: ...

    async def get_many(self, keys: Sequence[tuple[bytes, int]]) -> list[bytes | None]: ...

    async def flush_object(self, oid: bytes) -> None: ...

    async def flush_many(self, keys: Sequence[tuple[bytes, int]]) -> None: ...


class FileReader(Protocol):
    """An open backing file's reads, as the file system does them (in a worker thread)."""

    async def read(self, size: int, offset: int) -> bytes: ...

    async def read_dropping(self, size: int, offset: int) -> bytes:
        """A read whose pages the backing file system's own page cache need not keep."""
        ...


def page_length(size: int, index: int) -> int:
    """How many bytes page `index` holds in a file of `size` bytes (0 past its end)."""
    return max(0, min(PAGE, size - index * PAGE))


def seen(st: os.stat_result) -> Seen:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def written_pages(off: int, buf: bytes, size: int) -> tuple[dict[int, bytes], set[int]]:
    """What a write of `buf` at `off` leaves the file of `size` bytes: the pages it fully
    determines (their bytes, zero-padded past the end) and the pages it changed only in part."""
    if not buf:
        return {}, set()
    end = off + len(buf)
    known: dict[int, bytes] = {}
    partial: set[int] = set()
    for index in range(off // PAGE, (end - 1) // PAGE + 1):
        lo, hi = index * PAGE, min((index + 1) * PAGE, size)
        if off <= lo and end >= hi and hi > lo:
            known[index] = buf[lo - off : hi - off].ljust(PAGE, b"\0")
        else:
            partial.add(index)
    return known, partial


def _unchanged(obj: CachedFile, st: os.stat_result) -> bool:
    return obj.seen is not None and obj.seen == seen(st) and obj.size == st.st_size


class VictimCache:
    """The mount's files and their pages in one private ephemeral pool (`pool`, None while there
    is no host agent: gets miss and puts are dropped)."""

    def __init__(self) -> None:
        self.pool: Pool | None = None
        self.counters = Counters()
        self._objects: dict[Key, CachedFile] = {}
        # objects of files the kernel forgot, oldest first: kept (bounded) so that their pages in
        # tmem stay usable and a change behind the mount is still seen at open
        self._forgotten: OrderedDict[Key, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._objects)

    # ----------------------------------------------------------------- objects

    def get(self, key: Key) -> CachedFile | None:
        return self._objects.get(key)

    def object_for(self, st: os.stat_result, generation: int | None = None) -> CachedFile:
        """The object of the file `st` (a new one if the inode number now names another file)."""
        key = (st.st_dev, st.st_ino)
        obj = self._objects.get(key)
        if obj is None or (generation is not None and obj.oid[16:] != generation.to_bytes(8, "little")):
            oid = struct.pack("<QQQ", st.st_dev, st.st_ino, generation or 0)
            obj = CachedFile(oid, None, st.st_size)  # same inode number, new file: a new object
            self._objects[key] = obj
        self._forgotten.pop(key, None)  # known to the kernel again
        return obj

    def sync(self, before: os.stat_result, after: os.stat_result) -> None:
        """The shim changed the file's metadata (ctime, maybe mtime): if it knew the file as it was
        just before, it knows it now; if not, the file changed behind the mount and the next open
        must see that, so what it saw stays as it was."""
        obj = self._objects.get((after.st_dev, after.st_ino))
        if obj is not None and obj.seen is not None and obj.seen == seen(before):
            obj.seen = seen(after)
            obj.size = after.st_size

    def forgotten(self, key: Key) -> None:
        """The kernel forgot the file's inode: its object goes, or (pages in tmem) waits, bounded."""
        obj = self._objects.get(key)
        if obj is None or obj.opens:
            return
        if not obj.in_tmem:
            del self._objects[key]
            self._forgotten.pop(key, None)
        else:
            self._forgotten[key] = None
            self._forgotten.move_to_end(key)

    async def trim(self, in_use: Callable[[Key], bool]) -> None:
        """Past the bound the oldest forgotten objects go, with their pages (here and in tmem):
        without its object the shim could not tell a later change behind the mount from the
        pages it kept.  `in_use(key)`: the kernel knows the file again."""
        while len(self._forgotten) > FORGOTTEN_OBJECTS:
            key, _ = self._forgotten.popitem(last=False)
            obj = self._objects.get(key)
            if obj is None or obj.opens or in_use(key):
                continue
            del self._objects[key]  # first: a reopen while the flush is queued starts afresh
            await self.invalidate(obj)

    # ----------------------------------------------------------------- the pool

    def put_many(self, obj: CachedFile, pages: Sequence[tuple[int, bytes]]) -> bool:
        """Queue fire-and-forget puts of many pages of one object in PUT_VEC frames."""
        pool = self.pool
        if pool is None or not pages:
            return False
        try:
            pool.put_many_nowait(
                [
                    (obj.oid, index, page if len(page) == PAGE else page.ljust(PAGE, b"\0"))
                    for index, page in pages
                ]
            )
        except ChannelError:
            return False
        obj.in_tmem = True
        return True

    async def invalidate(self, obj: CachedFile, indexes: Collection[int] | None = None) -> None:
        """Drop the object's pages (only `indexes`, if given) in tmem, and wait until the host did;
        reads in flight will not put theirs.  The epoch is bumped before the first await, so no
        read can slip between the change and the drop."""
        obj.epoch += 1
        if indexes is not None and len(indexes) > PARTIAL_FLUSH_PAGES:
            indexes = None
        if indexes is not None and not indexes:
            return
        if not obj.in_tmem:
            return
        pool = self.pool
        if pool is None:
            obj.in_tmem = False  # the pool is gone with the channel: nothing of it can come back
            return
        self.counters.flushes += 1
        try:
            if indexes is None:
                obj.in_tmem = False
                await pool.flush_object(obj.oid)  # queued at once: ordered after any earlier put
            else:
                await pool.flush_many([(obj.oid, i) for i in sorted(indexes)])
        except ChannelError as exc:
            log.debug("flush of an object failed: %s", exc)

    async def _tmem_get(self, oid: bytes, indexes: Sequence[int]) -> list[bytes | None]:
        pool = self.pool
        if pool is None or not indexes:
            return [None] * len(indexes)
        self.counters.gets += len(indexes)
        got: list[bytes | None] = [None] * len(indexes)
        try:
            with trio.move_on_after(GET_TIMEOUT):
                if len(indexes) == 1:
                    got = [await pool.get(oid, indexes[0])]
                else:
                    got = await pool.get_many([(oid, i) for i in indexes])
        except ChannelError as exc:
            log.debug("tmem get failed: %s", exc)
        return got

    # ----------------------------------------------------------------- what the file system saw

    async def opened(self, st: os.stat_result, generation: int, trunc: bool) -> tuple[CachedFile, bool, bool]:
        """A file was opened (`trunc`: emptied by it): its object, whether the kernel may keep its
        cached pages, and whether it changed behind the mount."""
        obj = self.object_for(st, generation)
        async with obj.lock:
            # known: the kernel's cached pages (if any) are the file's.  Not known (first sight
            # in this shim): the kernel may hold pages of an earlier life of the file; drop them.
            unchanged = _unchanged(obj, st)
            changed_behind = not unchanged and obj.seen is not None
            if changed_behind:
                self.counters.changed_behind += 1
            obj.seen = seen(st)
            obj.size = st.st_size  # before any await: a read in between cuts pages by it
            if trunc or not unchanged:
                await self.invalidate(obj)
        obj.opens += 1
        return obj, unchanged and not trunc, changed_behind

    def closed(self, obj: CachedFile) -> None:
        obj.opens -= 1

    async def check_behind(self, obj: CachedFile, fstat: Callable[[], os.stat_result]) -> None:
        """A file changed behind the mount while open (its stat differs from what the shim knows):
        nothing of it in the pool may be served.  `fstat` of an open file needs no disk."""
        if _unchanged(obj, fstat()):
            return
        async with obj.lock:  # a write of the shim's own in flight explains it: wait for it
            st = fstat()
            if _unchanged(obj, st):
                return
            self.counters.changed_behind += 1
            obj.seen = seen(st)
            obj.size = st.st_size
            await self.invalidate(obj)

    async def read(self, obj: CachedFile, off: int, size: int, backing: FileReader) -> bytes:
        """A page-in of `size` bytes at `off`: the pool first (a hit is put back), then the backing
        file (what it gave is put), all in one pass over the range."""
        c = self.counters
        # The file's size as the shim knows it now: a write or truncate may change obj.size while
        # this read waits on tmem or the disk, so every length below comes from this one value.
        known = obj.size
        end = min(off + size, known)
        if off >= end:  # past what the shim knows of the file: ask the file itself
            data = await backing.read(size, off)
            c.bytes_from_disk += len(data)
            return data
        epoch = obj.epoch
        first, last = off // PAGE, (end - 1) // PAGE
        indexes = list(range(first, last + 1))
        pages: dict[int, bytes] = {}
        for index, got in zip(indexes, await self._tmem_get(obj.oid, indexes), strict=True):
            if got is None:
                c.misses += 1
            else:
                c.hits += 1
                got = got[: page_length(known, index)]
                c.bytes_from_tmem += len(got)
                pages[index] = got
        missing = [i for i in indexes if i not in pages]
        disk: dict[int, bytes] = {}
        if missing:
            lo, hi = missing[0], missing[-1]
            data = await backing.read_dropping(min((hi - lo + 1) * PAGE, known - lo * PAGE), lo * PAGE)
            c.bytes_from_disk += len(data)
            for index in missing:
                disk[index] = data[(index - lo) * PAGE : (index - lo + 1) * PAGE]
        if obj.epoch == epoch:  # no change since `known`: what was fetched is the file's
            whole = [(i, p) for i, p in (*pages.items(), *disk.items()) if len(p) == page_length(known, i)]
            if self.put_many(obj, whole):  # one PUT_VEC for a read-ahead's pages
                backs = sum(1 for i, _ in whole if i in pages)
                c.put_backs += backs
                c.puts += len(whole) - backs
        pages.update(disk)
        parts = []
        for index in indexes:
            page = pages[index]
            parts.append(page)
            if len(page) < page_length(known, index):  # shrunk meanwhile: a short read, no gap
                break
        out = b"".join(parts)[off - first * PAGE : end - first * PAGE]
        if off + size > known and len(out) == end - off:  # the file may have grown behind us
            more = await backing.read(off + size - end, end)
            c.bytes_from_disk += len(more)
            out += more
        return out

    async def write(
        self,
        obj: CachedFile,
        off: int,
        buf: bytes,
        pwrite: Callable[[], Awaitable[tuple[int, os.stat_result]]],
    ) -> int:
        """`pwrite()` writes `buf` at `off` through to the backing file; then the pool: pages the
        write changed in part are flushed (before the write is answered), pages it fully
        determines are put (clean now).  Returns the bytes written."""
        async with obj.lock:  # writes of one file reach the pool in the order they reached it
            n, st = await pwrite()
            # The new size first, then the drop, with no await between: a read that starts after
            # this sees the new length (before, one could put the old last page cut to the old one).
            old = obj.size
            obj.seen = seen(st)
            obj.size = st.st_size
            if st.st_size < old:  # a shrink not seen here (or replies out of order): all goes
                await self.invalidate(obj)
                return n
            known, partial = written_pages(off, buf[:n], st.st_size)
            if st.st_size != old and old % PAGE and old // PAGE not in known:
                partial.add(old // PAGE)  # the old last page, cut to the old length, is longer now
            await self.invalidate(obj, partial)  # only the pages this write changed in part
            if self.put_many(obj, sorted(known.items())):  # a put replaces any older copy
                self.counters.written_puts += len(known)
            return n

    async def truncate(
        self, obj: CachedFile, apply: Callable[[], Awaitable[tuple[os.stat_result, os.stat_result]]]
    ) -> os.stat_result:
        """`apply()` changes the file's size (returns its lstat before and after), ordered with
        its writes; then nothing of the old content is kept.  Returns the lstat after."""
        async with obj.lock:
            _, st = await apply()
            # the new size at once (reads cut their pages by it), then the drop
            obj.size = st.st_size
            obj.seen = seen(st)
            await self.invalidate(obj)
        return st

    async def removed(self, st: os.stat_result) -> None:
        """The file `st` lost a name (unlink): nothing of it is cached; the next open (of another
        link) records it afresh."""
        obj = self._objects.get((st.st_dev, st.st_ino))
        if obj is not None:
            await self.invalidate(obj)
            obj.seen = None

    async def replaced(self, st: os.stat_result) -> None:
        """The file `st` was renamed over: its pages go."""
        obj = self._objects.get((st.st_dev, st.st_ino))
        if obj is not None:
            await self.invalidate(obj)

    # ----------------------------------------------------------------- counters

    def stats_json(self) -> bytes:
        """The counters as the stats extended attribute gives them."""
        c = self.counters
        c.objects = len(self._objects)
        c.connected = self.pool is not None and self.pool.connected
        return json.dumps(asdict(c)).encode()

    def report_values(self) -> dict[str, int]:
        """The counters as STATS names (`precache_*`), for a report to the host."""
        c = self.counters
        c.objects = len(self._objects)
        return {f"precache_{k}": int(v) for k, v in asdict(c).items() if k != "connected"}
