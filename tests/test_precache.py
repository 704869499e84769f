"""precache: tmem behind the kernel's page cache, mounted for real (/dev/fuse) against a real host agent.

The mount runs as `python -m guestagent.precache` in a subprocess; its counters are read from the
mount root's `user.tmem.precache.stats` extended attribute, and the test hook `evict` (the kernel
drops its cached pages of the mount's files: memory pressure on demand) is written the same way.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from scripts.wait import wait_until
from tests.support.host_agent import HostAgentProcess
from tests.support.precache_mount import PAGE, PrecacheMount, pool_pages, read


def test_page_ins_go_to_the_pool_and_a_hit_is_put_back(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount]
) -> None:
    """Inclusive second level: a page read from the disk is put; a hot re-read never reaches the
    shim; after the kernel dropped the pages they come from the pool, which keeps them (put back)."""
    rng = random.Random(1)
    a = rng.randbytes(8 * PAGE + 100)
    m = precache(lambda d: (d / "a").write_bytes(a))
    assert read(m.mountpoint / "a") == a  # from the disk, and put
    s0 = m.stats()
    assert s0["bytes_from_disk"] == len(a) and s0["puts"] == 9 and s0["hits"] == 0, s0
    wait_until(lambda: pool_pages(host_agent) == 9, what="the puts to land")  # fire-and-forget
    assert read(m.mountpoint / "a") == a  # the kernel's page cache: the shim is not asked
    assert m.stats()["reads"] == s0["reads"]

    m.evict()  # the kernel drops its pages: the next read is a page-in, served by the pool
    assert read(m.mountpoint / "a") == a
    s1 = m.stats()
    assert s1["hits"] == 9 and s1["bytes_from_disk"] == s0["bytes_from_disk"], s1
    assert s1["bytes_from_tmem"] == len(a) and s1["put_backs"] == 9, s1
    wait_until(lambda: pool_pages(host_agent) == 9, what="the put-backs")  # exclusive get, put back
    m.evict()
    assert read(m.mountpoint / "a") == a
    assert m.stats()["hits"] == 18

    host_agent.request("reserve", mib=1 << 30)  # the host drops every ephemeral page
    assert pool_pages(host_agent) == 0
    m.evict()
    assert read(m.mountpoint / "a") == a
    s2 = m.stats()
    assert s2["hits"] == 18 and s2["bytes_from_disk"] == 2 * len(a), s2


def test_written_pages_are_kept_clean_in_the_pool(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount]
) -> None:
    """A build re-reads what it just wrote: pages a write fully determines are put after the
    backing write; a page it changed in part is flushed, never served old."""
    rng = random.Random(2)
    m = precache()
    data = rng.randbytes(10 * PAGE + 300)
    (m.mountpoint / "o").write_bytes(data)
    s0 = m.stats()
    assert s0["written_puts"] == 11 and s0["bytes_from_disk"] == 0, s0
    m.evict()
    assert read(m.mountpoint / "o") == data
    s1 = m.stats()
    assert s1["hits"] == 11 and s1["bytes_from_disk"] == 0, s1
    patch = rng.randbytes(100)
    with open(m.mountpoint / "o", "r+b") as f:  # inside page 2: flushed, not put
        f.seek(2 * PAGE + 50)
        f.write(patch)
    want = data[: 2 * PAGE + 50] + patch + data[2 * PAGE + 150 :]
    m.evict()
    assert read(m.mountpoint / "o") == want
    s2 = m.stats()
    assert s2["hits"] - s1["hits"] == 10 and s2["bytes_from_disk"] == PAGE, s2


def test_written_pages_split_a_write_into_known_and_partial_pages() -> None:
    from guestagent.precache import written_pages

    buf = bytes(range(256)) * 48  # 3 pages
    known, partial = written_pages(0, buf, len(buf))
    assert sorted(known) == [0, 1, 2] and not partial and known[1] == buf[PAGE : 2 * PAGE]
    known, partial = written_pages(100, buf, 100 + len(buf))  # unaligned, ending at EOF
    assert sorted(known) == [1, 2, 3] and partial == {0}
    assert known[3] == buf[4 * PAGE - 100 - PAGE :].ljust(PAGE, b"\0")
    known, partial = written_pages(100, buf, 10 * PAGE)  # unaligned, the file goes on
    assert sorted(known) == [1, 2] and partial == {0, 3}
    assert written_pages(0, b"", 5) == ({}, set())


def test_model_random_operations_match_a_reference_directory(  # noqa: C901 (one branch per operation)
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount]
) -> None:
    """Random writes, truncates (also O_TRUNC), renames over, unlinks, changes behind the mount,
    mmap reads and writes (MAP_SHARED) and reads, with the kernel dropping its cached pages now and
    then (reads then come from the pool), against a plain directory."""
    import mmap

    m = precache()
    ref = Path(tempfile.mkdtemp(prefix="tmem-ref", dir="/tmp"))
    rng = random.Random(20261126)
    names = [f"f{i}" for i in range(6)]
    ops = 500
    checked = 0
    history: list[str] = []
    try:
        for step in range(ops):
            name = rng.choice(names)
            mp, rp, bp = m.mountpoint / name, ref / name, m.backing / name
            exists = rp.exists()
            op = rng.choices(
                [
                    "write",
                    "append",
                    "truncate",
                    "otrunc",
                    "rename",
                    "unlink",
                    "read",
                    "read_range",
                    "evict",
                    "behind",
                    "mmap_read",
                    "mmap_write",
                ],
                [14, 4, 6, 4, 5, 3, 30, 20, 8, 3, 8, 8],
            )[0]
            history.append(f"{step} {op} {name}")
            if step == ops // 2:  # the host drops every ephemeral page mid-run
                before = pool_pages(host_agent)
                host_agent.request("reserve", mib=1 << 30)
                after = pool_pages(host_agent)  # (a put still on its way may land after the drop)
                assert before > 2 and after < before // 2, (before, after)
            if op in ("write", "append", "otrunc") or not exists:
                if op == "append":
                    data, off = rng.randbytes(rng.randint(1, 2 * PAGE)), None
                else:
                    data, off = rng.randbytes(rng.randint(1, 3 * PAGE)), rng.randint(0, 12 * PAGE)
                mode = "wb" if op == "otrunc" or not exists else ("ab" if off is None else "r+b")
                for p in (mp, rp):
                    with open(p, mode) as f:
                        if off is not None and mode == "r+b":
                            f.seek(off)
                        f.write(data)
            elif op == "truncate":
                size = rng.randint(0, 14 * PAGE)
                os.truncate(mp, size)
                os.truncate(rp, size)
            elif op == "rename":
                other = rng.choice(names)
                history[-1] += f" -> {other}"
                os.rename(mp, m.mountpoint / other)
                os.rename(rp, ref / other)
            elif op == "unlink":
                os.unlink(mp)
                os.unlink(rp)
            elif op == "evict":
                m.evict()
            elif op == "behind":  # same size, new bytes, written to the backing file directly
                size = rp.stat().st_size
                data = rng.randbytes(size)
                bp.write_bytes(data)
                rp.write_bytes(data)
            elif op == "read":
                assert read(mp) == read(rp), f"step {step}: {name} differs; {history[-40:]}"
                checked += 1
            elif op == "mmap_read":
                if rp.stat().st_size:
                    with open(mp, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                        assert mm[:] == read(rp), f"step {step}: mmap of {name} differs; {history[-40:]}"
                    checked += 1
            elif op == "mmap_write":
                size = rp.stat().st_size
                if size:
                    off = rng.randrange(size)
                    data = rng.randbytes(min(size - off, rng.randint(1, 2 * PAGE)))
                    with open(mp, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:  # MAP_SHARED
                        mm[off : off + len(data)] = data
                        mm.flush()
                    with open(rp, "r+b") as f:
                        f.seek(off)
                        f.write(data)
            else:
                off, n = rng.randint(0, 14 * PAGE), rng.randint(1, 5 * PAGE)
                with open(mp, "rb") as f, open(rp, "rb") as g:
                    f.seek(off)
                    g.seek(off)
                    assert f.read(n) == g.read(n), f"step {step}: {name}[{off}:+{n}] differs"
                checked += 1
        for name in names:  # every file, at the end
            if (ref / name).exists():
                assert read(m.mountpoint / name) == read(ref / name)
            else:
                assert not (m.mountpoint / name).exists()
        assert sorted(os.listdir(m.mountpoint)) == sorted(os.listdir(ref))
    finally:
        shutil.rmtree(ref, ignore_errors=True)
    s = m.stats()
    assert checked > 200
    assert s["hits"] > 20 and s["puts"] > 50 and s["flushes"] > 20 and s["misses"] > 0, s
    assert s["written_puts"] > 50 and s["gets"] == s["hits"] + s["misses"], s


def test_reads_stay_right_when_the_host_drops_everything_or_goes(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount]
) -> None:
    """A file set re-read after the kernel dropped it: hits from tmem; the host dropping every
    ephemeral page, then stopping, changes no byte and hangs no read."""
    rng = random.Random(7)
    files = {
        f"d{i}/f{j}": rng.randbytes(rng.randint(1, 8) * PAGE - rng.randint(0, 100))
        for i in range(3)
        for j in range(4)
    }
    digests = {k: hashlib.sha256(v).digest() for k, v in files.items()}
    total_pages = sum((len(v) + PAGE - 1) // PAGE for v in files.values())

    def populate(d: Path) -> None:
        for k, v in files.items():
            (d / k).parent.mkdir(exist_ok=True)
            (d / k).write_bytes(v)

    m = precache(populate)

    def read_all() -> None:
        m.evict()
        for k in files:
            assert hashlib.sha256(read(m.mountpoint / k)).digest() == digests[k], k

    read_all()
    s1 = m.stats()
    assert s1["bytes_from_disk"] == sum(map(len, files.values())) and s1["hits"] == 0
    read_all()
    s2 = m.stats()
    assert s2["hits"] - s1["hits"] == total_pages, s2  # all of it comes back from the pool
    host_agent.request("reserve", mib=1 << 30)
    assert pool_pages(host_agent) == 0
    read_all()
    s3 = m.stats()
    assert s3["bytes_from_disk"] > s2["bytes_from_disk"]
    read_all()
    assert m.stats()["hits"] > s3["hits"]

    host_agent.stop()
    began = time.monotonic()
    read_all()
    read_all()
    assert time.monotonic() - began < 10
    s4 = m.stats()
    assert not s4["connected"]


def test_counters_reach_the_host_in_stats_reports(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount]
) -> None:
    data = random.Random(8).randbytes(40 * PAGE)
    m = precache(lambda d: (d / "f").write_bytes(data))
    for _ in range(2):
        assert read(m.mountpoint / "f") == data
        m.evict()

    def reported() -> dict[str, int]:
        report = host_agent.stats()["guests"]["g1"]["report"]
        return report["values"] if report else {}

    wait_until(lambda: reported().get("precache_hits", 0) > 0, timeout=10, what="a STATS report")
    values, local = reported(), m.stats()
    assert values["precache_hits"] <= local["hits"] and values["precache_gets"] <= local["gets"]
    assert values["precache_bytes_from_tmem"] >= PAGE


def test_change_behind_the_mount_is_seen_at_open_and_at_a_page_in(
    precache: Callable[..., PrecacheMount],
) -> None:
    rng = random.Random(3)
    old, new = rng.randbytes(3 * PAGE), rng.randbytes(3 * PAGE)
    m = precache(lambda d: (d / "f").write_bytes(old))
    assert read(m.mountpoint / "f") == old  # in the kernel's cache and the pool
    st = (m.backing / "f").stat()
    (m.backing / "f").write_bytes(new)
    os.utime(m.backing / "f", ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: ctime tells
    assert read(m.mountpoint / "f") == new  # at open: keep_cache off, the pool flushed
    s0 = m.stats()
    assert s0["changed_behind"] == 1 and s0["hits"] == 0, s0
    # while the file is open: the kernel dropped its pages, the file changed behind the mount; the
    # page-in sees the change (fstat) and flushes the pool rather than serve the old pages
    with open(m.mountpoint / "f", "rb") as f:
        assert f.read() == new
        m.evict()
        (m.backing / "f").write_bytes(old)
        f.seek(0)
        assert f.read() == old
    s1 = m.stats()
    assert s1["changed_behind"] == 2 and s1["hits"] == 0, s1
    (m.backing / "f").write_bytes(new + new)  # a new size, behind: the kernel is told at open
    assert read(m.mountpoint / "f") == new + new


def test_tar_extract_and_read_back(precache: Callable[..., PrecacheMount]) -> None:
    """Real work: extract a tree (sources and binary blobs) into the mount, read it all back twice."""
    src = Path(__file__).resolve().parent.parent / "guestagent"
    rng = random.Random(5)
    work = Path(tempfile.mkdtemp(prefix="tmem-tar", dir="/tmp"))
    try:
        tree = work / "tree"
        shutil.copytree(src, tree / "guestagent", ignore=shutil.ignore_patterns("__pycache__"))
        for i in range(8):
            (tree / f"blob{i}.bin").write_bytes(rng.randbytes(rng.randint(1, 40) * 1000))
        with tarfile.open(work / "t.tar", "w") as t:
            t.add(tree, arcname="tree")
        m = precache()
        subprocess.run(["tar", "-xf", str(work / "t.tar"), "-C", str(m.mountpoint)], check=True)
        for _ in range(2):
            m.evict()
            for path in tree.rglob("*"):
                there = m.mountpoint / "tree" / path.relative_to(tree)
                if path.is_file():
                    assert read(there) == path.read_bytes(), path
                    assert there.stat().st_mtime_ns // 10**9 == path.stat().st_mtime_ns // 10**9
                else:
                    assert there.is_dir()
        s = m.stats()
        assert s["hits"] > 0 and s["puts"] > 0, s
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_concurrent_readers_never_see_a_page_older_than_the_last_finished_write(
    precache: Callable[..., PrecacheMount],
) -> None:
    """A writer rewrites whole files with a new version stamp in every page while readers re-read
    them while the kernel keeps dropping its cached pages (pages go through tmem): a read begun
    after a write returned must see that write or a later one, never an older page."""
    import threading

    pages, nfiles = 6, 4
    m = precache()
    paths = [m.mountpoint / f"v{i}" for i in range(nfiles)]
    done = [0] * nfiles  # the last version whose write returned, per file

    def content(version: int, i: int) -> bytes:
        return b"".join(
            (version.to_bytes(8, "little") + bytes([i, p])) * (PAGE // 10) + bytes(PAGE % 10)
            for p in range(pages)
        )

    for i, p in enumerate(paths):
        p.write_bytes(content(0, i))
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        version = 0
        rng = random.Random(11)
        while not stop.is_set():
            version += 1
            i = rng.randrange(nfiles)
            with open(paths[i], "r+b") as f:
                f.write(content(version, i))
            done[i] = version

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            i = rng.randrange(nfiles)
            floor = done[i]
            data = read(paths[i])
            for p in range(pages):
                v = int.from_bytes(data[p * PAGE : p * PAGE + 8], "little")
                if v < floor or data[p * PAGE + 8 : p * PAGE + 10] != bytes([i, p]):
                    errors.append(f"file {i} page {p}: version {v} after {floor} was written")

    def evictor() -> None:
        while not stop.is_set():
            m.evict()
            time.sleep(0.01)

    threads = [threading.Thread(target=writer), threading.Thread(target=evictor)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(4)
    ]
    for t in threads:
        t.start()
    time.sleep(4)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors, errors[:5]
    for i, p in enumerate(paths):
        assert read(p) == content(done[i], i)
    s = m.stats()
    assert s["hits"] > 0 and s["puts"] > 0 and s["flushes"] > 0, s


def test_make_git_and_mmap_in_the_mount(precache: Callable[..., PrecacheMount]) -> None:
    """Real work: build a C program with make (gcc, ld, exec of the result), git commit and checkout,
    and mmap reads (MAP_PRIVATE and MAP_SHARED)."""
    import mmap

    m = precache()
    proj = m.mountpoint / "proj"
    proj.mkdir()
    for i in range(1, 4):
        (proj / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i * 10}; }}\n")
    (proj / "main.c").write_text(
        "#include <stdio.h>\nint f1(void); int f2(void); int f3(void);\n"
        'int main(void) { printf("%d\\n", f1() + f2() + f3()); return 0; }\n'
    )
    (proj / "Makefile").write_text("prog: main.o f1.o f2.o f3.o\n\t$(CC) -o $@ $^\n")
    subprocess.run(["make", "-s", "-C", str(proj)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(proj / "prog")], check=True, capture_output=True, text=True, timeout=10)
    assert out.stdout == "60\n"
    (proj / "f2.c").write_text("int f2(void) { return 7; }\n")  # rebuild after a change in the mount
    os.utime(proj / "f2.c", (time.time() + 5, time.time() + 5))
    subprocess.run(["make", "-s", "-C", str(proj)], check=True, capture_output=True, timeout=60)
    assert subprocess.run([str(proj / "prog")], capture_output=True, text=True).stdout == "47\n"

    git = [
        "git",
        "-c",
        "user.email=t@t",
        "-c",
        "user.name=t",
        "-c",
        "init.defaultBranch=main",
        "-C",
        str(proj),
    ]
    subprocess.run([*git, "init", "-q"], check=True, timeout=30)
    subprocess.run([*git, "add", "."], check=True, timeout=30)
    subprocess.run([*git, "commit", "-qm", "one"], check=True, timeout=30)
    (proj / "f1.c").write_text("int f1(void) { return 1; }\n")
    subprocess.run([*git, "commit", "-qam", "two"], check=True, timeout=30)
    subprocess.run([*git, "checkout", "-q", "HEAD~1"], check=True, timeout=30)
    assert (proj / "f1.c").read_text() == "int f1(void) { return 10; }\n"
    subprocess.run([*git, "checkout", "-q", "main"], check=True, timeout=30)
    assert (proj / "f1.c").read_text() == "int f1(void) { return 1; }\n"
    assert (
        subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        == ""
    )

    data = random.Random(9).randbytes(10 * PAGE + 123)
    (m.backing / "blob").write_bytes(data)
    dd = subprocess.run(
        ["dd", f"if={m.mountpoint / 'blob'}", "iflag=direct", "bs=4096", "status=none"],
        capture_output=True,
        check=True,
        timeout=30,
    )  # an O_DIRECT reader
    assert dd.stdout == data
    with (
        open(m.mountpoint / "blob", "rb") as f,
        mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as mm,
    ):
        assert mm[:] == data
    m.evict()
    with (
        open(m.mountpoint / "blob", "rb") as f,
        mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mm,
    ):
        assert mm[:] == data


def test_mount_without_a_host_agent_reads_the_backing_file_then_uses_tmem_once_it_comes(
    host_agent_stopped: HostAgentProcess, tmp_path: Path
) -> None:
    data = random.Random(6).randbytes(20 * PAGE)
    (tmp_path / "b").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "b" / "f").write_bytes(data)
    m = PrecacheMount(
        tmp_path / "b", tmp_path / "m", host_agent_stopped.sockets["g1"], tmp_path / "precache.log"
    )
    try:
        m.start(connected=False)
        for _ in range(2):
            m.evict()
            assert read(m.mountpoint / "f") == data
        s = m.stats()
        assert not s["connected"] and s["gets"] == 0 and s["bytes_from_tmem"] == 0
        assert s["bytes_from_disk"] == 2 * len(data)
        host_agent_stopped.start()
        wait_until(lambda: m.stats()["connected"], timeout=10, what="the mount to connect")
        for _ in range(2):
            m.evict()
            assert read(m.mountpoint / "f") == data
        assert m.stats()["hits"] > 0
    finally:
        m.stop()
    assert "Traceback" not in m.log(), m.log()


def test_rename_noreplace_and_exchange(precache: Callable[..., PrecacheMount]) -> None:
    """renameat2 flags as coreutils and others use them; an exchange swaps files whose pages are
    cached (the pages belong to the files, so they move with them)."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)

    def renameat2(a: Path, b: Path, flags: int) -> int:
        rc: int = libc.renameat2(-100, bytes(a), -100, bytes(b), ctypes.c_uint(flags))
        return 0 if rc == 0 else ctypes.get_errno()

    rng = random.Random(12)
    x, y = rng.randbytes(3 * PAGE + 5), rng.randbytes(2 * PAGE)
    m = precache(lambda d: ((d / "x").write_bytes(x), (d / "y").write_bytes(y)))
    mx, my = m.mountpoint / "x", m.mountpoint / "y"
    assert read(mx) == x and read(my) == y
    assert renameat2(mx, my, 1) == errno.EEXIST  # RENAME_NOREPLACE onto an existing name
    assert renameat2(mx, m.mountpoint / "z", 1) == 0
    assert read(m.mountpoint / "z") == x and not mx.exists()
    assert renameat2(m.mountpoint / "z", my, 2) == 0  # RENAME_EXCHANGE
    assert read(my) == x and read(m.mountpoint / "z") == y
    assert (m.backing / "y").read_bytes() == x


def test_stay_off_keeps_tracebacks_from_reading_source_under_the_mount(tmp_path: Path) -> None:
    """A shim over its own code must not read source lines through its mount for a traceback."""
    import linecache

    from guestagent.precache import stay_off

    (tmp_path / "covered").mkdir()
    inside, outside = tmp_path / "covered" / "m.py", tmp_path / "o.py"
    inside.write_text("x = 1\n")
    outside.write_text("y = 2\n")
    kept = linecache.updatecache
    try:
        stay_off(str(tmp_path / "covered"))
        assert linecache.getline(str(inside), 1) == ""
        assert linecache.getline(str(outside), 1) == "y = 2\n"
    finally:
        linecache.updatecache = kept
        linecache.clearcache()
