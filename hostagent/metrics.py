"""Prometheus metrics from the agent's stats: a pure mapping, so names and labels are testable.

`families(stats)` turns the result of the `stats` control command (the very dict `hostagent stats
--json` prints) into prometheus_client metric families; `render(stats)` is the text exposition
format served on /metrics. Naming follows Prometheus conventions: a `tmem_` prefix, base units
(bytes, seconds), counters ending in `_total`. Per-guest series carry `domain` (the domain's
name, or a configured guest's name) and `uuid` (the libvirt domain UUID; empty for a configured
socket guest); per-kind series carry `kind` (`ephemeral` or `persistent`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

KINDS = ("ephemeral", "persistent")
GUEST_LABELS = ("domain", "uuid")
KIND_LABELS = ("domain", "uuid", "kind")

# Per guest and pool kind: (metric name without _total, engine counter, help). Counters.
_GUEST_COUNTERS = (
    ("tmem_guest_puts", "puts", "Pages the guest put."),
    ("tmem_guest_puts_refused", "puts_refused", "Puts the pool refused (no room, cap or quota)."),
    ("tmem_guest_gets", "gets", "Gets the guest asked for."),
    ("tmem_guest_hits", "hits", "Gets that found their page."),
    ("tmem_guest_flushes", "flushes", "Flushes of pages or objects."),
    ("tmem_guest_evicted_pages", "evicted", "Pages evicted by the host (ephemeral only)."),
)
# Per guest and pool kind: gauges.
_GUEST_GAUGES = (
    ("tmem_guest_pages", "pages", 1, "Pages the guest holds in the pool."),
    ("tmem_guest_stored_bytes", "bytes", 1, "Arena bytes holding the guest's pages (compressed)."),
)
# From the guest agent's latest report: (metric, report key, scale, help, counter?).
_REPORT = (
    ("tmem_guest_committed_as_bytes", "committed_as_kib", 1024, "Guest's Committed_AS.", False),
    ("tmem_guest_memavailable_bytes", "memavailable_kib", 1024, "Guest's MemAvailable.", False),
    ("tmem_guest_precache_gets", "precache_gets", 1, "Precache shim page-ins tried from tmem.", True),
    ("tmem_guest_precache_hits", "precache_hits", 1, "Precache page-ins served by tmem.", True),
    ("tmem_guest_precache_puts", "precache_puts", 1, "Clean pages the precache shim put.", True),
    (
        "tmem_guest_precache_read_from_tmem_bytes",
        "precache_bytes_from_tmem",
        1,
        "Bytes the precache shim read from tmem.",
        True,
    ),
    (
        "tmem_guest_precache_read_from_disk_bytes",
        "precache_bytes_from_disk",
        1,
        "Bytes the precache shim read from its backing disk.",
        True,
    ),
    ("tmem_guest_preswap_puts", "preswap_puts", 1, "Preswap pages put into tmem.", True),
    (
        "tmem_guest_preswap_puts_refused",
        "preswap_puts_refused",
        1,
        "Preswap puts the host refused (they went to the swap file).",
        True,
    ),
    ("tmem_guest_preswap_gets", "preswap_gets", 1, "Preswap faults served from tmem.", True),
    (
        "tmem_guest_preswap_disk_writes",
        "preswap_disk_writes",
        1,
        "Preswap pages written to the guest's swap file.",
        True,
    ),
    ("tmem_guest_preswap_in_tmem_pages", "preswap_in_tmem", 1, "Preswap pages now in tmem.", False),
    ("tmem_guest_preswap_on_disk_pages", "preswap_on_disk", 1, "Preswap pages now in the swap file.", False),
)


def _guest_labels(key: str, g: Mapping[str, Any]) -> tuple[str, str]:
    """(domain, uuid): a libvirt domain has both; a configured socket guest only its name."""
    return str(g.get("name") or key), str(g.get("uuid") or "")


def families(stats: Mapping[str, Any]) -> list[Metric]:
    """Every metric family for one `stats` result."""
    return [*_pool_families(stats), *_guest_families(stats.get("guests", {})), *_shared_families(stats)]


def _pool_families(stats: Mapping[str, Any]) -> list[Metric]:
    """The pool's and the agent's own figures."""
    out: list[Metric] = []
    pool = stats.get("pool", {})

    def gauge(name: str, doc: str, value: Any) -> None:
        if isinstance(value, int | float):
            out.append(GaugeMetricFamily(name, doc, value=value))

    def counter(name: str, doc: str, value: Any) -> None:
        if isinstance(value, int | float):
            out.append(CounterMetricFamily(name, doc, value=value))

    gauge("tmem_pool_limit_bytes", "Hard ceiling of pool memory ([pool] limit_mib).", pool.get("limit_bytes"))
    gauge(
        "tmem_pool_budget_bytes",
        "What the pool may use now (limit, less the host reserve).",
        pool.get("budget_bytes"),
    )
    gauge("tmem_pool_used_bytes", "Arena bytes holding pages.", pool.get("used_bytes"))
    gauge("tmem_pool_resident_bytes", "Arena bytes resident in tmpfs.", pool.get("resident_bytes"))
    gauge(
        "tmem_host_available_bytes",
        "Host's available memory, as the pool last sampled it.",
        pool.get("host_available_bytes"),
    )
    gauge("tmem_pools", "Pools open (private and shared).", pool.get("pools"))
    counter("tmem_pool_evictions", "Ephemeral pages evicted by the host.", pool.get("evictions"))
    counter("tmem_pool_compactions", "Size classes compacted to free a slab.", pool.get("compactions"))
    pages = GaugeMetricFamily("tmem_pool_pages", "Pages in the pool, by pool kind.", labels=["kind"])
    for kind in KINDS:
        if isinstance(pool.get(f"{kind}_pages"), int):
            pages.add_metric([kind], pool[f"{kind}_pages"])
    out.append(pages)
    agent = stats.get("agent") or {}
    counter("tmem_agent_cpu_seconds", "Host agent's CPU time (user + system).", agent.get("cpu_seconds"))
    gauge("tmem_agent_uptime_seconds", "Seconds since the host agent started.", agent.get("uptime"))
    return out


def _guest_families(guests: Mapping[str, Any]) -> list[Metric]:
    """Per-guest figures, labelled with the domain's name and UUID (and the pool kind)."""
    connected = GaugeMetricFamily(
        "tmem_guest_connected", "1 while the guest's channel is connected.", labels=GUEST_LABELS
    )
    counters = {m: CounterMetricFamily(m, doc, labels=KIND_LABELS) for m, _, doc in _GUEST_COUNTERS}
    gauges = {m: GaugeMetricFamily(m, doc, labels=KIND_LABELS) for m, _, _, doc in _GUEST_GAUGES}
    quota = GaugeMetricFamily("tmem_guest_quota_bytes", "Guest's persistent quota.", labels=GUEST_LABELS)
    cap = GaugeMetricFamily("tmem_guest_cap_bytes", "Guest's ephemeral cap (0: none).", labels=GUEST_LABELS)
    report: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
    for m, _, _, doc, is_counter in _REPORT:
        report[m] = (
            CounterMetricFamily(m, doc, labels=GUEST_LABELS)
            if is_counter
            else GaugeMetricFamily(m, doc, labels=GUEST_LABELS)
        )
    mem_actual = GaugeMetricFamily(
        "tmem_domain_memory_actual_bytes", "Domain's balloon size (libvirt).", labels=GUEST_LABELS
    )
    mem_max = GaugeMetricFamily(
        "tmem_domain_memory_max_bytes", "Domain's maximum memory (libvirt).", labels=GUEST_LABELS
    )
    cpu = CounterMetricFamily("tmem_domain_cpu_seconds", "Domain's CPU time (libvirt).", labels=GUEST_LABELS)
    for key, g in sorted(guests.items()):
        labels = list(_guest_labels(key, g))
        connected.add_metric(labels, 1 if g.get("connected") else 0)
        if isinstance(g.get("quota_bytes"), int):
            quota.add_metric(labels, g["quota_bytes"])
        if isinstance(g.get("cap_bytes"), int):
            cap.add_metric(labels, g["cap_bytes"])
        for kind in KINDS:
            c = g.get(kind) or {}
            for m, field, _ in _GUEST_COUNTERS:
                if isinstance(c.get(field), int):
                    counters[m].add_metric([*labels, kind], c[field])
            for m, field, scale, _ in _GUEST_GAUGES:
                if isinstance(c.get(field), int):
                    gauges[m].add_metric([*labels, kind], c[field] * scale)
        values = (g.get("report") or {}).get("values") or {}
        for m, field, scale, _, _ in _REPORT:
            v = values.get(field)
            if isinstance(v, int | float) and not isinstance(v, bool):
                report[m].add_metric(labels, v * scale)
        dom = g.get("domain") or {}
        if isinstance(dom.get("actual_kib"), int):
            mem_actual.add_metric(labels, dom["actual_kib"] * 1024)
        if isinstance(dom.get("max_kib"), int):
            mem_max.add_metric(labels, dom["max_kib"] * 1024)
        if isinstance(dom.get("cpu_seconds"), int | float):
            cpu.add_metric(labels, dom["cpu_seconds"])
    return [
        connected,
        *counters.values(),
        *gauges.values(),
        quota,
        cap,
        *report.values(),
        mem_actual,
        mem_max,
        cpu,
    ]


