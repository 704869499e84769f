"""The seed experiment, side by side: the same guests and loads with tmem and with what users have.

    scripts/bench seed [--quick] [--guests N] [--warmup S] [--window S] [--configs a,b,...] [--out DIR]

One run, five configurations one after another, each on a fresh lab of the same description
(vmconfigs/demo.toml's guests: 384, 448, 512 MiB, disks at 200 read and 200 write IOPS):

- plain: no tmem (the guest agent stopped), guests at their boot memory;
- tmem: precache + preswap + self-ballooning at the default reserve (the image's defaults);
- plain_lean: no tmem, each guest booted at the memory it ended at under tmem;
- host_cache: as plain_lean, the disks cache='writeback' (the host page cache as the second level);
- zswap: as plain_lean, zswap on in each guest.

In every guest, started staggered: zlib built in a loop (scripts/demo_guest.py build: every build
checked) and a memory user (scripts.preswap_workload, every page verified) whose every third
round needs more than a lean guest has. Without a pool-backed swap device in the guest, the tmem
configuration's memory user runs on a preswap region (the guest agent's default budget); otherwise,
as everywhere else, on plain anonymous memory.

After a warm-up, counters are read at the window's start and end (libvirt blockStats and vCPU time,
QEMU's /proc/PID/io, the guest's /proc/vmstat and block stats, the guest agent's reports, the host
agent's pool and CPU); scripts/seed_figures.py turns them into figures, ratios and targets. Prints
one JSON object on stdout; writes it, a Markdown table and PNG plots to --out. Progress on stderr.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from guestagent.protocol.jsonline import is_listening
from scripts import lab, seed_figures
from scripts.demo import tmem_ready
from scripts.guest import Guest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAB = ROOT / "vmconfigs" / "demo.toml"
GUEST_SCRIPT = (ROOT / "scripts" / "demo_guest.py").read_bytes()
WORK = "/var/tmp/tmem-seed"  # in the guest: the workloads' logs and process-group ids
PROJECT_TMEM = "/mnt/precache/zlib"  # the image's zlib seen through the precache mount
PROJECT_PLAIN = "/srv/precache/zlib"  # the same files, the mount's backing directory
ORDER = ("plain", "tmem", "plain_lean", "host_cache", "zswap")  # plain_lean needs tmem's end memory
LEAN = ("plain_lean", "host_cache", "zswap")


def say(msg: str) -> None:
    print(f"[seed] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Progress:
    """One line on stderr, rewritten in place on a terminal, else printed every `every` seconds."""

    tty: bool = sys.stderr.isatty()
    every: float = 30.0
    last: float = 0.0

    def show(self, text: str) -> None:
        if self.tty:
            print(f"\r\033[K[seed] {text}", end="", file=sys.stderr, flush=True)
        elif time.monotonic() - self.last >= self.every:
            self.last = time.monotonic()
            say(text)

    def done(self) -> None:
        if self.tty:
            print(file=sys.stderr, flush=True)


# -- the labs -------------------------------------------------------------------------------------


def config_lab(base: lab.Lab, config: str, lean_mib: Mapping[str, int] | None) -> lab.Lab:
    """The lab description for one configuration: the same guests, the memory, disk cache and
    balloon controller the configuration says."""
    guests = []
    for g in base.guests:
        memory = g.memory_mib
        if config in LEAN:
            if lean_mib is None or g.name not in lean_mib:
                raise lab.LabError(
                    f"{config} needs the memory tmem ends at ({g.name}): run tmem first or give --lean-mib"
                )
            memory = lean_mib[g.name]
        guests.append(
            dataclasses.replace(
                g, memory_mib=memory, disk_cache="writeback" if config == "host_cache" else "none"
            )
        )
    host = {k: v for k, v in base.host.items() if k not in ("balloon", "swap_mib")}
    if config == "tmem":
        host["balloon"] = {"enabled": True}  # every setting at its default, the 64 MiB reserve too
    else:
        host["swap_mib"] = 0  # no pool-backed swap device (lab guests get one by default)
    return lab.Lab(tuple(guests), host)


def prepare_guest(guest: Guest, config: str) -> str:
    """Make the guest what the configuration says; returns the memory user's kind."""
    guest.wait_qemu_agent()
    if config == "tmem":
        guest.wait_until(lambda: tmem_ready(guest), 180, "the guest agent's precache mount and preswap")
    else:
        guest.stop_agent()  # from the daemon's namespace: /usr may be its mount
    if config == "zswap":
        guest.run("sh", "-c", "echo 1 > /sys/module/zswap/parameters/enabled")
        if guest.run("cat", "/sys/module/zswap/parameters/enabled").strip() != "Y":
            raise lab.LabError(f"{guest.name}: zswap did not turn on")
    pool_swap = probe(guest).get("pool_swap")
    if config != "tmem" and pool_swap:
        raise lab.LabError(f"{guest.name}: {config} must have no pool-backed swap, yet swaps to {pool_swap}")
    return "preswap" if config == "tmem" and not pool_swap else "anonymous"


