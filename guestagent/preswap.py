"""Preswap for applications: memory whose cold pages the guest agent keeps in host memory.

    with Region(64 << 20, socket_path) as region:
        buf = region.buf                       # a writable memoryview of 64 MiB
        arr = numpy.frombuffer(region.mm, dtype=numpy.uint8)   # works too

A region is a memfd mapped MAP_SHARED and registered with userfaultfd (MISSING and WP modes);
the memfd and the uffd go to the guest agent over a unix socket with SCM_RIGHTS, and from then
on the agent resolves every fault of the region and evicts its cold pages (`guestagent.swapper`).
Nothing here handles a fault: the faulting thread just waits for the agent, GIL held or not.

The socket stays open for the region's lifetime; closing it (`close()`, or the process exiting,
even by SIGKILL) makes the agent flush the region's pages from tmem and the swap file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
from types import TracebackType
from typing import Any, Final

from guestagent import uffd
from guestagent.preswap_socket import DEFAULT_SOCKET, PreswapError, read_reply, send_request

__all__ = ["DEFAULT_SOCKET", "PreswapError", "Region", "stats"]

PAGE: Final = uffd.PAGE_SIZE


def _address(mm: mmap.mmap) -> int:
    holder = ctypes.c_char.from_buffer(mm)
    try:
        return ctypes.addressof(holder)
    finally:
        del holder  # release the export, or the mmap could never be closed


class Region:
    """`size` bytes (rounded up to pages) of agent-managed memory.

    `budget_pages` is how many of its pages may stay resident (the agent's default if None).
    """

    def __init__(
        self,
        size: int,
        socket_path: str = DEFAULT_SOCKET,
        *,
        budget_pages: int | None = None,
        timeout: float = 30.0,
    ) -> None:
        if size <= 0:
            raise ValueError("a region needs at least one byte")
        self.size = -(-size // PAGE) * PAGE
        memfd = os.memfd_create("preswap", os.MFD_CLOEXEC)
        ufd = -1
        sock: socket.socket | None = None
        self.mm: mmap.mmap | None = None
        try:
            os.ftruncate(memfd, self.size)
            self.mm = mmap.mmap(memfd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.addr = _address(self.mm)
            # a forked child would see the memfd without the registration: touching a page held
            # in tmem would fill the hole with zeros behind the agent's back
            self.mm.madvise(mmap.MADV_DONTFORK)
            ufd = uffd.create()
            offered = uffd.api(ufd, uffd.FEATURE_WP_SHMEM)
            if not offered & uffd.FEATURE_WP_SHMEM:
                raise PreswapError("this kernel has no userfaultfd write-protect on shmem (Linux < 5.19)")
            uffd.register(ufd, self.addr, self.size, uffd.REGISTER_MISSING | uffd.REGISTER_WP)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(socket_path)
            except OSError as exc:
                raise PreswapError(f"guest agent not reachable at {socket_path}: {exc}") from exc
            request = {"cmd": "region", "size": self.size, "addr": self.addr, "budget": budget_pages}
            send_request(sock, request, [memfd, ufd])
            self.id = int(read_reply(sock)["id"])
            sock.settimeout(None)
        except BaseException:
            if sock is not None:
                sock.close()
            if self.mm is not None:
                self.mm.close()
            raise
        finally:
            # the agent holds its own copies; ours are not needed once it has them
            os.close(memfd)
            if ufd >= 0:
                os.close(ufd)
        self._sock: socket.socket | None = sock
        self.buf = memoryview(self.mm)

    @property
    def pages(self) -> int:
        return self.size // PAGE

    def close(self) -> None:
        """Release the region: unmapped here, flushed from tmem and the swap file by the agent."""
        if self._sock is None:
            return
        self.buf.release()
        assert self.mm is not None
        self.mm.close()
        self._sock.close()
        self._sock = None

    def __enter__(self) -> Region:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def stats(socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0) -> dict[str, Any]:
    """The agent's preswap counters: totals and per region."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        send_request(sock, {"cmd": "stats"})
        return read_reply(sock)
