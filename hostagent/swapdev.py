"""A guest's swap device: pages in the guest's private persistent pool, else in a sparse spill file.

frontswap's semantics over a block device (docs/preswap-device.md): a page written goes to the pool when
the guest's quota and the host's budget allow, else to the spill file on host storage, and is never
lost; a page read comes from the pool, then the spill file, else it is zeros; TRIM and WRITE_ZEROES
free the pool page and punch the spill file. The pool is a private persistent pool whose id is outside
the wire's u32 range, so the guest's own channel can never name it: only the host agent's NBD server
(QEMU's client, a host process) reaches it. The engine's persistent pages survive a host-agent restart,
the spill file is a plain file: both survive a SIGKILL, so every acknowledged write does.

Order of writes, so that no crash leaves an older copy readable over a newer one: a page stored in the
pool is then punched from the spill file (until then the pool copy, read first, wins); a page refused
by the pool has already lost its older pool copy (the engine's contract) before it is written to the
spill file.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag

from .nbd import EIO, NbdError
from .pool import Client, EngineError, PoolEngine

log = logging.getLogger("hostagent.swapdev")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_PUNCH: Final = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE (Python has no wrapper)

DEVICE_POOL: Final = -1  # the device's pool id in its guest's client: not expressible on the wire
_ZERO: Final = bytes(PAGE_SIZE)
_INDEX_BITS: Final = 32


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
    """One guest's device: the NBD backend (`nbd.Backend`) over the engine and a spill file."""

    def __init__(self, engine: PoolEngine, client: Client, spill_path: Path, size: int) -> None:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"device size {size} is not a positive multiple of {PAGE_SIZE}")
        self.engine = engine
        self.client = client
        self.size = size
        self.spill_path = spill_path
        self.counters = DeviceCounters()
        if DEVICE_POOL not in client.pools:
            engine.new_pool(client, PoolFlag.PERSISTENT, pool_id=DEVICE_POOL)
        spill_path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(spill_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < size:
            os.ftruncate(self._fd, size)
        self._dirty = False
        self.spilled: set[int] = set()  # pages whose data is in the spill file
        self._scan_spill()

    # -- start ----------------------------------------------------------------------------------

    def _scan_spill(self) -> None:
        """Pages on storage from a previous run: the spill file's data extents. A page also in the
        pool (a crash between the pool put and the punch) keeps its pool copy, which is newer."""
        end = os.fstat(self._fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(self._fd, start, os.SEEK_HOLE)
            self.spilled.update(range(start // PAGE_SIZE, -(-stop // PAGE_SIZE)))
            pos = stop
        both = [p for p in self.spilled if self._in_pool(p)]
        for p in both:
            self._punch(p)
        self.spilled.difference_update(both)
        self.spilled = {p for p in self.spilled if p * PAGE_SIZE < self.size}

    # -- pages ----------------------------------------------------------------------------------

    def _in_pool(self, page: int) -> bool:
        oid, index = page_key(page)
        pages = self.client.pools[DEVICE_POOL].objects.get(oid)
        return pages is not None and index in pages

    @property
    def pool_pages(self) -> int:
        pool = self.client.pools.get(DEVICE_POOL)
        return 0 if pool is None else sum(len(p) for p in pool.objects.values())

    def read_page(self, page: int) -> bytes:
        oid, index = page_key(page)
        try:
            data = self.engine.get(self.client, DEVICE_POOL, oid, index)
        except EngineError as err:  # the pool went (the domain was destroyed meanwhile)
            raise NbdError(EIO, str(err)) from None
        if data is not None:
            self.counters.gets += 1
            return data
        if page in self.spilled:
            self.counters.spill_reads += 1
            data = os.pread(self._fd, PAGE_SIZE, page * PAGE_SIZE)
            return data + bytes(PAGE_SIZE - len(data))
        return _ZERO

    def write_page(self, page: int, data: bytes) -> None:
        oid, index = page_key(page)
        try:
            stored = self.engine.put(self.client, DEVICE_POOL, oid, index, data)
        except EngineError as err:
            raise NbdError(EIO, str(err)) from None
        if stored:
            self.counters.puts += 1
            if page in self.spilled:
                self._punch(page)
                self.spilled.discard(page)
        else:
            self.counters.refusals += 1
            self._spill(page, data)

    def _spill(self, page: int, data: bytes) -> None:
        try:
            os.pwrite(self._fd, data, page * PAGE_SIZE)
        except OSError as err:
            raise NbdError(EIO, f"spill file {self.spill_path}: {err.strerror}") from None
        self.spilled.add(page)
        self.counters.spill_writes += 1
        self._dirty = True

    def _punch(self, page: int) -> None:
        if _libc.fallocate(self._fd, _PUNCH, page * PAGE_SIZE, PAGE_SIZE) != 0:
            os.pwrite(self._fd, _ZERO, page * PAGE_SIZE)  # a file system without holes

    def free_page(self, page: int) -> None:
        oid, index = page_key(page)
        present = page in self.spilled or self._in_pool(page)
        try:
            self.engine.flush_page(self.client, DEVICE_POOL, oid, index)
        except EngineError as err:
            raise NbdError(EIO, str(err)) from None
        if page in self.spilled:
            self._punch(page)
            self.spilled.discard(page)
        if present:
            self.counters.trims += 1

    # -- nbd.Backend ----------------------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        if length == 0:
            return b""
        data = b"".join(self.read_page(p) for p in range(first, last + 1))
        start = offset - first * PAGE_SIZE
        return data[start : start + length]

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        pos, end = offset, offset + len(data)
        view = memoryview(data)
        while pos < end:
            page, skip = divmod(pos, PAGE_SIZE)
            n = min(PAGE_SIZE - skip, end - pos)
            chunk = view[pos - offset : pos - offset + n]
            if n == PAGE_SIZE:
                self.write_page(page, bytes(chunk))
            else:  # a sub-page write: read, modify, write
                old = bytearray(self.read_page(page))
                old[skip : skip + n] = chunk
                self.write_page(page, bytes(old))
            pos += n
        if fua:
            self.flush()

    def trim(self, offset: int, length: int) -> None:
        """Free the whole pages in the range (TRIM is advisory: partial pages keep their data)."""
        for page in range(-(-offset // PAGE_SIZE), (offset + length) // PAGE_SIZE):
            self.free_page(page)

    def write_zeroes(self, offset: int, length: int) -> None:
        end = offset + length
        first, last = -(-offset // PAGE_SIZE), end // PAGE_SIZE  # whole pages: [first, last)
        if first >= last:
            self.write(offset, bytes(length), False)
            return
        if offset < first * PAGE_SIZE:
            self.write(offset, bytes(first * PAGE_SIZE - offset), False)
        for page in range(first, last):
            self.free_page(page)
        if end > last * PAGE_SIZE:
            self.write(last * PAGE_SIZE, bytes(end - last * PAGE_SIZE), False)

    def flush(self) -> None:
        """Pool pages are durable against a host-agent crash as soon as stored; the spill file is
        synced here (FLUSH, FUA), against a host crash too."""
        if self._dirty:
            try:
                os.fdatasync(self._fd)
            except OSError as err:
                raise NbdError(EIO, f"spill file {self.spill_path}: {err.strerror}") from None
            self._dirty = False

    # -- host side ------------------------------------------------------------------------------

    def shrink(self, pages: int) -> int:
        """Move up to `pages` pages from the pool to the spill file (the host needs the memory)."""
        pool = self.client.pools.get(DEVICE_POOL)
        if pool is None:
            return 0
        victims: list[int] = []
        for oid, idx in pool.objects.items():
            high = int.from_bytes(oid, "little") << _INDEX_BITS
            victims.extend(high | i for i in list(idx)[: pages - len(victims)])
            if len(victims) >= pages:
                break
        for page in victims:
            oid, index = page_key(page)
            data = self.engine.get(self.client, DEVICE_POOL, oid, index)
            if data is None:
                continue
            self._spill(page, data)
            self.engine.flush_page(self.client, DEVICE_POOL, oid, index)
            self.counters.shrunk += 1
        self.flush()
        return len(victims)

    def figures(self) -> dict[str, Any]:
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
            "spill_file": str(self.spill_path),
        }

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def destroy(self) -> None:
        """The guest is gone: its pool pages (if the engine has not dropped them) and spill file."""
        if DEVICE_POOL in self.client.pools:
            self.engine.destroy_pool(self.client, DEVICE_POOL)
        self.close()
        self.spill_path.unlink(missing_ok=True)
        self.spilled.clear()


__all__ = ["DEVICE_POOL", "DeviceCounters", "SwapDevice", "page_key"]
