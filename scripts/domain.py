"""libvirt domain XML for a lab guest (the lab toolkit's; the product edits existing domains with
`hostagent.attach`): a pure function of a small guest description.

The guest boots the lab image's extracted kernel and initramfs (direct kernel boot) from a qcow2
overlay on the shared base image, and has the devices tmem needs and nothing else:

- the disk, virtio with ``cache='none'`` (the host page cache must not quietly serve as a second
  tmem), optionally throttled with ``<iotune>`` (read/write IOPS and bytes/s, as clouds do);
- a serial console (``console=ttyS0``) logged to a file by virtlogd;
- the qemu-guest-agent channel (``org.qemu.guest_agent.0``: libvirt picks the socket);
- the tmem channel (``org.tmem.0``): QEMU listens on a unix socket (``<source mode='bind'>``) and
  the host agent connects to it (see `hostagent.virt`);
- a virtio balloon with a 2 s stats period (stats are empty until a period is set);
- a virtio RNG, so early-boot ``getrandom()`` does not wait for entropy; no network, no USB;
- optionally the swap device (`swap_blockdev`): a virtio disk served by the host agent over NBD;
- under TCG, a bounded translation cache (``<tcg><tb-cache>``; QEMU's default is 1 GiB a guest).

``<memory>`` is the ceiling the balloon may give back (``max_memory_mib``), ``<currentMemory>``
the size the guest starts at (``memory_mib``). The domain ``type`` is ``kvm`` where hardware
virtualization works and ``qemu`` (the TCG emulator) elsewhere: see `detect_virt_type`.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from guestagent.protocol.wire import PORT_NAME

VirtType = Literal["kvm", "qemu"]
Boot = Literal["kernel", "disk"]
DiskCache = Literal["none", "writeback"]

TMEM_CHANNEL = PORT_NAME
QEMU_GA_CHANNEL = "org.qemu.guest_agent.0"
DEFAULT_CMDLINE = "root=/dev/vda rw console=ttyS0"
VIRT_TYPE_ENV = "TMEM_VIRT_TYPE"
# QEMU's TCG translation cache defaults to 1 GiB per guest, and a booted guest already has ~370 MiB
# of it resident: bounded, so that emulated guests leave the host's memory to tmem.
TCG_TB_CACHE_MIB = 256
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"  # <qemu:commandline>
SWAP_NODE = "tmemswap"
SWAP_SERIAL = "tmem-swap"  # the guest sees /dev/disk/by-id/virtio-tmem-swap
# An integrated endpoint on q35's root bus, in a slot libvirt does not use: QEMU creates command-line
# devices before libvirt's own, so one left to pick a slot takes the one libvirt gave a root port.
SWAP_PCI_SLOT = "0x10"
# With a swap disk, the root disk is an integrated endpoint too, in a lower slot: the guest kernel
# probes bus 0 in slot order before the buses behind root ports, so the root disk stays vda.
ROOT_DISK_PCI_SLOT = "0x0e"

ET.register_namespace("qemu", QEMU_NS)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


@dataclass(frozen=True, slots=True)
class IOTune:
    """Disk limits; None is unlimited. Maps onto libvirt's ``<iotune>`` children."""

    read_iops_sec: int | None = None
    write_iops_sec: int | None = None
    read_bytes_sec: int | None = None
    write_bytes_sec: int | None = None

    def limits(self) -> dict[str, int]:
        """The limits that are set, by libvirt element name."""
        found = {
            "read_bytes_sec": self.read_bytes_sec,
            "write_bytes_sec": self.write_bytes_sec,
            "read_iops_sec": self.read_iops_sec,
            "write_iops_sec": self.write_iops_sec,
        }
        return {k: v for k, v in found.items() if v is not None}


