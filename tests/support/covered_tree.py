"""A guest agent covering a tree it runs from, in a mount namespace of the test's own.

Run as `unshare --mount --propagation private -- python -m tests.support.covered_tree ARGS` (the
host's own trees are never touched): the namespace stands for a guest's.  A `guestagent run` daemon
mounts precache over TREE itself (`[[precache]]` with mountpoint = backing); clients exec and read
through the mount, the kernel drops its pages, they read again (from the pool); then the daemon is
stopped (SIGKILL or SIGTERM) and the tree must be the original again within a second or two.
Prints what it saw as one JSON object (tests/test_mountkeeper.py checks it).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from guestagent import control

SAMPLE_FILES = 300
SAMPLE_MAX_BYTES = 2 << 20
EVICT = "user.tmem.precache.evict"
LOG_ARGS = ("--log-level", "INFO")


def sample(root: Path) -> list[str]:
    """Up to SAMPLE_FILES regular files under `root` (relative paths, sorted walk)."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_file() and not path.is_symlink() and 0 < st.st_size <= SAMPLE_MAX_BYTES:
                out.append(str(path.relative_to(root)))
                if len(out) >= SAMPLE_FILES:
                    return out
    return out


def digests(root: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest() for n in names}


def fuse_at(pid: int | str, tree: str) -> bool:
    """Whether `tree` is a FUSE mount in the mount namespace of process `pid`."""
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == tree and right.split()[0].startswith("fuse"):
            return True
    return False


def alive(pid: str) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def runs(commands: list[list[str]]) -> list[int]:
    done = [subprocess.run(argv, capture_output=True, timeout=120, check=False) for argv in commands]
    return [d.returncode for d in done]


def wait_for(what: str, pred: Any, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"covered_tree: not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tree", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--sample", required=True, help="a directory under the tree whose files are compared")
    p.add_argument("--exec", action="append", default=[], help="a command (JSON argv) run through the mount")
    p.add_argument("--preswap", action="store_true", help="also serve preswap (the daemon imports it late)")
    p.add_argument(
        "--stop",
        choices=("KILL", "TERM", "TERM-ALL"),
        default="KILL",
        help="SIGKILL or SIGTERM to the daemon, or SIGTERM to the daemon and its keeper (systemd's stop)",
    )
    args = p.parse_args()
    tree, work = os.path.realpath(args.tree), Path(args.workdir)
    commands = [json.loads(c) for c in args.exec]
    orig = work / "orig"  # the tree itself, reachable after the mount covers it
    orig.mkdir()
    subprocess.run(["mount", "--bind", tree, str(orig)], check=True)
    names = [str(Path(args.sample).relative_to(tree) / n) for n in sample(Path(args.sample))]
    want = digests(orig, names)
    sock = str(work / "ga.sock")
    cfg = work / "guestagent.toml"
    text = (
        '[channel]\nname = "covered"\nretry_interval = 0.1\n[report]\ninterval = 0.2\n'
        f'[control]\nsocket = "{sock}"\n'
        f'[[precache]]\nbacking = "{tree}"\nmountpoint = "{tree}"\nallow_other = true\n'
    )
    if args.preswap:
        text += f'[preswap]\nenabled = true\nsocket = "{work}/preswap.sock"\nswap_file = "{work}/swap"\n'
    cfg.write_text(text)
    out: dict[str, Any] = {}
    channel = ("--channel", args.channel)
    with (work / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "guestagent", "run", "--config", str(cfg), *channel, *LOG_ARGS],
            stdout=log,
            stderr=log,
        )
    dev = os.stat(orig).st_dev
    try:
        out["mounted_after"] = wait_for("the mount", lambda: os.stat(tree).st_dev != dev, 30)

        def pool() -> bool:
            stats = control.request(sock, {"cmd": "stats"}, timeout=10)
            return bool((stats.get("precache") or {}).get("connected"))

        wait_for("the mount's pool", pool, 30)
        out["we_see_fuse"] = fuse_at("self", tree)
        out["daemon_sees_fuse"] = fuse_at(daemon.pid, tree)
        out["daemon_own_namespace"] = os.readlink(f"/proc/{daemon.pid}/ns/mnt") != os.readlink(
            "/proc/self/ns/mnt"
        )
        children = Path(f"/proc/{daemon.pid}/task/{daemon.pid}/children").read_text().split()
        keepers = [c for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "tmem-keeper"]
        out["keeper_sees_fuse"] = bool(keepers) and fuse_at(keepers[0], tree)
        out["exec_rcs"] = runs(commands)
        out["bad_through_mount"] = sorted(n for n, d in digests(Path(tree), names).items() if d != want[n])
        before = control.request(sock, {"cmd": "stats"})["precache"]
        os.setxattr(tree, EVICT, b"1")  # the kernel drops its pages of the mount's files
        out["bad_after_evict"] = sorted(n for n, d in digests(Path(tree), names).items() if d != want[n])
        after = control.request(sock, {"cmd": "stats"})
        out["rereads"] = {k: after["precache"][k] - before[k] for k in ("reads", "gets", "hits", "misses")}
        out["preswap_running"] = bool((after.get("preswap") or {}).get("running"))
        out["sample_files"] = len(names)
        # the daemon serves on while clients exec through the mount, again and again
        out["exec_rcs_again"] = runs(commands)
        stop = time.monotonic()
        daemon.send_signal(signal.SIGKILL if args.stop == "KILL" else signal.SIGTERM)
        if args.stop == "TERM-ALL":
            for keeper in keepers:
                os.kill(int(keeper), signal.SIGTERM)
        dead: list[int] = []  # stats that met the dead mount before the detach (ENOTCONN, ECONNABORTED)

        def original() -> bool:
            try:
                return os.stat(tree).st_dev == dev
            except OSError as exc:
                if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                    raise
                dead.append(1)
                return False

        out["original_after"] = wait_for("the tree underneath again", original, 10)
        out["enotconn_seen"] = len(dead)
        out["daemon_rc"] = daemon.wait(30)
        out["stopped_in"] = round(time.monotonic() - stop, 3)
        out["exec_rcs_after"] = runs(commands)
        out["bad_after_stop"] = sorted(n for n, d in digests(Path(tree), names).items() if d != want[n])
        out["fuse_left"] = fuse_at("self", tree)
        time.sleep(0.2)
        out["keeper_left"] = [k for k in keepers if alive(k)]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
