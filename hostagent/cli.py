"""`hostagent`: run the host agent, or ask a running one for stats and change its settings.

Client subcommands talk to the agent's control socket. Errors are one line on stderr and a non-zero
exit status (2 for bad usage, 1 for everything else), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from guestagent.stdout import quiet_pipe
from hostagent import config as configmod
from hostagent import control, statsview

PROG = "hostagent"
MIB = 1 << 20

_SET_KEYS = {"weight": "weight", "cap": "cap_mib", "quota": "quota_mib", "compress": "compress",
             "balloon": "balloon"}
_ON = {"on": True, "true": True, "yes": True, "1": True,
       "off": False, "false": False, "no": False, "0": False}
_SET_USAGE = "expected weight=N, cap=MiB, quota=MiB, compress=on|off or balloon=on|off"


class UsageError(Exception):
    """Bad command-line syntax that argparse cannot see (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="tmem host agent: serves a page pool to guests and reports on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the host agent in the foreground (logs to stderr)")
    run.add_argument("--config", metavar="FILE",
                     help="TOML configuration (see hostagent/hostagent.example.toml); "
                          "without it every setting has its default and no guest is configured")
    run.add_argument("--log-level", default="INFO", type=str.upper,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--control", metavar="PATH",
                        help=f"control socket (default: from --config, else "
                             f"{configmod.DEFAULT_CONTROL_SOCKET})")
    client.add_argument("--config", metavar="FILE", help="read the control socket path from here")

    stats = sub.add_parser("stats", parents=[client], help="per-guest and pool statistics")
    stats.add_argument("--json", action="store_true", help="print the raw JSON result")
    stats.add_argument("--watch", type=_positive_float, metavar="SECONDS",
                       help="repeat every SECONDS until interrupted")

    pools = sub.add_parser("pools", parents=[client], help="list the pools")
    pools.add_argument("--json", action="store_true", help="print the raw JSON result")

    setp = sub.add_parser(
        "set", parents=[client], help="change a guest's settings",
        description="Change a guest's settings at run time, e.g. "
                    "`hostagent set g1 weight=3 cap=100 quota=64 compress=off` (any subset); "
                    "`hostagent set tmem-1 balloon=off` stops the balloon controller for a domain.",
    )
    setp.add_argument("guest", help="configured guest name, or a libvirt domain's name")
    setp.add_argument("settings", nargs="+", metavar="KEY=VALUE",
                      help="weight=N, cap=MiB (0 = no cap), quota=MiB, compress=on|off, "
                           "balloon=on|off")

    reserve = sub.add_parser(
        "reserve", parents=[client], help="make MiB of host memory available for an incoming guest",
        description="Drop tmem's ephemeral pages until the host has MiB available; with the balloon "
                    "controller on, then shrink guests that are above their goal, waiting up to "
                    "--wait seconds for their balloons. Reports what each step freed.")
    reserve.add_argument("mib", type=_non_negative_int, metavar="MiB")
    reserve.add_argument("--wait", type=_positive_float, default=20.0, metavar="SECONDS",
                         help="how long to wait for balloons to deflate guests (default 20)")
    reserve.add_argument("--json", action="store_true", help="print the raw JSON result")

    shrink = sub.add_parser(
        "shrink", parents=[client], help="ask a guest to move PAGES persistent pages out of tmem",
        description="Send GUEST the SHRINK_PERSISTENT notice: its preswap agent moves PAGES pages out "
                    "of tmem (back into memory where there is room, else to its swap file).")
    shrink.add_argument("guest", help="guest name (a domain's name or UUID)")
    shrink.add_argument("pages", type=_non_negative_int, metavar="PAGES")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return quiet_pipe(lambda: _main(argv))  # `| head` ends it quietly


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        path = _control_path(args)
        if args.command == "stats":
            return _stats(path, args.json, args.watch)
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
    except (control.ControlError, configmod.ConfigError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    # Imported here so the client commands stay quick and need neither the engine nor the arena.
    from hostagent.agent import HostAgent, StartupError

    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = configmod.load(args.config) if args.config else configmod.Config()
    try:
        HostAgent(cfg).run()
    except StartupError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 1
    return 0


def _control_path(args: argparse.Namespace) -> str:
    if args.control:
        return str(args.control)
    if args.config:
        return configmod.load(args.config).control.socket
    return configmod.DEFAULT_CONTROL_SOCKET


def _stats(path: str, as_json: bool, watch: float | None) -> int:
    while True:
        result = control.request(path, {"cmd": "stats"})
        if as_json:  # one line per sample when watching, so the output can be streamed
            print(json.dumps(result, indent=None if watch else 2))
        else:
            if watch and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            print(statsview.format_stats(result))
            if watch:
                print()
        sys.stdout.flush()
        if not watch:
            return 0
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
        parts.append(f"weight={r['weight']} cap={cap} quota={r['quota_mib']:g} MiB "
                     f"compress={'on' if r['compress'] else 'off'}")
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
            print(f"\n  {name}: target {b['target_kib'] // 1024} MiB, actual "
                  f"{(b['actual_kib'] or 0) // 1024} MiB, released {b['released_kib'] // 1024} MiB",
                  end="")
    print(f"\nhost available: {r['host_available_before_bytes'] / MIB:.0f} MiB before, "
          f"{r['host_available_bytes'] / MIB:.0f} MiB now")
    return 0


def _shrink(path: str, guest: str, pages: int) -> int:
    r = control.request(path, {"cmd": "shrink", "guest": guest, "pages": pages})
    print(f"{r['guest']}: asked to move {r['pages']} persistent pages out of tmem "
          f"(it holds {r['persistent_pages']} now)")
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
