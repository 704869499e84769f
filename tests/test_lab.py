"""The KVM lab, for real: two guests booted by libvirt (TCG here, KVM where it works), tmem over
their real virtio-serial ports, commands run inside them through qemu-guest-agent.

No skips: if libvirt or QEMU cannot start the guests, these tests fail, loudly. One lab is shared
by the whole module (booting under TCG takes ~40 s); the tests run in file order and the last one
destroys a guest.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import lab  # noqa: E402

HOLD = (Path(__file__).parent / "guest" / "hold_persistent.py").read_bytes()
GUESTAGENT = "/usr/local/bin/guestagent"


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()  # leftovers of an interrupted run
    with lab.lab_running(lab.default_lab(2)) as info:
        yield info


def domain(name: str) -> Any:
    return lab.connect().lookupByName(name)


def guest(name: str) -> dict[str, Any]:
    found = [g for g in lab.stats()["guests"].values() if g.get("name") == name]
    assert found, f"{name} is not known to the host agent"
    result: dict[str, Any] = found[0]
    return result


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - start


def connected(name: str) -> bool:
    try:
        g = guest(name)
    except (AssertionError, OSError):
        return False
    return bool(g["connected"])


def run(name: str, *argv: str, timeout: float = 120, stdin: bytes | None = None) -> str:
    rc, out, err = lab.guest_exec(domain(name), list(argv), timeout=timeout, stdin=stdin)
    assert rc == 0, f"{name}: {' '.join(argv)} exited {rc}: {out}{err}"
    return out


def check(name: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(run(name, GUESTAGENT, "check"))
    assert result["ok"] is True, result
    return result


def spawn_hold(name: str, n: int) -> int:
    """Start hold_persistent.py in the guest on the raw port (the daemon is stopped first)."""
    run(name, "systemctl", "stop", "tmem-guestagent")
    run(name, "rm", "-f", "/tmp/hold.progress", "/tmp/hold.go")
    pid: int = lab.guest_spawn(domain(name), ["python3", "-", str(n), "/tmp/hold.progress",
                                              "/tmp/hold.go"], stdin=HOLD)
    return pid


# -- the tests, in order --------------------------------------------------------------------------


def test_both_guests_shook_hands_and_report(running: dict[str, Any]) -> None:
    assert set(running["handshake_seconds"]) == {"tmem-1", "tmem-2"}
    for name in ("tmem-1", "tmem-2"):
        g = guest(name)
        assert g["connected"] and g["domain"] is not None
        assert g["report"]["values"]["committed_as_kib"] > 0
        assert g["domain"]["max_kib"] == 1024 * 1024


def test_pages_over_the_real_port_in_each_guest(running: dict[str, Any]) -> None:
    for name in ("tmem-1", "tmem-2"):
        before = guest(name)
        result = check(name)
        after = guest(name)
        for kind in ("ephemeral", "persistent"):
            assert after[kind]["puts"] > before[kind]["puts"], (kind, result)
            assert after[kind]["gets"] > before[kind]["gets"], (kind, result)


def test_garbage_on_a_channel_closes_only_that_guest(running: dict[str, Any]) -> None:
    log = lab.STATE / "hostagent.log"
    mark = log.stat().st_size
    run("tmem-1", "systemctl", "stop", "tmem-guestagent")
    run("tmem-1", "python3", "-c",
        "import os; from pathlib import Path; import glob\n"
        "port = [p for p in glob.glob('/sys/class/virtio-ports/*') "
        "if Path(p, 'name').read_text().strip() == 'org.tmem.0'][0]\n"
        "fd = os.open('/dev/' + os.path.basename(port), os.O_WRONLY)\n"
        "os.write(fd, b'this is not a tmem frame' * 8)\n")
    wait_for(lambda: "closing channel" in log.read_text()[mark:], 30, "the host to close tmem-1")
    assert "bad magic" in log.read_text()[mark:] or "magic" in log.read_text()[mark:]
    check("tmem-2")  # the other guest keeps working throughout
    run("tmem-1", "systemctl", "start", "tmem-guestagent")
    wait_for(lambda: connected("tmem-1"), 60, "tmem-1 to reconnect")
    check("tmem-1")


def test_guest_agent_started_before_the_host_agent(running: dict[str, Any]) -> None:
    lab.stop_hostagent()
    run("tmem-1", "systemctl", "restart", "tmem-guestagent")
    time.sleep(3)
    lab.start_hostagent(lab.default_lab(2))
    took = wait_for(lambda: connected("tmem-1") and connected("tmem-2"), 60, "both guests")
    print(f"both guests connected {took:.1f} s after the host agent started")
    check("tmem-1")


def test_sigkill_of_the_host_agent_keeps_persistent_pages(running: dict[str, Any]) -> None:
    n = 300
    pid = spawn_hold("tmem-1", n)
    wait_for(lambda: "stored" in run("tmem-1", "cat", "/tmp/hold.progress") if _exists(
        "tmem-1", "/tmp/hold.progress") else False, 180, "the guest to store its pages")
    assert run("tmem-1", "cat", "/tmp/hold.progress").split() == ["stored", str(n)]
    assert guest("tmem-1")["persistent"]["pages"] >= n
    os.kill(int((lab.STATE / "hostagent.pid").read_text()), signal.SIGKILL)
    (lab.STATE / "hostagent.pid").unlink()
    time.sleep(1)
    lab.start_hostagent(lab.default_lab(2))
    wait_for(lambda: connected("tmem-1") and connected("tmem-2"), 60, "guests to reconnect")
    assert guest("tmem-1")["persistent"]["pages"] >= n  # rebuilt from the arena
    run("tmem-1", "touch", "/tmp/hold.go")
    rc, out, err = lab.guest_wait(domain("tmem-1"), pid, timeout=180)
    assert rc == 0 and f"verified {n} of {n}" in out, (rc, out, err)
    run("tmem-1", "systemctl", "start", "tmem-guestagent")
    check("tmem-2")


def test_the_host_agent_survives_a_libvirtd_restart(running: dict[str, Any]) -> None:
    pid = int(Path("/run/libvirtd.pid").read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: _gone(pid), 60, "libvirtd to exit")
    wait_for(lambda: not lab.stats()["agent"]["libvirt"]["connected"], 30,
             "the host agent to notice libvirtd is gone")
    # Channels are sockets to QEMU, not to libvirtd: the guests keep reporting meanwhile.
    time.sleep(5)
    for name in ("tmem-1", "tmem-2"):
        g = guest(name)
        assert g["connected"] and g["report"]["age"] < 5, g
    lab.ensure_daemons()
    wait_for(lambda: lab.stats()["agent"]["libvirt"]["connected"], 30,
             "the host agent to reconnect to libvirtd")
    assert connected("tmem-1") and connected("tmem-2")
    assert guest("tmem-1")["domain"] is not None  # figures from libvirt again
    check("tmem-1")


def test_a_guest_destroyed_mid_request_frees_its_pools_within_2s(running: dict[str, Any]) -> None:
    spawn_hold("tmem-2", 10**9)  # puts persistent pages until the domain dies
    wait_for(lambda: guest("tmem-2")["persistent"]["pages"] > 50, 120, "tmem-2 to hold pages")
    dom = domain("tmem-2")
    start = time.monotonic()
    dom.destroy()
    destroyed = time.monotonic() - start  # libvirt returns once QEMU is gone
    wait_for(lambda: not any(g.get("name") == "tmem-2" for g in lab.stats()["guests"].values()),
             2.0 - destroyed, "tmem-2's pools to be freed")
    took = time.monotonic() - start
    pools = lab.control.request(lab.CONTROL, {"cmd": "pools"})
    assert all(p["owner"] != dom.UUIDString() for p in pools)
    print(f"tmem-2's pools freed {took:.2f} s after destroy (destroy itself took {destroyed:.2f} s)")
    check("tmem-1")  # the survivor is unaffected


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: a container's init may never reap a daemon's corpse)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _exists(name: str, path: str) -> bool:
    rc, _, _ = lab.guest_exec(domain(name), ["test", "-e", path], timeout=30)
    return rc == 0
