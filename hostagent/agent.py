"""The host agent process: one asyncio loop serving every guest's channel and the control socket.

It owns the arena and the pool engine (the only process that touches the pool), feeds the engine the
host's available memory every `sample_interval`, and answers the control commands. Guest sockets are
listened on before the control socket appears, so a present control socket means "ready".
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import itertools
import logging
import os
import re
import signal
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from guestagent.protocol import wire
from hostagent import sdnotify
from hostagent.arena import Arena, ArenaError
from hostagent.balloon_driver import BalloonDriver
from hostagent.channel import Guest, GuestChannel
from hostagent.config import Config
from hostagent.control import ControlError, ControlServer, is_listening
from hostagent.metrics_http import MetricsServer
from hostagent.nbd import NbdError
from hostagent.pool import Client, ClientSettings, PoolEngine, TableError
from hostagent.swapserve import NbdConnection, SwapDevices
from hostagent.virt import Domain, LibvirtWatcher

log = logging.getLogger("hostagent")

ARENA_FILE = "arena"  # inside [pool] arena_dir
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
SAVED = "stopped (saved)"  # virt's reason for a domain saved to a file (virsh save)
MIB = 1 << 20


class StartupError(Exception):
    """The agent cannot start (another agent running, a path it cannot use); shown as one line."""


def client_settings(weight: int, cap_mib: int, quota_mib: int, compress: bool) -> ClientSettings:
    return ClientSettings(
        weight=weight, cap_bytes=cap_mib * MIB, quota_bytes=quota_mib * MIB, compress=compress
    )


def host_available() -> int:
    return int(psutil.virtual_memory().available)


class _Stopping(Exception):
    """Raised in the agent's task group to end it: the agent was asked to stop."""


