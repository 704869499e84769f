"""Runs inside a lab guest (Debian's python3, sent on guest-exec's stdin): the demo's workloads.

    python3 - build DIR LOG [--seconds S] [--rounds N]
    python3 - preswap SOCKET LOG [--seconds S] [--rounds N] [--pages P] [--budget B] [--ops K]
                                 [--pause S]

`build` builds a real C project (zlib, configured in the image) in DIR, which is in the precache
mount, in a loop: `make clean`, the static library and zlib's own test programs, then zlib's self
test (`./example`) and a compress/decompress round trip of the library through `./minigzip`
compared with the original. `preswap` runs guestagent.preswap_workload (random reads and writes on a
preswap region, every page verified) in a loop, pausing between runs: a memory user, not a fault
storm that would take the guest's one vCPU (and the daemon's) from the build. Both stop after S
seconds or N rounds, whichever comes first, append one JSON line per round to LOG (so a caller can
follow them while they run) and print a JSON summary; the exit status is 1 if any round failed.
Each starts a session of its own and writes its id to LOG.pid, so a caller can stop the whole
process group.

Standard library only: it runs on the guest's python3, outside the project's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

GUESTAGENT_DIR = "/opt/tmem"  # where the image installs the guestagent package


def log_line(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def build_round(directory: str) -> dict[str, Any]:
    """One build of the library and its tests, checked; what failed, if anything."""
    steps = [
        ["make", "-s", "clean"],
        ["make", "-s", "libz.a", "example", "minigzip"],
        ["./example"],
        ["sh", "-c", "./minigzip < libz.a > libz.a.gz && ./minigzip -d < libz.a.gz | cmp - libz.a"
                     " && rm -f libz.a.gz"],
    ]
    for argv in steps:
        proc = subprocess.run(argv, cwd=directory, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {"ok": False, "failed": " ".join(argv), "rc": proc.returncode,
                    "output": (proc.stdout + proc.stderr)[-2000:]}
    return {"ok": True}


def preswap_round(socket: str, pages: int, budget: int, ops: int, seed: int) -> dict[str, Any]:
    """One preswap_workload run: its JSON line (mismatches must be 0)."""
    env = dict(os.environ, PYTHONPATH=GUESTAGENT_DIR)
    proc = subprocess.run([sys.executable, "-m", "guestagent.preswap_workload", "--socket", socket,
                           "--pages", str(pages), "--budget", str(budget), "--ops", str(ops),
                           "--seed", str(seed)], env=env, capture_output=True, text=True, check=False)
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:]}
    result["ok"] = proc.returncode == 0 and result.get("mismatches") == 0
    return result


def main() -> int:
    ap = argparse.ArgumentParser(prog="demo_guest")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir")
    p = sub.add_parser("preswap")
    p.add_argument("socket")
    p.add_argument("--pages", type=int, default=8192)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--ops", type=int, default=20000)
    p.add_argument("--pause", type=float, default=0.0, help="seconds between runs")
    for s in (b, p):
        s.add_argument("log")
        s.add_argument("--seconds", type=float, default=float("inf"))
        s.add_argument("--rounds", type=int, default=1 << 30)
    args = ap.parse_args()

    os.setsid()  # a process group of our own: the caller stops make, gcc and all with one kill
    with open(args.log + ".pid", "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + args.seconds
    rounds = failed = 0
    started = time.monotonic()
    while rounds < args.rounds and time.monotonic() < deadline:
        t0 = time.monotonic()
        if args.cmd == "build":
            record = build_round(args.dir)
        else:
            record = preswap_round(args.socket, args.pages, args.budget, args.ops, seed=rounds + 1)
        rounds += 1
        failed += not record["ok"]
        record.update(round=rounds, seconds=round(time.monotonic() - t0, 1))
        log_line(args.log, record)
        if args.cmd == "preswap" and rounds < args.rounds:
            time.sleep(max(0.0, min(args.pause, deadline - time.monotonic())))
    summary = {"rounds": rounds, "failed": failed, "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
