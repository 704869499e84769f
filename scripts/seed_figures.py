"""The seed benchmark's arithmetic: figures from two counter snapshots, ratios, targets, the table.

Pure functions over plain dicts, so every number `scripts/bench seed` reports can be checked here
without a lab. A snapshot is what the benchmark reads at a window's start and end:

    {"guests": {NAME: {
        "probe": scripts/demo_guest.py probe's JSON (vmstat, blocks, swaps, agent, build, preswap),
        "block": libvirt blockStats of the rate-limited disk (rd_req, rd_bytes, wr_req, wr_bytes),
        "qemu": QEMU's /proc/PID/io and CPU (read_bytes, write_bytes, cpu_seconds),
        "vcpu_seconds": libvirt's vCPU time, "memory_kib": libvirt's current (balloon) memory,
        "report": the guest agent's last report to the host agent ({} without tmem)}},
     "host": {"agent_cpu_seconds", "pool_bytes", "cached_kib" (/proc/meminfo Cached),
              "disk_cache_kib" (the lab's disk files resident in the host page cache)}}

Nothing here takes tmem's word for a benefit: disk operations are libvirt's, swap and page-in
counts the guest kernel's; the pool's share of page-ins counts precache hits and preswap gets (the
guest agent's counters) and reads of a pool-backed swap device (the guest kernel's block stats).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

CONFIGS = ("plain", "plain_lean", "tmem", "host_cache", "zswap")
PAGE_KIB = 4
SECTORS_PER_PAGE = 8
MIB = 1 << 20

# the targets
POOL_SHARE_MIN = 1 / 3
DISK_OPS_VS_LEAN_MAX = 0.5
AVOIDED_PER_MIB_VS_HOST_CACHE_MIN = 1.5
HOST_AGENT_CPU_PCT_MAX = 0.2


def _d(a: Mapping[str, Any], b: Mapping[str, Any], key: str) -> float:
    """b[key] - a[key], never negative (a counter that went back was reset: count nothing)."""
    return max(0.0, float(b.get(key, 0) or 0) - float(a.get(key, 0) or 0))


def pool_swap_devices(probe: Mapping[str, Any]) -> list[str]:
    """Block devices the guest swaps to that the pool backs: the host agent's swap device (a virtio
    disk served over NBD, /dev/disk/by-id/virtio-tmem-swap in the guest), by kernel name."""
    dev = str(probe.get("pool_swap") or "")
    return [dev.rsplit("/", 1)[-1]] if dev and dev in probe.get("swaps", []) else []


def _window_records(
    a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """The rounds that finished inside the window: the log's records past the start's count."""
    return list(b[len(a) :])


def guest_figures(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, float]:
    """One guest's counts over the window between snapshots `a` and `b`."""
    pa, pb = a["probe"], b["probe"]
    va, vb = pa["vmstat"], pb["vmstat"]
    pool_dev = pool_swap_devices(pb)
    dev_a, dev_b = pa.get("blocks", {}), pb.get("blocks", {})
    pool_in = sum(_d(dev_a.get(d, {}), dev_b.get(d, {}), "read_sectors") for d in pool_dev) / SECTORS_PER_PAGE
    pool_out = (
        sum(_d(dev_a.get(d, {}), dev_b.get(d, {}), "write_sectors") for d in pool_dev) / SECTORS_PER_PAGE
    )
    # what the host agent's swap device read from and wrote to its spill file (host storage, not
    # the pool) when the pool refused pages
    sa, sb = a.get("swapdev") or {}, b.get("swapdev") or {}
    spill_in, spill_out = _d(sa, sb, "spill_reads"), _d(sa, sb, "spill_writes")
    ra, rb = a.get("report") or {}, b.get("report") or {}
    precache_hits = _d(ra, rb, "precache_hits")
    preswap_gets = _d(ra, rb, "preswap_gets")
    # pgpgin is KiB read from every block device (swap and the pool's NBD device included)
    disk_page_ins = max(0.0, _d(va, vb, "pgpgin") / PAGE_KIB - pool_in) + min(spill_in, pool_in)
    ba, bb = a["block"], b["block"]
    rd_req, rd_bytes = _d(ba, bb, "rd_req"), _d(ba, bb, "rd_bytes")
    qemu_read = _d(a["qemu"], b["qemu"], "read_bytes")
    # reads QEMU passed on that reached host storage (all of them with cache='none'; with the host
    # page cache, only the share of bytes that the page cache did not serve)
    storage_reads = rd_req * min(1.0, qemu_read / rd_bytes) if rd_bytes else 0.0
    builds = _window_records(pa.get("build", []), pb.get("build", []))
    memory = _window_records(pa.get("preswap", []), pb.get("preswap", []))
    ok_builds = [r for r in builds if r.get("ok")]
    return {
        "builds": len(ok_builds),
        "builds_failed": len(builds) - len(ok_builds),
        "build_seconds_sum": sum(float(r.get("seconds", 0)) for r in ok_builds),
        "memory_rounds": sum(1 for r in memory if r.get("ok")),
        "memory_rounds_failed": sum(1 for r in memory if not r.get("ok")),
        "disk_reads": rd_req,
        "disk_writes": _d(ba, bb, "wr_req"),
        "disk_read_mib": rd_bytes / MIB,
        "storage_reads": storage_reads,
        "swap_pages_to_disk": max(0.0, _d(va, vb, "pswpout") - pool_out) + _d(ra, rb, "preswap_disk_writes"),
        "swap_pages_to_pool": max(0.0, pool_out - spill_out) + _d(ra, rb, "preswap_puts"),
        "swap_pages_to_host_spill": spill_out,
        "page_ins_disk": disk_page_ins,
        "page_ins_pool": precache_hits + preswap_gets + max(0.0, pool_in - spill_in),
        "precache_hits": precache_hits,
        "preswap_gets": preswap_gets,
        "guest_memory_mib_end": float(b.get("memory_kib", 0)) / 1024,
        "qemu_cpu_seconds": _d(a["qemu"], b["qemu"], "cpu_seconds"),
        "guest_cpu_seconds": _d(a, b, "vcpu_seconds"),
        "guest_agent_cpu_seconds": _d(pa.get("agent", {}), pb.get("agent", {}), "cpu_seconds"),
        "guest_agent_rss_mib": float(pb.get("agent", {}).get("rss_kib", 0)) / 1024,
        # zswap's compressed pool at the end: guest memory it holds swapped pages in
        "zswap_stored_pages": float(pb.get("zswap", {}).get("stored_pages", 0)),
        "zswap_pool_mib": float(pb.get("zswap", {}).get("pool_total_size", 0)) / MIB,
    }


