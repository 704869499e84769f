"""The backing tree's system calls, each run in a worker thread: the trio thread that answers FUSE
never waits for the disk.  An OSError becomes the FUSEError of its errno."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from typing import Any, Final, TypeVar

import pyfuse3
import trio

__all__ = [
    "BACKING_DROPS",
    "RENAME_EXCHANGE",
    "RENAME_NOREPLACE",
    "create_stat",
    "generation",
    "give",
    "io",
    "lstat_or_none",
    "open_stat",
    "pread_all",
    "pread_uncached",
    "pwrite_stat",
    "renameat2",
]

_FS_IOC_GETVERSION: Final = 0x80087601  # _IOR('v', 1, long)
RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100
_libc = ctypes.CDLL(None, use_errno=True)
# the shim reads and writes the backing file with unaligned buffers, and FUSE hands it no tty
BACKING_DROPS: Final = os.O_DIRECT | os.O_NOCTTY

T = TypeVar("T")


async def io(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking backing-file call in a worker thread; OSError becomes the FUSE error."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def generation(fd: int) -> int:
    """The inode generation (ext4, xfs, btrfs); 0 where the file system has none."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETVERSION, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


def pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break
        chunks.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(chunks)


def pread_uncached(fd: int, size: int, offset: int) -> bytes:
    """Read from the backing file and drop what its page cache kept of the range: the page is now
    in the mount's page cache (and the pool), a second copy in the guest would only compete."""
    data = pread_all(fd, size, offset)
    os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
    return data


def pwrite_stat(fd: int, buf: bytes, offset: int) -> tuple[int, os.stat_result]:
    n = os.pwrite(fd, buf, offset)
    return n, os.fstat(fd)


def open_stat(path: str, flags: int, mode: int) -> tuple[int, os.stat_result, int]:
    fd = os.open(path, flags, mode)
    try:
        st = os.fstat(fd)
        return fd, st, generation(fd)
    except BaseException:
        os.close(fd)
        raise


def give(path: str, ctx: Any, mode: int | None = None) -> None:
    """A new entry belongs to whoever asked for it, not to the shim (root): with allow_other, a
    user's files must be the user's. The group follows a set-group-ID parent, as on any file system.
    Its permission bits are those asked for under the caller's umask: the shim's own umask, applied
    again by the system call that made it, must not narrow them (a umask of 002 gives 0664)."""
    uid, gid = int(getattr(ctx, "uid", 0)), int(getattr(ctx, "gid", 0))
    if (uid, gid) != (os.geteuid(), os.getegid()):
        parent = os.lstat(os.path.dirname(path))
        os.lchown(path, uid, -1 if parent.st_mode & stat.S_ISGID else gid)
    if mode is not None:  # after the chown, which clears set-ID bits
        want = mode & 0o777 & ~int(getattr(ctx, "umask", 0))
        have = stat.S_IMODE(os.lstat(path).st_mode)
        if have & 0o777 != want:
            os.chmod(path, have & ~0o777 | want)


def create_stat(path: str, flags: int, mode: int, ctx: Any) -> tuple[int, os.stat_result, int]:
    """open(O_CREAT) for `ctx`: a file this call made is given to the caller; one that appeared
    meanwhile (created behind the mount) is only opened, its owner untouched."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        return open_stat(path, flags & ~os.O_CREAT, 0)
    try:
        give(path, ctx, mode)
        st = os.fstat(fd)
        return fd, st, generation(fd)
    except BaseException:
        os.close(fd)
        raise


def renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(2) with flags (os.rename has none); glibc >= 2.28."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.EINVAL, "renameat2 is not available", old)
    if fn(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
