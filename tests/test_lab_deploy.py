"""Deploying on a KVM host, for real (run under `flock /run/tmem-lab.lock`): the host agent
installed as a service on the real paths (no systemd here: a daemon with a pid file), a domain
defined persistently with `virsh define` (not created by the lab) attached live, its guest agent
installed from the .deb through the QEMU guest agent, then seen in `hostagent stats` and on
/metrics; detach; uninstall leaves nothing.

The tests run in file order and share one domain and one installed agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hostagent import attach, install
from scripts import build_image, lab
from scripts.domain import Guest, detect_virt_type, domain_xml
from scripts.guest import Guest as LabGuest
from scripts.wait import wait_until

NAME = "tmem-deploy"
CONTROL = "/run/tmem/control.sock"
ARENA = "/dev/shm/tmem/arena"


def hostagent(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "hostagent", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def virsh(*args: str) -> str:
    res = subprocess.run(
        ["virsh", "-c", lab.URI, *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, f"virsh {' '.join(args)}: {res.stderr}"
    return res.stdout


def stats() -> dict[str, Any]:
    res = hostagent("stats", "--json")
    assert res.returncode == 0, res.stderr
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def ours(s: dict[str, Any]) -> dict[str, Any] | None:
    return next((g for g in s["guests"].values() if g.get("name") == NAME), None)


def channels(xml: str) -> list[ET.Element]:
    return [
        c
        for c in ET.fromstring(xml).iterfind("./devices/channel")
        if (t := c.find("target")) is not None and t.get("name") == "org.tmem.0"
    ]


def run(*argv: str, timeout: float = 120) -> str:
    return LabGuest(NAME).run(*argv, timeout=timeout)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The host agent installed on the real paths, with [metrics] on; the lab image at hand."""
    lab.down()
    hostagent("uninstall")
    lab.STATE.mkdir(parents=True, exist_ok=True)
    lab.ensure_daemons()
    image = lab.ensure_image()
    cfg = tmp_path_factory.mktemp("deploy") / "hostagent.toml"
    cfg.write_text(
        "[pool]\nlimit_mib = 256\nhost_reserve_mib = 512\n"
        '[metrics]\nenabled = true\naddress = "127.0.0.1"\nport = 0\n'
        "[libvirt]\nretry_interval = 1.0\n"
    )
    res = hostagent("install", "--config", str(cfg), "--json")
    assert res.returncode == 0, res.stderr
    info = {"install": json.loads(res.stdout), "config": cfg, "image": image}
    try:
        yield info
    finally:
        with_dom = [d for d in lab.connect().listAllDomains(0) if d.name() == NAME]
        for d in with_dom:
            if d.isActive():
                d.destroy()
            d.undefine()
        hostagent("uninstall")
        lab.down()


def test_install_on_the_real_paths_is_idempotent(host: dict[str, Any]) -> None:
    first = host["install"]
    assert first["running"]["started"] and first["systemd"] is False
    pid = first["running"]["pid"]
    assert int(Path(install.PIDFILE).read_text()) == pid
    assert stats()["agent"]["pid"] == pid
    again = hostagent("install", "--config", str(host["config"]), "--json")
    assert again.returncode == 0, again.stderr
    r = json.loads(again.stdout)
    assert r["changed"] == [] and r["running"] == {**first["running"], "started": False}
    for p in (install.CONFIG, install.UNIT, install.LINK, install.WANTS, install.MANIFEST):
        assert os.path.lexists(p), p
    # a changed configuration is installed and the agent restarted on it; then back again
    other = host["config"].with_name("other.toml")
    other.write_text(host["config"].read_text().replace("limit_mib = 256", "limit_mib = 128"))
    r = json.loads(hostagent("install", "--config", str(other), "--json").stdout)
    assert r["changed"] == [install.CONFIG] and r["running"]["started"]
    assert r["running"]["pid"] != pid and lab.process_gone(pid)
    assert stats()["pool"]["limit_bytes"] == 128 << 20
    r = json.loads(hostagent("install", "--config", str(host["config"]), "--json").stdout)
    assert r["changed"] == [install.CONFIG] and stats()["pool"]["limit_bytes"] == 256 << 20
    host["install"] = r


def test_a_domain_defined_with_virsh_is_attached_live(host: dict[str, Any]) -> None:
    image = host["image"]
    for sub in ("disks", "console"):
        (lab.STATE / sub).mkdir(exist_ok=True)
    disk = build_image.create_overlay(image.base, lab.STATE / "disks" / f"{NAME}.qcow2", force=True)
    guest = Guest(
        name=NAME,
        memory_mib=512,
        max_memory_mib=768,
        vcpus=1,
        disk=disk,
        tmem_socket=lab.STATE / "unused.sock",
        console_log=lab.STATE / "console" / f"{NAME}.log",
        kernel=image.kernel,
        initrd=image.initrd,
    )
    # an operator's domain: the lab's devices, but no tmem channel
    xml = attach.without_devices(domain_xml(guest, detect_virt_type()), attach.devices())
    assert channels(xml) == []
    path = lab.STATE / f"{NAME}.xml"
    path.write_text(xml)
    virsh("define", str(path))
    virsh("start", NAME)
    dom = lab.connect().lookupByName(NAME)
    assert dom.isPersistent()
    lab.wait_guest_agent(dom)
    assert ours(stats()) is None  # no channel: the agent does not know it

    res = hostagent("attach", NAME, "--json")
    assert res.returncode == 0, res.stderr
    change = json.loads(res.stdout)
    assert change["changed"] and change["running"] and change["persistent"]
    assert change["config"] == ["channel org.tmem.0"] and change["live"] == ["channel org.tmem.0"]
    live = channels(dom.XMLDesc(0))
    assert len(live) == 1 and live[0].find("source").get("path"), ET.tostring(live[0])  # type: ignore[union-attr]
    assert len(channels(virsh("dumpxml", "--inactive", NAME))) == 1
    # the agent picked it up from libvirt's device-added event
    wait_until(lambda: ours(stats()) is not None, 30, "the host agent to attach the domain")

    def devices() -> tuple[str, list[bytes]]:  # the live XML's balloon figures move: not compared
        live = ET.fromstring(dom.XMLDesc(0)).iterfind("./devices/*")
        return virsh("dumpxml", "--inactive", NAME), [ET.tostring(d) for d in live]

    before = devices()
    res = hostagent("attach", NAME)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stdout + res.stderr
    assert devices() == before


