"""precache: a FUSE passthrough file system behind the guest's own page cache, with tmem second.

`mount(backing, mountpoint, channel_spec)` serves BACKING at MOUNTPOINT with pyfuse3 (MOUNTPOINT
may be BACKING itself: the shim serves the tree it covers).  One private ephemeral tmem pool per
mount; the object id of a file is its identity on the backing file system (st_dev, st_ino and the
inode generation, 3 x 64 bits), the index is its page number.

The contract (docs/precache.md):

- The kernel's page cache is the first level: files are opened without direct_io, with `keep_cache`
  when the file did not change since the shim last saw it, so hot reads, mmap (shared and private)
  and exec never reach the shim, and the cache grows and shrinks with the guest's memory.
- tmem is an inclusive second level.  FUSE says nothing when the kernel drops a page, so every
  page the shim reads from the backing file is also put to the pool (fire-and-forget); a read that
  reaches the shim (the kernel dropped the page, or never had it) tries the pool first, and a hit
  (an exclusive get) is put back, so the pool keeps holding what the kernel may drop again.
  Pages a write fully determines are put after the backing write (a build re-reads what it wrote).
- write, truncate (setattr or O_TRUNC at open), unlink and rename-over drop the object's pages in
  the pool before the operation is answered.  A file whose mtime, ctime or size differ from what
  the shim last saw (at open, and at every read that reaches the shim) was changed behind the
  mount: its pages in the pool are flushed, and at open the kernel is told to drop its own.
- A read only puts what it fetched if no invalidation happened meanwhile (the object's epoch);
  writes and truncates of one file are applied one at a time (the object's lock), so the pool
  receives their pages in the order the file did.  Puts and flushes travel on one channel in
  order, so a put queued before a flush is flushed.
- The backing tree is reached through an O_PATH descriptor opened before mounting
  (`/proc/self/fd/N/...`), so the shim never reads through its own mount, even when it covers it.
- The trio thread never waits for the disk (every backing syscall runs in `trio.to_thread`) nor for
  long on the channel (a get has a deadline and counts as a miss).  Without a host agent (not yet
  connected, or gone) gets miss and puts are dropped: reads come from the backing file.

Counters (`Counters`) are readable as JSON from the mount root's extended attribute
`user.tmem.precache.stats`.  Writing the attribute `user.tmem.precache.evict` tells the kernel to
drop its cached pages of every file the shim knows (a test and benchmark hook: memory pressure on
demand).

Works with pyfuse3 3.2 (Debian bookworm) to 3.4 and trio 0.22 onwards.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import logging
import os
import signal
import stat
import struct
import sys
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, TypeVar, cast

import pyfuse3
import trio

from guestagent.channel import Channel, ChannelError, PoolHandle, open_channel
from guestagent.protocol import wire

__all__ = ["Counters", "PrecacheFS", "main", "mount", "mount_options", "serve", "written_pages"]

log = logging.getLogger(__name__)

PAGE: Final = wire.PAGE_SIZE
STATS_XATTR: Final = b"user.tmem.precache.stats"
EVICT_XATTR: Final = b"user.tmem.precache.evict"
GET_TIMEOUT: Final = 1.0  # a host that does not answer a get within this is a miss
ATTR_TIMEOUT: Final = 1.0
_FS_IOC_GETVERSION: Final = 0x80087601  # _IOR('v', 1, long)
REPORT_INTERVAL: Final = 2.0  # seconds between STATS reports on a channel of the mount's own
FORGOTTEN_OBJECTS: Final = 4096  # files the kernel forgot whose pages the shim still tracks
PARTIAL_FLUSH_PAGES: Final = 64  # a write over more pages than this flushes the whole object
_ROOT: Final = int(pyfuse3.ROOT_INODE)
_RWF_NOWAIT: Final = getattr(os, "RWF_NOWAIT", 8)
_RENAME_NOREPLACE: Final = 1
_RENAME_EXCHANGE: Final = 2
_AT_FDCWD: Final = -100
_libc = ctypes.CDLL(None, use_errno=True)
# the shim reads and writes the backing file with unaligned buffers, and FUSE hands it no tty
_BACKING_DROPS: Final = os.O_DIRECT | os.O_NOCTTY

T = TypeVar("T")


@dataclass
class Counters:
    """What the shim did; `gets` counts pages asked of tmem (each a hit or a miss).  Only reads the
    kernel's page cache could not serve reach the shim, so `reads` counts the guest's page-ins."""

    reads: int = 0
    gets: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0  # pages read from the disk or written, put to the pool
    put_backs: int = 0  # pool hits put back (exclusive gets: the pool keeps what it served)
    written_puts: int = 0  # pages a write determined, put after the backing write
    flushes: int = 0
    bytes_from_tmem: int = 0
    bytes_from_disk: int = 0
    changed_behind: int = 0  # files seen changed behind the mount (at open or read)
    objects: int = 0  # files the shim keeps state for (open, looked up, or pages in tmem)
    connected: bool = False


@dataclass
class _Object:
    """A backing file as the shim knows it; survives the kernel forgetting the inode."""

    oid: bytes
    seen: tuple[int, int, int] | None = None  # (mtime_ns, ctime_ns, size) at the last sync
    size: int = 0
    epoch: int = 0  # bumped by every invalidation: a read fetched under an older one is stale
    in_tmem: bool = False  # pages may have been put since the last flush
    opens: int = 0
    lock: trio.Lock = field(default_factory=trio.Lock)  # writes and truncates, one at a time


@dataclass
class _Node:
    """A FUSE inode: a (st_dev, st_ino) of the backing tree and the paths it was found under."""

    key: tuple[int, int]
    paths: set[str] = field(default_factory=set)
    lookups: int = 0


def _page_length(size: int, index: int) -> int:
    """How many bytes page `index` holds in a file of `size` bytes (0 past its end)."""
    return max(0, min(PAGE, size - index * PAGE))


def _seen(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size)


def _generation(fd: int) -> int:
    """The inode generation (ext4, xfs, btrfs); 0 where the file system has none."""
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, _FS_IOC_GETVERSION, buf)
    except OSError:
        return 0
    return int.from_bytes(buf, "little")


async def _io(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking backing-file call in a worker thread; OSError becomes the FUSE error."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except OSError as exc:
        raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break
        chunks.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(chunks)


def written_pages(off: int, buf: bytes, size: int) -> tuple[dict[int, bytes], set[int]]:
    """What a write of `buf` at `off` leaves the file of `size` bytes: the pages it fully
    determines (their bytes, zero-padded past the end) and the pages it changed only in part."""
    if not buf:
        return {}, set()
    end = off + len(buf)
    known: dict[int, bytes] = {}
    partial: set[int] = set()
    for index in range(off // PAGE, (end - 1) // PAGE + 1):
        lo, hi = index * PAGE, min((index + 1) * PAGE, size)
        if off <= lo and end >= hi and hi > lo:
            known[index] = buf[lo - off : hi - off].ljust(PAGE, b"\0")
        else:
            partial.add(index)
    return known, partial


def _pread_uncached(fd: int, size: int, offset: int) -> bytes:
    """Read from the backing file and drop what its page cache kept of the range: the page is now
    in the mount's page cache (and the pool), a second copy in the guest would only compete."""
    data = _pread_all(fd, size, offset)
    os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
    return data


