"""The mount keeper: a precache mount over a tree the guest agent itself runs from (/usr), safely.

A FUSE daemon that reads through its own mount waits for itself: a lazy import, a `dlopen`, an
exec of a subprocess, a traceback's source line, each would be a request to the thread that is
making it.  Over /usr the guest agent (python3, its stdlib, libfuse, fusermount3) would do all of
these.  So the daemon and its mount live in two mount namespaces (docs/precache.md):

- `Keeper.start()` forks a small child, the keeper, before any thread exists.  The keeper stays in
  the initial mount namespace, where every other process of the guest lives.
- `leave_namespace()` then moves the daemon into a private copy of that namespace.  Mounts made
  in the initial one later (the keeper's) never appear in the copy: there the covered tree is the
  original one, so nothing the daemon does, in any thread, can reach its own mount.
- `Keeper.mount(mountpoint)` opens /dev/fuse in the daemon and hands the descriptor to the keeper
  (SCM_RIGHTS), which makes the mount(2) in the initial namespace.  The daemon gives libfuse the
  descriptor as the mount point `/dev/fd/N` ("already mounted").
- `Keeper.unmount(mountpoint)` detaches the mount (MNT_DETACH) before the daemon closes its
  descriptor, so at a clean stop new lookups reach the tree underneath at once.  When the daemon
  dies (SIGKILL, OOM) the keeper reads EOF on its socket and detaches every mount it made: the
  tree underneath is usable again within milliseconds (auto_unmount, without fusermount3).

At SIGTERM (systemd sends it to the whole unit when the daemon stops) the keeper detaches its mounts
at once, then stays until the daemon is gone: systemd's SIGKILL after the stop timeout finds nothing
left to take down.  It asks the OOM killer to spare it.  After the mount it opens no path but
/proc/self/fd/N, so it never reads through it either.  It unmounts a mount by a descriptor of its
root, not by path: the next daemon's mount, stacked on the same path while this one is being taken
down, stays.
"""

from __future__ import annotations

import array  # noqa: F401 - socket.recv_fds imports it lazily: loaded here, before the keeper's mount
import contextlib
import ctypes
import errno
import os
import signal
import socket
import stat
import time
from dataclasses import dataclass
from typing import Final, NoReturn

__all__ = [
    "Keeper",
    "KeeperError",
    "decode",
    "encode",
    "fuse_mount_data",
    "leave_namespace",
    "single_threaded",
]

FSNAME: Final = "precache"  # the mount's source in /proc/mounts
CLONE_NEWNS: Final = 0x00020000
MS_NODEV: Final = 4
MS_REC: Final = 16384
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 2
PR_SET_NAME: Final = 15
REPLY_TIMEOUT: Final = 10.0  # a keeper that does not answer within this is treated as gone
_MAX_MESSAGE: Final = 8192
_libc = ctypes.CDLL(None, use_errno=True)


class KeeperError(OSError):
    """The keeper refused or could not do what was asked (errno and reason from the keeper)."""


# ------------------------------------------------------------------------------- pure parts


def fuse_mount_data(fd: int, root_mode: int, uid: int, gid: int, *, allow_other: bool) -> str:
    """The data string of a FUSE mount(2) over descriptor `fd` (the kernel's options, as libfuse
    writes them).  allow_other always comes with default_permissions: the kernel checks each access
    against the modes the shim reports, the backing files' (see `precache.mount_options`)."""
    parts = [f"fd={fd}", f"rootmode={stat.S_IFMT(root_mode):o}", f"user_id={uid}", f"group_id={gid}"]
    if allow_other:
        parts += ["allow_other", "default_permissions"]
    return ",".join(parts)


def encode(op: str, *args: str) -> bytes:
    """A request or a reply: NUL-separated fields (paths hold no NUL)."""
    fields = (op, *args)
    if any("\0" in f for f in fields):
        raise ValueError("a field holds a NUL")
    return "\0".join(fields).encode()


def decode(message: bytes) -> tuple[str, list[str]]:
    op, *args = message.decode().split("\0")
    return op, args


def single_threaded() -> bool:
    """Only this thread in the process (a mount namespace can be left only by all threads at once)."""
    return len(os.listdir("/proc/self/task")) == 1


# ------------------------------------------------------------------------------- system calls


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def _umount_detach(target: str) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(MNT_DETACH)), f"umount {target}")


def leave_namespace() -> None:
    """Move this process into a private copy of its mount namespace: mounts made afterwards in the
    original (by the keeper) do not appear here, nor the other way round.  Only while
    single-threaded: unshare(CLONE_NEWNS) would move the calling thread alone."""
    if not single_threaded():
        raise RuntimeError("leave_namespace: the process already has threads")
    _check(_libc.unshare(ctypes.c_int(CLONE_NEWNS)), "unshare(CLONE_NEWNS)")
    # systemd mounts / shared: without this, the copy's mounts would stay peers of the originals
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)


# ------------------------------------------------------------------------------- the keeper


