"""The shapes of the engine's figures (`hostagent stats`, `hostagent pools`), as TypedDicts.

They are plain dicts at run time (the control socket sends them as JSON); the types say which
keys each holds, for the agent, the CLI's views and the tests.
"""

from __future__ import annotations

from typing import TypedDict

__all__ = ["CounterStats", "EngineStats", "GuestStats", "PoolFigures", "PoolInfo", "SharedPoolStats"]


class CounterStats(TypedDict):
    """A `Counters` as `hostagent stats` shows it (per guest and kind, per shared pool)."""

    puts: int
    puts_refused: int
    gets: int
    hits: int
    flushes: int
    evicted: int
    pages: int
    bytes: int
    raw_bytes: int


class PoolFigures(TypedDict):
    """The whole pool: limits, budget, use, eviction and rebuild figures."""

    limit_bytes: int
    budget_bytes: int
    used_bytes: int
    resident_bytes: int
    capacity_bytes: int
    pages: int
    raw_bytes: int
    ephemeral_pages: int
    persistent_pages: int
    ephemeral_bytes: int
    evictions: int
    compactions: int
    host_available_bytes: int | None  # None until the first sample
    host_reserve_bytes: int
    pools: int
    rebuilt_pages: int
    rejected_slots: int


class SharedPoolStats(CounterStats):
    kind: str
    members: list[str]
    quota_bytes: int


class GuestStats(TypedDict):
    """One engine client: its settings, pool count and counters per kind."""

    weight: int
    cap_bytes: int
    quota_bytes: int
    compress: bool
    pools: int
    ephemeral: CounterStats
    persistent: CounterStats


class EngineStats(TypedDict):
    pool: PoolFigures
    shared: dict[str, SharedPoolStats]  # by uuid (hex)
    guests: dict[str, GuestStats]  # by engine client name


class PoolInfo(TypedDict):
    """One pool, as `hostagent pools` lists it."""

    handle: int
    kind: str
    flags: int
    uuid: str | None  # shared pools only
    owner: str
    members: dict[str, int]
    objects: int
    pages: int
    bytes: int
    raw_bytes: int
    exclusive_gets: bool
