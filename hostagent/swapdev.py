"""A guest's swap device: pages in the guest's private persistent pool, else in a sparse spill file.

frontswap's semantics over a block device (docs/preswap-device.md): a page written goes to the pool when
the guest's quota and the host's budget allow, else to the spill file on host storage, and is never
lost; a page read comes from the pool, then the spill file, else it is zeros; TRIM and WRITE_ZEROES
free the pool page and punch the spill file. The pool is a private persistent pool whose id is outside
the wire's u32 range, so the guest's own channel can never name it: only the host agent's NBD server
(QEMU's client, a host process) reaches it. The engine's persistent pages survive a host-agent restart,
the spill file is a plain file: both survive a SIGKILL, so every acknowledged write does.

The engine is used on the agent's event loop; the spill file's I/O runs in a worker thread (the
loop's default executor, where metrics renders too), so a slow disk stalls only this device's
requests, never the loop that serves every guest. Each operation holds the device's lock across its
awaits, so a host-side shrink and the guest's requests never interleave on a page.

Order of writes, so that no crash leaves an older copy readable over a newer one: a page stored in the
pool is then punched from the spill file (until then the pool copy, read first, wins); a page refused
by the pool has already lost its older pool copy (the engine's contract) before it is written to the
spill file; a page shrunk to storage is written and synced there before its pool copy goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag

from .nbd import EIO, NbdError
from .pool import Client, EngineError, PoolEngine
from .spillfile import SpillFile

DEVICE_POOL: Final = -1  # the device's pool id in its guest's client: not expressible on the wire
SHRINK_BATCH: Final = 256  # pages moved to storage per hold of the lock (1 MiB): guest I/O goes between
_ZERO: Final = bytes(PAGE_SIZE)
_INDEX_BITS: Final = 32
_T = TypeVar("_T")


def page_key(page: int) -> tuple[bytes, int]:
    """The pool key of device page `page`: object id from the high bits, index the low 32."""
    return (page >> _INDEX_BITS).to_bytes(24, "little"), page & ((1 << _INDEX_BITS) - 1)


@dataclass
class DeviceCounters:
    puts: int = 0  # pages written into the pool
    refusals: int = 0  # pages the pool refused: written to the spill file
    gets: int = 0  # pages read from the pool
    spill_reads: int = 0  # pages read from the spill file
    spill_writes: int = 0  # pages written to the spill file (refusals and shrinks)
    trims: int = 0  # pages freed by TRIM or WRITE_ZEROES
    shrunk: int = 0  # pages moved from the pool to the spill file by the host


class SwapDevice:
    """One guest's device: the NBD backend (`nbd.Backend`) over the engine and a spill file.

    Opening it reads the spill file's extent map (pages on storage from a previous run) on the
    caller's thread: once per guest and agent run, before any I/O of the guest's.
    """

    def __init__(self, engine: PoolEngine, client: Client, spill: SpillFile, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"device size {size} is not a positive multiple of {PAGE_SIZE}")
        self.engine = engine
        self.client = client
        self.size = size
        self.spill = spill
        self.counters = DeviceCounters()
        self.lock = asyncio.Lock()
        if DEVICE_POOL not in client.pools:
            engine.new_pool(client, PoolFlag.PERSISTENT, pool_id=DEVICE_POOL)
        self._dirty = False
        self._io_running = 0
        self._closed = False
        # Pages on storage. One also in the pool (a crash between a pool put and its punch) keeps the
        # pool's copy, which is newer.
        found = {p for p in spill.pages() if p * PAGE_SIZE < size}
        both = [p for p in found if self._in_pool(p)]
        spill.punch(both)
        self.spilled = found.difference(both)

    @property
    def spill_path(self) -> Path:
        return self.spill.path

    # -- the worker thread ----------------------------------------------------------------------

    async def _io(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run spill-file I/O in a worker thread. The caller's lock is held until the thread's call
        is back, even if the caller is cancelled (at shutdown): two calls on one page must never
        overlap. A device closed meanwhile closes its file once no call runs (never under one: its
        fd number could be reused)."""
        if self._closed:
            raise NbdError(EIO, "the device was released")
        self._io_running += 1
        call = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        call.add_done_callback(self._io_done)
        try:
            return await asyncio.shield(call)
        except OSError as err:
            raise NbdError(EIO, f"spill file {self.spill.path}: {err.strerror}") from None
        except asyncio.CancelledError:
            await asyncio.wait([call])
            raise

    def _io_done(self, call: asyncio.Future[Any]) -> None:
        if not call.cancelled():
            call.exception()  # retrieved here too: a cancelled caller no longer reads it
        self._io_running -= 1
        if self._closed and not self._io_running:
            self.spill.close()

    # -- pages (callers hold the lock) ----------------------------------------------------------

    def _in_pool(self, page: int) -> bool:
        oid, index = page_key(page)
        pages = self.client.pools[DEVICE_POOL].objects.get(oid)
        return pages is not None and index in pages

    @property
    def pool_pages(self) -> int:
        pool = self.client.pools.get(DEVICE_POOL)
        return 0 if pool is None else sum(len(p) for p in pool.objects.values())

    async def _read_pages(self, pages: Sequence[int]) -> list[bytes]:
        out: list[bytes] = []
        from_spill: list[int] = []  # positions in `out` to fill from the spill file
        for page in pages:
            oid, index = page_key(page)
            try:
                data = self.engine.get(self.client, DEVICE_POOL, oid, index)
            except EngineError as err:  # the pool went (the domain was destroyed meanwhile)
                raise NbdError(EIO, str(err)) from None
            if data is not None:
                self.counters.gets += 1
            elif page in self.spilled:
                from_spill.append(len(out))
            out.append(_ZERO if data is None else data)
        if from_spill:
            got = await self._io(self.spill.read, [pages[i] for i in from_spill])
            for i, data in zip(from_spill, got, strict=True):
                out[i] = data
            self.counters.spill_reads += len(from_spill)
        return out

    async def _write_pages(self, pages: Iterable[tuple[int, bytes]]) -> None:
        """Pool first; the refused pages to the spill file, and stored pages punched out of it, in
        one call of the worker thread."""
        refused: list[tuple[int, bytes]] = []
        punch: list[int] = []
        for page, data in pages:
            oid, index = page_key(page)
            try:
                stored = self.engine.put(self.client, DEVICE_POOL, oid, index, data)
            except EngineError as err:
                raise NbdError(EIO, str(err)) from None
            if stored:
                self.counters.puts += 1
                if page in self.spilled:
                    punch.append(page)
            else:
                self.counters.refusals += 1
                refused.append((page, data))
        if refused or punch:
            await self._io(self.spill.update, refused, punch)
            self.spilled.difference_update(punch)
            self.spilled.update(page for page, _ in refused)
            self.counters.spill_writes += len(refused)
            self._dirty = self._dirty or bool(refused)

    async def _write(self, offset: int, data: bytes) -> None:
        pos, end = offset, offset + len(data)
        view = memoryview(data)
        whole: list[tuple[int, bytes]] = []
        while pos < end:
            page, skip = divmod(pos, PAGE_SIZE)
            n = min(PAGE_SIZE - skip, end - pos)
            chunk = view[pos - offset : pos - offset + n]
            if n == PAGE_SIZE:
                whole.append((page, bytes(chunk)))
            else:  # a sub-page write: read, modify, write (a page no other part of `data` touches)
                old = bytearray((await self._read_pages([page]))[0])
                old[skip : skip + n] = chunk
                whole.append((page, bytes(old)))
            pos += n
        await self._write_pages(whole)

    async def _free(self, pages: range) -> None:
        punch: list[int] = []
        for page in pages:
            oid, index = page_key(page)
            on_storage = page in self.spilled
            present = on_storage or self._in_pool(page)
            try:
                self.engine.flush_page(self.client, DEVICE_POOL, oid, index)
            except EngineError as err:
                raise NbdError(EIO, str(err)) from None
            if on_storage:
                punch.append(page)
            if present:
                self.counters.trims += 1
        if punch:
            await self._io(self.spill.punch, punch)
            self.spilled.difference_update(punch)

    async def _sync(self) -> None:
        if self._dirty:
            await self._io(self.spill.sync)
            self._dirty = False

    # -- nbd.Backend ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if length == 0:
            return b""
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        async with self.lock:
            data = b"".join(await self._read_pages(range(first, last + 1)))
        start = offset - first * PAGE_SIZE
        return data[start : start + length]

    async def write(self, offset: int, data: bytes, fua: bool) -> None:
        async with self.lock:
            await self._write(offset, data)
            if fua:
                await self._sync()

    async def trim(self, offset: int, length: int) -> None:
        """Free the whole pages in the range (TRIM is advisory: partial pages keep their data)."""
        async with self.lock:
            await self._free(range(-(-offset // PAGE_SIZE), (offset + length) // PAGE_SIZE))

    async def write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        first, last = -(-offset // PAGE_SIZE), end // PAGE_SIZE  # whole pages: [first, last)
        async with self.lock:
            if first >= last:
                await self._write(offset, bytes(length))
                return
            if offset < first * PAGE_SIZE:
                await self._write(offset, bytes(first * PAGE_SIZE - offset))
            await self._free(range(first, last))
            if end > last * PAGE_SIZE:
                await self._write(last * PAGE_SIZE, bytes(end - last * PAGE_SIZE))

    async def flush(self) -> None:
        """Pool pages are durable against a host-agent crash as soon as stored; the spill file is
        synced here (FLUSH, FUA), against a host crash too."""
        async with self.lock:
            await self._sync()

    # -- host side ------------------------------------------------------------------------------

    def _victims(self, n: int) -> list[int]:
        pool = self.client.pools.get(DEVICE_POOL)
        victims: list[int] = []
        if pool is None:
            return victims
        for oid, idx in pool.objects.items():
            high = int.from_bytes(oid, "little") << _INDEX_BITS
            victims.extend(high | i for i in list(idx)[: n - len(victims)])
            if len(victims) >= n:
                break
        return victims

    async def shrink(self, pages: int) -> int:
        """Move up to `pages` pages from the pool to the spill file (the host needs the memory), in
        batches: each is written and synced before its pool copies go. Pages moved."""
        moved = 0
        while moved < pages:
            async with self.lock:
                batch: list[tuple[int, bytes]] = []
                for page in self._victims(min(SHRINK_BATCH, pages - moved)):
                    oid, index = page_key(page)
                    data = self.engine.get(self.client, DEVICE_POOL, oid, index)
                    if data is not None:
                        batch.append((page, data))
                if not batch:
                    break
                try:
                    await self._io(self.spill.update, batch, (), True)
                except NbdError:  # the pages stay in the pool
                    if self._closed:  # released meanwhile
                        break
                    raise  # the disk failed
                self.spilled.update(page for page, _ in batch)
                if DEVICE_POOL not in self.client.pools:  # released meanwhile
                    break
                for page, _ in batch:
                    oid, index = page_key(page)
                    self.engine.flush_page(self.client, DEVICE_POOL, oid, index)
                self.counters.spill_writes += len(batch)
                self.counters.shrunk += len(batch)
                moved += len(batch)
        return moved

    def counter_values(self) -> dict[str, int]:
        """The counters and page counts (what a guest may learn of its own device)."""
        c = self.counters
        return {
            "size_bytes": self.size,
            "puts": c.puts,
            "refusals": c.refusals,
            "gets": c.gets,
            "spill_reads": c.spill_reads,
            "spill_writes": c.spill_writes,
            "trims": c.trims,
            "shrunk": c.shrunk,
            "pool_pages": self.pool_pages,
            "storage_pages": len(self.spilled),
        }

    def figures(self) -> dict[str, Any]:
        return {**self.counter_values(), "spill_file": str(self.spill_path)}

    def close(self) -> None:
        """No more I/O; the file closes now, or when the worker's running call is back."""
        self._closed = True
        if not self._io_running:
            self.spill.close()

    def destroy(self) -> None:
        """The guest is gone: its pool pages (if the engine has not dropped them) and spill file."""
        if DEVICE_POOL in self.client.pools:
            self.engine.destroy_pool(self.client, DEVICE_POOL)
        self.close()
        self.spill.path.unlink(missing_ok=True)
        self.spilled.clear()


__all__ = ["DEVICE_POOL", "DeviceCounters", "SwapDevice", "page_key"]
