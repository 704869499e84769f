"""Host agent configuration: a TOML file read into frozen dataclasses.

Every setting has a default, so an empty file (or none) is a valid configuration. Unknown keys and
bad values are refused with a `ConfigError` naming the key, because a typo in a memory limit
silently falling back to a default is worse than refusing to start.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from guestagent.protocol import tomlfile
from guestagent.protocol.wire import (
    DEFAULT_MAX_PAYLOAD,
    DEFAULT_MAX_VECTOR,
    HEADER_SIZE,
    PAGE_SIZE,
    PORT_NAME,
)
from hostagent.balloon import HostParams, Params

DEFAULT_CONTROL_SOCKET = "/run/tmem/control.sock"

# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
# A guest name becomes a file name (DIR/NAME.sock) and fits in a HELLO display name (64 bytes).
_GUEST_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A vectored key on the wire: oid (24 bytes) + index (u32).
_KEY_SIZE = 28

T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@dataclass(frozen=True, slots=True)
class PoolConfig:
    limit_mib: int = 1024
    host_reserve_mib: int = 1024
    arena_dir: str = "/dev/shm/tmem"
    sample_interval: float = 1.0


@dataclass(frozen=True, slots=True)
class ControlConfig:
    socket: str = DEFAULT_CONTROL_SOCKET


@dataclass(frozen=True, slots=True)
class ChannelsConfig:
    dir: str = "/run/tmem/guests"
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_vector: int = DEFAULT_MAX_VECTOR


@dataclass(frozen=True, slots=True)
class LibvirtConfig:
    enabled: bool = True
    uri: str = "qemu:///system"
    channel: str = PORT_NAME
    retry_interval: float = 2.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint (GET /metrics over HTTP), off unless enabled."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9787


@dataclass(frozen=True, slots=True)
class GuestDefaults:
    weight: int = 1
    cap_mib: int = 0
    quota_mib: int = 256
    compress: bool = True


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """One configured guest, with [defaults] already applied and its socket path resolved."""

    name: str
    socket: str
    weight: int
    cap_mib: int
    quota_mib: int
    compress: bool


@dataclass(frozen=True, slots=True)
class SharedPoolConfig:
    uuid: bytes  # 16 bytes, as on the wire
    guests: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BalloonConfig:
    """[balloon]: the controller for libvirt domains; [[balloon.guest]] overrides by domain name."""

    enabled: bool = False
    interval: float = 5.0
    stats_period: int = 2  # seconds: libvirt's balloon stats period set on each domain
    host: HostParams = field(default_factory=HostParams)
    defaults: Params = field(default_factory=Params)
    guests: tuple[tuple[str, Params], ...] = ()

    def params(self, name: str) -> Params:
        """The settings for the domain called `name`: its [[balloon.guest]] table, else defaults."""
        for gname, params in self.guests:
            if gname == name:
                return params
        return self.defaults


@dataclass(frozen=True, slots=True)
class SwapConfig:
    """[swap]: each guest's swap device, served to QEMU's NBD client (docs/preswap-device.md)."""

    enabled: bool = False
    socket: str = "/run/tmem/swap.sock"
    spill_dir: str = "/var/lib/tmem/swap"
    size_mib: int = 1024
    socket_group: str = ""  # a group QEMU runs in ("" = root only)


@dataclass(frozen=True, slots=True)
class Config:
    pool: PoolConfig = PoolConfig()
    control: ControlConfig = ControlConfig()
    channels: ChannelsConfig = ChannelsConfig()
    libvirt: LibvirtConfig = LibvirtConfig()
    defaults: GuestDefaults = GuestDefaults()
    guests: tuple[GuestConfig, ...] = ()
    shared_pools: tuple[SharedPoolConfig, ...] = ()
    balloon: BalloonConfig = BalloonConfig()
    metrics: MetricsConfig = MetricsConfig()
    swap: SwapConfig = SwapConfig()

    def guest(self, name: str) -> GuestConfig | None:
        for g in self.guests:
            if g.name == name:
                return g
        return None

    def shared_acl(self) -> dict[bytes, frozenset[str]]:
        """The engine's view of [[shared_pool]]: uuid -> guest names allowed to create/join it."""
        return {sp.uuid: frozenset(sp.guests) for sp in self.shared_pools}


