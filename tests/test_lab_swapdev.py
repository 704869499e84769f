"""The pool's swap device in a real lab guest (docs/preswap-device.md).

One guest of 256 MiB whose highest-priority swap is the host agent's device (NBD, 512 MiB) and whose
own swap file (/swapfile, 256 MiB) is behind it. An unmodified memory hog (scripts/swap_hog.c,
compiled in the guest) over twice the guest's memory, every page checked: the swap file gets no
page while the pool has room; with a quota smaller than the working set the excess goes to the
host's spill file and nothing is lost; the host agent SIGKILLed and restarted mid-swap loses nothing
(QEMU's NBD client waits and reconnects); virsh save / restore mid-swap keeps every page; a guest
a guest driven into OOM (an unmodified hog over memory + swap) has it killed by the OOM killer and
comes out whole, its swap path working; a guest destroyed mid-swap frees its pool pages within 2 s.
A lab of its own, torn down at the end.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hostagent import control
from scripts import lab
from scripts.guest import Guest
from scripts.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent

NAME = "tmem-1"
GUEST = Guest(NAME)
MEMORY_MIB = 256
SWAP_MIB = 512
HOG = "/root/swap_hog"
SPEC = lab.Lab(
    (lab.GuestSpec(name=NAME, memory_mib=MEMORY_MIB, max_memory_mib=MEMORY_MIB),), {"swap_mib": SWAP_MIB}
)


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()
    console = lab.STATE / "console" / f"{NAME}.log"
    try:
        info = lab.up(SPEC)
    except Exception:
        if console.exists():  # the next lab overwrites it: keep it with the test's output
            print(f"\n--- {console} ---\n{console.read_text(errors='replace')[-6000:]}")
        lab.down()
        raise
    try:
        GUEST.run(
            "sh", "-c", f"gcc -O2 -o {HOG} -x c -", stdin=(ROOT / "scripts" / "swap_hog.c").read_bytes()
        )
        wait_until(
            lambda: "/dev/vdb" in GUEST.run("cat", "/proc/swaps"),
            120,
            "the swap device to be swapped on",
            1.0,
        )
        yield info
    finally:
        lab.down()


def swaps() -> dict[str, dict[str, int]]:
    """/proc/swaps: name -> size, used (KiB), priority."""
    out = {}
    for line in GUEST.run("cat", "/proc/swaps").splitlines()[1:]:
        name, _, size, used, prio = line.split()
        out[name] = {"size": int(size), "used": int(used), "priority": int(prio)}
    return out


def vmstat(key: str) -> int:
    for line in GUEST.run("cat", "/proc/vmstat").splitlines():
        k, v = line.split()
        if k == key:
            return int(v)
    raise AssertionError(key)


def device() -> dict[str, Any]:
    dev = GUEST.host_stats()["swapdev"]
    assert dev is not None, "the host agent has no swap device for the guest"
    return dev  # type: ignore[no-any-return]


def hog(mib: int, ops: int, seed: int, timeout: float = 1800) -> dict[str, Any]:
    out = GUEST.run(HOG, str(mib), str(ops), str(seed), timeout=timeout)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def spawn_hog(mib: int, ops: int, seed: int) -> int:
    return lab.guest_spawn(GUEST.domain(), [HOG, str(mib), str(ops), str(seed)])


def hog_status(pid: int) -> dict[str, Any] | None:
    """The hog's result once it exited (qemu-guest-agent reports an exit once), else None."""
    st = lab.agent_command(GUEST.domain(), {"execute": "guest-exec-status", "arguments": {"pid": pid}})
    if not st.get("exited"):
        return None
    out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
    err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
    assert st.get("exitcode") == 0, f"swap_hog: {st}: {out}{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def wait_hog(pid: int, timeout: float = 1800) -> dict[str, Any]:
    rc, out, err = lab.guest_wait(GUEST.domain(), pid, timeout, "swap_hog")
    assert rc == 0, f"swap_hog exited {rc}: {out}{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def test_guestagent_stats_shows_the_device_counters(running: dict[str, Any]) -> None:
    """The guest agent asks the host over its channel (DEVICE_STATS) and shows the disk as the guest
    sees it beside that."""
    before = device()
    stats = json.loads(GUEST.run("guestagent", "stats"))
    after = device()
    dev = stats["swap_device"]
    assert dev["host_error"] is None, dev
    host = dev["host"]
    assert host["size_bytes"] == before["size_bytes"] == SWAP_MIB << 20
    for key in ("puts", "gets", "refusals", "trims"):  # counters only grow: read between two reads
        assert before[key] <= host[key] <= after[key], (key, before, host, after)
    view = dev["guest"]
    assert view["device"] == "/dev/vdb" and view["swap"]["priority"] == 100, view
    assert view["swap"]["size_kib"] > (SWAP_MIB - 1) * 1024
    assert view["block"]["read_ios"] + view["block"]["write_ios"] > 0
    print(f"\nguestagent stats swap_device: {dev}")