def _shared_families(stats: Mapping[str, Any]) -> list[Metric]:
    """Shared pools, labelled by UUID: their pages are nobody's."""
    shared_pages = GaugeMetricFamily(
        "tmem_shared_pool_pages", "Pages in a shared pool.", labels=["pool_uuid", "kind"]
    )
    shared_bytes = GaugeMetricFamily(
        "tmem_shared_pool_stored_bytes",
        "Arena bytes holding a shared pool's pages.",
        labels=["pool_uuid", "kind"],
    )
    for uuid, sp in sorted((stats.get("shared") or {}).items()):
        if isinstance(sp.get("pages"), int):
            shared_pages.add_metric([uuid, str(sp.get("kind", ""))], sp["pages"])
        if isinstance(sp.get("bytes"), int):
            shared_bytes.add_metric([uuid, str(sp.get("kind", ""))], sp["bytes"])
    return [shared_pages, shared_bytes]


class _Snapshot(Collector):
    """A collector over one stats dict (the registry asks it once per render)."""

    def __init__(self, metrics: Iterable[Metric]) -> None:
        self.metrics = list(metrics)

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def render(stats: Mapping[str, Any]) -> bytes:
    """The text exposition format (version 0.0.4) of `families(stats)`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(stats)))
    return generate_latest(registry)
