"""Guest agent configuration: /etc/tmem/guestagent.toml read into a frozen dataclass.

Every key has a default, so a guest image works with no file at all.  Unknown keys and bad
values are refused with a `ConfigError` naming the key, as on the host: a typo that silently
falls back to a default is worse than a daemon that refuses to start and says why.
The commented reference is guestagent/guestagent.example.toml.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from guestagent.protocol import tomlfile, wire

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_CONTROL_SOCKET",
    "Config",
    "ConfigError",
    "PrecacheMount",
    "load",
    "parse",
]

DEFAULT_CONFIG: Final = "/etc/tmem/guestagent.toml"
DEFAULT_CONTROL_SOCKET: Final = "/run/tmem/guestagent.sock"
_MAX_SOCKET_PATH: Final = 107  # sockaddr_un.sun_path is 108 bytes with its NUL


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


DEFAULT_PRESWAP_SOCKET: Final = "/run/tmem/preswap.sock"
DEFAULT_PRESWAP_SWAP_FILE: Final = "/var/lib/tmem/preswap.swap"
DEFAULT_PRESWAP_BUDGET_MIB: Final = 4  # resident MiB per region that asks for no budget (1024 pages)
MAX_PRESWAP_MIB: Final = 1 << 30  # 1 PiB: a bound that only catches typos


@dataclass(frozen=True, slots=True)
class PrecacheMount:
    """One `[[precache]]` table: a FUSE mount with tmem behind the page cache (guestagent.precache)."""

    backing: str  # the directory whose files the mount serves
    mountpoint: str  # may be `backing` itself: the mount covers the tree
    allow_other: bool = False  # every user may use the mount (with default_permissions); else root only


@dataclass(frozen=True, slots=True)
class Config:
    port: str = wire.PORT_NAME  # virtio-serial port name, looked up in sysfs
    channel: str = ""  # explicit channel (device or unix socket path); overrides `port`
    name: str = ""  # display name in HELLO; empty = the hostname
    # channel reconnect delay, doubling up to 8x: on a virtio port each retry is an open and a poll,
    # so retrying often costs nothing and bounds how long a returning host agent waits for us
    retry_interval: float = 0.25
    report_interval: float = 2.0  # seconds between STATS reports
    control_socket: str = DEFAULT_CONTROL_SOCKET
    # `[[precache]]` tables; pyfuse3 serves one mount per process, so at most one
    precache: tuple[PrecacheMount, ...] = ()
    # `[preswap]`: the preswap agent (guestagent.swapper) on the daemon's channel; off by default,
    # as it needs userfaultfd and writable /run/tmem and /var/lib/tmem
    preswap: bool = False
    preswap_socket: str = DEFAULT_PRESWAP_SOCKET
    preswap_swap_file: str = DEFAULT_PRESWAP_SWAP_FILE
    preswap_default_budget_mib: int = DEFAULT_PRESWAP_BUDGET_MIB
    preswap_guest_budget_mib: int = 0  # 0: follow MemAvailable (swapper.follow_pressure)


# section -> key -> Config field
_LAYOUT: Final[Mapping[str, Mapping[str, str]]] = {
    "channel": {"port": "port", "path": "channel", "name": "name", "retry_interval": "retry_interval"},
    "report": {"interval": "report_interval"},
    "control": {"socket": "control_socket"},
    "preswap": {
        "enabled": "preswap",
        "socket": "preswap_socket",
        "swap_file": "preswap_swap_file",
        "default_budget_mib": "preswap_default_budget_mib",
        "guest_budget_mib": "preswap_guest_budget_mib",
    },
}


def load(path: str | Path) -> Config:
    """Read and validate a TOML file; a relative control socket path is relative to it."""
    return tomlfile.load(path, parse, ConfigError)


def parse(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:
    """Validate a decoded TOML document into a `Config`."""
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section == "precache":
            values["precache"] = _precache(table, base_dir)
            continue
        keys = _LAYOUT.get(section)
        if keys is None:
            raise ConfigError(f"{section}: unknown section (known: {', '.join(_LAYOUT)}, precache)")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{section}: must be a table ([{section}])")
        for key, value in table.items():
            field = keys.get(key)
            if field is None:
                raise ConfigError(f"{section}.{key}: unknown setting (known: {', '.join(keys)})")
            values[field] = _check(f"{section}.{key}", field, value)
    if base_dir is not None:  # relative paths are relative to the file
        for field in ("control_socket", "preswap_socket", "preswap_swap_file"):
            if field in values:
                values[field] = str(base_dir / values[field])
    cfg = Config(**values)
    for key, path in (("control.socket", cfg.control_socket), ("preswap.socket", cfg.preswap_socket)):
        if len(path.encode()) > _MAX_SOCKET_PATH:
            raise ConfigError(
                f"{key}: {path} is longer than a unix socket path may be ({_MAX_SOCKET_PATH} bytes)"
            )
    return cfg


def _check(key: str, field: str, value: Any) -> Any:
    if field in ("retry_interval", "report_interval"):
        # bool is an int: `interval = true` must not read as 1 second
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
        if not math.isfinite(value) or not 0.01 <= value <= 3600:
            raise ConfigError(f"{key}: must be between 0.01 and 3600 seconds, got {value!r}")
        return float(value)
    if field == "preswap":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if field in ("preswap_default_budget_mib", "preswap_guest_budget_mib"):
        least = 1 if field == "preswap_default_budget_mib" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_PRESWAP_MIB:
            raise ConfigError(f"{key}: expected a number of MiB in {least}..{MAX_PRESWAP_MIB}, got {value!r}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if field == "port" and (not value or "/" in value):
        raise ConfigError(f"{key}: {value!r} is not a virtio-serial port name")
    if field == "name" and len(value.encode()) > wire.MAX_NAME:
        raise ConfigError(f"{key}: longer than {wire.MAX_NAME} utf-8 bytes")
    if field in ("control_socket", "preswap_socket", "preswap_swap_file") and not value:
        raise ConfigError(f"{key}: must not be empty")
    return value


_PRECACHE_KEYS: Final = ("backing", "mountpoint", "allow_other")
# settings of the shim's own page cache, gone since the kernel's page cache is the first level
_PRECACHE_GONE: Final = ("cache_pages", "kernel_cache")


def _precache(tables: Any, base_dir: Path | None) -> tuple[PrecacheMount, ...]:
    """`[[precache]]`: an array of tables, each a mount; relative paths are relative to the file."""
    if not isinstance(tables, list) or not all(isinstance(t, Mapping) for t in tables):
        raise ConfigError("precache: must be an array of tables ([[precache]])")
    if len(tables) > 1:
        raise ConfigError(
            f"precache: {len(tables)} mounts, but the daemon serves at most one (pyfuse3 "
            "serves one mount per process); run others with `guestagent precache mount`"
        )
    mounts = []
    for n, table in enumerate(tables):
        where = f"precache[{n}]"
        for key in table:
            if key in _PRECACHE_GONE:
                raise ConfigError(
                    f"{where}.{key}: no longer a setting (the kernel's page cache is the "
                    "first level, the pool the second: remove it)"
                )
            if key not in _PRECACHE_KEYS:
                raise ConfigError(f"{where}.{key}: unknown setting (known: {', '.join(_PRECACHE_KEYS)})")
        paths: dict[str, str] = {}
        for key in ("backing", "mountpoint"):
            if key not in table:
                raise ConfigError(f"{where}.{key}: required")
            value = table[key]
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}.{key}: expected a directory path, got {value!r}")
            paths[key] = os.path.normpath(base_dir / value if base_dir is not None else value)
        allow_other = table.get("allow_other", False)
        if not isinstance(allow_other, bool):
            raise ConfigError(f"{where}.allow_other: expected true or false, got {allow_other!r}")
        mounts.append(PrecacheMount(paths["backing"], paths["mountpoint"], allow_other))
    return tuple(mounts)
