"""The pool's swap device in a real lab guest (docs/preswap-device.md).

One guest of 256 MiB whose highest-priority swap is the host agent's device (NBD, 512 MiB) and whose
own swap file (/swapfile, 256 MiB) is behind it. An unmodified memory hog (scripts/swap_hog.c,
compiled in the guest) over twice the guest's memory, every page checked: the swap file gets no
page while the pool has room; with a quota smaller than the working set the excess goes to the
host's spill file and nothing is lost; the host agent SIGKILLed and restarted mid-swap loses nothing
(QEMU's NBD client waits and reconnects); virsh save / restore mid-swap keeps every page; a guest
driven to OOM does not deadlock in the swap path; a guest destroyed mid-swap frees its pool pages
within 2 s. A lab of its own, torn down at the end; no skips.
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


def test_oom_does_not_deadlock_the_swap_path(running: dict[str, Any]) -> None:
    GUEST.run("swapoff", "/swapfile")
    # always overcommit: the kernel's heuristic refuses the hog's one allocation outright (larger
    # than memory + swap) before any page is touched; the OOM killer must meet it mid-swap instead
    GUEST.run("sysctl", "-q", "vm.overcommit_memory=1")
    try:
        pid = spawn_hog(MEMORY_MIB + SWAP_MIB + 128, 0, 5)
        rc, _, _ = lab.guest_wait(GUEST.domain(), pid, 1800, "swap_hog over memory + swap")
        assert rc != 0, "the hog cannot fit: the OOM killer must have ended it"
        assert "Out of memory" in GUEST.run("dmesg")
        used = swaps()["/dev/vdb"]
        result = hog(2 * MEMORY_MIB, 5000, 6)  # the swap path still completes
        assert result["bad_pages"] == 0
    finally:
        GUEST.run("sysctl", "-q", "vm.overcommit_memory=0")
        GUEST.run("swapon", "/swapfile")
    print(f"\nswap device at OOM {used}; then hog {result}")


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
