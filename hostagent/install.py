"""`hostagent install` / `hostagent uninstall`: the host agent as a service, set up in one command.

What install puts on a host (paths below `--root`, "/" by default), recorded in a manifest so that
uninstall removes exactly that and nothing else:

- `/etc/tmem/hostagent.toml`: the documented configuration (hostagent.example.toml, every key at its
  default), or the file given with `--config`; an existing one is kept unless `--config` replaces
  it, because the operator edits it;
- `/etc/systemd/system/tmem-hostagent.service`: `Type=notify` (the agent sends READY=1 once its
  sockets listen), `Restart=on-failure`; the arena stays on tmpfs (/dev/shm/tmem), which a service
  restart does not clear, so persistent pages survive it;
- `/usr/local/sbin/hostagent`: a link to this installation's `hostagent` command.

Then it starts the agent: with systemd, `systemctl enable --now`; without it (containers, the lab),
as a daemon of its own with a pid file (`/run/tmem/hostagent.pid`, log `/var/log/tmem/hostagent.log`).
Under a staging `--root` nothing is started; the unit is enabled by its `multi-user.target.wants`
link, as `systemctl --root enable` would. Running install again changes nothing unless a file
differs (then the agent is restarted to pick it up). Uninstall stops the agent and removes every
file, link, socket, the arena and the directories install created (when empty).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from guestagent.protocol.jsonline import is_listening
from hostagent import config as configmod

UNIT_NAME = "tmem-hostagent.service"
CONFIG = "/etc/tmem/hostagent.toml"
UNIT = f"/etc/systemd/system/{UNIT_NAME}"
WANTS = f"/etc/systemd/system/multi-user.target.wants/{UNIT_NAME}"
LINK = "/usr/local/sbin/hostagent"
MANIFEST = "/var/lib/tmem/hostagent-install.json"
PIDFILE = "/run/tmem/hostagent.pid"
LOG = "/var/log/tmem/hostagent.log"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class InstallError(Exception):
    """A step failed; the message says which and why."""


def unit_text(python: str, config: str = CONFIG) -> str:
    """The systemd unit for a host agent run by `python` (this installation's interpreter)."""
    return f"""\
# Installed by `hostagent install`; `hostagent uninstall` removes it. See docs/deploy.md.
[Unit]
Description=tmem host agent (transcendent memory pool for QEMU/KVM guests)
Documentation=file:{config}
After=network.target libvirtd.service virtqemud.service

[Service]
Type=notify
NotifyAccess=main
ExecStart={python} -m hostagent run --config {config}
Restart=on-failure
RestartSec=2
TimeoutStartSec=60
TimeoutStopSec=30
# The arena is a file on tmpfs (/dev/shm/tmem): a restart keeps it, and with it the persistent
# pages, so no PrivateTmp/PrivateDevices or RemoveIPC here. Nothing to keep across a reboot: the
# guests whose pages those are do not survive it either.

[Install]
WantedBy=multi-user.target
"""


def default_config() -> str:
    """The documented configuration: the commented example with every key at its default."""
    return (resources.files("hostagent") / "hostagent.example.toml").read_text()


def check_config(text: str, where: str) -> configmod.Config:
    try:
        return configmod.parse(tomllib.loads(text))
    except tomllib.TOMLDecodeError as err:
        raise InstallError(f"{where}: not TOML: {err}") from None
    except configmod.ConfigError as err:
        raise InstallError(f"{where}: {err}") from None


def hostagent_command(python: str) -> str | None:
    """The `hostagent` console script beside the interpreter, if this installation has one."""
    script = Path(python).parent / "hostagent"
    return str(script) if script.is_file() else None


def has_systemd() -> bool:
    return Path("/run/systemd/system").is_dir()


@dataclass
class Host:
    """Where things go: the real host (root "/") or a staging root."""

    root: Path

    @property
    def staging(self) -> bool:
        return self.root.resolve() != Path("/")

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")


def _say(msg: str) -> None:
    print(f"hostagent install: {msg}", file=sys.stderr, flush=True)


def _read_manifest(host: Host) -> dict[str, Any]:
    path = host.path(MANIFEST)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"files": [], "dirs": []}
    except ValueError as err:
        raise InstallError(f"{path}: unreadable manifest: {err}") from None
    return data


