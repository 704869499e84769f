"""userfaultfd(2) for Linux x86_64, through ctypes (the syscall) and fcntl.ioctl (everything else).

The preswap shim needs only a handful of operations: create a uffd, negotiate the API (with
write-protect faults on shmem, which eviction needs so that a write racing the page's put cannot
be lost), register a range in MISSING|WP mode, resolve faults with UFFDIO_COPY or UFFDIO_ZEROPAGE,
write-protect / unprotect a page, wake waiters, and decode the 32-byte `uffd_msg` events.

Every ioctl acts on the address space the uffd was created in, whichever process calls it: the
application creates and registers, the guest agent (which received the fd with SCM_RIGHTS)
resolves.  Source buffers of UFFDIO_COPY are read from the *caller's* memory.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

__all__ = [
    "EVENT_PAGEFAULT",
    "FEATURE_WP_SHMEM",
    "MSG_SIZE",
    "PAGEFAULT_FLAG_WP",
    "PAGEFAULT_FLAG_WRITE",
    "PAGE_SIZE",
    "REGISTER_MISSING",
    "REGISTER_WP",
    "Fault",
    "UffdError",
    "api",
    "copy",
    "create",
    "iter_messages",
    "parse_events",
    "register",
    "unregister",
    "wake",
    "writeprotect",
    "zeropage",
]

PAGE_SIZE: Final = 4096
SYS_USERFAULTFD: Final = 323  # x86_64
UFFD_API: Final = 0xAA
UFFD_USER_MODE_ONLY: Final = 1

# _IOWR(0xAA, nr, size) = 3 << 30 | size << 16 | 0xAA << 8 | nr; _IOR uses 2 << 30
UFFDIO_API: Final = 0xC018AA3F  # struct uffdio_api: api, features, ioctls (24 bytes)
UFFDIO_REGISTER: Final = 0xC020AA00  # range (start, len), mode, ioctls (32)
UFFDIO_UNREGISTER: Final = 0x8010AA01  # range (16)
UFFDIO_WAKE: Final = 0x8010AA02  # range (16)
UFFDIO_COPY: Final = 0xC028AA03  # dst, src, len, mode, copy (40)
UFFDIO_ZEROPAGE: Final = 0xC020AA04  # range, mode, zeropage (32)
UFFDIO_WRITEPROTECT: Final = 0xC018AA06  # range, mode (24)

REGISTER_MISSING: Final = 1
REGISTER_WP: Final = 2
WRITEPROTECT_MODE_WP: Final = 1
COPY_MODE_DONTWAKE: Final = 1

FEATURE_WP_SHMEM: Final = 1 << 12  # UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19)

EVENT_PAGEFAULT: Final = 0x12
PAGEFAULT_FLAG_WRITE: Final = 1
PAGEFAULT_FLAG_WP: Final = 2
MSG_SIZE: Final = 32

_MSG = struct.Struct("=B3xI QQ I4x")  # event, (reserved), flags, address, ptid
_MSG_HEAD = struct.Struct("=B7x QQ 8x")  # event, flags, address: what a fault handler needs
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class UffdError(OSError):
    """A userfaultfd operation failed (errno and the operation in the message)."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One page-fault event: the faulting address and its flags (WRITE, WP)."""

    address: int
    flags: int


def _fail(what: str, exc: OSError) -> UffdError:
    code = exc.errno or 0
    return UffdError(code, f"{what}: {os.strerror(code)}")


def create(*, nonblocking: bool = True) -> int:
    """A new uffd for the calling process's address space (close-on-exec).

    Without privileges (vm.unprivileged_userfaultfd = 0) only user-mode faults may be handled,
    so that is asked for when the plain call is refused.
    """
    flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
    fd = int(_syscall(SYS_USERFAULTFD, flags))
    if fd < 0 and ctypes.get_errno() == errno.EPERM:
        fd = int(_syscall(SYS_USERFAULTFD, flags | UFFD_USER_MODE_ONLY))
    if fd < 0:
        code = ctypes.get_errno()
        raise UffdError(code, f"userfaultfd: {os.strerror(code)}")
    return fd


