"""attach/detach decisions: pure functions over domain XML, and the order of libvirt calls over a
fake connection (the real libvirt path is tests/test_lab_deploy.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import libvirt
import pytest

from hostagent import attach
from hostagent.virt import tmem_socket

DOMAIN = """<domain type='kvm'><name>web1</name><devices>
<disk type='file' device='disk'><source file='/x.qcow2'/><target dev='vda' bus='virtio'/></disk>
<channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
</devices></domain>"""


def names(xml: str) -> list[str]:
    return [t.get("name", "") for t in ET.fromstring(xml).iterfind("./devices/channel/target")]


def test_with_devices_adds_the_channel_once() -> None:
    devs = attach.devices()
    assert [d.label for d in attach.missing(DOMAIN, devs)] == ["channel org.tmem.0"]
    once = attach.with_devices(DOMAIN, devs)
    assert names(once) == ["org.qemu.guest_agent.0", "org.tmem.0"]
    assert attach.missing(once, devs) == []
    assert attach.with_devices(once, devs) == once  # idempotent
    ch = ET.fromstring(once).findall("./devices/channel")[1]
    assert ch.get("type") == "unix" and ch.find("source").get("mode") == "bind"  # type: ignore[union-attr]
    assert ch.find("source").get("path") is None  # type: ignore[union-attr]  # libvirt picks it


def test_without_devices_removes_only_tmem() -> None:
    devs = attach.devices()
    once = attach.with_devices(DOMAIN, devs)
    assert [d.label for d, _ in attach.present(once, devs)] == ["channel org.tmem.0"]
    back = attach.without_devices(once, devs)
    assert names(back) == ["org.qemu.guest_agent.0"]
    assert "vda" in back and attach.present(back, devs) == []
    assert attach.without_devices(back, devs) == back


def test_the_live_form_is_what_the_watcher_looks_for() -> None:
    """Once libvirt has filled in the path, virt.tmem_socket finds the channel attach added."""
    live = attach.with_devices(DOMAIN, attach.devices()).replace(
        '<source mode="bind" /><target type="virtio" name="org.tmem.0"',
        '<source mode="bind" path="/var/lib/libvirt/qemu/channel/target/d/org.tmem.0" />'
        '<target type="virtio" name="org.tmem.0"',
    )
    assert tmem_socket(live) == "/var/lib/libvirt/qemu/channel/target/d/org.tmem.0"


def test_a_channel_of_another_name_is_configurable() -> None:
    devs = attach.devices("org.example.tmem")
    assert names(attach.with_devices(DOMAIN, devs))[-1] == "org.example.tmem"


def test_unreadable_xml_is_a_clear_error() -> None:
    with pytest.raises(attach.AttachError, match="unreadable domain XML"):
        attach.missing("<domain", attach.devices())


# -- the libvirt calls, over a fake domain --------------------------------------------------------


@dataclass(frozen=True)
class BootOnly:
    """A device that cannot be hot-plugged (as issue 17's swap disk may be)."""

    label: str = "disk tmemswap"
    live: bool = False

    def find(self, devices: ET.Element) -> ET.Element | None:
        return devices.find("./disk[@device='swap-test']")

    def element(self) -> ET.Element:
        return ET.Element("disk", device="swap-test")


@dataclass
class FakeDom:
    config: str
    live: str
    active: bool = True
    calls: list[tuple[str, int]] = field(default_factory=list)

    def isActive(self) -> bool:
        return self.active

    def isPersistent(self) -> bool:
        return True

    def name(self) -> str:
        return "web1"

    def UUIDString(self) -> str:
        return "u-1"

    def XMLDesc(self, flags: int) -> str:
        return self.config if flags & libvirt.VIR_DOMAIN_XML_INACTIVE else self.live

    def attachDeviceFlags(self, xml: str, flags: int) -> None:
        self.calls.append(("attach", flags))
        el = ET.fromstring(xml)
        dev = attach.TmemChannel()
        if flags & libvirt.VIR_DOMAIN_AFFECT_LIVE:
            self.live = attach.with_devices(self.live, [dev])
        if flags & libvirt.VIR_DOMAIN_AFFECT_CONFIG:
            self.config = attach.with_devices(self.config, [dev])
        assert el.tag == "channel"

    def detachDeviceFlags(self, xml: str, flags: int) -> None:
        self.calls.append(("detach", flags))
        assert flags == libvirt.VIR_DOMAIN_AFFECT_LIVE
        self.live = attach.without_devices(self.live, [attach.TmemChannel()])


@dataclass
class FakeConn:
    dom: FakeDom
    defined: list[tuple[str, int]] = field(default_factory=list)

    def lookupByName(self, name: str) -> Any:
        if name != "web1":
            raise libvirt.libvirtError("no domain")
        return self.dom

    def lookupByUUIDString(self, name: str) -> Any:
        raise libvirt.libvirtError("no domain")

    def defineXMLFlags(self, xml: str, flags: int) -> None:
        self.defined.append((xml, flags))
        self.dom.config = xml


def test_running_domain_gets_the_channel_live_and_in_its_definition_in_one_call() -> None:
    dom = FakeDom(DOMAIN, DOMAIN)
    conn = FakeConn(dom)
    change = attach.attach(conn, "web1", attach.devices())
    assert dom.calls == [("attach", libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG)]
    assert change.config == change.live == ["channel org.tmem.0"] and conn.defined == []
    again = attach.attach(conn, "web1", attach.devices())
    assert not again.changed and len(dom.calls) == 1


def test_a_boot_only_device_goes_into_the_definition_validated() -> None:
    dom = FakeDom(DOMAIN, DOMAIN)
    conn = FakeConn(dom)
    change = attach.attach(conn, "web1", [*attach.devices(), BootOnly()])
    assert change.not_live == ["disk tmemswap"]
    assert change.config == ["channel org.tmem.0", "disk tmemswap"]
    ((xml, flags),) = conn.defined
    assert flags == libvirt.VIR_DOMAIN_DEFINE_VALIDATE and "swap-test" in xml
    detached = attach.detach(conn, "web1", [*attach.devices(), BootOnly()])
    # the disk never reached the running domain: nothing to unplug, only the definition changes
    assert detached.live == ["channel org.tmem.0"] and detached.not_live == []
    assert detached.config == ["channel org.tmem.0", "disk tmemswap"]
    assert attach.present(dom.config, [*attach.devices(), BootOnly()]) == []
    assert conn.defined[-1][1] == libvirt.VIR_DOMAIN_DEFINE_VALIDATE


def test_a_stopped_domain_is_only_redefined_and_an_unknown_one_is_an_error() -> None:
    dom = FakeDom(DOMAIN, DOMAIN, active=False)
    conn = FakeConn(dom)
    change = attach.attach(conn, "web1", attach.devices())
    assert dom.calls == [] and change.live == [] and change.config == ["channel org.tmem.0"]
    assert not attach.attach(conn, "web1", attach.devices()).changed
    with pytest.raises(attach.AttachError, match="no libvirt domain named 'nope'"):
        attach.attach(conn, "nope", attach.devices())