def test_device_is_the_first_swap_and_the_swap_file_gets_nothing(running: dict[str, Any]) -> None:
    s = swaps()
    assert s["/dev/vdb"]["priority"] > s["/swapfile"]["priority"], s
    before = device()
    pswpout = vmstat("pswpout")
    peak = 0
    pid = spawn_hog(2 * MEMORY_MIB, 20000, 1)
    deadline = time.monotonic() + 1800
    while True:
        peak = max(peak, device()["pool_pages"])
        result = hog_status(pid)
        if result is not None:
            break
        assert time.monotonic() < deadline, "the hog did not finish"
        assert swaps()["/swapfile"]["used"] == 0
        time.sleep(2)
    after = device()
    assert result["bad_pages"] == 0 and result["pages"] == 2 * MEMORY_MIB * 256
    assert swaps()["/swapfile"]["used"] == 0, "a page reached the guest's swap file"
    swapped = vmstat("pswpout") - pswpout
    assert swapped > MEMORY_MIB * 256 // 2, f"only {swapped} pages swapped out"
    assert after["puts"] - before["puts"] >= swapped * 0.9
    assert after["refusals"] == before["refusals"] and after["spill_writes"] == 0
    assert peak > MEMORY_MIB * 256 // 2, f"peak pool pages {peak}"
    print(f"\nhog {result}; pswpout {swapped}; device {after}; peak pool pages {peak}")


def test_quota_smaller_than_the_working_set_spills_and_loses_nothing(running: dict[str, Any]) -> None:
    control.request(lab.CONTROL, {"cmd": "set", "guest": NAME, "quota_mib": 32})
    try:
        before = device()
        result = hog(2 * MEMORY_MIB, 20000, 2)
        after = device()
    finally:
        control.request(lab.CONTROL, {"cmd": "set", "guest": NAME, "quota_mib": 256})
    assert result["bad_pages"] == 0
    assert after["refusals"] > before["refusals"] and after["spill_writes"] > before["spill_writes"]
    assert swaps()["/swapfile"]["used"] == 0
    print(f"\nhog {result}; device {after}")


def test_host_agent_sigkilled_mid_swap_loses_nothing(running: dict[str, Any]) -> None:
    start = device()["puts"]
    pid = spawn_hog(2 * MEMORY_MIB, 40000, 3)
    wait_until(lambda: device()["puts"] - start > 20000, 900, "the hog to be swapping", 1.0)
    agent = int((lab.STATE / "hostagent.pid").read_text())
    os.kill(agent, signal.SIGKILL)
    time.sleep(2.0)  # the guest's swap I/O waits meanwhile (QEMU's NBD reconnect-delay)
    lab.start_hostagent(SPEC)
    result = wait_hog(pid)
    assert result["bad_pages"] == 0
    assert "/dev/vdb" in swaps() and swaps()["/swapfile"]["used"] == 0
    print(f"\nhog {result}; device {device()}")


def test_save_and_restore_mid_swap_keeps_every_page(running: dict[str, Any]) -> None:
    start = device()["puts"]
    pid = spawn_hog(2 * MEMORY_MIB, 40000, 4)
    wait_until(lambda: device()["puts"] - start > 20000, 900, "the hog to be swapping", 1.0)
    in_pool = device()["pool_pages"]
    saved = lab.STATE / "tmem-1.save"
    dom = GUEST.domain()
    dom.save(str(saved))
    try:
        time.sleep(3.0)  # past the agent's handling of the stop event
        # a saved domain is detached (not in the guests table) but its pages stay in the pool
        kept = lab.stats()["pool"]["persistent_pages"]
        assert kept >= in_pool // 2, f"the saved guest's pages were freed ({kept} of {in_pool} left)"
        lab.connect().restore(str(saved))
    finally:
        saved.unlink(missing_ok=True)
    lab.wait_guest_agent(GUEST.domain())
    result = wait_hog(pid)
    assert result["bad_pages"] == 0
    print(f"\nhog {result}; device {device()}")


def exec_status(pid: int, deadline: float) -> dict[str, Any]:
    """guest-exec-status of `pid` once it exited. While the guest is out of memory qemu-guest-agent
    may miss the 10 s a command gets: those misses are counted and retried, up to `deadline`."""
    import libvirt

    misses = 0
    while True:
        assert time.monotonic() < deadline, f"pid {pid} still running ({misses} agent timeouts)"
        try:
            st: dict[str, Any] = lab.agent_command(
                GUEST.domain(), {"execute": "guest-exec-status", "arguments": {"pid": pid}}
            )
        except libvirt.libvirtError as err:
            assert "Invalid parameter" not in str(err), f"qemu-guest-agent forgot pid {pid}: restarted?"
            misses += 1
        else:
            if st.get("exited"):
                st["agent_misses"] = misses
                return st
        time.sleep(2)


