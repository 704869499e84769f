"""The mount keeper (guestagent.mountkeeper): precache over a tree the guest agent itself runs from.

The pure parts (the FUSE mount data, the keeper's messages), then real daemons in a mount namespace
of the test's own (`unshare --mount --propagation private`; the host's /usr is never touched), each
covering a tree it needs with its precache mount, mountpoint = backing (tests/support/covered_tree.py):

- /usr: every program the clients run (sh, env, python3's libraries) is exec'd through the mount;
- the guestagent package: the daemon imports its preswap agent only once the channel is up, after
  the mount covers the package (the shim would wait for itself without a namespace of its own).

The daemon serves on, the files read through the mount are the tree's, the kernel drops its pages and
the pool serves the re-reads; then the daemon is SIGKILLed (or stopped) and the tree is the original
again within two seconds, programs run from it, the keeper is gone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import guestagent
from guestagent import mountkeeper
from tests.support.host_agent import HostAgentProcess

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = str(Path(guestagent.__file__).resolve().parent)


# ------------------------------------------------------------------------------- pure parts


def test_the_fuse_mount_data_is_what_libfuse_writes() -> None:
    assert mountkeeper.fuse_mount_data(7, 0o40755, 0, 0, allow_other=False) == (
        "fd=7,rootmode=40000,user_id=0,group_id=0"
    )
    assert mountkeeper.fuse_mount_data(12, 0o41777, 1000, 100, allow_other=True) == (
        "fd=12,rootmode=40000,user_id=1000,group_id=100,allow_other,default_permissions"
    )


def test_messages_round_trip_and_refuse_a_nul() -> None:
    message = mountkeeper.encode("mount", "/usr", "40755", "1")
    assert mountkeeper.decode(message) == ("mount", ["/usr", "40755", "1"])
    assert mountkeeper.decode(mountkeeper.encode("ok")) == ("ok", [])
    with pytest.raises(ValueError, match="NUL"):
        mountkeeper.encode("mount", "/a\0b")


def test_the_keeper_refuses_what_it_did_not_mount() -> None:
    """In a child (the keeper must be forked single-threaded): an unmount of a path it never
    mounted is an error with its errno, and the keeper answers on."""
    code = (
        "import errno; from guestagent import mountkeeper as m\n"
        "k = m.Keeper.start()\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        k.unmount('/nowhere')\n"
        "    except m.KeeperError as e:\n"
        "        assert e.errno == errno.ENOENT, e\n"
        "    else:\n"
        "        raise SystemExit('no error')\n"
        "k.close(); print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr


# ------------------------------------------------------------------------------- covering a tree


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tmem-mk", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # the namespace, and its mounts, died with the helper


def cover(host_agent: HostAgentProcess, work: Path, tree: str, sample: str, *extra: str) -> dict[str, Any]:
    """Run tests/support/covered_tree.py in a mount namespace of its own; its JSON."""
    commands = [
        ["/usr/bin/env", "true"],
        ["sh", "-c", "echo ok"],
        [sys.executable, "-c", "import json, decimal, ctypes, sqlite3, guestagent.swapper"],
    ]
    argv = ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m"]
    argv += ["tests.support.covered_tree", "--tree", tree, "--sample", sample, "--workdir", str(work)]
    argv += ["--channel", host_agent.sockets["g1"], *extra]
    for command in commands:
        argv += ["--exec", json.dumps(command)]
    pipe = subprocess.PIPE
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=pipe, stderr=pipe, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:  # a deadlock: everything in the namespace goes
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    log = (work / "daemon.log").read_text(errors="replace") if (work / "daemon.log").exists() else ""
    assert proc.returncode == 0, f"{err.decode(errors='replace')}\n--- daemon log ---\n{log[-6000:]}"
    result: dict[str, Any] = json.loads(out)
    print(json.dumps(result, indent=1))
    return result


def check(result: dict[str, Any]) -> None:
    assert result["we_see_fuse"] and result["keeper_sees_fuse"], result
    # the daemon's own namespace has the tree as it was: nothing it does reaches its own mount
    assert result["daemon_own_namespace"] and not result["daemon_sees_fuse"], result
    assert result["exec_rcs"] == result["exec_rcs_again"] == [0, 0, 0], result
    assert result["sample_files"] >= 20, result
    assert result["bad_through_mount"] == result["bad_after_evict"] == [], result
    rereads = result["rereads"]  # the kernel dropped its pages: the pool served the re-reads
    assert rereads["reads"] > 0 and rereads["hits"] >= 0.9 * rereads["gets"] > 0, rereads
    # after the stop the tree is the original again, at once
    assert result["original_after"] < 2.0, result
    assert not result["fuse_left"] and result["keeper_left"] == [], result
    assert result["exec_rcs_after"] == [0, 0, 0] and result["bad_after_stop"] == [], result


def test_a_daemon_over_usr_serves_execs_and_a_sigkill_leaves_usr_usable(
    host_agent: HostAgentProcess, work: Path
) -> None:
    result = cover(host_agent, work, "/usr", "/usr/bin")
    check(result)
    assert result["daemon_rc"] == -signal.SIGKILL


def test_a_daemon_over_its_own_package_imports_late_and_stops_cleanly(
    host_agent: HostAgentProcess, work: Path
) -> None:
    """The preswap agent is imported when the channel comes up, after the mount covers the package:
    from the daemon's namespace, the original files.  SIGTERM: the mount is detached, exit 0."""
    result = cover(host_agent, work, PACKAGE, PACKAGE, "--preswap", "--stop", "TERM")
    check(result)
    assert result["preswap_running"], result
    assert result["daemon_rc"] == 0, result


def test_systemds_stop_sigterm_to_daemon_and_keeper_leaves_usr_as_it_was(
    host_agent: HostAgentProcess, work: Path
) -> None:
    """systemd stops the unit with SIGTERM to every process in it: the keeper detaches at once and
    stays until the daemon, which stops cleanly, is gone."""
    result = cover(host_agent, work, "/usr", "/usr/bin", "--stop", "TERM-ALL")
    check(result)
    assert result["daemon_rc"] == 0, result
