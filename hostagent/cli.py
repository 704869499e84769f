"""`hostagent`: run the host agent, or ask a running one for stats and change its settings.

Client subcommands talk to the agent's control socket. Errors are one line on stderr and a non-zero
exit status (2 for bad usage, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guestagent import cliargs
from guestagent.cliargs import add_log_level, client_options, log_to_stderr
from hostagent import config as configmod
from hostagent import control, statsview

PROG = "hostagent"
MIB = 1 << 20

_SET_KEYS = {
    "weight": "weight",
    "cap": "cap_mib",
    "quota": "quota_mib",
    "compress": "compress",
    "balloon": "balloon",
}
_ON = {
    "on": True,
    "true": True,
    "yes": True,
    "1": True,
    "off": False,
    "false": False,
    "no": False,
    "0": False,
}
_SET_USAGE = "expected weight=N, cap=MiB, quota=MiB, compress=on|off or balloon=on|off"


class UsageError(Exception):
    """Bad command-line syntax that argparse cannot see (exit 2)."""


class OpError(Exception):
    """attach/detach/install/guest-install failed: one line, exit 1."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="tmem host agent: serves a page pool to guests and reports on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the host agent in the foreground (logs to stderr)")
    run.add_argument(
        "--config",
        metavar="FILE",
        help="TOML configuration (see hostagent/hostagent.example.toml); "
        "without it every setting has its default and no guest is configured",
    )
    add_log_level(run, "INFO")
    run.add_argument(
        "--pid-file",
        metavar="FILE",
        help="write the agent's pid here while it runs (`hostagent install` without "
        "systemd uses /run/tmem/hostagent.pid)",
    )

    client = client_options("control socket", configmod.DEFAULT_CONTROL_SOCKET)

    stats = sub.add_parser("stats", parents=[client], help="per-guest and pool statistics")
    stats.add_argument("--json", action="store_true", help="print the raw JSON result")
    stats.add_argument(
        "--watch",
        type=_positive_float,
        metavar="SECONDS",
        help="repeat every SECONDS until interrupted (the screen is redrawn only "
        "on a terminal, and not with --compact or --append)",
    )
    stats.add_argument(
        "--compact",
        action="store_true",
        help="one line per guest (and one for the pool), each with the time; with "
        "--watch, rates since the previous sample",
    )
    stats.add_argument(
        "--append", action="store_true", help="with --watch: never clear the screen, append each sample"
    )

    attach = sub.add_parser(
        "attach",
        help="give a libvirt domain the tmem channel (definition, and live if running)",
        description="Add the tmem virtio-serial channel to DOMAIN's persistent definition "
        "(validated by libvirt) and, if it is running, hot-plug it; the host agent "
        "picks the domain up from libvirt's events. Idempotent.",
    )
    detach = sub.add_parser(
        "detach",
        help="remove the tmem channel from a libvirt domain (live and definition)",
        description="Unplug the tmem channel from DOMAIN if it is running and remove it from its "
        "persistent definition; the host agent detaches it and frees its pools. "
        "Idempotent.",
    )
    for p in (attach, detach):
        p.add_argument("domain", help="libvirt domain name or UUID")
        p.add_argument(
            "--uri", default=None, help="libvirt URI (default: from --config, else qemu:///system)"
        )
        p.add_argument("--config", metavar="FILE", help="read [libvirt] uri and channel from here")
        p.add_argument("--json", action="store_true", help="print what changed as JSON")

    inst = sub.add_parser(
        "install",
        help="install the host agent as a service (systemd unit, config) and start it",
        description="Write /etc/tmem/hostagent.toml (kept if present, unless --config replaces "
        "it), the systemd unit tmem-hostagent.service and /usr/local/sbin/hostagent, "
        "then start the agent: systemctl enable --now with systemd, else as a daemon "
        "with a pid file. Idempotent; see docs/deploy.md.",
    )
    inst.add_argument(
        "--root", default="/", help="install below this directory (staging: nothing is started)"
    )
    inst.add_argument("--config", metavar="FILE", help="install this configuration (checked first)")
    inst.add_argument(
        "--python", metavar="PATH", help="interpreter for the service (default: the one running this command)"
    )
    inst.add_argument("--no-start", action="store_true", help="write the files only")
    inst.add_argument("--json", action="store_true", help="print the result as JSON")
    uninst = sub.add_parser(
        "uninstall",
        help="stop the service and remove everything install created",
        description="Stop the host agent, remove its unit, link, configuration, pid file, log, "
        "socket and arena, and the directories install created (if empty).",
    )
    uninst.add_argument("--root", default="/", help="as given to install")
    uninst.add_argument("--keep-config", action="store_true", help="leave /etc/tmem/hostagent.toml in place")
    uninst.add_argument("--json", action="store_true", help="print the result as JSON")

    deb = sub.add_parser(
        "guest-deb",
        help="build the guest agent's .deb (for Debian/Ubuntu guests) from this tree",
        description="Build tmem-guestagent_VERSION_all.deb with dpkg-deb: the guestagent package, "
        "/usr/bin/guestagent, its systemd unit and /etc/tmem/guestagent.toml.",
    )
    deb.add_argument("--output", default=".", metavar="DIR", help="where to write it (default .)")
    ginst = sub.add_parser(
        "guest-install",
        help="install the guest agent into a running guest via qemu-guest-agent",
        description="Copy the guest agent's .deb into DOMAIN through the QEMU guest agent "
        "(guest-file-open/write), install it there with apt-get (dpkg if apt-get is "
        "missing) and check that tmem-guestagent.service runs.",
    )
    ginst.add_argument("domain", help="libvirt domain name or UUID")
    ginst.add_argument("--deb", metavar="FILE", help="the package (default: built now)")
    ginst.add_argument("--uri", default="qemu:///system", help="libvirt URI")
    ginst.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        metavar="SECONDS",
        help="for the install in the guest (default 300)",
    )

    pools = sub.add_parser("pools", parents=[client], help="list the pools")
    pools.add_argument("--json", action="store_true", help="print the raw JSON result")

    setp = sub.add_parser(
        "set",
        parents=[client],
        help="change a guest's settings",
        description="Change a guest's settings at run time, e.g. "
        "`hostagent set g1 weight=3 cap=100 quota=64 compress=off` (any subset); "
        "`hostagent set tmem-1 balloon=off` stops the balloon controller for a domain.",
    )
    setp.add_argument("guest", help="configured guest name, or a libvirt domain's name")
    setp.add_argument(
        "settings",
        nargs="+",
        metavar="KEY=VALUE",
        help="weight=N, cap=MiB (0 = no cap), quota=MiB, compress=on|off, balloon=on|off",
    )

    reserve = sub.add_parser(
        "reserve",
        parents=[client],
        help="make MiB of host memory available for an incoming guest",
        description="Drop tmem's ephemeral pages until the host has MiB available; with the balloon "
        "controller on, then shrink guests that are above their goal, waiting up to "
        "--wait seconds for their balloons. Reports what each step freed.",
    )
    reserve.add_argument("mib", type=_non_negative_int, metavar="MiB")
    reserve.add_argument(
        "--wait",
        type=_positive_float,
        default=20.0,
        metavar="SECONDS",
        help="how long to wait for balloons to deflate guests (default 20)",
    )
    reserve.add_argument("--json", action="store_true", help="print the raw JSON result")

    shrink = sub.add_parser(
        "shrink",
        parents=[client],
        help="ask a guest to move PAGES persistent pages out of tmem",
        description="Send GUEST the SHRINK_PERSISTENT notice: its preswap agent moves PAGES pages out "
        "of tmem (back into memory where there is room, else to its swap file).",
    )
    shrink.add_argument("guest", help="guest name (a domain's name or UUID)")
    shrink.add_argument("pages", type=_non_negative_int, metavar="PAGES")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    failures = {control.ControlError: "", configmod.ConfigError: "", OpError: ""}
    return cliargs.main(PROG, build_parser(), argv, _command, failures)


