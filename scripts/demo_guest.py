"""Runs inside a lab guest (Debian's python3, sent on guest-exec's stdin): the demo's workloads.

    python3 - build DIR LOG [--seconds S] [--rounds N]
    python3 - preswap SOCKET LOG [--seconds S] [--rounds N] [--pages P] [--budget B] [--ops K]
                                 [--pause S] [--anonymous] [--fill] [--peak-pages Q --peak-every E]
    python3 - probe DIR

`build` builds a real C project (zlib, configured in the image) in DIR, which is in the precache
mount, in a loop: `make clean`, the static library and zlib's own test programs, then zlib's self
test (`./example`) and a compress/decompress round trip of the library through `./minigzip`
compared with the original. `preswap` runs scripts.preswap_workload (random reads and writes on a
preswap region, every page verified) in a loop, pausing between runs: a memory user, not a fault
storm that would take the guest's one vCPU (and the daemon's) from the build; `--anonymous` runs it
on plain anonymous memory (an unmodified memory user: the kernel's swap pages it out), and every
E-th round uses Q pages instead of P (a user that sometimes needs more than the guest has). Both stop after S
seconds or N rounds, whichever comes first, append one JSON line per round to LOG (so a caller can
follow them while they run) and print a JSON summary; the exit status is 1 if any round failed.
Each starts a session of its own and writes its id to LOG.pid, so a caller can stop the whole
process group. `probe` prints one JSON object of the guest's counters for `scripts/bench seed`: /proc/vmstat,
/proc/swaps, block device stats, the guest agent's cgroup CPU and RSS, zswap's, and the records of
DIR's build.log and preswap.log.

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
        [
            "sh",
            "-c",
            "./minigzip < libz.a > libz.a.gz && ./minigzip -d < libz.a.gz | cmp - libz.a && rm -f libz.a.gz",
        ],
    ]
    for argv in steps:
        proc = subprocess.run(argv, cwd=directory, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            return {
                "ok": False,
                "failed": " ".join(argv),
                "rc": proc.returncode,
                "output": (proc.stdout + proc.stderr)[-2000:],
            }
    return {"ok": True}


def preswap_round(
    socket: str, pages: int, budget: int, ops: int, seed: int, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """One preswap_workload run: its JSON line (mismatches must be 0)."""
    env = dict(os.environ, PYTHONPATH=GUESTAGENT_DIR)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.preswap_workload",
            "--socket",
            socket,
            "--pages",
            str(pages),
            "--budget",
            str(budget),
            "--ops",
            str(ops),
            "--seed",
            str(seed),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"ok": False, "rc": proc.returncode, "output": (proc.stdout + proc.stderr)[-2000:]}
    result["ok"] = proc.returncode == 0 and result.get("mismatches") == 0
    return result


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _records(path: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _read(path).splitlines() if line.strip()]


AGENT_CGROUP = "/sys/fs/cgroup/system.slice/tmem-guestagent.service"
POOL_SWAP = "/dev/disk/by-id/virtio-tmem-swap"


def probe(directory: str) -> dict[str, Any]:
    """The guest's own counters, read in one go (every guest-exec costs the guest CPU under TCG)."""
    vmstat = {k: int(v) for k, v in (line.split() for line in _read("/proc/vmstat").splitlines())}
    blocks = {}
    for dev in os.listdir("/sys/block"):
        fields = _read(f"/sys/block/{dev}/stat").split()
        if len(fields) >= 7 and (int(fields[0]) or int(fields[4])):
            blocks[dev] = {
                "reads": int(fields[0]),
                "read_sectors": int(fields[2]),
                "writes": int(fields[4]),
                "write_sectors": int(fields[6]),
            }
    swaps = [line.split()[0] for line in _read("/proc/swaps").splitlines()[1:] if line.split()]
    # the host agent's swap device (issue 17): a virtio disk whose pages live in the pool
    pool_dev = os.path.realpath(POOL_SWAP) if os.path.exists(POOL_SWAP) else ""
    cpu = {k: int(v) for k, v in (line.split() for line in _read(f"{AGENT_CGROUP}/cpu.stat").splitlines())}
    rss_kib = 0
    for pid in _read(f"{AGENT_CGROUP}/cgroup.procs").split():
        for line in _read(f"/proc/{pid}/status").splitlines():
            if line.startswith("VmRSS:"):
                rss_kib += int(line.split()[1])
    zswap = {
        name: int(_read(f"/sys/kernel/debug/zswap/{name}").strip() or 0)
        for name in ("stored_pages", "written_back_pages", "pool_total_size")
        if os.path.exists(f"/sys/kernel/debug/zswap/{name}")
    }
    return {
        "vmstat": {k: vmstat.get(k, 0) for k in ("pgpgin", "pgpgout", "pswpin", "pswpout", "pgmajfault")},
        "blocks": blocks,
        "swaps": swaps,
        "pool_swap": pool_dev if pool_dev in swaps else "",
        "agent": {"running": bool(cpu), "cpu_seconds": cpu.get("usage_usec", 0) / 1e6, "rss_kib": rss_kib},
        "zswap": zswap,
        "zswap_enabled": _read("/sys/module/zswap/parameters/enabled").strip(),
        "build": _records(f"{directory}/build.log"),
        "preswap": _records(f"{directory}/preswap.log"),
    }


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
    p.add_argument("--anonymous", action="store_true", help="plain anonymous memory, no region")
    p.add_argument("--fill", action="store_true", help="write every page once first")
    p.add_argument("--peak-pages", type=int, default=0, help="pages of every --peak-every-th round")
    p.add_argument("--peak-every", type=int, default=0)
    q = sub.add_parser("probe")
    q.add_argument("dir")
    for s in (b, p):
        s.add_argument("log")
        s.add_argument("--seconds", type=float, default=float("inf"))
        s.add_argument("--rounds", type=int, default=1 << 30)
    args = ap.parse_args()
    if args.cmd == "probe":
        print(json.dumps(probe(args.dir)))
        return 0

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
            peak = args.peak_every > 0 and args.peak_pages > 0 and (rounds + 1) % args.peak_every == 0
            extra = (("--anonymous",) if args.anonymous else ()) + (("--fill",) if args.fill else ())
            record = preswap_round(
                args.socket,
                args.peak_pages if peak else args.pages,
                args.budget,
                args.ops,
                seed=rounds + 1,
                extra=extra,
            )
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