def config_figures(a: Mapping[str, Any], b: Mapping[str, Any], seconds: float) -> dict[str, Any]:
    """A configuration's figures: the guests' counts summed, the host's, and derived shares."""
    per_guest = {n: guest_figures(a["guests"][n], g) for n, g in sorted(b["guests"].items())}
    total: dict[str, float] = {}
    for figs in per_guest.values():
        for k, v in figs.items():
            total[k] = total.get(k, 0.0) + v
    ha, hb = a["host"], b["host"]
    pool_mib = float(hb.get("pool_bytes", 0)) / MIB
    disk_cache_mib = float(hb.get("disk_cache_kib", 0)) / 1024
    builds = int(total.get("builds", 0))
    page_ins = total.get("page_ins_disk", 0.0) + total.get("page_ins_pool", 0.0)
    agent_cpu = _d(ha, hb, "agent_cpu_seconds")
    guest_cpu = total.get("guest_cpu_seconds", 0.0)
    out: dict[str, Any] = {
        "seconds": round(seconds, 1),
        "builds": builds,
        "builds_failed": int(total.get("builds_failed", 0)),
        "build_mean_seconds": round(total["build_seconds_sum"] / builds, 1) if builds else None,
        "builds_per_minute": round(60 * builds / seconds, 2) if seconds else None,
        "memory_rounds": int(total.get("memory_rounds", 0)),
        "memory_rounds_failed": int(total.get("memory_rounds_failed", 0)),
        "disk_reads": int(total.get("disk_reads", 0)),
        "disk_writes": int(total.get("disk_writes", 0)),
        "disk_ops": int(total.get("disk_reads", 0) + total.get("disk_writes", 0)),
        "disk_read_mib": round(total.get("disk_read_mib", 0.0), 1),
        "storage_reads": round(total.get("storage_reads", 0.0)),
        "storage_ops": round(total.get("storage_reads", 0.0) + total.get("disk_writes", 0.0)),
        "storage_ops_per_second": (
            round((total.get("storage_reads", 0.0) + total.get("disk_writes", 0.0)) / seconds, 1)
            if seconds
            else None
        ),
        "swap_pages_to_disk": int(total.get("swap_pages_to_disk", 0)),
        "swap_pages_to_pool": int(total.get("swap_pages_to_pool", 0)),
        "swap_pages_to_host_spill": int(total.get("swap_pages_to_host_spill", 0)),
        "page_ins": round(page_ins),
        "page_ins_from_pool": round(total.get("page_ins_pool", 0.0)),
        "page_ins_from_disk": round(total.get("page_ins_disk", 0.0)),
        "pool_share_of_page_ins": round(total.get("page_ins_pool", 0.0) / page_ins, 3) if page_ins else None,
        "guest_memory_mib_end": round(total.get("guest_memory_mib_end", 0.0), 1),
        "pool_mib_end": round(pool_mib, 1),
        "host_disk_cache_mib_end": round(disk_cache_mib, 1),
        "host_cached_growth_mib": round(
            (float(hb.get("cached_kib", 0)) - float(ha.get("cached_kib", 0))) / 1024, 1
        ),
        "host_memory_mib": round(pool_mib + disk_cache_mib, 1),
        "host_agent_cpu_seconds": round(agent_cpu, 2),
        "qemu_cpu_seconds": round(total.get("qemu_cpu_seconds", 0.0), 1),
        "guest_cpu_seconds": round(guest_cpu, 1),
        "host_agent_cpu_pct_of_guest": round(100 * agent_cpu / guest_cpu, 3) if guest_cpu else None,
        "guest_agent_cpu_seconds": round(total.get("guest_agent_cpu_seconds", 0.0), 1),
        "guest_agent_cpu_pct_of_guest": (
            round(100 * total.get("guest_agent_cpu_seconds", 0.0) / guest_cpu, 1) if guest_cpu else None
        ),
        "guest_agent_rss_mib": round(total.get("guest_agent_rss_mib", 0.0), 1),
        "zswap_stored_pages_end": int(total.get("zswap_stored_pages", 0)),
        "zswap_pool_mib_end": round(total.get("zswap_pool_mib", 0.0), 1),
        "per_guest": {n: {k: round(v, 1) for k, v in f.items()} for n, f in per_guest.items()},
    }
    return out


