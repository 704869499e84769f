"""The preswap region bookkeeping on its own: no fds, no userfaultfd, no host agent."""

from __future__ import annotations

from guestagent.regionbook import (
    DISK,
    RESIDENT,
    TMEM,
    ZERO,
    RegionBook,
    pressure_budget,
    runs,
    shares,
)


def test_make_resident_says_when_the_region_is_over_its_limit() -> None:
    book = RegionBook(1, pages=8, budget=2)
    assert not book.make_resident(0, refault=False)
    assert not book.make_resident(1, refault=False)
    assert book.make_resident(2, refault=False)
    assert book.resident == 3 and list(book.clock) == [0, 1, 2]
    assert book.state[0] == RESIDENT and book.state[3] == ZERO


def test_the_clock_gives_refaulted_pages_more_chances_and_fifo_none() -> None:
    book = RegionBook(1, pages=8, budget=8)
    for p in range(4):
        book.make_resident(p, refault=p == 1)  # page 1 came back once: one chance
    assert book.victims(2, second_chance=True) == [0, 2]
    assert book.victims(2, second_chance=True) == [3, 1]  # its chance spent, 1 goes last
    for p in range(4):
        book.make_resident(p, refault=p == 1)
    assert book.victims(2, second_chance=False) == [0, 1]


def test_refaults_heat_up_to_three_chances_across_evictions() -> None:
    book = RegionBook(1, pages=2, budget=2)
    for _ in range(5):
        book.make_resident(0, refault=True)
    assert book.hist[0] == 3 and book.ref[0] == 3


def test_victims_skip_stale_clock_entries() -> None:
    book = RegionBook(1, pages=4, budget=4)
    book.make_resident(0, refault=False)
    book.make_resident(1, refault=False)
    book.state[0] = TMEM  # evicted meanwhile: its clock entry is stale
    assert book.victims(4, second_chance=True) == [1]


def test_readahead_doubles_on_a_sequential_scan_and_takes_only_held_pages() -> None:
    book = RegionBook(1, pages=64, budget=64)
    book.state[:] = bytes([TMEM]) * 64
    book.state[5] = DISK
    assert book.readahead(0, readahead=16) == [0]  # no scan yet
    assert book.readahead(1, readahead=16) == [1, 2]
    assert book.readahead(3, readahead=16) == [3, 4, 6]  # 5 is on disk: not from tmem
    assert book.readahead(7, readahead=16) == list(range(7, 15))
    assert book.readahead(40, readahead=16) == [40]  # a jump starts again at one


def test_readahead_never_takes_a_budgets_worth() -> None:
    book = RegionBook(1, pages=64, budget=8)
    book.state[:] = bytes([TMEM]) * 64
    book.readahead(0, readahead=16)
    assert len(book.readahead(1, readahead=16)) == 2  # limit // 4
    assert len(book.readahead(3, readahead=16)) == 2


def test_zero_ahead_maps_never_written_pages_of_a_sequential_first_touch() -> None:
    book = RegionBook(1, pages=32, budget=32)
    assert book.zero_ahead(0, readahead=16) == 1
    assert book.zero_ahead(1, readahead=16) == 2
    book.state[5] = RESIDENT
    assert book.zero_ahead(3, readahead=16) == 2  # stops at a page that is not ZERO


def test_shares_cut_budgets_in_proportion_only_past_the_cap() -> None:
    assert shares({1: 100, 2: 300}, None) == {1: 100, 2: 300}
    assert shares({1: 100, 2: 300}, 400) == {1: 100, 2: 300}
    assert shares({1: 100, 2: 300}, 200) == {1: 50, 2: 150}
    assert shares({1: 1, 2: 1000}, 10) == {1: 1, 2: 9}  # at least one page each


def test_pressure_budget_follows_available_memory_above_a_reserve() -> None:
    mib = 1024  # KiB
    # 64 MiB spare above a 64 MiB reserve: 16384 more pages than the regions hold now
    assert pressure_budget(1000, 128 * mib, 1024 * mib) == 1000 + 16384
    assert pressure_budget(1000, 32 * mib, 1024 * mib) == 256  # below the reserve: the floor
    assert pressure_budget(50000, 32 * mib, 1024 * mib) == 50000 - 8192
    assert pressure_budget(0, 100 * mib, 4096 * mib, reserve_kib=100 * mib, floor=7) == 7


def test_runs_of_consecutive_pages() -> None:
    assert runs([]) == []
    assert runs([3]) == [(3, 1)]
    assert runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 2), (9, 1)]