def start_workloads(guest: Guest, config: str, memory_user: str, args: argparse.Namespace) -> None:
    project = PROJECT_TMEM if config == "tmem" else PROJECT_PLAIN
    seconds = str(args.warmup + args.window + 600)  # stopped by us; the margin only bounds strays
    guest.run("sh", "-c", f"rm -rf {WORK} && mkdir -p {WORK} && sync")
    guest.spawn(
        "python3", "-", "build", project, f"{WORK}/build.log", "--seconds", seconds, stdin=GUEST_SCRIPT
    )
    mem = [
        "--pages",
        str(args.memory_mib * 256),
        "--peak-pages",
        str(args.peak_mib * 256),
        "--peak-every",
        "3",
        "--ops",
        str(args.memory_ops),
        "--pause",
        str(args.memory_pause),
        "--fill",
        "--budget",
        "1024",
    ]  # 1024 pages: the guest agent's default region budget (4 MiB)
    if memory_user == "anonymous":
        mem.append("--anonymous")
    guest.spawn(
        "python3",
        "-",
        "preswap",
        "/run/tmem/preswap.sock",
        f"{WORK}/preswap.log",
        "--seconds",
        seconds,
        *mem,
        stdin=GUEST_SCRIPT,
    )


def stop_workloads(guest: Guest) -> None:
    guest.exec(
        "sh", "-c", f"for p in {WORK}/*.pid; do kill -TERM -- -$(cat $p) 2>/dev/null; done; true", timeout=60
    )


# -- counters -------------------------------------------------------------------------------------


def qemu_pid(name: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().split()[0])


def proc_io(pid: int) -> dict[str, float]:
    """QEMU's storage-layer bytes (/proc/PID/io) and CPU seconds (/proc/PID/stat)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {
        "read_bytes": int(io["read_bytes"]),
        "write_bytes": int(io["write_bytes"]),
        "cpu_seconds": (int(stat[11]) + int(stat[12])) / tick,
    }


def domain_counters(name: str) -> dict[str, Any]:
    """libvirt's view of one guest (cheap: no guest-exec)."""
    dom = lab.connect().lookupByName(name)
    rd_req, rd_bytes, wr_req, wr_bytes, _ = dom.blockStats("vda")
    vcpu_ns = sum(v[2] for v in dom.vcpus()[0])
    return {
        "block": {"rd_req": rd_req, "rd_bytes": rd_bytes, "wr_req": wr_req, "wr_bytes": wr_bytes},
        "memory_kib": dom.info()[2],
        "vcpu_seconds": vcpu_ns / 1e9,
        "qemu": proc_io(qemu_pid(name)),
    }


def meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def disk_files_cached_kib() -> int:
    """The lab's disk files (overlays and their base image) resident in the host page cache."""
    overlays = sorted((lab.STATE / "disks").glob("*.qcow2"))
    files = [str(p) for p in overlays]
    if overlays:
        backing = subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", files[0]], capture_output=True, text=True, check=False
        )
        if backing.returncode == 0 and (base := json.loads(backing.stdout).get("full-backing-filename")):
            files.append(base)
    if not files:
        return 0
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", *files],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(x) for x in out.split()) // 1024


def host_counters(names: Sequence[str]) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    st = lab.stats()
    reports = {
        g.get("name"): {
            **((g.get("report") or {}).get("values") or {}),
            **{f"swapdev_{k}": v for k, v in (g.get("swapdev") or {}).items() if isinstance(v, int)},
        }
        for g in st["guests"].values()
    }
    host = {
        "agent_cpu_seconds": st["agent"]["cpu_seconds"],
        "pool_bytes": st["pool"]["resident_bytes"],
        "cached_kib": meminfo_kib("Cached"),
        "disk_cache_kib": disk_files_cached_kib(),
    }
    return host, {n: dict(reports.get(n, {})) for n in names}


