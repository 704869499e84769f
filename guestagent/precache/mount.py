"""Mounting and serving a `PrecacheFS`: the one `mounted()` both `guestagent precache mount` (via
`serve`) and the daemon use, the mount options, and keeping the shim off its own mount."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pyfuse3
import trio

from guestagent.channel import Channel
from guestagent.precache.attach import connect, use_channel
from guestagent.precache.fs import PrecacheFS

if TYPE_CHECKING:
    from guestagent.mountkeeper import Keeper

__all__ = ["MountError", "mount", "mount_options", "mounted", "serve", "stay_off"]


class MountError(RuntimeError):
    """The mount could not be made; the message says why, starting `precache: `."""


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


def check_directories(backing: str, mountpoint: str) -> None:
    for what, path in (("backing directory", backing), ("mount point", mountpoint)):
        if not os.path.isdir(path):
            raise MountError(f"precache: {what} {path} is not a directory")


@contextlib.asynccontextmanager
async def mounted(
    backing: str,
    mountpoint: str,
    *,
    allow_other: bool = False,
    auto_unmount: bool = True,
    keeper: Keeper | None = None,
) -> AsyncIterator[PrecacheFS]:
    """BACKING served at MOUNTPOINT (which may be BACKING itself) while inside; pyfuse3 serves one
    mount per process, and `pyfuse3.main()` is the caller's to run.  Unmounted on the way out.

    With a `keeper` (guestagent.mountkeeper: the caller runs in a mount namespace of its own) the
    keeper makes the mount where the guest's processes see it and detaches it when this process
    dies; libfuse is given the connection as `/dev/fd/N` ("mounted already"), and auto_unmount,
    fusermount3's, is the keeper's job."""
    check_directories(backing, mountpoint)
    fs = PrecacheFS(backing)  # opens the backing tree before the mount covers it
    stay_off(mountpoint)
    try:
        if keeper is not None:
            fd = keeper.mount(mountpoint, allow_other=allow_other)
            pyfuse3.init(fs, f"/dev/fd/{fd}", mount_options(allow_other))
        else:
            pyfuse3.init(fs, mountpoint, mount_options(allow_other, auto_unmount))
    except (RuntimeError, OSError) as exc:  # pyfuse3 says "fuse_session_mount failed", libfuse why
        fs.close()
        raise MountError(f"precache: cannot mount {mountpoint}: {exc}") from None
    try:
        yield fs
    finally:
        if keeper is not None:  # detached first: new lookups reach the tree underneath
            with contextlib.suppress(OSError):
                keeper.unmount(mountpoint)
        pyfuse3.close(unmount=True)
        fs.close()


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

    The pool lives on `channel` if given, else on a channel opened to `channel_spec` in the
    background.  `task_status.started` gets the file system once mounted (its `counters`).
    """
    if (channel is None) == (channel_spec is None):
        raise ValueError("give one of channel_spec and channel")
    async with (
        mounted(backing, mountpoint, allow_other=allow_other, auto_unmount=auto_unmount) as fs,
        trio.open_nursery() as nursery,
    ):
        if channel is not None:
            nursery.start_soon(use_channel, fs, channel)
        else:
            assert channel_spec is not None
            nursery.start_soon(connect, fs, channel_spec)
        if signals:
            nursery.start_soon(_stop_on_signals)
        task_status.started(fs)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def mount(
    backing: str, mountpoint: str, channel_spec: str, *, allow_other: bool = False, auto_unmount: bool = True
) -> None:
    """Blocking entry point for `guestagent precache mount BACKING MOUNTPOINT`; raises
    `MountError` if the mount cannot be made."""
    check_directories(backing, mountpoint)
    trio.run(
        functools.partial(
            serve, backing, mountpoint, channel_spec, allow_other=allow_other, auto_unmount=auto_unmount
        )
    )
