"""The guest agent for an existing Debian or Ubuntu guest: a .deb built from this tree, and its
installation into a running guest through the QEMU guest agent (no network or login needed).

`build_deb` packs the `guestagent` package (pure Python) with dpkg-deb: the package under
/usr/lib/python3/dist-packages, `/usr/bin/guestagent`, the unit `tmem-guestagent.service` (enabled
and started by the maintainer scripts) and `/etc/tmem/guestagent.toml`, a conffile holding the
commented example (every key at its default: the reporter on the org.tmem.0 port, precache and
preswap off until the operator turns them on). The version carries a hash of the guest code, so a
changed tree is a newer package.

`install_into` copies it into the guest with guest-file-open/write/close and installs it with
guest-exec (`apt-get install` of the file, which also fetches missing dependencies if the guest has
a network; `dpkg -i` where there is no apt-get), then waits for the unit to be active.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from importlib import metadata, resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from hostagent import libvirtconn

PACKAGE = "tmem-guestagent"
UNIT_NAME = "tmem-guestagent.service"
GUEST_DEB = "/tmp/tmem-guestagent.deb"
SITE = "usr/lib/python3/dist-packages"
CHUNK = 192 << 10  # bytes per guest-file-write (base64 in one JSON message)

UNIT = """\
[Unit]
Description=tmem guest agent (precache, preswap, reporter over virtio-serial port org.tmem.0)
Documentation=file:/etc/tmem/guestagent.toml
After=local-fs.target
# Keep retrying for ever: the host agent or the port may come and go.
StartLimitIntervalSec=0

[Service]
Type=simple
ExecStart=/usr/bin/guestagent run
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

WRAPPER = """\
#!/bin/sh
# The tmem guest agent (package tmem-guestagent).
exec python3 -m guestagent "$@"
"""

POSTINST = f"""\
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    python3 -m compileall -q /{SITE}/guestagent >/dev/null 2>&1 || true
    mkdir -p /var/lib/tmem
    systemctl enable {UNIT_NAME} >/dev/null 2>&1 || true
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl restart {UNIT_NAME}
    fi
fi
"""

PRERM = f"""\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl stop {UNIT_NAME} || true
fi
if [ "$1" = remove ]; then
    systemctl disable {UNIT_NAME} >/dev/null 2>&1 || true
fi
rm -rf /{SITE}/guestagent/__pycache__
"""

POSTRM = """\
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
    rmdir /var/lib/tmem /etc/tmem 2>/dev/null || true
fi
"""


class GuestInstallError(Exception):
    """Building or installing the package failed; the message says where."""


def guest_files() -> dict[str, bytes]:
    """The guestagent package's source files, subpackages included (no byte code, no build
    products), by path relative to the package."""
    out: dict[str, bytes] = {}

    def collect(folder: Traversable, prefix: str) -> None:
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.is_dir() and entry.joinpath("__init__.py").is_file():
                collect(entry, f"{prefix}{entry.name}/")
            elif entry.is_file() and entry.name.endswith((".py", ".toml")):
                out[prefix + entry.name] = entry.read_bytes()

    root = resources.files("guestagent")
    collect(root, "")
    if "__init__.py" not in out or "daemon.py" not in out:
        raise GuestInstallError(f"the guestagent package at {root} is incomplete")
    return out


def version(files: dict[str, bytes]) -> str:
    """The project's version plus a hash of the guest code: a changed tree is a newer package."""
    try:
        base = metadata.version("tmem-kvm")
    except metadata.PackageNotFoundError:
        base = "0.0.0"
    h = hashlib.sha256()
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + data)
    return f"{base}+{h.hexdigest()[:12]}"


def control(ver: str, installed_kib: int) -> str:
    return (
        f"Package: {PACKAGE}\nVersion: {ver}\nArchitecture: all\n"
        "Maintainer: tmem-kvm developers <root@localhost>\n"
        f"Installed-Size: {installed_kib}\nSection: admin\nPriority: optional\n"
        "Depends: python3 (>= 3.11), python3-trio\n"
        "Recommends: python3-pyfuse3, fuse3\n"
        "Description: tmem guest agent for QEMU/KVM guests\n"
        " Talks to the host's tmem agent over the virtio-serial port org.tmem.0: reports\n"
        " memory figures for ballooning, and serves precache (a FUSE victim cache) and\n"
        " preswap (userfaultfd regions) from the host's page pool.\n"
    )