class _Mounts:
    """The keeper's mounts: mountpoint -> an O_PATH descriptor of the mount's root."""

    def __init__(self) -> None:
        self.roots: dict[str, int] = {}
        self.stopping = False  # told to stop (SIGTERM): what it mounts from now on goes at once

    def stop(self, *_: object) -> None:
        """Detach every mount (a signal handler: systemd's stop sends SIGTERM to the whole unit, and
        its SIGKILL after the stop timeout must find nothing left to take down)."""
        self.stopping = True
        for mountpoint in list(self.roots):
            with contextlib.suppress(OSError):
                self.unmount(mountpoint)

    def mount(self, mountpoint: str, fuse_fd: int, root_mode: int, allow_other: bool) -> None:
        if mountpoint in self.roots:
            raise OSError(errno.EBUSY, f"{mountpoint} is already mounted by this keeper")
        # a mount whose server died with its keeper (SIGKILL of both): every access fails
        for _ in range(8):
            try:
                os.stat(mountpoint)
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                    raise
                _umount_detach(mountpoint)
        data = fuse_mount_data(fuse_fd, root_mode, os.getuid(), os.getgid(), allow_other=allow_other)
        _mount(FSNAME, mountpoint, "fuse", MS_NODEV, data)  # suid kept: /usr holds su, mount, passwd
        # the root of the mount just made (the path now ends there); O_PATH asks nothing of FUSE
        try:
            self.roots[mountpoint] = os.open(mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            _umount_detach(mountpoint)
            raise
        if self.stopping:
            self.unmount(mountpoint)
            raise OSError(errno.ESHUTDOWN, "the mount keeper is stopping")

    def unmount(self, mountpoint: str) -> None:
        fd = self.roots.pop(mountpoint, None)
        if fd is None:
            raise OSError(errno.ENOENT, f"{mountpoint} is not mounted by this keeper")
        try:
            _umount_detach(f"/proc/self/fd/{fd}")  # this mount, whatever is stacked on its path now
        finally:
            os.close(fd)


def _serve(sock: socket.socket) -> NoReturn:
    """The keeper's whole life: mount and unmount on request, detach everything at EOF or SIGTERM.
    Everything it needs is imported and loaded before the fork; it ends with os._exit (no atexit
    handlers)."""
    mounts = _Mounts()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, mounts.stop)  # detach, but stay: the daemon may still ask
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
            f.write("-1000")
        _libc.prctl(PR_SET_NAME, b"tmem-keeper", 0, 0, 0)
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
            except OSError:
                break
            if not message:
                break  # the daemon is gone: its mounts go with it
            try:
                op, args = decode(message)
                if op == "mount" and len(args) == 3 and len(fds) == 1:
                    mounts.mount(args[0], fds[0], int(args[1], 8), args[2] == "1")
                elif op == "unmount" and len(args) == 1:
                    mounts.unmount(args[0])
                else:
                    raise OSError(errno.EINVAL, f"bad request {op!r}")
                reply = encode("ok")
            except (OSError, ValueError) as exc:
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
                reply = encode("error", str(code), str(exc).replace("\0", " "))
            finally:
                for fd in fds:
                    os.close(fd)  # the mount holds the connection; the daemon holds the descriptor
            sock.send(reply)
    finally:
        mounts.stop()
        os._exit(0)


@dataclass
class Keeper:
    """The daemon's end of the keeper: `start` forks it; `mount`, `unmount`; `close` ends it."""

    sock: socket.socket
    pid: int

    @classmethod
    def start(cls) -> Keeper:
        """Fork the keeper (call while single-threaded, before `leave_namespace`)."""
        if not single_threaded():
            raise RuntimeError("Keeper.start: the process already has threads")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child ends in os._exit
            ours.close()
            _serve(theirs)
        theirs.close()
        ours.settimeout(REPLY_TIMEOUT)
        return cls(ours, pid)

    def _ask(self, message: bytes, fds: list[int] | None = None) -> None:
        try:
            socket.send_fds(self.sock, [message], fds or [])
            reply = self.sock.recv(_MAX_MESSAGE)
        except OSError as exc:
            raise KeeperError(exc.errno or errno.EPIPE, f"the mount keeper is gone: {exc}") from None
        op, args = decode(reply) if reply else ("error", [str(errno.EPIPE), "the mount keeper is gone"])
        if op != "ok":
            raise KeeperError(int(args[0]), args[1])

    def mount(self, mountpoint: str, *, allow_other: bool = False) -> int:
        """Mount a new FUSE connection at `mountpoint` in the keeper's namespace; returns its
        /dev/fuse descriptor (close-on-exec), to serve as `/dev/fd/N`."""
        root_mode = os.stat(mountpoint).st_mode  # here, the tree underneath: the same directory
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            self._ask(encode("mount", mountpoint, f"{root_mode:o}", "1" if allow_other else "0"), [fd])
        except BaseException:
            os.close(fd)
            raise
        return fd

    def unmount(self, mountpoint: str) -> None:
        """Detach the mount at `mountpoint` (call before closing its descriptor)."""
        self._ask(encode("unmount", mountpoint))

    def close(self, timeout: float = REPLY_TIMEOUT) -> None:
        """End the keeper (it detaches what is still mounted) and reap it."""
        self.sock.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return
            if pid or time.monotonic() > deadline:
                return
            time.sleep(0.01)
