"""Preswap in a real lab guest: the guest agent daemon serves preswap regions (`[preswap]` in
/etc/tmem/guestagent.toml) over the guest's virtio-serial port, and a program whose region is larger
than the guest's free memory runs to completion, every page's checksum verified
(`scripts.preswap_workload --fill`), while the guest's own swap file sees no traffic at all:
pswpin and pswpout do not move (the seed talk's screen).  The host agent's `hostagent stats` shows
the guest's persistent puts and gets, and the preswap counters of its reports.

A lab of its own (one small guest), torn down at the end; no skips.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from hostagent import statsview
from scripts import lab
from scripts.guest import PYTHON, Guest

NAME = "tmem-1"
G = Guest(NAME)
MEMORY_MIB = 256  # small, so a region larger than its free memory stays quick to fill under TCG
BUDGET_PAGES = 2048  # the region's resident budget: 8 MiB
OVER_MIB = 32  # the region is this much larger than MemAvailable
OPS = 4000  # random reads and writes between the fill and the final check of every page
CONFIG = "[preswap]\nenabled = true\n"
WORKLOAD = [*PYTHON, "-m", "scripts.preswap_workload"]


@pytest.fixture(scope="module")
def running() -> Iterator[dict[str, Any]]:
    lab.down()  # leftovers of an interrupted run (or of another lab test's lab)
    # no pool-backed swap device: the guest's only swap is its file, so pswpin/pswpout are the file's
    # traffic and the guest's persistent pages are the region's alone (tests/test_lab_swapdev.py
    # covers the device)
    spec = lab.Lab(
        (lab.GuestSpec(name=NAME, memory_mib=MEMORY_MIB, max_memory_mib=MEMORY_MIB),), {"swap_mib": 0}
    )
    with lab.lab_running(spec) as info:
        yield info


def guest_preswap() -> dict[str, Any]:
    """`guestagent stats`' preswap part in the guest; {} while the daemon is not answering."""
    result: dict[str, Any] = G.agent_stats().get("preswap") or {}
    return result


def test_region_larger_than_free_memory_never_touches_the_swap_file(running: dict[str, Any]) -> None:
    G.write_agent_config(CONFIG)
    G.wait_until(lambda: guest_preswap().get("running", False), 120, "the daemon's preswap agent")
    assert "/swapfile" in G.run("cat", "/proc/swaps")  # the kernel's swap is there to be used

    meminfo = G.meminfo()
    available, free = meminfo["MemAvailable"], meminfo["MemFree"]
    pages = (available + OVER_MIB * 1024) // 4
    assert pages * 4 > max(available, free)  # it cannot all stay in memory: pages must leave
    host_before = G.host_stats()["persistent"]
    vmstat_before = G.vmstat()

    out = G.run(
        *WORKLOAD,
        "--pages",
        str(pages),
        "--budget",
        str(BUDGET_PAGES),
        "--ops",
        str(OPS),
        "--fill",
        timeout=1200,
    )
    result = json.loads(out.strip().splitlines()[-1])
    vmstat_after = G.vmstat()
    agent = result["agent"]
    print(
        f"region {pages} pages ({pages * 4 >> 10} MiB) in a {MEMORY_MIB} MiB guest with MemAvailable "
        f"{available >> 10} MiB, MemFree {free >> 10} MiB: {json.dumps(result)}"
    )

    assert result["mismatches"] == 0, result  # every read of every page matched its checksum
    assert result["ops"] == 2 * pages + OPS
    # the region's data did not fit: most of it left memory, and all of that went to tmem
    assert agent["evictions"] >= pages - BUDGET_PAGES and agent["puts"] >= pages - BUDGET_PAGES, agent
    assert agent["tmem_faults"] > 0 and agent["gets"] >= pages - BUDGET_PAGES, agent
    assert agent["puts_refused"] == 0 and agent["disk_writes"] == 0 and agent["disk_reads"] == 0, agent
    assert agent["lost"] == 0
    # ... and none of it reached the swap file: the guest swapped nothing in or out meanwhile
    swapped = {k: vmstat_after[k] - vmstat_before[k] for k in ("pswpin", "pswpout")}
    assert swapped == {"pswpin": 0, "pswpout": 0}, swapped
    assert result["swap"] == {"pswpin": 0, "pswpout": 0}, result

    # the host saw it: persistent puts and gets for this guest, and the counters of its reports
    host_after = G.host_stats()["persistent"]
    assert host_after["puts"] - host_before["puts"] >= agent["puts"]
    assert host_after["gets"] - host_before["gets"] >= agent["gets"]

    G.wait_until(lambda: G.reported().get("preswap_puts", 0) >= agent["puts"], 30, "a report with the puts")
    values = G.reported()
    assert values["preswap_gets"] >= agent["gets"] and values["preswap_disk_writes"] == 0, values
    assert values["preswap_regions"] == 0  # released when the program exited
    table = statsview.format_stats(lab.stats())
    print(table)
    row = next(line for line in table.split("preswap (")[1].splitlines() if line.startswith(NAME))
    assert statsview.count(values["preswap_puts"]) in row.split()
    assert statsview.count(values["preswap_gets"]) in row.split()
    G.wait_until(lambda: G.host_stats()["persistent"]["pages"] == 0, 30, "the region's pages flushed")


def test_teardown_lab(running: dict[str, Any]) -> None:
    """Last: restore the default guest config (no preswap) before the lab goes down."""
    G.write_agent_config(None)
    G.wait_until(
        lambda: guest_preswap() == {} and G.host_stats()["connected"], 60, "the daemon without preswap"
    )
    lab.down()
