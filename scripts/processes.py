"""Host-side processes the benchmarks start (host agent, shims): wait until one serves, stop it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable

from scripts.wait import wait_until

START_TIMEOUT = 15.0


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