class HostAgent:
    """Arena + engine + servers, built from a `Config`. `run()` serves until SIGTERM/SIGINT."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.process = psutil.Process()
        self.engine: PoolEngine | None = None
        self.guests: dict[str, Guest] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: asyncio.TaskGroup | None = None  # owns every task while the agent serves
        self._links: dict[str, asyncio.Task[None]] = {}  # domain UUID -> its channel's connector
        self.watcher: LibvirtWatcher | None = None
        self.balloon: BalloonDriver | None = None
        self.swap: SwapDevices | None = None
        self._control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self._stop: asyncio.Event | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def run(self) -> None:
        """Start, serve until a signal, shut down cleanly. Raises StartupError."""
        asyncio.run(self._main())

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _main(self) -> None:
        cfg = self.config
        if is_listening(cfg.control.socket):
            raise StartupError(f"another host agent is running at {cfg.control.socket}")
        os.umask(0o077)  # sockets and the arena are the host's alone
        self._stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        try:
            engine = self._open_engine()
            try:
                await self._serve(engine)
            finally:
                engine.close()
                self.engine = None
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _open_engine(self) -> PoolEngine:
        cfg = self.config
        arena_path = Path(cfg.pool.arena_dir) / ARENA_FILE
        try:
            arena = Arena(arena_path, cfg.pool.limit_mib * MIB)
        except ArenaError as err:
            raise StartupError(str(err)) from None
        except OSError as err:
            reason = err.strerror or err
            raise StartupError(f"cannot open the arena {arena_path}: {reason}") from None
        try:
            engine = PoolEngine(
                arena,
                limit_bytes=cfg.pool.limit_mib * MIB,
                host_reserve_bytes=cfg.pool.host_reserve_mib * MIB,
                shared_acl=cfg.shared_acl(),
            )
        except TableError as err:
            arena.close()
            raise StartupError(str(err)) from None
        engine.set_host_available(host_available())
        for g in cfg.guests:
            settings = client_settings(g.weight, g.cap_mib, g.quota_mib, g.compress)
            client = engine.client(g.name, settings)
            # The engine may already have this client, rebuilt from the arena's persistent pools,
            # and client() need not apply settings to an existing one: the config file wins.
            engine.configure(
                g.name,
                weight=g.weight,
                cap_bytes=settings.cap_bytes,
                quota_bytes=settings.quota_bytes,
                compress=g.compress,
            )
            self.guests[g.name] = Guest(g.name, g.socket, client)
        if not cfg.guests and not cfg.libvirt.enabled:
            log.warning(
                "no guests configured and libvirt disabled: nothing will connect (see hostagent.example.toml)"
            )
        for c in engine.clients():
            if c.name not in self.guests:
                log.info("guest %s has persistent pools from a previous run; they wait for it", c.name)
        self.engine = engine
        return engine

    async def _serve(self, engine: PoolEngine) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        try:
            for guest in self.guests.values():
                _prepare_socket_path(guest.socket_path)

                def factory(guest: Guest = guest) -> GuestChannel:
                    return GuestChannel(
                        guest,
                        engine,
                        max_payload=cfg.channels.max_payload,
                        max_vector=cfg.channels.max_vector,
                        device_counters=self._device_counters,
                    )

                self._servers.append(await loop.create_unix_server(factory, guest.socket_path))
                os.chmod(guest.socket_path, 0o600)
            if cfg.metrics.enabled:
                self.metrics = MetricsServer(cfg.metrics.address, cfg.metrics.port, self.stats)
                await self.metrics.start()
            if cfg.swap.enabled:
                await self._serve_swap(engine)
            _prepare_socket_path(cfg.control.socket)
            self._control = ControlServer(cfg.control.socket, self.handle)
            await self._control.start()
        except OSError as err:
            await self._close_servers()
            raise StartupError(str(err)) from None
        log.info(
            "host agent ready: pid %d, %d guest(s), pool limit %d MiB, control %s",
            os.getpid(),
            len(self.guests),
            cfg.pool.limit_mib,
            cfg.control.socket,
        )
        sdnotify.notify(READY=1, MAINPID=os.getpid(), STATUS=self._status())
        try:
            # Every task of the agent belongs to this group (the domains' links too), so none
            # outlives `run` and none fails unseen; a stop request ends them all.
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                tasks.create_task(self._sample(engine))
                if cfg.libvirt.enabled:
                    self.watcher = LibvirtWatcher(
                        cfg.libvirt.uri,
                        cfg.libvirt.channel,
                        self._domain_up,
                        self._domain_down,
                        retry_interval=cfg.libvirt.retry_interval,
                        on_discovered=self._forget_orphans,
                    )
                    tasks.create_task(self.watcher.run())
                    if cfg.balloon.enabled:
                        swap = self.swap
                        self.balloon = BalloonDriver(
                            cfg.balloon,
                            self.watcher,
                            self.guests,
                            self._engine,
                            host_available,
                            tasks,
                            None if swap is None else swap.refusals,
                        )
                        tasks.create_task(self.balloon.run())
                elif cfg.balloon.enabled:
                    log.warning("[balloon] is enabled but [libvirt] is not: there is nothing to balloon")
                tasks.create_task(self._until_stopped())
        except* _Stopping:
            log.info("host agent stopping")
            sdnotify.notify(STOPPING=1, STATUS="stopping")
        finally:
            self._tasks = None
            self._links.clear()
            await self._close_servers()

    def _status(self) -> str:
        """The one line `systemctl status` shows."""
        connected = sum(1 for g in self.guests.values() if g.connected)
        extra = f"; metrics on {self.metrics.url_host()}" if self.metrics is not None else ""
        return (
            f"serving {len(self.guests)} guest(s), {connected} connected; pool limit "
            f"{self.config.pool.limit_mib} MiB{extra}"
        )

    async def _until_stopped(self) -> None:
        """Wait for a stop request, then end the task group (and so every task in it)."""
        assert self._stop is not None
        await self._stop.wait()
        raise _Stopping

    async def _serve_swap(self, engine: PoolEngine) -> None:
        """The swap devices' NBD socket (QEMU connects to it: its group may be given access)."""
        cfg = self.config.swap
        self.swap = SwapDevices(engine, cfg.spill_dir, cfg.size_mib * MIB)
        self.swap.open_existing()
        _prepare_socket_path(cfg.socket)
        swap = self.swap
        self._servers.append(
            await asyncio.get_running_loop().create_unix_server(
                lambda: NbdConnection(swap, self._authorize_swap), cfg.socket
            )
        )
        if cfg.socket_group:
            gid = grp.getgrnam(cfg.socket_group).gr_gid
            parent = os.path.dirname(cfg.socket)
            os.chown(parent, -1, gid)
            os.chmod(parent, os.stat(parent).st_mode & 0o7777 | 0o010)  # the group may traverse
            os.chown(cfg.socket, -1, gid)
            os.chmod(cfg.socket, 0o660)
        else:
            os.chmod(cfg.socket, 0o600)
        log.info("swap devices: %s (%d MiB each, spill files in %s)", cfg.socket, cfg.size_mib, cfg.spill_dir)

    def _device_counters(self, name: str) -> dict[str, int] | None:
        """Guest `name`'s swap-device counters, for its DEVICE_STATS request on its channel."""
        return None if self.swap is None else self.swap.counters(name)

    def _authorize_swap(self, name: str, pid: int) -> Client | str:
        """The guest a swap-device connection may have: the export names it, the peer must be it.

        A configured guest: the socket's permissions decide who may connect. A libvirt domain (the
        export is its UUID): the peer must be a QEMU started with `-uuid` that UUID. QEMU opens the
        device before libvirt reports the domain running, and again at a restore, so the domain
        need not be attached yet: its client is made (or found, after a save) here."""
        guest = self.guests.get(name)
        if guest is not None and guest.domain is None:
            return guest.client
        if not self.config.libvirt.enabled or not _UUID.fullmatch(name):
            return "no such guest"
        if qemu_uuid(pid) != name:
            return f"the peer (pid {pid}) is not the QEMU of domain {name}"
        if guest is not None:
            return guest.client
        engine = self._engine()
        if any(c.name == name for c in engine.clients()):  # saved and restored, or rebuilt
            return engine.client(name)
        dflt = self.config.defaults
        return engine.client(name, client_settings(dflt.weight, dflt.cap_mib, dflt.quota_mib, dflt.compress))

    async def _close_servers(self) -> None:
        if self._control is not None:
            await self._control.close()
            self._control = None
        if self.metrics is not None:
            await self.metrics.close()
            self.metrics = None
        for server in self._servers:
            server.close()
        self._close_channels()
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()
        if self.swap is not None:
            self.swap.close()
            self.swap = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.config.swap.socket)
        for guest in self.guests.values():
            if guest.domain is None:  # a domain's socket is QEMU's, not ours
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(guest.socket_path)

    def _close_channels(self) -> None:
        for guest in self.guests.values():
            guest.close_channel("host agent shutting down")

    # -- libvirt domains ---------------------------------------------------------------------------

    def _domain_up(self, d: Domain) -> None:
        """A running domain with a tmem channel: connect to its socket (QEMU listens on it)."""
        tasks = self._tasks
        if tasks is None or (self._stop is not None and self._stop.is_set()):
            return  # the agent is stopping: its task group takes no new links
        engine = self._engine()
        old = self.guests.get(d.uuid)
        if old is not None:
            old.close_channel("domain re-attached")
            task = self._links.pop(d.uuid, None)
            if task is not None:
                task.cancel()
        dflt = self.config.defaults
        client = engine.client(
            d.uuid, client_settings(dflt.weight, dflt.cap_mib, dflt.quota_mib, dflt.compress)
        )
        guest = Guest(d.uuid, d.socket, client, display=d.name, domain=d.uuid)
        self.guests[d.uuid] = guest
        self._links[d.uuid] = tasks.create_task(self._link(guest))
        if self.balloon is not None:
            self.balloon.add(guest)
        log.info("domain %s (%s): attaching to its tmem channel %s", d.name, d.uuid, d.socket)
        sdnotify.notify(STATUS=self._status())

    def _domain_down(self, uuid: str, reason: str) -> None:
        """The domain is gone: close its channel and free every pool it had, at once."""
        task = self._links.pop(uuid, None)
        if task is not None:
            task.cancel()
        guest = self.guests.pop(uuid, None)
        if self.balloon is not None:
            self.balloon.remove(uuid)
        if guest is None or self.engine is None:
            return
        guest.close_channel(f"domain {reason}")
        pages = guest.client.eph.pages + guest.client.pers.pages
        if reason == SAVED:  # its memory image lives on: so must its persistent pages (swap device)
            self.engine.disconnect(guest.client)
            log.info(
                "domain %s (%s) %s: detached, %d persistent pages kept for its restore",
                guest.display,
                uuid,
                reason,
                guest.client.pers.pages,
            )
            return
        self.engine.remove(guest.client)
        if self.swap is not None:
            self.swap.release(uuid)
        log.info("domain %s (%s) %s: detached, %d pages freed", guest.display, uuid, reason, pages)
        sdnotify.notify(STATUS=self._status())

    def _forget_orphans(self, running: set[str]) -> None:
        """Persistent pools rebuilt from the arena for a domain that is not running are garbage: its
        processes (the only readers of preswap pages) died with it. Configured socket guests are
        not orphans: they are in `self.guests` from the start."""
        engine = self.engine
        if engine is None:
            return
        for client in list(engine.clients()):
            if client.name not in self.guests and client.name not in running:
                pages = client.pers.pages + client.eph.pages
                engine.remove(client)
                if self.swap is not None:
                    pages += self.swap.release(client.name)
                log.info(
                    "%s is not a running domain: its %d pages from a previous run are freed",
                    client.name,
                    pages,
                )

    async def _link(self, guest: Guest) -> None:
        """Keep a connection to the domain's channel socket, reconnecting after each close."""
        loop = asyncio.get_running_loop()
        engine = self._engine()
        cfg = self.config.channels
        delay = 0.1
        warned = False
        while True:
            try:
                _, channel = await loop.create_unix_connection(
                    lambda: GuestChannel(
                        guest,
                        engine,
                        max_payload=cfg.max_payload,
                        max_vector=cfg.max_vector,
                        device_counters=self._device_counters,
                    ),
                    guest.socket_path,
                )
            except OSError as err:
                if not warned and delay >= 1.0:
                    log.warning(
                        "domain %s: cannot connect to %s yet: %s",
                        guest.display,
                        guest.socket_path,
                        err.strerror or err,
                    )
                    warned = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay, warned = 0.1, False
            await channel.closed
            await asyncio.sleep(0.5)  # after a close (QEMU gone, or a protocol error): not in a spin

    async def _sample(self, engine: PoolEngine) -> None:
        """Feed the engine the host's available memory: the pool's budget follows it."""
        while True:
            await asyncio.sleep(self.config.pool.sample_interval)
            try:
                engine.set_host_available(host_available())
            except Exception:
                log.exception("sampling host memory failed")

    # -- control commands -------------------------------------------------------------------------

    def handle(self, req: Mapping[str, Any]) -> Any:
        cmd = req.get("cmd")
        if cmd == "stats":
            return self.stats()
        if cmd == "pools":
            return self._engine().pools_info()
        if cmd == "set":
            return self.set_guest(req)
        if cmd == "reserve":
            return self.reserve(req)
        if cmd == "shrink":
            return self.shrink(req)
        raise ControlError(f"unknown command {cmd!r} (known: pools, reserve, set, shrink, stats)")

    def _engine(self) -> PoolEngine:
        if self.engine is None:
            raise ControlError("the host agent is shutting down")
        return self.engine

    def stats(self) -> dict[str, Any]:
        """engine.stats(), plus per guest its channel and latest report, plus the agent itself."""
        engine_stats = self._engine().stats()
        result: dict[str, Any] = dict(engine_stats)
        guests: dict[str, dict[str, Any]] = {name: dict(g) for name, g in engine_stats["guests"].items()}
        result["guests"] = guests
        now = time.monotonic()
        guest_cpu = 0.0
        for name, g in guests.items():
            guest = self.guests.get(name)
            g["name"] = guest.display if guest is not None else name
            g["uuid"] = guest.domain if guest is not None else None
            g["rates"] = guest.rates if guest is not None else {}
            g["domain"] = None
            if guest is not None and guest.domain is not None and self.watcher is not None:
                g["domain"] = self.watcher.domain_figures(guest.domain)
                if g["domain"] is not None:
                    guest_cpu += g["domain"]["cpu_seconds"]
            g["configured"] = guest is not None
            g["connected"] = guest is not None and guest.connected
            g["connected_since"] = guest.connected_since if guest is not None else None
            g["name_in_hello"] = guest.hello_name if guest is not None else ""
            g["report"] = (
                {"values": guest.report, "age": round(now - guest.report_time, 3)}
                if guest is not None and guest.report is not None
                else None
            )
            g["swapdev"] = None if self.swap is None else self.swap.figures(name)
            g["balloon"] = None if self.balloon is None else self.balloon.guest_figures(name)
            if g["balloon"] is not None and g["domain"] is not None:
                g["balloon"]["actual_kib"] = g["domain"]["actual_kib"]
                g["balloon"]["max_kib"] = g["domain"]["max_kib"]
        cpu = self.process.cpu_times()
        agent_cpu = cpu.user + cpu.system
        result["agent"] = {
            "pid": os.getpid(),
            "uptime": round(now - self.started, 3),
            "cpu_seconds": round(agent_cpu, 3),
            "guest_cpu_seconds": round(guest_cpu, 3),
            # host-agent CPU as a share of the guests' (libvirt's figures), since the agent started
            "cpu_ratio": round(agent_cpu / guest_cpu, 5) if guest_cpu else None,
            "libvirt": None
            if self.watcher is None
            else {"uri": self.watcher.uri, "connected": self.watcher.connected},
            "metrics": None
            if self.metrics is None
            else {
                "address": self.metrics.address,
                "port": self.metrics.port,
                "scrapes": self.metrics.scrapes,
            },
        }
        result["balloon"] = {"enabled": False} if self.balloon is None else self.balloon.figures()
        return result

    def _guest_named(self, name: Any) -> str:
        """A guest's identity from what a control request names: its identity or a display name."""
        if isinstance(name, str) and name not in self.guests:  # a domain by its display name
            name = next((g.name for g in self.guests.values() if g.display == name), name)
        if not isinstance(name, str) or name not in self.guests:
            raise ControlError(f"unknown guest {name!r}")
        return name

    def set_guest(self, req: Mapping[str, Any]) -> dict[str, Any]:
        name = self._guest_named(req.get("guest"))
        allowed = {"cmd", "guest", "weight", "cap_mib", "quota_mib", "compress", "balloon"}
        for key in req:
            if key not in allowed:
                raise ControlError(
                    f"unknown setting {key!r} (known: weight, cap_mib, quota_mib, compress, balloon)"
                )
        result: dict[str, Any] = {"guest": name}
        if "balloon" in req:
            result["balloon"] = self._set_balloon(name, req["balloon"])
            if set(req) <= {"cmd", "guest", "balloon"}:
                return result
        changes: dict[str, Any] = {}
        if "weight" in req:
            changes["weight"] = _int_arg(req, "weight", 1)
        if "cap_mib" in req:
            changes["cap_bytes"] = _int_arg(req, "cap_mib", 0) * MIB
        if "quota_mib" in req:
            changes["quota_bytes"] = _int_arg(req, "quota_mib", 0) * MIB
        if "compress" in req:
            if not isinstance(req["compress"], bool):
                raise ControlError(f"compress: expected true or false, got {req['compress']!r}")
            changes["compress"] = req["compress"]
        if not changes:
            raise ControlError("nothing to set (weight, cap_mib, quota_mib, compress)")
        client = self._engine().configure(name, **changes)
        s = client.settings
        log.info("guest %s: settings changed: %s", name, ", ".join(f"{k}={v}" for k, v in changes.items()))
        result.update(
            weight=s.weight, cap_mib=s.cap_bytes / MIB, quota_mib=s.quota_bytes / MIB, compress=s.compress
        )
        return result

    def _set_balloon(self, name: str, value: Any) -> str:
        if not isinstance(value, bool):
            raise ControlError(f"balloon: expected on or off, got {value!r}")
        guest = self.guests[name]
        if self.balloon is None:
            raise ControlError("the balloon controller is off ([balloon] enabled = false)")
        if guest.domain is None:
            raise ControlError(f"guest {guest.display!r} is not a libvirt domain: it has no balloon")
        self.balloon.set_enabled(name, value)
        log.info("guest %s: balloon controller %s", guest.display, "on" if value else "off")
        return "on" if value else "off"

    async def reserve(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """Make `mib` of host memory available: tmem's ephemeral pages first, then (with the balloon
        controller on) guests above their goal; waits up to `wait` seconds for their balloons."""
        mib = _int_arg(req, "mib", 0)
        wait = req.get("wait", 20.0)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or wait < 0:
            raise ControlError(f"wait: expected a number of seconds, got {wait!r}")
        engine = self._engine()
        before = host_available()
        engine.set_host_available(before)  # decide on a fresh figure
        freed = engine.reserve(mib * MIB)
        result: dict[str, Any] = {
            "requested_bytes": mib * MIB,
            "freed_bytes": freed,
            "host_available_before_bytes": before,
        }
        missing = mib * MIB - host_available()
        if self.balloon is not None and missing > 0:
            ballooned = await self.balloon.reserve(missing // 1024, float(wait))
            result["ballooned"] = ballooned
            result["ballooned_bytes"] = sum(b["released_kib"] for b in ballooned.values()) * 1024
        result["host_available_bytes"] = host_available()
        log.info("reserve %d MiB: %s", mib, result)
        return result

    async def shrink(self, req: Mapping[str, Any]) -> dict[str, Any]:
        """Move up to `pages` of the guest's swap-device pages to storage (the host does it, the
        file I/O in a worker thread), and ask the guest to move the rest of `pages` persistent
        pages out of tmem (a SHRINK_PERSISTENT notice); the guest does that in its own time, so
        the reply says only that the notice went out."""
        name = self._guest_named(req.get("guest"))
        pages = _int_arg(req, "pages", 0)
        if pages >= 1 << 64:
            raise ControlError(f"pages: at most {(1 << 64) - 1}, got {pages}")
        guest = self.guests[name]
        try:
            moved = 0 if self.swap is None else await self.swap.shrink(name, pages)
        except NbdError as err:
            raise ControlError(f"guest {name}: swap device: {err}") from None
        rest = pages - moved
        if rest and not guest.send_notice(wire.Notice.SHRINK_PERSISTENT, rest):
            if not moved:
                raise ControlError(f"guest {name} is not connected")
            rest = 0
        log.info(
            "guest %s: %d swap-device pages moved to storage, asked to move %d persistent pages out of tmem",
            name,
            moved,
            rest,
        )
        return {
            "guest": name,
            "pages": pages,
            "swapdev_moved": moved,
            "notice_pages": rest,
            "persistent_pages": guest.client.pers.pages,
        }


def qemu_uuid(pid: int) -> str | None:
    """The `-uuid` on a process's command line (libvirt starts QEMU with it), or None: the host's
    word on which domain a QEMU process runs, which nothing in the guest can change."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not args or not os.path.basename(args[0].decode(errors="replace")).startswith("qemu"):
        return None
    for flag, value in itertools.pairwise(args):
        if flag == b"-uuid":
            return value.decode(errors="replace").lower()
    return None


def _int_arg(req: Mapping[str, Any], key: str, minimum: int) -> int:
    value = req.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError(f"{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ControlError(f"{key}: must be at least {minimum}, got {value}")
    return value


def _prepare_socket_path(path: str) -> None:
    """Create the socket's directory and remove a stale socket file; never replace anything else."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
