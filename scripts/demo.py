"""The demo: tmem at work in a real lab of memory-constrained guests, with self-ballooning.

`scripts/demo` starts the lab described by vmconfigs/demo.toml (three guests of 384-512 MiB on an
IOPS-limited disk, the host agent's balloon controller on), and in every guest runs the seed talk's
kind of load: a real C project (zlib) built in a loop inside the guest's precache mount, and a
preswap memory user (scripts.preswap_workload, every page verified). While they run it shows
`hostagent stats` every few seconds; then it prints a summary computed from the counters of the
measured window (host agent, guest reports, libvirt, balloon controller), as text and as JSON, and
tears the lab down (also on Ctrl-C or an error) unless --keep.

Progress goes to stderr; the stats screens, the summary and its JSON go to stdout.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from guestagent.protocol.jsonline import is_listening
from hostagent import statsview
from scripts import lab
from scripts.guest import Guest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_LAB = ROOT / "vmconfigs" / "demo.toml"
GUEST_SCRIPT = (ROOT / "scripts" / "demo_guest.py").read_bytes()
PROJECT = "/mnt/precache/zlib"  # the image's demo project, seen through the precache mount
WORK = "/var/tmp/tmem-demo"  # in the guest: the workloads' logs and process-group ids
PAGE_KIB = 4


def say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


class Interrupted(Exception):
    """SIGTERM (or SIGHUP): end like Ctrl-C, tearing the lab down."""


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# -- the guests ---------------------------------------------------------------------------------


def tmem_ready(guest: Guest) -> bool:
    """The guest agent's precache mount has its pool and its preswap agent runs."""
    st = guest.agent_stats()
    return bool((st.get("precache") or {}).get("connected") and (st.get("preswap") or {}).get("running"))


def wait_tmem_ready(guest: Guest) -> None:
    guest.wait_qemu_agent()
    guest.wait_until(lambda: tmem_ready(guest), 180, "the guest agent's precache mount and preswap agent")


def start_workloads(guest: Guest, seconds: float, args: argparse.Namespace) -> None:
    """The build loop and the preswap user, in the background (each its own process group)."""
    guest.run("sh", "-c", f"rm -rf {WORK} && mkdir -p {WORK}")
    guest.spawn(
        "python3", "-", "build", PROJECT, f"{WORK}/build.log", "--seconds", str(seconds), stdin=GUEST_SCRIPT
    )
    guest.spawn(
        "python3",
        "-",
        "preswap",
        args.preswap_socket,
        f"{WORK}/preswap.log",
        "--seconds",
        str(seconds),
        "--pages",
        str(args.preswap_pages),
        "--budget",
        str(args.preswap_budget),
        "--ops",
        str(args.preswap_ops),
        "--pause",
        str(args.preswap_pause),
        stdin=GUEST_SCRIPT,
    )


def stop_workloads(guest: Guest) -> None:
    """SIGTERM to both workloads' process groups (a build in progress with them)."""
    guest.exec(
        "sh", "-c", f"for p in {WORK}/*.pid; do kill -TERM -- -$(cat $p) 2>/dev/null; done; true", timeout=60
    )


def rounds(guest: Guest) -> dict[str, dict[str, Any]]:
    """The workloads' logs: rounds done and failed, the last failure, mean seconds per round."""
    out: dict[str, dict[str, Any]] = {}
    for kind in ("build", "preswap"):
        rc, text, _ = guest.exec("cat", f"{WORK}/{kind}.log", timeout=60)
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if rc == 0 else []
        failed = [r for r in records if not r.get("ok")]
        out[kind] = {
            "rounds": len(records),
            "failed": len(failed),
            "mean_seconds": round(sum(r["seconds"] for r in records) / len(records), 1) if records else None,
        }
        if failed:
            out[kind]["last_failure"] = failed[-1]
    return out


# -- figures ------------------------------------------------------------------------------------


