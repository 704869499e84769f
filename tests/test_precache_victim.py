"""The precache victim cache without FUSE: a fake pool handle (a dict, exclusive gets like a
private ephemeral pool) and a fake backing file drive what is got, put and flushed."""

from __future__ import annotations

import os
from collections.abc import Sequence

import pytest
import trio

from guestagent.precache import victim
from guestagent.precache.victim import PAGE, VictimCache


class FakePool:
    """A private ephemeral pool: gets are exclusive; every call is logged in `ops`."""

    def __init__(self) -> None:
        self.pages: dict[tuple[bytes, int], bytes] = {}
        self.ops: list[tuple[str, int]] = []
        self.connected = True

    def put_many_nowait(self, items: Sequence[tuple[bytes, int, bytes]]) -> None:
        for oid, index, page in items:
            assert len(page) == PAGE
            self.pages[(oid, index)] = page
            self.ops.append(("put", index))

    async def get(self, oid: bytes, index: int) -> bytes | None:
        self.ops.append(("get", index))
        return self.pages.pop((oid, index), None)

    async def get_many(self, keys: Sequence[tuple[bytes, int]]) -> list[bytes | None]:
        return [await self.get(oid, index) for oid, index in keys]

    async def flush_object(self, oid: bytes) -> None:
        self.ops.append(("flush_object", -1))
        for key in [k for k in self.pages if k[0] == oid]:
            del self.pages[key]

    async def flush_many(self, keys: Sequence[tuple[bytes, int]]) -> None:
        for key in keys:
            self.ops.append(("flush", key[1]))
            self.pages.pop(key, None)

    def indexes(self) -> list[int]:
        return sorted(i for _, i in self.pages)


class FakeFile:
    """A backing file's bytes; `reads` counts what reached the disk."""

    def __init__(self, data: bytes, ino: int = 7) -> None:
        self.data = bytearray(data)
        self.ino = ino
        self.mtime = 1
        self.reads = 0

    def stat(self) -> os.stat_result:
        m = self.mtime
        return os.stat_result((0o100644, self.ino, 3, 1, 0, 0, len(self.data), 0, m, m, 0.0, m, m, 0, m, m))

    async def read(self, size: int, offset: int) -> bytes:
        self.reads += 1
        return bytes(self.data[offset : offset + size])

    async def read_dropping(self, size: int, offset: int) -> bytes:
        return await self.read(size, offset)

    async def pwrite(self, buf: bytes, offset: int) -> tuple[int, os.stat_result]:
        end = offset + len(buf)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[offset:end] = buf
        self.mtime += 1
        return len(buf), self.stat()


def _cache() -> tuple[VictimCache, FakePool]:
    cache, pool = VictimCache(), FakePool()
    cache.pool = pool
    return cache, pool


def test_a_miss_reads_the_disk_and_puts_and_a_hit_is_put_back() -> None:
    data = bytes(range(256)) * 32 + b"tail"  # two pages and four bytes
    f = FakeFile(data)

    async def go() -> None:
        cache, pool = _cache()
        obj, keep, behind = await cache.opened(f.stat(), 0, trunc=False)
        assert not keep and not behind  # first sight: the kernel's pages (if any) are dropped
        assert await cache.read(obj, 0, len(data), f) == data
        c = cache.counters
        assert (c.gets, c.misses, c.hits, c.puts) == (3, 3, 0, 3) and f.reads == 1
        assert pool.indexes() == [0, 1, 2] and pool.pages[(obj.oid, 2)] == b"tail".ljust(PAGE, b"\0")
        assert await cache.read(obj, 0, len(data), f) == data  # the kernel dropped them: page-in again
        assert (c.hits, c.put_backs, c.bytes_from_tmem) == (3, 3, len(data)) and f.reads == 1
        assert await cache.read(obj, 0, 3 * PAGE, f) == data  # past the known end: the file is asked
        assert f.reads == 2 and c.hits == 6
        assert pool.indexes() == [0, 1, 2]  # exclusive gets: what was served is held again
        assert await cache.read(obj, PAGE + 10, 20, f) == data[PAGE + 10 : PAGE + 30]

    trio.run(go)


def test_without_a_pool_reads_come_from_the_disk_and_nothing_is_asked() -> None:
    f = FakeFile(b"x" * PAGE)

    async def go() -> None:
        cache = VictimCache()
        obj, _, _ = await cache.opened(f.stat(), 0, trunc=False)
        assert await cache.read(obj, 0, PAGE, f) == b"x" * PAGE
        assert (cache.counters.gets, cache.counters.puts, cache.counters.bytes_from_disk) == (0, 0, PAGE)
        assert cache.report_values()["precache_objects"] == 1
        assert b'"connected": false' in cache.stats_json()

    trio.run(go)


