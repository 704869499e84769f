"""The balloon policy as pure functions over recorded traces: a fake clock, fake observations.

Each test feeds `Controller.step` what the host would see interval after interval and checks the
targets it asks for: convergence, floors and max, host pressure shared by shares, rate limits, the
stale-stats and distress rules, `balloon=off`, and `hostagent reserve`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostagent import config as configmod
from hostagent.balloon import (
    KIB_PER_MIB,
    Controller,
    HostParams,
    Observation,
    Params,
    auto_floor_kib,
    self_balloon_step,
    share_out,
)

MIB = KIB_PER_MIB
INTERVAL = 5.0
PLENTY = 64 * 1024 * MIB  # host available memory far above any threshold


class Guest:
    """A fake guest whose balloon obeys at once (actual = target) and whose Committed_AS we set."""

    def __init__(self, actual_mib: int, max_mib: int = 1024, committed_mib: int = 200) -> None:
        self.actual = actual_mib * MIB
        self.max = max_mib * MIB
        self.committed = committed_mib * MIB
        self.report_age: float | None = 1.0
        self.swapin = 0.0
        self.refault = 0.0
        self.refused: int | None = 0
        self.swapdev_refused: int | None = 0
        self.persistent = 0

    def obs(self) -> Observation:
        return Observation(
            actual_kib=self.actual,
            max_kib=self.max,
            committed_kib=self.committed,
            report_age=self.report_age,
            swapin_rate=self.swapin,
            refault_rate=self.refault,
            preswap_refused=self.refused,
            persistent_pages=self.persistent,
            swapdev_refused=self.swapdev_refused,
        )


class Run:
    """The controller and a fake clock; `step()` applies the plan's targets to the fake guests."""

    def __init__(
        self, guests: dict[str, Guest], params: Params | None = None, host: HostParams | None = None
    ) -> None:
        self.ctl = Controller(host or HostParams(min_available_mib=1024, pressure_step_mib=64))
        self.guests = guests
        self.now = 1000.0
        self.available = PLENTY
        self.ephemeral = 0
        for name in guests:
            self.ctl.add(name, params or Params())

    def step(self, persistent_excess: int = 0):  # type: ignore[no-untyped-def]
        self.now += INTERVAL
        plan = self.ctl.step(
            self.now,
            {n: g.obs() for n, g in self.guests.items()},
            self.available,
            self.ephemeral,
            persistent_excess,
        )
        for name, target in plan.targets.items():
            g = self.guests[name]
            self.available += g.actual - target  # memory the balloon takes is the host's again
            g.actual = target
        return plan

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()


def test_auto_floor_grows_with_guest_size_and_is_continuous() -> None:
    sizes = [64, 127, 128, 256, 511, 512, 1024, 2047, 2048, 8192]
    floors = [auto_floor_kib(m * MIB) for m in sizes]
    assert floors == sorted(floors)
    for edge in (128, 512, 2048):  # no jump at the piece boundaries
        assert abs(auto_floor_kib(edge * MIB) - auto_floor_kib(edge * MIB - 1)) < MIB
    assert auto_floor_kib(1024 * MIB) == 232 * MIB  # 104 MiB + 1/8 of 1 GiB, as Xen's
    assert auto_floor_kib(16 * MIB) <= 16 * MIB


def test_idle_guest_is_shrunk_to_its_goal_within_k_intervals() -> None:
    g = Guest(actual_mib=1024, committed_mib=300)
    run = Run({"g": g}, Params(reserve_mib=64))
    goal = (300 + 64) * MIB
    previous = g.actual
    intervals = 0
    while intervals < 40:
        intervals += 1
        run.step()
        assert g.actual <= previous, "an idle guest never grows"
        assert g.actual >= goal, "never below the goal"
        previous = g.actual
        if g.actual - goal < 4 * MIB:
            break
    # excess 660 MiB shrinks by 1/8 per interval (at least 4 MiB): within 4 MiB in ~30 intervals
    assert intervals <= 35, f"took {intervals} intervals"
    st_ = run.ctl.guests["g"]
    assert st_.last is not None and st_.last.action == "shrink" and "Committed_AS" in st_.last.reason
    assert st_.given_back_kib == 1024 * MIB - g.actual


