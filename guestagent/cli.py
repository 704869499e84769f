"""The `guestagent` command line.

For now one subcommand, `guestagent check CHANNEL`: a self-test an operator runs inside a guest
(or against a host agent's unix socket) to see the whole path work before trusting it with
pages.  It prints one JSON object and exits non-zero on any failure, so scripts can use it.
The guest daemon itself comes later.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import trio

from guestagent import wire
from guestagent.channel import Channel, ChannelError, open_channel, resolve_channel_path

CHANNEL_HELP = (
    "a virtio-serial port name (opened as /dev/virtio-ports/NAME) or, if it contains a '/', "
    "the path of a unix socket (a host agent's guest socket)"
)


async def _exercise(channel: Channel, flags: int) -> dict[str, Any]:
    """put/get/flush one page in a fresh pool, then destroy it (the check leaves nothing behind).

    The page is put twice because private ephemeral gets are exclusive: the first get takes
    the page, so the flush is checked on a second copy.
    """
    pool = await channel.new_pool(flags)
    oid, page = os.urandom(24), os.urandom(wire.PAGE_SIZE)
    try:
        stored = await pool.put(oid, 0, page)
        start = time.perf_counter()
        got = await pool.get(oid, 0)
        rtt = time.perf_counter() - start
        stored_again = await pool.put(oid, 0, page)
        await pool.flush_page(oid, 0)
        after_flush = await pool.get(oid, 0)
    finally:
        await pool.destroy()
    result = {
        "pool": pool.remote_id,
        "put": stored and stored_again,
        "get": got == page,
        "flush": after_flush is None,
        "get_rtt_us": round(rtt * 1e6, 1),
    }
    result["ok"] = bool(result["put"] and result["get"] and result["flush"])
    return result


async def check(spec: str, name: str, timeout: float) -> dict[str, Any]:
    """Handshake, then exercise an ephemeral and a persistent pool; never raises for I/O."""
    result: dict[str, Any] = {"ok": False, "channel": spec}
    start = time.perf_counter()
    try:
        result["transport"], result["path"] = resolve_channel_path(spec)
        with trio.fail_after(timeout):
            async with open_channel(spec, name=name, reconnect=False) as channel:
                result["welcome"] = dataclasses.asdict(channel.welcome)
                ok = True
                for label, flags in (("ephemeral", 0), ("persistent", wire.PoolFlag.PERSISTENT)):
                    result[label] = part = await _exercise(channel, int(flags))
                    ok = ok and part["ok"]
                result["ok"] = ok
    except trio.TooSlowError:
        result["error"] = f"no answer within {timeout} s"
    except (ChannelError, OSError, ValueError) as exc:
        result["error"] = str(exc)
    result["elapsed_ms"] = round((time.perf_counter() - start) * 1e3, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guestagent", description="Guest agent of tmem for QEMU/KVM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check_cmd = commands.add_parser(
        "check",
        help="self-test the channel to the host agent",
        description="Connect, shake hands, put/get/flush one page in an ephemeral and in a "
        "persistent pool, print the result as JSON; exit status 1 on any failure.",
    )
    check_cmd.add_argument("channel", metavar="CHANNEL", help=CHANNEL_HELP)
    check_cmd.add_argument(
        "--name", default=socket.gethostname(), help="display name sent in HELLO (default: hostname)"
    )
    check_cmd.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before giving up (default: 10)"
    )
    args = parser.parse_args(argv)
    name = args.name.encode("utf-8")[: wire.MAX_NAME].decode("utf-8", errors="ignore")
    result = trio.run(check, args.channel, name, args.timeout)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if result["ok"] else 1
