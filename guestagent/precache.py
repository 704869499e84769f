"""precache: a FUSE passthrough file system whose clean file pages have tmem as a victim cache.

`mount(backing, mountpoint, channel_spec, cache_pages)` serves BACKING at MOUNTPOINT with pyfuse3.
One private ephemeral tmem pool per mount; the object id of a file is its identity on the backing
file system (st_dev, st_ino and the inode generation, 3 x 64 bits), the index is its page number.

The contract (DESIGN.md section 6):

- The shim owns the guest-side cache of the mount's file pages (`PageCache`, at most
  `cache_pages`).  Files are opened with FUSE `direct_io`, so the kernel page cache does not hold
  them and every read reaches the shim: reads are served from its cache; on a miss it tries an
  exclusive get from tmem, then reads the backing file.  Every page it evicts (all its pages are
  clean) is put to tmem, fire-and-forget.
- write, truncate (setattr or O_TRUNC at open), unlink and rename-over drop the object's cached
  pages and flush the object from tmem.  A file whose mtime, ctime or size differ at open from what
  the shim last saw was changed behind the mount: its object is flushed as well.
- Invalidation happens after the backing write completed, and a read only caches what it fetched
  if no invalidation happened meanwhile (the object's epoch), so no stale page survives a write.
  Puts and flushes travel on one channel in order, so a put queued before a flush is flushed.
- The trio thread never waits for the disk (every backing syscall runs in `trio.to_thread`) nor for
  long on the channel (a get has a deadline and counts as a miss).  Without a host agent (not yet
  connected, or gone) gets miss and puts are dropped: reads come from the backing file.

Counters (`Counters`) are readable as JSON from the mount root's extended attribute
`user.tmem.precache.stats`.  Writing the attribute `user.tmem.precache.evict` evicts the whole
shim cache to tmem, `user.tmem.precache.discard` forgets it without puts (test and benchmark hooks).

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
from guestagent.pagecache import PageCache
from guestagent.protocol import wire
from guestagent.reporter import parse_meminfo

__all__ = ["Counters", "PrecacheFS", "cache_target", "main", "mount", "mount_options", "serve"]

log = logging.getLogger(__name__)

PAGE: Final = wire.PAGE_SIZE
STATS_XATTR: Final = b"user.tmem.precache.stats"
EVICT_XATTR: Final = b"user.tmem.precache.evict"
DISCARD_XATTR: Final = b"user.tmem.precache.discard"
GET_TIMEOUT: Final = 1.0  # a host that does not answer a get within this is a miss
ATTR_TIMEOUT: Final = 1.0
_FS_IOC_GETVERSION: Final = 0x80087601  # _IOR('v', 1, long)
REPORT_INTERVAL: Final = 2.0  # seconds between STATS reports on a channel of the mount's own
MEMORY_INTERVAL: Final = 1.0  # seconds between looks at MemAvailable
MEMORY_RESERVE: Final = 64 << 20  # bytes the cache leaves to the rest of the guest
MIN_CACHE_PAGES: Final = 64
READ_AHEAD_PAGES: Final = 32
FORGOTTEN_OBJECTS: Final = 4096  # files the kernel forgot whose pages the shim still tracks
PARTIAL_FLUSH_PAGES: Final = 64  # a write over more pages than this flushes the whole object
SHED_BATCH: Final = 512  # pages evicted at once when the cache shrinks (the channel queues 2048 puts)
_BARRIER_OID: Final = b"\xff" * 24  # no file's identity: a flush of it only waits for the host
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
    """What the shim did; `gets` counts pages asked of tmem (each a hit or a miss)."""

    reads: int = 0
    cache_hits: int = 0  # pages served from the shim's own cache
    read_ahead: int = 0  # pages fetched beyond a sequential read
    gets: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0
    flushes: int = 0
    evictions: int = 0
    bytes_from_tmem: int = 0
    bytes_from_disk: int = 0
    cached_pages: int = 0
    cache_limit: int = 0  # pages: the configured maximum, lowered while memory is short
    objects: int = 0  # files the shim keeps state for (open, looked up, or pages cached or in tmem)
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


@dataclass
class _Node:
    """A FUSE inode: a (st_dev, st_ino) of the backing tree and the paths it was found under."""

    key: tuple[int, int]
    paths: set[str] = field(default_factory=set)
    lookups: int = 0


def cache_target(max_pages: int, cached_pages: int, mem_available: int, reserve: int = MEMORY_RESERVE) -> int:
    """How many pages the shim's cache may hold: at most half of what the guest would have available
    without the cache, beyond a reserve; never above the configured maximum, nor below a floor."""
    without = mem_available + cached_pages * PAGE - reserve
    return max(min(MIN_CACHE_PAGES, max_pages), min(max_pages, without // 2 // PAGE))


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


def _pread_nowait(fd: int, size: int, offset: int) -> bytes:
    """What the backing file's page cache holds of the range right now, without waiting for the
    disk (RWF_NOWAIT): a cached page costs no thread hop.  May be short, or empty."""
    buf = bytearray(size)
    try:
        n = os.preadv(fd, [buf], offset, _RWF_NOWAIT)
    except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the file system cannot tell
        return b""
    return bytes(memoryview(buf)[:n]) if n < size else bytes(buf)


def _pread_uncached(fd: int, size: int, offset: int) -> bytes:
    """Read from the disk and drop what the kernel page cache kept of it: the shim's cache is the
    guest's copy of these pages, a second one in the page cache would only compete with it."""
    data = _pread_all(fd, size, offset)
    os.posix_fadvise(fd, offset, len(data), os.POSIX_FADV_DONTNEED)
    return data


