"""The agent side of preswap: resolves the faults of applications' regions and evicts their pages.

An application (`guestagent.preswap.Region`) maps a memfd, registers it with userfaultfd and
sends both fds here.  From then on every first touch of a page, and every touch of an evicted
page, is a fault this process resolves; the application's own process never handles a fault
(a Python thread faulting while holding the GIL would deadlock its handler).

Per region, pages are in one of these states:

- ZERO: never written (or found all-zero when evicted): a fault is resolved with UFFDIO_ZEROPAGE;
- RESIDENT: in the memfd's page cache, mapped by the application;
- EVICTING: write-protected while its put is in flight (a writer faults and waits);
- TMEM / DISK: held by the host (persistent pool, exclusive gets) or in the swap file;
- LOADING: a fault's get (or disk read) is in flight.

Eviction keeps each region within its resident budget, cut to its share of the guest's budget
when one is set (`set_guest_budget`: the daemon follows memory pressure with it).  Victims come
from a clock over the resident pages in fault order; a page faulted back in after an eviction
earns chances on the clock, one more per refault up to 3 (a count kept across evictions), so
pages that keep coming back stay longer (fault history is all we see of accesses).  Measured on
an 80/20 workload (scripts/bench_preswap.py): ~25% fewer refaults than FIFO.  A victim is
write-protected (so a racing write cannot be lost), read through our own mapping of the memfd,
put (a batch per PUT_VEC), then punched out of the memfd with fallocate(PUNCH_HOLE); a refused
put goes to the swap file first.  Nothing is ever dropped: a page leaves the memfd only once
tmem or the disk holds it.

Closing the region's socket (the application's exit, even by SIGKILL) releases it: its pages are
flushed from tmem (one FLUSH_OBJECT: the region is one object) and its swap-file slots freed.

The pool's id is kept in a state file beside the swap file while it exists: persistent pools
outlive their session, so a swapper killed (or a guest rebooted) would leave its pool on the host
for as long as the guest lives.  The next swapper destroys that pool before it makes its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import mmap
import os
import select
import socket
import time
from collections.abc import Mapping
from typing import Any, Final

import trio

from guestagent import uffd
from guestagent.channel import Channel, ChannelError, PoolHandle
from guestagent.channel.sched import hold_budget
from guestagent.pressure import follow_meminfo
from guestagent.preswap_socket import privileged, read_request, reply
from guestagent.protocol import wire
from guestagent.regionbook import (
    DISK,
    EVICTING,
    LOADING,
    REGION_COUNTERS,
    RESIDENT,
    TMEM,
    ZERO,
    RegionBook,
    pressure_budget,
    runs,
    shares,
)
from guestagent.swapfile import SwapFile, punch_hole, write_all

__all__ = ["Region", "RegionLost", "Swapper", "follow_pressure"]

log = logging.getLogger(__name__)

PAGE: Final = uffd.PAGE_SIZE
EVICT_BATCH: Final = 64  # pages per eviction round (one PUT_VEC)
_READ_EVENTS: Final = 64  # uffd messages per read
# a fault loop with nothing else runnable waits for the next fault in poll(2) rather than the event
# loop, for FAULT_WAIT at most and FAULT_SLICE in all between two passes of the event loop
FAULT_WAIT: Final = 0.002
FAULT_SLICE: Final = 0.005

_ZERO_PAGE: Final = bytes(PAGE)

POLICIES: Final = ("clock", "fifo")  # eviction: second chance for refaulted pages, or plain FIFO
READAHEAD: Final = 16  # most pages one sequential tmem fault brings in (1: no readahead)
STOP_TIMEOUT: Final = 5.0  # seconds the shutdown may wait for the host agent
STATE_SUFFIX: Final = ".pool"  # the pool's id, in a file beside the swap file
SHRINK_BATCH: Final = 256  # pages per GET_VEC when moving pages out of tmem


class RegionLost(OSError):
    """A page of the region cannot be had back: the region ends (its process gets SIGBUS)."""


class Region(RegionBook):
    """One application region as the agent sees it: its bookkeeping (`RegionBook`), plus the
    uffd, the memfd, our mapping of it and the tasks' events."""

    def __init__(self, rid: int, addr: int, size: int, budget: int, memfd: int, ufd: int) -> None:
        super().__init__(rid, size // PAGE, budget)
        self.oid = rid.to_bytes(len(wire.NO_OID), "little")
        self.addr = addr
        self.size = size
        self.memfd = memfd
        self.uffd = ufd
        self.mm = mmap.mmap(memfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.staging = ctypes.create_string_buffer(PAGE)  # UFFDIO_COPY's source
        self.staging_addr = ctypes.addressof(self.staging)
        self.put_scope: trio.CancelScope | None = None  # the evictor's put while one is in flight
        self.wp_waiting: set[int] = set()  # EVICTING pages a writer waits on (its WP fault seen)
        self.need_evict = trio.Event()
        self.room = trio.Event()
        self.scope = trio.CancelScope()  # the region's tasks; cancelled to end it
        self.failure: BaseException | None = None  # why it ended, if not by its process

    def end(self, why: BaseException) -> None:
        """End the region from any task: it is released (and its process gets SIGBUS on a touch)."""
        if self.failure is None:
            self.failure = why
        self.scope.cancel()

    def close(self) -> None:
        # Truncated first: once our uffd is closed the application's mapping is a plain one,
        # and a thread still using it must get SIGBUS, never zeros where its data was.
        os.ftruncate(self.memfd, 0)
        self.mm.close()
        os.close(self.memfd)
        os.close(self.uffd)


class Swapper:
    """Serves preswap regions over a local unix socket, backed by one persistent tmem pool."""

    def __init__(
        self,
        channel: Channel,
        socket_path: str,
        swap_path: str,
        *,
        default_budget: int = 1024,
        guest_budget: int | None = None,
        policy: str = "clock",
        readahead: int = READAHEAD,
        state_path: str | None = None,
    ) -> None:
        self.readahead = max(1, readahead)
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}")
        self.second_chance = policy == "clock"
        self.channel = channel
        self.socket_path = socket_path
        self.swap = SwapFile(swap_path)
        self.state_path = state_path if state_path is not None else swap_path + STATE_SUFFIX
        self.default_budget = default_budget
        self.guest_budget = guest_budget  # resident pages for all regions together (None: no cap)
        self.pool: PoolHandle | None = None
        self.regions: dict[int, Region] = {}
        self.next_id = 1
        self.totals = dict.fromkeys(REGION_COUNTERS, 0)
        self.released = 0
        self.stop_deadline = math.inf  # set by stop(): releases no longer wait for the host agent

    # ----------------------------------------------------------------- serving

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        flags = int(wire.PoolFlag.PERSISTENT | wire.PoolFlag.EXCLUSIVE_GETS)
        await self._destroy_predecessor(flags)
        self.pool = await self.channel.new_pool(flags)
        _write_state(self.state_path, self.pool.remote_id)
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if os.path.exists(self.socket_path):
                os.unlink(self.socket_path)
            await listener.bind(self.socket_path)
            os.chmod(self.socket_path, 0o666)
            listener.listen(64)
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._client, conn)
        finally:
            listener.close()
            self.swap.close()
            pool = self.pool
            if pool is not None:
                deadline = min(self.stop_deadline, trio.current_time() + STOP_TIMEOUT)
                with trio.CancelScope(shield=True), trio.move_on_at(deadline):
                    try:
                        await pool.destroy()
                    except ChannelError as exc:
                        log.warning("cannot destroy the preswap pool: %s", exc)
                    else:  # gone: nothing for the next swapper to clean up
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(self.state_path)

    async def _destroy_predecessor(self, flags: int) -> None:
        """Destroy the pool a previous swapper left (its state file says which), if the host still
        has it: its regions' processes are gone, and its pages would stay until the guest goes."""
        try:
            with open(self.state_path) as f:
                old = int(json.load(f)["pool"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring the preswap state file %s: %s", self.state_path, exc)
        else:
            pool = await self.channel.reclaim_pool(old, flags)
            if pool is not None:
                await pool.destroy()
                log.warning("destroyed preswap pool %d, left on the host by a previous run", old)
        os.unlink(self.state_path)

    async def _client(self, conn: trio.socket.SocketType) -> None:
        """One application connection; nothing it does may stop the other regions."""
        try:
            await self._serve_client(conn)
        except OSError as exc:  # e.g. it went away before our reply
            log.info("preswap client: %s", exc)
        except Exception:
            log.exception("preswap client failed")

    async def _serve_client(self, conn: trio.socket.SocketType) -> None:
        with conn:
            try:
                line, fds = await read_request(conn)
            except (OSError, ValueError) as exc:
                log.warning("bad preswap request: %s", exc)
                return
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("a request is a JSON object")
                cmd = req.get("cmd")
                if cmd == "stats":
                    await reply(conn, {"ok": True, **self.stats()})
                elif cmd in ("shrink", "budget") and not privileged(conn):
                    raise ValueError(f"{cmd}: only root or the agent's user may ask for it")
                elif cmd == "shrink":
                    pages = req.get("pages")
                    if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
                        raise ValueError("shrink: pages must be a number >= 0")
                    await reply(conn, {"ok": True, "moved": await self.shrink(pages)})
                elif cmd == "budget":
                    pages = req.get("pages")
                    if pages is not None and (isinstance(pages, bool) or not isinstance(pages, int)):
                        raise ValueError("budget: pages must be a number of pages or null")
                    self.set_guest_budget(pages)
                    await reply(conn, {"ok": True, "guest_budget": self.guest_budget})
                elif cmd == "region":
                    mine, fds = fds, []
                    await self._serve_region(conn, req, mine)
                else:
                    await reply(conn, {"ok": False, "error": f"unknown command {cmd!r}"})
            except (ValueError, KeyError, TypeError, uffd.UffdError) as exc:
                await reply(conn, {"ok": False, "error": str(exc)})
            finally:
                for fd in fds:
                    os.close(fd)

    async def _serve_region(self, conn: trio.socket.SocketType, req: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ValueError("a region request carries two fds: the memfd and the uffd")
        memfd, ufd = fds
        try:
            size, addr = int(req["size"]), int(req["addr"])
            budget = int(req.get("budget") or self.default_budget)
            if size <= 0 or size % PAGE or addr % PAGE or size // PAGE >= 1 << 32 or budget < 1:
                raise ValueError("size and addr must be page multiples, budget >= 1 page")
            if os.fstat(memfd).st_size < size:
                raise ValueError("the memfd is smaller than the region")
            region = Region(self.next_id, addr, size, budget, memfd, ufd)
        except BaseException:
            os.close(memfd)
            os.close(ufd)
            raise
        self.next_id += 1
        self.regions[region.id] = region
        self.rebalance()
        log.info("region %d: %d pages, budget %d", region.id, region.pages, budget)
        try:
            with region.scope:
                async with trio.open_nursery() as nursery:

                    async def guarded(task: Any, *args: Any) -> None:
                        # a uffd call failing (the application unmapped or died) ends the region;
                        # caught here, so no exception group reaches us (trio >= 0.25 makes them)
                        try:
                            await task(*args)
                        except (OSError, ChannelError) as exc:
                            region.end(exc)

                    nursery.start_soon(guarded, self._faults, region, nursery)
                    nursery.start_soon(guarded, self._evictor, region)
                    try:
                        await reply(conn, {"ok": True, "id": region.id})
                        # the application keeps the socket open for the region's lifetime
                        while await conn.recv(4096):
                            pass
                    except OSError as exc:
                        region.end(exc)
                    region.scope.cancel()
            why = region.failure
            if why is not None:
                level = logging.ERROR if isinstance(why, RegionLost | ChannelError) else logging.INFO
                log.log(level, "region %d ended: %s", region.id, why)
        finally:
            with trio.CancelScope(shield=True):
                await self._release(region)

    async def _release(self, region: Region) -> None:
        """Flush the region's pages from tmem and the swap file, then forget it."""
        pool = self.pool
        assert pool is not None
        # a flush waits for a missing host agent (it must happen), except when we are stopping
        with trio.move_on_at(self.stop_deadline) as waited:
            try:
                await pool.flush_object(region.oid)
            except ChannelError as exc:
                log.warning("region %d: cannot flush its tmem pages: %s", region.id, exc)
        if waited.cancelled_caught:
            log.warning("region %d: host agent away while stopping; its tmem pages stay", region.id)
        for slot in region.slots.values():
            self.swap.release(slot)
        region.slots.clear()
        region.held_tmem = region.held_disk = 0
        for key, value in region.counters.items():
            self.totals[key] += value
        self.released += 1
        del self.regions[region.id]
        self.rebalance()
        region.close()
        log.info("region %d released", region.id)

    def stop(self) -> None:
        """Say that the swapper is being shut down (call before cancelling `run`): the releases of
        its regions and the pool's destruction wait for the host agent STOP_TIMEOUT at most."""
        self.stop_deadline = min(self.stop_deadline, trio.current_time() + STOP_TIMEOUT)
        for region in self.regions.values():
            if region.put_scope is not None:
                region.put_scope.deadline = self.stop_deadline

    def set_guest_budget(self, pages: int | None) -> None:
        """Cap the resident pages of all regions together (the daemon follows MemAvailable and
        the host's balloon target with it); None lifts the cap."""
        if pages is not None and pages < 1:
            raise ValueError("the guest budget is at least one page")
        self.guest_budget = pages
        self.rebalance()

    def rebalance(self) -> None:
        """Each region's limit: its own budget, or its share of the guest budget if that is less
        (shares in proportion to the budgets asked for); regions over it start evicting."""
        limits = shares({r.id: r.budget for r in self.regions.values()}, self.guest_budget)
        for region in self.regions.values():
            region.limit = limits[region.id]
            if region.resident > region.limit:
                region.need_evict.set()

    def report_values(self) -> dict[str, int]:
        """Flat `preswap_*` counters for the guest's STATS report (the host shows them per guest)."""
        st = self.stats()
        out = {f"preswap_{k}": v for k, v in st["totals"].items()}
        out["preswap_regions"] = len(self.regions)
        out["preswap_resident"] = st["resident"]
        out["preswap_in_tmem"] = sum(r.held_tmem for r in self.regions.values())
        out["preswap_on_disk"] = sum(r.held_disk for r in self.regions.values())
        out["preswap_swap_slots"] = self.swap.used
        return out

    def stats(self) -> dict[str, Any]:
        totals = dict(self.totals)
        for region in self.regions.values():
            for key, value in region.counters.items():
                totals[key] += value
        return {
            "totals": totals,
            "regions": {str(r.id): r.stats() for r in self.regions.values()},
            "released": self.released,
            "guest_budget": self.guest_budget,
            "resident": sum(r.resident for r in self.regions.values()),
            "swap_direct": self.swap.direct,
            "swap_slots_used": self.swap.used,
            "swap_slots_top": self.swap.top,
        }

    # ----------------------------------------------------------------- the host's shrink notice

    async def shrink(self, n: int) -> int:
        """Move up to n pages out of tmem: back into their memfd while the region's budget has
        room, else into the swap file.  Returns how many moved (fewer if tmem holds fewer).

        The pages are LOADING meanwhile: a fault on one waits, and is woken by the copy (or,
        for a page sent to disk, retries and is served from there).
        """
        moved = 0
        for region in list(self.regions.values()):
            if moved >= n:
                break
            try:
                moved += await self._shrink_region(region, n - moved)
            except (OSError, ChannelError) as exc:
                region.end(exc)
        return moved

    async def _shrink_region(self, region: Region, n: int) -> int:
        pool = self.pool
        assert pool is not None
        moved = 0
        state = region.state
        while moved < n and region.id in self.regions:
            want = min(SHRINK_BATCH, n - moved)
            batch = [p for p in range(region.pages) if state[p] == TMEM][:want]
            if not batch:
                break
            for p in batch:
                state[p] = LOADING
            datas = await pool.get_many([(region.oid, p) for p in batch])
            if region.id not in self.regions:  # released meanwhile: nothing to keep
                break
            region.held_tmem -= len(batch)
            region.counters["gets"] += sum(d is not None for d in datas)
            room = max(0, region.limit - region.resident)
            to_disk: list[tuple[int, bytes]] = []
            for p, data in zip(batch, datas, strict=True):
                if data is None:
                    region.counters["lost"] += 1
                    raise RegionLost(f"region {region.id} page {p}: tmem did not return it")
                if room > 0:
                    room -= 1
                    ctypes.memmove(region.staging_addr, data, PAGE)
                    uffd.copy(region.uffd, region.addr + p * PAGE, region.staging_addr, PAGE)
                    self._resident(region, p, refault=False)
                    region.counters["shrunk_to_memory"] += 1
                else:
                    to_disk.append((p, data))
            if to_disk:
                slots = [self.swap.alloc() for _ in to_disk]
                await trio.to_thread.run_sync(write_all, self.swap, slots, [d for _, d in to_disk])
                if region.id not in self.regions:
                    for slot in slots:
                        self.swap.release(slot)
                    break
                for (p, _), slot in zip(to_disk, slots, strict=True):
                    region.slots[p] = slot
                    state[p] = DISK
                    region.held_disk += 1
                    uffd.wake(region.uffd, region.addr + p * PAGE, PAGE)
                region.counters["disk_writes"] += len(to_disk)
                region.counters["shrunk_to_disk"] += len(to_disk)
            moved += len(batch)
        return moved

    # ----------------------------------------------------------------- faults

    async def _faults(self, region: Region, nursery: trio.Nursery) -> None:  # noqa: C901 (the userfaultfd fault loop: one event kind after another)
        ufd = region.uffd
        state = region.state
        base, pages = region.addr, region.pages
        counters = region.counters
        read, wait_readable, full = os.read, trio.lowlevel.wait_readable, uffd.MSG_SIZE * _READ_EVENTS
        poller = select.poll()
        poller.register(ufd, select.POLLIN)
        held = 0.0  # time spent in poll(2) since the event loop last ran
        budget = hold_budget(FAULT_WAIT)
        while True:
            # read first: the thread we just woke often faults again before we get here (it
            # preempts us, or runs on another CPU), and a read is cheaper than a scheduler pass
            try:
                data = read(ufd, full)
            except BlockingIOError:
                # the thread we woke faults again within a moment: with nothing else to run,
                # wait for it in poll(2), which saves the event loop's pass (epoll_ctl,
                # epoll_wait, the scheduler) per fault; bounded, so other tasks' I/O waits
                # FAULT_WAIT at most and the loop runs at least every FAULT_SLICE
                wait = budget() if held < FAULT_SLICE else 0.0
                if wait > 0:
                    start = time.monotonic()
                    ready = poller.poll(wait * 1000)
                    held += time.monotonic() - start
                    if ready:
                        continue
                held = 0.0
                await wait_readable(ufd)
                continue
            for event, flags, address in uffd.iter_messages(data):
                p = (address - base) // PAGE
                if event != uffd.EVENT_PAGEFAULT or not 0 <= p < pages:
                    continue
                at = base + p * PAGE
                st = state[p]
                if flags & uffd.PAGEFAULT_FLAG_WP:
                    counters["wp_faults"] += 1
                    if st == RESIDENT:
                        uffd.writeprotect(ufd, at, PAGE, False)  # a stale protection: lift it
                    elif st == EVICTING:
                        region.wp_waiting.add(p)  # woken by the evictor once punched out
                    elif st != LOADING:
                        uffd.wake(ufd, at, PAGE)  # it retries and faults as missing
                    # LOADING: woken by the copy
                    continue
                if st == ZERO:
                    n = region.zero_ahead(p, self.readahead) if self.readahead > 1 else 1
                    uffd.zeropage(ufd, at, n * PAGE)
                    for q in range(p, p + n):
                        self._resident(region, q, refault=False)
                    counters["zero_faults"] += 1
                    counters["zero_ahead"] += n - 1
                    counters["faults"] += 1
                elif st == TMEM:
                    batch = region.readahead(p, self.readahead) if self.readahead > 1 else [p]
                    for q in batch:
                        state[q] = LOADING
                    if len(batch) == 1 and self.channel.connected:
                        # the fast path: served in this task, no task spawned, and the get is
                        # the channel's lone request (written at once, its reply read in this
                        # step): one scheduler pass per fault instead of about five.  Faults
                        # that come meanwhile wait for it (one get's round trip at most)
                        await self._load(region, p, TMEM)
                    else:
                        nursery.start_soon(self._guarded_load_many, region, batch)
                elif st == DISK:
                    state[p] = LOADING
                    nursery.start_soon(self._guarded_load, region, p, st)
                elif st == RESIDENT:
                    uffd.wake(ufd, at, PAGE)  # a duplicate of a resolved fault
            if region.resident > region.limit:
                region.need_evict.set()
                while region.resident > region.limit + max(4, region.limit // 8):
                    region.room = trio.Event()
                    await region.room.wait()

    def _resident(self, region: Region, p: int, *, refault: bool) -> None:
        if region.make_resident(p, refault=refault):
            region.need_evict.set()

    async def _guarded_load(self, region: Region, p: int, st: int) -> None:
        try:
            await self._load(region, p, st)
        except (OSError, ChannelError) as exc:
            region.end(exc)

    async def _guarded_load_many(self, region: Region, batch: list[int]) -> None:
        try:
            await self._load_many(region, batch)
        except (OSError, ChannelError) as exc:
            region.end(exc)

    async def _load_many(self, region: Region, batch: list[int]) -> None:
        """The faulting page batch[0] and readahead pages, from tmem with one GET_VEC."""
        assert self.pool is not None
        counters = region.counters
        datas = await self.pool.get_many([(region.oid, q) for q in batch])
        region.held_tmem -= len(batch)
        counters["tmem_faults"] += 1
        counters["readahead"] += len(batch) - 1
        for q, data in zip(batch, datas, strict=True):
            if data is None:
                counters["lost"] += 1
                raise RegionLost(f"region {region.id} page {q}: tmem did not return it")
            counters["gets"] += 1
            ctypes.memmove(region.staging_addr, data, PAGE)
            uffd.copy(region.uffd, region.addr + q * PAGE, region.staging_addr, PAGE)
            self._resident(region, q, refault=q == batch[0])
        counters["faults"] += 1

    async def _load(self, region: Region, p: int, st: int) -> None:
        counters = region.counters
        data: bytes | None
        if st == TMEM:
            assert self.pool is not None
            data = await self.pool.get(region.oid, p)
            region.held_tmem -= 1
            if data is None:
                counters["lost"] += 1
                raise RegionLost(f"region {region.id} page {p}: tmem did not return it")
            else:
                counters["gets"] += 1
            counters["tmem_faults"] += 1
        else:
            slot = region.slots.pop(p)
            data = await trio.to_thread.run_sync(self.swap.read, slot)
            self.swap.release(slot)
            region.held_disk -= 1
            counters["disk_reads"] += 1
            counters["disk_faults"] += 1
        ctypes.memmove(region.staging_addr, data, PAGE)
        uffd.copy(region.uffd, region.addr + p * PAGE, region.staging_addr, PAGE)
        counters["faults"] += 1
        self._resident(region, p, refault=True)

    # ----------------------------------------------------------------- eviction

    async def _evictor(self, region: Region) -> None:  # noqa: C901 (the eviction loop: one pass, its refusals and fallbacks)
        assert self.pool is not None
        pool = self.pool
        ufd, mm, state = region.uffd, region.mm, region.state
        counters = region.counters
        oid = region.oid
        while True:
            await region.need_evict.wait()
            region.need_evict = trio.Event()
            # evict down to a low mark below the budget, so that evictions come in batches
            # (one PUT_VEC round trip for many pages) rather than one page per fault
            while region.resident > region.limit:
                low = region.limit - min(EVICT_BATCH, max(1, region.limit // 8))
                victims = region.victims(min(EVICT_BATCH, region.resident - low), self.second_chance)
                if not victims:
                    break
                # sorted, so that neighbours (a sequential scan's pages) are protected and
                # punched with one call per run of pages rather than one per page
                victims.sort()
                victim_runs = runs(victims)
                for p in victims:
                    state[p] = EVICTING
                for first, n in victim_runs:
                    uffd.writeprotect(ufd, region.addr + first * PAGE, n * PAGE, True)
                datas = [mm[p * PAGE : (p + 1) * PAGE] for p in victims]
                puts = [(oid, p, d) for p, d in zip(victims, datas, strict=True) if d != _ZERO_PAGE]
                # shielded: a region released meanwhile (its process exited) would otherwise
                # leave the host's answer unread and these puts (or disk writes) uncounted;
                # stop() bounds the wait
                refused: list[tuple[int, bytes]] = []
                with trio.CancelScope(shield=True, deadline=self.stop_deadline) as put_scope:
                    region.put_scope = put_scope
                    stored = await pool.put_many(puts) if puts else []
                    refused = [(p, d) for (_, p, d), ok in zip(puts, stored, strict=True) if not ok]
                    counters["puts"] += len(puts) - len(refused)
                    counters["puts_refused"] += len(refused)
                    if refused:
                        slots = [self.swap.alloc() for _ in refused]
                        await trio.to_thread.run_sync(write_all, self.swap, slots, [d for _, d in refused])
                        counters["disk_writes"] += len(refused)
                        for (p, _), slot in zip(refused, slots, strict=True):
                            region.slots[p] = slot
                region.put_scope = None
                if put_scope.cancelled_caught:  # stopping, and the host is away: the region ends
                    return
                for first, n in victim_runs:
                    punch_hole(region.memfd, first * PAGE, n * PAGE)
                for _, p, _ in puts:
                    state[p] = TMEM
                for p, _ in refused:
                    state[p] = DISK
                zeros = len(victims) - len(puts)
                if zeros:
                    for p in victims:
                        if state[p] == EVICTING:
                            state[p] = ZERO
                    counters["zero_evictions"] += zeros
                region.held_disk += len(refused)
                region.held_tmem += len(puts) - len(refused)
                region.resident -= len(victims)
                counters["evictions"] += len(victims)
                # writers that hit the protection (their WP faults were seen while EVICTING:
                # one seen later finds the page gone and is woken then, see _faults)
                waiting = region.wp_waiting
                if waiting:
                    for p in victims:
                        if p in waiting:
                            waiting.discard(p)
                            uffd.wake(ufd, region.addr + p * PAGE, PAGE)
                region.room.set()
            region.room.set()


def _write_state(path: str, pool_id: int) -> None:
    """Record the pool's id (atomically: a crash leaves the old record or the new, never half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"pool": pool_id}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


async def follow_pressure(
    swapper: Swapper,
    *,
    proc_dir: str = "/proc",
    interval: float = 1.0,
    reserve_kib: int | None = None,
    floor: int = 256,
) -> None:
    """Set the swapper's guest budget from /proc/meminfo every interval (see `pressure_budget`)."""

    async def apply(info: Mapping[str, int]) -> None:
        resident = sum(r.resident for r in swapper.regions.values())
        swapper.set_guest_budget(
            pressure_budget(
                resident, info["MemAvailable"], info["MemTotal"], reserve_kib=reserve_kib, floor=floor
            )
        )

    await follow_meminfo(apply, proc_dir=proc_dir, interval=interval)
