"""The seed benchmark's plots (matplotlib, no display): per-configuration bars and a timeline.

`bars` draws, per configuration, the disk operations (reads and writes QEMU passed to the disk, and
the reads that reached host storage), the builds completed and the host memory spent on the guests'
behalf; `timeline` draws the guests' memory (sum) and the pool's resident size over each
configuration's run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the backend

from scripts.seed_figures import CONFIGS


def bars(configs: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    names = [n for n in CONFIGS if n in configs]
    xs = range(len(names))
    fig, (ax_io, ax_builds, ax_mem) = plt.subplots(1, 3, figsize=(13, 4))
    reads = [configs[n]["disk_reads"] for n in names]
    writes = [configs[n]["disk_writes"] for n in names]
    storage = [configs[n]["storage_reads"] for n in names]
    ax_io.bar(xs, reads, label="reads")
    ax_io.bar(xs, writes, bottom=reads, label="writes")
    ax_io.scatter(xs, storage, color="black", marker="_", s=400, zorder=3, label="reads at host storage")
    ax_io.set_title("disk operations (libvirt)")
    ax_io.legend(fontsize="small")
    ax_builds.bar(xs, [configs[n]["builds"] for n in names], color="tab:green")
    ax_builds.set_title("builds completed")
    ax_mem.bar(xs, [configs[n]["pool_mib_end"] for n in names], label="tmem pool")
    ax_mem.bar(
        xs,
        [configs[n]["host_disk_cache_mib_end"] for n in names],
        bottom=[configs[n]["pool_mib_end"] for n in names],
        label="host page cache (disks)",
    )
    ax_mem.set_title("host memory for the guests (MiB)")
    ax_mem.legend(fontsize="small")
    for ax in (ax_io, ax_builds, ax_mem):
        ax.set_xticks(list(xs), names, rotation=20)
    secs = [configs[n]["seconds"] for n in names]
    fig.suptitle(f"scripts/bench seed: windows of {min(secs):.0f}-{max(secs):.0f} s" if names else "")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def timeline(samples: Mapping[str, Sequence[Mapping[str, float]]], path: Path) -> Path:
    """`samples`: configuration -> [{"t": seconds since its lab was up, "guest_mib", "pool_mib"}]."""
    fig, (ax_g, ax_p) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name in CONFIGS:
        pts = samples.get(name)
        if not pts:
            continue
        ts = [p["t"] for p in pts]
        ax_g.plot(ts, [p["guest_mib"] for p in pts], label=name)
        ax_p.plot(ts, [p["pool_mib"] for p in pts], label=name)
    ax_g.set_ylabel("guest memory, sum (MiB)")
    ax_p.set_ylabel("pool resident (MiB)")
    ax_p.set_xlabel("seconds since the workloads started")
    ax_g.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
