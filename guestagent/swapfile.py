"""The preswap swap file: page slots in a plain file, for pages the host will not keep.

A free list over a growing high-water mark; freed slots are punched out, so the file holds disk
blocks only for the pages it keeps.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Sequence
from typing import Final

from guestagent import uffd

__all__ = ["PAGE", "SwapFile", "punch_hole", "write_all"]

PAGE: Final = uffd.PAGE_SIZE
FALLOC_FL_KEEP_SIZE: Final = 1
FALLOC_FL_PUNCH_HOLE: Final = 2
_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free [offset, offset+length) of a file (tmpfs or disk), keeping its size."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"fallocate(PUNCH_HOLE): {os.strerror(code)}")


class SwapFile:
    """Page slots in a plain file: a free list over a growing high-water mark.

    Opened with O_DIRECT where the file system allows it: the kernel's own swap bypasses the
    page cache, and so does this, or a disk fallback would only measure (and fill) the cache.
    Freed slots are punched out, so the file holds disk blocks only for pages it keeps.
    """

    def __init__(self, path: str, *, direct: bool = True) -> None:
        self.path = path
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self.direct = False
        if direct:
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # tmpfs has no O_DIRECT
                    raise
        if not self.direct:
            self.fd = os.open(path, flags, 0o600)
        self.free: list[int] = []
        self.top = 0
        self.used = 0

    def alloc(self) -> int:
        self.used += 1
        if self.free:
            return self.free.pop()
        self.top += 1
        return self.top - 1

    def release(self, slot: int) -> None:
        self.used -= 1
        self.free.append(slot)
        punch_hole(self.fd, slot * PAGE, PAGE)

    def write(self, slot: int, data: bytes) -> None:
        with mmap.mmap(-1, PAGE) as buf:  # page-aligned, as O_DIRECT wants
            buf[:] = data
            if os.pwritev(self.fd, [buf], slot * PAGE) != PAGE:
                raise OSError(errno.EIO, "short write to the swap file")

    def read(self, slot: int) -> bytes:
        with mmap.mmap(-1, PAGE) as buf:
            if os.preadv(self.fd, [buf], slot * PAGE) != PAGE:
                raise OSError(errno.EIO, "short read from the swap file")
            return bytes(buf)

    def close(self) -> None:
        os.close(self.fd)


def write_all(swap: SwapFile, slots: Sequence[int], datas: Sequence[bytes]) -> None:
    """Write pages to their slots (blocking: run it in a worker thread)."""
    for slot, data in zip(slots, datas, strict=True):
        swap.write(slot, data)
