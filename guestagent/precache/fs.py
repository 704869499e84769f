"""`PrecacheFS`: the passthrough `pyfuse3.Operations` over the backing tree.  Thin: the backing
calls are `backing`'s, inode numbers and paths the `InodeTable`'s, and what goes to or comes from
the pool the `VictimCache`'s.

The kernel's page cache is the first level: files are opened without direct_io, with `keep_cache`
when the file did not change since the shim last saw it, so hot reads, mmap and exec never reach
the shim.  The backing tree is reached through an O_PATH descriptor opened before mounting
(`/proc/self/fd/N/...`), so the shim never reads through its own mount, even when it covers it.
Counters are readable as JSON from the mount root's extended attribute `user.tmem.precache.stats`;
writing `user.tmem.precache.evict` tells the kernel to drop its cached pages of every file the shim
knows (a test and benchmark hook: memory pressure on demand).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import pyfuse3
import trio

from guestagent.precache import backing as bk
from guestagent.precache.inodes import ROOT, InodeTable
from guestagent.precache.victim import PAGE, CachedFile, Counters, Pool, VictimCache

__all__ = ["ATTR_TIMEOUT", "EVICT_XATTR", "STATS_XATTR", "PrecacheFS"]

log = logging.getLogger(__name__)

STATS_XATTR: Final = b"user.tmem.precache.stats"
EVICT_XATTR: Final = b"user.tmem.precache.evict"
ATTR_TIMEOUT: Final = 1.0

_OPERATIONS: Final = (
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mkdir",
    "mknod",
    "symlink",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "fsync",
    "release",
    "opendir",
    "readdir",
    "releasedir",
    "statfs",
    "getxattr",
    "setxattr",
    "listxattr",
    "removexattr",
)

_ENTRY_FIELDS: Final = (
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_rdev",
    "st_size",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)
_STATVFS_FIELDS: Final = (
    "f_bsize",
    "f_frsize",
    "f_blocks",
    "f_bfree",
    "f_bavail",
    "f_files",
    "f_ffree",
    "f_favail",
    "f_namemax",
)

Stats = tuple[os.stat_result, os.stat_result]  # an lstat before and after a change


def _answering_eio(op: Callable[..., Any]) -> Callable[..., Any]:
    """A FUSE operation whose unexpected exception (a bug) is logged and answered EIO: pyfuse3
    would end its main loop on it, taking the mount and every user of it down (ENOTCONN)."""

    @functools.wraps(op)
    async def guarded(*args: Any) -> Any:
        try:
            return await op(*args)
        except pyfuse3.FUSEError:
            raise
        except Exception:
            log.exception("precache: %s failed unexpectedly; answered EIO", op.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return guarded


class _OpenFile:
    """An open backing file's reads for the victim cache, each in a worker thread."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    async def read(self, size: int, offset: int) -> bytes:
        return await bk.io(bk.pread_all, self.fd, size, offset)

    async def read_dropping(self, size: int, offset: int) -> bytes:
        return await bk.io(bk.pread_uncached, self.fd, size, offset)


async def _inval_attrs(inode: int) -> None:
    """Make the kernel fetch the inode's attributes again (its size, its times) at the next use."""
    with contextlib.suppress(OSError):
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, cast("pyfuse3.InodeT", inode), True)