async def _pread(fd: int, size: int, offset: int) -> bytes:
    """Read `size` bytes (fewer at EOF): from the page cache in place if it has them (a page just
    written, or read by a process outside the mount), else from the disk in a worker thread."""
    data = _pread_nowait(fd, size, offset)
    if len(data) < size:
        data += await _io(_pread_uncached, fd, size - len(data), offset + len(data))
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
    """The passthrough operations with the victim cache; see the module docstring."""

    enable_writeback_cache = False

    def __init__(self, backing: str, cache_pages: int, *, direct_io: bool = True) -> None:
        super().__init__()
        for name in _OPERATIONS:  # pyfuse3 looks the operations up on the instance
            setattr(self, name, _answering_eio(getattr(self, name)))
        self.backing = os.path.abspath(backing)
        self.direct_io = direct_io
        self.pool: PoolHandle | None = None
        self.counters = Counters()
        self.cache = PageCache(cache_pages, self._evicted)
        self.max_pages = cache_pages
        self.counters.cache_limit = cache_pages
        root = os.lstat(self.backing)
        rkey = (root.st_dev, root.st_ino)
        self._nodes: dict[int, _Node] = {_ROOT: _Node(rkey, {self.backing}, 1)}
        self._by_key: dict[tuple[int, int], int] = {rkey: _ROOT}
        self._next_ino = _ROOT + 1
        self._objects: dict[tuple[int, int], _Object] = {}
        # objects of files the kernel forgot, oldest first: kept (bounded) so that their pages in
        # the cache and tmem stay usable and a change behind the mount is still seen at open
        self._forgotten: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._files: dict[int, tuple[int, _Object]] = {}  # fh (= backing fd) -> (fd, object)
        self._next_off: dict[int, int] = {}  # fh -> where a sequential reader reads next
        self._dirs: dict[int, tuple[int, list[tuple[bytes, os.stat_result]] | None]] = {}
        self._next_dh = 1

    # ----------------------------------------------------------------- tmem

    def _evicted(self, oid: bytes, index: int, page: bytes) -> None:
        pool = self.pool
        self.counters.evictions += 1
        if pool is None:
            return
        try:
            pool.put_nowait(oid, index, page if len(page) == PAGE else page.ljust(PAGE, b"\0"))
        except ChannelError:
            return
        self.counters.puts += 1
        obj = self._objects.get((int.from_bytes(oid[:8], "little"), int.from_bytes(oid[8:16], "little")))
        if obj is not None:
            obj.in_tmem = True

    async def _invalidate(self, obj: _Object, indexes: Collection[int] | None = None) -> None:
        """Drop the object's pages (only `indexes`, if given) here and in tmem; reads in flight
        will not cache theirs.  Everything up to the first await happens at once, so no read can
        slip between the change and the drop."""
        obj.epoch += 1
        if indexes is None or len(indexes) > PARTIAL_FLUSH_PAGES:
            self.cache.drop_object(obj.oid)
            indexes = None
        elif indexes:
            self.cache.drop_pages(obj.oid, indexes)
        else:
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
            if obj is not None:  # same inode number, new file: nothing of the old one may be served
                self.cache.drop_object(obj.oid)
            obj = _Object(oid, None, st.st_size)
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
                if not obj.in_tmem and not self.cache.holds(obj.oid):
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

        before, st = await _io(apply)
        obj = self._objects.get((st.st_dev, st.st_ino))
        if fields.update_size and obj is not None:
            # the new size at once (reads cut their pages by it), then nothing of the old content
            # is kept: the file is known as it is now
            obj.size = st.st_size
            obj.seen = _seen(st)
            await self._invalidate(obj)
            return self._entry(inode, st)
        self._sync(before, st)
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

    async def _opened(self, fd: int, st: os.stat_result, generation: int, trunc: bool) -> pyfuse3.FileInfo:
        obj = self._object(st, generation)
        changed = obj.seen != _seen(st) if obj.seen is not None else self.cache.holds(obj.oid) or obj.in_tmem
        obj.seen = _seen(st)
        if trunc or changed or obj.size != st.st_size:
            obj.size = st.st_size  # before any await: a read in between cuts pages by it
            await self._invalidate(obj)
        obj.opens += 1
        self._files[fd] = (fd, obj)
        fh = cast("pyfuse3.FileHandleT", fd)
        return pyfuse3.FileInfo(fh=fh, direct_io=self.direct_io, keep_cache=False)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        path = self._path(inode)
        fd, st, gen = await _io(_open_stat, path, flags & ~(os.O_CREAT | _BACKING_DROPS), 0)
        return await self._opened(fd, st, gen, bool(flags & os.O_TRUNC))

    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        path = self._child(parent_inode, name)
        fd, st, gen = await _io(_create_stat, path, flags & ~_BACKING_DROPS, mode, ctx)
        info = await self._opened(fd, st, gen, True)  # new, or truncated, or as we saw it
        return info, self._remember(path, st)

    async def read(self, fh: int, off: int, size: int) -> bytes:  # noqa: C901 (cache, tmem, backing file, in order)
        fd, obj = self._files[fh]
        c = self.counters
        c.reads += 1
        sequential = self._next_off.get(fh) == off
        self._next_off[fh] = off + size
        # The file's size as the shim knows it now: a write or truncate may change obj.size while
        # this read waits on tmem or the disk, so every length below comes from this one value.
        known = obj.size
        end = min(off + size, known)
        if off >= end:  # past what the shim knows of the file: ask the file itself, uncached
            data = await _io(_pread_all, fd, size, off)
            c.bytes_from_disk += len(data)
            return data
        oid = obj.oid
        epoch = obj.epoch
        first, last = off // PAGE, (end - 1) // PAGE
        pages: dict[int, bytes] = {}
        missing: list[int] = []
        for index in range(first, last + 1):
            page = self.cache.get(oid, index)
            if page is None:
                missing.append(index)
            else:
                pages[index] = page
        c.cache_hits += len(pages)
        if missing and sequential and missing[-1] == last:
            # read-ahead: a sequential reader will want the next pages; one get and one backing
            # read for all of them instead of a round trip each (never more than a quarter of
            # the cache, so the pages asked for now are not pushed out by their successors)
            window = min(READ_AHEAD_PAGES, self.cache.capacity // 4)
            ahead = [
                i
                for i in range(last + 1, min(last + window, (known - 1) // PAGE) + 1)
                if self.cache.get(oid, i) is None
            ]
            c.read_ahead += len(ahead)
            missing.extend(ahead)
        fetched: dict[int, bytes] = {}
        if missing:
            for index, got in zip(missing, await self._tmem_get(oid, missing), strict=True):
                if got is None:
                    c.misses += 1
                else:
                    c.hits += 1
                    got = got[: _page_length(known, index)]
                    c.bytes_from_tmem += len(got)
                    fetched[index] = got
            missing = [i for i in missing if i not in fetched]
        if missing:
            lo, hi = missing[0], missing[-1]
            data = await _pread(fd, min((hi - lo + 1) * PAGE, known - lo * PAGE), lo * PAGE)
            c.bytes_from_disk += len(data)
            for index in missing:
                fetched[index] = data[(index - lo) * PAGE : (index - lo + 1) * PAGE]
        if obj.epoch == epoch:  # no change since `known`: what was fetched is the file's
            # read-ahead pages first: the pages asked for now are the most recently used
            for index in sorted(fetched, key=lambda i: i <= last):
                page = fetched[index]
                if len(page) == _page_length(known, index):  # else it changed behind us
                    self.cache.insert(oid, index, page)
        pages.update(fetched)
        c.cached_pages = len(self.cache)
        parts = []
        for index in range(first, last + 1):
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
        fd, obj = self._files[fh]
        n, st = await _io(_pwrite_stat, fd, buf, off)
        # The new size first, then the drop, with no await between: a read that starts after this
        # sees the new length (before, one could cache the old last page cut to the old length).
        old = obj.size
        obj.seen = _seen(st)
        obj.size = st.st_size
        if st.st_size < old:  # a shrink not seen here (or replies out of order): all goes
            await self._invalidate(obj)
            return n
        written = set(range(off // PAGE, (off + n - 1) // PAGE + 1)) if n else set()
        if st.st_size != old and old % PAGE:
            written.add(old // PAGE)  # the old last page, cut to the old length, is longer now
        await self._invalidate(obj, written)  # only the pages this write changed
        return n

    async def flush(self, fh: int) -> None:
        return None

    async def fsync(self, fh: int, datasync: bool) -> None:
        fd = self._files[fh][0]
        await _io(os.fdatasync if datasync else os.fsync, fd)

    async def release(self, fh: int) -> None:
        fd, obj = self._files.pop(fh)
        self._next_off.pop(fh, None)
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
            self.counters.cached_pages = len(self.cache)
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
            await self.shed(0)
            return
        if inode == _ROOT and name == DISCARD_XATTR:
            self.cache.discard_all()
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
        c.cached_pages = len(self.cache)
        c.objects = len(self._objects)
        return {f"precache_{k}": int(v) for k, v in asdict(c).items() if k != "connected"}

    async def follow_memory(self, mem_available: int) -> None:
        """Bound the cache by the guest's MemAvailable (bytes); what it sheds goes to tmem."""
        target = cache_target(self.max_pages, len(self.cache), mem_available)
        self.cache.capacity = target
        self.counters.cache_limit = target
        await self.shed(target)

    async def shed(self, target: int) -> None:
        """Evict down to `target` pages, in batches: fire-and-forget puts queue up on the channel
        (past its limit they degrade to flushes), so after each batch an acknowledged request,
        ordered behind the puts, waits until the host has taken them."""
        while len(self.cache) > target:
            self.cache.shrink(max(target, len(self.cache) - SHED_BATCH))
            self.counters.cached_pages = len(self.cache)
            pool = self.pool
            if pool is not None:
                with trio.move_on_after(GET_TIMEOUT), contextlib.suppress(ChannelError):
                    await pool.flush_page(_BARRIER_OID, 0)
            else:
                await trio.lowlevel.checkpoint()


# ------------------------------------------------------------------------------- running it


def mount_options(allow_other: bool = False) -> set[str]:
    """The FUSE mount options. Without allow_other only root (the shim's user) may use the mount,
    and the backing file system's own checks, made as root, are all there is. allow_other lets
    every user in, so it always comes with default_permissions: the kernel then checks each access
    against the mode and owner the shim reports (the backing file's), as on the backing itself."""
    options = set(pyfuse3.default_options)
    options.add("fsname=precache")
    options.discard("default_permissions")
    if allow_other:
        options |= {"allow_other", "default_permissions"}
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


async def _follow_memory(fs: PrecacheFS, proc_dir: str) -> None:
    while True:
        try:
            with open(os.path.join(proc_dir, "meminfo")) as f:  # procfs: no disk behind it
                info = parse_meminfo(f.read())
        except OSError as exc:
            log.warning("precache: cannot read meminfo: %s", exc)
            return
        if "MemAvailable" in info:
            await fs.follow_memory(info["MemAvailable"] * 1024)
        await trio.sleep(MEMORY_INTERVAL)


async def _stop_on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


async def serve(
    backing: str,
    mountpoint: str,
    channel_spec: str | None,
    cache_pages: int,
    *,
    direct_io: bool = True,
    allow_other: bool = False,
    channel: Channel | None = None,
    proc_dir: str = "/proc",
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
    fs = PrecacheFS(backing, cache_pages, direct_io=direct_io)
    pyfuse3.init(fs, mountpoint, mount_options(allow_other))
    try:
        async with trio.open_nursery() as nursery:
            if channel is not None:
                nursery.start_soon(_use_channel, fs, channel)
            else:
                assert channel_spec is not None
                nursery.start_soon(_connect, fs, channel_spec)
            if signals:
                nursery.start_soon(_stop_on_signals)
            nursery.start_soon(_follow_memory, fs, proc_dir)
            task_status.started(fs)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


def mount(
    backing: str,
    mountpoint: str,
    channel_spec: str,
    cache_pages: int,
    *,
    direct_io: bool = True,
    allow_other: bool = False,
    proc_dir: str = "/proc",
) -> None:
    """Blocking entry point for `guestagent precache mount BACKING MOUNTPOINT`."""
    for what, path in (("backing directory", backing), ("mount point", mountpoint)):
        if not os.path.isdir(path):
            raise SystemExit(f"precache: {what} {path} is not a directory")
    if cache_pages < 1:
        raise SystemExit("precache: the cache needs at least one page")
    trio.run(
        functools.partial(
            serve,
            backing,
            mountpoint,
            channel_spec,
            cache_pages,
            direct_io=direct_io,
            allow_other=allow_other,
            proc_dir=proc_dir,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestagent.precache", description=__doc__.split("\n")[0])
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--channel", required=True, help="virtio port name or unix socket path")
    parser.add_argument("--cache-pages", type=int, default=16384)
    parser.add_argument(
        "--kernel-cache",
        action="store_true",
        help="no direct_io: the kernel page cache serves hot reads (the shim sees fewer)",
    )
    parser.add_argument(
        "--allow-other",
        action="store_true",
        help="let every user use the mount, the kernel checking permissions",
    )
    parser.add_argument("--proc-dir", default="/proc", help="where meminfo is read (tests use a fake one)")
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
        args.cache_pages,
        direct_io=not args.kernel_cache,
        allow_other=args.allow_other,
        proc_dir=args.proc_dir,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
