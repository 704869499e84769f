"""The balloon controller's I/O: observe libvirt domains and guest reports, apply the policy's plan.

`hostagent/balloon.py` decides; this module gathers each interval's observations (libvirt's balloon
`actual` and max memory, the guest's last report and rates, its persistent pages in the pool),
asks `Controller.step`, then acts in the order the policy means: tmem's ephemeral pages first,
shrink notices for persistent pages the pool can no longer hold, then balloon targets through
libvirt (`setMemoryFlags`, run in a worker thread since libvirt calls block) with a BALLOON_TARGET
notice to the guest. Only libvirt domains are ballooned: a socket guest has no balloon.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from guestagent.protocol import wire
from guestagent.protocol.wire import PAGE_SIZE
from hostagent.balloon import KIB_PER_MIB, Controller, GuestState, Observation, Plan
from hostagent.channel import Guest
from hostagent.config import BalloonConfig
from hostagent.pool import PoolEngine
from hostagent.virt import LibvirtWatcher

log = logging.getLogger("hostagent.balloon")

REFAULT_KEYS = ("workingset_refault_file", "workingset_refault_anon", "workingset_refault")


class BalloonDriver:
    """Runs the controller every `interval` over the agent's libvirt guests."""

    def __init__(
        self,
        config: BalloonConfig,
        watcher: LibvirtWatcher,
        guests: Mapping[str, Guest],
        engine: Callable[[], PoolEngine],
        host_available: Callable[[], int],
        tasks: asyncio.TaskGroup,
        swapdev_refused: Callable[[str], int | None] | None = None,
    ) -> None:
        self.config = config
        self.tasks = tasks  # the agent's: it owns the driver's side tasks
        self.swapdev_refused = swapdev_refused
        self.watcher = watcher
        self.guests = guests
        self.engine = engine
        self.host_available = host_available
        self.controller = Controller(config.host)
        self.dropped_ephemeral_bytes = 0
        self.shrink_notices_pages = 0
        self.errors = 0
        self.last_plan: Plan | None = None

    # -- guests coming and going --------------------------------------------------------------------

    def add(self, guest: Guest) -> None:
        st = self.controller.add(guest.name, self.config.params(guest.display))
        st.state = "waiting for stats"
        if guest.domain is not None:
            self.tasks.create_task(self._set_stats_period(guest))

    def remove(self, name: str) -> None:
        self.controller.remove(name)

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.controller.set_enabled(name, enabled)

    async def _set_stats_period(self, guest: Guest) -> None:
        assert guest.domain is not None
        try:
            await asyncio.to_thread(self.watcher.set_stats_period, guest.domain, self.config.stats_period)
        except Exception as err:  # the domain may be going away already
            log.warning("domain %s: cannot set the balloon stats period: %s", guest.display, err)

    # -- the loop ---------------------------------------------------------------------------------

    async def run(self) -> None:
        log.info(
            "balloon controller on: every %.1f s, host pressure below %d MiB available",
            self.config.interval,
            self.config.host.min_available_mib,
        )
        while True:
            await asyncio.sleep(self.config.interval)
            try:
                await self.tick()
            except Exception:
                self.errors += 1
                log.exception("balloon controller step failed")

    async def memories(self, names: Iterable[str]) -> dict[str, tuple[int, int] | None]:
        """(actual, max) KiB per guest from libvirt, the blocking calls in one worker thread."""
        domains = {n: self.guests[n].domain for n in names if n in self.guests}
        return await asyncio.to_thread(
            lambda: {n: self.watcher.memory(d) for n, d in domains.items() if d is not None}
        )

    async def observe(self) -> dict[str, Observation]:
        """One observation per ballooned guest."""
        domains = {
            g.name: g
            for g in self.guests.values()
            if g.domain is not None and g.name in self.controller.guests
        }
        figures = await self.memories(domains)
        now = time.monotonic()
        obs: dict[str, Observation] = {}
        for name, g in domains.items():
            mem = figures.get(name)
            if mem is None:
                obs[name] = Observation(actual_kib=None, max_kib=0)
                continue
            actual, max_kib = mem
            report = g.report
            rates = g.rates
            obs[name] = Observation(
                actual_kib=actual,
                max_kib=max_kib,
                committed_kib=None if report is None else report.get("committed_as_kib"),
                report_age=None if report is None else now - g.report_time,
                swapin_rate=rates.get("pswpin", 0.0),
                refault_rate=sum(rates.get(k, 0.0) for k in REFAULT_KEYS),
                preswap_refused=None if report is None else report.get("preswap_puts_refused"),
                persistent_pages=g.client.pers.pages,
                swapdev_refused=None if self.swapdev_refused is None else self.swapdev_refused(name),
            )
        return obs

    async def tick(self) -> Plan:
        engine = self.engine()
        obs = await self.observe()
        available = self.host_available()
        # The engine's budget follows host memory (the agent samples it every second); whatever is
        # over it once the ephemeral pages are gone is persistent.
        over = engine.arena.used_bytes - engine.budget_bytes
        excess = max(0, over) if engine.eph_bytes == 0 else 0
        plan = self.controller.step(
            time.monotonic(),
            obs,
            available // 1024,
            ephemeral_kib=engine.eph_bytes // 1024,
            persistent_excess_pages=-(-excess // PAGE_SIZE),
        )
        self.last_plan = plan
        if plan.drop_ephemeral_kib:
            freed = engine.reserve(available + plan.drop_ephemeral_kib * 1024)
            self.dropped_ephemeral_bytes += freed
            log.info("host pressure: dropped %d KiB of ephemeral tmem pages", freed // 1024)
        for name, pages in plan.shrink_pages.items():
            guest = self.guests.get(name)
            if guest is not None and guest.send_notice(wire.Notice.SHRINK_PERSISTENT, pages):
                self.shrink_notices_pages += pages
                log.info("guest %s: asked to move %d persistent pages out of tmem", guest.display, pages)
        await self.apply(plan.targets)
        return plan

    async def apply(self, targets: Mapping[str, int]) -> None:
        """Set balloon targets through libvirt and tell each guest its new target."""
        for name, kib in targets.items():
            guest = self.guests.get(name)
            if guest is None or guest.domain is None:
                continue
            st = self.controller.guests.get(name)
            try:
                await asyncio.to_thread(self.watcher.set_memory, guest.domain, kib)
            except Exception as err:
                self.errors += 1
                log.warning(
                    "domain %s: setting the balloon to %d MiB failed: %s",
                    guest.display,
                    kib // KIB_PER_MIB,
                    err,
                )
                continue
            guest.send_notice(wire.Notice.BALLOON_TARGET, kib)
            if st is not None and st.last is not None:
                log.info(
                    "domain %s: balloon %s %d -> %d MiB (%s)",
                    guest.display,
                    st.last.action,
                    st.last.from_kib // KIB_PER_MIB,
                    kib // KIB_PER_MIB,
                    st.last.reason,
                )

    async def reserve(self, need_kib: int, wait: float) -> dict[str, Any]:
        """`hostagent reserve`: lower the targets of guests above their goal, then watch each one's
        `actual` follow for up to `wait` s; per guest (display name) what it released."""
        obs = await self.observe()
        targets = self.controller.reserve(time.monotonic(), need_kib, obs)
        await self.apply(targets)
        start = {n: o.actual_kib for n, o in obs.items() if n in targets}
        deadline = time.monotonic() + wait
        while True:
            now = await self.memories(targets)
            if time.monotonic() >= deadline or all(
                m is not None and m[0] <= targets[n] + 1024 for n, m in now.items()
            ):
                break
            await asyncio.sleep(0.5)
        out: dict[str, Any] = {}
        for name, target in targets.items():
            before, after = start.get(name), now.get(name)
            out[self.guests[name].display if name in self.guests else name] = {
                "target_kib": target,
                "actual_kib": None if after is None else after[0],
                "released_kib": 0 if before is None or after is None else max(0, before - after[0]),
            }
        return out

    # -- what `hostagent stats` shows ---------------------------------------------------------------

    def guest_figures(self, name: str) -> dict[str, Any] | None:
        st = self.controller.guests.get(name)
        if st is None:
            return None
        actual = (
            self.watcher.balloon_actual.get(self.guests[name].domain or "") if name in self.guests else None
        )
        return _guest_figures(st, actual)

    def figures(self) -> dict[str, Any]:
        plan = self.last_plan
        return {
            "enabled": True,
            "interval": self.config.interval,
            "pressure": self.controller.pressure,
            "deficit_kib": self.controller.deficit_kib,
            "host_min_available_kib": self.config.host.min_available_mib * KIB_PER_MIB,
            "host_available_kib": self.host_available() // 1024,
            "dropped_ephemeral_bytes": self.dropped_ephemeral_bytes,
            "shrink_notices_pages": self.shrink_notices_pages,
            "errors": self.errors,
            "last_plan_targets": len(plan.targets) if plan is not None else 0,
        }


def _guest_figures(st: GuestState, event_actual: int | None) -> dict[str, Any]:
    last = st.last
    return {
        "enabled": st.params.enabled,
        "self_balloon": st.params.self_balloon,
        "state": st.state,
        "goal_kib": st.goal_kib,
        "target_kib": st.target_kib,
        "actual_kib": event_actual,
        "floor_kib": st.floor_kib,
        "boot_kib": st.boot_kib,
        "given_back_kib": st.given_back_kib,
        "returned_kib": st.returned_kib,
        "pressure_cap_kib": st.pressure_cap_kib,
        "last": None
        if last is None
        else {
            "time": round(time.time() - (time.monotonic() - last.time), 3),
            "action": last.action,
            "from_kib": last.from_kib,
            "to_kib": last.to_kib,
            "reason": last.reason,
        },
    }
