"""Preswap on the host: real userfaultfd, a real swapper process, a real host agent process.

The swapper (`scripts/preswap_swapper.py`: one without the daemon) holds its own channel to the
host agent as guest g1; applications are separate processes (`scripts/preswap_workload.py`)
or this test process itself: either way no fault is ever handled in the faulting process.  The
100,000+ fault soak of issue 5 is `scripts/preswap_workload.py --ops 140000` against the same
setup (`scripts/bench_preswap.py` runs it with the fault-service figures); the test here does
~30,000.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guestagent import preswap
from scripts.processes import preswap_workload
from scripts.wait import wait_until
from tests.support.host_agent import HostAgentProcess, stats_json
from tests.support.process import read_log, reap

PAGE = preswap.PAGE
SWAPPER = Path(__file__).resolve().parent.parent / "scripts" / "preswap_swapper.py"


class SwapperProcess:
    def __init__(self, agent: HostAgentProcess, guest: str = "g1", *extra: str) -> None:
        self.socket = str(agent.workdir / f"preswap-{guest}.sock")
        self.swap_file = str(agent.workdir / f"swap-{guest}")
        self.log_path = agent.workdir / f"swapper-{guest}.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(SWAPPER),
                    "--channel",
                    agent.sockets[guest],
                    "--socket",
                    self.socket,
                    "--swap-file",
                    self.swap_file,
                    "--log-level",
                    "INFO",
                    "--report-interval",
                    "0.1",
                    *extra,
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line == b"ready\n", f"swapper did not start: {line!r}\n{self.log()}"

    def log(self) -> str:
        return read_log(self.log_path)

    def stats(self) -> dict[str, Any]:
        return preswap.stats(self.socket)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(10)


@pytest.fixture
def swapper(host_agent: HostAgentProcess, request: pytest.FixtureRequest) -> Iterator[SwapperProcess]:
    proc = SwapperProcess(host_agent)
    try:
        yield proc
        assert proc.stop() == 0, proc.log()
    finally:
        reap(request, proc, "swapper")


def workload(sw: SwapperProcess, pages: int, budget: int, ops: int, seed: int = 1) -> dict[str, Any]:
    res = subprocess.run(
        preswap_workload(sw.socket, pages, budget, ops, "--seed", str(seed)),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}\n{sw.log()}"
    result: dict[str, Any] = json.loads(res.stdout)
    return result


@contextlib.contextmanager
def running_workload(
    sw: SwapperProcess, budget: int, ops: int
) -> Iterator[tuple[subprocess.Popen[str], Callable[[str], int]]]:
    """A workload on 2048 pages, started and left running: yields the process and a function that
    reads one of its region's counters from the swapper (0 once released). Killed if still running."""
    app = subprocess.Popen(
        preswap_workload(sw.socket, 2048, budget, ops, "--progress"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert app.stdout is not None
        region = str(json.loads(app.stdout.readline())["region"])

        def figure(name: str) -> int:
            return int(sw.stats()["regions"].get(region, {}).get(name, 0))

        yield app, figure
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()


def host_persistent(agent: HostAgentProcess) -> int:
    pages: int = stats_json(agent)["pool"]["persistent_pages"]
    return pages


def test_region_4x_budget_random_reads_and_writes(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    result = workload(swapper, pages=2048, budget=512, ops=40_000)
    agent = result["agent"]
    print(json.dumps(result))
    assert result["mismatches"] == 0
    assert agent["lost"] == 0
    assert agent["faults"] >= 30_000
    # every page touched first as a zero page: by a fault, or mapped ahead on a sequential run
    assert agent["tmem_faults"] >= 25_000 and agent["zero_faults"] + agent["zero_ahead"] >= 2048
    assert agent["puts"] >= agent["tmem_faults"]
    # readahead: the final pass over every page is a sequential scan
    assert agent["gets"] == agent["tmem_faults"] + agent["readahead"] and agent["readahead"] > 0
    assert agent["puts_refused"] == agent["disk_writes"] == agent["disk_faults"] == 0
    assert agent["resident"] <= 512 + 64 and agent["evicted"] >= 2048 - 512 - 64
    # released: nothing left in tmem, on disk or in the agent
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed")
    stats = swapper.stats()
    assert stats["regions"] == {} and stats["released"] == 1 and stats["swap_slots_used"] == 0
    g1 = stats_json(host_agent)["guests"]["g1"]["persistent"]
    totals = stats["totals"]  # the final figures (an eviction may have been in flight above)
    assert g1["puts"] == totals["puts"] and g1["hits"] == totals["gets"]

    def reported() -> bool:  # the swapper's counters reach `hostagent stats` in its reports
        report = (stats_json(host_agent)["guests"]["g1"].get("report") or {}).get("values", {})
        return bool(
            report.get("preswap_puts") == totals["puts"]
            and report.get("preswap_disk_writes") == 0
            and report.get("preswap_regions") == 0
        )

    wait_until(reported, what="preswap counters in the host's stats")


def test_tiny_quota_falls_back_to_the_swap_file(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    assert host_agent.cli("set", "g1", "quota=1").returncode == 0  # 1 MiB: ~250 raw pages
    result = workload(swapper, pages=1024, budget=128, ops=12_000, seed=7)
    agent = result["agent"]
    assert result["mismatches"] == 0
    assert agent["lost"] == 0
    assert agent["puts_refused"] > 1000 and agent["disk_faults"] > 1000
    assert agent["tmem_faults"] > 1000  # tmem still takes what fits
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed")
    stats = swapper.stats()
    totals = stats["totals"]  # final figures (the region's were taken with an eviction in flight)
    assert totals["disk_writes"] == totals["puts_refused"]
    assert totals["disk_reads"] == totals["disk_faults"]
    assert stats["swap_slots_used"] == 0 and stats["swap_slots_top"] > 0
    assert os.stat(swapper.swap_file).st_blocks == 0  # freed slots are punched out


def test_killed_application_leaves_nothing_in_tmem(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    with running_workload(swapper, budget=256, ops=10_000_000) as (app, figure):

        def busy() -> bool:
            return figure("in_tmem") > 1000 and figure("tmem_faults") > 1000

        wait_until(busy, timeout=30, what="the region to be swapping through tmem")
        assert host_persistent(host_agent) > 1000
        app.send_signal(signal.SIGKILL)
        app.wait(10)
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed after SIGKILL")
    wait_until(lambda: swapper.stats()["regions"] == {}, what="the region released")
    assert swapper.stats()["totals"]["lost"] == 0
    res = host_agent.cli("stats", "--json")
    assert json.loads(res.stdout)["guests"]["g1"]["persistent"]["pages"] == 0


def test_region_in_this_process_is_a_plain_buffer(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    # the faults of this (Python, GIL-holding) process are handled by the swapper process
    pages = 256
    with preswap.Region(pages * PAGE - 100, swapper.socket, budget_pages=16) as region:
        assert region.size == pages * PAGE and len(region.buf) == pages * PAGE
        assert bytes(region.buf[:PAGE]) == bytes(PAGE)  # first touch: zeros
        for p in range(pages):
            struct.pack_into("<QQ", region.buf, p * PAGE + 8, p, p * p)
        for p in reversed(range(pages)):
            assert struct.unpack_from("<QQ", region.buf, p * PAGE + 8) == (p, p * p)
            assert region.buf[p * PAGE] == 0
        pid = os.fork()
        if pid == 0:  # a child has no mapping of the region (MADV_DONTFORK), so it cannot
            # fill the agent's holes with zeros behind its back
            with open("/proc/self/maps") as maps:
                os._exit(int(f"{region.addr:x}-" in maps.read()))
        assert os.waitpid(pid, 0)[1] == 0
        mine = swapper.stats()["regions"][str(region.id)]
        assert mine["resident"] <= 16 + 4 and mine["in_tmem"] >= pages - 20
        assert mine["tmem_faults"] >= pages - 32  # the last pages written were still resident
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed")


def test_bad_requests_are_refused(swapper: SwapperProcess, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(swapper.socket)
        sock.sendall(b'{"cmd": "region", "size": 4096, "addr": 0}\n')  # no fds
        reply = json.loads(sock.makefile().readline())
        assert reply["ok"] is False and "two fds" in reply["error"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(swapper.socket)
        sock.sendall(b'{"cmd": "nope"}\n')
        assert json.loads(sock.makefile().readline())["ok"] is False
    with pytest.raises(preswap.PreswapError, match="not reachable"):
        preswap.Region(PAGE, str(tmp_path / "nothing.sock"))
    assert swapper.stats()["regions"] == {}


def test_host_agent_sigkill_and_restart_mid_run(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    with running_workload(swapper, budget=512, ops=30000) as (app, figure):

        def faults() -> int:
            return figure("tmem_faults")

        wait_until(lambda: faults() > 3000, timeout=30, what="the region swapping through tmem")
        host_agent.kill()
        before = faults()
        time.sleep(0.5)  # faults on pages in tmem wait meanwhile
        stalled = faults()
        host_agent.start()
        out, err = app.communicate(timeout=120)
    assert app.returncode == 0, f"{out}\n{err}\n{swapper.log()}"
    result = json.loads(out.splitlines()[-1])
    assert result["mismatches"] == 0 and result["agent"]["lost"] == 0
    assert stalled - before <= 1  # nothing served from tmem while the host agent was away
    assert result["agent"]["tmem_faults"] > stalled
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed")


def control(sw: SwapperProcess, request: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(sw.socket)
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply: dict[str, Any] = json.loads(sock.makefile().readline())
    return reply


def test_shrink_moves_pages_out_of_tmem(host_agent: HostAgentProcess, swapper: SwapperProcess) -> None:
    pages = 512
    with preswap.Region(pages * PAGE, swapper.socket, budget_pages=64) as region:
        for p in range(pages):
            struct.pack_into("<QQ", region.buf, p * PAGE + 100, p, 3 * p + 1)

        def settled() -> bool:  # no eviction in flight
            r = swapper.stats()["regions"][str(region.id)]
            return bool(r["resident"] + r["in_tmem"] == pages)

        wait_until(settled, what="evictions done")
        in_tmem = swapper.stats()["regions"][str(region.id)]["in_tmem"]
        assert in_tmem >= pages - 64 and host_persistent(host_agent) == in_tmem
        reply = control(swapper, {"cmd": "shrink", "pages": 300})
        assert reply == {"ok": True, "moved": 300}
        mine = swapper.stats()["regions"][str(region.id)]
        assert mine["shrunk_to_memory"] + mine["shrunk_to_disk"] == 300
        assert mine["shrunk_to_disk"] > 0 and mine["on_disk"] == mine["shrunk_to_disk"]
        assert mine["in_tmem"] == in_tmem - 300 and host_persistent(host_agent) == in_tmem - 300
        assert mine["resident"] <= 64
        # more than tmem holds: all of it moves, and every page still reads back
        assert control(swapper, {"cmd": "shrink", "pages": 10_000})["moved"] == in_tmem - 300
        assert host_persistent(host_agent) == 0
        for p in range(pages):
            assert struct.unpack_from("<QQ", region.buf, p * PAGE + 100) == (p, 3 * p + 1)
        assert swapper.stats()["regions"][str(region.id)]["lost"] == 0
    assert control(swapper, {"cmd": "shrink", "pages": -1})["ok"] is False
    wait_until(lambda: swapper.stats()["swap_slots_used"] == 0, what="swap slots freed")


def test_guest_budget_caps_all_regions_together(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    pages = 256
    with (
        preswap.Region(pages * PAGE, swapper.socket, budget_pages=200) as a,
        preswap.Region(pages * PAGE, swapper.socket, budget_pages=100) as b,
    ):
        for region in (a, b):
            for p in range(pages):
                struct.pack_into("<QI", region.buf, p * PAGE, p, region.id)

        def resident() -> dict[int, int]:
            regions = swapper.stats()["regions"]
            return {r.id: regions[str(r.id)]["resident"] for r in (a, b)}

        before = resident()
        assert before[a.id] > 100 and before[b.id] > 50  # within their own budgets, not less
        assert control(swapper, {"cmd": "budget", "pages": 60}) == {"ok": True, "guest_budget": 60}
        # shares follow the budgets asked for: 40 and 20
        wait_until(lambda: resident()[a.id] <= 40 and resident()[b.id] <= 20, what="the guest budget")
        regions = swapper.stats()["regions"]
        assert (regions[str(a.id)]["limit"], regions[str(b.id)]["limit"]) == (40, 20)
        for region in (a, b):
            for p in range(pages):
                assert struct.unpack_from("<QI", region.buf, p * PAGE) == (p, region.id)
        assert sum(resident().values()) <= 60 + 2 * 8  # each may run a few pages over, briefly
        assert control(swapper, {"cmd": "budget", "pages": None})["guest_budget"] is None
        assert swapper.stats()["regions"][str(a.id)]["limit"] == 200
    assert control(swapper, {"cmd": "budget", "pages": 0})["ok"] is False


def test_a_released_region_faults_loudly(host_agent: HostAgentProcess, swapper: SwapperProcess) -> None:
    # once the agent lets a region go (here: its socket closed while still mapped), a touch is
    # SIGBUS, never zeros where the data was
    child = (
        "import sys, time\n"
        "from guestagent import preswap\n"
        "r = preswap.Region(64 * 4096, sys.argv[1], budget_pages=8)\n"
        "for p in range(64): r.buf[p * 4096] = 1\n"
        "r._sock.close()\n"
        "while preswap.stats(sys.argv[1])['regions']: time.sleep(0.01)\n"
        "print('released', flush=True)\n"
        "r.buf[0]\n"
        "print('no SIGBUS', flush=True)\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", child, swapper.socket], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.stdout == "released\n" and res.returncode == -signal.SIGBUS, res
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed")


def test_guest_budget_follows_memavailable(host_agent: HostAgentProcess, tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()

    def meminfo(available_mib: int) -> None:
        (proc / "meminfo.new").write_text(
            f"MemTotal:  {1 << 20} kB\nMemAvailable:  {available_mib << 10} kB\n"
        )
        (proc / "meminfo.new").rename(proc / "meminfo")

    meminfo(200)  # 136 MiB above the 64 MiB reserve: 34816 pages
    sw = SwapperProcess(
        host_agent,
        "g2",
        "--follow-meminfo",
        "--proc-dir",
        str(proc),
        "--interval",
        "0.05",
        "--reserve-kib",
        str(64 << 10),
    )
    try:
        wait_until(lambda: sw.stats()["guest_budget"] == 136 * 256, what="budget from MemAvailable")
        with preswap.Region(512 * PAGE, sw.socket, budget_pages=400) as region:
            for p in range(512):
                region.buf[p * PAGE + 7] = p % 256
            assert sw.stats()["regions"][str(region.id)]["limit"] == 400
            meminfo(64)  # at the reserve: the budget is what the regions hold now

            def standstill() -> bool:
                st = sw.stats()
                return bool(st["guest_budget"] == st["resident"])

            wait_until(standstill, what="a standstill")
            meminfo(32)  # below it: they give back what is missing, down to the floor
            wait_until(lambda: sw.stats()["guest_budget"] == 256, what="the floor")
            wait_until(
                lambda: sw.stats()["regions"][str(region.id)]["resident"] <= 256,
                what="eviction to the budget",
            )
            for p in range(512):
                assert region.buf[p * PAGE + 7] == p % 256
    finally:
        assert sw.stop() == 0, sw.log()
    assert "Traceback" not in sw.log(), sw.log()


def test_threads_fault_concurrently(host_agent: HostAgentProcess, swapper: SwapperProcess) -> None:
    # ctypes.memmove drops the GIL, so these threads really fault at once, on the same pages too
    pages, threads, rounds = 1024, 6, 3000
    with preswap.Region(pages * PAGE, swapper.socket, budget_pages=128) as region:
        base = region.addr
        errors: list[str] = []

        def content(p: int, v: int) -> bytes:
            return struct.pack("<QQ", p, v) * (PAGE // 16)

        def own(t: int) -> None:  # each thread writes its own pages, re-reading them
            rng = random.Random(t)
            versions = dict.fromkeys(range(t, pages, threads), 0)
            buf = ctypes.create_string_buffer(PAGE)
            for _ in range(rounds):
                p = rng.choice(list(versions))
                ctypes.memmove(buf, base + p * PAGE, PAGE)
                if versions[p] and buf.raw != content(p, versions[p]):
                    errors.append(f"page {p} v{versions[p]}")
                versions[p] += 1
                ctypes.memmove(base + p * PAGE, content(p, versions[p]), PAGE)
            for p, v in versions.items():  # final versions, for the shared phase
                final[p] = v

        def shared(t: int) -> None:  # all threads read all pages: the same faults at once
            buf = ctypes.create_string_buffer(PAGE)
            for p in range(pages):
                ctypes.memmove(buf, base + p * PAGE, PAGE)
                if buf.raw != (content(p, final[p]) if final[p] else bytes(PAGE)):
                    errors.append(f"shared page {p}")

        final = [0] * pages
        for phase in (own, shared):
            workers = [threading.Thread(target=phase, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(60)
            assert not any(w.is_alive() for w in workers)
        assert errors == []
        mine = swapper.stats()["regions"][str(region.id)]
        assert mine["tmem_faults"] > 1000 and mine["lost"] == 0
    wait_until(lambda: host_persistent(host_agent) == 0, what="tmem pages flushed")


def test_swapper_stops_while_the_host_agent_is_away(
    host_agent: HostAgentProcess, swapper: SwapperProcess
) -> None:
    holder = (
        "import sys, time\n"
        "from guestagent import preswap\n"
        "r = preswap.Region(256 * 4096, sys.argv[1], budget_pages=16)\n"
        "for p in range(256): r.buf[p * 4096] = 1\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    app = subprocess.Popen([sys.executable, "-c", holder, swapper.socket], stdout=subprocess.PIPE)
    try:
        assert app.stdout is not None and app.stdout.readline() == b"ready\n"
        host_agent.kill()
        started = time.monotonic()
        assert swapper.stop() == 0, swapper.log()  # its region's flush gives up after a while
        assert time.monotonic() - started < 15
        assert "host agent away while stopping" in swapper.log()
    finally:
        app.kill()
        app.wait()
        host_agent.start()  # for the fixture's clean stop
