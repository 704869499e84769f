"""Benchmark of the pool engine; prints one JSON object (run it as `scripts/bench pool`).

Why these figures: the engine sits on every tmem put and get, so its cost is judged against the
cheapest thing that could stand in for it (a dict of bytes, or lz4 alone when compressing), and its
index must stay small enough that a million stored pages cost little Python heap.

(a) put+get pair, 4 KiB random pages, compression off, private ephemeral and persistent
    (exclusive gets) pools vs a plain dict store;                           target ratio <= 4
(b) the same with lz4 on text-like pages vs lz4.block compress+decompress;  target ratio <= 1.5
(c) zero pages vs the lz4 path through the engine;                          target ratio >= 5
    Context: copy_floor, two copies of each page through a tmpfs mapping and nothing else, the
    part of (a) a dict store that keeps references never pays;
(d) Python heap per stored page while holding 1,000,000 pages (tracemalloc); target <= 128 bytes
Each timing is the median of several repetitions, the variants interleaved so noise hits all alike;
each ratio is the median of the per-repetition ratios.
"""

from __future__ import annotations

import functools
import gc
import glob
import json
import mmap
import os
import random
import resource
import shutil
import statistics
import struct
import sys
import sysconfig
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lz4.block

from guestagent.protocol.wire import PAGE_SIZE, PoolFlag
from hostagent.arena import RAW_CLASS, SLOT_SIZES, Arena
from hostagent.pool import Client, ClientSettings, PoolEngine

_RAW_SLOT = SLOT_SIZES[RAW_CLASS]  # the arena's stride between raw pages
N_PAGES = 2000  # pages per timed repetition (about 8 MiB of page data)
REPS = 9
PAGES_PER_OBJECT = 64
MIB = 1 << 20

Key = tuple[bytes, int]
Page = bytes | memoryview


class DictStore:
    """The baseline: the least a page store can do (copy in, pop out), same API as the engine."""

    def __init__(self) -> None:
        self.pages: dict[tuple[int, bytes, int], bytes] = {}

    def put(self, pool: int, oid: bytes, index: int, page: Page) -> bool:
        self.pages[(pool, oid, index)] = bytes(page)  # a copy only if page is not bytes already
        return True

    def get(self, pool: int, oid: bytes, index: int) -> bytes | None:
        return self.pages.pop((pool, oid, index), None)


