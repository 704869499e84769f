"""The one teardown for a test's subprocess: kill it, show its log when the test failed, and fail
on a Python traceback in it (an agent logs its errors; a traceback is a crash or a bug)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Protocol

import pytest

from guestagent.protocol.jsonline import is_listening
from scripts.wait import wait_until

STOP_TIMEOUT = 10.0


class LoggedProcess(Protocol):
    """What `reap` needs: the Popen (None if never started) and the log it wrote to."""

    @property
    def proc(self) -> subprocess.Popen[bytes] | None: ...

    @property
    def log_path(self) -> Path: ...

    def log(self) -> str: ...


def read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def failed(request: pytest.FixtureRequest) -> bool:
    """True if the test's call phase failed or never ran (see conftest's makereport hook)."""
    call = getattr(request.node, "rep_call", None)
    return call is None or bool(call.failed)


def reap(
    request: pytest.FixtureRequest, process: LoggedProcess, name: str, tracebacks_fail: bool = True
) -> None:
    """Kill `process` if it still runs, print its log if the test failed, check the log."""
    if process.proc is not None and process.proc.poll() is None:
        process.proc.kill()
        process.proc.wait(STOP_TIMEOUT)
    log = process.log()
    if failed(request):
        print(f"---- {name} log ({process.log_path}) ----\n{log}", file=sys.stderr)
    if tracebacks_fail:
        assert "Traceback" not in log, f"{name} logged a traceback:\n{log}"


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start `argv` with stdout and stderr appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)


def wait_serving(process: LoggedProcess, socket: str, timeout: float, name: str) -> None:
    """Until `socket` answers; fails at once, with the log, if the process exits first."""

    def serving() -> bool:
        assert process.proc is not None
        if process.proc.poll() is not None:
            raise AssertionError(f"{name} exited with {process.proc.returncode}:\n{process.log()}")
        return is_listening(socket)

    try:
        wait_until(serving, timeout, f"{name} to serve {socket}", interval=0.02)
    except TimeoutError as err:
        raise AssertionError(f"{err}:\n{process.log()}") from None