def _rate(c: Mapping[str, Any], key: str) -> float:
    return float(c[key]) / float(c["seconds"]) if c.get("seconds") else 0.0


def _ratio(x: float, y: float) -> float | None:
    return round(x / y, 3) if y else None


def avoided_per_mib(c: Mapping[str, Any], base: Mapping[str, Any]) -> float | None:
    """Operations that reached host storage in `base` but not in `c` (at c's window length), per
    MiB of host memory `c` spent on the guests' behalf; None if it spent none."""
    mib = float(c.get("host_memory_mib") or 0)
    if mib <= 0:
        return None
    avoided = (_rate(base, "storage_ops") - _rate(c, "storage_ops")) * float(c["seconds"])
    return round(float(avoided) / mib, 2)


def ratios(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Each configuration against `plain` and `plain_lean`, per second of window (windows may
    differ by a few seconds); disk IOs avoided per MiB of host memory for tmem and host_cache."""
    out: dict[str, Any] = {}
    for name, c in configs.items():
        for base_name in ("plain", "plain_lean"):
            base = configs.get(base_name)
            if base is None or base_name == name:
                continue
            out[f"{name}_vs_{base_name}"] = {
                key: _ratio(_rate(c, key), _rate(base, key))
                for key in (
                    "builds",
                    "disk_ops",
                    "storage_ops",
                    "disk_reads",
                    "disk_writes",
                    "swap_pages_to_disk",
                    "page_ins_from_disk",
                )
            }
    if "plain_lean" in configs:
        for name in ("tmem", "host_cache"):
            if name in configs:
                out[f"{name}_storage_ops_avoided_per_host_mib"] = avoided_per_mib(
                    configs[name], configs["plain_lean"]
                )
    return out


def targets(configs: Mapping[str, Mapping[str, Any]], rat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's targets: met (True/False, None if a configuration needed is missing), the value,
    the bar, and the numbers behind a miss."""
    t = configs.get("tmem")
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, met: bool | None, value: Any, bar: str, why: str = "") -> None:
        out[name] = {"met": met, "value": value, "target": bar, **({"why": why} if why and not met else {})}

    if t is None:
        return {}
    share = t["pool_share_of_page_ins"]
    put(
        "pool_serves_a_third_of_page_ins",
        None if share is None else share >= POOL_SHARE_MIN,
        share,
        ">= 0.333",
        f"the pool served {t['page_ins_from_pool']} of {t['page_ins']} page-ins; "
        f"{t['page_ins_from_disk']} came from the disk",
    )
    put(
        "no_swap_pages_to_disk",
        t["swap_pages_to_disk"] == 0,
        t["swap_pages_to_disk"],
        "0",
        f"{t['swap_pages_to_disk']} swap pages reached the guest disks ({t['swap_pages_to_pool']} went "
        f"to the pool, which held {t['pool_mib_end']} MiB at the end)",
    )
    lean, plain = configs.get("plain_lean"), configs.get("plain")
    if lean is not None and plain is not None:
        rate, lean_rate, plain_rate = (_rate(c, "storage_ops") for c in (t, lean, plain))
        met = rate <= DISK_OPS_VS_LEAN_MAX * lean_rate and rate < plain_rate
        put(
            "disk_ops_half_of_plain_lean_and_below_plain",
            met,
            {"vs_plain_lean": _ratio(rate, lean_rate), "vs_plain": _ratio(rate, plain_rate)},
            "<= 0.5 of plain_lean, < 1 of plain",
            f"tmem {t['storage_ops']} ops in {t['seconds']} s against plain_lean's {lean['storage_ops']} "
            f"in {lean['seconds']} s and plain's {plain['storage_ops']} in {plain['seconds']} s",
        )
    a_t = rat.get("tmem_storage_ops_avoided_per_host_mib")
    a_h = rat.get("host_cache_storage_ops_avoided_per_host_mib")
    if "host_cache" in configs and lean is not None:
        # tmem must avoid something; against a host cache that avoided nothing, that is enough
        met = (
            a_t is not None
            and a_t > 0
            and (a_h is None or a_h <= 0 or a_t >= AVOIDED_PER_MIB_VS_HOST_CACHE_MIN * a_h)
        )
        value = _ratio(a_t, a_h) if a_t is not None and a_h is not None and a_h > 0 else None
        put(
            "avoided_per_mib_1_5x_host_cache",
            met,
            {"tmem": a_t, "host_cache": a_h, "ratio": value},
            ">= 1.5x host_cache's",
            f"tmem avoided {a_t} storage ops per MiB of host memory "
            f"({t['host_memory_mib']} MiB), host_cache {a_h} "
            f"({configs['host_cache']['host_memory_mib']} MiB)",
        )
    cpu = t["host_agent_cpu_pct_of_guest"]
    put(
        "host_agent_cpu_at_most_0_2pct_of_guest",
        None if cpu is None else cpu <= HOST_AGENT_CPU_PCT_MAX,
        {"host_agent_pct": cpu, "guest_agent_pct": t["guest_agent_cpu_pct_of_guest"]},
        "<= 0.2%",
        f"host agent {t['host_agent_cpu_seconds']} s of {t['guest_cpu_seconds']} guest CPU s",
    )
    return out