def make_keys(n: int) -> list[Key]:
    return [((i // PAGES_PER_OBJECT).to_bytes(24, "little"), i % PAGES_PER_OBJECT) for i in range(n)]


def text_pages(n: int) -> list[bytes]:
    """Realistic text-like pages: English (licence texts, Python's docs) and Python source."""
    stdlib = sysconfig.get_paths()["stdlib"]
    english = b"".join(
        Path(f).read_bytes() for f in sorted(glob.glob("/usr/share/common-licenses/*")) if os.path.isfile(f)
    )
    english += Path(stdlib, "pydoc_data", "topics.py").read_bytes()
    source = b"".join(Path(f).read_bytes() for f in sorted(glob.glob(stdlib + "/*.py")))
    pools = [english, source]
    out: list[bytes] = []
    offsets = [0, 0]
    while len(out) < n:
        which = len(out) % 2
        data = pools[which]
        start = offsets[which] % (len(data) - PAGE_SIZE)
        out.append(data[start : start + PAGE_SIZE])
        offsets[which] = start + PAGE_SIZE
    return out


def time_pairs(
    put: Callable[[int, bytes, int, Page], object],
    get: Callable[[int, bytes, int], object],
    pool: int,
    keys: Sequence[Key],
    pages: Sequence[Page],
    hot: bool = False,
) -> float:
    """Microseconds per put+get pair: put every page (the pool fills), then get every page back.

    This is the realistic pattern (a page stays in the pool a while): the working set is megabytes,
    and arena slabs emptied by the gets may be punched and refaulted by the next fill. `hot` gets
    each page right after its put instead: one slot reused, all in cache, the engine's CPU cost
    with memory effects removed (context for the realistic figure).
    """
    gc.collect()
    t0 = time.perf_counter_ns()
    if hot:
        for (oid, index), page in zip(keys, pages, strict=True):
            put(pool, oid, index, page)
            get(pool, oid, index)
    else:
        for (oid, index), page in zip(keys, pages, strict=True):
            put(pool, oid, index, page)
        for oid, index in keys:
            get(pool, oid, index)
    return (time.perf_counter_ns() - t0) / len(keys) / 1000


def time_copy_floor(mm: mmap.mmap, pages: Sequence[Page]) -> float:
    """Microseconds per page to copy it into a tmpfs mapping and back out, nothing else: the
    floor under any store whose pages live in an arena (the dict store copies nothing)."""
    gc.collect()
    t0 = time.perf_counter_ns()
    offset = 0
    for page in pages:
        mm[offset : offset + PAGE_SIZE] = page
        offset += _RAW_SLOT
    offset = 0
    for _ in pages:
        mm[offset : offset + PAGE_SIZE]
        offset += _RAW_SLOT
    return (time.perf_counter_ns() - t0) / len(pages) / 1000


def time_lz4(pages: Sequence[bytes]) -> float:
    """Microseconds per page for lz4 block compress + decompress alone (the floor for (b))."""
    compress, decompress = lz4.block.compress, lz4.block.decompress
    gc.collect()
    t0 = time.perf_counter_ns()
    packed = [compress(p, store_size=False) for p in pages]
    for c in packed:
        decompress(c, uncompressed_size=PAGE_SIZE)
    return (time.perf_counter_ns() - t0) / len(pages) / 1000


class EngineTarget:
    """One client's pool on an engine, with the engine's put/get bound to that client."""

    def __init__(self, engine: PoolEngine, client: Client, flags: int) -> None:
        self.engine = engine
        self.client = client
        self.pool = engine.new_pool(client, flags)
        # Bound with partial (a C-level call), so the engine pays no extra Python frame that the
        # dict store's bound methods do not pay either.
        self.put: Callable[[int, bytes, int, Page], bool] = functools.partial(engine.put, client)
        self.get: Callable[[int, bytes, int], bytes | None] = functools.partial(engine.get, client)


def check_round_trip(target: EngineTarget, keys: Sequence[Key], pages: Sequence[bytes]) -> None:
    """A benchmark of a wrong engine is worthless: every page must come back exactly."""
    for (oid, index), page in zip(keys, pages, strict=True):
        if not target.put(target.pool, oid, index, page):
            raise SystemExit(f"bench: put refused for {index}")
    for (oid, index), page in zip(keys, pages, strict=True):
        if target.get(target.pool, oid, index) != page:
            raise SystemExit(f"bench: page {oid.hex()}/{index} did not come back exactly")


def bench_speed(root: Path) -> dict[str, Any]:
    arena = Arena(root / "arena-speed", 96 * MIB)
    floor_fd = os.open(root / "copy-floor", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(floor_fd, N_PAGES * _RAW_SLOT)
    floor = mmap.mmap(floor_fd, N_PAGES * _RAW_SLOT)  # beside the arena, on the same tmpfs
    os.close(floor_fd)
    engine = PoolEngine(arena, limit_bytes=96 * MIB)
    try:
        raw_c = engine.client("raw", ClientSettings(compress=False, quota_bytes=64 * MIB))
        lz4_c = engine.client("lz4", ClientSettings(compress=True, quota_bytes=64 * MIB))
        eph_raw = EngineTarget(engine, raw_c, 0)
        pers_raw = EngineTarget(engine, raw_c, int(PoolFlag.PERSISTENT | PoolFlag.EXCLUSIVE_GETS))
        eph_lz4 = EngineTarget(engine, lz4_c, 0)
        keys = make_keys(N_PAGES)
        rnd = random.Random(1)
        random_pages = [rnd.randbytes(PAGE_SIZE) for _ in range(N_PAGES)]
        texts = text_pages(N_PAGES)
        zeros = [bytes(PAGE_SIZE) for _ in range(N_PAGES)]  # distinct objects, as off the wire
        text_ratio = PAGE_SIZE * len(texts) / sum(len(lz4.block.compress(p, store_size=False)) for p in texts)
        for target, pages in (
            (eph_raw, random_pages),
            (pers_raw, random_pages),
            (eph_lz4, texts),
            (eph_lz4, zeros),
        ):
            check_round_trip(target, keys, pages)  # also warms the arena's slabs
        dict_store = DictStore()
        time_copy_floor(floor, random_pages)  # fault its pages in, as the round trips did the arena's
        # The same pages as views into one receive buffer: bytes(page) then really copies.
        buffer = b"".join(random_pages)
        views = [memoryview(buffer)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(N_PAGES)]

        plan: dict[str, Callable[[], float]] = {
            "dict": lambda: time_pairs(dict_store.put, dict_store.get, 1, keys, random_pages),
            "eph_raw": lambda: time_pairs(eph_raw.put, eph_raw.get, eph_raw.pool, keys, random_pages),
            "pers_raw": lambda: time_pairs(pers_raw.put, pers_raw.get, pers_raw.pool, keys, random_pages),
            "copy_floor": lambda: time_copy_floor(floor, random_pages),
            "lz4_alone": lambda: time_lz4(texts),
            "eph_lz4": lambda: time_pairs(eph_lz4.put, eph_lz4.get, eph_lz4.pool, keys, texts),
            "eph_zero": lambda: time_pairs(eph_lz4.put, eph_lz4.get, eph_lz4.pool, keys, zeros),
            "dict_hot": lambda: time_pairs(dict_store.put, dict_store.get, 1, keys, random_pages, hot=True),
            "eph_raw_hot": lambda: time_pairs(
                eph_raw.put, eph_raw.get, eph_raw.pool, keys, random_pages, hot=True
            ),
            "pers_raw_hot": lambda: time_pairs(
                pers_raw.put, pers_raw.get, pers_raw.pool, keys, random_pages, hot=True
            ),
            "dict_buf": lambda: time_pairs(dict_store.put, dict_store.get, 1, keys, views),
            "eph_raw_buf": lambda: time_pairs(eph_raw.put, eph_raw.get, eph_raw.pool, keys, views),
        }
        runs: dict[str, list[float]] = {k: [] for k in plan}
        faults = 0
        for _ in range(REPS):
            for name, run in plan.items():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                runs[name].append(run())
                if name == "eph_raw":
                    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        med = {k: statistics.median(v) for k, v in runs.items()}
        stats = engine.stats()["pool"]
        if stats["pages"] != 0:
            raise SystemExit(f"bench: {stats['pages']} pages left after exclusive gets")
    finally:
        engine.close()
        arena.close()
        floor.close()

    def ratio(a: str, b: str) -> float:
        """The median of the per-repetition ratios: each repetition times both sides back to
        back, so a burst of noise (this is a shared 2-core machine) hits them alike."""
        return round(statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True)), 3)

    def us(name: str) -> float:
        return round(med[name], 3)

    def raw_against_dict(tag: str) -> dict[str, float]:
        """The dict store's and both raw pools' pair times (`tag` "_hot": put then get at once),
        and each pool's ratio to the dict."""
        figures = {f"dict{tag}_pair_us": us(f"dict{tag}")}
        for pool, kind in (("eph", "ephemeral"), ("pers", "persistent")):
            figures[f"{kind}_raw{tag}_pair_us"] = us(f"{pool}_raw{tag}")
            figures[f"{kind}_raw{tag}_ratio"] = ratio(f"{pool}_raw{tag}", f"dict{tag}")
        return figures

    return {
        "pages_per_rep": N_PAGES,
        "reps": REPS,
        # (a) pages as the channel hands them over (bytes), the pool filled then drained
        **raw_against_dict(""),
        # what two page copies through a tmpfs mapping cost alone, against the same dict
        "copy_floor_pair_us": us("copy_floor"),
        "copy_floor_ratio": ratio("copy_floor", "dict"),
        "ephemeral_raw_minor_faults_per_pair": round(faults / REPS / N_PAGES, 2),
        # (a) context: put then get at once (no memory effects), and pages as buffer views
        **raw_against_dict("_hot"),
        "dict_from_buffer_pair_us": us("dict_buf"),
        "ephemeral_raw_from_buffer_pair_us": us("eph_raw_buf"),
        "ephemeral_raw_from_buffer_ratio": ratio("eph_raw_buf", "dict_buf"),
        # (b), (c)
        "text_lz4_compression_ratio": round(text_ratio, 3),
        "lz4_alone_pair_us": us("lz4_alone"),
        "ephemeral_lz4_pair_us": us("eph_lz4"),
        "lz4_ratio": ratio("eph_lz4", "lz4_alone"),
        "zero_pair_us": us("eph_zero"),
        "lz4_vs_zero_ratio": ratio("eph_lz4", "eph_zero"),
        "spread_pct": {k: round(100 * (max(v) - min(v)) / statistics.median(v), 1) for k, v in runs.items()},
    }


def heap_per_page(root: Path, name: str, layout: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Python heap held by the engine per stored page, for (objects, pages per object) groups.

    Same-filled pages with distinct words keep the arena at 64 bytes a page. Object ids and sparse
    indexes are created inside the traced window, as pages arriving off the wire would be.
    """
    total = sum(objects * per for objects, per in layout)
    capacity = total * 64 * 5 // 4 + 64 * MIB
    arena = Arena(root / f"arena-{name}", capacity)
    engine = PoolEngine(arena, limit_bytes=capacity)
    try:
        c = engine.client("mem", ClientSettings(compress=True))
        pool = engine.new_pool(c, 0)
        put = engine.put
        pack = struct.Struct("<Q").pack
        rnd = random.Random(7)
        gc.collect()
        tracemalloc.start()
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        word = 1
        t0 = time.perf_counter()
        for objects, per in layout:
            for o in range(objects):
                oid = (o * 0x9E3779B97F4A7C15 + per).to_bytes(24, "little")
                indexes = range(per) if per > 16 else rnd.sample(range(1 << 31), per)
                for index in indexes:
                    if not put(c, pool, oid, index, pack(word) * (PAGE_SIZE // 8)):
                        raise SystemExit("bench: put refused while filling the index")
                    word += 1
        elapsed = time.perf_counter() - t0
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        pages = engine.stats()["pool"]["pages"]
        if pages != total:
            raise SystemExit(f"bench: {pages} pages stored, expected {total}")
    finally:
        engine.close()
        arena.close()
    return {
        "pages": total,
        "bytes_per_page": round((current - base) / total, 1),
        "peak_bytes_per_page": round((peak - base) / total, 1),
        "fill_seconds_traced": round(elapsed, 1),
    }


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="tmem-bench-", dir="/dev/shm"))
    try:
        t0 = time.perf_counter()
        speed = bench_speed(root)
        dense = heap_per_page(root, "dense", [(4096, 256)])
        sparse = heap_per_page(root, "sparse", [(250_000, 4)])
        result: dict[str, Any] = {
            "bench": "pool",
            "python": sys.version.split()[0],
            **speed,
            "index_bytes_per_page": dense["bytes_per_page"],
            "index_peak_bytes_per_page": dense["peak_bytes_per_page"],
            "index_layout": "4096 objects x 256 pages, private ephemeral, same-filled pages",
            "index_bytes_per_page_sparse": sparse["bytes_per_page"],
            "index_sparse_layout": "250000 objects x 4 random indexes, private ephemeral",
            "index_fill_seconds_traced": dense["fill_seconds_traced"],
        }
        result["targets_met"] = {
            "ephemeral_raw_ratio_le_4": result["ephemeral_raw_ratio"] <= 4,
            "persistent_raw_ratio_le_4": result["persistent_raw_ratio"] <= 4,
            "lz4_ratio_le_1.5": result["lz4_ratio"] <= 1.5,
            "lz4_vs_zero_ratio_ge_5": result["lz4_vs_zero_ratio"] >= 5,
            "index_bytes_per_page_le_128": result["index_bytes_per_page"] <= 128,
        }
        result["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
