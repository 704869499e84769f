"""Fixed-width tables for `hostagent stats` and `hostagent pools`.

Pure functions from the agent's JSON results to text, so the table layout can change without
touching the agent, and `--json` stays the exact, machine-readable form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MIB = 1 << 20

_KINDS = (("ephemeral", "ephemeral"), ("persistent", "persistent"))
_OPS = ("puts", "gets", "hits", "flushes", "pages")
_OP_HEAD = ("puts", "gets", "hits", "flush", "pages")
_NUM = 7  # width of a count column
_MIBW = 13  # width of "stored/raw MiB"
_GROUP = (_NUM + 1) * len(_OPS) + _MIBW


def count(n: int | None) -> str:
    """A count that fits 7 columns: exact up to a million, then k/M/G."""
    if n is None:
        return "-"
    if n < 1_000_000:
        return str(n)
    for unit, div in (("M", 1_000_000), ("G", 1_000_000_000)):
        if n < div * 1000:
            return f"{n / div:.1f}{unit}"
    return f"{n / 1e12:.1f}T"


def mib(nbytes: int | None, digits: int = 1) -> str:
    if nbytes is None:
        return "-"
    return f"{nbytes / MIB:.{digits}f}"


def format_stats(stats: Mapping[str, Any]) -> str:
    """One row per guest (ephemeral and persistent side by side) and a pool summary line."""
    guests = {g.get("name", key): g for key, g in stats.get("guests", {}).items()}
    name_w = max([5, *(len(n) for n in guests)])
    head1 = " " * (name_w + 6)
    head2 = f"{'GUEST':<{name_w}} {'CONN':<4} "
    for _, title in _KINDS:
        head1 += f" {' ' + title + ' ':-^{_GROUP - 1}} "
        head2 += "".join(f"{h:>{_NUM}} " for h in _OP_HEAD) + f"{'MiB/raw':>{_MIBW}} "
    lines = [head1.rstrip(), head2.rstrip()]
    for name, g in sorted(guests.items()):
        row = f"{name:<{name_w}} {'yes' if g.get('connected') else 'no':<4} "
        for key, _ in _KINDS:
            c = g.get(key, {})
            row += "".join(f"{count(c.get(op)):>{_NUM}} " for op in _OPS)
            row += f"{mib(c.get('bytes')) + '/' + mib(c.get('raw_bytes')):>{_MIBW}} "
        lines.append(row.rstrip())
    if len(lines) == 2:
        lines.append("(no guests)")
    p = stats.get("pool", {})
    a = stats.get("agent", {})
    lines.append(
        f"pool: {mib(p.get('used_bytes'))} MiB used / {mib(p.get('budget_bytes'))} budget / "
        f"{mib(p.get('limit_bytes'), 0)} limit; {count(p.get('pages'))} pages "
        f"({count(p.get('ephemeral_pages'))} ephemeral, {count(p.get('persistent_pages'))} "
        f"persistent, {mib(p.get('raw_bytes'))} MiB raw); {count(p.get('evictions'))} evictions; "
        f"host available {mib(p.get('host_available_bytes'), 0)} MiB; "
        f"agent CPU {a.get('cpu_seconds', 0):.2f} s (up {_duration(a.get('uptime', 0))})" + _cpu_ratio(a)
    )
    lines.extend(_memory_table(guests, name_w))
    lines.extend(_balloon_table(stats.get("balloon") or {}, guests, name_w))
    lines.extend(_precache_table(guests, name_w))
    lines.extend(_preswap_table(guests, name_w))
    lines.extend(_swapdev_table(guests, name_w))
    return "\n".join(lines)


_BAL_HEAD = ("GOAL", "TARGET", "ACTUAL", "FLOOR", "MAX", "GIVEN")


def _balloon_table(ctl: Mapping[str, Any], guests: Mapping[str, Mapping[str, Any]], name_w: int) -> list[str]:
    """Per ballooned guest: goal, target, actual, floor, max (MiB), memory given back, and the last
    action with its reason."""
    if not ctl.get("enabled"):
        return []
    rows = []
    for name, g in sorted(guests.items()):
        b = g.get("balloon")
        if not b:
            continue
        given = b.get("given_back_kib", 0) - b.get("returned_kib", 0)
        cells = (
            *(_kib_mib(b.get(k)) for k in ("goal_kib", "target_kib", "actual_kib", "floor_kib", "max_kib")),
            _kib_mib(given),
        )
        last = b.get("last")
        what = b.get("state", "")
        if last:
            what += (
                f"; last {last['action']} {last['from_kib'] // 1024}->{last['to_kib'] // 1024}"
                f" MiB: {last['reason']}"
            )
        rows.append(f"{name:<{name_w}} " + " ".join(f"{c:>7}" for c in cells) + f"  {what}")
    pressure = "host under pressure" if ctl.get("pressure") else "no host pressure"
    title = (
        f"balloon (MiB), every {ctl.get('interval', 0):g} s; {pressure} (available "
        f"{_kib_mib(ctl.get('host_available_kib'))}, threshold "
        f"{_kib_mib(ctl.get('host_min_available_kib'))}):"
    )
    head = f"{'GUEST':<{name_w}} " + " ".join(f"{h:>7}" for h in _BAL_HEAD) + "  STATE / LAST ACTION"
    return ["", title, head, *(rows or ["(no ballooned guests)"])]


def _per_guest(
    title: str, heads: Sequence[str], name_w: int, rows: Sequence[tuple[str, Sequence[str]]]
) -> list[str]:
    """A section of the stats: `title`, a header and a line of right-aligned cells per guest in
    `rows`; no lines at all without rows (no guest has that feature)."""
    if not rows:
        return []
    head = f"{'GUEST':<{name_w}} " + " ".join(f"{h:>{_NUM}}" for h in heads)
    lines = [f"{name:<{name_w}} " + " ".join(f"{c:>{_NUM}}" for c in cells) for name, cells in rows]
    return ["", title, head, *lines]


_PC_HEAD = ("gets", "hits", "misses", "hit%", "puts", "flush", "tmemMiB", "diskMiB")


def _reports(guests: Mapping[str, Mapping[str, Any]], counter: str) -> list[tuple[str, Mapping[str, Any]]]:
    """(name, report values) of each guest whose latest report has `counter`: the feature runs."""
    found = ((name, (g.get("report") or {}).get("values", {})) for name, g in sorted(guests.items()))
    return [(name, values) for name, values in found if counter in values]


def _precache_cells(values: Mapping[str, Any]) -> tuple[str, ...]:
    gets, hits = values.get("precache_gets", 0), values.get("precache_hits", 0)
    return (
        count(gets),
        count(hits),
        count(values.get("precache_misses")),
        f"{100 * hits / gets:.0f}" if gets else "-",
        count(values.get("precache_puts")),
        count(values.get("precache_flushes")),
        mib(values.get("precache_bytes_from_tmem")),
        mib(values.get("precache_bytes_from_disk")),
    )


def _precache_table(guests: Mapping[str, Mapping[str, Any]], name_w: int) -> list[str]:
    """Per guest whose latest report has precache counters (guestagent's FUSE victim cache)."""
    rows = [(name, _precache_cells(values)) for name, values in _reports(guests, "precache_gets")]
    title = "precache (FUSE victim cache), from the guests' reports: pages, MiB read:"
    return _per_guest(title, _PC_HEAD, name_w, rows)


_PS_HEAD = ("puts", "refused", "gets", "faults", "diskW", "diskR", "inTmem", "onDisk", "inMem")
_PS_KEYS = (
    "puts",
    "puts_refused",
    "gets",
    "faults",
    "disk_writes",
    "disk_reads",
    "in_tmem",
    "on_disk",
    "resident",
)


def _preswap_table(guests: Mapping[str, Mapping[str, Any]], name_w: int) -> list[str]:
    """Per guest whose latest report has preswap counters (guestagent's userfaultfd regions)."""
    reporting = _reports(guests, "preswap_puts")
    rows = [(name, [count(values.get(f"preswap_{key}")) for key in _PS_KEYS]) for name, values in reporting]
    title = "preswap (regions' pages: tmem, else the swapper's swap file), from the guests' reports:"
    return _per_guest(title, _PS_HEAD, name_w, rows)


_SD_KEYS = ("puts", "refusals", "gets", "spill_reads", "trims", "shrunk", "pool_pages", "storage_pages")
_SD_HEAD = ("PUTS", "REFUSED", "GETS", "DISK-RD", "TRIMS", "SHRUNK", "IN-POOL", "ON-DISK")


def _swapdev_table(guests: Mapping[str, Mapping[str, Any]], name_w: int) -> list[str]:
    """Per guest with a swap device (the host agent's own counters)."""
    rows = [
        (name, [count(g["swapdev"].get(key)) for key in _SD_KEYS])
        for name, g in sorted(guests.items())
        if g.get("swapdev")
    ]
    return _per_guest("swap devices (pages: the pool, else the host's spill file):", _SD_HEAD, name_w, rows)


_MEM_HEAD = (
    "ACTUAL",
    "MAX",
    "COMMIT",
    "AVAIL",
    "pgpgin/s",
    "pgpgout/s",
    "pswpin/s",
    "pswpout/s",
    "CPU s",
    "REPORT",
)


def _memory_table(guests: Mapping[str, Mapping[str, Any]], name_w: int) -> list[str]:
    """Per guest: balloon (libvirt) and the guest's own report: MiB, KiB/s, pages/s."""
    rows = []
    for name, g in sorted(guests.items()):
        dom = g.get("domain") or {}
        report = g.get("report") or {}
        values = report.get("values", {})
        rates = g.get("rates", {})
        if not dom and not values:
            continue
        cells = (
            _kib_mib(dom.get("actual_kib")),
            _kib_mib(dom.get("max_kib")),
            _kib_mib(values.get("committed_as_kib")),
            _kib_mib(values.get("memavailable_kib")),
            *(_rate(rates.get(k)) for k in ("pgpgin", "pgpgout", "pswpin", "pswpout")),
            "-" if dom.get("cpu_seconds") is None else f"{dom['cpu_seconds']:.1f}",
            f"{report['age']:.0f}s ago" if report else "none",
        )
        rows.append(f"{name:<{name_w}} " + " ".join(f"{c:>9}" for c in cells))
    if not rows:
        return []
    head = f"{'GUEST':<{name_w}} " + " ".join(f"{h:>9}" for h in _MEM_HEAD)
    return ["", "memory (MiB) and paging, from libvirt and the guests' reports:", head, *rows]


def _kib_mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _cpu_ratio(agent: Mapping[str, Any]) -> str:
    ratio = agent.get("cpu_ratio")
    if ratio is None:
        return ""
    return f"; guests' CPU {agent.get('guest_cpu_seconds', 0):.1f} s, agent/guests {100 * ratio:.2f}%"


def format_pools(pools: Sequence[Mapping[str, Any]]) -> str:
    """One row per (guest, pool id): a shared pool appears once for each member."""
    rows: list[tuple[str, str, str, str, str]] = []
    for pool in pools:
        members = pool.get("members") or {pool.get("owner", "?"): pool.get("handle", "?")}
        for guest, pool_id in sorted(members.items()):
            stored = pool.get("bytes")  # NEEDS(engine): per-pool stored bytes in pools_info()
            rows.append(
                (
                    str(guest),
                    str(pool_id),
                    str(pool.get("kind", "?")),
                    count(pool.get("pages")),
                    "-" if stored is None else mib(stored, 2),
                )
            )
    rows.sort()
    head = ("GUEST", "ID", "TYPE", "PAGES", "MiB")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    left = (True, False, True, False, False)
    out = []
    for r in [head, *rows]:
        cells = [c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(r, widths, left, strict=True)]
        out.append("  ".join(cells).rstrip())
    if not rows:
        out.append("(no pools)")
    return "\n".join(out)


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_compact(
    stats: Mapping[str, Any], stamp: str, since: tuple[float, Mapping[str, Any]] | None = None
) -> str:
    """One line for the pool and one per guest, each starting with `stamp`: for a log or a
    terminal over SSH (nothing is redrawn). With `since` (seconds, the previous sample), puts and
    gets per second over that interval are shown."""
    p = stats.get("pool", {})
    lines = [
        f"{stamp} pool used {mib(p.get('used_bytes'))}/{mib(p.get('budget_bytes'), 0)} MiB "
        f"pages {count(p.get('pages'))} (eph {count(p.get('ephemeral_pages'))} pers "
        f"{count(p.get('persistent_pages'))}) evictions {count(p.get('evictions'))} "
        f"host-avail {mib(p.get('host_available_bytes'), 0)} MiB"
    ]
    guests = stats.get("guests", {})
    old = since[1].get("guests", {}) if since else {}
    name_w = max([1, *(len(str(g.get("name", k))) for k, g in guests.items())])
    for key, g in sorted(guests.items(), key=lambda kv: str(kv[1].get("name", kv[0]))):
        e, s = g.get("ephemeral", {}), g.get("persistent", {})
        line = (
            f"{stamp} {g.get('name', key):<{name_w}} {'up' if g.get('connected') else 'down':<4} "
            f"eph {count(e.get('pages'))}p {mib(e.get('bytes'))}M hit {count(e.get('hits'))}/"
            f"{count(e.get('gets'))} pers {count(s.get('pages'))}p {mib(s.get('bytes'))}M "
            f"refused {count(s.get('puts_refused'))}"
        )
        if since is not None and key in old and since[0] > 0:
            o = old[key]

            def delta(op: str, g: Mapping[str, Any] = g, o: Mapping[str, Any] = o) -> float:
                return float(sum(g.get(k, {}).get(op, 0) - o.get(k, {}).get(op, 0) for k, _ in _KINDS))

            line += f" put/s {delta('puts') / since[0]:.0f} get/s {delta('gets') / since[0]:.0f}"
        dom = g.get("domain") or {}
        if dom:
            line += f" mem {_kib_mib(dom.get('actual_kib'))}/{_kib_mib(dom.get('max_kib'))}M"
        values = (g.get("report") or {}).get("values", {})
        if "committed_as_kib" in values:
            line += f" commit {_kib_mib(values['committed_as_kib'])}M"
        lines.append(line)
    if not guests:
        lines.append(f"{stamp} (no guests)")
    return "\n".join(lines)
