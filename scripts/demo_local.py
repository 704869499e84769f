"""The local demo: one host agent, three guests as local processes, tmem doing its job.

Until the KVM lab lands, the guests are processes on this host speaking the real protocol over the
real guest sockets (in the lab, the same bytes cross a virtio-serial port). Each guest:

- keeps a "page cache" of SMALL pages of a file set 3x that size: pages it evicts are put to its
  private ephemeral pool (precache), and every miss tries an exclusive get before "reading the disk"
  (regenerating the page), verifying every byte either way;
- keeps an anonymous working set in a persistent pool (preswap): pages swapped out are put, faults
  get them back, every byte verified.

The host pool is deliberately smaller than what the guests would like to keep, so the weights
(1:1:2) decide who keeps what. `hostagent stats` is shown while they run; the summary comes from the
agent's and the guests' counters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from guestagent.channel import open_channel
from guestagent.protocol import wire

ROOT = Path(__file__).resolve().parent.parent
GUESTS = (("alpha", 1), ("beta", 1), ("gamma", 2))


def page_of(seed: bytes, index: int) -> bytes:
    """A deterministic hex-text page: lz4 saves a little on it, and every byte can be checked."""
    return hashlib.shake_128(seed + index.to_bytes(8, "little")).hexdigest(wire.PAGE_SIZE // 2).encode()


async def guest_main(name: str, sock: str, seconds: float, cache_pages: int, out: Path) -> None:
    """One guest's workload; writes its own counters to `out` as JSON."""
    rng = random.Random(name)
    files = 3 * cache_pages
    seed = name.encode()
    counters = {
        "reads": 0,
        "cache_hits": 0,
        "precache_hits": 0,
        "disk_reads": 0,
        "swap_outs": 0,
        "swap_ins": 0,
        "swap_refused": 0,
        "verified": 0,
    }
    async with open_channel(sock, name=name) as ch:
        pre = await ch.new_pool(0)
        swap = await ch.new_pool(int(wire.PoolFlag.PERSISTENT | wire.PoolFlag.EXCLUSIVE_GETS))
        cache: dict[int, bytes] = {}
        swapped: set[int] = set()
        resident: dict[int, bytes] = {}
        oid = hashlib.sha256(b"file-set " + seed).digest()[:24]
        anon = hashlib.sha256(b"anon " + seed).digest()[:24]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(64):
                # precache: read a page of the file set through a small cache
                i = min(int(rng.expovariate(1 / cache_pages)), files - 1)
                counters["reads"] += 1
                page = cache.get(i)
                if page is not None:
                    counters["cache_hits"] += 1
                else:
                    page = await pre.get(oid, i)
                    if page is not None:
                        counters["precache_hits"] += 1
                    else:
                        counters["disk_reads"] += 1
                        page = page_of(seed, i)
                    if page != page_of(seed, i):
                        raise SystemExit(f"{name}: wrong bytes for file page {i}")
                    counters["verified"] += 1
                    if len(cache) >= cache_pages:  # evict the oldest clean page: put it to tmem
                        victim = next(iter(cache))
                        pre.put_nowait(oid, victim, cache.pop(victim))
                    cache[i] = page
                # preswap: touch the anonymous working set, swapping the coldest page out
                j = rng.randrange(cache_pages)
                if j in swapped:
                    got = await swap.get(anon, j)
                    if got != page_of(anon, j):
                        raise SystemExit(f"{name}: swap page {j} lost or wrong")
                    swapped.discard(j)
                    counters["swap_ins"] += 1
                    counters["verified"] += 1
                    resident[j] = got
                elif j not in resident:
                    resident[j] = page_of(anon, j)
                if len(resident) > cache_pages // 2:
                    k = next(iter(resident))
                    if await swap.put(anon, k, resident.pop(k)):
                        swapped.add(k)
                        counters["swap_outs"] += 1
                    else:  # refused: the page stays in memory (a guest would write its swap file)
                        counters["swap_refused"] += 1
                        resident[k] = page_of(anon, k)
            await ch.report_stats({"demo_reads": counters["reads"]})
        out.write_text(json.dumps(counters))


