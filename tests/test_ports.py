"""Finding the tmem virtio-serial port by name, in a fake sysfs and /dev tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from guestagent import ports
from guestagent.channel import resolve_channel_path


def fake_tree(tmp_path: Path, names: dict[str, str], devices: list[str]) -> tuple[str, str, str]:
    """sysfs entries vportNpM/name, device nodes (plain files will do for a lookup)."""
    sysfs, dev = tmp_path / "sys", tmp_path / "dev"
    sysfs.mkdir()
    dev.mkdir()
    for entry, name in names.items():
        (sysfs / entry).mkdir()
        (sysfs / entry / "name").write_text(name + "\n" if name else "")
    for device in devices:
        (dev / device).touch()
    return str(sysfs), str(dev), str(dev / "virtio-ports")


def test_find_port_by_sysfs_name(tmp_path: Path) -> None:
    sysfs, dev, by_name = fake_tree(
        tmp_path,
        {"vport0p0": "", "vport0p1": "org.qemu.guest_agent.0", "vport1p1": "org.tmem.0"},
        ["vport0p0", "vport0p1", "vport1p1"],
    )
    kw = {"sysfs_dir": sysfs, "dev_dir": dev, "by_name_dir": by_name}
    assert ports.find_port(**kw) == f"{dev}/vport1p1"
    assert ports.find_port("org.qemu.guest_agent.0", **kw) == f"{dev}/vport0p1"


def test_missing_port_is_a_clear_error(tmp_path: Path) -> None:
    sysfs, dev, by_name = fake_tree(tmp_path, {"vport0p1": "org.qemu.guest_agent.0"}, ["vport0p1"])
    with pytest.raises(ports.PortNotFound, match=r"no virtio-serial port named 'org\.tmem\.0'"):
        ports.find_port(sysfs_dir=sysfs, dev_dir=dev, by_name_dir=by_name)
    with pytest.raises(ports.PortNotFound):  # no sysfs at all
        ports.find_port(sysfs_dir=str(tmp_path / "nowhere"), dev_dir=dev, by_name_dir=by_name)
    with pytest.raises(ValueError):
        ports.find_port("a/b", sysfs_dir=sysfs, dev_dir=dev, by_name_dir=by_name)


def test_port_in_sysfs_without_its_device_node(tmp_path: Path) -> None:
    sysfs, dev, by_name = fake_tree(tmp_path, {"vport2p1": "org.tmem.0"}, [])
    with pytest.raises(ports.PortNotFound, match=r"vport2p1.*missing"):
        ports.find_port(sysfs_dir=sysfs, dev_dir=dev, by_name_dir=by_name)


def test_udev_symlink_when_sysfs_has_no_entry(tmp_path: Path) -> None:
    sysfs, dev, by_name = fake_tree(tmp_path, {}, ["vport3p1"])
    os.mkdir(by_name)
    os.symlink("../vport3p1", os.path.join(by_name, "org.tmem.0"))
    assert ports.find_port(sysfs_dir=sysfs, dev_dir=dev, by_name_dir=by_name) == f"{dev}/vport3p1"


def test_what_find_port_returns_is_a_virtio_channel() -> None:
    # the daemon hands find_port's /dev/vportNpM to the channel client: it must not read it as a socket
    assert resolve_channel_path("/dev/vport1p1") == ("virtio", "/dev/vport1p1")