def load(path: str | Path) -> Config:
    """Read and validate a TOML file; relative paths in it are relative to the file's directory."""
    return tomlfile.load(path, parse, ConfigError)


def parse(data: Mapping[str, Any], *, base_dir: Path | None = None) -> Config:  # noqa: C901 (one section check after another)
    """Validate an already-decoded TOML document (a dict) into a `Config`."""
    _no_unknown(
        data,
        {
            "pool",
            "control",
            "channels",
            "libvirt",
            "defaults",
            "guest",
            "shared_pool",
            "balloon",
            "metrics",
            "swap",
        },
        "",
    )

    def path(value: str) -> str:
        return str(base_dir / value) if base_dir is not None else value

    dpool, dcontrol, dchannels = PoolConfig(), ControlConfig(), ChannelsConfig()  # defaults
    t = _Table(_table(data, "pool"), "pool")
    pool = PoolConfig(
        limit_mib=t.get_int("limit_mib", dpool.limit_mib, minimum=1),
        host_reserve_mib=t.get_int("host_reserve_mib", dpool.host_reserve_mib, minimum=0),
        arena_dir=path(t.get_str("arena_dir", dpool.arena_dir)),
        sample_interval=t.get_float("sample_interval", dpool.sample_interval, minimum=0.01),
    )
    t.done()

    t = _Table(_table(data, "control"), "control")
    control = ControlConfig(socket=_socket_path(path(t.get_str("socket", dcontrol.socket)), "control.socket"))
    t.done()

    t = _Table(_table(data, "channels"), "channels")
    channels = ChannelsConfig(
        dir=path(t.get_str("dir", dchannels.dir)),
        max_payload=t.get_int(
            "max_payload", dchannels.max_payload, minimum=PAGE_SIZE, maximum=(1 << 32) - 1 - HEADER_SIZE
        ),
        max_vector=t.get_int("max_vector", dchannels.max_vector, minimum=1, maximum=(1 << 16)),
    )
    t.done()
    # A guest that uses the whole advertised vector must fit in one frame (PUT_VEC is the largest).
    if channels.max_vector * (_KEY_SIZE + PAGE_SIZE) > channels.max_payload:
        raise ConfigError(
            f"channels.max_vector: {channels.max_vector} pages per vector need "
            f"{channels.max_vector * (_KEY_SIZE + PAGE_SIZE)} bytes, above channels.max_payload "
            f"({channels.max_payload})"
        )

    dlibvirt = LibvirtConfig()
    t = _Table(_table(data, "libvirt"), "libvirt")
    libvirt = LibvirtConfig(
        enabled=t.get_bool("enabled", dlibvirt.enabled),
        uri=t.get_str("uri", dlibvirt.uri),
        channel=t.get_str("channel", dlibvirt.channel),
        retry_interval=t.get_float("retry_interval", dlibvirt.retry_interval, minimum=0.1),
    )
    t.done()
    if not libvirt.channel:
        raise ConfigError("libvirt.channel: must not be empty")

    dmetrics = MetricsConfig()
    t = _Table(_table(data, "metrics"), "metrics")
    metrics = MetricsConfig(
        enabled=t.get_bool("enabled", dmetrics.enabled),
        address=t.get_str("address", dmetrics.address),
        port=t.get_int("port", dmetrics.port, minimum=0, maximum=65535),
    )
    t.done()
    if not metrics.address:
        raise ConfigError("metrics.address: must not be empty (0.0.0.0 or :: for every address)")

    t = _Table(_table(data, "defaults"), "defaults")
    defaults = _guest_settings(t, GuestDefaults())
    t.done()

    guests: list[GuestConfig] = []
    for i, raw in enumerate(_array(data, "guest")):
        where = f"guest[{i}]"
        t = _Table(raw, where)
        name = t.get_required_str("name")
        if not _GUEST_NAME.fullmatch(name):
            raise ConfigError(
                f"{where}.name: {name!r} is not a valid guest name "
                "(letters, digits, '_', '.', '-'; at most 64; not starting with a symbol)"
            )
        where = f"guest {name!r}"
        t.where = where
        if any(g.name == name for g in guests):
            raise ConfigError(f"{where}: configured twice")
        sock = t.get_str("socket", "")
        sock = path(sock) if sock else str(Path(channels.dir) / f"{name}.sock")
        sock = _socket_path(sock, f"{where}.socket")
        s = _guest_settings(t, defaults)
        t.done()
        for g in guests:
            if g.socket == sock:
                raise ConfigError(f"{where}.socket: {sock} is also guest {g.name!r}'s socket")
        guests.append(
            GuestConfig(
                name=name,
                socket=sock,
                weight=s.weight,
                cap_mib=s.cap_mib,
                quota_mib=s.quota_mib,
                compress=s.compress,
            )
        )
    if any(g.socket == control.socket for g in guests):
        raise ConfigError(f"control.socket: {control.socket} is also a guest socket")

    names = {g.name for g in guests}
    shared: list[SharedPoolConfig] = []
    for i, raw in enumerate(_array(data, "shared_pool")):
        where = f"shared_pool[{i}]"
        t = _Table(raw, where)
        text = t.get_required_str("uuid")
        try:
            u = uuidlib.UUID(text).bytes
        except ValueError:
            raise ConfigError(f"{where}.uuid: {text!r} is not a UUID") from None
        if u == bytes(16):
            raise ConfigError(f"{where}.uuid: the all-zero UUID means a private pool")
        if any(sp.uuid == u for sp in shared):
            raise ConfigError(f"{where}.uuid: {text} is listed twice")
        members = t.get_str_list("guests")
        t.done()
        for m in members:
            if m not in names:
                raise ConfigError(f"{where}.guests: {m!r} is not a configured guest")
        shared.append(SharedPoolConfig(uuid=u, guests=tuple(members)))

    dswap = SwapConfig()
    t = _Table(_table(data, "swap"), "swap")
    swap = SwapConfig(
        enabled=t.get_bool("enabled", dswap.enabled),
        socket=_socket_path(path(t.get_str("socket", dswap.socket)), "swap.socket"),
        spill_dir=path(t.get_str("spill_dir", dswap.spill_dir)),
        size_mib=t.get_int("size_mib", dswap.size_mib, minimum=1, maximum=1 << 24),
        socket_group=t.get_str("socket_group", dswap.socket_group),
    )
    t.done()
    if swap.enabled and swap.socket in {control.socket, *(g.socket for g in guests)}:
        raise ConfigError(f"swap.socket: {swap.socket} is also another socket of the agent")

    return Config(
        pool=pool,
        control=control,
        channels=channels,
        libvirt=libvirt,
        defaults=defaults,
        guests=tuple(guests),
        shared_pools=tuple(shared),
        balloon=_balloon(data),
        metrics=metrics,
        swap=swap,
    )


