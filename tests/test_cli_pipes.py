"""The CLIs piped into a reader that stops early (`hostagent pools | head -1`).

Why: a command whose reader went away must end quietly, as cat does, not print a BrokenPipeError
traceback (issue 15). The pipe's read end is closed before the command writes, so every write
fails with EPIPE; with enough output, also when the reader closes mid-way.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from guestagent.protocol.wire import PoolFlag
from tests.support.host_agent import HostAgentProcess
from tests.support.wire_guest import connected


def run_into_closed_pipe(*argv: str) -> tuple[int, str]:
    """Run argv with stdout a pipe whose read end is already closed; its exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-W", "ignore::UserWarning", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    return proc.wait(30), err


def run_into_head(*argv: str) -> tuple[int, str, str]:
    """`argv | head -1`, through a real shell pipeline."""
    cmd = " ".join([sys.executable, "-W", "ignore::UserWarning", *argv])
    res = subprocess.run(
        [
            "bash",
            "-c",
            f"set -o pipefail; {cmd} 2>/tmp/tmem-pipe-err.$$ | head -1; rc=$?; "
            "cat /tmp/tmem-pipe-err.$$ >&2; rm -f /tmp/tmem-pipe-err.$$; exit $rc",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return res.returncode, res.stdout, res.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["pools"],
        ["pools", "--json"],
        ["stats"],
        ["stats", "--json"],
        ["reserve", "1"],
        ["reserve", "1", "--json"],
    ],
    ids=lambda a: " ".join(a),
)
def test_hostagent_client_commands_end_quietly_when_the_reader_is_gone(
    host_agent: HostAgentProcess, args: list[str]
) -> None:
    with connected(host_agent, "g1") as g:
        for _ in range(300):  # output far larger than a pipe's buffer
            g.new_pool(int(PoolFlag.PERSISTENT))
        rc, err = run_into_closed_pipe("-m", "hostagent", *args, "--control", host_agent.control)
        assert "Traceback" not in err and "BrokenPipe" not in err, err
        assert rc == 141, (rc, err)  # 128 + SIGPIPE, as a command killed by it reports
        rc, out, err = run_into_head("-m", "hostagent", *args, "--control", host_agent.control)
        assert out.strip(), "head got its line"
        assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_guestagent_check_ends_quietly_when_the_reader_is_gone(host_agent: HostAgentProcess) -> None:
    rc, err = run_into_closed_pipe("-m", "guestagent", "check", host_agent.sockets["g2"])
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert rc == 141, (rc, err)
