"""The guest agent daemon (`guestagent run`): owns the tmem channel for the whole guest.

Only one process can open a virtio-serial port, so one daemon per guest holds it (systemd
unit `tmem-guestagent.service`) and everything else reaches tmem through the daemon's
local control socket.  The daemon finds the port (retrying every second: it may be
hot-plugged later), keeps the channel up across host-agent restarts (the `Channel` client
reconnects; on a virtio port it first waits for the host side to come back), sends a STATS
report every interval (the host's balloon controller needs Committed_AS), and logs the
host's notices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import trio

from guestagent import control, ports, reporter, selftest, swapview
from guestagent.channel import Channel, ChannelError, open_channel, resolve_channel_path
from guestagent.config import Config, PrecacheMount
from guestagent.protocol import wire

if TYPE_CHECKING:
    from guestagent.mountkeeper import Keeper
    from guestagent.precache import PrecacheFS
    from guestagent.swapper import Swapper

__all__ = ["GuestAgent", "StartupError"]

log = logging.getLogger(__name__)

PORT_RETRY: Final = 1.0  # seconds between looks for a missing virtio-serial port
FATAL_RETRY: Final = 5.0  # seconds before reopening a channel that gave up (e.g. version refused)
CHECK_TIMEOUT: Final = 10.0
STOP_PRESWAP_TIMEOUT: Final = 6.0  # the swapper's own bound (swapper.STOP_TIMEOUT) and a little more
DEVICE_STATS_TIMEOUT: Final = 2.0  # `guestagent stats` waits this long for the host's device counters
MIB_PAGES: Final = (1 << 20) // 4096
_COUNTERS: Final = (
    "reports_sent",  # STATS reports handed to a connected channel
    "reports_skipped",  # intervals that passed while disconnected
    "report_errors",  # /proc could not be read
    "notices",  # NOTICE frames from the host
    "checks",  # self-tests run for the control socket
    "checks_failed",
    "control_requests",
    "channel_failures",  # the channel gave up and was reopened
    "shrinks",  # SHRINK_PERSISTENT notices acted on by the preswap agent
    "shrunk_pages",  # persistent pages they moved out of tmem
)


class StartupError(Exception):
    """Something the configuration asks for cannot be set up (the daemon exits with the reason)."""


def default_name() -> str:
    """The hostname, cut to what a HELLO may carry."""
    return socket.gethostname().encode("utf-8")[: wire.MAX_NAME].decode("utf-8", errors="ignore")


async def _clear_dead_mount(mountpoint: str) -> None:
    """A daemon that died without unmounting (SIGKILL, OOM) leaves a FUSE mount whose every access
    fails with ENOTCONN: unmount it (lazily), or its restart could never mount there again."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("precache: %s is a dead mount (its server is gone); unmounting it", mountpoint)
        for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
            with contextlib.suppress(OSError):
                done = await trio.run_process(argv, check=False, capture_stdout=True, capture_stderr=True)
                if done.returncode == 0:
                    return


