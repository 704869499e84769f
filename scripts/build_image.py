"""Build the KVM lab's guest image: Debian bookworm, booted directly from its extracted kernel.

The image is a whole-disk ext4 file system (no partition table, so the domain boots the kernel and
initramfs extracted next to it: ``root=/dev/vda rw console=ttyS0``) holding systemd, udev, python3
with pyfuse3/trio/lz4/psutil, fuse3, qemu-guest-agent, a 256 MiB swap file, the project's
``guestagent`` package under /opt/tmem with its systemd unit, ``tmem-guestagent.service``, and its
default configuration (a precache mount, preswap on); and, for the demo's workload, gcc, make and
libc6-dev with a real C project (zlib, from its Debian source package) configured in the precache
mount's backing directory.

It is built without loop mounts: mmdebstrap populates a directory, ``mke2fs -d`` makes the file
system from it, ``qemu-img convert`` makes the qcow2 that every guest's overlay stands on. The
result is cached in a directory named by a hash of the recipe (this file, which holds the package
list and the unit) and of the guest-side code (the ``guestagent`` package), so it is rebuilt only
when one of them changes, or on ``--force``. The Debian root itself (mmdebstrap's output, ~95 s of
the ~100 s build) is also kept, as a tarball named by the package list and mmdebstrap's options, so
a change to the guest code alone rebuilds in seconds; ``--force`` rebuilds that too.

    build-image [--force]            # build if needed; prints the image directory on stdout
    build-image path                 # the image directory for the current recipe (exit 1: not built)
    build-image overlay DEST...      # per-guest qcow2 overlays on the current base image
    build-image prune                # delete cached images of other recipes

Progress goes to stderr, one line per step; a failed step is named, with the tail of its output.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

ROOT = Path(__file__).resolve().parent.parent
GUESTAGENT_DIR = ROOT / "guestagent"
# Not product, so not in the guestagent package: the checked preswap workload the lab tests, the
# demo and the benchmarks run in guests (`python3 -m scripts.preswap_workload`, PYTHONPATH=/opt/tmem).
GUEST_WORKLOADS = ("scripts/__init__.py", "scripts/preswap_workload.py")
DEFAULT_CACHE = Path(os.environ.get("TMEM_IMAGE_CACHE", "/var/cache/tmem/images"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
SUITE = "bookworm"

# What the guest needs. mmdebstrap's "apt" variant is Essential:yes plus apt; Recommends are not
# installed, so everything the guest relies on is named here.
PACKAGES = (
    "linux-image-amd64",
    "initramfs-tools",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "kmod",
    "procps",
    "python3",
    "python3-pyfuse3",
    "python3-trio",
    "python3-lz4",
    "python3-psutil",
    "fuse3",
    "qemu-guest-agent",
    # the demo's workload builds a real C project in the guest
    "gcc",
    "make",
    "libc6-dev",
)
# The C project the demo builds (scripts/demo): its Debian source package, fetched at bootstrap with
# `apt-get source --download-only` from deb.debian.org (no other network is needed), unpacked from
# the upstream tarball into the precache mount's backing directory and configured at build time.
DEMO_SOURCE_PACKAGE = "zlib"
DEMO_PROJECT_DIR = "/srv/precache/zlib"  # /srv/precache: a symlink to BUILD_AREA, under /usr
# -O0, not zlib's -O3: under TCG, with three guests on two cores, a build of the library and its test
# programs then takes a minute or two, not several.
DEMO_CFLAGS = "-O0"
SOURCE_DIR = "/usr/src/tmem-demo"  # the source package as downloaded (.dsc, upstream and debian tarballs)
# Recommends are off (mmdebstrap's default); docs, man pages and translations are not unpacked.
MMDEBSTRAP_OPTIONS = (
    "--mode=root",
    "--variant=apt",
    '--aptopt=Acquire::Retries "3"',
    "--dpkgopt=path-exclude=/usr/share/man/*",
    "--dpkgopt=path-exclude=/usr/share/doc/*",
    "--dpkgopt=path-include=/usr/share/doc/*/copyright",
    "--dpkgopt=path-exclude=/usr/share/locale/*",
    "--dpkgopt=path-exclude=/usr/share/info/*",
)
# Packages whose versions go into the manifest: all but the plumbing.
MANIFEST_PACKAGES = tuple(
    p
    for p in PACKAGES
    if p not in {"initramfs-tools", "systemd-sysv", "udev", "dbus", "kmod", "procps", "libc6-dev"}
)
# Drivers the guest cannot boot without: built in (=y) or in the initramfs.
BOOT_DRIVERS = ("virtio_pci", "virtio_blk", "ext4")

IMAGE_SIZE_MIB = 4096
SWAP_MIB = 256
BLOCK_SIZE = 4096
HOSTNAME = "tmem-guest"
GUEST_CMDLINE = "root=/dev/vda rw console=ttyS0"
INSTALL_DIR = "/opt/tmem"

# The guest agent's default configuration: a `scripts/lab up` guest serves a precache mount and preswap
# with no further steps. The guest's own page cache holds the mount's hot pages, tmem the ones it drops.
# The mount covers /usr itself (mountpoint = backing): the toolchain (compiler, headers, libraries)
# and the build area, which lives under /usr for that (one mount per daemon: pyfuse3 serves one per
# process). The daemon runs in a mount namespace of its own and a keeper process detaches the mount
# when it dies (guestagent.mountkeeper): the same paths then reach the files underneath. Every user
# must reach /usr: allow_other, the kernel checking the files' own modes. /srv/precache, the build
# area's old path, and /mnt/precache, older still, are symlinks to it.
GUEST_CONFIG_PATH = "/etc/tmem/guestagent.toml"
PRECACHE_BACKING = "/usr"
PRECACHE_MOUNTPOINT = PRECACHE_BACKING
BUILD_AREA = "/usr/local/src/precache"  # under the mount
BUILD_AREA_ALIASES = ("/srv/precache", "/mnt/precache")
GUEST_CONFIG = f"""\
# The lab image's default (scripts/build_image.py); keys: /opt/tmem/guestagent/guestagent.example.toml
[[precache]]
backing = "{PRECACHE_BACKING}"
mountpoint = "{PRECACHE_MOUNTPOINT}"
allow_other = true

