"""The KVM lab: libvirt daemons, guest domains from small descriptions, the host agent, guest-exec.

`scripts/lab up [N | --config FILE]` builds (or finds cached) the guest image, starts libvirtd and
virtlogd when no service manager runs them, starts the host agent (default control socket, so plain
`hostagent stats` works), creates the guests as transient domains on qcow2 overlays of the one base
image, and waits until every guest agent has shaken hands with the host agent, reporting timing.
`scripts/lab status` shows the domains and `hostagent stats`; `scripts/lab down` destroys the lab's
domains, stops the host agent and removes overlays and sockets (the base image stays cached).

Lab descriptions are TOML (see vmconfigs/lab.toml): a [host] table for the host agent and one
[[guest]] table per guest (name, memory_mib, max_memory_mib, vcpus, optional iotune limits).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

from guestagent.protocol import tomlfile
from guestagent.protocol.jsonline import is_listening
from hostagent import control, statsview
from scripts import build_image
from scripts.domain import DiskCache, Guest, IOTune, detect_virt_type, domain_xml
from scripts.wait import wait_until

ROOT = Path(__file__).resolve().parent.parent

URI = "qemu:///system"
STATE = Path(os.environ.get("TMEM_LAB_DIR", "/var/lib/tmem/lab"))
CONTROL = "/run/tmem/control.sock"
ARENA_DIR = "/dev/shm/tmem"
# Each guest's swap device (docs/preswap-device.md): QEMU (user libvirt-qemu, group kvm) connects.
SWAP_SOCKET = "/run/tmem/swap.sock"
SWAP_GROUP = "kvm"
SWAP_MIB = 1024
LIBVIRT_SOCK = "/run/libvirt/libvirt-sock"
HANDSHAKE_TIMEOUT = float(os.environ.get("TMEM_LAB_BOOT_TIMEOUT", "300"))


class LabError(Exception):
    """A lab step failed; the message says which and why."""


def say(msg: str) -> None:
    """Progress goes to stderr: stdout stays clean for what callers print (a benchmark's JSON)."""
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


# -- the lab description ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """A guest as a lab description gives it; paths (disk, sockets, logs) are the lab's business."""

    name: str
    memory_mib: int = 512
    max_memory_mib: int = 1024
    vcpus: int = 1
    read_iops_sec: int | None = None
    write_iops_sec: int | None = None
    read_bytes_sec: int | None = None
    write_bytes_sec: int | None = None
    disk_cache: str = "none"  # or "writeback": the host page cache caches the disk

    def iotune(self) -> IOTune | None:
        tune = IOTune(self.read_iops_sec, self.write_iops_sec, self.read_bytes_sec, self.write_bytes_sec)
        return tune if tune.limits() else None


@dataclasses.dataclass(frozen=True)
class Lab:
    guests: tuple[GuestSpec, ...]
    # [host] table: hostagent settings (limit_mib, host_reserve_mib, and [host.balloon], copied
    # as the host agent's [balloon] table)
    host: dict[str, Any]
    # more of the host agent's config, as TOML appended to it: tables a lab description's [host]
    # cannot carry, e.g. [[balloon.guest]] (tests set them here rather than patching the lab)
    host_toml: str = ""


def default_lab(n: int, balloon: dict[str, Any] | None = None) -> Lab:
    """N guests of the default size; `balloon` is the host agent's [balloon] table (off if None)."""
    return Lab(
        tuple(GuestSpec(name=f"tmem-{i}") for i in range(1, n + 1)), {"balloon": balloon} if balloon else {}
    )


def load_lab(path: Path) -> Lab:
    data = tomlfile.read(path, LabError)
    unknown = set(data) - {"host", "guest"}
    if unknown:
        raise LabError(f"{path}: unknown table(s) {', '.join(sorted(unknown))} (known: host, guest)")
    guests = []
    for i, g in enumerate(data.get("guest", [])):
        try:
            guests.append(GuestSpec(**g))
        except TypeError as err:
            raise LabError(f"{path}: guest[{i}]: {err}") from None
    if not guests:
        raise LabError(f"{path}: no [[guest]] tables")
    host = dict(data.get("host", {}))
    if set(host) - {"limit_mib", "host_reserve_mib", "swap_mib", "balloon"}:
        raise LabError(
            f"{path}: [host] knows limit_mib, host_reserve_mib, swap_mib (0: no swap "
            "device) and [host.balloon] only"
        )
    if not isinstance(host.get("balloon", {}), dict):
        raise LabError(f"{path}: [host.balloon] must be a table (the host agent's [balloon] settings)")
    return Lab(tuple(guests), host)


# -- libvirt daemons ----------------------------------------------------------------------------


def fix_kvm_device(path: str = "/dev/kvm") -> None:
    """Give /dev/kvm to group kvm, mode 0660, as Debian's udev rule does.

    Without udev (containers) it stays 0600 root. QEMU's capability probe (run as root) then finds
    KVM while libvirt's check as the QEMU user does not, so libvirt calls its cached capabilities
    stale and re-probes QEMU (a minute or more under emulation) before every domain start.
    """
    import grp
    import stat

    try:
        st = os.stat(path)
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (FileNotFoundError, KeyError):
        return
    if st.st_gid != kvm_gid or stat.S_IMODE(st.st_mode) & 0o060 != 0o060:
        say(f"{path}: group kvm, mode 0660 (as udev would set it)")
        os.chown(path, -1, kvm_gid)
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o060)


