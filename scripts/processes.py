"""Host-side processes the benchmarks start (host agent, shims): wait until one serves, stop it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from scripts.wait import wait_until

START_TIMEOUT = 15.0


def bench_config(tmp: Path, arena_dir: Path, limit_mib: int, more: str) -> Path:
    """A benchmark's host agent config, written to `tmp`: a pool of `limit_mib` (no host reserve),
    the control socket `tmp`/control.sock, guest sockets in `tmp`/guests, no libvirt; then `more`
    (the guests, other sections)."""
    config = tmp / "hostagent.toml"
    config.write_text(
        f'[pool]\nlimit_mib = {limit_mib}\nhost_reserve_mib = 0\narena_dir = "{arena_dir}"\n'
        f'[control]\nsocket = "{tmp}/control.sock"\n[channels]\ndir = "{tmp}/guests"\n'
        "[libvirt]\nenabled = false\n" + more
    )
    return config


def hostagent(*args: str) -> list[str]:
    """The argv of `hostagent ARGS` as this interpreter runs it (`python -m`: no install needed)."""
    return [sys.executable, "-m", "hostagent", *args]


def preswap_workload(socket: str, pages: int, budget: int, ops: int, *extra: str) -> list[str]:
    """The argv of one checked preswap workload: `ops` random reads and writes on a region of
    `pages` pages, `budget` of them resident, through the swapper listening on `socket`."""
    sizes = ("--pages", str(pages), "--budget", str(budget), "--ops", str(ops))
    script = str(Path(__file__).resolve().parent / "preswap_workload.py")  # by path: runs from any cwd
    return [sys.executable, script, "--socket", socket, *sizes, *extra]


def wait_started(
    proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float = START_TIMEOUT
) -> None:
    """Until `ready()`; RuntimeError (and the process killed) if it exits or times out first."""

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before it was ready")
        return ready()

    try:
        wait_until(up, timeout, f"{what} to start")
    except (RuntimeError, TimeoutError) as err:
        proc.kill()
        raise RuntimeError(str(err)) from None


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connectable(path: str) -> bool:
    """A unix socket someone accepts on."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe, contextlib.suppress(OSError):
        probe.connect(path)
        return True
    return False