[preswap]
enabled = true
"""
PRESWAP_DIR = "/var/lib/tmem"  # the [preswap] swap file's directory (it must exist)

FSTAB = """\
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/vda   /      ext4  rw,errors=remount-ro  0  0
/swapfile  none   swap  sw                    0  0
"""

WRAPPER = f"""\
#!/bin/sh
# The tmem guest agent, installed from the project's guestagent package by build-image.
export PYTHONPATH={INSTALL_DIR}${{PYTHONPATH:+:$PYTHONPATH}}
exec python3 -m guestagent "$@"
"""

UNIT_NAME = "tmem-guestagent.service"
UNIT = """\
[Unit]
Description=tmem guest agent (precache, preswap, reporter over virtio-serial port org.tmem.0)
Documentation=file:///opt/tmem/README
After=local-fs.target
# Keep retrying for ever: the host agent or the port may come and go.
StartLimitIntervalSec=0

[Service]
# idle: started once boot's other jobs are dispatched (5 s at most), so long-lived services (qemu-ga,
# journald, dbus) run from /usr as it is underneath, not through the precache mount: a program exec'd
# through the mount cannot page its code in again once the daemon that served it is gone
Type=idle
ExecStart=/usr/local/bin/guestagent run
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

# The host's swap device (docs/preswap-device.md), when the domain has one (scripts.domain's
# SWAP_SERIAL): made a swap area and the highest-priority swap as soon as the disk appears, before
# the swap file (priority -2). Discarded slots are TRIMmed, which frees their pool pages.
SWAPDEV = "/dev/disk/by-id/virtio-tmem-swap"
SWAPDEV_DEVICE_UNIT = r"dev-disk-by\x2did-virtio\x2dtmem\x2dswap.device"
SWAPDEV_UNIT_NAME = "tmem-swapdev.service"
SWAPDEV_UNIT = f"""\
[Unit]
Description=tmem swap device (the host's pool, over NBD): the highest-priority swap
BindsTo={SWAPDEV_DEVICE_UNIT}
After={SWAPDEV_DEVICE_UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/mkswap -L tmemswap {SWAPDEV}
ExecStart=/sbin/swapon --discard=pages --priority=100 {SWAPDEV}
ExecStop=/sbin/swapoff {SWAPDEV}

[Install]
WantedBy={SWAPDEV_DEVICE_UNIT}
"""