def api(fd: int, features: int = 0) -> int:
    """UFFDIO_API handshake; returns the features the kernel offers."""
    buf = bytearray(struct.pack("=QQQ", UFFD_API, features, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_API, buf, True)
    except OSError as exc:
        raise _fail("UFFDIO_API", exc) from None
    _, offered, _ = struct.unpack("=QQQ", buf)
    return int(offered)


def register(fd: int, start: int, length: int, mode: int) -> int:
    """Register [start, start+length) (page-aligned); returns the ioctls allowed on it."""
    buf = bytearray(struct.pack("=QQQQ", start, length, mode, 0))
    try:
        fcntl.ioctl(fd, UFFDIO_REGISTER, buf, True)
    except OSError as exc:
        raise _fail("UFFDIO_REGISTER", exc) from None
    return int(struct.unpack_from("=Q", buf, 24)[0])


def unregister(fd: int, start: int, length: int) -> None:
    try:
        fcntl.ioctl(fd, UFFDIO_UNREGISTER, struct.pack("=QQ", start, length))
    except OSError as exc:
        raise _fail("UFFDIO_UNREGISTER", exc) from None


def copy(fd: int, dst: int, src: int, length: int = PAGE_SIZE, mode: int = 0) -> None:
    """Atomically fill missing pages at `dst` from the caller's memory at `src`, waking waiters.

    EEXIST (the page is already there: a duplicate fault) is not an error; the waiters are woken.
    EAGAIN (the address space is changing under us) is retried.
    """
    buf = bytearray(struct.pack("=QQQQq", dst, src, length, mode, 0))
    while not _filled(fd, UFFDIO_COPY, buf, dst, length):
        done = struct.unpack_from("=q", buf, 32)[0]
        if done > 0:  # a partial copy: carry on from where it stopped
            dst, src, length = dst + done, src + done, length - done
        buf = bytearray(struct.pack("=QQQQq", dst, src, length, mode, 0))


def zeropage(fd: int, start: int, length: int = PAGE_SIZE) -> None:
    """Fill missing pages with zeros and wake waiters (EEXIST: already there, just wake)."""
    while not _filled(
        fd, UFFDIO_ZEROPAGE, bytearray(struct.pack("=QQQq", start, length, 0, 0)), start, length
    ):
        pass  # EAGAIN: the address space was changing


def _filled(fd: int, op: int, buf: bytearray, start: int, length: int) -> bool:
    """One UFFDIO_COPY or UFFDIO_ZEROPAGE: True once the range is filled, or was already (EEXIST:
    its waiters are woken); False on EAGAIN, to be retried (`buf` says how far it got)."""
    try:
        fcntl.ioctl(fd, op, buf, True)
        return True
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            wake(fd, start, length)
            return True
        if exc.errno != errno.EAGAIN:
            raise _fail("UFFDIO_COPY" if op == UFFDIO_COPY else "UFFDIO_ZEROPAGE", exc) from None
        return False


def writeprotect(fd: int, start: int, length: int, protect: bool) -> None:
    """Write-protect a range (its writers then fault with WP) or lift it (which wakes them)."""
    mode = WRITEPROTECT_MODE_WP if protect else 0
    while True:
        try:
            fcntl.ioctl(fd, UFFDIO_WRITEPROTECT, struct.pack("=QQQ", start, length, mode))
            return
        except OSError as exc:
            if exc.errno != errno.EAGAIN:
                raise _fail("UFFDIO_WRITEPROTECT", exc) from None


def wake(fd: int, start: int, length: int = PAGE_SIZE) -> None:
    """Wake the threads waiting on faults in the range (they retry the access)."""
    try:
        fcntl.ioctl(fd, UFFDIO_WAKE, struct.pack("=QQ", start, length))
    except OSError as exc:
        raise _fail("UFFDIO_WAKE", exc) from None


def parse_events(data: bytes) -> list[Fault]:
    """Page-fault events from a read of the uffd (other event kinds are not enabled)."""
    return [
        Fault(address, flags) for event, flags, address in iter_messages(data) if event == EVENT_PAGEFAULT
    ]


def iter_messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(event, flags, address) of each message in a read of the uffd, without building objects:
    the fault handler's hot path (flags and address mean what they say for EVENT_PAGEFAULT)."""
    return _MSG_HEAD.iter_unpack(data)
