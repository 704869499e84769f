"""The guest's memory pressure, followed: /proc/meminfo read every interval and handed on.

One follower for whatever steers by the guest's free memory (preswap's guest budget; precache's
cache size is to switch to it), so /proc/meminfo is read in one loop shape, parsed by one parser
(`reporter.parse_meminfo`), and a test points it at a fake proc directory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable, Mapping

import trio

from guestagent.reporter import parse_meminfo

__all__ = ["follow_meminfo", "read_meminfo"]

log = logging.getLogger(__name__)

Apply = Callable[[Mapping[str, int]], Awaitable[None]]


def read_meminfo(proc_dir: str = "/proc") -> dict[str, int]:
    """/proc/meminfo's fields in KiB (procfs: no disk behind it, so reading it does not block)."""
    with open(os.path.join(proc_dir, "meminfo")) as f:
        return parse_meminfo(f.read())


async def follow_meminfo(
    apply: Apply, *, proc_dir: str = "/proc", interval: float = 1.0, stop_on_error: bool = False
) -> None:
    """Call `apply(meminfo)` now and then every `interval` seconds, forever.

    A read that fails (or an `apply` that finds a field missing: KeyError) is logged; the
    follower then tries again next time, or returns if `stop_on_error`.
    """
    while True:
        try:
            await apply(read_meminfo(proc_dir))
        except (OSError, KeyError) as exc:
            log.warning("cannot follow memory pressure: %s", exc)
            if stop_on_error:
                return
        await trio.sleep(interval)