# Timers that would put background load on guests while they are measured.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "systemd-firstboot.service",
)

HOST_TOOLS = ("mmdebstrap", "mke2fs", "debugfs", "e2fsck", "qemu-img", "mkswap", "chroot", "tar")


def say(message: str) -> None:
    print(f"[build-image] {message}", file=sys.stderr, flush=True)


# --- the recipe and the cache -------------------------------------------------------------------


def guest_code() -> dict[str, bytes]:
    """The guestagent package as it is now (every file but byte code), and the lab's workloads
    that run in the guest (`GUEST_WORKLOADS`), by path below the repo.

    Read once per build: the same bytes are hashed and installed, even if the package is being
    edited while the image builds.
    """
    files = sorted(
        p
        for p in GUESTAGENT_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )
    files += [ROOT / name for name in GUEST_WORKLOADS]
    return {str(p.relative_to(ROOT)): p.read_bytes() for p in files}


def bootstrap_recipe() -> list[str]:
    """What the Debian root is made from: the suite, the packages, the mmdebstrap options and the
    demo's source package."""
    return [SUITE, *PACKAGES, *MMDEBSTRAP_OPTIONS, f"source:{DEMO_SOURCE_PACKAGE}"]


def system_hash(mirror: str = DEFAULT_MIRROR, security_mirror: str = DEFAULT_SECURITY_MIRROR) -> str:
    """Names the cached Debian root (mmdebstrap's output), shared by every guest-code version."""
    recipe = [*bootstrap_recipe(), *sources(mirror, security_mirror)]
    return hashlib.sha256("\n".join(recipe).encode()).hexdigest()[:16]


def recipe_hash(size_mib: int = IMAGE_SIZE_MIB, code: dict[str, bytes] | None = None) -> str:
    """Names the image: this file (package list, unit, steps), the root's size and the guest code."""
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(f"size_mib={size_mib}\n".encode())
    for name, data in sorted((guest_code() if code is None else code).items()):
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]


def sources(mirror: str, security_mirror: str) -> list[str]:
    return [
        f"deb {mirror} {SUITE} main",
        f"deb {mirror} {SUITE}-updates main",
        f"deb {security_mirror} {SUITE}-security main",
        f"deb-src {mirror} {SUITE} main",  # for the demo's source package only
    ]


class _File:
    """An image's file: `image.base` is the path of base.qcow2 in that image's directory."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, image: Image, owner: type[Image] | None = None) -> Path:
        return image.directory / self.name


@dataclass(frozen=True)
class Image:
    """A built (or to-be-built) image directory."""

    directory: Path
    base = _File("base.qcow2")
    kernel = _File("vmlinuz")
    initrd = _File("initrd.img")
    manifest_path = _File("manifest.json")

    def is_built(self) -> bool:
        return all(p.is_file() for p in (self.base, self.kernel, self.initrd, self.manifest_path))

    def manifest(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return result


def image_for(cache: Path = DEFAULT_CACHE, size_mib: int = IMAGE_SIZE_MIB) -> Image:
    return Image(cache / recipe_hash(size_mib))


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One build at a time per cache (a second caller waits, then finds the image built)."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build in {cache}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (a failed chroot build may leave /proc, /dev... mounted)."""
    prefix = str(path.resolve())
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return found


