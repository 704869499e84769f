"""precache with several users: a real mount, and a real non-root user (`nobody`, via setpriv).

Why: the shim runs as root. Without allow_other only root may use the mount; with allow_other
and no permission checks, the shim would do as root whatever any user asked (read a root 0600
file). allow_other therefore comes with default_permissions: the kernel checks every access
against the backing file's mode and owner. Both what a user may do and what it may not are tried,
as that user, in a process of its own (/usr/bin/python3: the test's interpreter may sit where
`nobody` cannot reach).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support.precache_mount import PrecacheMount

NOBODY = 65534
NOGROUP = 65534

# Run as nobody: each step prints "ok", or the errno name it failed with.
_SCRIPT = r"""
import errno, json, os, sys
root = sys.argv[1]
out = {}
def step(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
def read(p):
    with open(os.path.join(root, p), "rb") as f:
        assert f.read() == open(os.path.join(root, p), "rb").read()
def write(p, data=b"mine"):
    with open(os.path.join(root, p), "wb") as f:
        f.write(data)
step("read public", lambda: read("public"))
step("read secret", lambda: read("secret"))
step("write public", lambda: write("public"))
step("truncate public", lambda: os.truncate(os.path.join(root, "public"), 0))
step("chmod public", lambda: os.chmod(os.path.join(root, "public"), 0o666))
step("list private", lambda: os.listdir(os.path.join(root, "private")))
step("read private/file", lambda: read("private/file"))
step("create in root dir", lambda: write("new"))
step("create in shared", lambda: write("shared/mine"))
step("read back mine", lambda: read("shared/mine"))
step("mkdir in shared", lambda: os.mkdir(os.path.join(root, "shared/mydir")))
step("symlink in shared", lambda: os.symlink("mine", os.path.join(root, "shared/mylink")))
os.umask(0o002)  # a group-writable file and directory, as the user's umask asks
step("create with umask 002", lambda: write("shared/groupw"))
step("mkdir with umask 002", lambda: os.mkdir(os.path.join(root, "shared/groupd")))
step("unlink root's file in sticky shared", lambda: os.unlink(os.path.join(root, "shared/roots")))
step("evict hook", lambda: os.setxattr(root, "user.tmem.precache.evict", b"1"))
step("stats", lambda: os.getxattr(root, "user.tmem.precache.stats"))
print(json.dumps(out))
"""


def populate(d: Path) -> None:
    (d / "public").write_bytes(b"for everyone\n" * 500)
    (d / "secret").write_bytes(b"root only\n")
    (d / "secret").chmod(0o600)
    (d / "private").mkdir(mode=0o700)
    (d / "private" / "file").write_bytes(b"hidden\n")
    (d / "shared").mkdir()
    (d / "shared").chmod(0o1777)  # like /tmp
    (d / "shared" / "roots").write_bytes(b"root's, in a sticky directory\n")
    d.chmod(0o755)


def as_nobody(mountpoint: Path) -> dict[str, str]:
    res = subprocess.run(
        [
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOGROUP}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            _SCRIPT,
            str(mountpoint),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert res.returncode == 0, res.stderr
    result: dict[str, str] = json.loads(res.stdout)
    return result


def reachable(m: PrecacheMount) -> None:
    """The fixture's work directory is 0700 (mkdtemp): let other users reach the mount point."""
    m.mountpoint.parent.chmod(0o755)


def test_allow_other_lets_users_in_as_far_as_the_modes_say(
    precache: Callable[..., PrecacheMount],
) -> None:
    m = precache(populate, allow_other=True)
    reachable(m)
    got = as_nobody(m.mountpoint)
    assert got == {
        "read public": "ok",
        "read secret": "EACCES",
        "write public": "EACCES",
        "truncate public": "EACCES",
        "chmod public": "EPERM",
        "list private": "EACCES",
        "read private/file": "EACCES",
        "create in root dir": "EACCES",
        "create in shared": "ok",
        "read back mine": "ok",
        "mkdir in shared": "ok",
        "symlink in shared": "ok",
        "create with umask 002": "ok",
        "mkdir with umask 002": "ok",
        "unlink root's file in sticky shared": "EPERM",
        "evict hook": "EACCES",
        "stats": "ok",
    }, got
    # what nobody made is nobody's, on the backing file system too (the shim runs as root)
    for name in ("mine", "mydir", "mylink"):
        st = os.lstat(m.backing / "shared" / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOGROUP), (name, st)
    assert (m.backing / "shared" / "mine").read_bytes() == b"mine"
    # the modes the user's umask gave, not narrowed again by the shim's own umask
    assert stat.S_IMODE(os.lstat(m.backing / "shared" / "groupw").st_mode) == 0o664
    assert stat.S_IMODE(os.lstat(m.backing / "shared" / "groupd").st_mode) == 0o775
    assert (m.backing / "public").read_bytes() == b"for everyone\n" * 500  # untouched
    assert (m.backing / "shared" / "roots").exists()
    # root, through the mount, still creates root's files
    (m.mountpoint / "shared" / "by-root").write_bytes(b"x")
    st = os.lstat(m.backing / "shared" / "by-root")
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_without_allow_other_the_mount_is_root_only(
    precache: Callable[..., PrecacheMount],
) -> None:
    m = precache(populate)
    reachable(m)
    got = as_nobody(m.mountpoint)
    assert set(got.values()) == {"EACCES"}, got  # every step: the kernel lets nobody but root in
