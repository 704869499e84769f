"""The `guestagent` command line.

`guestagent run` is the daemon (systemd unit `tmem-guestagent.service`).  `status`, `stats`
and `check` ask the running daemon over its control socket, because only one process can
open the virtio-serial port and the daemon holds it; `check CHANNEL` instead opens a channel
itself (a host agent's unix socket from the host, or a port no daemon holds).  Client
commands print one JSON object; errors are one line on stderr.  Exit status: 0 on success,
1 on failure (check failed, daemon not connected or not running), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import trio

from guestagent import cliargs, control
from guestagent import config as configmod
from guestagent.channel import ChannelError, open_channel, resolve_channel_path
from guestagent.cliargs import add_log_level, client_options, log_to_stderr
from guestagent.daemon import CHECK_TIMEOUT, GuestAgent, StartupError, default_name
from guestagent.protocol import wire
from guestagent.selftest import exercise_all

if TYPE_CHECKING:
    from guestagent.mountkeeper import Keeper

PROG = "guestagent"
CHANNEL_HELP = (
    "a virtio-serial port name (opened as /dev/virtio-ports/NAME), a port's device path "
    "(/dev/vportNpM) or the path of a unix socket (a host agent's guest socket)"
)

log = logging.getLogger("guestagent")


async def check(spec: str, name: str, timeout: float) -> dict[str, Any]:
    """Handshake, then exercise an ephemeral and a persistent pool; never raises for I/O."""
    result: dict[str, Any] = {"ok": False, "channel": spec}
    start = time.perf_counter()
    try:
        result["transport"], result["path"] = resolve_channel_path(spec)
        with trio.fail_after(timeout):
            async with open_channel(spec, name=name, reconnect=False) as channel:
                result.update(await exercise_all(channel))
    except trio.TooSlowError:
        result["ok"] = False
        result["error"] = f"no answer within {timeout} s"
    except (ChannelError, OSError, ValueError) as exc:
        result["ok"] = False
        result["error"] = str(exc)
    result["elapsed_ms"] = round((time.perf_counter() - start) * 1e3, 1)
    return result


async def run_daemon(agent: GuestAgent) -> None:
    """Run the daemon until SIGTERM or SIGINT, then stop cleanly (exit status 0)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(agent.run)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    agent.stop()  # before the cancel: bounds the preswap releases
                    await agent.stop_preswap()  # while the channel is up: its pool is destroyed
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Guest agent of tmem for QEMU/KVM.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon in the foreground (logs to stderr)")
    run.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML configuration (default: {configmod.DEFAULT_CONFIG} if it exists)",
    )
    run.add_argument(
        "--channel",
        metavar="PATH",
        help="use this channel instead of looking up the virtio-serial port: " + CHANNEL_HELP,
    )
    add_log_level(run, "INFO")

    client = client_options("the daemon's control socket", configmod.DEFAULT_CONTROL_SOCKET)

    sub.add_parser(
        "status",
        parents=[client],
        help="is the daemon connected; its channel and last report",
        description="Exit status 0 if the daemon is connected to the host agent, else 1.",
    )
    sub.add_parser("stats", parents=[client], help="the daemon's counters")

    chk = sub.add_parser(
        "check",
        parents=[client],
        help="self-test the channel to the host agent",
        description="put/get/flush one page in an ephemeral and in a persistent pool and print "
        "the result as JSON; exit status 1 on any failure.  Without CHANNEL the running daemon "
        "does it through its own channel; with CHANNEL this command opens that channel itself.",
    )
    chk.add_argument("channel", metavar="CHANNEL", nargs="?", help=CHANNEL_HELP)
    chk.add_argument(
        "--name", default=default_name(), help="display name sent in HELLO, with CHANNEL (default: hostname)"
    )
    chk.add_argument(
        "--timeout",
        type=float,
        default=CHECK_TIMEOUT,
        help=f"seconds before giving up (default: {CHECK_TIMEOUT:g})",
    )
    pc = sub.add_parser("precache", help="the FUSE victim cache for clean file pages")
    pc_sub = pc.add_subparsers(dest="precache_command", required=True, metavar="COMMAND")
    mnt = pc_sub.add_parser(
        "mount",
        help="serve a precache mount in the foreground over a channel of its own",
        description="Mount BACKING at MOUNTPOINT (pyfuse3 passthrough, one private ephemeral tmem pool) "
        "and serve it until SIGTERM/SIGINT or an unmount.  It opens its own channel, so in a guest it "
        "needs a port no daemon holds (or configure the mount in the daemon: [[precache]]).",
    )
    mnt.add_argument("backing", metavar="BACKING", help="the directory whose files the mount serves")
    mnt.add_argument("mountpoint", metavar="MOUNTPOINT", help="may be BACKING itself (the mount covers it)")
    mnt.add_argument(
        "--no-auto-unmount",
        action="store_true",
        help="leave a dead mount behind if the shim dies (default: unmounted at once)",
    )
    mnt.add_argument(
        "--allow-other",
        action="store_true",
        help="every user may use the mount, the kernel checking each access against the "
        "backing files' modes (default_permissions); default: root only",
    )
    mnt.add_argument(
        "--channel",
        metavar="SPEC",
        help=CHANNEL_HELP + f" (default: the virtio-serial port from --config, else {wire.PORT_NAME})",
    )
    mnt.add_argument("--config", metavar="FILE", help="read the port name from here")
    add_log_level(mnt, "WARNING")
    return parser