def remove_tree(path: Path) -> None:
    """rmtree, but never into something mounted (that could be the host's /dev)."""
    if not path.exists():
        return
    if mounted := mounts_under(path):
        raise RuntimeError(f"refusing to delete {path}: still mounted: {', '.join(mounted)}")
    shutil.rmtree(path)


def create_overlay(base: Path, dest: Path, *, size_mib: int | None = None, force: bool = False) -> Path:
    """A per-guest qcow2 overlay on the shared base (the base itself is never written)."""
    base, dest = base.resolve(), dest.absolute()
    if not base.is_file():
        raise FileNotFoundError(f"no base image at {base}")
    if dest.exists():
        if not force:
            raise FileExistsError(f"{dest} exists (use force to replace it)")
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(dest)]
    if size_mib is not None:
        cmd.append(f"{size_mib}M")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"qemu-img create failed: {proc.stderr.strip()}")
    return dest


# --- steps --------------------------------------------------------------------------------------


class StepFailed(Exception):
    def __init__(self, step: str, reason: str, log: Path) -> None:
        super().__init__(f"step '{step}' failed: {reason}")
        self.step, self.reason, self.log = step, reason, log


@dataclass
class Build:
    """One build in a work directory; each step's output goes to its own log file there."""

    work: Path
    cache: Path
    code: dict[str, bytes]
    mirror: str
    security_mirror: str
    size_mib: int
    timings: dict[str, float] = field(default_factory=dict)
    _log: TextIO | None = None

    @property
    def rootfs(self) -> Path:
        return self.work / "rootfs"

    @property
    def out(self) -> Image:
        """The image as it is built; renamed into the cache when done."""
        return Image(self.work / "out")

    def run(self, cmd: Sequence[str]) -> str:
        """Run a command, its output appended to the current step's log; raise on failure."""
        assert self._log is not None
        self._log.write(f"$ {shlex.join(cmd)}\n")
        self._log.flush()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
        self._log.write(proc.stdout + proc.stderr)
        self._log.flush()
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited with status {proc.returncode}")
        return proc.stdout

    def run_streamed(self, cmd: Sequence[str]) -> None:
        """Like run, for long commands: output goes straight to the log file as it comes."""
        assert self._log is not None
        self._log.write(f"$ {shlex.join(cmd)}\n")
        self._log.flush()
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[0]} exited with status {proc.returncode}")

    def chroot(self, *args: str) -> str:
        return self.run(["chroot", str(self.rootfs), *args])

    def note(self, message: str) -> None:
        assert self._log is not None
        self._log.write(message + "\n")

    def step(self, number: int, total: int, name: str, fn: Callable[[], None]) -> None:
        log_path = self.work / "logs" / f"{number:02d}-{fn.__name__.strip('_')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        say(f"step {number}/{total}: {name} ...")
        start = time.monotonic()
        with open(log_path, "w") as self._log:
            try:
                fn()
            except Exception as exc:
                self._log.write(f"\nERROR: {exc}\n")
                raise StepFailed(name, str(exc), log_path) from exc
            finally:
                self._log = None
        self.timings[name] = elapsed = round(time.monotonic() - start, 1)
        say(f"step {number}/{total}: {name}: done in {elapsed:.1f} s")

    # the steps themselves

    @property
    def root_tarball(self) -> Path:
        return self.cache / "roots" / f"{system_hash(self.mirror, self.security_mirror)}.tar"

    def bootstrap(self) -> None:
        """mmdebstrap into a directory, then keep it as a tarball for builds with other guest code.

        Downloaded .debs are kept in a cache shared by all recipes (mmdebstrap's sync-in/sync-out).
        """
        debs = self.cache / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        cmd = [
            "mmdebstrap",
            *MMDEBSTRAP_OPTIONS,
            "--format=directory",
            "--include=" + ",".join(PACKAGES),
            "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
            f"--setup-hook=sync-in {shlex.quote(str(debs))} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {shlex.quote(str(debs))}",
            f'--customize-hook=mkdir -p "$1"{SOURCE_DIR} && chroot "$1" sh -c '
            f"'cd {SOURCE_DIR} && apt-get source --download-only {DEMO_SOURCE_PACKAGE}'",
            SUITE,
            str(self.rootfs),
            *sources(self.mirror, self.security_mirror),
        ]
        self.run_streamed(cmd)
        tarball = self.root_tarball
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        self.run(["tar", "--numeric-owner", "--xattrs", "-C", str(self.rootfs), "-cf", str(partial), "."])
        partial.rename(tarball)

    def unpack_root(self) -> None:
        """The Debian root from the tarball a build with the same packages left."""
        self.rootfs.mkdir()
        self.run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "-C",
                str(self.rootfs),
                "-xpf",
                str(self.root_tarball),
            ]
        )

    def configure(self) -> None:
        """Files, the guest agent, units, swap file: everything the packages do not do."""
        r = self.rootfs
        (r / "etc/hostname").write_text(HOSTNAME + "\n")
        (r / "etc/hosts").write_text(f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost\n")
        (r / "etc/fstab").write_text(FSTAB)
        # Empty: every guest gets its own machine id on its first boot (its overlay keeps it).
        (r / "etc/machine-id").write_text("")
        # A lab guest with no network: root logs in on the serial console without a password.
        self.chroot("passwd", "-d", "root")

        # The guest agent: the package as hashed, byte-compiled, a wrapper, a unit.
        install = r / INSTALL_DIR.lstrip("/")
        if install.exists():
            shutil.rmtree(install)
        for name, data in self.code.items():
            dest = install / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        (install / "README").write_text(
            "The tmem guest agent (the project's guestagent package), installed by scripts/build-image.\n"
            "Run it as /usr/local/bin/guestagent; the daemon is tmem-guestagent.service.\n"
        )
        self.chroot("python3", "-m", "compileall", "-q", INSTALL_DIR)
        wrapper = r / "usr/local/bin/guestagent"
        wrapper.write_text(WRAPPER)
        wrapper.chmod(0o755)
        (r / "etc/systemd/system" / UNIT_NAME).write_text(UNIT)
        self.chroot("systemctl", "enable", UNIT_NAME)
        (r / "etc/systemd/system" / SWAPDEV_UNIT_NAME).write_text(SWAPDEV_UNIT)
        self.chroot("systemctl", "enable", SWAPDEV_UNIT_NAME)
        # qemu-guest-agent is started by udev when its port (org.qemu.guest_agent.0) appears (its
        # unit is bound to the port's device); should a later package give the unit a WantedBy=,
        # enable it too.
        qga_unit = r / "lib/systemd/system/qemu-guest-agent.service"
        if "WantedBy=" in qga_unit.read_text():
            self.chroot("systemctl", "enable", "qemu-guest-agent.service")
        else:
            self.note("qemu-guest-agent.service: static, started by udev (60-qemu-guest-agent.rules)")
        if not (r / "lib/udev/rules.d/60-qemu-guest-agent.rules").is_file():
            raise RuntimeError("qemu-guest-agent's udev rule is missing: nothing would start it")
        self.chroot("systemctl", "mask", *MASKED_UNITS)

        # Its default configuration, checked by the guest agent's own parser, and what it needs.
        for d in (BUILD_AREA, PRESWAP_DIR):
            (r / d.lstrip("/")).mkdir(parents=True, exist_ok=True)
        for name in BUILD_AREA_ALIASES:  # relative: here they must not lead out of the root
            alias = r / name.lstrip("/")
            alias.parent.mkdir(parents=True, exist_ok=True)
            if not alias.is_symlink():
                alias.symlink_to(os.path.relpath(BUILD_AREA, os.path.dirname(name)))
        config = r / GUEST_CONFIG_PATH.lstrip("/")
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(GUEST_CONFIG)
        self.chroot(
            "env",
            f"PYTHONPATH={INSTALL_DIR}",
            "python3",
            "-c",
            f"from guestagent import config; print(config.load({GUEST_CONFIG_PATH!r}))",
        )
        self.demo_project()

        # The swap file: mkswap'd here; mke2fs -d stores its zero blocks as holes, which swapon
        # refuses, so the make_filesystem step fallocates them afterwards.
        swap = r / "swapfile"
        with open(swap, "wb") as f:
            f.truncate(SWAP_MIB << 20)
        swap.chmod(0o600)
        self.run(["mkswap", "-L", "swap", str(swap)])

        # Nothing left over from the build that the guest does not need.
        for leftover in (r / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()

    def demo_project(self) -> None:
        """The demo's C project: the upstream tarball of the source package, unpacked in the precache
        backing directory and configured (a static library build), so a guest only runs make."""
        r = self.rootfs
        tarballs = sorted((r / SOURCE_DIR.lstrip("/")).glob(f"{DEMO_SOURCE_PACKAGE}_*.orig.tar.*"))
        if len(tarballs) != 1:
            raise RuntimeError(
                f"expected one upstream tarball of {DEMO_SOURCE_PACKAGE} in {SOURCE_DIR}, "
                f"found {[t.name for t in tarballs]}"
            )
        project = r / DEMO_PROJECT_DIR.lstrip("/")
        if project.exists():
            shutil.rmtree(project)
        project.mkdir(parents=True)
        self.run(
            ["tar", "-C", str(project), "--strip-components=1", "--no-same-owner", "-xf", str(tarballs[0])]
        )
        self.chroot("sh", "-c", f"cd {DEMO_PROJECT_DIR} && CFLAGS={DEMO_CFLAGS} ./configure --static")
        self.note(f"{DEMO_PROJECT_DIR}: {tarballs[0].name}, configured")

    def kernel_version(self) -> str:
        kernels = sorted((self.rootfs / "boot").glob("vmlinuz-*"))
        if len(kernels) != 1:
            raise RuntimeError(f"expected one kernel in /boot, found {[k.name for k in kernels]}")
        return kernels[0].name.removeprefix("vmlinuz-")

    def check_initramfs(self) -> None:
        """Every boot driver is built in or in the initramfs; if not, add it and regenerate."""
        version = self.kernel_version()
        config = (self.rootfs / f"boot/config-{version}").read_text()
        listing = self.chroot("lsinitramfs", f"/boot/initrd.img-{version}")
        modules = {Path(line).name.split(".ko")[0] for line in listing.splitlines() if ".ko" in line}
        missing = []
        for driver in BOOT_DRIVERS:
            option = f"CONFIG_{driver.upper()}"
            if f"\n{option}=y\n" in config:
                self.note(f"{driver}: built into the kernel ({option}=y)")
            elif driver in modules:
                self.note(f"{driver}: module in the initramfs")
            else:
                missing.append(driver)
        if missing:
            self.note(f"missing from the initramfs: {missing}; adding them")
            with open(self.rootfs / "etc/initramfs-tools/modules", "a") as f:
                f.write("".join(f"{m}\n" for m in missing))
            self.chroot("update-initramfs", "-u", "-k", version)

    def extract_kernel(self) -> None:
        version = self.kernel_version()
        self.out.directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.rootfs / f"boot/vmlinuz-{version}", self.out.kernel)
        shutil.copyfile(self.rootfs / f"boot/initrd.img-{version}", self.out.initrd)
        for path in (self.out.kernel, self.out.initrd):
            path.chmod(0o644)

    def make_filesystem(self) -> None:
        raw = self.work / "root.raw"
        raw.unlink(missing_ok=True)
        self.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                str(BLOCK_SIZE),
                "-L",
                "tmem-root",
                "-E",
                "root_owner=0:0",
                "-d",
                str(self.rootfs),
                str(raw),
                f"{self.size_mib}M",
            ]
        )
        last_block = (SWAP_MIB << 20) // BLOCK_SIZE - 1
        self.run(["debugfs", "-w", "-R", f"fallocate /swapfile 0 {last_block}", str(raw)])
        extents = self.run(["debugfs", "-R", "ex /swapfile", str(raw)])
        self.note(extents)
        self.run(["e2fsck", "-f", "-n", str(raw)])

    def convert(self) -> None:
        self.out.directory.mkdir(parents=True, exist_ok=True)
        raw = self.work / "root.raw"
        self.run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(self.out.base)])
        self.out.base.chmod(0o644)
        raw.unlink()

    def manifest(self, recipe: str, started: float) -> dict[str, Any]:
        admin = str(self.rootfs / "var/lib/dpkg")
        listing = self.run(["dpkg-query", f"--admindir={admin}", "-W", "-f=${Package}\t${Version}\n"])
        versions = dict(line.split("\t", 1) for line in listing.splitlines() if "\t" in line)
        (self.out.directory / "packages.txt").write_text(listing)
        info = json.loads(self.run(["qemu-img", "info", "--output=json", str(self.out.base)]))
        python = self.chroot("python3", "-c", "import sys; print(sys.version.split()[0])").strip()
        return {
            "recipe": recipe,
            "built_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.monotonic() - started, 1),
            "step_seconds": self.timings,
            "suite": SUITE,
            "mirror": self.mirror,
            "root_tarball": str(self.root_tarball),
            "kernel_version": self.kernel_version(),
            "cmdline": GUEST_CMDLINE,
            "python": python,
            "packages": {name: versions.get(name) for name in MANIFEST_PACKAGES},
            "package_count": len(versions),
            "files": {
                "base": self.out.base.name,
                "kernel": self.out.kernel.name,
                "initrd": self.out.initrd.name,
            },
            "base_virtual_size_mib": info["virtual-size"] >> 20,
            "base_file_bytes": self.out.base.stat().st_size,
            "swap_mib": SWAP_MIB,
            "guest_config": {
                "path": GUEST_CONFIG_PATH,
                "precache": PRECACHE_MOUNTPOINT,
                "backing": PRECACHE_BACKING,
                "build_area": BUILD_AREA,
                "preswap": True,
            },
            "demo_project": {
                "source_package": DEMO_SOURCE_PACKAGE,
                "dir": DEMO_PROJECT_DIR,
                "tarball": ", ".join(
                    t.name for t in sorted((self.rootfs / SOURCE_DIR.lstrip("/")).glob("*.orig.tar.*"))
                ),
            },
            "guestagent": {
                "install_dir": INSTALL_DIR,
                "wrapper": "/usr/local/bin/guestagent",
                "unit": UNIT_NAME,
                "files": sorted(self.code),
            },
        }