def _pwrite_stat(fd: int, buf: bytes, offset: int) -> tuple[int, os.stat_result]:
    n = os.pwrite(fd, buf, offset)
    return n, os.fstat(fd)


def _open_stat(path: str, flags: int, mode: int) -> tuple[int, os.stat_result, int]:
    fd = os.open(path, flags, mode)
    try:
        st = os.fstat(fd)
        return fd, st, _generation(fd)
    except BaseException:
        os.close(fd)
        raise


def _give(path: str, ctx: Any, mode: int | None = None) -> None:
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


def _create_stat(path: str, flags: int, mode: int, ctx: Any) -> tuple[int, os.stat_result, int]:
    """open(O_CREAT) for `ctx`: a file this call made is given to the caller; one that appeared
    meanwhile (created behind the mount) is only opened, its owner untouched."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        if flags & os.O_EXCL:
            raise
        return _open_stat(path, flags & ~os.O_CREAT, 0)
    try:
        _give(path, ctx, mode)
        st = os.fstat(fd)
        return fd, st, _generation(fd)
    except BaseException:
        os.close(fd)
        raise


def _renameat2(old: str, new: str, flags: int) -> None:
    """renameat2(2) with flags (os.rename has none); glibc >= 2.28."""
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.EINVAL, "renameat2 is not available", old)
    if fn(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), old)


def _moved(path: str, old: str, new: str) -> str | None:
    """`path` with its prefix `old` replaced by `new`, or None if it is not under `old`."""
    if path == old:
        return new
    if path.startswith(old + "/"):
        return new + path[len(old) :]
    return None


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


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


class PrecacheFS(pyfuse3.Operations):
    """The passthrough operations with tmem behind the kernel's page cache; see the module docstring."""

    enable_writeback_cache = False

    def __init__(self, backing: str) -> None:
        super().__init__()
        for name in _OPERATIONS:  # pyfuse3 looks the operations up on the instance
            setattr(self, name, _answering_eio(getattr(self, name)))
        # The backing tree through a descriptor opened now, before the mount may cover it: every
        # path below starts at /proc/self/fd/N, which resolves to the tree itself, not the mount.
        self._root_fd = os.open(os.path.abspath(backing), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.backing = f"/proc/self/fd/{self._root_fd}/."  # "/.": the tree, not the magic link
        self.pool: PoolHandle | None = None
        self.counters = Counters()
        root = os.lstat(self.backing)
        rkey = (root.st_dev, root.st_ino)
        self._nodes: dict[int, _Node] = {_ROOT: _Node(rkey, {self.backing}, 1)}
        self._by_key: dict[tuple[int, int], int] = {rkey: _ROOT}
        self._next_ino = _ROOT + 1
        self._objects: dict[tuple[int, int], _Object] = {}
        # objects of files the kernel forgot, oldest first: kept (bounded) so that their pages in
        # tmem stay usable and a change behind the mount is still seen at open
        self._forgotten: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._files: dict[int, tuple[int, _Object]] = {}  # fh (= backing fd) -> (fd, object)
        self._dirs: dict[int, tuple[int, list[tuple[bytes, os.stat_result]] | None]] = {}
        self._next_dh = 1

    def close(self) -> None:
        """Close the descriptor of the backing tree (after unmounting)."""
        with contextlib.suppress(OSError):
            os.close(self._root_fd)

    # ----------------------------------------------------------------- tmem

    def _put_many(self, obj: _Object, pages: Sequence[tuple[int, bytes]]) -> bool:
        """Queue fire-and-forget puts of many pages of one object in PUT_VEC frames."""
        pool = self.pool
        if pool is None or not pages:
            return False
        try:
            pool.put_many_nowait(
                [
                    (obj.oid, index, page if len(page) == PAGE else page.ljust(PAGE, b"\0"))
                    for index, page in pages
                ]
            )
        except ChannelError:
            return False
        obj.in_tmem = True
        return True

    async def _invalidate(self, obj: _Object, indexes: Collection[int] | None = None) -> None:
        """Drop the object's pages (only `indexes`, if given) in tmem, and wait until the host did;
        reads in flight will not put theirs.  The epoch is bumped before the first await, so no
        read can slip between the change and the drop."""
        obj.epoch += 1
        if indexes is not None and len(indexes) > PARTIAL_FLUSH_PAGES:
            indexes = None
        if indexes is not None and not indexes:
            return
        if not obj.in_tmem:
            return
        pool = self.pool
        if pool is None:
            obj.in_tmem = False  # the pool is gone with the channel: nothing of it can come back
            return
        self.counters.flushes += 1
        try:
            if indexes is None:
                obj.in_tmem = False
                await pool.flush_object(obj.oid)  # queued at once: ordered after any earlier put
            else:
                await pool.flush_many([(obj.oid, i) for i in sorted(indexes)])
        except ChannelError as exc:
            log.debug("flush of an object failed: %s", exc)

    async def _tmem_get(self, oid: bytes, indexes: Sequence[int]) -> list[bytes | None]:
        pool = self.pool
        if pool is None or not indexes:
            return [None] * len(indexes)
        self.counters.gets += len(indexes)
        got: list[bytes | None] = [None] * len(indexes)
        try:
            with trio.move_on_after(GET_TIMEOUT):
                if len(indexes) == 1:
                    got = [await pool.get(oid, indexes[0])]
                else:
                    got = await pool.get_many([(oid, i) for i in indexes])
        except ChannelError as exc:
            log.debug("tmem get failed: %s", exc)
        return got

    # ----------------------------------------------------------------- inodes and paths

    def _path(self, ino: int) -> str:
        node = self._nodes.get(ino)
        if node is None or not node.paths:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return next(iter(node.paths))

    def _child(self, parent: int, name: bytes | str) -> str:
        return os.path.join(self._path(parent), os.fsdecode(name))

    def _object(self, st: os.stat_result, generation: int | None = None) -> _Object:
        key = (st.st_dev, st.st_ino)
        obj = self._objects.get(key)
        if obj is None or (generation is not None and obj.oid[16:] != generation.to_bytes(8, "little")):
            oid = struct.pack("<QQQ", st.st_dev, st.st_ino, generation or 0)
            obj = _Object(oid, None, st.st_size)  # same inode number, new file: a new object
            self._objects[key] = obj
        self._forgotten.pop(key, None)  # known to the kernel again
        return obj

    def _remember(self, path: str, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Count a lookup of `path` (whose lstat is `st`) and return its entry."""
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
            self._nodes[ino] = _Node(key)
            self._by_key[key] = ino
        node = self._nodes[ino]
        node.paths.add(path)
        node.lookups += 1
        return self._entry(ino, st)

    def _entry(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        for attr in (
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(entry, attr, getattr(st, attr))
        entry.st_blksize = PAGE
        entry.st_blocks = st.st_blocks
        entry.st_ino = cast("pyfuse3.InodeT", ino)
        entry.generation = 0
        entry.entry_timeout = ATTR_TIMEOUT
        entry.attr_timeout = ATTR_TIMEOUT
        return entry

    def _sync(self, before: os.stat_result, after: os.stat_result) -> None:
        """The shim changed the file's metadata (ctime, maybe mtime): if it knew the file as it was
        just before, it knows it now; if not, the file changed behind the mount and the next open
        must see that, so what it saw stays as it was."""
        obj = self._objects.get((after.st_dev, after.st_ino))
        if obj is not None and obj.seen is not None and obj.seen == _seen(before):
            obj.seen = _seen(after)
            obj.size = after.st_size

    def _rename_paths(self, old: str, new: str) -> None:
        prefix = old + "/"
        for node in self._nodes.values():
            if old in node.paths or any(p.startswith(prefix) for p in node.paths):
                node.paths = {
                    new + p[len(old) :] if p == old or p.startswith(prefix) else p for p in node.paths
                }

    def _drop_path(self, path: str) -> None:
        for node in self._nodes.values():
            node.paths.discard(path)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        st = await _io(os.lstat, path)
        return self._remember(path, st)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            node = self._nodes.get(ino)
            if node is None or ino == _ROOT:
                continue
            node.lookups -= n
            if node.lookups <= 0:
                del self._nodes[ino]
                self._by_key.pop(node.key, None)
                obj = self._objects.get(node.key)
                if obj is None or obj.opens:
                    continue
                if not obj.in_tmem:
                    del self._objects[node.key]
                    self._forgotten.pop(node.key, None)
                else:
                    self._forgotten[node.key] = None
                    self._forgotten.move_to_end(node.key)
        # Past the bound the oldest go, with their pages (here and in tmem): without its object
        # the shim could not tell a later change behind the mount from the pages it kept.
        while len(self._forgotten) > FORGOTTEN_OBJECTS:
            key, _ = self._forgotten.popitem(last=False)
            obj = self._objects.get(key)
            if obj is None or obj.opens or key in self._by_key:
                continue
            del self._objects[key]  # first: a reopen while the flush is queued starts afresh
            await self._invalidate(obj)

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        st = await _io(os.lstat, self._path(inode))
        return self._entry(inode, st)

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: Any,
    ) -> pyfuse3.EntryAttributes:
        path = self._path(inode)
        target: int | str = self._files[fh][0] if fh is not None and fh in self._files else path

        def apply() -> tuple[os.stat_result, os.stat_result]:
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
            before, st = await _io(apply)
            self._sync(before, st)
            return self._entry(inode, st)
        known = await _io(os.lstat, path)
        obj = self._objects.get((known.st_dev, known.st_ino))
        if obj is None:
            before, st = await _io(apply)
            obj = self._objects.get((st.st_dev, st.st_ino))
            if obj is None:
                return self._entry(inode, st)
        async with obj.lock:  # ordered with the file's writes
            before, st = await _io(apply)
            # the new size at once (reads cut their pages by it), then nothing of the old content
            # is kept: the file is known as it is now
            obj.size = st.st_size
            obj.seen = _seen(st)
            await self._invalidate(obj)
        return self._entry(inode, st)

    async def readlink(self, inode: int, ctx: Any = None) -> pyfuse3.FileNameT:
        return cast("pyfuse3.FileNameT", os.fsencode(await _io(os.readlink, self._path(inode))))

    # ----------------------------------------------------------------- namespace changes

    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)

        def make() -> os.stat_result:
            os.mkdir(path, mode)
            _give(path, ctx, mode)
            return os.lstat(path)

        return self._remember(path, await _io(make))

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)

        def make() -> os.stat_result:
            os.mknod(path, mode, rdev)
            _give(path, ctx, mode)
            return os.lstat(path)

        return self._remember(path, await _io(make))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)

        def make() -> os.stat_result:
            os.symlink(os.fsdecode(target), path)
            _give(path, ctx)
            return os.lstat(path)

        return self._remember(path, await _io(make))

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        old = self._path(inode)
        path = self._child(new_parent_inode, new_name)

        def make() -> tuple[os.stat_result, os.stat_result]:
            before = os.lstat(old)
            os.link(old, path, follow_symlinks=False)
            return before, os.lstat(path)

        before, st = await _io(make)
        self._sync(before, st)  # a link changes ctime
        return self._remember(path, st)

    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)

        def remove() -> os.stat_result:
            st = os.lstat(path)
            os.unlink(path)
            return st

        st = await _io(remove)
        self._drop_path(path)
        obj = self._objects.get((st.st_dev, st.st_ino))
        if obj is not None:
            await self._invalidate(obj)
            obj.seen = None  # nothing is cached: the next open (of another link) records it afresh

    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        path = self._child(parent_inode, name)
        await _io(os.rmdir, path)
        self._drop_path(path)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes | str,
        parent_inode_new: int,
        name_new: bytes | str,
        flags: int,
        ctx: Any,
    ) -> None:
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        if flags & _RENAME_EXCHANGE:
            await self._exchange(old, new)
            return
        if flags & ~_RENAME_NOREPLACE:
            raise pyfuse3.FUSEError(errno.EINVAL)

        def move() -> tuple[os.stat_result | None, os.stat_result, os.stat_result]:
            over = _lstat_or_none(new)
            before = os.lstat(old)
            if flags:
                _renameat2(old, new, _RENAME_NOREPLACE)
            else:
                os.rename(old, new)
            return over, before, os.lstat(new)

        over, before, st = await _io(move)
        if over is not None and (over.st_dev, over.st_ino) != (st.st_dev, st.st_ino):
            self._drop_path(new)
            obj = self._objects.get((over.st_dev, over.st_ino))
            if obj is not None:
                await self._invalidate(obj)
        self._rename_paths(old, new)
        self._sync(before, st)  # a rename changes ctime

    async def _exchange(self, a: str, b: str) -> None:
        """RENAME_EXCHANGE: both names stay, their files swap; no file's content changes."""

        def swap() -> tuple[os.stat_result, os.stat_result, os.stat_result, os.stat_result]:
            a0, b0 = os.lstat(a), os.lstat(b)
            _renameat2(a, b, _RENAME_EXCHANGE)
            return a0, b0, os.lstat(b), os.lstat(a)

        a0, b0, a1, b1 = await _io(swap)
        for node in self._nodes.values():
            node.paths = {_moved(p, a, b) or _moved(p, b, a) or p for p in node.paths}
        self._sync(a0, a1)
        self._sync(b0, b1)

    # ----------------------------------------------------------------- files

    async def _opened(
        self, inode: int, fd: int, st: os.stat_result, generation: int, trunc: bool
    ) -> pyfuse3.FileInfo:
        obj = self._object(st, generation)
        async with obj.lock:
            # known: the kernel's cached pages (if any) are the file's.  Not known (first sight
            # in this shim): the kernel may hold pages of an earlier life of the file; drop them.
            unchanged = obj.seen is not None and obj.seen == _seen(st) and obj.size == st.st_size
            changed_behind = not unchanged and obj.seen is not None
            if changed_behind:
                self.counters.changed_behind += 1
            obj.seen = _seen(st)
            obj.size = st.st_size  # before any await: a read in between cuts pages by it
            if trunc or not unchanged:
                await self._invalidate(obj)
        obj.opens += 1
        self._files[fd] = (fd, obj)
        if changed_behind and inode != _ROOT:
            # its size and times too: the kernel keeps them for ATTR_TIMEOUT otherwise
            await _inval_attrs(inode)
        fh = cast("pyfuse3.FileHandleT", fd)
        return pyfuse3.FileInfo(fh=fh, direct_io=False, keep_cache=unchanged and not trunc)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        path = self._path(inode)
        fd, st, gen = await _io(_open_stat, path, flags & ~(os.O_CREAT | _BACKING_DROPS), 0)
        return await self._opened(inode, fd, st, gen, bool(flags & os.O_TRUNC))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd, st, gen = await _io(_create_stat, path, flags & ~_BACKING_DROPS, mode, ctx)
        entry = self._remember(path, st)
        info = await self._opened(int(entry.st_ino), fd, st, gen, True)  # new, truncated, or as seen
        return info, entry

    async def _check_behind(self, fd: int, obj: _Object) -> None:
        """A file changed behind the mount while open (its stat differs from what the shim knows):
        nothing of it in the pool may be served.  fstat of an open file needs no disk."""
        st = os.fstat(fd)
        if obj.seen is not None and obj.seen == _seen(st) and obj.size == st.st_size:
            return
        async with obj.lock:  # a write of the shim's own in flight explains it: wait for it
            st = os.fstat(fd)
            if obj.seen is not None and obj.seen == _seen(st) and obj.size == st.st_size:
                return
            self.counters.changed_behind += 1
            obj.seen = _seen(st)
            obj.size = st.st_size
            await self._invalidate(obj)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """A page-in: the kernel's cache did not have these pages.  The pool first (a hit is put
        back), then the backing file (what it gave is put), all in one pass over the range."""
        fd, obj = self._files[fh]
        c = self.counters
        c.reads += 1
        await self._check_behind(fd, obj)
        # The file's size as the shim knows it now: a write or truncate may change obj.size while
        # this read waits on tmem or the disk, so every length below comes from this one value.
        known = obj.size
        end = min(off + size, known)
        if off >= end:  # past what the shim knows of the file: ask the file itself
            data = await _io(_pread_all, fd, size, off)
            c.bytes_from_disk += len(data)
            return data
        epoch = obj.epoch
        first, last = off // PAGE, (end - 1) // PAGE
        indexes = list(range(first, last + 1))
        pages: dict[int, bytes] = {}
        for index, got in zip(indexes, await self._tmem_get(obj.oid, indexes), strict=True):
            if got is None:
                c.misses += 1
            else:
                c.hits += 1
                got = got[: _page_length(known, index)]
                c.bytes_from_tmem += len(got)
                pages[index] = got
        missing = [i for i in indexes if i not in pages]
        disk: dict[int, bytes] = {}
        if missing:
            lo, hi = missing[0], missing[-1]
            data = await _io(_pread_uncached, fd, min((hi - lo + 1) * PAGE, known - lo * PAGE), lo * PAGE)
            c.bytes_from_disk += len(data)
            for index in missing:
                disk[index] = data[(index - lo) * PAGE : (index - lo + 1) * PAGE]
        if obj.epoch == epoch:  # no change since `known`: what was fetched is the file's
            whole = [(i, p) for i, p in (*pages.items(), *disk.items()) if len(p) == _page_length(known, i)]
            if self._put_many(obj, whole):  # one PUT_VEC for a read-ahead's pages
                backs = sum(1 for i, _ in whole if i in pages)
                c.put_backs += backs
                c.puts += len(whole) - backs
        pages.update(disk)
        parts = []
        for index in indexes:
            page = pages[index]
            parts.append(page)
            if len(page) < _page_length(known, index):  # shrunk meanwhile: a short read, no gap
                break
        out = b"".join(parts)[off - first * PAGE : end - first * PAGE]
        if off + size > known and len(out) == end - off:  # the file may have grown behind us
            more = await _io(_pread_all, fd, off + size - end, end)
            c.bytes_from_disk += len(more)
            out += more
        return out

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        """Write through to the backing file; then the pool: pages the write changed in part are
        flushed (before the write is answered), pages it fully determines are put (clean now)."""
        fd, obj = self._files[fh]
        async with obj.lock:  # writes of one file reach the pool in the order they reached it
            n, st = await _io(_pwrite_stat, fd, buf, off)
            # The new size first, then the drop, with no await between: a read that starts after
            # this sees the new length (before, one could put the old last page cut to the old one).
            old = obj.size
            obj.seen = _seen(st)
            obj.size = st.st_size
            if st.st_size < old:  # a shrink not seen here (or replies out of order): all goes
                await self._invalidate(obj)
                return n
            known, partial = written_pages(off, buf[:n], st.st_size)
            if st.st_size != old and old % PAGE and old // PAGE not in known:
                partial.add(old // PAGE)  # the old last page, cut to the old length, is longer now
            await self._invalidate(obj, partial)  # only the pages this write changed in part
            if self._put_many(obj, sorted(known.items())):  # a put replaces any older copy
                self.counters.written_puts += len(known)
            return n

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh][0]
        await _io(os.fdatasync if datasync else os.fsync, fd)

    async def release(self, fh: int) -> None:
        fd, obj = self._files.pop(fh)
        obj.opens -= 1
        await _io(os.close, fd)

    # ----------------------------------------------------------------- directories

    async def opendir(self, inode: int, ctx: Any) -> pyfuse3.FileHandleT:
        self._path(inode)
        dh = self._next_dh
        self._next_dh += 1
        self._dirs[dh] = (inode, None)
        return cast("pyfuse3.FileHandleT", dh)

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, entries = self._dirs[fh]
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

            entries = await _io(scan)
            self._dirs[fh] = (inode, entries)
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            child = os.path.join(path, os.fsdecode(name))
            key = (st.st_dev, st.st_ino)
            ino = self._by_key.get(key, 0)
            entry = self._entry(ino, st) if ino else self._entry(self._next_ino, st)
            if not pyfuse3.readdir_reply(token, cast("pyfuse3.FileNameT", name), entry, i + 1):
                break
            self._remember(child, st)  # readdirplus: the kernel now holds a lookup

    async def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        sv = await _io(os.statvfs, self.backing)
        out = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(out, attr, getattr(sv, attr))
        return out

    # ----------------------------------------------------------------- extended attributes

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == _ROOT and name == STATS_XATTR:
            self.counters.objects = len(self._objects)
            self.counters.connected = self.pool is not None and self.pool._ch.connected
            return json.dumps(asdict(self.counters)).encode()
        try:
            return await trio.to_thread.run_sync(
                lambda: os.getxattr(self._path(inode), os.fsdecode(name), follow_symlinks=False)
            )
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        if inode == _ROOT and name == EVICT_XATTR:
            await self.drop_kernel_cache()
            return
        path = self._path(inode)

        def apply() -> tuple[os.stat_result, os.stat_result]:
            before = os.lstat(path)
            os.setxattr(path, os.fsdecode(name), value, follow_symlinks=False)
            return before, os.lstat(path)

        self._sync(*await _io(apply))

    async def listxattr(self, inode: int, ctx: Any) -> list[pyfuse3.XAttrNameT]:
        path = self._path(inode)
        names = await _io(lambda: os.listxattr(path, follow_symlinks=False))
        return [cast("pyfuse3.XAttrNameT", os.fsencode(n)) for n in names]

    async def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        path = self._path(inode)

        def apply() -> tuple[os.stat_result, os.stat_result]:
            before = os.lstat(path)
            os.removexattr(path, os.fsdecode(name), follow_symlinks=False)
            return before, os.lstat(path)

        self._sync(*await _io(apply))

    def report_values(self) -> dict[str, int]:
        """The counters as STATS names (`precache_*`), for a report to the host."""
        c = self.counters
        c.objects = len(self._objects)
        return {f"precache_{k}": int(v) for k, v in asdict(c).items() if k != "connected"}

    async def drop_kernel_cache(self) -> None:
        """Tell the kernel to drop its cached pages of every file it knows here (memory pressure
        on demand, for tests and benchmarks).  In a worker thread: the kernel may wait for a read
        of a page it is dropping, which this thread must stay free to answer."""
        for ino in [i for i in self._nodes if i != _ROOT]:
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(pyfuse3.invalidate_inode, cast("pyfuse3.InodeT", ino), False)


async def _inval_attrs(inode: int) -> None:
    """Make the kernel fetch the inode's attributes again (its size, its times) at the next use."""
    with contextlib.suppress(OSError):
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, cast("pyfuse3.InodeT", inode), True)


# ------------------------------------------------------------------------------- running it


def stay_off(mountpoint: str) -> None:
    """Keep this process from reading through `mountpoint` by itself: a traceback (an operation
    that failed unexpectedly is logged with one) reads source lines, which for a mount over the
    shim's own code (say /usr) would be a read of its own mount from the thread that serves it,
    a deadlock.  Source lines of files under the mount are left out of tracebacks instead.  (The
    backing tree itself is reached through the descriptor `PrecacheFS` opens before mounting.)"""
    import linecache

    prefix = os.path.realpath(mountpoint).rstrip("/") + "/"
    previous = linecache.updatecache

    def updatecache(filename: str, module_globals: Any = None) -> list[str]:
        if os.path.abspath(filename).startswith(prefix):
            return []
        return previous(filename, module_globals)

    linecache.updatecache = updatecache


def mount_options(allow_other: bool = False, auto_unmount: bool = False) -> set[str]:
    """The FUSE mount options. With auto_unmount, fusermount3 unmounts when the shim dies (the
    tree underneath is usable again at once). Without allow_other only root may use the mount,
    and the backing file system's own checks, made as root, are all there is. allow_other lets
    every user in, so it always comes with default_permissions: the kernel then checks each access
    against the mode and owner the shim reports (the backing file's), as on the backing itself."""
    options = set(pyfuse3.default_options)
    options.add("fsname=precache")
    options.discard("default_permissions")
    if allow_other:
        options |= {"allow_other", "default_permissions"}
    if auto_unmount:
        options.add("auto_unmount")
    return options


async def _use_channel(fs: PrecacheFS, channel: Channel) -> None:
    """Create the mount's pool on `channel` (waits for the host); gets miss until then."""
    pool = await channel.new_pool(0)  # private ephemeral: exclusive gets
    fs.pool = pool
    log.info("precache: pool %d on %s", pool.remote_id, channel.spec)
    try:
        await trio.sleep_forever()
    finally:
        fs.pool = None
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(ChannelError):
            await pool.destroy()


async def _connect(fs: PrecacheFS, channel_spec: str) -> None:
    """A channel of the mount's own (a guest agent that owns the port reports for it instead)."""
    async with (
        open_channel(channel_spec, name="precache", retry_interval=0.25) as ch,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(_use_channel, fs, ch)
        while True:
            await trio.sleep(REPORT_INTERVAL)
            with contextlib.suppress(ChannelError):
                await ch.report_stats(fs.report_values())


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


async def serve(
    backing: str,
    mountpoint: str,
    channel_spec: str | None,
    *,
    allow_other: bool = False,
    auto_unmount: bool = True,
    channel: Channel | None = None,
    signals: bool = True,
    task_status: trio.TaskStatus[PrecacheFS] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Mount and serve until unmounted (or SIGTERM/SIGINT/SIGHUP with `signals`).

    The pool lives on `channel` if given (a daemon that owns the guest's only port passes its own),
    else on a channel opened to `channel_spec` in the background.  pyfuse3 serves one mount per
    process.  `task_status.started` gets the file system once mounted (its `counters`).
    """
    if (channel is None) == (channel_spec is None):
        raise ValueError("give one of channel_spec and channel")
    fs = PrecacheFS(backing)
    stay_off(mountpoint)
    pyfuse3.init(fs, mountpoint, mount_options(allow_other, auto_unmount))
    try:
        async with trio.open_nursery() as nursery:
            if channel is not None:
                nursery.start_soon(_use_channel, fs, channel)
            else:
                assert channel_spec is not None
                nursery.start_soon(_connect, fs, channel_spec)
            if signals:
                nursery.start_soon(_stop_on_signals)
            task_status.started(fs)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)
        fs.close()


def mount(
    backing: str, mountpoint: str, channel_spec: str, *, allow_other: bool = False, auto_unmount: bool = True
) -> None:
    """Blocking entry point for `guestagent precache mount BACKING MOUNTPOINT`."""
    for what, path in (("backing directory", backing), ("mount point", mountpoint)):
        if not os.path.isdir(path):
            raise SystemExit(f"precache: {what} {path} is not a directory")
    trio.run(
        functools.partial(
            serve, backing, mountpoint, channel_spec, allow_other=allow_other, auto_unmount=auto_unmount
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestagent.precache", description=__doc__.split("\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint", help="may be the backing directory itself: the mount covers it")
    parser.add_argument("--channel", required=True, help="virtio port name or unix socket path")
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let every user use the mount, the kernel checking permissions",
    )
    parser.add_argument(
        "--no-auto-unmount",
        action="store_true",
        help="leave a dead mount behind if the shim dies (default: fusermount3 unmounts it)",
    )
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mount(
        args.backing,
        args.mountpoint,
        args.channel,
        allow_other=args.allow_other,
        auto_unmount=not args.no_auto_unmount,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
