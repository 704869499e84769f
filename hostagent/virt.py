"""libvirt integration: which running domains have a tmem channel, and when they come and go.

libvirt is the only way the host agent touches a domain. This module finds running domains whose XML
has the tmem virtio-serial channel (QEMU listening on a unix socket, `<source mode='bind'>`), tells the
agent to attach to each, and follows lifecycle events through libvirt-python's asyncio event loop
integration (`libvirtaio`): a domain that stops, crashes or is destroyed is detached at once (its pools
freed). If libvirtd goes away, the watcher reconnects and re-discovers: channels already attached keep
working meanwhile (they are sockets to QEMU, not to libvirtd), and domains that vanished while libvirtd
was away are detached on re-discovery.

Guest identity is the domain UUID; the domain name is for display.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guestagent.protocol.wire import PORT_NAME

log = logging.getLogger("hostagent.virt")

DEFAULT_URI = "qemu:///system"
DEFAULT_CHANNEL = PORT_NAME


@dataclass(frozen=True, slots=True)
class Domain:
    """A running domain with a tmem channel."""

    uuid: str
    name: str
    socket: str  # QEMU's end of the tmem channel (a unix socket QEMU listens on)


def tmem_socket(domain_xml: str, channel: str = DEFAULT_CHANNEL) -> str | None:
    """The unix socket path of the domain's tmem channel, if it has one QEMU listens on."""
    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    for ch in root.iterfind("./devices/channel"):
        target = ch.find("target")
        source = ch.find("source")
        if (
            ch.get("type") == "unix"
            and target is not None
            and target.get("type") == "virtio"
            and target.get("name") == channel
            and source is not None
            and source.get("mode", "bind") == "bind"
            and source.get("path")
        ):
            return source.get("path")
    return None


