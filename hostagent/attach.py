"""`hostagent attach|detach DOMAIN`: give an existing libvirt domain the devices tmem needs, or
take them away, in its persistent definition and, where QEMU can hot-plug them, live.

The decisions are pure functions over domain XML (`missing`, `present`, `with_devices`,
`without_devices`); `attach`/`detach` do the libvirt I/O. The persistent definition is edited
through libvirt only, and every new definition is checked by libvirt against its schema
(`defineXMLFlags(..., VIR_DOMAIN_DEFINE_VALIDATE)`). Both are idempotent: a device already there is
not added again, and a second run reports no change.

The devices are `TmemDevice`s. Today there is one, the tmem virtio-serial channel: QEMU listens on
a unix socket libvirt picks (`<source mode='bind'/>` without a path: libvirt puts it in its
per-domain channel directory, where its security drivers allow QEMU to create it) and the host
agent connects to it when libvirt reports the domain running or the device added. A virtio-serial
port is hot-pluggable, so a running domain gets it at once (`attachDeviceFlags` LIVE|CONFIG).

Extension point: preswap's swap device (issue 17, an NBD `<disk type='network'>`) is another
`TmemDevice`; add it to `devices()` and both commands handle it (with `live = False` if it must
wait for the next boot).
"""

from __future__ import annotations

import contextlib
import copy
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hostagent.libvirtconn import lookup, message
from hostagent.virt import DEFAULT_CHANNEL


class AttachError(Exception):
    """libvirt refused, or the domain cannot be found; the message says which and why."""


class TmemDevice(Protocol):
    """One device tmem needs in a domain."""

    @property
    def label(self) -> str:
        """For messages: e.g. "channel org.tmem.0"."""
        ...

    @property
    def live(self) -> bool:
        """True if it can be hot-plugged into (and out of) a running domain."""
        ...

    def find(self, devices: ET.Element) -> ET.Element | None:
        """This device in a domain's <devices>, if it is there."""
        ...

    def element(self) -> ET.Element:
        """A fresh <device> element to add."""
        ...


@dataclass(frozen=True, slots=True)
class TmemChannel:
    """The tmem virtio-serial port: QEMU listens on a unix socket, the host agent connects."""

    name: str = DEFAULT_CHANNEL

    @property
    def label(self) -> str:
        return f"channel {self.name}"

    @property
    def live(self) -> bool:
        return True

    def find(self, devices: ET.Element) -> ET.Element | None:
        for ch in devices.iterfind("channel"):
            target = ch.find("target")
            if target is not None and target.get("type") == "virtio" and target.get("name") == self.name:
                return ch
        return None

    def element(self) -> ET.Element:
        ch = ET.Element("channel", type="unix")
        ET.SubElement(ch, "source", mode="bind")
        ET.SubElement(ch, "target", type="virtio", name=self.name)
        return ch


def devices(channel: str = DEFAULT_CHANNEL) -> list[TmemDevice]:
    """Every device tmem needs (issue 17's swap disk goes here)."""
    return [TmemChannel(channel)]


def _parse(xml: str) -> tuple[ET.Element, ET.Element]:
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise AttachError(f"unreadable domain XML: {err}") from None
    devs = root.find("devices")
    if devs is None:
        devs = ET.SubElement(root, "devices")
    return root, devs


def missing(xml: str, wanted: Sequence[TmemDevice]) -> list[TmemDevice]:
    """The wanted devices the domain XML lacks."""
    _, devs = _parse(xml)
    return [d for d in wanted if d.find(devs) is None]


def present(xml: str, wanted: Sequence[TmemDevice]) -> list[tuple[TmemDevice, str]]:
    """The wanted devices the domain XML has, each with its element as XML (to detach it)."""
    _, devs = _parse(xml)
    out = []
    for d in wanted:
        el = d.find(devs)
        if el is not None:
            out.append((d, ET.tostring(el, encoding="unicode")))
    return out