def build(
    cache: Path = DEFAULT_CACHE,
    *,
    force: bool = False,
    mirror: str = DEFAULT_MIRROR,
    security_mirror: str = DEFAULT_SECURITY_MIRROR,
    size_mib: int = IMAGE_SIZE_MIB,
    keep_work: bool = False,
) -> Image:
    """The image for the current recipe, built if it is not in the cache (or if forced)."""
    code = guest_code()
    recipe = recipe_hash(size_mib, code)
    image = Image(cache / recipe)
    with cache_lock(cache):
        if image.is_built() and not force:
            say(f"cached: {image.directory} (recipe {recipe}, built {image.manifest().get('built_at')})")
            return image
        missing = [tool for tool in HOST_TOOLS if shutil.which(tool) is None]
        if missing:
            raise SystemExit(f"[build-image] missing tools: {', '.join(missing)} (run scripts/setup)")
        if os.geteuid() != 0:
            raise SystemExit("[build-image] must run as root (mmdebstrap --mode=root, chroot)")
        started = time.monotonic()
        work = cache / f".work-{recipe}"
        remove_tree(work)
        work.mkdir(parents=True)
        b = Build(work, cache, code, mirror, security_mirror, size_mib)
        say(f"building recipe {recipe} in {work}")
        if force or not b.root_tarball.is_file():
            first: tuple[str, Callable[[], None]] = ("bootstrap Debian bookworm (mmdebstrap)", b.bootstrap)
        else:
            first = (f"unpack the cached Debian root ({b.root_tarball.name})", b.unpack_root)
        steps: list[tuple[str, Callable[[], None]]] = [
            first,
            (
                "configure the guest (guest agent and its config, units, fstab, swap file, demo project)",
                b.configure,
            ),
            ("check the initramfs has the virtio drivers", b.check_initramfs),
            ("extract the kernel and initramfs", b.extract_kernel),
            ("make the ext4 file system (mke2fs -d)", b.make_filesystem),
            ("convert to qcow2", b.convert),
        ]
        total = len(steps) + 1
        try:
            for number, (name, fn) in enumerate(steps, 1):
                b.step(number, total, name, fn)

            def write_manifest() -> None:
                data = b.manifest(recipe, started)
                b.out.manifest_path.write_text(json.dumps(data, indent=2) + "\n")

            b.step(total, total, "write the manifest", write_manifest)
        except StepFailed as failure:
            say(f"FAILED at step '{failure.step}': {failure.reason}")
            tail = failure.log.read_text(errors="replace").splitlines()[-40:]
            for line in tail:
                print(f"    | {line}", file=sys.stderr)
            say(f"full log: {failure.log} (work directory kept: {work})")
            raise SystemExit(1) from None

        # Publish: the finished files replace any older build of this recipe in one rename.
        if image.directory.exists():
            old = cache / f".old-{recipe}"
            remove_tree(old)
            image.directory.rename(old)
            remove_tree(old)
        b.out.directory.rename(image.directory)
        if keep_work:
            say(f"work directory kept: {work}")
        else:
            remove_tree(work)
        manifest = image.manifest()
        say(
            f"built {image.directory} in {manifest['build_seconds']:.1f} s "
            f"(kernel {manifest['kernel_version']}, base {manifest['base_file_bytes'] >> 20} MiB)"
        )
        return image