class LibvirtWatcher:
    """Keeps `on_up`/`on_down` informed of running domains that have the tmem channel."""

    def __init__(
        self,
        uri: str,
        channel: str,
        on_up: Callable[[Domain], None],
        on_down: Callable[[str, str], None],
        *,
        retry_interval: float = 2.0,
        on_discovered: Callable[[set[str]], None] | None = None,
    ) -> None:
        self.uri = uri
        self.on_discovered = on_discovered  # after each discovery: the running domains' UUIDs
        self.channel = channel
        self.on_up = on_up
        self.on_down = on_down
        self.retry_interval = retry_interval
        self.known: dict[str, Domain] = {}
        self.conn: Any = None
        self.connected = False
        self.balloon_actual: dict[str, int] = {}  # uuid -> KiB, from balloon-change events
        self._lost: asyncio.Event | None = None

    async def run(self) -> None:
        """Connect, discover, follow events; reconnect whenever libvirtd goes away. Runs forever."""
        try:
            import libvirt
            import libvirtaio
        except ImportError:
            log.warning("libvirt-python is not installed: not watching libvirt domains")
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors arrive as exceptions
        _register_event_loop(libvirtaio)
        warned = False
        while True:
            self._lost = asyncio.Event()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as err:
                if not warned:
                    log.warning(
                        "cannot reach libvirt at %s (%s); retrying every %.0f s",
                        self.uri,
                        _msg(err),
                        self.retry_interval,
                    )
                    warned = True
                await asyncio.sleep(self.retry_interval)
                continue
            warned = False
            try:
                await self._serve(libvirt, conn)
            finally:
                self.connected = False
                self.conn = None
                with contextlib.suppress(libvirt.libvirtError):
                    conn.close()
            await asyncio.sleep(self.retry_interval)

    async def _serve(self, libvirt: Any, conn: Any) -> None:
        loop = asyncio.get_running_loop()
        lost = self._lost
        assert lost is not None

        def closed(_conn: Any, reason: int, _opaque: Any) -> None:
            log.warning("libvirt connection closed (reason %d); reconnecting", reason)
            loop.call_soon(lost.set)

        def lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            loop.call_soon(self._lifecycle, libvirt, dom, event, detail)

        conn.registerCloseCallback(closed, None)
        conn.setKeepAlive(5, 3)

        def balloon(_conn: Any, dom: Any, actual: int, _opaque: Any) -> None:
            loop.call_soon(self._balloon_changed, libvirt, dom, actual)

        def device(_conn: Any, dom: Any, _alias: str, _opaque: Any) -> None:
            loop.call_soon(self._device_changed, libvirt, dom)

        callback_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
        )
        balloon_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, balloon, None
        )
        # `hostagent attach` hot-plugs the channel into a running domain, `detach` unplugs it.
        added_id = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, device, None)
        removed_id = conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, device, None
        )
        self.conn = conn
        self.connected = True
        log.info("watching libvirt domains at %s (channel %s)", self.uri, self.channel)
        try:
            self._discover(libvirt, conn)
            await lost.wait()
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(callback_id)
                conn.domainEventDeregisterAny(balloon_id)
                conn.domainEventDeregisterAny(added_id)
                conn.domainEventDeregisterAny(removed_id)
                conn.unregisterCloseCallback()

    def _discover(self, libvirt: Any, conn: Any) -> None:
        """Attach every running domain with a channel; detach those that are gone."""
        running: dict[str, Domain] = {}
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            found = self._describe(libvirt, dom)
            if found is not None:
                running[found.uuid] = found
        for uuid in list(self.known):
            if uuid not in running:
                self._down(uuid, "not running (found on re-discovery)")
        for d in running.values():
            self._up(d)
        if self.on_discovered is not None:
            self.on_discovered(set(running))

    def _describe(self, libvirt: Any, dom: Any) -> Domain | None:
        try:
            path = tmem_socket(dom.XMLDesc(0), self.channel)
            return None if path is None else Domain(dom.UUIDString(), dom.name(), path)
        except libvirt.libvirtError as err:  # the domain went away while we looked
            log.debug("domain vanished during discovery: %s", _msg(err))
            return None

    def _lifecycle(self, libvirt: Any, dom: Any, event: int, detail: int) -> None:
        try:
            uuid = dom.UUIDString()
        except libvirt.libvirtError:
            return
        if event in (libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_RESUMED):
            found = self._describe(libvirt, dom)
            if found is not None:
                self._up(found)
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_CRASHED):
            reason = "crashed" if event == libvirt.VIR_DOMAIN_EVENT_CRASHED else _stop_reason(libvirt, detail)
            self._down(uuid, reason)

    def _device_changed(self, libvirt: Any, dom: Any) -> None:
        """A device came or went on a running domain: look at its tmem channel again."""
        try:
            uuid = dom.UUIDString()
            active = bool(dom.isActive())
        except libvirt.libvirtError:
            return
        found = self._describe(libvirt, dom) if active else None
        if found is not None:
            self._up(found)
        elif uuid in self.known:
            self._down(uuid, "its tmem channel was removed")

    def _balloon_changed(self, libvirt: Any, dom: Any, actual: int) -> None:
        """libvirt's balloon-change event: the guest's `actual` moved (KiB)."""
        try:
            uuid = dom.UUIDString()
        except libvirt.libvirtError:
            return
        if uuid in self.known:
            self.balloon_actual[uuid] = actual

    def _up(self, d: Domain) -> None:
        old = self.known.get(d.uuid)
        if old == d:
            return
        if old is not None:
            self._down(d.uuid, "its tmem channel changed")
        self.known[d.uuid] = d
        self.on_up(d)

    def _down(self, uuid: str, reason: str) -> None:
        self.balloon_actual.pop(uuid, None)
        if self.known.pop(uuid, None) is not None:
            self.on_down(uuid, reason)

    def domain_figures(self, uuid: str) -> dict[str, Any] | None:
        """Memory (KiB: actual balloon size, max) and CPU seconds of a domain, from libvirt."""
        conn = self.conn
        if conn is None:
            return None
        try:
            dom = conn.lookupByUUIDString(uuid)
            state, max_kib, _mem_kib, vcpus, cpu_ns = dom.info()
            memory = dom.memoryStats()
        except Exception as err:  # libvirtError, or the connection dropping under us
            log.debug("no figures for %s: %s", uuid, err)
            return None
        return {
            "state": state,
            "vcpus": vcpus,
            "cpu_seconds": cpu_ns / 1e9,
            "max_kib": max_kib,
            "actual_kib": memory.get("actual"),
            "balloon": {k: v for k, v in memory.items() if isinstance(v, int)},
        }

    # -- ballooning (blocking libvirt calls: the balloon driver runs them in a worker thread) -------

    def memory(self, uuid: str) -> tuple[int, int] | None:
        """(balloon actual, max memory) in KiB, or None if libvirt cannot tell now."""
        conn = self.conn
        if conn is None:
            return None
        try:
            dom = conn.lookupByUUIDString(uuid)
            actual = dom.memoryStats().get("actual")
            max_kib = dom.maxMemory()
        except Exception as err:  # libvirtError, or the connection dropping under us
            log.debug("no balloon figures for %s: %s", uuid, err)
            return None
        if not isinstance(actual, int):
            return None
        return actual, int(max_kib)

    def set_memory(self, uuid: str, kib: int) -> None:
        """Ask the balloon for `kib` (a request: `actual` follows when the guest complies)."""
        import libvirt

        conn = self.conn
        if conn is None:
            raise ConnectionError("not connected to libvirt")
        conn.lookupByUUIDString(uuid).setMemoryFlags(kib, libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def set_stats_period(self, uuid: str, seconds: int) -> None:
        """Balloon statistics stay empty until a period is set."""
        import libvirt

        conn = self.conn
        if conn is None:
            raise ConnectionError("not connected to libvirt")
        conn.lookupByUUIDString(uuid).setMemoryStatsPeriod(seconds, libvirt.VIR_DOMAIN_AFFECT_LIVE)


_registered = False


def _register_event_loop(libvirtaio: Any) -> None:
    """libvirt's event loop is process-wide and must be registered once, on the running loop."""
    global _registered
    if not _registered:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=asyncio.get_running_loop())
        _registered = True


def _stop_reason(libvirt: Any, detail: int) -> str:
    names = {
        libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated away",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
        libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    }
    return f"stopped ({names.get(detail, f'detail {detail}')})"


def _msg(err: Exception) -> str:
    get = getattr(err, "get_error_message", None)
    return str(get() if get is not None else err)
