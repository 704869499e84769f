"""libvirt for the one-shot commands (`attach`, `detach`, `guest-install`): connect with libvirt's
own error printing off, find a domain by name or UUID, and fail with one line for the user.

The agent's long-lived connection (reconnects, lifecycle events) is `virt.py`'s.
"""

from __future__ import annotations

from typing import Any


def message(err: Exception) -> str:
    """libvirt's own message for a libvirtError (without the class name), else str(err)."""
    get = getattr(err, "get_error_message", None)
    return str(get() if get is not None else err)


def connect(uri: str, error: type[Exception]) -> Any:
    """An open connection to `uri`; `error` if libvirt-python is missing or the connection fails."""
    try:
        import libvirt
    except ImportError:
        raise error("libvirt-python is not installed") from None
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise error(f"cannot connect to libvirt at {uri}: {message(err)}") from None


def lookup(conn: Any, name: str, error: type[Exception]) -> Any:
    """The domain called `name`, else the one whose UUID it is; `error` if neither exists."""
    import libvirt

    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        pass
    try:
        return conn.lookupByUUIDString(name)
    except libvirt.libvirtError:
        raise error(f"no libvirt domain named {name!r}") from None