def test_step_down_is_an_eighth_of_the_excess() -> None:
    p = Params()
    assert self_balloon_step(p, 1000 * MIB, 200 * MIB, 100 * MIB, 2048 * MIB) == 900 * MIB
    # never past the goal, even with the minimum step
    assert self_balloon_step(p, 202 * MIB, 200 * MIB, 100 * MIB, 2048 * MIB) == 200 * MIB


def test_step_increase_in_allocation_is_granted_in_one_interval() -> None:
    g = Guest(actual_mib=400, committed_mib=300)
    run = Run({"g": g}, Params(reserve_mib=64))
    run.steps(3)
    g.committed = 700 * MIB  # a process allocates 400 MiB
    run.step()
    assert g.actual == 764 * MIB, "the whole shortfall at once"
    assert run.ctl.guests["g"].last.action == "grow"  # type: ignore[union-attr]


def test_never_below_floor_never_above_max() -> None:
    g = Guest(actual_mib=1024, max_mib=1024, committed_mib=10)
    run = Run({"g": g})
    run.steps(60)
    # held at the floor, not at Committed_AS (within min_step: smaller moves are not requested)
    assert 0 <= g.actual - auto_floor_kib(1024 * MIB) < 4 * MIB
    g.committed = 5000 * MIB
    run.step()
    assert g.actual == 1024 * MIB, "capped at max memory"
    fixed = Guest(actual_mib=800, committed_mib=10)
    run2 = Run({"f": fixed}, Params(floor_mib=500))
    run2.steps(60)
    assert 0 <= fixed.actual - 500 * MIB < 4 * MIB


def test_stale_or_missing_stats_are_not_ballooned() -> None:
    g = Guest(actual_mib=1024, committed_mib=100)
    run = Run({"g": g}, Params(stale_after=20))
    g.report_age = None
    assert not run.step().targets
    assert run.ctl.guests["g"].state == "no stats"
    g.report_age = 25.0
    assert not run.step().targets
    assert run.ctl.guests["g"].state.startswith("stale stats")
    run.available = 100 * MIB  # not even under host pressure
    plan = run.step()
    assert plan.pressure and not plan.targets
    g.report_age = 1.0
    assert run.step().targets  # fresh again: ballooned


def test_balloon_off_stops_the_controller_for_that_guest() -> None:
    a, b = Guest(actual_mib=1024, committed_mib=100), Guest(actual_mib=1024, committed_mib=100)
    run = Run({"a": a, "b": b})
    run.ctl.set_enabled("a", False)
    run.steps(5)
    assert a.actual == 1024 * MIB and b.actual < 1024 * MIB
    assert run.ctl.guests["a"].state == "off"
    run.ctl.set_enabled("a", True)
    run.step()
    assert a.actual < 1024 * MIB


@pytest.mark.parametrize("storm", ["swapin", "refault", "refused", "swapdev_refused"])
def test_distress_gets_memory_back_at_once_and_holds(storm: str) -> None:
    g = Guest(actual_mib=1024, committed_mib=200)
    run = Run({"g": g}, Params(distress_hold=30, distress_window=60))
    run.steps(6)  # shrinking: 1024 -> ~600 MiB over 30 s
    shrunk = g.actual
    assert shrunk < 700 * MIB
    if storm == "swapin":
        g.swapin = 1000.0
    elif storm == "refault":
        g.refault = 5000.0
    elif storm == "refused":
        g.refused = 12
    else:
        g.swapdev_refused = 7  # its swap device's pages went to storage: the guest is too small
    run.step()
    st_ = run.ctl.guests["g"]
    assert st_.last is not None and st_.last.action == "distress"
    # back to the most it had within the window (the window reaches 60 s back: 1024 - 1/8 excess)
    assert g.actual >= shrunk + 64 * MIB and g.actual >= 900 * MIB
    after = g.actual
    g.swapin, g.refault = 0.0, 0.0
    for _ in range(5):  # 25 s: still inside the hold, no shrinking
        run.step()
        assert g.actual >= after
    run.steps(3)
    assert g.actual < after, "the hold ends and self-ballooning resumes"


