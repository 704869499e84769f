"""precache under real tools: fio with verification, a C build and git, on a real mount.

Each test mounts a fresh backing directory against a real host agent (tests/support) and runs a
tool that checks its own data: fio with `verify=crc32c` over files larger than the guest's
memory share, a C project built inside and outside the mount (objects compared byte for byte),
git clone, checkout and fsck.  Pressure comes from the `evict` hook (the kernel drops its cached
pages of the mount's files, so page-ins reach the shim and the pool) and from the host dropping
every ephemeral page (`reserve`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.host_agent import HostAgentProcess
from tests.support.precache_mount import PrecacheMount


def _mounted(path: Path) -> bool:
    """Whether a mount sits on `path` (from /proc/self/mounts: works for a dead mount too)."""
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # a missing tool fails loudly: scripts/setup installs it
        raise AssertionError(f"{name} is not installed (scripts/setup installs it)")
    return path


class Pressure:
    """A thread that keeps the kernel dropping the mount's cached pages and, every few rounds,
    the host dropping every ephemeral page (the pool's contents may vanish at any moment)."""

    def __init__(self, m: PrecacheMount, agent: HostAgentProcess, interval: float = 0.05) -> None:
        self.m, self.agent, self.interval = m, agent, interval
        self.stop = threading.Event()
        self.drops = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        n = 0
        try:
            while not self.stop.wait(self.interval):
                self.m.evict()
                n += 1
                if n % 20 == 0:
                    self.agent.request("reserve", mib=1 << 30)
                    self.drops += 1
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Pressure:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise AssertionError(f"the pressure thread failed: {self.error!r}")


def test_fio_verify_crc32c_while_the_host_drops_every_page(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount]
) -> None:
    """fio writes 4 files of 48 MiB (three times the host agent's 64 MiB pool together) with
    crc32c checksums in every block, then reads them back and verifies, twice, while the kernel
    drops their pages and the host every ephemeral page: not one block may fail its checksum."""
    m = precache()
    job = [
        "--name=pc",
        f"--directory={m.mountpoint}",
        "--nrfiles=4",
        "--size=192M",
        "--bs=16k",
        "--verify=crc32c",
        "--verify_fatal=1",
        "--ioengine=psync",
        "--randrepeat=1",
        "--do_verify=1",
        "--group_reporting",
        "--output-format=terse",
        "--verify_state_save=0",  # no state file left in the working directory
    ]
    fio = _tool("fio")
    subprocess.run(
        [fio, *job, "--rw=randwrite", "--verify_backlog=256"], check=True, capture_output=True, timeout=600
    )  # write, verifying as it goes
    with Pressure(m, host_agent):
        for _ in range(2):
            res = subprocess.run(
                [fio, *job, "--rw=read", "--verify_only"], capture_output=True, text=True, timeout=600
            )
            assert res.returncode == 0, f"fio verify failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    s = m.stats()
    assert s["hits"] > 1000 and s["bytes_from_disk"] > 0, s


PROGRAM = {
    "Makefile": "CFLAGS = -O2 -g -ffile-prefix-map=$(CURDIR)=.\n"
    "objs = main.o util.o table.o\n"
    "prog: $(objs)\n\t$(CC) -o $@ $(objs)\n"
    "$(objs): util.h\n"
    "table.c: gen.sh\n\tsh gen.sh > $@\n",
    "util.h": "#include <stddef.h>\nunsigned long checksum(const unsigned char *p, size_t n);\n"
    "extern const unsigned table[256];\n",
    "util.c": '#include "util.h"\nunsigned long checksum(const unsigned char *p, size_t n)\n'
    "{ unsigned long h = 5381; while (n--) h = h * 33 + table[*p++]; return h; }\n",
    "main.c": '#include <stdio.h>\n#include <string.h>\n#include "util.h"\n'
    'int main(int argc, char **argv) { const char *s = argc > 1 ? argv[1] : "tmem";\n'
    '  printf("%lu\\n", checksum((const unsigned char *)s, strlen(s))); return 0; }\n',
    "gen.sh": "echo 'const unsigned table[256] = {'\n"
    'i=0; while [ $i -lt 256 ]; do echo "$(( (i * 2654435761) % 4294967291 ))u,"; '
    "i=$((i+1)); done\necho '};'\n",
}


