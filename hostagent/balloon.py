"""Balloon policy: how much memory each guest should have, as pure functions of what the host sees.

No I/O and no clock of its own: `Controller.step` takes one observation per guest (libvirt's
balloon `actual`, the guest's own report) and the host's available memory, and returns the targets
to set. The driver (`hostagent/balloon_driver.py`) does the libvirt calls; tests drive the policy
with a fake clock and recorded traces.

The rules, in order of precedence for one guest:

1. **Off** (`hostagent set GUEST balloon=off`, or `enabled = false` in config): never touched.
2. **Stale or missing stats**: a guest whose report is missing or older than `stale_after` is not
   ballooned at all (not even under host pressure): without Committed_AS we would be guessing.
3. **Distress** (swap-in or refault storm, or preswap puts refused by the host since the last
   look): the guest gets memory back at once (the most it had in the last `distress_window`, at
   least `distress_step_mib` more, at least its goal) and is not shrunk for `distress_hold`.
4. **Self-ballooning**, as Xen's selfballoon driver did it: goal = Committed_AS + reserve; each
   interval step down by `down_fraction` of the excess (at least `min_step_mib`, never past the
   goal), step up by `up_fraction` of the shortfall (1 = the whole shortfall at once). Never below
   the floor (Xen's minimum target, which grows with guest size), never above max memory.
5. **Host pressure** (host available memory below `min_available_mib`): the driver first drops
   tmem's ephemeral pages (this module says how much), then guests give up memory toward their
   floors, at most `pressure_step_mib` each per interval, in inverse proportion to their shares
   (shares are an entitlement, as in ESX: twice the shares, half the giving). Persistent pages the
   pool can no longer hold become shrink notices to the guests holding them. When pressure ends
   (available above the threshold plus one step), the taken memory is given back a step at a time.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Final

KIB_PER_MIB: Final = 1024


@dataclass(frozen=True, slots=True)
class Params:
    """Per-guest policy settings ([balloon] defaults, overridden by [[balloon.guest]])."""

    enabled: bool = True
    self_balloon: bool = True  # false: the guest keeps its size unless the host is under pressure
    reserve_mib: int = 64  # goal = Committed_AS + reserve
    down_fraction: float = 0.125  # of the excess, per interval
    up_fraction: float = 1.0  # of the shortfall, per interval
    min_step_mib: int = 4  # smaller changes are not worth a balloon request
    floor_mib: int = 0  # 0: automatic (Xen's minimum target for the guest's max memory)
    shares: int = 1000  # entitlement under host pressure
    stale_after: float = 20.0  # seconds: an older report means "no stats"
    distress_swapin: float = 256.0  # pages swapped in per second
    distress_refault: float = 2000.0  # evicted pages read back per second (file + anon)
    distress_step_mib: int = 64
    distress_window: float = 60.0  # seconds of target history a distressed guest gets back
    distress_hold: float = 30.0  # seconds without shrinking after distress


@dataclass(frozen=True, slots=True)
class HostParams:
    """Host-wide settings."""

    min_available_mib: int = 1024  # below this the host is under pressure
    pressure_step_mib: int = 64  # most a guest gives (or gets back) per interval under pressure


@dataclass(frozen=True, slots=True)
class Observation:
    """What the host knows about one guest at one instant."""

    actual_kib: int | None  # libvirt's balloon `actual`; None if libvirt did not answer
    max_kib: int
    committed_kib: int | None = None  # from the guest's report
    report_age: float | None = None  # seconds; None: no report yet
    swapin_rate: float = 0.0  # pages/s, between the guest's last two reports
    refault_rate: float = 0.0  # pages/s
    preswap_refused: int | None = None  # cumulative counter from the guest's report
    swapdev_refused: int | None = None  # cumulative: its swap device's pages the pool refused
    persistent_pages: int = 0  # the guest's persistent pages in the pool


@dataclass(frozen=True, slots=True)
class Action:
    """One decision about one guest, kept as its `last` for `hostagent stats`."""

    time: float
    action: str  # shrink | grow | distress | pressure | release | reserve
    from_kib: int
    to_kib: int
    reason: str


@dataclass(slots=True)
class GuestState:
    """What the controller remembers about one guest between intervals."""

    params: Params
    boot_kib: int | None = None  # actual at the first look with stats: "given back" starts there
    target_kib: int | None = None  # the last target set (None: never set)
    goal_kib: int | None = None
    floor_kib: int | None = None
    state: str = "new"
    history: deque[tuple[float, int]] = field(default_factory=deque)  # (time, target)
    hold_until: float = 0.0
    pressure_cap_kib: int | None = None  # while the host takes memory: the most this guest may have
    fixed_kib: int | None = None  # without self-ballooning: the size it keeps (boot, reserve, distress)
    last_refused: int | None = None
    last_swapdev_refused: int | None = None
    given_back_kib: int = 0
    returned_kib: int = 0
    last: Action | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """What the driver does this interval."""

    targets: dict[str, int]  # guest -> new balloon target (KiB); only guests whose target changes
    drop_ephemeral_kib: int = 0  # tmem ephemeral memory to give up first
    shrink_pages: dict[str, int] = field(default_factory=dict)  # guest -> persistent pages to move out
    pressure: bool = False
    deficit_kib: int = 0  # host memory still missing after what this plan does


def auto_floor_kib(max_kib: int) -> int:
    """Xen's balloon minimum target for a guest of `max_kib`: grows with size, continuous."""
    mib = max_kib / KIB_PER_MIB
    if mib < 128:
        floor = 8 + mib / 2
    elif mib < 512:
        floor = 40 + mib / 4
    elif mib < 2048:
        floor = 104 + mib / 8
    else:
        floor = 296 + mib / 32
    return min(max_kib, int(floor * KIB_PER_MIB))