def test_host_pressure_drops_ephemeral_first() -> None:
    g = Guest(actual_mib=964, committed_mib=900)  # at its goal: self-ballooning holds
    run = Run({"g": g})
    run.steps(2)
    run.available = 1000 * MIB  # 24 MiB short
    run.ephemeral = 100 * MIB
    plan = run.step()
    assert plan.pressure and plan.drop_ephemeral_kib == 24 * MIB
    assert not plan.targets, "the ephemeral pages were enough"


def test_host_pressure_shares_and_rate_limit() -> None:
    a, b = Guest(actual_mib=964, committed_mib=900), Guest(actual_mib=964, committed_mib=900)
    run = Run({"a": a, "b": b}, host=HostParams(min_available_mib=1024, pressure_step_mib=64))
    run.ctl.add("a", Params(shares=1000))
    run.ctl.add("b", Params(shares=2000))
    run.steps(2)  # both at their goals (964 MiB)
    start_a, start_b = a.actual, b.actual
    run.available = 1024 * MIB - 90 * MIB
    plan = run.step()
    took_a, took_b = start_a - a.actual, start_b - b.actual
    assert took_a + took_b == 90 * MIB
    assert took_a == pytest.approx(2 * took_b, abs=2), "twice the shares, half the giving"
    assert plan.deficit_kib == 0
    # a deficit larger than two steps is limited to pressure_step per guest per interval
    run.available = 1024 * MIB - 500 * MIB
    before = {"a": a.actual, "b": b.actual}
    plan = run.step()
    assert before["a"] - a.actual == 64 * MIB and before["b"] - b.actual == 64 * MIB
    assert plan.deficit_kib == 500 * MIB - 128 * MIB


def test_host_pressure_stops_at_floors_and_gives_back_after() -> None:
    a = Guest(actual_mib=400, committed_mib=380)
    run = Run({"a": a}, host=HostParams(min_available_mib=1024, pressure_step_mib=64))
    run.steps(2)
    floor = auto_floor_kib(a.max)
    run.available = 100 * MIB  # a huge deficit that never goes away (others use the memory)
    for _ in range(10):
        plan = run.step()
        run.available = 100 * MIB
        assert a.actual >= floor
    assert a.actual == floor and plan.pressure
    st_ = run.ctl.guests["a"]
    assert st_.last is not None and st_.last.action == "pressure"
    run.available = PLENTY
    grown = []
    for _ in range(6):
        run.step()
        grown.append(a.actual)
    assert grown == sorted(grown) and grown[-1] == 444 * MIB, "back to its goal"
    assert grown[0] - floor <= 64 * MIB, "given back a step at a time"


def test_persistent_excess_becomes_shrink_notices_by_holding() -> None:
    a, b = Guest(actual_mib=512), Guest(actual_mib=512)
    a.persistent, b.persistent = 3000, 1000
    run = Run({"a": a, "b": b})
    plan = run.step(persistent_excess=400)
    assert plan.shrink_pages == {"a": 300, "b": 100}


def test_reserve_takes_from_guests_above_goal_most_excess_first() -> None:
    a = Guest(actual_mib=1024, committed_mib=200)  # 760 MiB above goal
    b = Guest(actual_mib=600, committed_mib=400)  # 136 above goal
    c = Guest(actual_mib=1024, committed_mib=1000)  # at its goal
    run = Run({"a": a, "b": b, "c": c})
    obs = {n: g.obs() for n, g in run.guests.items()}
    targets = run.ctl.reserve(run.now, 800 * MIB, obs)
    assert targets == {"a": 264 * MIB, "b": 560 * MIB}
    assert run.ctl.guests["a"].last.action == "reserve"  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(
    st.integers(0, 10_000),
    st.dictionaries(st.sampled_from("abcdef"), st.integers(0, 5000), min_size=1),
    st.dictionaries(st.sampled_from("abcdef"), st.integers(1, 8000)),
)
def test_share_out_never_exceeds_room_and_sums(
    amount: int, room: dict[str, int], shares: dict[str, int]
) -> None:
    out = share_out(amount, room, shares)
    assert all(0 <= out[g] <= room[g] for g in room)
    assert sum(out.values()) == min(amount, sum(room.values()))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 4000), st.booleans()), min_size=1, max_size=40),
    st.integers(256, 4096),
    st.integers(64, 4096),
)
def test_any_trace_keeps_floor_and_max(
    trace: list[tuple[int, int, bool]], max_mib: int, start_mib: int
) -> None:
    g = Guest(actual_mib=min(start_mib, max_mib), max_mib=max_mib)
    run = Run({"g": g})
    floor = auto_floor_kib(g.max)
    for committed, available, storm in trace:
        g.committed = committed * MIB
        g.swapin = 1000.0 if storm else 0.0
        run.available = available * MIB
        plan = run.step()
        if "g" in plan.targets:
            assert floor <= g.actual <= g.max