COLUMNS = (
    ("window (s)", "seconds"),
    ("guest memory at end (MiB)", "guest_memory_mib_end"),
    ("builds (per min)", "builds"),
    ("build mean (s)", "build_mean_seconds"),
    ("memory rounds", "memory_rounds"),
    ("disk reads", "disk_reads"),
    ("disk writes", "disk_writes"),
    ("reads at host storage", "storage_reads"),
    ("host storage ops/s", "storage_ops_per_second"),
    ("swap pages to disk", "swap_pages_to_disk"),
    ("page-ins (from pool)", "page_ins"),
    ("host memory (MiB)", "host_memory_mib"),
    ("host-agent CPU (s)", "host_agent_cpu_seconds"),
    ("guest CPU (s)", "guest_cpu_seconds"),
    ("guest agent CPU (s) / RSS (MiB)", "guest_agent_cpu_seconds"),
)


def _cell(c: Mapping[str, Any], key: str) -> str:
    v = c.get(key)
    if key == "page_ins":
        return f"{v:,} ({c.get('page_ins_from_pool', 0):,})"
    if key == "builds":
        return f"{v} ({c.get('builds_per_minute')})"
    if key == "guest_agent_cpu_seconds":
        return f"{v} / {c.get('guest_agent_rss_mib')}"
    if v is None:
        return "n/a"
    return f"{v:,}" if isinstance(v, int) else str(v)


def markdown_table(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per configuration, in the benchmark's order."""
    head = "| configuration | " + " | ".join(title for title, _ in COLUMNS) + " |"
    rule = "|---" * (len(COLUMNS) + 1) + "|"
    rows = [
        f"| {name} | " + " | ".join(_cell(configs[name], key) for _, key in COLUMNS) + " |"
        for name in CONFIGS
        if name in configs
    ]
    return "\n".join([head, rule, *rows])


def markdown_targets(tgt: Mapping[str, Mapping[str, Any]]) -> str:
    lines = []
    for name, t in tgt.items():
        mark = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(
            f"- `{name}`: {mark} (value {t['value']}, target {t['target']})"
            + (f": {t['why']}" if "why" in t else "")
        )
    return "\n".join(lines)
