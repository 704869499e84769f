"""The swap devices' NBD server: one unix socket, QEMU's NBD client on the other end.

Which guest a connection belongs to never rests on what the guest controls: the client is QEMU (a host
process), the export name names the guest (a configured guest's name, or a libvirt domain's UUID), and
`authorize` checks the peer's credentials (SO_PEERCRED) against it: for a domain the peer must be that
domain's QEMU process. A connection that fails the check is refused the export, and nothing it sends
reaches any device. Devices outlive connections (QEMU reconnects after a host-agent restart).

Each connection runs its requests in a task of its own, one at a time (the device's spill-file I/O
awaits a worker thread); reading from QEMU pauses while more than MAX_BACKLOG bytes of writes wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final

from .nbd import Backend, NbdError, NbdServer
from .pool import Client, PoolEngine
from .spillfile import SpillFile
from .swapdev import DEVICE_POOL, SwapDevice

log = logging.getLogger("hostagent.swap")

# (export name, peer pid) -> the guest's engine client, or a reason to refuse
Authorize = Callable[[str, int], "Client | str"]
_PEERCRED = struct.Struct("3i")
MAX_BACKLOG: Final = 64 << 20  # write bytes queued per connection before reading from it pauses


class SwapDevices:
    """Every guest's device, by guest name; opened on first use, kept until the guest goes."""

    def __init__(self, engine: PoolEngine, spill_dir: str, size: int) -> None:
        self.engine = engine
        self.spill_dir = Path(spill_dir)
        self.size = size
        self.devices: dict[str, SwapDevice] = {}
        self.tasks: set[asyncio.Task[None]] = set()  # the connections' request loops, final flushes

    def open(self, name: str, client: Client) -> SwapDevice:
        dev = self.devices.get(name)
        if dev is None or dev.client is not client:
            if dev is not None:
                dev.close()
            spill = SpillFile(self.spill_path(name), self.size)
            dev = self.devices[name] = SwapDevice(self.engine, client, spill, self.size)
        return dev

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task of the devices' (kept referenced until done; cancelled by `close`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def open_existing(self) -> None:
        """At start: devices whose pool the engine rebuilt from the arena, so stats show them."""
        for client in list(self.engine.clients()):
            if DEVICE_POOL in client.pools:
                self.open(client.name, client)

    def spill_path(self, name: str) -> Path:
        return self.spill_dir / f"{name}.swap"

    def release(self, name: str) -> int:
        """The guest is gone: free its device's pool pages and spill file. Pages freed."""
        dev = self.devices.pop(name, None)
        if dev is None:
            self.spill_path(name).unlink(missing_ok=True)
            return 0
        pages = dev.pool_pages + len(dev.spilled)
        dev.destroy()
        return pages

    def figures(self, name: str) -> dict[str, Any] | None:
        dev = self.devices.get(name)
        return None if dev is None else dev.figures()

    def counters(self, name: str) -> dict[str, int] | None:
        dev = self.devices.get(name)
        return None if dev is None else dev.counter_values()

    def refusals(self, name: str) -> int | None:
        dev = self.devices.get(name)
        return None if dev is None else dev.counters.refusals

    async def shrink(self, name: str, pages: int) -> int:
        dev = self.devices.get(name)
        return 0 if dev is None else await dev.shrink(pages)

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for dev in self.devices.values():
            dev.close()
        self.devices.clear()


class NbdConnection(asyncio.Protocol):
    """One NBD client: bytes to the sans-IO server, its replies back; reading pauses while the
    transport's write buffer is full, so a client that does not read cannot grow our memory."""

    def __init__(self, devices: SwapDevices, authorize: Authorize) -> None:
        self.devices = devices
        self.authorize = authorize
        self.transport: asyncio.Transport | None = None
        self.peer_pid = 0
        self.server = NbdServer(self._open, self._list)
        self.serving: asyncio.Task[None] | None = None  # runs the queued requests
        self.write_blocked = False  # QEMU does not read our replies: stop reading its requests
        self.backlogged = False  # more than MAX_BACKLOG of writes wait: stop reading too

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=64 << 20)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            pid, _, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
            self.peer_pid = pid
        self._flush()

    def _open(self, name: str) -> Backend | None:
        who = self.authorize(name, self.peer_pid)
        if isinstance(who, str):
            log.warning("swap device %r refused to pid %d: %s", name, self.peer_pid, who)
            return None
        dev = self.devices.open(name, who)
        log.info("swap device %r: served to pid %d (%d MiB)", name, self.peer_pid, dev.size >> 20)
        return dev

    def _list(self) -> list[str]:
        return []  # exports are named by the host's configuration, not discovered

    def data_received(self, data: bytes) -> None:
        try:
            self.server.feed(data)
        except Exception:  # a bug of ours, never the client's: this connection only
            self._internal_error()
        self._flush()
        server = self.server
        if server.has_requests and self.serving is None:
            self.serving = self.devices.spawn(self._serve())
        if server.backlog > MAX_BACKLOG and not self.backlogged:
            self.backlogged = True
            self._reading()

    async def _serve(self) -> None:
        """Run the queued requests in order, each reply sent as soon as it is made."""
        server = self.server
        try:
            while server.has_requests:
                await server.step()
                self._flush()
                if self.backlogged and server.backlog <= MAX_BACKLOG // 2:
                    self.backlogged = False
                    self._reading()
        except Exception:  # a bug of ours, never the client's: this connection only
            self._internal_error()
            self._flush()
        finally:
            self.serving = None

    def _internal_error(self) -> None:
        log.exception("swap device %r: request failed; closing the connection", self.server.export)
        self.server.closed = True
        self.server.close_reason = "internal error"

    def _reading(self) -> None:
        """Read from QEMU unless it does not read our replies or too many of its writes wait."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.write_blocked or self.backlogged:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _flush(self) -> None:
        assert self.transport is not None
        out = self.server.take_output()
        if out and not self.transport.is_closing():
            self.transport.write(out)
        if self.server.closed and not self.transport.is_closing():
            reason = self.server.close_reason
            level = (
                logging.INFO
                if reason in ("client disconnected", "client aborted the handshake")
                else logging.WARNING
            )
            log.log(
                level,
                "swap device %r (pid %d): connection closed: %s",
                self.server.export,
                self.peer_pid,
                reason,
            )
            self.transport.close()

    def pause_writing(self) -> None:
        self.write_blocked = True
        self._reading()

    def resume_writing(self) -> None:
        self.write_blocked = False
        self._reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.closed = True  # the queued requests go unanswered: QEMU re-sends them
        dev = self.server.backend
        if isinstance(dev, SwapDevice):
            self.devices.spawn(_final_flush(dev))


async def _final_flush(dev: SwapDevice) -> None:
    with contextlib.suppress(NbdError):  # the device may be gone (guest destroyed)
        await dev.flush()


__all__ = ["Authorize", "NbdConnection", "SwapDevices"]
