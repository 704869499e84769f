"""A preswap swapper on a channel of its own, for the tests and the benches.

The product runs its swapper inside the guest daemon (`[preswap]` in its config), which owns the
channel's notices and reports; this stands in for the daemon where a test or a bench wants a
swapper alone, with knobs the daemon does not expose (eviction policy, readahead, a fake /proc):
it follows the host's shrink notices, reports the swapper's counters as the channel's STATS,
and optionally follows memory pressure.  It prints "ready" once the socket is served.

    python scripts/preswap_swapper.py --channel SOCKET --socket PATH --swap-file PATH [...]
"""

from __future__ import annotations

import argparse
import logging
import signal
from collections.abc import Sequence
from functools import partial

import trio

from guestagent.channel import Channel, open_channel
from guestagent.protocol import wire
from guestagent.swapper import POLICIES, READAHEAD, Swapper, follow_pressure

log = logging.getLogger("preswap_swapper")


async def _follow_notices(ch: Channel, swapper: Swapper) -> None:
    """The host's shrink notices (the daemon's notice loop does this for its swapper)."""
    async for kind, value in ch.notices:
        if kind == wire.Notice.SHRINK_PERSISTENT:
            moved = await swapper.shrink(value)
            log.info("host asked for %d persistent pages back: moved %d", value, moved)


async def _report(ch: Channel, swapper: Swapper, interval: float) -> None:
    """The counters as this channel's STATS report (the daemon merges them into its own report
    instead, as the host keeps one report per guest)."""
    while True:
        if ch.connected:
            await ch.report_stats(swapper.report_values())
        await trio.sleep(interval)


async def _main_async(args: argparse.Namespace) -> None:
    async with open_channel(args.channel, name=args.name, reconnect=True) as ch:
        swapper = Swapper(
            ch,
            args.socket,
            args.swap_file,
            default_budget=args.budget,
            guest_budget=args.guest_budget,
            policy=args.policy,
            readahead=args.readahead,
        )
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(swapper.run)
                print("ready", flush=True)
                nursery.start_soon(_follow_notices, ch, swapper)
                nursery.start_soon(_report, ch, swapper, args.report_interval)
                if args.follow_meminfo:
                    nursery.start_soon(
                        partial(
                            follow_pressure,
                            swapper,
                            proc_dir=args.proc_dir,
                            interval=args.interval,
                            reserve_kib=args.reserve_kib,
                        )
                    )
                async for signum in signals:
                    log.info("signal %d: stopping", signum)
                    swapper.stop()
                    nursery.cancel_scope.cancel()
                    break


def main(argv: Sequence[str] | None = None) -> None:
    """Run a swapper on its own channel (the daemon embeds one on its channel instead)."""
    parser = argparse.ArgumentParser(prog="scripts/preswap_swapper.py")
    parser.add_argument("--channel", required=True, help="host agent socket or virtio port")
    parser.add_argument("--socket", required=True, help="unix socket for the applications")
    parser.add_argument("--swap-file", required=True)
    parser.add_argument("--budget", type=int, default=1024, help="default resident pages per region")
    parser.add_argument("--guest-budget", type=int, help="resident pages for all regions together")
    parser.add_argument("--policy", choices=POLICIES, default="clock", help="eviction policy")
    parser.add_argument(
        "--readahead", type=int, default=READAHEAD, help="most pages per sequential fault (1: off)"
    )
    parser.add_argument(
        "--follow-meminfo",
        action="store_true",
        help="set the guest budget from MemAvailable (overrides --guest-budget)",
    )
    parser.add_argument("--proc-dir", default="/proc")
    parser.add_argument("--report-interval", type=float, default=2.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--reserve-kib", type=int, help="MemAvailable to keep (default 5%%, >= 64 MiB)")
    parser.add_argument("--name", default="preswap")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    trio.run(_main_async, args)


if __name__ == "__main__":
    main()