def _command(args: argparse.Namespace) -> int:
    try:
        if args.command == "run":
            return _run(args)
        if args.command in ("attach", "detach"):
            return _attach(args)
        if args.command in ("install", "uninstall"):
            return _install(args)
        if args.command in ("guest-deb", "guest-install"):
            return _guest(args)
        path = _control_path(args)
        if args.command == "stats":
            return _stats(path, args.json, args.watch, compact=args.compact, append=args.append)
        if args.command == "pools":
            result = control.request(path, {"cmd": "pools"})
            print(json.dumps(result, indent=2) if args.json else statsview.format_pools(result))
            return 0
        if args.command == "set":
            return _set(path, args.guest, args.settings)
        if args.command == "reserve":
            return _reserve(path, args.mib, args.wait, args.json)
        if args.command == "shrink":
            return _shrink(path, args.guest, args.pages)
        raise AssertionError(args.command)
    except UsageError as err:
        print(f"{PROG} {args.command}: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    # Imported here so the client commands stay quick and need neither the engine nor the arena.
    from hostagent.agent import HostAgent, StartupError

    log_to_stderr(args.log_level)
    cfg = configmod.load(args.config) if args.config else configmod.Config()
    pid_file = Path(args.pid_file) if args.pid_file else None
    if pid_file is not None:
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        HostAgent(cfg).run()
    except StartupError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    finally:
        if pid_file is not None:  # only our own: a newer agent may have written it since
            with contextlib.suppress(OSError, ValueError):
                if int(pid_file.read_text().split()[0]) == os.getpid():
                    pid_file.unlink()
    return 0


def _attach(args: argparse.Namespace) -> int:
    from hostagent import attach as attachmod
    from hostagent import libvirtconn

    cfg = configmod.load(args.config) if args.config else configmod.Config()
    conn = libvirtconn.connect(args.uri or cfg.libvirt.uri, OpError)
    try:
        fn = attachmod.attach if args.command == "attach" else attachmod.detach
        change = fn(conn, args.domain, attachmod.devices(cfg.libvirt.channel))
    except attachmod.AttachError as err:
        raise OpError(str(err)) from None
    finally:
        conn.close()
    if args.json:
        print(json.dumps(change.as_dict()))
        return 0
    verb = "added" if args.command == "attach" else "removed"
    if not change.changed and not change.not_live:
        print(f"{change.domain}: unchanged (already {args.command}ed)")
    for where, labels in (("definition", change.config), ("live", change.live)):
        if labels:
            print(f"{change.domain}: {verb} {', '.join(labels)} ({where})")
    if change.not_live:
        print(f"{change.domain}: {', '.join(change.not_live)} take effect at its next start")
    if not change.persistent:
        print(f"{change.domain}: transient domain: there is no definition to edit, live only")
    return 0


def _install(args: argparse.Namespace) -> int:
    from hostagent import install

    try:
        if args.command == "install":
            result = install.install(
                args.root, config_file=args.config, python=args.python, start=not args.no_start
            )
        else:
            result = install.uninstall(args.root, keep_config=args.keep_config)
    except (install.InstallError, OSError) as err:
        raise OpError(f"{args.command}: {err}") from None
    if args.json:
        print(json.dumps(result))
    elif args.command == "install":
        changed = ", ".join(result["changed"]) or "nothing (already installed)"
        print(f"installed below {result['root']}: changed {changed}")
        running = result.get("running")
        if running == "systemd":
            print(f"running: systemctl status {install.UNIT_NAME}")
        elif isinstance(running, dict):
            state = "started" if running["started"] else "already running"
            print(
                f"host agent {state} as a daemon: pid {running['pid']} ({running['pidfile']}, "
                f"log {running['log']})"
            )
    elif not result["installed"]:
        print(f"nothing installed below {result['root']}")
    else:
        print(f"uninstalled below {result['root']}: removed {len(result['removed'])} paths")
    return 0


def _guest(args: argparse.Namespace) -> int:
    from hostagent import guestinstall

    try:
        if args.command == "guest-deb":
            print(guestinstall.build_deb(Path(args.output)))
            return 0
        result = guestinstall.install_into(
            args.domain, uri=args.uri, deb=Path(args.deb) if args.deb else None, timeout=args.timeout
        )
    except guestinstall.GuestInstallError as err:
        raise OpError(f"{args.command}: {err}") from None
    print(json.dumps(result))
    return 0


def _control_path(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    if args.config:
        return configmod.load(args.config).control.socket
    return configmod.DEFAULT_CONTROL_SOCKET


def _stats(
    path: str, as_json: bool, watch: float | None, *, compact: bool = False, append: bool = False
) -> int:
    redraw = bool(watch) and sys.stdout.isatty() and not (compact or append)
    previous: tuple[float, dict[str, Any]] | None = None
    while True:
        result = control.request(path, {"cmd": "stats"})
        now = time.monotonic()
        if as_json:  # one line per sample when watching, so the output can be streamed
            print(json.dumps(result, indent=None if watch else 2))
        elif compact:
            since = None if previous is None else (now - previous[0], previous[1])
            print(statsview.format_compact(result, time.strftime("%H:%M:%S"), since))
        else:
            if redraw:
                print("\x1b[H\x1b[2J", end="")
            print(statsview.format_stats(result))
            if watch:
                print()
        sys.stdout.flush()
        if not watch:
            return 0
        previous = (now, result)
        time.sleep(watch)


def parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """`weight=3 cap=100 compress=off` -> the control request's fields; UsageError if malformed."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in _SET_KEYS:
            raise UsageError(f"bad setting {item!r}: {_SET_USAGE}")
        field = _SET_KEYS[key]
        if field in out:
            raise UsageError(f"{key} given twice")
        if key in ("compress", "balloon"):
            if value.lower() not in _ON:
                raise UsageError(f"bad setting {item!r}: {key} must be on or off")
            out[field] = _ON[value.lower()]
        else:
            try:
                number = int(value)
            except ValueError:
                raise UsageError(f"bad setting {item!r}: {key} must be a whole number") from None
            least = 1 if key == "weight" else 0
            if number < least:
                raise UsageError(f"bad setting {item!r}: {key} must be at least {least}")
            out[field] = number
    return out


def _set(path: str, guest: str, items: Sequence[str]) -> int:
    changes = parse_settings(items)
    r = control.request(path, {"cmd": "set", "guest": guest, **changes})
    parts = []
    if "weight" in r:
        cap = "none" if not r["cap_mib"] else f"{r['cap_mib']:g} MiB"
        parts.append(
            f"weight={r['weight']} cap={cap} quota={r['quota_mib']:g} MiB "
            f"compress={'on' if r['compress'] else 'off'}"
        )
    if "balloon" in r:
        parts.append(f"balloon={r['balloon']}")
    print(f"{r['guest']}: {' '.join(parts)}")
    return 0


def _reserve(path: str, mib: int, wait: float, as_json: bool) -> int:
    r = control.request(path, {"cmd": "reserve", "mib": mib, "wait": wait}, timeout=wait + 30)
    if as_json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"reserve {mib} MiB: freed {r['freed_bytes'] / MIB:.1f} MiB of pool memory", end="")
    if "ballooned_bytes" in r:
        print(f", {r['ballooned_bytes'] / MIB:.1f} MiB from guests' balloons", end="")
        for name, b in r["ballooned"].items():
            print(
                f"\n  {name}: target {b['target_kib'] // 1024} MiB, actual "
                f"{(b['actual_kib'] or 0) // 1024} MiB, released {b['released_kib'] // 1024} MiB",
                end="",
            )
    print(
        f"\nhost available: {r['host_available_before_bytes'] / MIB:.0f} MiB before, "
        f"{r['host_available_bytes'] / MIB:.0f} MiB now"
    )
    return 0


def _shrink(path: str, guest: str, pages: int) -> int:
    r = control.request(path, {"cmd": "shrink", "guest": guest, "pages": pages})
    print(
        f"{r['guest']}: asked to move {r['pages']} persistent pages out of tmem "
        f"(it holds {r['persistent_pages']} now)"
    )
    return 0


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value