def _balloon(data: Mapping[str, Any]) -> BalloonConfig:
    raw = dict(_table(data, "balloon"))
    guest_tables = _array(raw, "guest") if "guest" in raw else []
    raw.pop("guest", None)
    d = BalloonConfig()
    t = _Table(raw, "balloon")
    enabled = t.get_bool("enabled", d.enabled)
    interval = t.get_float("interval", d.interval, minimum=0.1)
    stats_period = t.get_int("stats_period", d.stats_period, minimum=1, maximum=3600)
    host = HostParams(
        min_available_mib=t.get_int("host_min_available_mib", d.host.min_available_mib, minimum=0),
        pressure_step_mib=t.get_int("pressure_step_mib", d.host.pressure_step_mib, minimum=1),
    )
    defaults = _balloon_params(t, d.defaults, per_guest=False)
    t.done()
    guests: list[tuple[str, Params]] = []
    for i, g in enumerate(guest_tables):
        t = _Table(g, f"balloon.guest[{i}]")
        name = t.get_required_str("name")
        if any(n == name for n, _ in guests):
            raise ConfigError(f"balloon.guest[{i}].name: {name!r} is listed twice")
        t.where = f"balloon.guest {name!r}"
        guests.append((name, _balloon_params(t, defaults, per_guest=True)))
        t.done()
    return BalloonConfig(
        enabled=enabled,
        interval=interval,
        stats_period=stats_period,
        host=host,
        defaults=defaults,
        guests=tuple(guests),
    )