def by_name(stats: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {g.get("name", uuid): g for uuid, g in stats.get("guests", {}).items()}


def report(g: Mapping[str, Any]) -> dict[str, int]:
    values: dict[str, int] = (g.get("report") or {}).get("values", {})
    return values


def disk_ops(names: Sequence[str]) -> dict[str, dict[str, int]]:
    """libvirt's count of the requests each guest's disk served (blockStats of vda)."""
    conn = lab.connect()
    out = {}
    for name in names:
        rd_req, _, wr_req, _, _ = conn.lookupByName(name).blockStats("vda")
        out[name] = {"reads": rd_req, "writes": wr_req}
    return out


def _per_second_ratio(ours: float, seconds: float, theirs: float, their_seconds: float) -> float | None:
    return round((ours / seconds) / (theirs / their_seconds), 2) if theirs and seconds else None


def vs_baseline(
    builds: int, reads: int, writes: int, seconds: float, baseline: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    """Builds and disk operations per second against `scripts/bench seed`'s no-tmem configurations
    (its JSON): the only benefits the demo states. None without a baseline."""
    if baseline is None:
        return None
    out: dict[str, Any] = {}
    for name in ("plain", "plain_lean"):
        c = (baseline.get("configs") or {}).get(name)
        if not c or not c.get("seconds"):
            continue
        base_s = float(c["seconds"])
        out[name] = {
            "builds": _per_second_ratio(builds, seconds, c["builds"], base_s),
            "disk_ops": _per_second_ratio(
                reads + writes, seconds, c["disk_reads"] + c["disk_writes"], base_s
            ),
            "disk_reads": _per_second_ratio(reads, seconds, c["disk_reads"], base_s),
            "disk_writes": _per_second_ratio(writes, seconds, c["disk_writes"], base_s),
        }
    return out


def summary(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    seconds: float,
    boot_kib: Mapping[str, int],
    work: Mapping[str, Any],
    disks: Mapping[str, Mapping[str, int]] | None = None,
    baseline: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The demo's figures, every one a difference of counters over the measured window (or, for
    ballooning, the controller's cumulative counters and libvirt's balloon sizes). tmem's traffic
    is reported as counts; benefits only against `baseline` (a `scripts/bench seed` JSON), from
    the disks' operations (`disks`: libvirt's per-guest counts over the window) and builds."""
    b, a = by_name(before), by_name(after)
    guests: dict[str, Any] = {}
    total: dict[str, float] = {}

    def delta(name: str, key: str) -> int:
        return max(0, report(a[name]).get(key, 0) - report(b.get(name, {})).get(key, 0))

    keys = (
        "precache_hits",
        "precache_misses",
        "precache_gets",
        "precache_puts",
        "pgpgin",
        "pswpout",
        "pswpin",
        "preswap_puts",
        "preswap_puts_refused",
        "preswap_gets",
        "preswap_disk_writes",
        "preswap_disk_reads",
        "preswap_lost",
    )
    for name in sorted(a):
        d = {k: delta(name, k) for k in keys}
        dom_a = a[name].get("domain") or {}
        dom_b = (b.get(name) or {}).get("domain") or {}
        d["cpu_seconds"] = round(dom_a.get("cpu_seconds", 0) - dom_b.get("cpu_seconds", 0), 1)
        bal = a[name].get("balloon") or {}
        # boot size from the lab description: the controller's `boot_kib` is the first `actual` it
        # saw, which can be the maximum (before the guest's balloon driver has inflated)
        if "given_back_kib" in bal:
            given = {
                "source": "balloon controller",
                "given_back_kib": bal["given_back_kib"],
                "returned_kib": bal.get("returned_kib", 0),
                "boot_kib": boot_kib.get(name),
                "actual_kib": bal.get("actual_kib"),
                "goal_kib": bal.get("goal_kib"),
                "last": bal.get("last"),
            }
        else:
            given = {
                "source": "libvirt (boot memory minus actual)",
                "boot_kib": boot_kib.get(name),
                "actual_kib": dom_a.get("actual_kib"),
            }
        boot, actual = given.get("boot_kib"), given.get("actual_kib")
        given["net_given_back_kib"] = boot - actual if boot is not None and actual is not None else None
        guests[name] = {**d, "balloon": given, "workloads": work.get(name)}
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
        for k in ("given_back_kib", "returned_kib", "net_given_back_kib"):
            if isinstance(given.get(k), int):
                total[k] = total.get(k, 0) + given[k]

    def pct(part: float, whole: float) -> float | None:
        return round(100 * part / whole, 1) if whole else None

    hits, misses = total.get("precache_hits", 0), total.get("precache_misses", 0)
    disk_in_pages = total.get("pgpgin", 0) / PAGE_KIB  # pgpgin is KiB read from block devices
    kept = total.get("preswap_puts", 0)
    to_disk = total.get("preswap_disk_writes", 0) + total.get("pswpout", 0)
    tmem_reads = hits + total.get("preswap_gets", 0)
    tmem_writes = kept
    disk_reads = sum(d["reads"] for d in (disks or {}).values())
    disk_writes = sum(d["writes"] for d in (disks or {}).values())
    builds = sum(
        b.get("rounds", 0) - b.get("failed", 0)
        for b in (((w or {}).get("build") or {}) for w in work.values())
    )
    agent_cpu = after["agent"]["cpu_seconds"] - before["agent"]["cpu_seconds"]
    guest_cpu = after["agent"]["guest_cpu_seconds"] - before["agent"]["guest_cpu_seconds"]
    return {
        "seconds": round(seconds, 1),
        "guests": len(guests),
        "precache": {
            "hits": hits,
            "misses": misses,
            "puts": total.get("precache_puts", 0),
            "served_pct_of_gets": pct(hits, hits + misses),
            "served_pct_of_page_ins": pct(hits, hits + disk_in_pages),
            "disk_page_ins": round(disk_in_pages),
        },
        "swap": {
            "preswap_puts": kept,
            "preswap_gets": total.get("preswap_gets", 0),
            "preswap_refused_to_swap_file": total.get("preswap_puts_refused", 0),
            "preswap_lost": total.get("preswap_lost", 0),
            "kernel_pswpout": total.get("pswpout", 0),
            "kernel_pswpin": total.get("pswpin", 0),
            "kept_off_disk_pct": pct(kept, kept + to_disk),
        },
        # tmem's own traffic: pages it served and took, counts (not disk IOs avoided: a guest
        # without tmem may have needed none of them)
        "tmem_pages_per_second": {
            "gets_served": round(tmem_reads / seconds, 1),
            "puts": round(tmem_writes / seconds, 1),
        },
        "disk": None
        if disks is None
        else {
            "reads": disk_reads,
            "writes": disk_writes,
            "ops_per_second": round((disk_reads + disk_writes) / seconds, 1),
        },
        "builds": builds,
        "vs_baseline": None
        if disks is None
        else vs_baseline(builds, disk_reads, disk_writes, seconds, baseline),
        "cpu": {
            "agent_seconds": round(agent_cpu, 2),
            "guest_seconds": round(guest_cpu, 1),
            "agent_share_of_guest_pct": pct(agent_cpu, guest_cpu),
            "agent_share_since_start_pct": (
                None
                if after["agent"].get("cpu_ratio") is None
                else round(100 * after["agent"]["cpu_ratio"], 2)
            ),
        },
        "balloon": {
            "enabled": bool((after.get("balloon") or {}).get("enabled")),
            "given_back_mib": _mib(total.get("given_back_kib")),
            "returned_mib": _mib(total.get("returned_kib")),
            "net_given_back_mib": _mib(total.get("net_given_back_kib")),
        },
        "pool": {
            "pages": after["pool"].get("pages"),
            "evictions": after["pool"].get("evictions", 0) - before["pool"].get("evictions", 0),
        },
        "per_guest": guests,
    }


def _mib(kib: float | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def _net(mib: float | None) -> str:
    if mib is None:
        return "n/a vs"
    return f"{mib} MiB less than" if mib >= 0 else f"{-mib} MiB more than"


def _fmt(v: Any, unit: str = "") -> str:
    return "n/a" if v is None else f"{v}{unit}"


def _baseline_text(vs: Mapping[str, Any] | None) -> str:
    if not vs:
        return (
            "none: the figures above are counts, not benefits (`scripts/bench seed` measures the "
            "same guests without tmem; --baseline takes its JSON)"
        )
    return "; ".join(
        f"vs {name}: builds/s x{r['builds']}, disk ops/s x{r['disk_ops']} "
        f"(reads x{r['disk_reads']}, writes x{r['disk_writes']})"
        for name, r in vs.items()
    )


def format_summary(s: Mapping[str, Any]) -> str:
    p, w, io, c, bal = s["precache"], s["swap"], s["tmem_pages_per_second"], s["cpu"], s["balloon"]
    lines = [
        f"tmem demo: {s['guests']} guests, {s['seconds']:.0f} s measured "
        "(figures from counters over that window)",
        f"  precache hit rate:            {_fmt(p['served_pct_of_gets'], '%')} of the shim's gets "
        f"({p['hits']} hits, {p['misses']} misses); {_fmt(p['served_pct_of_page_ins'], '%')} of all "
        f"page-ins (with {p['disk_page_ins']} pages read from disk)",
        f"  preswap pages put in tmem:    {_fmt(w['kept_off_disk_pct'], '%')} of swap-outs "
        f"({w['preswap_puts']} preswap "
        f"puts into tmem, {w['preswap_refused_to_swap_file']} refused to the swap file, "
        f"{w['kernel_pswpout']} kernel swap-outs; {w['preswap_gets']} pages back from tmem, "
        f"{w['preswap_lost']} lost)",
        f"  tmem traffic (counts, not savings): {io['gets_served']} pages/s got back, "
        f"{io['puts']} pages/s put",
        "  disk operations (libvirt):    "
        + (
            "n/a"
            if s["disk"] is None
            else f"{s['disk']['reads']} reads, {s['disk']['writes']} writes "
            f"({s['disk']['ops_per_second']}/s); {s['builds']} builds"
        ),
        "  against a baseline:           " + _baseline_text(s["vs_baseline"]),
        f"  host-agent CPU / guest CPU:   {_fmt(c['agent_share_of_guest_pct'], '%')} ({c['agent_seconds']} s "
        f"of {c['guest_seconds']} s; since the agent started: {_fmt(c['agent_share_since_start_pct'], '%')})",
        f"  memory given back by ballooning: {_fmt(bal['given_back_mib'], ' MiB')} (targets lowered; "
        f"{_fmt(bal['returned_mib'], ' MiB')} raised again); the guests now hold "
        f"{_net(bal['net_given_back_mib'])} their boot size (controller {'on' if bal['enabled'] else 'off'})",
    ]
    for name, g in s["per_guest"].items():
        work = g.get("workloads") or {}
        bw, pw = work.get("build", {}), work.get("preswap", {})
        gb = g["balloon"]
        lines.append(
            f"  {name}: builds {bw.get('rounds', 0)} ({bw.get('failed', 0)} failed, "
            f"{_fmt(bw.get('mean_seconds'), ' s')} each), preswap runs {pw.get('rounds', 0)} "
            f"({pw.get('failed', 0)} failed); precache {g['precache_hits']}/{g['precache_gets']} gets hit; "
            f"balloon {_fmt(_mib(gb.get('boot_kib')), ' MiB')} -> {_fmt(_mib(gb.get('actual_kib')), ' MiB')}"
        )
    return "\n".join(lines)


# -- the demo -----------------------------------------------------------------------------------


def ours(stats: Mapping[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The stats with the lab's guests only: a host agent's arena may still hold persistent pools
    of domains from earlier runs (they are in the pool line's totals, not in the guest rows)."""
    return {**stats, "guests": {k: g for k, g in stats.get("guests", {}).items() if g.get("name") in names}}


def show(stats: Mapping[str, Any], elapsed: float, total: float, work: str, clear: bool) -> None:
    head = f"tmem demo: {elapsed:.0f}/{total:.0f} s  ({time.strftime('%H:%M:%S')})  {work}"
    screen = f"{head}\n\n{statsview.format_stats(stats)}\n"
    print(("\033[H\033[2J" + screen) if clear else screen + "-" * 100, flush=True)


def work_line(work: Mapping[str, Any]) -> str:
    return "builds: " + ", ".join(
        f"{n} {w['build']['rounds']}" + (f" ({w['build']['failed']} FAILED)" if w["build"]["failed"] else "")
        for n, w in sorted(work.items())
    )


def demo(args: argparse.Namespace) -> dict[str, Any]:
    spec = lab.load_lab(args.config)
    if is_listening(lab.CONTROL):
        raise lab.LabError(
            f"a host agent is already running at {lab.CONTROL} (a lab is up? `scripts/lab down` first)"
        )
    t0 = time.monotonic()
    say(f"starting the lab ({args.config}: {len(spec.guests)} guests)")
    lab.up(spec)
    doms = {g.name: Guest(g.name) for g in spec.guests}
    for name, guest in doms.items():
        wait_tmem_ready(guest)
        say(f"{name}: precache mount and preswap agent up")
    seconds = args.minutes * 60
    for name, guest in doms.items():
        start_workloads(guest, seconds + 600, args)  # stopped by us; the margin only bounds strays
        say(f"{name}: build loop in {PROJECT} and preswap user started")
    names = [g.name for g in spec.guests]
    before = ours(lab.stats(), names)
    disks_before = disk_ops(names)
    start = time.monotonic()
    say(
        f"lab ready and loaded after {start - t0:.0f} s; showing hostagent stats every "
        f"{args.interval:g} s for {args.minutes:g} min"
    )
    clear = sys.stdout.isatty()
    while (elapsed := time.monotonic() - start) < seconds:
        work = {n: rounds(d) for n, d in doms.items()}
        show(ours(lab.stats(), names), elapsed, seconds, work_line(work), clear)
        time.sleep(max(0.0, min(args.interval, seconds - (time.monotonic() - start))))
    after = ours(lab.stats(), names)
    disks_after = disk_ops(names)
    measured = time.monotonic() - start
    for guest in doms.values():
        stop_workloads(guest)
    work = {n: rounds(d) for n, d in doms.items()}
    show(after, measured, seconds, work_line(work), clear)
    boot_kib = {g.name: g.memory_mib * 1024 for g in spec.guests}
    disks = {n: {k: disks_after[n][k] - disks_before[n][k] for k in ("reads", "writes")} for n in names}
    baseline = json.loads(args.baseline.read_text()) if args.baseline else None
    result = summary(before, after, measured, boot_kib, work, disks, baseline)
    result["total_seconds"] = round(time.monotonic() - t0, 1)
    failed = {n: w for n, w in work.items() if w["build"]["failed"] or w["preswap"]["failed"]}
    if failed:
        result["workload_failures"] = {
            n: {k: v.get("last_failure") for k, v in w.items()} for n, w in failed.items()
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0, help="how long the load is shown (default 3)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between stats screens")
    ap.add_argument("--keep", action="store_true", help="leave the lab running afterwards")
    ap.add_argument("--config", type=Path, default=DEFAULT_LAB, help="the lab description")
    ap.add_argument("--preswap-pages", type=int, default=4096, help="the preswap user's region (pages)")
    ap.add_argument(
        "--preswap-budget",
        type=int,
        default=1024,
        help="... of which resident, at most (default: the guest agent's default, 4 MiB)",
    )
    ap.add_argument("--preswap-ops", type=int, default=3000, help="operations per preswap run")
    ap.add_argument("--preswap-pause", type=float, default=15.0, help="seconds between preswap runs")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="a `scripts/bench seed` JSON (its seed.json): the "
        "summary states builds and disk operations against its plain configurations",
    )
    ap.add_argument(
        "--preswap-socket",
        default="/run/tmem/preswap.sock",
        help="the guest daemon's [preswap] socket (the image's default)",
    )
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.interval <= 0:
        ap.error("--minutes and --interval must be positive")
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    ok = False
    try:
        result = demo(args)
        print(format_summary(result))
        print(json.dumps(result))
        ok = "workload_failures" not in result
        if not ok:
            say(f"workloads failed: {json.dumps(result['workload_failures'])}")
    except (lab.LabError, TimeoutError) as err:
        say(f"error: {err}")
    except (KeyboardInterrupt, Interrupted) as why:
        say(f"interrupted ({why or 'Ctrl-C'})")
    finally:
        if args.keep:
            say("--keep: the lab is still running (`scripts/lab status`, `scripts/lab down`)")
        else:
            say("tearing the lab down")
            lab.down()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
