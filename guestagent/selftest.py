"""The channel self-test behind `guestagent check`: the whole path, with bytes verified.

Used two ways: by `guestagent check CHANNEL` on a channel it opens itself (the host side, or a
guest with no daemon), and by the daemon for `{"cmd": "check"}` through the channel it owns,
since only one process can open a virtio-serial port.  It leaves nothing behind on the host.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Final

import trio

from guestagent.channel import Channel
from guestagent.protocol import wire

__all__ = ["POOL_KINDS", "exercise", "exercise_all"]

_DESTROY_TIMEOUT: Final = 5.0
POOL_KINDS: tuple[tuple[str, int], ...] = (("ephemeral", 0), ("persistent", int(wire.PoolFlag.PERSISTENT)))


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


async def exercise(channel: Channel, flags: int, *, timings: bool = False) -> dict[str, Any]:
    """put/get/flush one page in a fresh pool, then destroy it.

    The page is put twice because private ephemeral gets are exclusive: the first get takes
    the page, so the flush is checked on a second copy.  `timings` adds the put and flush
    round trips to the get's (the daemon reports them; the CLI's output stays as it was).
    """
    pool = await channel.new_pool(flags)
    oid, page = os.urandom(24), os.urandom(wire.PAGE_SIZE)
    clock = time.perf_counter
    try:
        t0 = clock()
        stored = await pool.put(oid, 0, page)
        t1 = clock()
        got = await pool.get(oid, 0)
        t2 = clock()
        stored_again = await pool.put(oid, 0, page)
        t3 = clock()
        await pool.flush_page(oid, 0)
        t4 = clock()
        after_flush = await pool.get(oid, 0)
    finally:
        # a check cut short (timeout, shutdown) must still not leave a persistent pool behind
        with trio.CancelScope(shield=True), trio.move_on_after(_DESTROY_TIMEOUT):
            await pool.destroy()
    result: dict[str, Any] = {
        "pool": pool.remote_id,
        "put": stored and stored_again,
        "get": got == page,
        "flush": after_flush is None,
        "get_rtt_us": _us(t2 - t1),
    }
    if timings:
        result["put_rtt_us"] = _us(t1 - t0)
        result["flush_rtt_us"] = _us(t4 - t3)
    result["ok"] = bool(result["put"] and result["get"] and result["flush"])
    return result


async def exercise_all(channel: Channel, *, timings: bool = False) -> dict[str, Any]:
    """The handshake's terms and one `exercise` per pool kind; "ok" only if all passed."""
    result: dict[str, Any] = {"welcome": dataclasses.asdict(channel.welcome)}
    ok = True
    for label, flags in POOL_KINDS:
        result[label] = part = await exercise(channel, flags, timings=timings)
        ok = ok and part["ok"]
    result["ok"] = ok
    return result