def cli(config: Path, *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "hostagent", *args, "--config", str(config)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0, help="how long the guests run")
    ap.add_argument("--cache-pages", type=int, default=2000, help="each guest's own page cache")
    ap.add_argument("--pool-mib", type=int, default=24, help="the host pool's limit")
    ap.add_argument("--guest", nargs=3, metavar=("NAME", "SOCKET", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.guest:
        name, sock, out = args.guest
        trio.run(guest_main, name, sock, args.seconds, args.cache_pages, Path(out))
        return 0

    work = Path(tempfile.mkdtemp(prefix="tmem-demo-"))
    arena = Path(tempfile.mkdtemp(prefix="tmem-demo-", dir="/dev/shm"))
    config = work / "hostagent.toml"
    guests = "".join(f'[[guest]]\nname = "{n}"\nweight = {w}\n\n' for n, w in GUESTS)
    config.write_text(
        f'[pool]\nlimit_mib = {args.pool_mib}\nhost_reserve_mib = 512\narena_dir = "{arena}"\n\n'
        f'[control]\nsocket = "{work}/control.sock"\n\n[channels]\ndir = "{work}/guests"\n\n'
        f"[defaults]\nquota_mib = 8\n\n{guests}"
    )
    print(f"[demo] host agent: {config}", flush=True)
    with open(work / "hostagent.log", "w") as agent_log:
        agent = subprocess.Popen(
            [sys.executable, "-W", "ignore", "-m", "hostagent", "run", "--config", str(config)],
            stderr=agent_log,
        )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(100):
            if (work / "control.sock").exists():
                break
            if agent.poll() is not None:
                print((work / "hostagent.log").read_text(), file=sys.stderr)
                return 1
            time.sleep(0.1)
        for name, _ in GUESTS:
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-W",
                        "ignore",
                        __file__,
                        "--seconds",
                        str(args.seconds),
                        "--cache-pages",
                        str(args.cache_pages),
                        "--guest",
                        name,
                        str(work / "guests" / f"{name}.sock"),
                        str(work / f"{name}.json"),
                    ]
                )
            )
        print(f"[demo] {len(GUESTS)} guests running for {args.seconds:.0f} s; hostagent stats:", flush=True)
        start = time.monotonic()
        live: dict[str, Any] = {}  # the last stats taken while every guest was still connected
        while any(p.poll() is None for p in procs):
            time.sleep(min(10.0, max(1.0, args.seconds / 4)))
            print(f"\n--- t+{time.monotonic() - start:.0f}s ---\n{cli(config, 'stats')}", flush=True)
            sample = json.loads(cli(config, "stats", "--json"))
            if all(g.get("connected") for g in sample["guests"].values()):
                live = sample
        if any(p.returncode for p in procs):
            print("[demo] a guest failed (see above)", file=sys.stderr)
            return 1
        stats: dict[str, Any] = json.loads(cli(config, "stats", "--json"))
        for name, g in live.get("guests", {}).items():
            stats["guests"][name]["ephemeral"]["bytes"] = g["ephemeral"]["bytes"]
        print(summary(stats, {n: json.loads((work / f"{n}.json").read_text()) for n, _ in GUESTS}))
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=10)
        subprocess.run(["rm", "-rf", str(work), str(arena)], check=False)


def summary(stats: dict[str, Any], guests: dict[str, dict[str, int]]) -> str:
    """Figures from the counters: the guests' own and the host agent's."""
    lines = ["", "[demo] summary (from counters)"]
    total_misses = total_pre = 0
    for name, c in guests.items():
        misses = c["precache_hits"] + c["disk_reads"]
        total_misses += misses
        total_pre += c["precache_hits"]
        host = stats["guests"][name]
        lines.append(
            f"  {name:6} weight {host['weight']}: cache misses {misses}, served by precache "
            f"{100 * c['precache_hits'] / max(1, misses):.0f}%, swap-outs {c['swap_outs']} "
            f"(refused {c['swap_refused']}), swap-ins {c['swap_ins']}, pages verified {c['verified']}, "
            f"ephemeral pool share while running {host['ephemeral']['bytes'] / 2**20:.1f} MiB"
        )
    pool = stats["pool"]
    agent = stats.get("agent", {})
    lines.append(
        f"  page-ins served by precache: {100 * total_pre / max(1, total_misses):.0f}% "
        f"({total_pre} of {total_misses} misses kept off the disk)"
    )
    lines.append(
        f"  pool: {pool['used_bytes'] / 2**20:.1f} MiB of {pool['limit_bytes'] / 2**20:.0f} "
        f"MiB holding {pool['raw_bytes'] / 2**20:.1f} MiB of pages, "
        f"{pool['evictions']} evictions; host agent CPU {agent.get('cpu_seconds', 0):.1f} s"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
