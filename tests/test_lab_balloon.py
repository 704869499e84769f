"""Ballooning in the KVM lab, for real: libvirt balloons two TCG guests under the host agent's
controller, driven by the Committed_AS each guest's agent reports.

- tmem-1 self-balloons: idle, it is shrunk toward its goal; a step increase in its allocation is
  granted in time and no process in it meets the OOM killer; `balloon=off` freezes it.
- tmem-2 keeps its size (`self_balloon = false`): `hostagent reserve` takes memory from it because
  it sits far above its goal, and the host gets back what the reserve reports (QEMU's resident
  memory drops by it).

No skips: a guest that cannot boot fails the module. One lab for the module, torn down at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from scripts import lab
from scripts.guest import POLL, Guest
from scripts.wait import wait_until

MIB = 1024
INTERVAL = 2.0
RESERVE_MIB = 64  # the balloon policy's default reserve: goal = Committed_AS + reserve
# tmem-2 keeps its size unless asked: a lab description's [host] cannot carry [[balloon.guest]], so
# it goes to the host agent's config as extra TOML.
LAB = lab.Lab(
    guests=(
        lab.GuestSpec("tmem-1", memory_mib=768, max_memory_mib=1024),
        lab.GuestSpec("tmem-2", memory_mib=1024, max_memory_mib=1024),
    ),
    host={"balloon": {"enabled": True, "interval": INTERVAL}},
    host_toml='[[balloon.guest]]\nname = "tmem-2"\nself_balloon = false\n',
)

# Allocates MiB of anonymous memory in steps and touches every page, then holds it for a while.
ALLOC = b"""
import mmap, sys, time
mib, hold = int(sys.argv[1]), float(sys.argv[2])
maps = []
for _ in range(mib // 32):
    m = mmap.mmap(-1, 32 << 20)
    for off in range(0, 32 << 20, 4096):
        m[off] = 1
    maps.append(m)
time.sleep(hold)
print("done", len(maps) * 32)
"""


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()
    with lab.lab_running(LAB) as info:
        yield info


def balloon(name: str) -> dict[str, Any]:
    b: dict[str, Any] | None = Guest(name).host_stats().get("balloon")
    assert b is not None, f"{name} has no balloon figures: {Guest(name).host_stats()}"
    return b


def actual_mib(name: str) -> int:
    return int(Guest(name).domain().memoryStats()["actual"]) // MIB


def oom_kills(name: str) -> int:
    return Guest(name).vmstat()["oom_kill"]


def test_idle_guest_is_shrunk_toward_its_goal(running: dict[str, Any]) -> None:
    wait_until(
        lambda: balloon("tmem-1")["boot_kib"] is not None, 60, "the controller to see tmem-1", interval=POLL
    )
    boot = balloon("tmem-1")["boot_kib"] // MIB
    assert boot == 768, "the first look with stats sees the domain's boot size"

    def near_goal() -> bool:
        b = balloon("tmem-1")
        return (
            b["goal_kib"] is not None
            and b["actual_kib"] is not None
            and b["actual_kib"] - b["goal_kib"] < 64 * MIB
        )

    took = wait_until(near_goal, 240, "tmem-1 to be ballooned down near its goal", interval=POLL)
    b = balloon("tmem-1")
    assert b["actual_kib"] < boot * MIB - 128 * MIB, b
    assert b["actual_kib"] >= b["floor_kib"] - 4 * MIB, "never below the floor"
    assert b["last"]["action"] == "shrink" and "Committed_AS" in b["last"]["reason"], b
    assert b["given_back_kib"] >= boot * MIB - b["actual_kib"] - 4 * MIB
    # a fixed-size guest is left alone
    assert actual_mib("tmem-2") == 1024 and balloon("tmem-2")["given_back_kib"] == 0
    print(
        f"tmem-1: {boot} -> {b['actual_kib'] // MIB} MiB in {took:.0f} s (goal "
        f"{b['goal_kib'] // MIB}, floor {b['floor_kib'] // MIB})"
    )


def committed_kib(name: str) -> int:
    return int(Guest(name).host_stats()["report"]["values"]["committed_as_kib"])


def test_step_increase_in_allocation_is_granted_in_time_without_oom(running: dict[str, Any]) -> None:
    before = actual_mib("tmem-1")
    kills = oom_kills("tmem-1")
    want = 320  # MiB: well above what the shrunk guest has free
    assert before < 600, "the previous test left tmem-1 shrunk"
    # What self-ballooning grants: the whole shortfall to Committed_AS + reserve, at once. (More
    # may come from the distress rule, which gives back the most the guest had in the last 60 s:
    # how much that is depends on how long ago the previous test shrank it, so it is not asserted.)
    need_kib = committed_kib("tmem-1") + (RESERVE_MIB + want - 16) * MIB
    pid = Guest("tmem-1").spawn("python3", "-", str(want), "20", stdin=ALLOC)

    def grown() -> bool:
        b = balloon("tmem-1")
        return b["actual_kib"] is not None and b["actual_kib"] >= need_kib

    took = wait_until(grown, 120, f"tmem-1 to grow to its Committed_AS + reserve + {want} MiB", interval=POLL)
    b = balloon("tmem-1")
    assert b["last"]["action"] in ("grow", "distress"), b
    rc, out, err = Guest("tmem-1").wait(pid, timeout=300, what="the allocation")
    assert rc == 0 and out.strip() == f"done {want}", (rc, out, err)
    assert oom_kills("tmem-1") == kills, "a process in tmem-1 was killed by the OOM killer"
    print(f"tmem-1 grew {before} -> {b['actual_kib'] // MIB} MiB within {took:.0f} s")


def test_balloon_off_freezes_the_guest(running: dict[str, Any]) -> None:
    # Self-ballooning must have something to shrink: if tmem-1 is near its floor (the previous
    # test's allocation ended a while ago), an allocation grows it first.
    if actual_mib("tmem-1") * MIB < balloon("tmem-1")["floor_kib"] + 96 * MIB:
        pid = Guest("tmem-1").spawn("python3", "-", "192", "1", stdin=ALLOC)
        rc, out, err = Guest("tmem-1").wait(pid, timeout=300, what="the allocation")
        assert rc == 0, (rc, out, err)
    out = run_host("set", "tmem-1", "balloon=off")
    assert "balloon=off" in out
    wait_until(
        lambda: balloon("tmem-1")["state"] == "off", 30, "the controller to see balloon=off", interval=POLL
    )
    frozen = actual_mib("tmem-1")
    assert frozen * MIB >= balloon("tmem-1")["floor_kib"] + 32 * MIB, "nothing left to shrink"
    time.sleep(6 * INTERVAL)  # the allocation above has ended: self-ballooning would shrink it
    assert actual_mib("tmem-1") == frozen
    run_host("set", "tmem-1", "balloon=on")
    wait_until(lambda: actual_mib("tmem-1") < frozen - 16, 120, "tmem-1 to be ballooned again", interval=POLL)


def test_reserve_frees_what_it_reports(running: dict[str, Any]) -> None:
    # Make tmem-2's memory resident in QEMU (a guest that never touched a page gives nothing back
    # to the host when ballooned): fill its page cache, then drop it so the pages are free.
    Guest("tmem-2").run(
        "sh",
        "-c",
        "head -c 600M /dev/zero > /tmp/fill && rm /tmp/fill && sync && echo 3 > /proc/sys/vm/drop_caches",
    )
    qemu = qemu_process("tmem-2")
    rss_before = qemu.memory_info().rss
    want_mib = 400
    request = psutil.virtual_memory().available // (1 << 20) + want_mib
    result = json.loads(run_host("reserve", str(request), "--wait", "60", "--json"))
    rss_after = qemu.memory_info().rss
    ballooned = result["ballooned_bytes"]
    assert "tmem-2" in result["ballooned"], result
    assert ballooned >= 0.8 * want_mib * (1 << 20), result
    freed = rss_before - rss_after
    assert freed >= 0.8 * ballooned, (
        f"reported {ballooned >> 20} MiB, QEMU's resident memory dropped by {freed >> 20} MiB"
    )
    assert balloon("tmem-2")["last"]["action"] == "reserve"
    print(f"reserve: reported {ballooned >> 20} MiB from balloons, QEMU RSS down {freed >> 20} MiB")


def run_host(*argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "hostagent", *argv, "--control", lab.CONTROL],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=lab.ROOT,
    )
    assert proc.returncode == 0, f"hostagent {' '.join(argv)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def qemu_process(name: str) -> psutil.Process:
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and "qemu" in cmd[0] and f"guest={name}," in " ".join(cmd):
            return p
    raise AssertionError(f"no QEMU process for {name}")
