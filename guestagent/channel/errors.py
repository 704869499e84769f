"""What the guest channel raises, and the two reasons it ends a connection internally."""

from __future__ import annotations

__all__ = ["Broken", "ChannelClosed", "ChannelError", "Fatal", "PoolLost"]


class ChannelError(Exception):
    """The channel cannot do what was asked (host refused, protocol failure, no reconnect)."""


class PoolLost(ChannelError):
    """A persistent pool did not survive a host-agent restart; its pages are gone."""


class ChannelClosed(ChannelError):
    """The channel was closed by its owner (the `open_channel` block was left)."""


class Broken(Exception):
    """Internal: this connection is unusable; `host_error` if the host sent ERROR."""

    def __init__(self, message: str, *, host_error: bool = False) -> None:
        super().__init__(message)
        self.host_error = host_error


class Fatal(ChannelError):
    """Internal: reconnecting cannot help (e.g. the host rejects our protocol version)."""
