"""libvirt domain XML for lab guests: parsed back and checked element by element (pure, no libvirt)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from hostagent import virt
from scripts import domain
from scripts.domain import Guest, IOTune, detect_virt_type, domain_xml

IMG = Path("/var/cache/tmem/images/abc")


def guest(**overrides: Any) -> Guest:
    fields: dict[str, Any] = {
        "name": "g1",
        "memory_mib": 384,
        "max_memory_mib": 512,
        "vcpus": 2,
        "disk": Path("/var/lib/tmem/g1.qcow2"),
        "tmem_socket": Path("/run/tmem/guests/g1.sock"),
        "console_log": Path("/var/log/tmem/g1.console.log"),
        "kernel": IMG / "vmlinuz",
        "initrd": IMG / "initrd.img",
    }
    fields.update(overrides)
    return Guest(**fields)


def parse(g: Guest, virt_type: domain.VirtType = "qemu") -> ET.Element:
    return ET.fromstring(domain_xml(g, virt_type))


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, f"{path}: {len(found)} elements"
    return found[0]


def test_domain_type_name_memory_vcpus() -> None:
    root = parse(guest(), "kvm")
    assert root.tag == "domain" and root.get("type") == "kvm"
    assert one(root, "name").text == "g1"
    memory, current = one(root, "memory"), one(root, "currentMemory")
    assert (memory.get("unit"), memory.text) == ("KiB", str(512 * 1024))
    assert (current.get("unit"), current.text) == ("KiB", str(384 * 1024))
    assert one(root, "vcpu").text == "2"
    assert root.find("maxMemory") is None  # that is memory hotplug; the balloon's ceiling is <memory>
    assert parse(guest(), "qemu").get("type") == "qemu"


def test_cpu_passthrough_on_kvm_only() -> None:
    assert one(parse(guest(), "kvm"), "cpu").get("mode") == "host-passthrough"
    assert parse(guest(), "qemu").find("cpu") is None


def test_tcg_translation_cache_bounded_on_qemu_only() -> None:
    tb = one(parse(guest(tcg_tb_cache_mib=128), "qemu"), "features/tcg/tb-cache")
    assert (tb.get("unit"), tb.text) == ("MiB", "128")
    assert parse(guest(), "kvm").find("features/tcg") is None
    assert parse(guest(tcg_tb_cache_mib=None), "qemu").find("features/tcg") is None


def test_direct_kernel_boot() -> None:
    os_ = one(parse(guest()), "os")
    assert one(os_, "type").text == "hvm"
    assert one(os_, "kernel").text == str(IMG / "vmlinuz")
    assert one(os_, "initrd").text == str(IMG / "initrd.img")
    assert one(os_, "cmdline").text == "root=/dev/vda rw console=ttyS0"
    assert os_.find("boot") is None
    custom = one(parse(guest(cmdline="root=/dev/vda rw console=ttyS0 quiet")), "os/cmdline")
    assert custom.text == "root=/dev/vda rw console=ttyS0 quiet"


def test_disk_boot() -> None:
    os_ = one(parse(guest(boot="disk", kernel=None, initrd=None)), "os")
    assert one(os_, "boot").get("dev") == "hd"
    assert os_.find("kernel") is None and os_.find("initrd") is None and os_.find("cmdline") is None


def test_disk_is_the_overlay_virtio_uncached_without_iotune_by_default() -> None:
    disk = one(parse(guest()), "devices/disk")
    assert (disk.get("type"), disk.get("device")) == ("file", "disk")
    driver = one(disk, "driver")
    assert (driver.get("name"), driver.get("type"), driver.get("cache")) == ("qemu", "qcow2", "none")
    assert one(disk, "source").get("file") == "/var/lib/tmem/g1.qcow2"
    target = one(disk, "target")
    assert (target.get("dev"), target.get("bus")) == ("vda", "virtio")
    assert disk.find("iotune") is None


def test_writeback_disk_goes_through_the_host_page_cache_with_threads() -> None:
    """cache='writeback' with io='native' would make QEMU refuse to start (native AIO needs O_DIRECT)."""
    disk = one(parse(guest(disk_cache="writeback", iotune=IOTune(read_iops_sec=200))), "devices/disk")
    driver = one(disk, "driver")
    assert (driver.get("cache"), driver.get("io")) == ("writeback", "threads")
    assert one(disk, "iotune/read_iops_sec").text == "200"
    assert one(one(parse(guest()), "devices/disk"), "driver").get("io") == "native"


def test_iotune_has_exactly_the_limits_given() -> None:
    limits = IOTune(read_iops_sec=200, write_iops_sec=100, read_bytes_sec=50 << 20)
    iotune = one(parse(guest(iotune=limits)), "devices/disk/iotune")
    assert {child.tag: child.text for child in iotune} == {
        "read_iops_sec": "200",
        "write_iops_sec": "100",
        "read_bytes_sec": str(50 << 20),
    }
    everything = IOTune(read_iops_sec=1, write_iops_sec=2, read_bytes_sec=3, write_bytes_sec=4)
    tags = {c.tag for c in one(parse(guest(iotune=everything)), "devices/disk/iotune")}
    assert tags == {"read_iops_sec", "write_iops_sec", "read_bytes_sec", "write_bytes_sec"}
    assert one(parse(guest(iotune=IOTune())), "devices/disk").find("iotune") is None


def test_serial_console_logged_to_a_file() -> None:
    devices = one(parse(guest()), "devices")
    serial = one(devices, "serial")
    assert one(serial, "log").get("file") == "/var/log/tmem/g1.console.log"
    assert one(serial, "target").get("port") == "0"
    assert one(devices, "console/target").get("type") == "serial"


def test_channels_guest_agent_and_tmem() -> None:
    channels = parse(guest()).findall("devices/channel")
    by_name = {one(c, "target").get("name"): c for c in channels}
    assert set(by_name) == {"org.qemu.guest_agent.0", "org.tmem.0"}
    for c in channels:
        assert c.get("type") == "unix" and one(c, "target").get("type") == "virtio"
    assert by_name["org.qemu.guest_agent.0"].find("source") is None  # libvirt picks that socket
    source = one(by_name["org.tmem.0"], "source")
    assert (source.get("mode"), source.get("path")) == ("bind", "/run/tmem/guests/g1.sock")


def test_swap_device_is_an_nbd_blockdev_with_reconnect_on_the_qemu_command_line() -> None:
    uuid = "2b7c3e0a-1111-4222-8333-444455556666"
    root = parse(guest(uuid=uuid, swap_socket=Path("/run/tmem/swap.sock"), swap_reconnect_delay=45))
    assert one(root, "uuid").text == uuid
    args = [a.get("value") for a in root.findall(f"{{{domain.QEMU_NS}}}commandline/{{{domain.QEMU_NS}}}arg")]
    assert args[0] == "-blockdev" and args[2] == "-device"
    blockdev = json.loads(args[1] or "")
    assert blockdev == domain.swap_blockdev(Path("/run/tmem/swap.sock"), uuid, 45)
    assert blockdev["export"] == uuid and blockdev["server"] == {
        "type": "unix",
        "path": "/run/tmem/swap.sock",
    }
    assert blockdev["reconnect-delay"] == 45 and blockdev["discard"] == "unmap"
    assert args[3] == (
        f"virtio-blk-pci,drive={domain.SWAP_NODE},id=tmemswap0,serial=tmem-swap,bus=pcie.0,addr=0x10"
    )
    address = one(root, "devices/disk/address")  # the root disk is probed first: it stays vda
    assert (address.get("bus"), address.get("slot")) == ("0x00", "0x0e")
    assert not parse(guest()).findall(f"{{{domain.QEMU_NS}}}commandline")
    assert not parse(guest()).findall("devices/disk/address")
    with pytest.raises(ValueError, match="uuid"):
        guest(swap_socket=Path("/run/tmem/swap.sock"))


def test_host_agent_finds_the_tmem_socket_in_the_xml() -> None:
    assert virt.tmem_socket(domain_xml(guest(), "qemu")) == "/run/tmem/guests/g1.sock"


def test_balloon_with_stats_period_rng_and_no_network() -> None:
    devices = one(parse(guest()), "devices")
    balloon = one(devices, "memballoon")
    assert balloon.get("model") == "virtio"
    assert one(balloon, "stats").get("period") == "2"
    assert one(devices, "rng").get("model") == "virtio"
    assert devices.find("interface") is None and devices.find("graphics") is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"name": "bad/name"}, "guest name"),
        ({"name": ""}, "guest name"),
        ({"memory_mib": 0}, "positive"),
        ({"vcpus": 0}, "positive"),
        ({"memory_mib": 1024, "max_memory_mib": 512}, "max memory"),
        ({"boot": "cdrom"}, "boot must be"),
        ({"kernel": None}, "needs a kernel"),
        ({"iotune": IOTune(read_iops_sec=0)}, "read_iops_sec"),
        ({"tcg_tb_cache_mib": 0}, "tcg_tb_cache_mib"),
        ({"disk_cache": "unsafe"}, "disk_cache"),
    ],
)
def test_bad_descriptions_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        guest(**overrides)


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu {flags} sse2\n\n")
    return p


@pytest.fixture
def kvm_device(tmp_path: Path) -> Path:
    """A stand-in for a usable /dev/kvm (readable and writable)."""
    p = tmp_path / "kvm"
    p.write_text("")
    return p


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(domain.VIRT_TYPE_ENV, raising=False)


def test_kvm_needs_the_device_and_vmx_or_svm(tmp_path: Path, kvm_device: Path) -> None:
    for flags in ("vmx", "svm"):
        assert detect_virt_type(kvm_device=kvm_device, cpuinfo=cpuinfo(tmp_path, flags)) == "kvm"
    # /dev/kvm without hardware virtualization (a PVM host): TCG.
    assert detect_virt_type(kvm_device=kvm_device, cpuinfo=cpuinfo(tmp_path, "lm")) == "qemu"
    # vmxon is not vmx.
    assert detect_virt_type(kvm_device=kvm_device, cpuinfo=cpuinfo(tmp_path, "vmxon")) == "qemu"
    missing = tmp_path / "no-kvm"
    assert detect_virt_type(kvm_device=missing, cpuinfo=cpuinfo(tmp_path, "vmx")) == "qemu"
    assert detect_virt_type(kvm_device=kvm_device, cpuinfo=tmp_path / "no-cpuinfo") == "qemu"


def test_unusable_kvm_device_means_tcg(tmp_path: Path, kvm_device: Path) -> None:
    """A device this user cannot open read-write means TCG. Root can open anything, so the check
    runs in a child that has dropped to nobody (as the QEMU user would see the device)."""
    for parent in (tmp_path, *tmp_path.parents[:2]):  # pytest's tmp dirs are root's alone
        parent.chmod(parent.stat().st_mode | 0o055)
    kvm_device.chmod(0o600)  # root's alone, like /dev/kvm without udev's rule
    info = cpuinfo(tmp_path, "vmx")
    info.chmod(0o644)
    code = (
        "import os\n"
        "from scripts.domain import detect_virt_type\n"  # before: python lives under /root
        "if os.geteuid() == 0:\n    os.setgid(65534); os.setuid(65534)\n"
        f"print(detect_virt_type(kvm_device={str(kvm_device)!r}, cpuinfo={str(info)!r}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "qemu", out.stderr


def test_override_argument_and_environment(
    tmp_path: Path, kvm_device: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmx = cpuinfo(tmp_path, "vmx")
    assert detect_virt_type("qemu", kvm_device=kvm_device, cpuinfo=vmx) == "qemu"
    assert detect_virt_type("kvm", kvm_device=tmp_path / "none", cpuinfo=vmx) == "kvm"
    monkeypatch.setenv(domain.VIRT_TYPE_ENV, "qemu")
    assert detect_virt_type(kvm_device=kvm_device, cpuinfo=vmx) == "qemu"
    assert detect_virt_type("kvm", kvm_device=kvm_device, cpuinfo=vmx) == "kvm"  # the argument wins
    with pytest.raises(ValueError, match="virt type"):
        detect_virt_type("xen")