class _Recorder:
    """Creates files, links and directories, remembering each new one for uninstall."""

    def __init__(self, host: Host, manifest: dict[str, Any]) -> None:
        self.host = host
        self.files: list[str] = list(manifest.get("files", []))
        self.dirs: list[str] = list(manifest.get("dirs", []))
        self.changed: list[str] = []

    def mkdir(self, p: str) -> None:
        parts = Path(p).parts
        for i in range(2, len(parts) + 1):
            d = str(Path(*parts[:i]))
            real = self.host.path(d)
            if not real.exists():
                real.mkdir(mode=0o755)
                if d not in self.dirs:
                    self.dirs.append(d)

    def file(self, p: str, text: str, mode: int = 0o644, *, replace: bool = True) -> bool:
        """Write `text` at p unless it is there already; True if the file changed."""
        real = self.host.path(p)
        self.mkdir(str(Path(p).parent))
        try:
            old: str | None = real.read_text()
        except FileNotFoundError:
            old = None
        if p not in self.files and (old is None or old == text or replace):
            self.files.append(p)
        if old == text or (old is not None and not replace):
            return False
        tmp = real.with_name(f".{real.name}.tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, real)
        self.changed.append(p)
        return True

    def link(self, p: str, target: str) -> bool:
        real = self.host.path(p)
        self.mkdir(str(Path(p).parent))
        if real.is_symlink() and os.readlink(real) == target:
            if p not in self.files:
                self.files.append(p)
            return False
        if real.exists() and not real.is_symlink():
            raise InstallError(f"{real} exists and is not a link: not replacing it")
        if real.is_symlink():
            real.unlink()
        real.symlink_to(target)
        if p not in self.files:
            self.files.append(p)
        self.changed.append(p)
        return True

    def save(self) -> None:
        """The manifest lists itself, so uninstall removes it too; rewriting it is no change."""
        self.mkdir(str(Path(MANIFEST).parent))
        if MANIFEST not in self.files:
            self.files.append(MANIFEST)
        data = {"files": self.files, "dirs": self.dirs}
        real = self.host.path(MANIFEST)
        tmp = real.with_name(f".{real.name}.tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, real)


def install(
    root: str = "/", *, config_file: str | None = None, python: str | None = None, start: bool = True
) -> dict[str, Any]:
    """Install (idempotently); returns what changed and how the agent runs."""
    host = Host(Path(root))
    if not host.root.is_dir():
        raise InstallError(f"{root}: no such directory")
    python = python or sys.executable
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as err:
            raise InstallError(f"cannot read {config_file}: {err.strerror or err}") from None
        check_config(text, config_file)
    else:
        text = default_config()
    rec = _Recorder(host, _read_manifest(host))
    rec.file(CONFIG, text, 0o600, replace=config_file is not None)
    cfg = check_config(host.path(CONFIG).read_text(), str(host.path(CONFIG)))
    rec.file(UNIT, unit_text(python))
    command = hostagent_command(python)
    if command is not None:
        rec.link(LINK, command)
    systemd = has_systemd() and not host.staging
    if not systemd:  # enabled as `systemctl enable` would, for when this root boots with systemd
        rec.link(WANTS, f"../{UNIT_NAME}")
    if not host.staging:  # run-time directories (tmpfs at boot: not staged)
        for d in (
            str(Path(PIDFILE).parent),
            str(Path(LOG).parent),
            str(Path(cfg.control.socket).parent),
            cfg.pool.arena_dir,
        ):
            rec.mkdir(d)
    rec.save()
    result: dict[str, Any] = {
        "root": str(host.root),
        "changed": rec.changed,
        "config": CONFIG,
        "unit": UNIT,
        "systemd": systemd,
    }
    if not start or host.staging:
        result["running"] = None
        return result
    restart = bool({CONFIG, UNIT} & set(rec.changed))
    if systemd:
        _systemctl("daemon-reload")
        _systemctl("enable", "--now", UNIT_NAME)
        if restart:
            _systemctl("try-restart", UNIT_NAME)
        result["running"] = "systemd"
    else:
        pid = _daemon_pid(host)
        if pid is not None and restart:
            _stop_daemon(host, pid)
            pid = None
        started = pid is None
        if pid is None:
            pid = _start_daemon(host, python, cfg)
        result["running"] = {"pid": pid, "started": started, "pidfile": PIDFILE, "log": LOG}
    result["control"] = cfg.control.socket
    return result


def uninstall(root: str = "/", *, keep_config: bool = False) -> dict[str, Any]:
    """Stop the agent and remove what install created; nothing installed is no error."""
    host = Host(Path(root))
    manifest = _read_manifest(host)
    if not manifest["files"] and not host.path(MANIFEST).exists():
        return {"root": str(host.root), "removed": [], "installed": False}
    cfg = configmod.Config()
    with contextlib.suppress(OSError, InstallError):
        cfg = check_config(host.path(CONFIG).read_text(), CONFIG)
    removed: list[str] = []
    if not host.staging:
        if has_systemd() and host.path(UNIT).exists():
            _systemctl("disable", "--now", UNIT_NAME, check=False)
        pid = _daemon_pid(host)
        if pid is not None:
            _stop_daemon(host, pid)
        # What a stopped (or killed) agent may leave: its control socket and its arena.
        for p in (cfg.control.socket, str(Path(cfg.pool.arena_dir) / "arena"), PIDFILE, LOG):
            if not is_listening(p) and _remove(host.path(p)):
                removed.append(p)
    for p in manifest["files"]:
        if keep_config and p == CONFIG:
            continue
        if _remove(host.path(p)):
            removed.append(p)
    for d in sorted(manifest["dirs"], key=lambda d: -len(Path(d).parts)):
        with contextlib.suppress(OSError):  # not empty: someone else's files are there too
            host.path(d).rmdir()
            removed.append(d + "/")
    if not host.staging and has_systemd():
        _systemctl("daemon-reload", check=False)
    return {"root": str(host.root), "removed": removed, "installed": True}


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except IsADirectoryError:
        shutil.rmtree(path)
    return True


def _systemctl(*args: str, check: bool = True) -> None:
    proc = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise InstallError(f"systemctl {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")


def _daemon_pid(host: Host) -> int | None:
    """The pid in the pid file, if that process is alive and is a host agent."""
    try:
        pid = int(host.path(PIDFILE).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    return pid if b"hostagent" in cmdline and b"run" in cmdline else None


def _start_daemon(host: Host, python: str, cfg: configmod.Config) -> int:
    if is_listening(cfg.control.socket):
        raise InstallError(
            f"another host agent already serves {cfg.control.socket} (not ours: "
            f"no live pid in {PIDFILE}); stop it first"
        )
    log = host.path(LOG)
    with open(log, "ab") as out:
        os.chmod(log, 0o600)
        proc = subprocess.Popen(
            [
                python,
                "-m",
                "hostagent",
                "run",
                "--config",
                str(host.path(CONFIG)),
                "--pid-file",
                str(host.path(PIDFILE)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd="/",
        )
    deadline = time.monotonic() + START_TIMEOUT
    while not is_listening(cfg.control.socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise InstallError("the host agent did not start: " + " | ".join(tail))
        time.sleep(0.1)
    _say(f"host agent running as a daemon: pid {proc.pid}, log {LOG}")
    return proc.pid


def _stop_daemon(host: Host, pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                break
            time.sleep(0.1)
        else:
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
