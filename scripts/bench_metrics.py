"""Metrics benchmark: what scraping /metrics costs the host agent's loop.

Prints ONE JSON object. A real `hostagent run` with GUESTS configured guests (temp config, arena on
/dev/shm, [metrics] on a free port); guest g0 times `samples` gets of a missing page (one round trip
through the agent's loop each), first idle, then while another thread scrapes /metrics back to back
(far more than any scrape interval). Reported: the scrape's size and sample count, scrapes done,
the median scrape time, and the get round trip (p50, p99, max) idle and while scraping.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from hostagent import control
from scripts.processes import bench_config, hostagent
from tests.support.wire_guest import WireGuest

ROOT = Path(__file__).resolve().parent.parent


def percentiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_ms": round(xs[len(xs) // 2] * 1e3, 2),
        "p99_ms": round(xs[int(len(xs) * 0.99)] * 1e3, 2),
        "max_ms": round(xs[-1] * 1e3, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guests", type=int, default=200)
    ap.add_argument("--samples", type=int, default=500)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tmem-bm", dir="/tmp"))
    arena = Path(tempfile.mkdtemp(prefix="tmem-bm", dir="/dev/shm"))
    guests = "".join(f'[[guest]]\nname = "g{i}"\n' for i in range(args.guests))
    cfg = bench_config(work, arena, 64, "[metrics]\nenabled = true\nport = 0\n" + guests)
    agent = subprocess.Popen(
        hostagent("run", "--config", str(cfg)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        while not control.is_listening(f"{work}/control.sock"):
            if agent.poll() is not None:
                raise SystemExit("the host agent did not start")
            time.sleep(0.05)
        m = control.request(f"{work}/control.sock", {"cmd": "stats"})["agent"]["metrics"]
        url = f"http://127.0.0.1:{m['port']}/metrics"
        g = WireGuest(f"{work}/guests/g0.sock")
        g.hello("bench")
        pool = g.new_pool(0)

        def gets() -> dict[str, float]:
            out = []
            for _ in range(args.samples):
                t = time.perf_counter()
                g.get(pool, 1, 0)
                out.append(time.perf_counter() - t)
                time.sleep(0.002)
            return percentiles(out)

        idle = gets()
        stop = threading.Event()
        scrape_times: list[float] = []
        body = b""

        def scraper() -> None:
            nonlocal body
            while not stop.is_set():
                t = time.perf_counter()
                with urllib.request.urlopen(url, timeout=30) as resp:
                    body = resp.read()
                scrape_times.append(time.perf_counter() - t)

        th = threading.Thread(target=scraper)
        th.start()
        busy = gets()
        stop.set()
        th.join()
        samples = sum(1 for ln in body.splitlines() if ln and not ln.startswith(b"#"))
        print(
            json.dumps(
                {
                    "guests": args.guests,
                    "scrape_bytes": len(body),
                    "scrape_samples": samples,
                    "scrapes": len(scrape_times),
                    "scrape_ms_p50": percentiles(scrape_times)["p50_ms"],
                    "get_idle": idle,
                    "get_while_scraping": busy,
                }
            )
        )
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(arena, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