def _build(root: Path) -> dict[str, str]:
    """Write the project under root, build it twice (clean in between), return its objects' sums."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in PROGRAM.items():
        (root / name).write_text(text)
    for _ in range(2):
        subprocess.run(["make", "-s", "-B", "-C", str(root)], check=True, capture_output=True, timeout=120)
    built = [p for p in sorted(root.iterdir()) if p.suffix == ".o" or p.name == "prog"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in built}


def test_a_c_build_inside_the_mount_gives_the_objects_it_gives_outside(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount], tmp_path: Path
) -> None:
    """The same project built in the mount (under pressure: the kernel drops pages, the host its
    pool) and in a plain directory: every object and the program are byte-identical, and the
    program built in the mount runs."""
    m = precache()
    outside = _build(tmp_path / "proj")
    with Pressure(m, host_agent):
        inside = _build(m.mountpoint / "proj")
        m.evict()  # the objects as the pool has them: a build re-reads what it wrote
        again = {
            name: hashlib.sha256((m.mountpoint / "proj" / name).read_bytes()).hexdigest() for name in inside
        }
    assert set(inside) >= {"main.o", "util.o", "table.o", "prog"}, inside
    assert inside == outside and again == outside
    out = subprocess.run(
        [str(m.mountpoint / "proj" / "prog"), "precache"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )  # exec from the mount
    assert (
        out.stdout
        == subprocess.run(
            [str(tmp_path / "proj" / "prog"), "precache"], capture_output=True, text=True, check=True
        ).stdout
    )
    assert m.stats()["written_puts"] > 0


def test_git_clone_checkout_and_fsck_in_the_mount(
    host_agent: HostAgentProcess, precache: Callable[..., PrecacheMount], tmp_path: Path
) -> None:
    """git clone (of this repository's history, into the mount), checkouts back and forth, and
    `git fsck --full` (every object's hash checked) while the kernel and the host drop pages."""
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        raise AssertionError(f"{src} is not a git work tree")
    m = precache()
    git = ["git", "-c", "safe.directory=*", "-c", "core.fsyncMethod=batch"]
    dest = m.mountpoint / "clone"
    with Pressure(m, host_agent):
        subprocess.run(
            [*git, "clone", "-q", "--no-local", str(src), str(dest)],
            check=True,
            capture_output=True,
            timeout=300,
        )
        revs = subprocess.run(
            [*git, "-C", str(dest), "rev-list", "--max-count=20", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        for rev in (revs[-1], revs[len(revs) // 2], revs[0]):
            subprocess.run(
                [*git, "-C", str(dest), "checkout", "-q", rev], check=True, capture_output=True, timeout=120
            )
            status = subprocess.run(
                [*git, "-C", str(dest), "status", "--porcelain"],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
            ).stdout
            assert status == "", status
        fsck = subprocess.run(
            [*git, "-C", str(dest), "fsck", "--full", "--strict"], capture_output=True, text=True, timeout=300
        )
    assert fsck.returncode == 0, fsck.stderr
    assert m.stats()["hits"] > 0


def test_the_mount_may_cover_its_own_backing_tree_and_code(
    host_agent: HostAgentProcess, tmp_path: Path
) -> None:
    """The shim mounted over the very tree its own modules are loaded from (as over /usr): it never
    reads through its own mount (it would deadlock), an operation that fails (a traceback, which
    would read source lines) still answers, and when it is killed the tree underneath is usable at
    once (auto_unmount)."""
    tree = tmp_path / "tree"
    shutil.copytree(
        Path(__file__).resolve().parent.parent / "guestagent",
        tree / "guestagent",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    (tree / "data").write_bytes(os.urandom(300_000))
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    log = (tmp_path / "shim.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guestagent.precache",
            str(tree),
            str(tree),
            "--channel",
            host_agent.sockets["g1"],
            "--log-level",
            "INFO",
        ],
        cwd="/",
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 15
        while not os.path.ismount(tree):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "shim.log").read_text()
            time.sleep(0.05)
        data = (tree / "data").read_bytes()
        (tree / "new").write_bytes(data[:5000])
        os.setxattr(tree, "user.tmem.precache.evict", b"1")
        assert (tree / "data").read_bytes() == data
        assert (tree / "guestagent" / "precache" / "__init__.py").read_bytes().startswith(b'"""precache')
        with pytest.raises(OSError):  # a failing operation: answered, the shim still serves
            os.getxattr(tree / "data", "user.nothing")
        assert (tree / "new").read_bytes() == data[:5000]
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _mounted(tree):  # (not os.path.ismount: a dead mount's stat fails, which it takes as no)
            assert time.monotonic() < deadline, "fusermount3 left the mount behind"
            time.sleep(0.05)
        assert (tree / "new").read_bytes() == data[:5000]  # the tree itself, usable at once
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if _mounted(tree):
            subprocess.run(["umount", "-l", str(tree)], check=False)
        log.close()