def test_oom_does_not_deadlock_the_swap_path(running: dict[str, Any]) -> None:
    """A guest out of memory with the pool's device as its only swap: the OOM killer must end an
    unmodified hog larger than memory + swap, and the guest must come out of it whole.

    Why an earlier try lost qemu-guest-agent at the OOM: a command it runs lives in its unit's
    cgroup, and systemd stops a service one of whose processes the OOM killer took (OOMPolicy=stop,
    its default), so the agent went with the hog. Here the hog runs in a scope of its own
    (systemd-run --scope), is the OOM killer's first choice (oom_score_adj 1000) and the agent never
    is (-1000); agent timeouts while memory is gone are counted, not fatal. The kernel's heuristic
    would refuse the hog's one allocation outright, hence vm.overcommit_memory=1. The swap file is
    off, so every swapped page goes through the device.
    """
    GUEST.run("swapoff", "/swapfile")
    GUEST.run("sysctl", "-q", "vm.overcommit_memory=1")
    GUEST.run("sh", "-c", "for p in $(pidof qemu-ga); do choom -p $p -n -1000; done")
    try:
        before, pswpout = device(), vmstat("pswpout")
        GUEST.run("dmesg", "-C")
        oversize = str(MEMORY_MIB + SWAP_MIB + 128)
        first_to_go = f'echo 1000 > /proc/self/oom_score_adj && exec {HOG} "$@"'
        scope = ["systemd-run", "--scope", "--quiet", "--unit=tmem-oom-hog"]
        pid = lab.guest_spawn(GUEST.domain(), [*scope, "sh", "-c", first_to_go, "hog", oversize, "0", "5"])
        t0 = time.monotonic()
        st = exec_status(pid, t0 + 1500)
        took = time.monotonic() - t0
        assert st.get("signal") == signal.SIGKILL, f"the hog was not killed: {st}"
        # responsive at once, with the ordinary timeouts: a fresh process, the device still swapped on
        t1 = time.monotonic()
        assert GUEST.run("echo", "alive", timeout=60).strip() == "alive"
        answered = time.monotonic() - t1
        dmesg = GUEST.run("dmesg")
        assert f"Killed process {pid} (swap_hog)" in dmesg, dmesg[-3000:]
        assert "Out of memory" in dmesg
        assert "hung_task" not in dmesg and "blocked for more than" not in dmesg, dmesg[-3000:]
        assert "/dev/vdb" in swaps()
        swapped = vmstat("pswpout") - pswpout
        at_oom = device()
        assert swapped > SWAP_MIB * 256 // 2, f"only {swapped} pages swapped out before the OOM"
        assert at_oom["puts"] + at_oom["refusals"] - before["puts"] - before["refusals"] >= swapped * 0.9
        # the swap path still works: a hog that fits (1.5 times memory), every page checked
        result = hog(MEMORY_MIB * 3 // 2, 2000, 6, timeout=1500)
        assert result["bad_pages"] == 0 and result["pages"] == MEMORY_MIB * 3 // 2 * 256
        assert result["major_faults"] > 0
    finally:
        GUEST.run("sysctl", "-q", "vm.overcommit_memory=0")
        GUEST.run("swapon", "/swapfile")
    print(
        f"\nOOM kill after {took:.0f} s ({st['agent_misses']} agent timeouts meanwhile); pswpout "
        f"{swapped} pages; device at the OOM {at_oom}; echo answered in {answered:.1f} s; "
        f"then hog {result}"
    )


def test_destroyed_mid_swap_frees_its_pool_pages_within_2s(running: dict[str, Any]) -> None:
    start = device()["puts"]
    spawn_hog(2 * MEMORY_MIB, 40000, 7)
    wait_until(
        lambda: device()["pool_pages"] > 10000 and device()["puts"] - start > 10000,
        900,
        "the hog to be swapping",
        1.0,
    )
    uuid = GUEST.domain().UUIDString()
    spill = lab.STATE / "spill" / f"{uuid}.swap"
    assert spill.exists()
    GUEST.domain().destroy()
    t0 = time.monotonic()

    def freed() -> bool:
        s = lab.stats()
        return uuid not in s["guests"] and s["pool"]["persistent_pages"] == 0 and not spill.exists()

    took = wait_until(freed, 10, "the destroyed guest's pages to be freed")
    assert took <= 2.0, f"{took:.2f} s"
    print(f"\nfreed {time.monotonic() - t0:.2f} s after destroy")