class GuestAgent:
    """The daemon's state and tasks; `run` is the whole program, minus signal handling."""

    def __init__(
        self,
        cfg: Config,
        *,
        channel: str | None = None,
        proc_dir: str = "/proc",
        swap_device: str = swapview.DEVICE_LINK,
        keeper: Keeper | None = None,
    ) -> None:
        self.cfg = cfg
        # the mount keeper (mountkeeper): the daemon then runs in a mount namespace of its own and
        # the keeper mounts precache where the guest's processes see it; None: libfuse mounts here
        self.keeper = keeper
        self.override = channel or cfg.channel or None
        self.name = cfg.name or default_name()
        self.proc_dir = proc_dir
        self.swap_device_link = swap_device
        self.spec: str | None = None  # the channel in use, once known
        self.channel: Channel | None = None  # set once the first handshake is done
        self.state = "starting"
        self.error: str | None = None  # why we are not connected, when we know
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.last_report: dict[str, int] | None = None
        self.last_report_time = 0.0
        self.last_notice: dict[str, Any] | None = None
        self._started = time.monotonic()
        self._channel_open = trio.Event()
        self.precache: PrecacheFS | None = None  # the mount's file system, while mounted
        self.swapper: Swapper | None = None  # the preswap agent on the current channel, while it runs
        self._preswap_scope: trio.CancelScope | None = None  # its task, to end it before the channel
        self._preswap_done: trio.Event | None = None

    # ----------------------------------------------------------------- the program

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the control socket, then keep a channel open for as long as we run."""
        async with trio.open_nursery() as nursery:
            await nursery.start(control.serve, self.cfg.control_socket, self.handle)
            log.info("control socket %s ready", self.cfg.control_socket)
            for mount in self.cfg.precache:
                await nursery.start(self._serve_precache, mount)
            task_status.started()
            while True:
                spec = await self._find_channel()
                try:
                    await self._serve_channel(spec)
                except ChannelError as exc:
                    self.counters["channel_failures"] += 1
                    self.error = str(exc)
                    self.state = "failed"
                    log.error("channel %s failed: %s; reopening in %g s", spec, exc, FATAL_RETRY)
                finally:
                    self.channel = None
                    self._channel_open = trio.Event()
                await trio.sleep(FATAL_RETRY)

    async def _find_channel(self) -> str:
        """The channel to open: the override, else the virtio-serial port, waiting for it."""
        if self.override is not None:
            self.spec = self.override
            return self.override
        logged = False
        while True:
            try:
                path = ports.find_port(self.cfg.port)
            except ports.PortNotFound as exc:
                self.state, self.error = "waiting for port", str(exc)
                if not logged:
                    log.warning("%s; looking again every %g s", exc, PORT_RETRY)
                    logged = True
                await trio.sleep(PORT_RETRY)
                continue
            log.info("virtio-serial port %s is %s", self.cfg.port, path)
            self.spec = path
            return path

    def stop(self) -> None:
        """Say that the daemon is about to be cancelled (call first): the preswap agent's region
        releases then wait for a missing host agent a bounded time only."""
        if self.swapper is not None:
            self.swapper.stop()

    async def stop_preswap(self) -> None:
        """End the preswap agent while the channel is still up (call after `stop`, before cancelling
        `run`): its regions are flushed and its pool destroyed on the host.  Cancelled together, the
        channel's own tasks would be gone before the swapper's last requests could go out."""
        scope, done = self._preswap_scope, self._preswap_done
        if scope is None or done is None:
            return
        scope.cancel()
        with trio.move_on_after(STOP_PRESWAP_TIMEOUT):
            await done.wait()

    async def _serve_channel(self, spec: str) -> None:
        self.state, self.error = "connecting", None
        log.info("opening channel %s as %r", spec, self.name)
        async with open_channel(
            spec, name=self.name, reconnect=True, retry_interval=self.cfg.retry_interval
        ) as ch:
            self.channel = ch
            self._channel_open.set()
            failed: list[ChannelError] = []
            async with trio.open_nursery() as nursery:

                async def guarded(loop: Callable[[Channel], Awaitable[None]]) -> None:
                    # the channel gave up: stop both loops and say why with a plain exception,
                    # not an exception group (trio >= 0.25 wraps what escapes a nursery)
                    try:
                        await loop(ch)
                    except ChannelError as exc:
                        failed.append(exc)
                        self.stop()  # the regions end with this channel; a new swapper serves the next
                        nursery.cancel_scope.cancel()

                nursery.start_soon(guarded, self._report_loop)
                nursery.start_soon(guarded, partial(self._notice_loop, nursery=nursery))
                if self.cfg.preswap:
                    nursery.start_soon(guarded, self._run_preswap)
            if failed:
                raise failed[0]

    async def _report_loop(self, ch: Channel) -> None:
        """A report every interval while connected; while not, one as soon as the channel is back."""
        interval = self.cfg.report_interval
        while True:
            if not ch.connected:
                self.counters["reports_skipped"] += 1
                with trio.move_on_after(interval):
                    await ch.wait_connected()
                continue
            try:
                values = reporter.read_report(self.proc_dir)
            except OSError as exc:
                self.counters["report_errors"] += 1
                log.warning("cannot read the memory report: %s", exc)
            else:
                if self.precache is not None:
                    values.update(self.precache.report_values())
                if self.swapper is not None:
                    values.update(self.swapper.report_values())
                await ch.report_stats(values)
                self.counters["reports_sent"] += 1
                self.last_report, self.last_report_time = values, time.monotonic()
            await trio.sleep(interval)

    async def _notice_loop(self, ch: Channel, *, nursery: trio.Nursery) -> None:
        """Log what the host asks of us; a shrink notice is the preswap agent's to act on (a task of
        its own in the channel's nursery: moving pages must not hold up the next notice)."""
        async for kind, value in ch.notices:
            self.counters["notices"] += 1
            self.last_notice = {"kind": kind.name.lower(), "value": value, "time": time.time()}
            if kind == wire.Notice.BALLOON_TARGET:
                log.info("host notice: balloon target is now %d KiB", value)
            elif kind == wire.Notice.SHRINK_PERSISTENT:
                log.info("host notice: move %d persistent pages out of tmem", value)
                sw = self.swapper
                if sw is not None and sw.pool is not None:
                    nursery.start_soon(self._shrink, sw, value)
            else:  # pragma: no cover - parse_notice only yields known kinds
                log.info("host notice: %s %d", kind.name, value)

    # ----------------------------------------------------------------- preswap

    async def _run_preswap(self, ch: Channel) -> None:
        """The preswap agent (`[preswap]`) on this channel, until the channel is closed: its regions
        end with it (the applications see their socket close), the next channel gets a new one."""
        from guestagent import swapper as swappermod

        cfg = self.cfg
        guest_budget = cfg.preswap_guest_budget_mib * MIB_PAGES or None
        try:
            sw = swappermod.Swapper(
                ch,
                cfg.preswap_socket,
                cfg.preswap_swap_file,
                default_budget=cfg.preswap_default_budget_mib * MIB_PAGES,
                guest_budget=guest_budget,
            )
        except OSError as exc:
            raise StartupError(f"preswap: cannot open the swap file {cfg.preswap_swap_file}: {exc}") from None
        self.swapper = sw
        done = self._preswap_done = trio.Event()
        try:
            with trio.CancelScope() as self._preswap_scope:
                async with trio.open_nursery() as nursery:
                    try:
                        await nursery.start(sw.run)
                    except OSError as exc:
                        raise StartupError(f"preswap: cannot serve {cfg.preswap_socket}: {exc}") from None
                    log.info(
                        "preswap: serving regions on %s (swap file %s)",
                        cfg.preswap_socket,
                        cfg.preswap_swap_file,
                    )
                    if guest_budget is None:
                        nursery.start_soon(partial(swappermod.follow_pressure, sw, proc_dir=self.proc_dir))
        finally:
            if self.swapper is sw:
                self.swapper = None
            self._preswap_scope = None
            done.set()

    async def _shrink(self, sw: Swapper, pages: int) -> None:
        moved = await sw.shrink(pages)
        self.counters["shrinks"] += 1
        self.counters["shrunk_pages"] += moved
        log.info("preswap: host asked for %d persistent pages back: moved %d", pages, moved)

    def preswap_stats(self) -> dict[str, Any] | None:
        """The preswap agent's counters, for `guestagent stats` and `status` (None: not configured)."""
        if not self.cfg.preswap:
            return None
        sw = self.swapper
        out: dict[str, Any] = {
            "socket": self.cfg.preswap_socket,
            "swap_file": self.cfg.preswap_swap_file,
            "running": sw is not None,
        }
        if sw is not None:
            out.update(sw.stats())
        return out

    # ----------------------------------------------------------------- precache

    async def _serve_precache(
        self, mount: PrecacheMount, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Mount (a mount failure stops the daemon: its config asked for it) and serve until cancelled;
        the mount's pool lives on whichever channel the daemon has open (`_attach_precache`).
        This is `precache.serve` with a channel that may be reopened under the mount."""
        import pyfuse3  # only here: a guest without a precache mount needs no FUSE

        from guestagent import precache

        await _clear_dead_mount(mount.mountpoint)
        try:
            async with precache.mounted(
                mount.backing, mount.mountpoint, allow_other=mount.allow_other, keeper=self.keeper
            ) as fs:
                log.info("precache: %s mounted at %s", mount.backing, mount.mountpoint)
                self.precache = fs
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._attach_precache, fs)
                    task_status.started()
                    await pyfuse3.main()  # returns when unmounted from outside (fusermount3 -u)
                    log.warning("precache: %s was unmounted", mount.mountpoint)
                    nursery.cancel_scope.cancel()
        except precache.MountError as exc:
            raise StartupError(str(exc)) from None
        finally:
            if self.precache is not None:
                self.precache = None
                log.info("precache: %s unmounted", mount.mountpoint)

    async def _attach_precache(self, fs: PrecacheFS) -> None:
        """The mount's pool on the current channel; again on the next one if the channel is reopened."""
        from guestagent import precache

        while True:
            await self._channel_open.wait()
            ch = self.channel
            if ch is None:
                await trio.sleep(PORT_RETRY)
                continue
            closed = self._channel_open
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(precache.use_channel, fs, ch)
                    nursery.start_soon(self._cancel_when_reopened, ch, nursery.cancel_scope)
            except* ChannelError as group:  # trio >= 0.25 wraps it in a group, 0.22 does not
                log.warning("precache: no pool on this channel: %s", group.exceptions[0])
            while self._channel_open is closed:  # wait until the reopen has begun
                await trio.sleep(PORT_RETRY)

    async def _cancel_when_reopened(self, ch: Channel, scope: trio.CancelScope) -> None:
        while self.channel is ch:
            await trio.sleep(PORT_RETRY)
        scope.cancel()

    def precache_stats(self) -> dict[str, Any] | None:
        """The mount and its counters, for `guestagent stats` and `status`."""
        if not self.cfg.precache:
            return None
        mount = self.cfg.precache[0]
        fs = self.precache
        out: dict[str, Any] = {
            "backing": mount.backing,
            "mountpoint": mount.mountpoint,
            "mounted": fs is not None,
        }
        if fs is not None:
            ch = self.channel
            fs.counters.connected = fs.pool is not None and ch is not None and ch.connected
            out.update(dataclasses.asdict(fs.counters))
        return out

    # ----------------------------------------------------------------- the control socket

    async def handle(self, req: Mapping[str, Any]) -> Any:
        """One control request: status, stats or check."""
        self.counters["control_requests"] += 1
        cmd = req.get("cmd")
        if cmd == "status":
            await trio.lowlevel.checkpoint()
            return self.status()
        if cmd == "stats":
            return {**self.stats(), "swap_device": await self.swap_device()}
        if cmd == "check":
            timeout = req.get("timeout", CHECK_TIMEOUT)
            if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
                raise control.ControlError("check: timeout must be a number of seconds in (0, 600]")
            return await self.check(float(timeout))
        raise control.ControlError(f"unknown command {cmd!r} (known: status, stats, check)")

    def status(self) -> dict[str, Any]:
        ch = self.channel
        connected = ch is not None and ch.connected
        if ch is not None:
            self.state = "connected" if connected else "disconnected"
        now = time.monotonic()
        return {
            "connected": connected,
            "state": self.state,
            "error": None if connected else self.error,
            "channel": self.spec,
            "transport": resolve_channel_path(self.spec)[0] if self.spec else None,
            "port": None if self.override is not None else self.cfg.port,
            "name": self.name,
            "generation": ch.generation if ch is not None else 0,
            "welcome": dataclasses.asdict(ch.welcome) if ch is not None else None,
            "last_report": (
                {"age": round(now - self.last_report_time, 3), "values": self.last_report}
                if self.last_report is not None
                else None
            ),
            "last_notice": self.last_notice,
            "precache": self.precache_stats(),
            "preswap": self.preswap_stats(),
            "pid": os.getpid(),
            "uptime": round(now - self._started, 3),
        }

    def stats(self) -> dict[str, Any]:
        ch = self.channel
        generation = ch.generation if ch is not None else 0
        return {
            **self.counters,
            "connected": ch is not None and ch.connected,
            "generation": generation,
            "reconnects": max(0, generation - 1),
            "uptime": round(time.monotonic() - self._started, 3),
            "precache": self.precache_stats(),
            "preswap": self.preswap_stats(),
        }

    async def swap_device(self) -> dict[str, Any]:
        """The pool-backed swap disk: the host's counters for this guest, asked over the channel
        (only the host sees the disk's traffic), beside the guest's own view of it."""
        out: dict[str, Any] = {"host": None, "host_error": None}
        try:
            out["guest"] = swapview.read_view(self.swap_device_link, self.proc_dir)
        except (OSError, ValueError) as exc:
            out["guest"], out["guest_error"] = None, str(exc)
        ch = self.channel
        if ch is None or not ch.connected:
            out["host_error"] = "not connected to the host agent"
        elif not ch.granted(wire.Feature.DEVICE_STATS):
            out["host_error"] = "the host agent does not serve device counters (an older version)"
        else:
            try:
                with trio.move_on_after(DEVICE_STATS_TIMEOUT):
                    out["host"] = await ch.device_stats()
                    if out["host"] is None:
                        out["host_error"] = "the host agent serves no swap device for this guest"
                    return out
                out["host_error"] = f"no answer within {DEVICE_STATS_TIMEOUT:g} s"
            except ChannelError as exc:
                out["host_error"] = str(exc)
        return out

    async def check(self, timeout: float) -> dict[str, Any]:
        """The self-test through the daemon's own channel (see `selftest`)."""
        self.counters["checks"] += 1
        result: dict[str, Any] = {"ok": False, "channel": self.spec, "via": "daemon"}
        start = time.perf_counter()
        try:
            with trio.fail_after(timeout):
                await self._channel_open.wait()
                ch = self.channel
                if ch is None:  # closed again while we were woken
                    raise ChannelError("the channel is being reopened")
                await ch.wait_connected()
                result["generation"] = ch.generation
                result.update(await selftest.exercise_all(ch, timings=True))
        except trio.TooSlowError:
            result["ok"] = False
            result["error"] = f"not done within {timeout:g} s (connected: {self.status()['connected']})"
        except (ChannelError, OSError, ValueError) as exc:
            result["ok"] = False
            result["error"] = str(exc)
        result["elapsed_ms"] = round((time.perf_counter() - start) * 1e3, 1)
        if not result["ok"]:
            self.counters["checks_failed"] += 1
        return result