def probe(guest: Guest) -> dict[str, Any]:
    rc, out, err = guest.exec("python3", "-", "probe", WORK, stdin=GUEST_SCRIPT, timeout=180)
    if rc != 0:
        raise lab.LabError(f"{guest.name}: probe failed ({rc}): {(out + err)[-1000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def snapshot(guests: Mapping[str, Guest]) -> dict[str, Any]:
    # the slow part first, in parallel (a thrashing guest takes long to start python3), then
    # libvirt's and the host's counters together: the window is between those
    with concurrent.futures.ThreadPoolExecutor(len(guests)) as pool:
        probes = dict(zip(guests, pool.map(probe, guests.values()), strict=True))
    host, reports = host_counters(list(guests))
    return {
        "guests": {
            n: {
                "probe": probes[n],
                "report": reports[n],
                **domain_counters(n),
                "swapdev": {
                    k[len("swapdev_") :]: v for k, v in reports[n].items() if k.startswith("swapdev_")
                },
            }
            for n in guests
        },
        "host": host,
        "t": time.monotonic(),
    }


# -- one configuration ----------------------------------------------------------------------------


def drop_host_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def watch(
    seconds: float,
    names: Sequence[str],
    label: str,
    t0: float,
    samples: list[dict[str, float]],
    progress: Progress,
    interval: float,
) -> None:
    """Sample guest memory and the pool (host side only: no guest-exec) until `seconds` pass."""
    end = time.monotonic() + seconds
    while True:
        counters = {n: domain_counters(n) for n in names}
        pool = lab.stats()["pool"]["resident_bytes"] / seed_figures.MIB
        guest_mib = sum(c["memory_kib"] for c in counters.values()) / 1024
        ops = sum(c["block"]["rd_req"] + c["block"]["wr_req"] for c in counters.values())
        samples.append(
            {
                "t": round(time.monotonic() - t0, 1),
                "guest_mib": round(guest_mib, 1),
                "pool_mib": round(pool, 1),
            }
        )
        left = end - time.monotonic()
        progress.show(
            f"{label}: {max(0.0, left):.0f} s left; guests {guest_mib:.0f} MiB, pool {pool:.1f} "
            f"MiB, disk ops since boot {ops}"
        )
        if left <= 0:
            return
        time.sleep(min(interval, left))


def run_config(
    base: lab.Lab,
    config: str,
    lean_mib: Mapping[str, int] | None,
    args: argparse.Namespace,
    progress: Progress,
) -> tuple[dict[str, Any], list[dict[str, float]], dict[str, int]]:
    """One configuration on a fresh lab: its figures, its timeline, and each guest's memory at the end."""
    spec = config_lab(base, config, lean_mib)
    say(f"{config}: starting the lab ({', '.join(f'{g.name} {g.memory_mib} MiB' for g in spec.guests)})")
    t_up = time.monotonic()
    lab.up(spec)
    try:
        guests = {g.name: Guest(g.name) for g in spec.guests}
        kinds = {n: prepare_guest(g, config) for n, g in guests.items()}
        say(
            f"{config}: lab ready in {time.monotonic() - t_up:.0f} s; memory user: "
            f"{', '.join(sorted(set(kinds.values())))}"
        )
        drop_host_caches()
        samples: list[dict[str, float]] = []
        t0 = time.monotonic()
        for i, (n, g) in enumerate(guests.items()):  # staggered, as the seed's guests started
            if i:
                watch(
                    args.stagger,
                    list(guests),
                    f"{config} staggered start",
                    t0,
                    samples,
                    progress,
                    args.sample,
                )
            start_workloads(g, config, kinds[n], args)
        watch(
            max(0.0, args.warmup - args.stagger * (len(guests) - 1)),
            list(guests),
            f"{config} warm-up",
            t0,
            samples,
            progress,
            args.sample,
        )
        a = snapshot(guests)
        watch(args.window, list(guests), f"{config} window", t0, samples, progress, args.sample)
        b = snapshot(guests)
        progress.done()
        for g in guests.values():
            stop_workloads(g)
        figures = seed_figures.config_figures(a, b, b["t"] - a["t"])
        figures["memory_user"] = sorted(set(kinds.values()))
        figures["lab_up_seconds"] = round(t0 - t_up, 1)
        end_mib = {n: math.ceil(g["memory_kib"] / 1024) for n, g in b["guests"].items()}
        failures = {
            n: [r for r in b["guests"][n]["probe"][k] if not r.get("ok")][-1:]
            for n in guests
            for k in ("build", "preswap")
            if any(not r.get("ok") for r in b["guests"][n]["probe"][k])
        }
        if failures:
            figures["workload_failures"] = failures
        return figures, samples, end_mib
    finally:
        lab.down()


def bench(args: argparse.Namespace) -> dict[str, Any]:
    base = lab.load_lab(args.config)
    guests = [base.guests[i % len(base.guests)] for i in range(args.guests)]
    base = dataclasses.replace(
        base, guests=tuple(dataclasses.replace(g, name=f"tmem-{i + 1}") for i, g in enumerate(guests))
    )
    if is_listening(lab.CONTROL):
        raise lab.LabError(f"a host agent is already running at {lab.CONTROL} (`scripts/lab down` first)")
    lean: dict[str, int] | None = dict(args.lean_mib) if args.lean_mib else None
    configs: dict[str, Any] = {}
    timeline: dict[str, list[dict[str, float]]] = {}
    progress = Progress(every=args.sample * 2)
    t0 = time.monotonic()
    for config in [c for c in ORDER if c in args.configs]:
        figures, samples, end_mib = run_config(base, config, lean, args, progress)
        configs[config], timeline[config] = figures, samples
        if config == "tmem" and not args.lean_mib:
            lean = end_mib
            figures["lean_mib"] = end_mib
        say(
            f"{config}: {figures['builds']} builds, {figures['disk_ops']} disk ops, "
            f"{figures['swap_pages_to_disk']} swap pages to disk, "
            f"guests {figures['guest_memory_mib_end']} MiB "
            f"(after {time.monotonic() - t0:.0f} s in all)"
        )
    rat = seed_figures.ratios(configs)
    tgt = seed_figures.targets(configs, rat)
    return {
        "guests": args.guests,
        "warmup_seconds": args.warmup,
        "window_seconds": args.window,
        "quick": args.quick,
        "total_seconds": round(time.monotonic() - t0, 1),
        "configs": configs,
        "ratios": rat,
        "targets_met": {k: v["met"] for k, v in tgt.items()},
        "targets": tgt,
        "timeline": timeline,
    }


def write_report(result: Mapping[str, Any], out: Path) -> dict[str, str]:
    from scripts import seed_plots

    out.mkdir(parents=True, exist_ok=True)
    (out / "seed.json").write_text(json.dumps(result, indent=1) + "\n")
    table = seed_figures.markdown_table(result["configs"])
    (out / "seed.md").write_text(f"{table}\n\n{seed_figures.markdown_targets(result['targets'])}\n")
    paths = {
        "json": out / "seed.json",
        "table": out / "seed.md",
        "bars": seed_plots.bars(result["configs"], out / "seed-bars.png"),
        "timeline": seed_plots.timeline(result["timeline"], out / "seed-timeline.png"),
    }
    return {k: str(v) for k, v in paths.items()}


def _lean(text: str) -> dict[str, int]:
    """--lean-mib tmem-1=200,tmem-2=210,..."""
    out = {}
    for item in text.split(","):
        name, _, mib = item.partition("=")
        out[name.strip()] = int(mib)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench seed", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short windows (whole run under ~15 min)")
    ap.add_argument("--guests", type=int, default=3)
    ap.add_argument(
        "--warmup",
        type=float,
        help="seconds of load before the window, the stagger included (default 90; quick 30)",
    )
    ap.add_argument("--window", type=float, help="seconds measured (default 180; quick 45)")
    ap.add_argument("--stagger", type=float, default=10.0, help="seconds between the guests' starts")
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between timeline samples")
    ap.add_argument("--configs", default=",".join(ORDER), help=f"a subset of {','.join(ORDER)}")
    ap.add_argument(
        "--lean-mib",
        type=_lean,
        help="the lean memory per guest (NAME=MIB,...), instead of the memory tmem ends at",
    )
    ap.add_argument("--memory-mib", type=int, default=48, help="the memory user's buffer")
    ap.add_argument("--peak-mib", type=int, default=160, help="... in every third round")
    ap.add_argument("--memory-ops", type=int, default=3000, help="random reads and writes per round")
    ap.add_argument("--memory-pause", type=float, default=10.0, help="seconds between rounds")
    ap.add_argument("--config", type=Path, default=DEFAULT_LAB, help="the lab description (its guests)")
    ap.add_argument("--out", type=Path, default=Path("/var/tmp/tmem-seed"), help="report directory")
    args = ap.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (30.0 if args.quick else 90.0)
    args.window = args.window if args.window is not None else (45.0 if args.quick else 180.0)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := set(args.configs) - set(ORDER):
        ap.error(f"unknown configuration(s) {', '.join(sorted(unknown))} (known: {', '.join(ORDER)})")
    if args.guests < 1 or args.window <= 0 or args.warmup < 0:
        ap.error("--guests and --window must be positive, --warmup not negative")
    try:
        result = bench(args)
    except (lab.LabError, TimeoutError) as err:
        say(f"error: {err}")
        return 1
    paths = write_report(result, args.out)
    result["report"] = paths
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
    print(seed_figures.markdown_table(result["configs"]), file=sys.stderr)
    print(seed_figures.markdown_targets(result["targets"]), file=sys.stderr)
    say(f"report: {json.dumps(paths)}")
    failed = any("workload_failures" in c for c in result["configs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
