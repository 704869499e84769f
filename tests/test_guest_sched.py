"""The trio scheduler hook (guestagent/channel/sched.py) against the trio installed here.

The hook reads trio's private run queue, entry queue, deadline heap and a task's schedule-point
count. If a trio upgrade changes them the channel silently falls back to slower public calls
(and never holds the loop): this test is what says so, loudly.
"""

from __future__ import annotations

import time

import trio

from guestagent.channel.sched import StepSlice, hold_budget, private_state_ok, step_of


def test_trio_still_has_the_private_fields_the_hook_reads() -> None:
    async def main() -> None:
        assert private_state_ok(), f"trio {trio.__version__} changed the internals sched.py reads"
        task = trio.lowlevel.current_task()
        before = step_of(task)
        await trio.sleep(0)
        assert step_of(task) > before  # a yield is a new step

    trio.run(main)


def test_budget_is_zero_while_another_task_is_runnable_or_we_are_cancelled() -> None:
    async def main() -> None:
        budget = hold_budget(0.002)
        assert 0 < budget() <= 0.002  # alone on the loop
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)  # runnable now
            assert budget() == 0.0
        with trio.move_on_after(0.0005):
            assert budget() <= 0.0005  # within the next deadline
        with trio.CancelScope() as scope:
            scope.cancel()
            assert budget() == 0.0

    trio.run(main)


def test_step_slice_bounds_the_waits_of_one_step_only() -> None:
    async def main() -> None:
        steps = StepSlice()
        now = time.monotonic()
        assert steps.enter(now, 0.001)
        assert steps.enter(now + 0.0009, 0.001)  # same step, within the slice
        assert not steps.enter(now + 0.0011, 0.001)  # same step, past it
        await trio.sleep(0)
        assert steps.enter(now + 1.0, 0.001)  # a new step starts a new slice

    trio.run(main)