def floor_kib(p: Params, max_kib: int) -> int:
    return min(max_kib, p.floor_mib * KIB_PER_MIB) if p.floor_mib else auto_floor_kib(max_kib)


def goal_kib(p: Params, committed_kib: int) -> int:
    return committed_kib + p.reserve_mib * KIB_PER_MIB


def self_balloon_step(p: Params, current: int, goal: int, floor: int, max_kib: int) -> int:
    """Xen's step: down by a fraction of the excess (at least min_step, never past the goal), up
    by a fraction of the shortfall (at least min_step, never past the goal); within [floor, max]."""
    goal = max(floor, min(goal, max_kib))
    min_step = p.min_step_mib * KIB_PER_MIB
    if current > goal:
        excess = current - goal
        new = current - min(excess, max(math.ceil(excess * p.down_fraction), min_step))
    elif current < goal:
        short = goal - current
        new = current + min(short, max(math.ceil(short * p.up_fraction), min_step))
    else:
        new = current
    return max(floor, min(new, max_kib))


def not_ballooned(p: Params, o: Observation) -> str | None:
    """Why the controller must leave this guest alone now (its state for `stats`), or None."""
    if not p.enabled:
        return "off"
    if o.actual_kib is None:
        return "no balloon figures"
    if o.report_age is None or o.committed_kib is None:
        return "no stats"
    if o.report_age > p.stale_after:
        return f"stale stats ({o.report_age:.0f} s)"
    return None


def in_distress(
    p: Params, obs: Observation, last_refused: int | None, last_swapdev_refused: int | None = None
) -> str | None:
    """Why the guest is in distress, or None."""
    if obs.swapin_rate >= p.distress_swapin:
        return f"swap-in storm ({obs.swapin_rate:.0f} pages/s)"
    if obs.refault_rate >= p.distress_refault:
        return f"refault storm ({obs.refault_rate:.0f} pages/s)"
    if obs.preswap_refused is not None and last_refused is not None and obs.preswap_refused > last_refused:
        return f"preswap puts refused ({obs.preswap_refused - last_refused} since the last look)"
    if (
        obs.swapdev_refused is not None
        and last_swapdev_refused is not None
        and obs.swapdev_refused > last_swapdev_refused
    ):
        return (
            f"swap-device pages refused by the pool "
            f"({obs.swapdev_refused - last_swapdev_refused} since the last look)"
        )
    return None


def share_out(amount: int, room: dict[str, int], shares: dict[str, int]) -> dict[str, int]:
    """Split `amount` over guests in inverse proportion to their shares, none beyond its room
    (water-filling: what a full guest cannot take goes to the others). Integers; sums to
    min(amount, total room)."""
    out = dict.fromkeys(room, 0)
    left = min(amount, sum(max(0, r) for r in room.values()))
    open_ = {g for g, r in room.items() if r > 0}
    while left > 0 and open_:
        weight = {g: 1.0 / max(1, shares.get(g, 1)) for g in open_}
        total = sum(weight.values())
        given = 0
        for g in sorted(open_):
            want = max(1, int(left * weight[g] / total))
            take = min(want, room[g] - out[g], left - given)
            out[g] += take
            given += take
            if given >= left:
                break
        left -= given
        open_ = {g for g in open_ if out[g] < room[g]}
        if given == 0:
            break
    return out