def with_devices(xml: str, add: Sequence[TmemDevice]) -> str:
    """The domain XML with `add` appended to <devices> (those already there are not doubled)."""
    root, devs = _parse(xml)
    for d in add:
        if d.find(devs) is None:
            devs.append(d.element())
    return ET.tostring(root, encoding="unicode")


def without_devices(xml: str, remove: Sequence[TmemDevice]) -> str:
    """The domain XML with every element of `remove` taken out of <devices>."""
    root, devs = _parse(xml)
    for d in remove:
        while (el := d.find(devs)) is not None:
            devs.remove(el)
    return ET.tostring(root, encoding="unicode")


def device_xml(d: TmemDevice) -> str:
    return ET.tostring(copy.deepcopy(d.element()), encoding="unicode")


@dataclass
class Change:
    """What one attach/detach did: device labels changed in the definition and live."""

    domain: str
    uuid: str
    running: bool
    persistent: bool
    config: list[str] = field(default_factory=list)
    live: list[str] = field(default_factory=list)
    not_live: list[str] = field(default_factory=list)  # needs a restart of the domain

    @classmethod
    def of(cls, dom: Any) -> Change:
        """Nothing changed yet on the libvirt domain `dom`."""
        return cls(dom.name(), dom.UUIDString(), bool(dom.isActive()), bool(dom.isPersistent()))

    @property
    def changed(self) -> bool:
        return bool(self.config or self.live)

    def as_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "uuid": self.uuid,
            "running": self.running,
            "persistent": self.persistent,
            "config": self.config,
            "live": self.live,
            "not_live": self.not_live,
            "changed": self.changed,
        }


def attach(conn: Any, name: str, wanted: Sequence[TmemDevice]) -> Change:
    """Add the missing devices: to the persistent definition (validated by libvirt) and, on a
    running domain, live. Nothing to add is no change."""
    import libvirt

    dom = lookup(conn, name, AttachError)
    with _refusals(name):
        change = Change.of(dom)
        cfg_missing = (
            [] if not change.persistent else missing(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), wanted)
        )
        live_missing = missing(dom.XMLDesc(0), wanted) if change.running else []
        for d in list(live_missing):
            if not d.live:
                change.not_live.append(d.label)
                live_missing.remove(d)
                continue
            flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
            if d in cfg_missing:  # both at once: libvirt validates the device for the definition
                flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
                cfg_missing.remove(d)
                change.config.append(d.label)
            dom.attachDeviceFlags(device_xml(d), flags)
            change.live.append(d.label)
        _redefine(conn, dom, change, cfg_missing, with_devices)
    return change


def detach(conn: Any, name: str, wanted: Sequence[TmemDevice]) -> Change:
    """Remove the devices: live where they can be unplugged, and from the persistent definition."""
    import libvirt

    dom = lookup(conn, name, AttachError)
    with _refusals(name):
        change = Change.of(dom)
        if change.running:
            for d, xml in present(dom.XMLDesc(0), wanted):
                if not d.live:
                    change.not_live.append(d.label)
                    continue
                dom.detachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
                change.live.append(d.label)
        if change.persistent:
            there = [d for d, _ in present(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE), wanted)]
            _redefine(conn, dom, change, there, without_devices)
    return change


@contextlib.contextmanager
def _refusals(name: str) -> Iterator[None]:
    """libvirt's errors inside, as AttachError naming the domain."""
    import libvirt

    try:
        yield
    except libvirt.libvirtError as err:
        raise AttachError(f"domain {name}: libvirt refused: {message(err)}") from None


def _redefine(
    conn: Any,
    dom: Any,
    change: Change,
    devices: Sequence[TmemDevice],
    edit: Callable[[str, Sequence[TmemDevice]], str],
) -> None:
    """Define the persistent XML with `devices` edited in or out (read with secrets, so that
    redefining keeps them), validated by libvirt; nothing without devices."""
    import libvirt

    if not devices:
        return
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_SECURE)
    conn.defineXMLFlags(edit(xml, devices), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    change.config += [d.label for d in devices]
