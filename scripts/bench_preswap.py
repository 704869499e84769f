"""Preswap fault service on the host: from tmem, from the swap file, and first-touch zero faults.

Starts a host agent (temp config, arena on /dev/shm) and a swapper process on its own channel;
this process is the application (its faults are handled by the swapper).  Three passes, each over
a region of PAGES pages, timing one access per page:

- zero: budget >= the region, first touch of every page (UFFDIO_ZEROPAGE, no eviction);
- tmem: budget 64 pages, every page written once, then read in order twice: every access is a
  fault served by an exclusive get (and pays its share of the eviction of another page: WP,
  PUT_VEC, punch hole);
- disk: the same with the guest's quota at 0, so every put is refused and the swap file serves;
- tmem_readahead: the tmem pass with readahead on (up to 16 pages per sequential fault): time
  per page brought in (`us_per_page`), as a sequential scan sees it.

The first three run with readahead off, so each access is one fault.

Eviction policy: the same 80/20 workload (80% of operations on 20% of the pages, the hot set
smaller than the budget) against a swapper with the clock policy and one with FIFO; refaults
(tmem faults) compared, readahead off.

Then (unless --no-soak) the soak: a region 4x its budget under random verified reads and writes
with 100,000+ faults (`scripts/preswap_workload.py`).  Prints one JSON object; the tmem path must
beat the disk path (`targets_met`).  The swap file sits in a temp dir under /var/tmp (a disk, not
tmpfs, where /var/tmp is on one); the page cache still absorbs much of it on an idle host.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from guestagent import preswap
from guestagent.protocol.jsonline import is_listening
from scripts.processes import bench_config, hostagent, preswap_workload, stop, wait_started

PAGE = preswap.PAGE


def _config(tmp: Path, shm: Path) -> Path:
    return bench_config(tmp, shm / "arena", 512, '[[guest]]\nname = "bench"\ncompress = false\n')


def _pass(sock: str, pages: int, budget: int, write_first: bool, reads: int) -> dict[str, Any]:
    with preswap.Region(pages * PAGE, sock, budget_pages=budget) as region:
        buf = region.buf
        if write_first:
            for p in range(pages):
                buf[p * PAGE] = (p % 251) + 1
        before = preswap.stats(sock)["regions"][str(region.id)]
        start = time.perf_counter()
        bad = 0
        for _ in range(reads):
            for p in range(pages):
                if buf[p * PAGE] != ((p % 251) + 1 if write_first else 0):
                    bad += 1
        elapsed = time.perf_counter() - start
        after = preswap.stats(sock)["regions"][str(region.id)]
    faults = after["faults"] - before["faults"]
    return {
        "accesses": pages * reads,
        "faults": faults,
        "seconds": round(elapsed, 3),
        "faults_per_s": round(faults / elapsed),
        "us_per_fault": round(elapsed / faults * 1e6, 1),
        "mismatches": bad,
        "kinds": {k: after[k] - before[k] for k in ("zero_faults", "tmem_faults", "disk_faults")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", type=int, default=8192, help="region size in pages per pass")
    parser.add_argument("--soak-ops", type=int, default=140_000, help="soak operations (~0.75 fault each)")
    parser.add_argument("--no-soak", action="store_true")
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="bench-preswap-") as tmpdir,
        tempfile.TemporaryDirectory(prefix="bench-preswap-", dir="/dev/shm") as shmdir,
        tempfile.TemporaryDirectory(prefix="bench-preswap-", dir="/var/tmp") as diskdir,
    ):
        tmp, shm = Path(tmpdir), Path(shmdir)
        sock = str(tmp / "preswap.sock")
        control = str(tmp / "control.sock")
        log = open(tmp / "log", "wb")  # noqa: SIM115 - closed below
        procs: list[subprocess.Popen[bytes]] = []
        try:
            run = hostagent("run", "--config", str(_config(tmp, shm)), "--log-level", "WARNING")
            host = subprocess.Popen(run, stderr=log)
            procs.append(host)
            wait_started(host, lambda: is_listening(str(tmp / "guests" / "bench.sock")), "hostagent run")

            def start_swapper(policy: str, readahead: int = 1) -> subprocess.Popen[bytes]:
                if os.path.exists(sock):
                    os.unlink(sock)
                swapper = subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).resolve().parent / "preswap_swapper.py"),
                        "--channel",
                        str(tmp / "guests" / "bench.sock"),
                        "--socket",
                        sock,
                        "--swap-file",
                        os.path.join(diskdir, "swap"),
                        "--policy",
                        policy,
                        "--readahead",
                        str(readahead),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
                procs.append(swapper)
                wait_started(swapper, lambda: is_listening(sock), "swapper")
                return swapper

            def skewed() -> dict[str, Any]:
                hot = ("--hot-pages", "0.2", "--hot-ops", "0.8")
                run = subprocess.run(
                    preswap_workload(sock, 4096, 1024, 30000, *hot), capture_output=True, check=True
                )
                out: dict[str, Any] = json.loads(run.stdout)
                return {
                    "refaults": out["agent"]["tmem_faults"],
                    "mismatches": out["mismatches"],
                    "seconds": out["seconds"],
                }

            result: dict[str, Any] = {"pages": args.pages, "loadavg": os.getloadavg()}
            policies = {}
            for policy in ("fifo", "clock"):
                swapper = start_swapper(policy)
                policies[policy] = skewed()
                swapper.send_signal(signal.SIGTERM)
                swapper.wait(10)
            swapper = start_swapper("clock", readahead=16)
            result["tmem_readahead"] = _pass(sock, args.pages, 64, True, 2)
            swapper.send_signal(signal.SIGTERM)
            swapper.wait(10)
            start_swapper("clock")  # no readahead: one fault per page below
            result["zero"] = _pass(sock, args.pages, args.pages, False, 1)
            result["tmem"] = _pass(sock, args.pages, 64, True, 2)

            def quota(mib: int) -> None:
                argv = hostagent("set", "bench", f"quota={mib}", "--control", control)
                subprocess.run(argv, check=True, capture_output=True)

            quota(0)
            result["disk"] = _pass(sock, args.pages, 64, True, 2)
            quota(1 << 20)
            tmem, disk, zero = (result[k]["us_per_fault"] for k in ("tmem", "disk", "zero"))
            ra = result["tmem_readahead"]
            ra["us_per_page"] = round(ra["seconds"] / ra["accesses"] * 1e6, 1)
            result["ratios"] = {
                "disk_over_tmem": round(disk / tmem, 2),
                "tmem_over_tmem_readahead_per_page": round(tmem / ra["us_per_page"], 2),
                "tmem_over_zero": round(tmem / zero, 2),
            }
            result["policy_80_20"] = {
                **policies,
                "clock_refaults_over_fifo": round(
                    policies["clock"]["refaults"] / policies["fifo"]["refaults"], 2
                ),
            }
            if not args.no_soak:
                soak = subprocess.run(
                    preswap_workload(sock, 4096, 1024, args.soak_ops), capture_output=True, check=False
                )
                result["soak"] = json.loads(soak.stdout)
            mismatches = sum(result[k]["mismatches"] for k in ("zero", "tmem", "disk", "tmem_readahead"))
            mismatches += sum(p["mismatches"] for p in policies.values())
            result["targets_met"] = {
                "tmem_beats_disk": tmem < disk,
                "clock_beats_fifo": policies["clock"]["refaults"] < policies["fifo"]["refaults"],
                "no_mismatches": mismatches == 0 and result.get("soak", {}).get("mismatches", 0) == 0,
                "soak_100k_faults": args.no_soak or result["soak"]["agent"]["faults"] >= 100_000,
            }
        except BaseException:
            log.flush()
            sys.stderr.write((tmp / "log").read_text())
            raise
        finally:
            for proc in reversed(procs):
                stop(proc)
            log.close()
    print(json.dumps(result))
    return 0 if all(result["targets_met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
