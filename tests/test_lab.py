"""The KVM lab, for real: two guests booted by libvirt (TCG here, KVM where it works), tmem over
their real virtio-serial ports, commands run inside them through qemu-guest-agent.

No skips: if libvirt or QEMU cannot start the guests, these tests fail, loudly. One lab is shared
by the whole module (booting under TCG takes ~40 s); the tests run in file order and the last one
destroys a guest.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import control
from scripts import lab
from scripts.guest import PYTHON, Guest
from scripts.wait import wait_until

HOLD = (Path(__file__).parent / "guest" / "hold_persistent.py").read_bytes()
G1, G2 = Guest("tmem-1"), Guest("tmem-2")


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()  # leftovers of an interrupted run
    with lab.lab_running(lab.default_lab(2)) as info:
        yield info


def spawn_hold(g: Guest, n: int) -> int:
    """Start hold_persistent.py in the guest on the raw port (the daemon is stopped first)."""
    g.stop_agent()
    g.run("rm", "-f", "/tmp/hold.progress", "/tmp/hold.go")
    return g.spawn(*PYTHON, "-", str(n), "/tmp/hold.progress", "/tmp/hold.go", stdin=HOLD)


def both_connected() -> bool:
    return G1.connected() and G2.connected()


# -- the tests, in order --------------------------------------------------------------------------


def test_both_guests_shook_hands_and_report(running: dict[str, Any]) -> None:
    assert set(running["handshake_seconds"]) == {"tmem-1", "tmem-2"}
    for guest in (G1, G2):
        g = guest.host_stats()
        assert g["connected"] and g["domain"] is not None
        assert g["report"]["values"]["committed_as_kib"] > 0
        assert g["domain"]["max_kib"] == 1024 * 1024


def test_pages_over_the_real_port_in_each_guest(running: dict[str, Any]) -> None:
    for guest in (G1, G2):
        before = guest.host_stats()
        result = guest.agent_check()
        after = guest.host_stats()
        for kind in ("ephemeral", "persistent"):
            assert after[kind]["puts"] > before[kind]["puts"], (kind, result)
            assert after[kind]["gets"] > before[kind]["gets"], (kind, result)


def test_garbage_on_a_channel_closes_only_that_guest(running: dict[str, Any]) -> None:
    log = lab.STATE / "hostagent.log"
    mark = log.stat().st_size
    G1.stop_agent()
    G1.run(
        "python3",
        "-c",
        "import os; from pathlib import Path; import glob\n"
        "port = [p for p in glob.glob('/sys/class/virtio-ports/*') "
        "if Path(p, 'name').read_text().strip() == 'org.tmem.0'][0]\n"
        "fd = os.open('/dev/' + os.path.basename(port), os.O_WRONLY)\n"
        "os.write(fd, b'this is not a tmem frame' * 8)\n",
    )
    wait_until(lambda: "closing channel" in log.read_text()[mark:], 30, "the host to close tmem-1", 0.2)
    assert "bad magic" in log.read_text()[mark:] or "magic" in log.read_text()[mark:]
    G2.agent_check()  # the other guest keeps working throughout
    G1.start_agent()
    G1.wait_until(G1.connected, 60, "to reconnect")
    G1.agent_check()


def test_guest_agent_started_before_the_host_agent(running: dict[str, Any]) -> None:
    lab.stop_hostagent()
    G1.restart_agent()
    time.sleep(3)
    lab.start_hostagent(lab.default_lab(2))
    took = wait_until(both_connected, 60, "both guests", 0.2)
    print(f"both guests connected {took:.1f} s after the host agent started")
    G1.agent_check()


def test_sigkill_of_the_host_agent_keeps_persistent_pages(running: dict[str, Any]) -> None:
    n = 300
    pid = spawn_hold(G1, n)
    G1.wait_until(lambda: "stored" in _progress(G1), 180, "to store its pages")
    assert _progress(G1).split() == ["stored", str(n)]
    assert G1.host_stats()["persistent"]["pages"] >= n
    os.kill(int((lab.STATE / "hostagent.pid").read_text()), signal.SIGKILL)
    (lab.STATE / "hostagent.pid").unlink()
    time.sleep(1)
    lab.start_hostagent(lab.default_lab(2))
    wait_until(both_connected, 60, "guests to reconnect", 0.2)
    assert G1.host_stats()["persistent"]["pages"] >= n  # rebuilt from the arena
    G1.run("touch", "/tmp/hold.go")
    rc, out, err = G1.wait(pid, timeout=180)
    assert rc == 0 and f"verified {n} of {n}" in out, (rc, out, err)
    G1.start_agent()
    G2.agent_check()


def test_the_host_agent_survives_a_libvirtd_restart(running: dict[str, Any]) -> None:
    pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: lab.process_gone(pid), 60, "libvirtd to exit", 0.2)
    wait_until(
        lambda: not lab.stats()["agent"]["libvirt"]["connected"],
        30,
        "the host agent to notice libvirtd is gone",
        0.2,
    )
    # Channels are sockets to QEMU, not to libvirtd: the guests keep reporting meanwhile.
    time.sleep(5)
    for guest in (G1, G2):
        g = guest.host_stats()
        assert g["connected"] and g["report"]["age"] < 5, g
    lab.ensure_daemons()
    wait_until(
        lambda: lab.stats()["agent"]["libvirt"]["connected"],
        30,
        "the host agent to reconnect to libvirtd",
        0.2,
    )
    assert both_connected()
    assert G1.host_stats()["domain"] is not None  # figures from libvirt again
    G1.agent_check()


def test_a_guest_destroyed_mid_request_frees_its_pools_within_2s(running: dict[str, Any]) -> None:
    spawn_hold(G2, 10**9)  # puts persistent pages until the domain dies
    G2.wait_until(lambda: G2.host_stats()["persistent"]["pages"] > 50, 120, "to hold pages")
    dom = G2.domain()
    start = time.monotonic()
    dom.destroy()
    destroyed = time.monotonic() - start  # libvirt returns once QEMU is gone
    wait_until(
        lambda: not any(g.get("name") == "tmem-2" for g in lab.stats()["guests"].values()),
        2.0 - destroyed,
        "tmem-2's pools to be freed",
    )
    took = time.monotonic() - start
    pools = control.request(lab.CONTROL, {"cmd": "pools"})
    assert all(p["owner"] != dom.UUIDString() for p in pools)
    print(f"tmem-2's pools freed {took:.2f} s after destroy (destroy itself took {destroyed:.2f} s)")
    G1.agent_check()  # the survivor is unaffected


def _progress(g: Guest) -> str:
    rc, out, _ = g.exec("cat", "/tmp/hold.progress", timeout=30)
    return out if rc == 0 else ""