class Controller:
    """The policy's memory across intervals: one `GuestState` per guest, `step()` per interval."""

    def __init__(self, host: HostParams | None = None) -> None:
        self.host = host or HostParams()
        self.guests: dict[str, GuestState] = {}
        self.pressure = False
        self.deficit_kib = 0

    def add(self, name: str, params: Params) -> GuestState:
        st = self.guests.get(name)
        if st is None:
            st = self.guests[name] = GuestState(params)
        else:
            st.params = params
        return st

    def remove(self, name: str) -> None:
        self.guests.pop(name, None)

    def set_enabled(self, name: str, enabled: bool) -> None:
        st = self.guests[name]
        st.params = replace(st.params, enabled=enabled)
        st.state = "on" if enabled else "off"

    def step(  # noqa: C901 (one interval's decision, rule by rule)
        self,
        now: float,
        obs: dict[str, Observation],
        host_available_kib: int,
        ephemeral_kib: int = 0,
        persistent_excess_pages: int = 0,
    ) -> Plan:
        """Decide this interval's targets. `ephemeral_kib`: tmem ephemeral memory that can be
        dropped; `persistent_excess_pages`: persistent pages the pool can no longer hold."""
        wanted: dict[str, int] = {}  # guest -> target before host pressure
        why: dict[str, tuple[str, str]] = {}  # guest -> (action, reason)
        active: list[str] = []  # guests the controller may move this interval
        held: set[str] = set()  # guests that must not shrink (distress)
        current: dict[str, int] = {}
        for name, o in obs.items():
            st = self.guests.get(name)
            if st is None:
                continue
            p = st.params
            st.floor_kib = floor_kib(p, o.max_kib)
            if o.committed_kib is not None:
                st.goal_kib = max(st.floor_kib, min(goal_kib(p, o.committed_kib), o.max_kib))
            why_not = not_ballooned(p, o)
            if why_not is not None:
                st.state = why_not
                continue
            assert st.goal_kib is not None and o.actual_kib is not None and o.committed_kib is not None
            if st.boot_kib is None:  # first look with stats: the guest has booted (before that,
                st.boot_kib = o.actual_kib  # QEMU may still report max memory as `actual`)
            cur = st.target_kib if st.target_kib is not None else o.actual_kib
            current[name] = cur
            active.append(name)
            distress = in_distress(p, o, st.last_refused, st.last_swapdev_refused)
            if o.preswap_refused is not None:
                st.last_refused = o.preswap_refused
            if o.swapdev_refused is not None:
                st.last_swapdev_refused = o.swapdev_refused
            while st.history and st.history[0][0] < now - p.distress_window:
                st.history.popleft()
            if distress is not None:
                recent = max((t for _, t in st.history), default=cur)
                new = max(cur + p.distress_step_mib * KIB_PER_MIB, recent, st.goal_kib)
                wanted[name] = min(new, o.max_kib)
                if not p.self_balloon:
                    st.fixed_kib = wanted[name]
                why[name] = ("distress", distress)
                st.hold_until = now + p.distress_hold
                st.pressure_cap_kib = None
                held.add(name)
                st.state = "distress"
                continue
            if now < st.hold_until:
                held.add(name)
            if p.self_balloon:
                st.fixed_kib = None
                new = self_balloon_step(p, cur, st.goal_kib, st.floor_kib, o.max_kib)
                if name in held:
                    new = max(new, cur)
                action = "shrink" if new < cur else "grow"
                reason = (
                    f"goal {st.goal_kib // KIB_PER_MIB} MiB = Committed_AS "
                    f"{o.committed_kib // KIB_PER_MIB} MiB + reserve {p.reserve_mib} MiB"
                )
                if st.goal_kib == st.floor_kib and goal_kib(p, o.committed_kib) < st.floor_kib:
                    reason += f", held at the floor {st.floor_kib // KIB_PER_MIB} MiB"
            else:
                if st.fixed_kib is None:
                    st.fixed_kib = o.actual_kib
                new = max(st.fixed_kib, cur) if name in held else st.fixed_kib
                action, reason = "grow", "back to its own size after host pressure"
            wanted[name] = new
            why[name] = (action, reason)
            st.state = (
                "hold after distress"
                if name in held
                else "self-ballooning"
                if p.self_balloon
                else "fixed size"
            )

        plan_drop, plan_shrink = self._pressure(
            now, obs, host_available_kib, ephemeral_kib, persistent_excess_pages, wanted, why, current, held
        )
        targets: dict[str, int] = {}
        for name, new in wanted.items():
            st = self.guests[name]
            cur = current[name]
            if st.pressure_cap_kib is not None:
                new = min(new, st.pressure_cap_kib)
            action, reason = why[name]
            if new == cur or (abs(new - cur) < st.params.min_step_mib * KIB_PER_MIB and action != "distress"):
                continue
            if new < cur:
                st.given_back_kib += cur - new
            else:
                st.returned_kib += new - cur
            st.target_kib = new
            st.history.append((now, new))
            st.last = Action(now, action, cur, new, reason)
            targets[name] = new
        return Plan(targets, plan_drop, plan_shrink, self.pressure, self.deficit_kib)

    def _pressure(
        self,
        now: float,
        obs: dict[str, Observation],
        available: int,
        ephemeral: int,
        persistent_excess: int,
        wanted: dict[str, int],
        why: dict[str, tuple[str, str]],
        current: dict[str, int],
        held: set[str],
    ) -> tuple[int, dict[str, int]]:
        """Host pressure: drop ephemeral pages, then take memory from guests by shares; afterwards
        give it back a step at a time. Adjusts `wanted` in place; returns (drop KiB, shrinks)."""
        threshold = self.host.min_available_mib * KIB_PER_MIB
        step = self.host.pressure_step_mib * KIB_PER_MIB
        shrink: dict[str, int] = {}
        if persistent_excess > 0:
            holders = {n: o.persistent_pages for n, o in obs.items() if o.persistent_pages > 0}
            total = sum(holders.values())
            for n, pages in holders.items():
                shrink[n] = min(pages, math.ceil(persistent_excess * pages / total))
        deficit = threshold - available
        if deficit <= 0:
            self.deficit_kib = 0
            if available >= threshold + step:  # clearly over: give back what pressure took
                self.pressure = False
                for name in wanted:
                    st = self.guests[name]
                    if st.pressure_cap_kib is None:
                        continue
                    st.pressure_cap_kib += step
                    if st.pressure_cap_kib >= obs[name].max_kib:
                        st.pressure_cap_kib = None
                    if wanted[name] > current[name]:
                        why[name] = ("release", "host pressure over: memory given back")
            return 0, shrink
        self.pressure = True
        drop = min(deficit, ephemeral)
        deficit -= drop
        room: dict[str, int] = {}
        for name in wanted:
            if name in held:
                continue
            st = self.guests[name]
            assert st.floor_kib is not None
            base = min(wanted[name], current[name])
            room[name] = max(0, min(step, base - st.floor_kib))
        takes = share_out(deficit, room, {n: self.guests[n].params.shares for n in room})
        for name, take in takes.items():
            if take <= 0:
                continue
            st = self.guests[name]
            new = min(wanted[name], current[name]) - take
            st.pressure_cap_kib = new
            wanted[name] = new
            why[name] = (
                "pressure",
                f"host available {available // KIB_PER_MIB} MiB is below {self.host.min_available_mib} MiB",
            )
            st.state = "host pressure"
        self.deficit_kib = deficit - sum(takes.values())
        return drop, shrink

    def reserve(self, now: float, need_kib: int, obs: dict[str, Observation]) -> dict[str, int]:
        """`hostagent reserve`: new targets taking up to `need_kib` from guests above their goal
        (the most excess first); never below goal or floor, never from guests off or stale."""
        excess: dict[str, int] = {}
        low_of: dict[str, int] = {}
        for name, o in obs.items():
            st = self.guests.get(name)
            if st is None or not_ballooned(st.params, o) is not None:
                continue
            assert o.actual_kib is not None and o.committed_kib is not None
            low = max(floor_kib(st.params, o.max_kib), goal_kib(st.params, o.committed_kib))
            cur = st.target_kib if st.target_kib is not None else o.actual_kib
            if cur > low:
                excess[name], low_of[name] = cur - low, low
        targets: dict[str, int] = {}
        left = need_kib
        for name in sorted(excess, key=lambda n: -excess[n]):
            if left <= 0:
                break
            st = self.guests[name]
            cur = excess[name] + low_of[name]
            take = min(excess[name], left)
            new = cur - take
            left -= take
            st.given_back_kib += take
            st.target_kib = new
            if not st.params.self_balloon:
                st.fixed_kib = new
            st.history.append((now, new))
            st.last = Action(
                now,
                "reserve",
                cur,
                new,
                f"hostagent reserve: {need_kib // KIB_PER_MIB} MiB for an incoming guest",
            )
            targets[name] = new
        return targets