def _precache_mount(args: argparse.Namespace) -> int:
    from guestagent import precache  # pyfuse3 only for this command

    log_to_stderr(args.log_level)
    spec = args.channel
    if spec is None:
        cfg = _load_config(args.config)
        spec = cfg.channel or cfg.port
    try:
        precache.mount(
            args.backing,
            args.mountpoint,
            spec,
            allow_other=args.allow_other,
            auto_unmount=not args.no_auto_unmount,
        )
    except precache.MountError as exc:  # not a directory, or pyfuse3 could not mount (libfuse logged why)
        return _fail(str(exc).removeprefix("precache: "))
    return 0


def _load_config(path: str | None) -> configmod.Config:
    """--config FILE must exist; without it the default file is read if there is one."""
    if path is not None:
        return configmod.load(path)
    if os.path.exists(configmod.DEFAULT_CONFIG):
        return configmod.load(configmod.DEFAULT_CONFIG)
    return configmod.Config()


def _control_path(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    return _load_config(args.config).control_socket


def _print(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    failures = {configmod.ConfigError: "configuration: ", control.ControlError: ""}
    return cliargs.main(PROG, build_parser(), argv, _command, failures)


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "precache":
        return _precache_mount(args)
    if args.command == "check" and args.channel is not None:
        name = args.name.encode("utf-8")[: wire.MAX_NAME].decode("utf-8", errors="ignore")
        result = trio.run(check, args.channel, name, args.timeout)
        _print(result)
        return 0 if result["ok"] else 1
    path = _control_path(args)
    if args.command == "check":
        if not 0 < args.timeout <= 600:
            return _fail("--timeout must be in (0, 600] seconds")
        result = control.request(path, {"cmd": "check", "timeout": args.timeout}, timeout=args.timeout + 5)
        _print(result)
        return 0 if result.get("ok") else 1
    result = control.request(path, {"cmd": args.command})
    _print(result)
    if args.command == "status":
        return 0 if result.get("connected") else 1
    return 0


def _run(args: argparse.Namespace) -> int:
    log_to_stderr(args.log_level)
    cfg = _load_config(args.config)
    try:
        keeper = _mount_keeper(cfg)
    except (OSError, RuntimeError) as exc:
        return _fail(f"precache: cannot leave the initial mount namespace: {exc}")
    agent = GuestAgent(cfg, channel=args.channel, keeper=keeper)
    log.info("guest agent starting (pid %d, name %r)", os.getpid(), agent.name)
    try:
        trio.run(run_daemon, agent)
    except (control.ControlError, StartupError, OSError, BaseExceptionGroup) as exc:
        # startup failures: another daemon serves the control socket, or it cannot be made, or the
        # precache mount cannot be
        reason = _leaf(exc)
        if isinstance(reason, control.ControlError | StartupError):
            return _fail(str(reason))
        if isinstance(reason, OSError):
            return _fail(f"cannot serve the control socket {cfg.control_socket}: {reason}")
        raise
    finally:
        if keeper is not None:
            keeper.close()  # it detaches whatever is still mounted
    log.info("guest agent stopped")
    return 0


def _mount_keeper(cfg: configmod.Config) -> Keeper | None:
    """With a precache mount, as root: fork the mount keeper and move this process into a mount
    namespace of its own, so the daemon never reads through its own mount, even one over /usr
    (guestagent.mountkeeper).  Here, before trio.run: both need a single-threaded process."""
    if not cfg.precache or os.geteuid() != 0:
        return None  # no mount, or libfuse's fusermount3 mounts it (a tree the daemon does not need)
    from guestagent import mountkeeper

    keeper = mountkeeper.Keeper.start()
    try:
        mountkeeper.leave_namespace()
    except BaseException:
        keeper.close()
        raise
    return keeper


def _leaf(exc: BaseException) -> BaseException:
    """The lone exception inside (nested) exception groups, else `exc` itself.

    trio >= 0.25 wraps whatever escapes a nursery in a group; Debian's trio 0.22 does not.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