@dataclass(frozen=True, slots=True)
class Guest:
    """One lab guest: its size, its disk (an overlay on the lab image) and where its sockets go.

    ``boot='kernel'`` boots ``kernel``/``initrd`` with ``cmdline`` (the lab image has no boot
    loader); ``boot='disk'`` boots from the disk's own boot loader.
    """

    name: str
    memory_mib: int
    max_memory_mib: int
    vcpus: int
    disk: Path
    tmem_socket: Path
    console_log: Path
    boot: Boot = "kernel"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = DEFAULT_CMDLINE
    iotune: IOTune | None = None
    tcg_tb_cache_mib: int | None = TCG_TB_CACHE_MIB
    # 'none' (O_DIRECT: the host page cache stays out); 'writeback' lets it cache the disk, as a
    # KVM user might pick instead of tmem (scripts/bench seed's host_cache configuration)
    disk_cache: DiskCache = "none"
    uuid: str | None = None  # the domain's UUID (libvirt makes one up if None)
    # The host agent's swap-device socket: a virtio disk (serial SWAP_SERIAL) served over NBD with
    # the domain UUID as export name (docs/preswap-device.md); needs `uuid`.
    swap_socket: Path | None = None
    swap_reconnect_delay: int = 60  # seconds QEMU's NBD client waits for a restarted host agent

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"guest name {self.name!r}: letters, digits and _.+- only")
        if self.memory_mib <= 0 or self.vcpus <= 0:
            raise ValueError(f"guest {self.name}: memory and vCPUs must be positive")
        if self.max_memory_mib < self.memory_mib:
            raise ValueError(
                f"guest {self.name}: max memory {self.max_memory_mib} MiB < memory {self.memory_mib} MiB"
            )
        if self.boot not in ("kernel", "disk"):
            raise ValueError(f"guest {self.name}: boot must be 'kernel' or 'disk', not {self.boot!r}")
        if self.boot == "kernel" and self.kernel is None:
            raise ValueError(f"guest {self.name}: boot='kernel' needs a kernel")
        if self.tcg_tb_cache_mib is not None and self.tcg_tb_cache_mib <= 0:
            raise ValueError(f"guest {self.name}: tcg_tb_cache_mib must be positive")
        if self.disk_cache not in ("none", "writeback"):
            raise ValueError(
                f"guest {self.name}: disk_cache must be 'none' or 'writeback', not {self.disk_cache!r}"
            )
        if self.swap_socket is not None and self.uuid is None:
            raise ValueError(f"guest {self.name}: a swap device needs the domain's uuid")
        if self.iotune is not None:
            for key, value in self.iotune.limits().items():
                if value <= 0:
                    raise ValueError(f"guest {self.name}: iotune {key} must be positive")


def detect_virt_type(
    override: str | None = None,
    *,
    kvm_device: str | os.PathLike[str] = "/dev/kvm",
    cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo",
) -> VirtType:
    """``kvm`` if /dev/kvm is usable and the CPU has vmx or svm, else ``qemu`` (TCG).

    Both are needed: some hosts have /dev/kvm without hardware virtualization (a PVM host only
    runs specially built guest kernels; plain guests fail there). ``override`` (or the
    TMEM_VIRT_TYPE environment variable when override is None) forces the answer.
    """
    forced = override if override is not None else os.environ.get(VIRT_TYPE_ENV) or None
    if forced is not None:
        if forced not in ("kvm", "qemu"):
            raise ValueError(f"virt type must be 'kvm' or 'qemu', not {forced!r}")
        return "kvm" if forced == "kvm" else "qemu"
    if not os.access(kvm_device, os.R_OK | os.W_OK):
        return "qemu"
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags") and {"vmx", "svm"} & set(line.split(":", 1)[-1].split()):
                    return "kvm"
    except OSError:
        pass
    return "qemu"


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = text
    return element


