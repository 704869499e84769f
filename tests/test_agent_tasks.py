"""The host agent's tasks have one owner, its TaskGroup: a libvirt domain's link connects, ends
with its domain, and every task ends with the agent.

A real agent (asyncio, in this process) and a real unix socket standing in for QEMU's end of a
domain's tmem channel; only the libvirt watcher is left out (its callbacks are called directly).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from hostagent import config
from hostagent.agent import HostAgent
from hostagent.virt import Domain


async def _until(cond: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(10):
            while not cond():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def test_domain_links_belong_to_the_agent_and_end_with_it(tmp_path: Path) -> None:
    shm = Path(tempfile.mkdtemp(prefix="tmem-t", dir="/dev/shm"))
    cfg = config.parse(
        {
            "pool": {"limit_mib": 16, "host_reserve_mib": 0, "arena_dir": str(shm)},
            "control": {"socket": str(tmp_path / "control.sock")},
            "channels": {"dir": str(tmp_path / "guests")},
            "libvirt": {"enabled": False},
        }
    )
    agent = HostAgent(cfg)
    qemu = str(tmp_path / "qemu.sock")
    accepted: list[asyncio.StreamWriter] = []

    async def main() -> None:
        server = await asyncio.start_unix_server(lambda _r, w: accepted.append(w), path=qemu)
        run = asyncio.create_task(agent._main())
        await _until(lambda: agent._tasks is not None, "the agent serving")

        agent._domain_up(Domain("uuid-1", "vm1", qemu))  # what the watcher does for a domain
        await _until(lambda: len(accepted) == 1, "the link to connect")
        first = agent._links["uuid-1"]
        agent._domain_down("uuid-1", "destroyed")
        await _until(first.done, "the link to end with its domain")
        assert first.cancelled() and "uuid-1" not in agent.guests

        agent._domain_up(Domain("uuid-2", "vm2", qemu))
        await _until(lambda: len(accepted) == 2, "the second link to connect")
        second = agent._links["uuid-2"]
        agent.stop()
        await asyncio.wait_for(run, 10)
        assert second.done() and not agent._links  # ended with the agent, none left behind
        agent._domain_up(Domain("uuid-3", "vm3", qemu))  # a late event: no task for it
        assert "uuid-3" not in agent.guests and not agent._links
        server.close()
        await server.wait_closed()

    umask = os.umask(0o022)
    os.umask(umask)
    try:
        asyncio.run(main())
    finally:
        os.umask(umask)  # the agent sets its own
        shutil.rmtree(shm, ignore_errors=True)