def prune(cache: Path, keep: Image, keep_root: str) -> list[Path]:
    """Delete cached images and Debian roots of other recipes (their overlays stop working)."""
    removed = []
    with cache_lock(cache):
        for entry in sorted(cache.iterdir()):
            if entry.is_dir() and entry.name not in (keep.directory.name, "debs", "roots"):
                remove_tree(entry)
                removed.append(entry)
        for tarball in sorted((cache / "roots").glob("*")):
            if tarball.name != f"{keep_root}.tar":
                tarball.unlink()
                removed.append(tarball)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build-image", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="default: %(default)s")
    parser.add_argument("--size-mib", type=int, default=IMAGE_SIZE_MIB, help="root file system size")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--mirror", default=DEFAULT_MIRROR)
    parser.add_argument("--security-mirror", default=DEFAULT_SECURITY_MIRROR)
    parser.add_argument("--keep-work", action="store_true", help="keep the root directory and logs")
    sub = parser.add_subparsers(dest="command", metavar="[path|overlay|prune]")
    sub.add_parser("path", help="print the image directory of the current recipe; exit 1 if not built")
    o = sub.add_parser("overlay", help="create qcow2 overlays on the base image")
    o.add_argument("dest", nargs="+", type=Path)
    o.add_argument("--base", type=Path, help="default: the current recipe's base.qcow2")
    o.add_argument("--replace", action="store_true", help="replace existing overlays")
    sub.add_parser("prune", help="delete cached images of other recipes")
    args = parser.parse_args(argv)

    image = image_for(args.cache, args.size_mib)
    if args.command is None:
        built = build(
            args.cache,
            force=args.force,
            mirror=args.mirror,
            security_mirror=args.security_mirror,
            size_mib=args.size_mib,
            keep_work=args.keep_work,
        )
        print(built.directory)
        return 0
    if args.command == "path":
        print(image.directory)
        return 0 if image.is_built() else 1
    if args.command == "overlay":
        base = args.base or image.base
        if not base.is_file():
            say(f"no base image at {base}: run scripts/build-image first")
            return 1
        for dest in args.dest:
            print(create_overlay(base, dest, force=args.replace))
        return 0
    if args.command == "prune":
        for removed in prune(args.cache, image, system_hash(args.mirror, args.security_mirror)):
            say(f"removed {removed}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
