"""A preswap region's bookkeeping, as pure code: page states, the eviction clock, readahead
windows, counters, and how the guest's budget is shared among regions.

No fds, no mappings, no event loop: the swapper (guestagent/swapper.py) does the I/O and asks
this what to do, so the policies are tested on their own (tests/test_regionbook.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Final

from guestagent.uffd import PAGE_SIZE

__all__ = [
    "DISK",
    "EVICTING",
    "LOADING",
    "REGION_COUNTERS",
    "RESIDENT",
    "TMEM",
    "ZERO",
    "RegionBook",
    "pressure_budget",
    "runs",
    "shares",
]

# A page's state: ZERO never written (or found all-zero when evicted); RESIDENT in the memfd;
# EVICTING write-protected while its put is in flight; TMEM / DISK held by the host or in the
# swap file; LOADING a fault's get (or disk read) in flight.
ZERO, RESIDENT, EVICTING, TMEM, DISK, LOADING = range(6)
MAX_HEAT: Final = 3  # chances on the clock a page that keeps refaulting earns at most

REGION_COUNTERS: Final = (
    "faults",  # page faults resolved (first touch, tmem, disk)
    "zero_faults",  # resolved with UFFDIO_ZEROPAGE
    "tmem_faults",  # resolved from a get
    "disk_faults",  # resolved from the swap file
    "wp_faults",  # writes that hit a page under eviction (or a stale protection)
    "evictions",  # pages moved out of the memfd
    "zero_evictions",  # evicted pages that were all zeros: nothing stored
    "puts",  # persistent puts answered OK
    "puts_refused",  # refused by the host: the page went to the swap file
    "gets",  # gets answered with the page
    "disk_writes",
    "disk_reads",
    "readahead",  # pages brought in with a fault's page, on a sequential scan
    "zero_ahead",  # never-written pages mapped with a zero fault's page, on a sequential first touch
    "lost",  # pages tmem did not return: must stay 0
    "shrunk_to_memory",  # moved out of tmem on the host's request, back into the memfd
    "shrunk_to_disk",  # ... or into the swap file
)


class RegionBook:
    """The pages of one region: their states and what the eviction and fault policies need."""

    def __init__(self, rid: int, pages: int, budget: int) -> None:
        self.id = rid
        self.pages = pages
        self.budget = budget  # what the application asked for
        self.limit = budget  # what it gets: the budget, cut to its share of the guest's
        self.state = bytearray(pages)  # all ZERO
        self.ref = bytearray(pages)  # chances left on the clock: set on a refault
        self.hist = bytearray(pages)  # refaults so far (saturating): survives evictions
        self.slots: dict[int, int] = {}  # page -> swap-file slot, for DISK pages
        self.clock: deque[int] = deque()  # resident pages, oldest fault first
        self.resident = 0
        self.held_tmem = 0
        self.held_disk = 0
        self.counters = dict.fromkeys(REGION_COUNTERS, 0)
        self.ra_window = 1  # readahead: pages fetched with the last tmem fault
        self.ra_next = -1  # the page a sequential scan would fault on next
        self.zero_window = 1  # the same for first touches (zero pages mapped ahead)
        self.zero_next = -1

    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "pages": self.pages,
            "budget": self.budget,
            "limit": self.limit,
            "resident": self.resident,
            "evicted": self.held_tmem + self.held_disk,
            "in_tmem": self.held_tmem,
            "on_disk": self.held_disk,
        }

    def make_resident(self, p: int, *, refault: bool) -> bool:
        """Page p is mapped now; True if the region is over its limit (eviction is due).

        A refault earns chances, up to MAX_HEAT, that the clock spends one per pass: a page
        that keeps coming back stays longer (kept across evictions, unlike a plain
        second-chance bit).
        """
        self.state[p] = RESIDENT
        if refault:
            self.hist[p] = heat = min(MAX_HEAT, self.hist[p] + 1)
            self.ref[p] = heat
        else:
            self.ref[p] = 0
        self.clock.append(p)
        self.resident += 1
        return self.resident > self.limit

    def victims(self, n: int, second_chance: bool) -> list[int]:
        """Up to n resident pages, by the clock: a refaulted page gets a second chance (unless
        the policy is plain FIFO)."""
        clock, ref, state = self.clock, self.ref, self.state
        out: list[int] = []
        spins = 2 * len(clock)
        while clock and len(out) < n and spins > 0:
            spins -= 1
            p = clock.popleft()
            if state[p] != RESIDENT:
                continue  # a stale entry (the page left and came back: it is queued again)
            if ref[p] and second_chance:
                ref[p] -= 1
                clock.append(p)
                continue
            out.append(p)
        return out

    def _most_ahead(self, readahead: int) -> int:
        return min(readahead, max(1, self.limit // 4))  # never a budget's worth

    def readahead(self, p: int, readahead: int) -> list[int]:
        """The pages one tmem fault on p brings in: p, and on a sequential scan the next held ones.

        A fault where the last readahead window ended is a sequential scan: the window doubles
        (up to `readahead` pages), else it starts again at one.
        """
        most = self._most_ahead(readahead)
        window = min(most, 2 * self.ra_window) if p == self.ra_next else 1
        self.ra_window, self.ra_next = window, p + window
        if window == 1:
            return [p]
        state = self.state
        return [p, *(q for q in range(p + 1, min(self.pages, p + window)) if state[q] == TMEM)]

    def zero_ahead(self, p: int, readahead: int) -> int:
        """How many never-written pages from p one zero fault maps: the readahead window's rule
        on first touches, so a buffer filled in order costs a fault per window, not per page.

        Each first touch is a round trip through the agent (the kernel maps a fresh anonymous
        page without leaving the faulting thread); the pages mapped ahead are zeros either way
        and, if never written, leave again as zero evictions (nothing stored).
        """
        most = self._most_ahead(readahead)
        window = min(most, 2 * self.zero_window) if p == self.zero_next else 1
        n = 1
        end = min(self.pages, p + window)
        state = self.state
        while p + n < end and state[p + n] == ZERO:
            n += 1
        self.zero_window, self.zero_next = window, p + n
        return n


def shares(budgets: Mapping[int, int], cap: int | None) -> dict[int, int]:
    """Each region's limit: its own budget, or its share of the guest budget `cap` if the
    budgets together exceed it (shares in proportion to the budgets asked for, at least 1)."""
    total = sum(budgets.values())
    if cap is None or total <= cap:
        return dict(budgets)
    return {rid: max(1, cap * budget // total) for rid, budget in budgets.items()}


def pressure_budget(
    resident: int,
    mem_available_kib: int,
    mem_total_kib: int,
    *,
    reserve_kib: int | None = None,
    floor: int = 256,
) -> int:
    """The guest budget for all regions together: the pages they hold now, plus what the guest
    can spare above a reserve of available memory (minus what it lacks below it).

    Region pages are shmem, which MemAvailable does not count, so growing regions lower it: the
    budget settles where MemAvailable meets the reserve.  A balloon that inflates lowers
    MemAvailable too, so following it follows the host's balloon target.
    """
    reserve = reserve_kib if reserve_kib is not None else max(64 << 10, mem_total_kib // 20)
    return max(floor, resident + (mem_available_kib - reserve) * 1024 // PAGE_SIZE)


def runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """(first page, count) for each run of consecutive pages in a sorted list."""
    out: list[tuple[int, int]] = []
    first = prev = -2
    for p in pages:
        if p != prev + 1:
            if prev >= 0:
                out.append((first, prev - first + 1))
            first = p
        prev = p
    if prev >= 0:
        out.append((first, prev - first + 1))
    return out