def _balloon_params(t: _Table, base: Params, *, per_guest: bool) -> Params:
    """The per-guest policy keys (in [balloon] as defaults, in [[balloon.guest]] as overrides)."""
    p = Params(
        # In [balloon], `enabled` is the controller's switch; in [[balloon.guest]], the guest's.
        enabled=t.get_bool("enabled", base.enabled) if per_guest else base.enabled,
        self_balloon=t.get_bool("self_balloon", base.self_balloon),
        reserve_mib=t.get_int("reserve_mib", base.reserve_mib, minimum=0),
        down_fraction=t.get_float("down_fraction", base.down_fraction, minimum=0.0),
        up_fraction=t.get_float("up_fraction", base.up_fraction, minimum=0.0),
        min_step_mib=t.get_int("min_step_mib", base.min_step_mib, minimum=1),
        floor_mib=t.get_int("floor_mib", base.floor_mib, minimum=0),
        shares=t.get_int("shares", base.shares, minimum=1),
        stale_after=t.get_float("stale_after", base.stale_after, minimum=0.1),
        distress_swapin=t.get_float("distress_swapin", base.distress_swapin, minimum=0.0),
        distress_refault=t.get_float("distress_refault", base.distress_refault, minimum=0.0),
        distress_step_mib=t.get_int("distress_step_mib", base.distress_step_mib, minimum=0),
        distress_window=t.get_float("distress_window", base.distress_window, minimum=0.0),
        distress_hold=t.get_float("distress_hold", base.distress_hold, minimum=0.0),
    )
    for key in ("down_fraction", "up_fraction"):
        if getattr(p, key) > 1.0:
            raise ConfigError(f"{t.where}.{key}: must be at most 1, got {getattr(p, key)}")
    return p


def _guest_settings(t: _Table, base: GuestDefaults) -> GuestDefaults:
    return GuestDefaults(
        weight=t.get_int("weight", base.weight, minimum=1),
        cap_mib=t.get_int("cap_mib", base.cap_mib, minimum=0),
        quota_mib=t.get_int("quota_mib", base.quota_mib, minimum=0),
        compress=t.get_bool("compress", base.compress),
    )


def _socket_path(p: str, key: str) -> str:
    if not p:
        raise ConfigError(f"{key}: must not be empty")
    if len(p.encode()) > _MAX_SOCKET_PATH:
        raise ConfigError(f"{key}: {p} is longer than a unix socket path may be ({_MAX_SOCKET_PATH} bytes)")
    return p


def _no_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in table:
        if key not in known:
            full = f"{where}.{key}" if where else key
            raise ConfigError(f"{full}: unknown setting (known: {', '.join(sorted(known))})")


def _table(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    return value


def _array(data: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise ConfigError(f"{key}: must be an array of tables ([[{key}]])")
    return value


class _Table:
    """Typed reads from one TOML table, remembering which keys were used to reject the rest."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self.used: set[str] = set()

    def _get(self, key: str, default: T, kind: type | tuple[type, ...], what: str) -> T:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is a subclass of int: `weight = true` must not read as 1.
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.where}.{key}: expected {what}, got {value!r}")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.where}.{key}: expected {what}, got {value!r}")
        return value  # type: ignore[return-value]

    def get_int(
        self, key: str, default: int, *, minimum: int | None = None, maximum: int | None = None
    ) -> int:
        v = self._get(key, default, int, "an integer")
        self._range(key, v, minimum, maximum)
        return v

    def get_float(self, key: str, default: float, *, minimum: float | None = None) -> float:
        v = float(self._get(key, default, (int, float), "a number"))
        self._range(key, v, minimum, None)
        return v

    def get_bool(self, key: str, default: bool) -> bool:
        return self._get(key, default, bool, "true or false")

    def get_str(self, key: str, default: str) -> str:
        return self._get(key, default, str, "a string")

    def get_required_str(self, key: str) -> str:
        if key not in self.data:
            raise ConfigError(f"{self.where}.{key}: required")
        return self.get_str(key, "")

    def get_str_list(self, key: str) -> list[str]:
        if key not in self.data:
            raise ConfigError(f"{self.where}.{key}: required")
        v: list[str] = self._get(key, [], list, "a list of strings")
        if not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{self.where}.{key}: expected a list of strings, got {v!r}")
        return v

    def _range(self, key: str, v: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and v < minimum:
            raise ConfigError(f"{self.where}.{key}: must be at least {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ConfigError(f"{self.where}.{key}: must be at most {maximum}, got {v}")

    def done(self) -> None:
        _no_unknown(self.data, self.used, self.where)