def test_a_write_flushes_the_pages_it_changed_in_part_and_puts_those_it_determined() -> None:
    f = FakeFile(b"a" * (3 * PAGE))

    async def go() -> None:
        cache, pool = _cache()
        obj, _, _ = await cache.opened(f.stat(), 0, trunc=False)
        await cache.read(obj, 0, 3 * PAGE, f)
        pool.ops.clear()
        buf = b"b" * (PAGE + 100)  # page 1 whole, page 2 in part
        n = await cache.write(obj, PAGE, buf, lambda: f.pwrite(buf, PAGE))
        assert n == len(buf)
        assert pool.ops == [("flush", 2), ("put", 1)]  # the flush before the put, both before the answer
        assert pool.pages[(obj.oid, 1)] == b"b" * PAGE and cache.counters.written_puts == 1
        assert await cache.read(obj, 2 * PAGE, PAGE, f) == b"b" * 100 + b"a" * (PAGE - 100)

    trio.run(go)


def test_a_truncate_and_a_change_behind_the_mount_flush_the_object() -> None:
    f = FakeFile(b"a" * (2 * PAGE))

    async def go() -> None:
        cache, pool = _cache()
        obj, _, _ = await cache.opened(f.stat(), 0, trunc=False)
        await cache.read(obj, 0, 2 * PAGE, f)

        async def shrink() -> tuple[os.stat_result, os.stat_result]:
            before = f.stat()
            del f.data[PAGE:]
            f.mtime += 1
            return before, f.stat()

        await cache.truncate(obj, shrink)
        assert pool.pages == {} and obj.size == PAGE and cache.counters.flushes == 1
        await cache.read(obj, 0, PAGE, f)
        f.data[:] = b"c" * PAGE  # changed behind the mount: same size, new mtime
        f.mtime += 1
        await cache.check_behind(obj, f.stat)
        assert cache.counters.changed_behind == 1 and pool.pages == {}
        assert await cache.read(obj, 0, PAGE, f) == b"c" * PAGE
        await cache.check_behind(obj, f.stat)  # as known now: nothing more is flushed
        assert cache.counters.changed_behind == 1 and pool.indexes() == [0]

    trio.run(go)


def test_a_reopen_keeps_the_kernel_cache_only_if_the_file_is_as_seen() -> None:
    f = FakeFile(b"a" * PAGE)

    async def go() -> None:
        cache, pool = _cache()
        obj, keep, _ = await cache.opened(f.stat(), 0, trunc=False)
        await cache.read(obj, 0, PAGE, f)
        cache.closed(obj)
        again, keep, behind = await cache.opened(f.stat(), 0, trunc=False)
        assert again is obj and keep and not behind and pool.indexes() == [0]
        f.mtime += 1
        _, keep, behind = await cache.opened(f.stat(), 0, trunc=False)
        assert not keep and behind and pool.indexes() == [] and cache.counters.changed_behind == 1
        _, keep, _ = await cache.opened(f.stat(), 1, trunc=False)  # a new generation: a new file
        assert not keep and cache.get((3, f.ino)) is not obj

    trio.run(go)


def test_a_read_that_raced_an_invalidation_puts_nothing() -> None:
    f = FakeFile(b"a" * PAGE)

    async def go() -> None:
        cache, pool = _cache()
        obj, _, _ = await cache.opened(f.stat(), 0, trunc=False)

        class Racing(FakeFile):
            async def read_dropping(self, size: int, offset: int) -> bytes:
                data = await super().read_dropping(size, offset)
                await cache.invalidate(obj)  # a write or truncate landed while the disk read ran
                return data

        racing = Racing(bytes(f.data))
        assert await cache.read(obj, 0, PAGE, racing) == b"a" * PAGE
        assert pool.pages == {} and cache.counters.puts == 0

    trio.run(go)


def test_forgotten_files_keep_their_pages_up_to_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(victim, "FORGOTTEN_OBJECTS", 2)
    files = [FakeFile(b"a" * PAGE, ino=i) for i in range(4)]

    async def go() -> None:
        cache, pool = _cache()
        for f in files:
            obj, _, _ = await cache.opened(f.stat(), 0, trunc=False)
            await cache.read(obj, 0, PAGE, f)
            cache.closed(obj)
        never_put = FakeFile(b"", ino=9)
        cache.object_for(never_put.stat())
        cache.forgotten((3, 9))  # nothing in tmem: its object goes at once
        assert cache.get((3, 9)) is None
        for f in files:
            cache.forgotten((3, f.ino))
        await cache.trim(lambda key: key == (3, 1))  # the kernel knows ino 1 again
        assert [f.ino for f in files if cache.get((3, f.ino)) is not None] == [1, 2, 3]
        assert len(pool.pages) == 3  # the oldest went with its page in the pool

    trio.run(go)