def test_config_balloon_table() -> None:
    cfg = configmod.parse(
        {
            "balloon": {
                "enabled": True,
                "interval": 2,
                "reserve_mib": 32,
                "host_min_available_mib": 512,
                "guest": [{"name": "tmem-1", "shares": 3000, "enabled": False, "floor_mib": 300}],
            }
        }
    )
    b = cfg.balloon
    assert b.enabled and b.interval == 2.0 and b.host.min_available_mib == 512
    assert b.params("tmem-2") == replace(Params(), reserve_mib=32)
    p1 = b.params("tmem-1")
    assert (p1.shares, p1.enabled, p1.floor_mib, p1.reserve_mib) == (3000, False, 300, 32)
    assert not configmod.parse({}).balloon.enabled
    with pytest.raises(configmod.ConfigError, match=r"balloon\.down_fraction"):
        configmod.parse({"balloon": {"down_fraction": 2}})
    with pytest.raises(configmod.ConfigError, match=r"balloon\.bogus"):
        configmod.parse({"balloon": {"bogus": 1}})
    with pytest.raises(configmod.ConfigError, match="listed twice"):
        configmod.parse({"balloon": {"guest": [{"name": "a"}, {"name": "a"}]}})


def test_fixed_size_guest_keeps_its_size_and_what_reserve_took() -> None:
    g = Guest(actual_mib=1024, committed_mib=100)
    run = Run({"g": g}, Params(self_balloon=False))
    run.steps(5)
    assert g.actual == 1024 * MIB, "no self-ballooning"
    targets = run.ctl.reserve(run.now, 300 * MIB, {"g": g.obs()})
    g.actual = targets["g"]
    run.steps(5)
    assert g.actual == 724 * MIB, "what reserve took stays taken"
    run.available = 100 * MIB  # pressure takes, then gives back to its own size
    run.step()
    assert g.actual == 660 * MIB
    run.available = PLENTY
    run.steps(3)
    assert g.actual == 724 * MIB


def test_stats_table_shows_goal_target_actual_floor_and_last_action() -> None:
    from hostagent import statsview

    g = Guest(actual_mib=1024, committed_mib=300)
    run = Run({"g": g})
    run.steps(3)
    st_ = run.ctl.guests["g"]
    figures = {
        "enabled": True,
        "state": st_.state,
        "goal_kib": st_.goal_kib,
        "target_kib": st_.target_kib,
        "actual_kib": g.actual,
        "floor_kib": st_.floor_kib,
        "max_kib": g.max,
        "given_back_kib": st_.given_back_kib,
        "returned_kib": 0,
        "last": {
            "action": "shrink",
            "from_kib": 900 * MIB,
            "to_kib": g.actual,
            "reason": st_.last.reason if st_.last else "",
        },
    }
    text = statsview.format_stats(
        {
            "guests": {"u": {"name": "tmem-1", "balloon": figures}},
            "balloon": {
                "enabled": True,
                "interval": 5,
                "pressure": False,
                "host_available_kib": 8 << 20,
                "host_min_available_kib": 1 << 20,
            },
        }
    )
    lines = text.splitlines()
    table = lines[next(i for i, x in enumerate(lines) if x.startswith("balloon (MiB)")) :]
    row = next(line for line in table if line.startswith("tmem-1"))
    mib = [f"{kib / MIB:.0f}" for kib in (g.actual, g.actual, st_.given_back_kib)]
    assert row.split()[1:7] == ["364", mib[0], mib[1], "232", "1024", mib[2]]
    assert "last shrink 900->" in row and "Committed_AS" in row