def domain_xml(guest: Guest, virt_type: VirtType, *, machine: str = "q35") -> str:
    """The libvirt domain XML (a string for ``virsh define`` / ``defineXML``)."""
    domain = ET.Element("domain", type=virt_type)
    _sub(domain, "name", guest.name)
    if guest.uuid is not None:
        _sub(domain, "uuid", guest.uuid)
    _sub(domain, "memory", str(guest.max_memory_mib * 1024), unit="KiB")
    _sub(domain, "currentMemory", str(guest.memory_mib * 1024), unit="KiB")
    _sub(domain, "vcpu", str(guest.vcpus), placement="static")

    os_ = _sub(domain, "os")
    _sub(os_, "type", "hvm", arch="x86_64", machine=machine)
    if guest.boot == "kernel":
        assert guest.kernel is not None
        _sub(os_, "kernel", str(guest.kernel))
        if guest.initrd is not None:
            _sub(os_, "initrd", str(guest.initrd))
        _sub(os_, "cmdline", guest.cmdline)
    else:
        _sub(os_, "boot", dev="hd")

    features = _sub(domain, "features")
    _sub(features, "acpi")
    _sub(features, "apic")
    if virt_type == "qemu" and guest.tcg_tb_cache_mib is not None:
        tcg = _sub(features, "tcg")
        _sub(tcg, "tb-cache", str(guest.tcg_tb_cache_mib), unit="MiB")
    if virt_type == "kvm":
        _sub(domain, "cpu", mode="host-passthrough", check="none", migratable="on")
    _sub(domain, "clock", offset="utc")
    _sub(domain, "on_poweroff", "destroy")
    _sub(domain, "on_reboot", "restart")
    _sub(domain, "on_crash", "destroy")

    devices = _sub(domain, "devices")
    disk = _sub(devices, "disk", type="file", device="disk")
    if guest.disk_cache == "none":
        _sub(disk, "driver", name="qemu", type="qcow2", cache="none", io="native")
    else:  # io='native' needs O_DIRECT: through the host page cache, QEMU's thread pool does the IO
        _sub(disk, "driver", name="qemu", type="qcow2", cache=guest.disk_cache, io="threads")
    _sub(disk, "source", file=str(guest.disk))
    _sub(disk, "target", dev="vda", bus="virtio")
    if guest.swap_socket is not None:  # probed before the swap disk (slot 0x10): it stays vda
        _sub(
            disk, "address", type="pci", domain="0x0000", bus="0x00", slot=ROOT_DISK_PCI_SLOT, function="0x0"
        )
    if guest.iotune is not None and guest.iotune.limits():
        iotune = _sub(disk, "iotune")
        for key, value in guest.iotune.limits().items():
            _sub(iotune, key, str(value))

    _sub(devices, "controller", type="usb", model="none")
    serial = _sub(devices, "serial", type="pty")
    _sub(serial, "log", file=str(guest.console_log), append="off")
    _sub(serial, "target", port="0")
    console = _sub(devices, "console", type="pty")
    _sub(console, "target", type="serial", port="0")

    qga = _sub(devices, "channel", type="unix")
    _sub(qga, "target", type="virtio", name=QEMU_GA_CHANNEL)
    tmem = _sub(devices, "channel", type="unix")
    _sub(tmem, "source", mode="bind", path=str(guest.tmem_socket))
    _sub(tmem, "target", type="virtio", name=TMEM_CHANNEL)

    balloon = _sub(devices, "memballoon", model="virtio")
    _sub(balloon, "stats", period="2")
    rng = _sub(devices, "rng", model="virtio")
    _sub(rng, "backend", "/dev/urandom", model="random")

    if guest.swap_socket is not None:
        _swap_device(domain, guest)
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode") + "\n"


def swap_blockdev(socket: Path, export: str, reconnect_delay: int) -> dict[str, object]:
    """QEMU's -blockdev for the swap device: NBD over the host agent's unix socket. Given on QEMU's
    command line because libvirt 9.0's <disk type='network'> cannot set reconnect-delay (9.2 can)
    nor open-timeout: with both, a restarted host agent makes the guest's swap I/O wait, not fail."""
    return {
        "driver": "nbd",
        "node-name": SWAP_NODE,
        "export": export,
        "server": {"type": "unix", "path": str(socket)},
        "reconnect-delay": reconnect_delay,
        "open-timeout": reconnect_delay,
        "discard": "unmap",
        "cache": {"direct": False, "no-flush": False},
    }


def _swap_device(domain: ET.Element, guest: Guest) -> None:
    assert guest.swap_socket is not None and guest.uuid is not None
    blockdev = swap_blockdev(guest.swap_socket, guest.uuid, guest.swap_reconnect_delay)
    cmdline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    for arg in (
        "-blockdev",
        json.dumps(blockdev, separators=(",", ":")),
        "-device",
        f"virtio-blk-pci,drive={SWAP_NODE},id=tmemswap0,serial={SWAP_SERIAL},bus=pcie.0,addr={SWAP_PCI_SLOT}",
    ):
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