def test_guest_agent_installed_through_the_qemu_guest_agent(host: dict[str, Any]) -> None:
    # the lab image has the guest agent baked in: remove it, so what runs is what we install
    run("systemctl", "disable", "--now", "tmem-guestagent")
    run(
        "rm",
        "-rf",
        "/opt/tmem",
        "/usr/local/bin/guestagent",
        "/etc/systemd/system/tmem-guestagent.service",
        "/etc/tmem/guestagent.toml",
    )
    run("systemctl", "daemon-reload")
    assert (
        "inactive"
        in lab.guest_exec(lab.connect().lookupByName(NAME), ["systemctl", "is-active", "tmem-guestagent"])[1]
    )
    res = hostagent("guest-install", NAME)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["service"] == "active" and r["version"].startswith("0.1.0+"), r
    assert run("dpkg-query", "-W", "-f=${Status}", "tmem-guestagent") == "install ok installed"
    assert run("systemctl", "is-enabled", "tmem-guestagent").strip() == "enabled"
    pid = run("systemctl", "show", "-p", "MainPID", "--value", "tmem-guestagent").strip()
    cmdline = run("cat", f"/proc/{pid}/cmdline").split("\0")
    assert cmdline[:4] == ["python3", "-m", "guestagent", "run"], cmdline
    where = run("python3", "-c", "import guestagent; print(guestagent.__file__)").strip()
    assert where == "/usr/lib/python3/dist-packages/guestagent/__init__.py"


def test_the_domain_shows_in_stats_and_on_metrics(host: dict[str, Any]) -> None:
    wait_until(
        lambda: (g := ours(stats())) is not None and g["connected"] and g["report"],
        120,
        "the installed guest agent to connect and report",
    )
    out = run("guestagent", "check")
    assert json.loads(out)["ok"] is True
    text = hostagent("stats").stdout
    assert NAME in text
    compact = hostagent("stats", "--compact").stdout
    assert any(line.split()[1:3] == [NAME, "up"] for line in compact.splitlines()), compact
    s = stats()
    g = ours(s)
    assert g is not None
    uuid = lab.connect().lookupByName(NAME).UUIDString()
    m = s["agent"]["metrics"]
    with urllib.request.urlopen(f"http://{m['address']}:{m['port']}/metrics", timeout=30) as resp:
        samples = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for f in text_string_to_metric_families(resp.read().decode())
            for x in f.samples
        }
    after = ours(stats())
    assert after is not None
    labels = (("domain", NAME), ("uuid", uuid))
    assert samples[("tmem_guest_connected", labels)] == 1
    for kind in ("ephemeral", "persistent"):
        kl = (("domain", NAME), ("kind", kind), ("uuid", uuid))
        # guestagent check is done; the guest's own traffic is its reports only (no pages)
        assert samples[("tmem_guest_puts_total", kl)] == after[kind]["puts"] > 0
        assert samples[("tmem_guest_gets_total", kl)] == after[kind]["gets"]
    assert samples[("tmem_domain_memory_max_bytes", labels)] == 768 * 1024 * 1024
    assert samples[("tmem_guest_committed_as_bytes", labels)] > 0


def test_detach_removes_it_cleanly(host: dict[str, Any]) -> None:
    dom = lab.connect().lookupByName(NAME)
    res = hostagent("detach", NAME, "--json")
    assert res.returncode == 0, res.stderr
    change = json.loads(res.stdout)
    assert change["live"] == ["channel org.tmem.0"] and change["config"] == ["channel org.tmem.0"]
    wait_until(lambda: channels(dom.XMLDesc(0)) == [], 30, "QEMU to unplug the port")
    assert channels(virsh("dumpxml", "--inactive", NAME)) == []
    wait_until(lambda: ours(stats()) is None, 30, "the host agent to detach the domain")
    m = stats()["agent"]["metrics"]
    with urllib.request.urlopen(f"http://{m['address']}:{m['port']}/metrics", timeout=30) as resp:
        assert f'domain="{NAME}"' not in resp.read().decode()
    res = hostagent("detach", NAME)
    assert res.returncode == 0 and "unchanged" in res.stdout, res.stdout + res.stderr
    assert dom.isActive()  # the domain itself runs on


def test_uninstall_leaves_no_unit_file_or_socket(host: dict[str, Any]) -> None:
    pid = host["install"]["running"]["pid"]
    res = hostagent("uninstall")
    assert res.returncode == 0, res.stderr
    assert lab.process_gone(pid)
    for p in (
        install.CONFIG,
        install.UNIT,
        install.WANTS,
        install.LINK,
        install.MANIFEST,
        install.PIDFILE,
        install.LOG,
        CONTROL,
        ARENA,
    ):
        assert not os.path.lexists(p), p
    for d in ("/etc/tmem", "/var/log/tmem", "/usr/local/sbin/hostagent"):
        assert not os.path.lexists(d) or (os.path.isdir(d) and os.listdir(d)), d
