"""The mount's pool on a channel: one private ephemeral pool per mount, created when the host
answers (gets miss and puts are dropped until then, and after the channel is gone)."""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import trio

from guestagent.channel import Channel, ChannelError, open_channel
from guestagent.precache.fs import PrecacheFS

__all__ = ["REPORT_INTERVAL", "connect", "use_channel"]

log = logging.getLogger(__name__)

REPORT_INTERVAL: Final = 2.0  # seconds between STATS reports on a channel of the mount's own


async def use_channel(fs: PrecacheFS, channel: Channel) -> None:
    """Create the mount's pool on `channel` (waits for the host) and keep it until cancelled;
    then the pool is destroyed (briefly, shielded) and the mount goes on without one."""
    pool = await channel.new_pool(0)  # private ephemeral: exclusive gets
    fs.pool = pool
    log.info("precache: pool %d on %s", pool.remote_id, channel.spec)
    try:
        await trio.sleep_forever()
    finally:
        fs.pool = None
        with trio.CancelScope(shield=True), trio.move_on_after(1), contextlib.suppress(ChannelError):
            await pool.destroy()


async def connect(fs: PrecacheFS, channel_spec: str) -> None:
    """A channel of the mount's own (a guest agent that owns the port reports for it instead)."""
    async with (
        open_channel(channel_spec, name="precache", retry_interval=0.25) as ch,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(use_channel, fs, ch)
        while True:
            await trio.sleep(REPORT_INTERVAL)
            with contextlib.suppress(ChannelError):
                await ch.report_stats(fs.report_values())