def build_deb(output: Path) -> Path:
    """Build the .deb into `output` (a directory); returns its path."""
    if shutil.which("dpkg-deb") is None:
        raise GuestInstallError("dpkg-deb is not installed (apt-get install dpkg)")
    files = guest_files()
    ver = version(files)
    output.mkdir(parents=True, exist_ok=True)
    deb = output / f"{PACKAGE}_{ver}_all.deb"
    with tempfile.TemporaryDirectory(prefix="tmem-deb-") as tmp:
        root = Path(tmp) / "pkg"
        pkg = root / SITE / "guestagent"
        pkg.mkdir(parents=True)
        for name, data in files.items():
            (pkg / name).parent.mkdir(parents=True, exist_ok=True)
            (pkg / name).write_bytes(data)
        _write(root / "usr/bin/guestagent", WRAPPER, 0o755)
        _write(root / "lib/systemd/system" / UNIT_NAME, UNIT)
        _write(root / "etc/tmem/guestagent.toml", files["guestagent.example.toml"].decode())
        _write(
            root / f"usr/share/doc/{PACKAGE}/README",
            "The tmem guest agent, built by `hostagent guest-deb` from the tmem-kvm tree.\n"
            "Configuration: /etc/tmem/guestagent.toml; service: tmem-guestagent.service.\n",
        )
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        _write(root / "DEBIAN/control", control(ver, (size + 1023) // 1024))
        _write(root / "DEBIAN/conffiles", "/etc/tmem/guestagent.toml\n")
        for name, text in (("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)):
            _write(root / "DEBIAN" / name, text, 0o755)
        proc = subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(root), str(deb)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise GuestInstallError(f"dpkg-deb failed: {proc.stderr.strip()}")
    return deb


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


# -- into a running guest, through qemu-guest-agent -------------------------------------------------


def _agent(dom: Any, execute: str, timeout: int = 30, **arguments: Any) -> Any:
    """One qemu-guest-agent command (a libvirtError if the agent does not answer)."""
    import libvirt_qemu

    cmd: dict[str, Any] = {"execute": execute}
    if arguments:
        cmd["arguments"] = arguments
    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout, 0))["return"]


def copy_in(dom: Any, data: bytes, path: str) -> None:
    """Write `data` to `path` in the guest (guest-file-open/write/close)."""
    handle = _agent(dom, "guest-file-open", path=path, mode="wb")
    try:
        for off in range(0, len(data), CHUNK):
            chunk = data[off : off + CHUNK]
            args: dict[str, Any] = {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()}
            r = _agent(dom, "guest-file-write", **args)
            if r.get("count") != len(chunk):
                raise GuestInstallError(f"short write to {path} in the guest: {r}")
    finally:
        _agent(dom, "guest-file-close", handle=handle)


def run(dom: Any, argv: list[str], timeout: float) -> tuple[int, str, str]:
    """guest-exec and wait: (exit code, stdout, stderr)."""
    args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    pid = _agent(dom, "guest-exec", **args)["pid"]
    deadline = time.monotonic() + timeout
    while True:
        st = _agent(dom, "guest-exec-status", pid=pid)
        if st.get("exited"):
            out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
            return int(st.get("exitcode", -1)), out, err
        if time.monotonic() > deadline:
            raise GuestInstallError(f"{' '.join(argv)} did not finish in the guest within {timeout:.0f} s")
        time.sleep(0.3)


INSTALL_SCRIPT = f"""\
set -e
export DEBIAN_FRONTEND=noninteractive
if command -v apt-get >/dev/null; then
    apt-get install -y --no-install-recommends -o Dpkg::Options::=--force-confold {GUEST_DEB}
else
    dpkg -i {GUEST_DEB}
fi
rm -f {GUEST_DEB}
"""


def install_into(
    domain: str, *, uri: str = "qemu:///system", deb: Path | None = None, timeout: float = 300.0
) -> dict[str, Any]:
    """Install the guest agent into the running `domain`; returns what the guest reports."""
    import libvirt

    conn = libvirtconn.connect(uri, GuestInstallError)
    try:
        dom = libvirtconn.lookup(conn, domain, GuestInstallError)
        try:
            _agent(dom, "guest-ping", 10)
        except libvirt.libvirtError as err:
            raise GuestInstallError(
                f"{domain}: the QEMU guest agent does not answer "
                f"(org.qemu.guest_agent.0): {err.get_error_message()}"
            ) from None
        with tempfile.TemporaryDirectory(prefix="tmem-deb-") as tmp:
            path = deb if deb is not None else build_deb(Path(tmp))
            data = path.read_bytes()
            try:
                copy_in(dom, data, GUEST_DEB)
                rc, out, errout = run(dom, ["/bin/sh", "-c", INSTALL_SCRIPT], timeout)
                if rc != 0:
                    raise GuestInstallError(
                        f"{domain}: installing {path.name} failed ({rc}): {(errout or out).strip()[-800:]}"
                    )
                state = _wait_active(dom)
                _, ver, _ = run(dom, ["dpkg-query", "-W", "-f=${Version}", PACKAGE], 30)
            except libvirt.libvirtError as err:
                raise GuestInstallError(
                    f"{domain}: guest agent command failed: {err.get_error_message()}"
                ) from None
        return {
            "domain": dom.name(),
            "package": path.name,
            "bytes": len(data),
            "version": ver.strip(),
            "service": state,
        }
    finally:
        conn.close()


def _wait_active(dom: Any, timeout: float = 60.0) -> str:
    """The unit's state once active (or the last state seen after `timeout`)."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        _, out, _ = run(dom, ["systemctl", "is-active", UNIT_NAME], 30)
        state = out.strip()
        if state == "active":
            return state
        time.sleep(1)
    raise GuestInstallError(
        f"{UNIT_NAME} is {state or 'unknown'} in the guest after "
        f"{timeout:.0f} s (see journalctl -u {UNIT_NAME} there)"
    )
