"""The suite's tiers and shared hooks; fixtures live in tests/support (loaded as plugins here).

Every test module belongs to one tier, named in TIERS below; the hook marks each test with it, so
`pytest -m "not lab"` (scripts/test --fast) runs everything but the VMs:

- unit: pure logic in this process (fake clocks, fake libvirt connections, no subprocesses);
- process: real host agent / guest agent processes, FUSE, userfaultfd, sockets on this machine;
- lab: real guests booted by libvirt (slow under TCG; run under `flock /run/tmem-lab.lock`).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest_plugins = ["tests.support.host_agent", "tests.support.guest_daemon", "tests.support.precache_mount"]

TIERS: dict[str, str] = {
    "test_balloon": "unit",
    "test_config": "unit",
    "test_pool_engine": "unit",
    "test_pool_model": "unit",
    "test_ports": "unit",
    "test_reporter": "unit",
    "test_wire": "unit",
    "test_seed_figures": "unit",
    "test_demo_summary": "unit",
    "test_seed_labs": "unit",
    "test_attach": "unit",
    "test_guest_sched": "unit",
    "test_pressure": "unit",
    "test_protocol_session": "unit",
    "test_swapview": "unit",  # files in a temp dir
    "test_regionbook": "unit",
    "test_precache_inodes": "unit",
    "test_precache_victim": "unit",
    "test_pooltable": "unit",
    "test_nbd": "unit",  # the NBD protocol object, bytes in and out  # real files in a temp dir, no processes
    "test_domain": "process",  # runs detect_virt_type in a subprocess
    "test_guest_channel": "process",
    "test_guest_channel_chaos": "process",
    "test_guest_daemon": "process",
    "test_held_delivery": "process",
    "test_hostagent": "process",
    "test_mountkeeper": "process",
    "test_precache": "process",
    "test_precache_daemon": "process",
    "test_precache_races": "process",
    "test_precache_stress": "process",
    "test_precache_users": "process",
    "test_precache_writes": "process",
    "test_precache_fsx": "process",
    "test_hostile_guest": "process",
    "test_cli_pipes": "process",
    "test_swapdev": "process",  # a real arena, and a real process for the peer check
    "test_swapdev_nbd": "process",  # a real host agent and QEMU's NBD client
    "test_device_stats": "process",  # real host agents (one from git), QEMU's NBD client, a guest agent
    "test_preswap": "process",
    "test_preswap_daemon": "process",
    "test_restart": "process",
    "test_metrics": "process",
    "test_agent_tasks": "process",  # a real agent and unix sockets in this process
    "test_sdnotify": "process",
    "test_install": "process",
    "test_lab": "lab",
    "test_lab_balloon": "lab",
    "test_lab_demo": "lab",
    "test_lab_precache": "lab",
    "test_lab_preswap": "lab",
    "test_lab_deploy": "lab",
    "test_lab_swapdev": "lab",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test with its module's tier; a module missing from TIERS is an error."""
    missing = set()
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if isinstance(item, pytest.Function) else ""
        tier = TIERS.get(module)
        if tier is None:
            missing.add(module or item.nodeid)
            continue
        item.add_marker(getattr(pytest.mark, tier))
    if missing:
        raise pytest.UsageError(
            f"tests/conftest.py: no tier for {', '.join(sorted(missing))} (add each module to TIERS)"
        )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Remember each phase's outcome on the item, so fixtures can tell a failed test at teardown."""
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report