class PrecacheFS(pyfuse3.Operations):
    """The passthrough operations with tmem behind the kernel's page cache."""

    enable_writeback_cache = False

    def __init__(self, backing: str) -> None:
        super().__init__()
        for name in _OPERATIONS:  # pyfuse3 looks the operations up on the instance
            setattr(self, name, _answering_eio(getattr(self, name)))
        # The backing tree through a descriptor opened now, before the mount may cover it: every
        # path below starts at /proc/self/fd/N, which resolves to the tree itself, not the mount.
        self._root_fd = os.open(os.path.abspath(backing), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.backing = f"/proc/self/fd/{self._root_fd}/."  # "/.": the tree, not the magic link
        self.cache = VictimCache()
        root = os.lstat(self.backing)
        self._inodes = InodeTable(self.backing, (root.st_dev, root.st_ino))
        self._files: dict[int, tuple[int, CachedFile]] = {}  # fh (= backing fd) -> (fd, object)
        self._dirs: dict[int, tuple[int, list[tuple[bytes, os.stat_result]] | None]] = {}
        self._next_dh = 1

    @property
    def pool(self) -> Pool | None:
        """The mount's pool (None while there is none: gets miss, puts are dropped)."""
        return self.cache.pool

    @pool.setter
    def pool(self, pool: Pool | None) -> None:
        self.cache.pool = pool

    @property
    def counters(self) -> Counters:
        return self.cache.counters

    def close(self) -> None:
        """Close the descriptor of the backing tree (after unmounting)."""
        with contextlib.suppress(OSError):
            os.close(self._root_fd)

    def report_values(self) -> dict[str, int]:
        """The counters as STATS names (`precache_*`), for a report to the host."""
        return self.cache.report_values()

    async def drop_kernel_cache(self) -> None:
        """Tell the kernel to drop its cached pages of every file it knows here (memory pressure
        on demand, for tests and benchmarks).  In a worker thread: the kernel may wait for a read
        of a page it is dropping, which this thread must stay free to answer."""
        for ino in self._inodes.inodes():
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, cast("pyfuse3.InodeT", ino), False)

    # ----------------------------------------------------------------- inodes and paths

    def _path(self, ino: int) -> str:
        path = self._inodes.path(ino)
        if path is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return path

    def _child(self, parent: int, name: bytes | str) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _file(self, fh: int) -> tuple[int, CachedFile]:
        try:
            return self._files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Count a lookup of `path` (whose lstat is `st`) and return its entry."""
        return self._entry(self._inodes.remember(path, (st.st_dev, st.st_ino)), st)

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        for attr in _ENTRY_FIELDS:
            setattr(entry, attr, getattr(st, attr))
        entry.st_blksize = PAGE
        entry.st_blocks = st.st_blocks
        entry.st_ino = cast("pyfuse3.InodeT", ino)
        entry.generation = 0
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        return entry

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: Any = None
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        st = await bk.io(os.lstat, path)
        return self._remember(path, st)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, n in inode_list:
            key = self._inodes.forget(ino, n)
            if key is not None:
                self.cache.forgotten(key)
        await self.cache.trim(self._inodes.known)

    async def getattr(self, inode: pyfuse3.InodeT, ctx: Any = None) -> pyfuse3.EntryAttributes:
        st = await bk.io(os.lstat, self._path(inode))
        return self._entry(inode, st)

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        target: int | str = self._files[fh][0] if fh is not None and fh in self._files else path

        def apply() -> Stats:
            before = os.lstat(path)
            if fields.update_size:
                os.truncate(target, attr.st_size)
            if fields.update_mode:
                os.chmod(path, stat.S_IMODE(attr.st_mode), follow_symlinks=False)
            if fields.update_uid or fields.update_gid:
                os.chown(
                    path,
                    attr.st_uid if fields.update_uid else -1,
                    attr.st_gid if fields.update_gid else -1,
                    follow_symlinks=False,
                )
            if fields.update_atime or fields.update_mtime:
                cur = os.lstat(path)
                os.utime(
                    path,
                    ns=(
                        attr.st_atime_ns if fields.update_atime else cur.st_atime_ns,
                        attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns,
                    ),
                    follow_symlinks=False,
                )
            return before, os.lstat(path)

        if not fields.update_size:
            before, st = await bk.io(apply)
            self.cache.sync(before, st)
            return self._entry(inode, st)
        known = await bk.io(os.lstat, path)
        obj = self.cache.get((known.st_dev, known.st_ino))
        if obj is None:
            before, st = await bk.io(apply)
            obj = self.cache.get((st.st_dev, st.st_ino))
            if obj is None:
                return self._entry(inode, st)
        st = await self.cache.truncate(obj, functools.partial(bk.io, apply))
        return self._entry(inode, st)

    async def readlink(self, inode: pyfuse3.InodeT, ctx: Any = None) -> pyfuse3.FileNameT:
        return cast("pyfuse3.FileNameT", os.fsencode(await bk.io(os.readlink, self._path(inode))))

    # ----------------------------------------------------------------- namespace changes

    async def _make(
        self, path: str, make: Callable[[], object], ctx: Any, mode: int | None
    ) -> pyfuse3.EntryAttributes:
        """A new entry `make()` creates at `path`, given to the caller (`backing.give`)."""

        def run() -> os.stat_result:
            make()
            bk.give(path, ctx, mode)
            return os.lstat(path)

        return self._remember(path, await bk.io(run))

    async def mkdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return await self._make(path, functools.partial(os.mkdir, path, mode), ctx, mode)

    async def mknod(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return await self._make(path, functools.partial(os.mknod, path, mode, rdev), ctx, mode)

    async def symlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, target: pyfuse3.FileNameT, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        return await self._make(path, functools.partial(os.symlink, os.fsdecode(target), path), ctx, None)

    async def link(
        self, inode: pyfuse3.InodeT, new_parent_inode: pyfuse3.InodeT, new_name: pyfuse3.FileNameT, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        old = self._path(inode)
        path = self._child(new_parent_inode, new_name)

        def make() -> Stats:
            before = os.lstat(old)
            os.link(old, path, follow_symlinks=False)
            return before, os.lstat(path)

        before, st = await bk.io(make)
        self.cache.sync(before, st)  # a link changes ctime
        return self._remember(path, st)

    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: Any) -> None:
        path = self._child(parent_inode, name)

        def remove() -> os.stat_result:
            st = os.lstat(path)
            os.unlink(path)
            return st

        st = await bk.io(remove)
        self._inodes.drop_path(path)
        await self.cache.removed(st)

    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        await bk.io(os.rmdir, path)
        self._inodes.drop_path(path)

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: bytes | str,
        parent_inode_new: pyfuse3.InodeT,
        name_new: bytes | str,
        flags: pyfuse3.FlagT,
        ctx: Any,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & bk.RENAME_EXCHANGE:
            await self._exchange(old, new)
            return
        if flags & ~bk.RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)

        def move() -> tuple[os.stat_result | None, os.stat_result, os.stat_result]:
            over = bk.lstat_or_none(new)
            before = os.lstat(old)
            if flags:
                bk.renameat2(old, new, bk.RENAME_NOREPLACE)
            else:
                os.rename(old, new)
            return over, before, os.lstat(new)

        over, before, st = await bk.io(move)
        if over is not None and (over.st_dev, over.st_ino) != (st.st_dev, st.st_ino):
            self._inodes.drop_path(new)
            await self.cache.replaced(over)
        self._inodes.rename(old, new)
        self.cache.sync(before, st)  # a rename changes ctime

    async def _exchange(self, a: str, b: str) -> None:
        """RENAME_EXCHANGE: both names stay, their files swap; no file's content changes."""

        def swap() -> tuple[os.stat_result, os.stat_result, os.stat_result, os.stat_result]:
            a0, b0 = os.lstat(a), os.lstat(b)
            bk.renameat2(a, b, bk.RENAME_EXCHANGE)
            return a0, b0, os.lstat(b), os.lstat(a)

        a0, b0, a1, b1 = await bk.io(swap)
        self._inodes.exchange(a, b)
        self.cache.sync(a0, a1)
        self.cache.sync(b0, b1)

    # ----------------------------------------------------------------- files

    async def _opened(
        self, inode: int, fd: int, st: os.stat_result, generation: int, trunc: bool
    ) -> pyfuse3.FileInfo:
        obj, keep, changed_behind = await self.cache.opened(st, generation, trunc)
        self._files[fd] = (fd, obj)
        if changed_behind and inode != ROOT:
            # its size and times too: the kernel keeps them for ATTR_TIMEOUT otherwise
            await _inval_attrs(inode)
        fh = cast("pyfuse3.FileHandleT", fd)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=keep)

    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: Any) -> pyfuse3.FileInfo:
        path = self._path(inode)
        fd, st, gen = await bk.io(bk.open_stat, path, flags & ~(os.O_CREAT | bk.BACKING_DROPS), 0)
        return await self._opened(inode, fd, st, gen, bool(flags & os.O_TRUNC))

    async def create(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: int, flags: pyfuse3.FlagT, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd, st, gen = await bk.io(bk.create_stat, path, flags & ~bk.BACKING_DROPS, mode, ctx)
        entry = self._remember(path, st)
        info = await self._opened(int(entry.st_ino), fd, st, gen, True)  # new, truncated, or as seen
        return info, entry

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        """A page-in: the kernel's cache did not have these pages (the victim cache's `read`)."""
        fd, obj = self._file(fh)
        self.counters.reads += 1
        await self.cache.check_behind(obj, functools.partial(os.fstat, fd))
        return await self.cache.read(obj, off, size, _OpenFile(fd))

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        """Write through to the backing file, then the pool (the victim cache's `write`)."""
        fd, obj = self._file(fh)
        return await self.cache.write(obj, off, buf, functools.partial(bk.io, bk.pwrite_stat, fd, buf, off))

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        self._file(fh)

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        fd = self._file(fh)[0]
        await bk.io(os.fdatasync if datasync else os.fsync, fd)

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        fd, obj = self._file(fh)
        del self._files[fh]
        self.cache.closed(obj)
        await bk.io(os.close, fd)

    # ----------------------------------------------------------------- directories

    async def opendir(self, inode: pyfuse3.InodeT, ctx: Any) -> pyfuse3.FileHandleT:
        self._path(inode)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = (inode, None)
        return cast("pyfuse3.FileHandleT", dh)

    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        try:
            inode, entries = self._dirs[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None
        path = self._path(inode)
        if entries is None or start_id == 0:

            def scan() -> list[tuple[bytes, os.stat_result]]:
                out = []
                with os.scandir(path) as it:
                    for e in it:
                        try:
                            out.append((os.fsencode(e.name), e.stat(follow_symlinks=False)))
                        except FileNotFoundError:
                            continue
                out.sort()
                return out

            entries = await bk.io(scan)
            self._dirs[fh] = (inode, entries)
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            entry = self._entry(self._inodes.ino_for((st.st_dev, st.st_ino)), st)
            if not pyfuse3.readdir_reply(token, cast("pyfuse3.FileNameT", name), entry, i + 1):
                break
            self._remember(os.path.join(path, os.fsdecode(name)), st)  # readdirplus: a lookup

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = await bk.io(os.statvfs, self.backing)
        out = pyfuse3.StatvfsData()
        for attr in _STATVFS_FIELDS:
            setattr(out, attr, getattr(sv, attr))
        return out

    # ----------------------------------------------------------------- extended attributes

    async def getxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: Any) -> bytes:
        if inode == ROOT and name == STATS_XATTR:
            return self.cache.stats_json()
        path = self._path(inode)
        return await bk.io(lambda: os.getxattr(path, os.fsdecode(name), follow_symlinks=False))

    async def setxattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, value: bytes, ctx: Any) -> None:
        if inode == ROOT and name == EVICT_XATTR:
            await self.drop_kernel_cache()
            return
        path = self._path(inode)
        await self._change_xattr(
            path, lambda: os.setxattr(path, os.fsdecode(name), value, follow_symlinks=False)
        )

    async def listxattr(self, inode: pyfuse3.InodeT, ctx: Any) -> list[pyfuse3.XAttrNameT]:
        path = self._path(inode)
        names = await bk.io(lambda: os.listxattr(path, follow_symlinks=False))
        return [cast("pyfuse3.XAttrNameT", os.fsencode(n)) for n in names]

    async def removexattr(self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: Any) -> None:
        path = self._path(inode)
        await self._change_xattr(path, lambda: os.removexattr(path, os.fsdecode(name), follow_symlinks=False))

    async def _change_xattr(self, path: str, change: Callable[[], None]) -> None:
        def apply() -> Stats:
            before = os.lstat(path)
            change()
            return before, os.lstat(path)

        self.cache.sync(*await bk.io(apply))
