"""The one place the guest reads trio's private scheduler state, to hold the loop safely.

A caller that waits for its reply in place (a poll on the fd) instead of parking saves two
scheduler passes per request, but must not hold the event loop while another task could run.
trio's public statistics cost as much as a tenth of the round trip under emulation, so this
module reads the run queue, entry queue, deadline heap and a task's schedule-point count
directly, with public fallbacks; tests/test_guest_sched.py fails loudly if those fields change.
"""

from __future__ import annotations

import math
from typing import Any, Final, Protocol

import trio
from trio.lowlevel import Task, current_statistics, current_task

__all__ = ["DEFAULT_HOLD", "Budget", "StepSlice", "hold_budget", "private_state_ok", "step_of"]

DEFAULT_HOLD: Final = 0.002  # seconds a caller may hold the loop at most, by default


class Budget(Protocol):
    """What `hold_budget` returns: seconds a caller may hold the event loop right now."""

    def __call__(self, spare: Task | None = None) -> float: ...


def hold_budget(most: float = DEFAULT_HOLD) -> Budget:
    """How long a caller may hold trio's event loop in a synchronous wait (`Connection.await_sync`,
    the preswap fault loop's poll): 0 while the calling task is cancelled (it must reach a
    checkpoint) or trio's run queue holds another task or a run_sync_soon callback waits, else
    up to `most` seconds, within the next cancel deadline.  `spare`, a task that may be runnable
    without that counting (a writer whose queue the caller just wrote itself), is optional.
    Tasks later in the batch trio is running are not in its run queue: callers bound their
    holds per step as well (_SYNC_SLICE, the fault loop's FAULT_SLICE).

    It reads trio's run queue, entry queue and deadline heap directly (the same fields in
    trio 0.22, which the guest image ships, and today's): current_statistics() builds two
    objects and asks the I/O backend for its figures on every call, which under emulation
    costs as much as a tenth of the round trip it is meant to shorten.  A trio without
    those fields gets current_statistics() instead.
    """
    try:
        runner = _runner()
        entry_size = runner.entry_queue.size
        next_deadline = runner.deadlines.next_deadline
        now = runner.clock.current_time
    except (ImportError, AttributeError, TypeError):  # pragma: no cover - another trio

        def public(spare: Task | None = None) -> float:
            stats = current_statistics()
            if stats.tasks_runnable or stats.run_sync_soon_queue_size:
                return 0.0
            return max(
                0.0,
                min(
                    most,
                    stats.seconds_to_next_deadline,
                    trio.current_effective_deadline() - trio.current_time(),
                ),
            )

        return public

    def budget(spare: Task | None = None) -> float:
        runq = runner.runq
        if (
            (runq and (len(runq) > 1 or runq[0] is not spare))
            or entry_size()
            or current_task()._cancel_status.effectively_cancelled
        ):
            # (a cancelled scope's deadline has left the deadline heap: ask the task itself)
            return 0.0
        deadline = next_deadline()
        return most if deadline == math.inf else min(most, deadline - now())

    return budget


def _runner() -> Any:
    """trio's runner, after checking it has the fields `hold_budget` reads (raises if not)."""
    from trio._core._run import GLOBAL_RUN_CONTEXT

    runner = GLOBAL_RUN_CONTEXT.runner
    _ = (
        len(runner.runq),
        runner.entry_queue.size(),
        runner.deadlines.next_deadline(),  # the shape
        runner.clock.current_time(),
        current_task()._cancel_status.effectively_cancelled,
    )  # we rely on
    return runner


def step_of(task: Task) -> int:
    """How many times `task` has yielded (trio >= 0.22 counts it); -1 if this trio does not."""
    step: int = getattr(task, "_schedule_points", -1)
    return step


def private_state_ok() -> bool:
    """True if the running trio has the private fields this module reads (call inside trio):
    otherwise `hold_budget` falls back to the public statistics and `StepSlice` never lets a
    caller hold the loop, which is correct but loses the fast paths."""
    try:
        _runner()
    except (ImportError, AttributeError, TypeError):
        return False
    return step_of(current_task()) >= 0


class StepSlice:
    """Bounds the synchronous waits of one step of a task (from when trio ran it until it
    yields) to a slice of time, so the event loop runs at least that often however busy the
    task is between waits."""

    __slots__ = ("since", "step", "task")

    def __init__(self) -> None:
        self.task: Task | None = None
        self.step = -1
        self.since = 0.0  # when the current step's first wait began

    def enter(self, now: float, slice_: float) -> bool:
        """May the calling task begin a synchronous wait at `now` (time.monotonic())?"""
        task = current_task()
        step = step_of(task)
        if step != self.step or task is not self.task:
            if step < 0:
                return False  # another trio: steps cannot be told apart, so never hold the loop
            self.task, self.step, self.since = task, step, now  # a new step
            return True
        return now - self.since <= slice_
