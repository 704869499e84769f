"""Guest side of the tmem channel: a pipelined trio client for the host agent.

One `Channel` owns one connection (a unix socket, or a virtio-serial port inside a VM) and
multiplexes every request over it: callers in many tasks each get a request id, a single
writer task sends everything queued since its last wakeup in one writev, and a single
reader task decodes replies and wakes the waiting callers by id.  No task is spawned per
request, and a waiting caller is parked with `wait_task_rescheduled` rather than an Event,
because the per-request overhead is what decides the round trip time of a page fault.  For
the same reason a lone request (nothing else in flight, writer idle, not part of a burst)
is written by its caller directly, sparing the writer's scheduler pass, and its caller
also reads the reply itself (`Connection.await_sync`): a bounded poll on the fd instead of waking the
reader task and then the caller, two scheduler passes that cost more than the transport's
own round trip under emulation.  A task awaiting a pipelined reply does the same
(`_catch_up`).  Neither happens while trio's run queue holds another task or the caller is
cancelled, and a task's step holds the event loop this way for about _SYNC_SLICE at most.

The package, one concept a module: `transport` (open, batch, write), `sched` (the trio
scheduler hook), `requests` (pending requests and their answers), `connection` (the fd's
reader, writer and fast paths), `handle` (`PoolHandle`, a pool's page API) and `client`
(`Channel`: sessions, reconnect, pool restore, the request API).

The channel survives the host agent going away.  On EOF, a transport error or an ERROR
frame it reconnects with backoff and a fresh HELLO, then restores the pools: ephemeral pools
are re-created (their contents were dropped by the host anyway, so in-flight gets on them
simply miss and in-flight puts are dropped), persistent pools are re-checked with QUERY_POOL
and their in-flight requests are re-sent, so a fault handler waiting for a page completes
once the host is back.  A persistent pool the host no longer has is *lost*: its operations
raise `PoolLost`.

Everything above the transport is identical for unix sockets and virtio-serial ports, so
the whole client is tested over unix sockets against a real host agent.
"""

from guestagent.channel.client import Channel, open_channel
from guestagent.channel.errors import ChannelClosed, ChannelError, PoolLost
from guestagent.channel.handle import PoolHandle
from guestagent.channel.requests import PendingGet, PendingPut
from guestagent.channel.transport import resolve_channel_path

__all__ = [
    "Channel",
    "ChannelClosed",
    "ChannelError",
    "PendingGet",
    "PendingPut",
    "PoolHandle",
    "PoolLost",
    "open_channel",
    "resolve_channel_path",
]