def ensure_daemons() -> None:
    """Start virtlogd and libvirtd by hand when nothing else runs them (no systemd here)."""
    fix_kvm_device()
    if Path("/run/systemd/system").is_dir():
        return  # a service manager owns them; socket activation starts them on demand
    for daemon, pidfile in (("virtlogd", "/run/virtlogd.pid"), ("libvirtd", "/run/libvirtd.pid")):
        if _running(pidfile):
            continue
        say(f"starting {daemon}")
        proc = subprocess.run([daemon, "-d"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise LabError(f"starting {daemon} failed: {proc.stderr.strip() or proc.returncode}")
    try:
        wait_until(lambda: is_listening(LIBVIRT_SOCK), 20, f"libvirtd to open {LIBVIRT_SOCK}", 0.2)
    except TimeoutError as err:
        raise LabError(str(err)) from None


def _running(pidfile: str) -> bool:
    try:
        pid = int(Path(pidfile).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


def connect() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as err:
        raise LabError(f"cannot connect to libvirt at {URI}: {err.get_error_message()}") from None


# -- the guest image ----------------------------------------------------------------------------


def ensure_image() -> build_image.Image:
    """The cached guest image for the current recipe; built (by scripts/build-image) if missing."""
    image = build_image.image_for()
    if not image.is_built():
        say("building the guest image (cached afterwards)")
        proc = subprocess.run([str(ROOT / "scripts" / "build-image")], stdout=sys.stderr, check=False)
        if proc.returncode != 0:
            raise LabError("scripts/build-image failed (its output above says which step)")
        image = build_image.image_for()
    return image


# -- the host agent -----------------------------------------------------------------------------


def hostagent_config(lab: Lab) -> Path:
    host = {"limit_mib": 1024, "host_reserve_mib": 1024, **lab.host}
    cfg = STATE / "hostagent.toml"
    balloon = "".join(f"{k} = {_toml_value(v)}\n" for k, v in host.get("balloon", {}).items())
    cfg.write_text(
        "# written by scripts/lab\n[pool]\n"
        f"limit_mib = {int(host['limit_mib'])}\n"
        f"host_reserve_mib = {int(host['host_reserve_mib'])}\n"
        f'arena_dir = "{ARENA_DIR}"\n[control]\nsocket = "{CONTROL}"\n'
        f'[libvirt]\nenabled = true\nuri = "{URI}"\nretry_interval = 1.0\n'
        + (
            f'[swap]\nenabled = true\nsocket = "{SWAP_SOCKET}"\nspill_dir = "{STATE / "spill"}"\n'
            f'size_mib = {swap_mib(lab)}\nsocket_group = "{SWAP_GROUP}"\n'
            if swap_mib(lab)
            else ""
        )
        + (f"[balloon]\n{balloon}" if balloon else "")
        + lab.host_toml
    )
    return cfg


def swap_mib(lab: Lab) -> int:
    """The size of each guest's swap device (0: lab guests get none)."""
    return int(lab.host.get("swap_mib", SWAP_MIB))


def _toml_value(v: Any) -> str:
    """A scalar as TOML (the [host.balloon] settings are booleans, numbers and strings)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    raise LabError(f"[host.balloon]: {v!r} is not a boolean, number or string")


def start_hostagent(lab: Lab) -> None:
    if is_listening(CONTROL):
        say(f"host agent already running at {CONTROL}")
        return
    cfg = hostagent_config(lab)
    log = open(STATE / "hostagent.log", "ab")  # noqa: SIM115 (the agent keeps it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostagent", "run", "--config", str(cfg)],
        stdout=log,
        stderr=log,
        start_new_session=True,
        cwd=ROOT,
    )
    (STATE / "hostagent.pid").write_text(str(proc.pid))

    def serving() -> bool:
        if proc.poll() is not None:
            raise LabError(f"the host agent exited with {proc.returncode} (log: {STATE / 'hostagent.log'})")
        return is_listening(CONTROL)

    try:
        wait_until(serving, 20, "the host agent to serve", 0.1)
    except TimeoutError as err:
        raise LabError(f"{err} (log: {STATE / 'hostagent.log'})") from None
    say(f"host agent running (pid {proc.pid}, log {STATE / 'hostagent.log'})")


def stop_hostagent() -> None:
    pidfile = STATE / "hostagent.pid"
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: process_gone(pid), 10, "the host agent to exit", 0.1)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink()


def process_gone(pid: int) -> bool:
    """Exited (a zombie counts: a container's init, or the process that started it, may never
    reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def stats() -> dict[str, Any]:
    result: dict[str, Any] = control.request(CONTROL, {"cmd": "stats"})
    return result


# -- domains ------------------------------------------------------------------------------------


def create_guests(conn: Any, lab: Lab, image: build_image.Image) -> dict[str, float]:
    """Overlays + transient domains; returns name -> time.monotonic() of creation."""
    started = {}
    names = json.loads((STATE / "domains.json").read_text()) if (STATE / "domains.json").exists() else []
    virt_type = detect_virt_type()
    for sub in ("xml", "console", "sockets"):
        (STATE / sub).mkdir(exist_ok=True)
    for g in lab.guests:
        overlay = build_image.create_overlay(image.base, STATE / "disks" / f"{g.name}.qcow2", force=True)
        guest = Guest(
            name=g.name,
            memory_mib=g.memory_mib,
            max_memory_mib=g.max_memory_mib,
            vcpus=g.vcpus,
            disk=overlay,
            tmem_socket=STATE / "sockets" / f"{g.name}.tmem",
            console_log=STATE / "console" / f"{g.name}.log",
            kernel=image.kernel,
            initrd=image.initrd,
            iotune=g.iotune(),
            uuid=str(uuidlib.uuid4()),
            swap_socket=Path(SWAP_SOCKET) if swap_mib(lab) else None,
            disk_cache=cast(DiskCache, g.disk_cache),
        )  # Guest refuses others
        xml = domain_xml(guest, virt_type)
        (STATE / "xml" / f"{g.name}.xml").write_text(xml)
        conn.createXML(xml, 0)
        started[g.name] = time.monotonic()
        names.append(g.name)
        (STATE / "domains.json").write_text(json.dumps(sorted(set(names))))
        say(f"started {g.name} ({virt_type}): {g.memory_mib} MiB (max {g.max_memory_mib}), {g.vcpus} vCPU")
    return started


def wait_handshakes(
    names: Sequence[str], started: dict[str, float], timeout: float = HANDSHAKE_TIMEOUT
) -> dict[str, float]:
    """Seconds from domain creation until its guest agent shook hands and reported."""
    done: dict[str, float] = {}

    def all_reported() -> bool:
        for g in stats()["guests"].values():
            name = g.get("name")
            if name in names and name not in done and g.get("connected") and g.get("report"):
                done[name] = time.monotonic() - started[name]
                say(f"{name}: guest agent connected {done[name]:.1f} s after start")
        return len(done) == len(names)

    try:
        wait_until(all_reported, timeout, "every guest agent's handshake", 0.5)
    except TimeoutError:
        missing = sorted(set(names) - set(done))
        raise LabError(
            f"no handshake from {', '.join(missing)} within {timeout:.0f} s (consoles: {STATE / 'console'})"
        ) from None
    return done


def lab_domains(conn: Any) -> list[Any]:
    """The lab's domains: recorded by `up`, or any whose disk lives in the lab's state dir."""
    known = (
        set(json.loads((STATE / "domains.json").read_text())) if (STATE / "domains.json").exists() else set()
    )
    found = []
    for dom in conn.listAllDomains(0):
        try:
            ours = dom.name() in known or f"{STATE}/disks/" in dom.XMLDesc(0)
        except Exception:  # it went away while we looked
            continue
        if ours:
            found.append(dom)
    return found


def up(lab: Lab) -> dict[str, Any]:
    t0 = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    ensure_daemons()
    image = ensure_image()
    t_image = time.monotonic() - t0
    conn = connect()
    taken = {d.name() for d in conn.listAllDomains(0)}
    clash = [g.name for g in lab.guests if g.name in taken]
    if clash:
        raise LabError(f"domains already exist: {', '.join(clash)} (scripts/lab down first)")
    start_hostagent(lab)
    started = create_guests(conn, lab, image)
    handshakes = wait_handshakes([g.name for g in lab.guests], started)
    result = {
        "guests": len(lab.guests),
        "image_seconds": round(t_image, 1),
        "handshake_seconds": {k: round(v, 1) for k, v in handshakes.items()},
        "total_seconds": round(time.monotonic() - t0, 1),
    }
    say(f"lab up: {json.dumps(result)}")
    return result


def down() -> None:
    if (STATE / "disks").exists():
        ensure_daemons()  # the lab's domains may outlive libvirtd: it must be up to destroy them
    if is_listening(LIBVIRT_SOCK):
        conn = connect()
        for dom in lab_domains(conn):
            say(f"destroying {dom.name()}")
            with contextlib.suppress(Exception):
                dom.destroy()
            with contextlib.suppress(Exception):
                dom.undefine()
    stop_hostagent()
    # The lab's domains are transient: persistent pages of destroyed domains are nobody's.
    shutil.rmtree(ARENA_DIR, ignore_errors=True)
    for sub in ("disks", "xml", "sockets", "spill", "domains.json"):
        path = STATE / sub
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    say("lab down")


def status() -> None:
    if is_listening(LIBVIRT_SOCK):
        conn = connect()
        for dom in lab_domains(conn):
            state, _, mem, vcpus, cpu = dom.info()
            say(f"{dom.name()}: state {state}, {mem // 1024} MiB, {vcpus} vCPU, CPU {cpu / 1e9:.1f} s")
    else:
        say("libvirtd is not running")
    if is_listening(CONTROL):
        print(statsview.format_stats(stats()))
    else:
        say(f"no host agent at {CONTROL}")


# -- guest-exec through qemu-guest-agent --------------------------------------------------------


def agent_command(dom: Any, command: dict[str, Any], timeout: int = 10) -> Any:
    import libvirt_qemu

    return json.loads(libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), timeout, 0))["return"]


def wait_guest_agent(dom: Any, timeout: float = HANDSHAKE_TIMEOUT) -> None:
    import libvirt

    def answers() -> bool:
        try:
            agent_command(dom, {"execute": "guest-ping"}, 5)
        except libvirt.libvirtError:
            return False
        return True

    try:
        wait_until(answers, timeout, "qemu-guest-agent", 1.0)
    except TimeoutError:
        raise LabError(f"{dom.name()}: qemu-guest-agent not answering") from None


def guest_spawn(dom: Any, argv: Sequence[str], stdin: bytes | None = None) -> int:
    """Start a command in the guest; returns its pid for `guest_wait`."""
    args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin).decode()
    pid: int = agent_command(dom, {"execute": "guest-exec", "arguments": args})["pid"]
    return pid


def guest_exec(
    dom: Any, argv: Sequence[str], timeout: float = 120, stdin: bytes | None = None
) -> tuple[int, str, str]:
    """Run a command in the guest; (exit code, stdout, stderr)."""
    return guest_wait(dom, guest_spawn(dom, argv, stdin), timeout, " ".join(argv))


def guest_wait(dom: Any, pid: int, timeout: float = 120, what: str = "") -> tuple[int, str, str]:
    """Wait for a command started by `guest_spawn`; (exit code, stdout, stderr)."""
    status: dict[str, Any] = {}

    def exited() -> bool:
        status.update(agent_command(dom, {"execute": "guest-exec-status", "arguments": {"pid": pid}}))
        return bool(status.get("exited"))

    try:
        wait_until(exited, timeout, "", 0.2)
    except TimeoutError:
        what = what or f"pid {pid}"
        raise LabError(f"{dom.name()}: {what} did not finish within {timeout:.0f} s") from None
    out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
    err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
    return int(status.get("exitcode", -1)), out, err


@contextlib.contextmanager
def lab_running(lab: Lab) -> Iterator[dict[str, Any]]:
    """`up` then `down`, for tests and benchmarks."""
    try:
        yield up(lab)
    finally:
        down()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/lab", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the lab and wait for every guest's handshake")
    p_up.add_argument("n", nargs="?", type=int, help="number of guests (default 2)")
    p_up.add_argument("--config", type=Path, help="a lab description (see vmconfigs/lab.toml)")
    sub.add_parser("status", help="the lab's domains and hostagent stats")
    sub.add_parser("down", help="destroy the lab's domains, stop the host agent, clean up")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "up":
            if args.config and args.n:
                ap.error("give N or --config, not both")
            lab = load_lab(args.config) if args.config else default_lab(args.n or 2)
            up(lab)
        elif args.cmd == "down":
            down()
        else:
            status()
    except (LabError, TimeoutError) as err:
        print(f"[lab] error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
