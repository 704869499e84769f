"""One lab guest as a handle: commands run in it through qemu-guest-agent (checked or not), its
guest agent's stats and config, its kernel's counters, and the host agent's view of it.

Every call looks the domain up afresh: a libvirtd restart (tests do that) invalidates connections.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from scripts import lab
from scripts.wait import wait_until

GUESTAGENT = "/usr/local/bin/guestagent"
AGENT_CONFIG = "/etc/tmem/guestagent.toml"
AGENT_UNIT = "tmem-guestagent"
# Programs sent to the guest import the project from the image's copy, not from a path they insert.
PYTHON = ("env", "PYTHONPATH=/opt/tmem", "python3")
POLL = 0.5  # seconds between looks at a guest: every look is a guest-exec round trip


class GuestCommandFailed(lab.LabError):
    """A command in the guest exited non-zero; the message has its output."""


@dataclasses.dataclass(frozen=True)
class DiskStat:
    """/sys/block/DEV/stat: requests completed and bytes read (the kernel counts 512-byte sectors)."""

    reads: int
    read_bytes: int
    writes: int


@dataclasses.dataclass(frozen=True)
class Guest:
    name: str

    # -- commands ---------------------------------------------------------------------------------

    def domain(self) -> Any:
        return lab.connect().lookupByName(self.name)

    def exec(self, *argv: str, timeout: float = 120, stdin: bytes | None = None) -> tuple[int, str, str]:
        """Run a command in the guest; (exit code, stdout, stderr), whatever the exit code."""
        return lab.guest_exec(self.domain(), list(argv), timeout=timeout, stdin=stdin)

    def run(self, *argv: str, timeout: float = 120, stdin: bytes | str | None = None) -> str:
        """Run a command in the guest and return its stdout; GuestCommandFailed unless it exits 0."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        rc, out, err = self.exec(*argv, timeout=timeout, stdin=data)
        if rc != 0:
            raise GuestCommandFailed(
                f"{self.name}: {' '.join(argv)} exited {rc}: {(out + err).strip()[-2000:]}"
            )
        return out

    def python(self, program: bytes | str, *args: str, timeout: float = 120) -> str:
        """Run a Python program (its text) in the guest, checked; the project is importable."""
        return self.run(*PYTHON, "-", *args, timeout=timeout, stdin=program)

    def spawn(self, *argv: str, stdin: bytes | str | None = None) -> int:
        """Start a command in the guest; its pid, for `wait`."""
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return lab.guest_spawn(self.domain(), list(argv), stdin=data)

    def wait(self, pid: int, timeout: float = 120, what: str = "") -> tuple[int, str, str]:
        """Wait for a command started by `spawn`; (exit code, stdout, stderr)."""
        return lab.guest_wait(self.domain(), pid, timeout, what)

    def wait_until(self, cond: Callable[[], object], timeout: float, what: str) -> float:
        """`wait_until` at a pace a guest can answer; the message names the guest."""
        return wait_until(cond, timeout, f"{self.name}: {what}", interval=POLL)

    def wait_qemu_agent(self, timeout: float = lab.HANDSHAKE_TIMEOUT) -> None:
        lab.wait_guest_agent(self.domain(), timeout)

    # -- the guest agent --------------------------------------------------------------------------

    def agent_stats(self) -> dict[str, Any]:
        """`guestagent stats` in the guest; {} while its daemon is not answering (restarting)."""
        rc, out, _ = self.exec(GUESTAGENT, "stats", timeout=60)
        result: dict[str, Any] = json.loads(out) if rc == 0 else {}
        return result

    def agent_check(self) -> dict[str, Any]:
        """`guestagent check`: pages put and got over the real port; it must say ok."""
        result: dict[str, Any] = json.loads(self.run(GUESTAGENT, "check"))
        if result.get("ok") is not True:
            raise GuestCommandFailed(f"{self.name}: guestagent check: {result}")
        return result

    def agent_pid(self) -> str:
        """The guest agent unit's main pid as systemd says it ("0" when it is not running)."""
        return self.run("systemctl", "show", "-p", "MainPID", "--value", AGENT_UNIT).strip()

    def agent_systemctl(self, *args: str) -> str:
        """systemctl ARGS, for a command that ends the running guest agent (stop, restart, kill):
        run in the daemon's own mount namespace, where /usr is the tree underneath.  Exec'd through
        the daemon's precache mount over /usr, systemctl could die of SIGBUS paging its code in
        after the daemon it stopped is gone (docs/precache.md, limits).  nsenter execs systemctl in
        place, so nothing of the mount stays mapped."""
        pid = self.agent_pid()
        if pid not in ("", "0"):
            rc, out, err = self.exec("nsenter", f"--mount=/proc/{pid}/ns/mnt", "systemctl", *args)
            if rc == 0:
                return out
            if not err.startswith("nsenter:"):
                raise GuestCommandFailed(f"{self.name}: systemctl {' '.join(args)} exited {rc}: {out}{err}")
        return self.run("systemctl", *args)  # no daemon, or it went before nsenter could enter

    def restart_agent(self) -> None:
        self.agent_systemctl("restart", AGENT_UNIT)

    def stop_agent(self) -> None:
        self.agent_systemctl("stop", AGENT_UNIT)

    def start_agent(self) -> None:
        self.run("systemctl", "start", AGENT_UNIT)

    def read_agent_config(self) -> str:
        return self.run("cat", AGENT_CONFIG)

    def write_agent_config(self, text: str | None) -> None:
        """Write the guest agent's config (None: remove it, so every key has its default) and
        restart the daemon with it."""
        if text is None:
            self.run("rm", "-f", AGENT_CONFIG)
        else:
            self.run("mkdir", "-p", "/etc/tmem", "/var/lib/tmem")
            self.run("sh", "-c", f"cat > {AGENT_CONFIG}", stdin=text)
        self.restart_agent()

    # -- the guest kernel's counters --------------------------------------------------------------

    def drop_caches(self) -> None:
        self.run("sh", "-c", "sync; echo 3 > /proc/sys/vm/drop_caches")

    def disk_stat(self, device: str = "vda") -> DiskStat:
        fields = self.run("cat", f"/sys/block/{device}/stat").split()
        return DiskStat(reads=int(fields[0]), read_bytes=int(fields[2]) * 512, writes=int(fields[4]))

    def vmstat(self) -> dict[str, int]:
        return _counters(self.run("cat", "/proc/vmstat"), " ")

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo in KiB (the kernel's "kB")."""
        return _counters(self.run("cat", "/proc/meminfo"), ":")

    # -- the host agent's view --------------------------------------------------------------------

    def host_stats(self) -> dict[str, Any]:
        """This guest's entry in the host agent's stats (AssertionError if it has none)."""
        found = [g for g in lab.stats()["guests"].values() if g.get("name") == self.name]
        assert found, f"{self.name} is not known to the host agent"
        result: dict[str, Any] = found[0]
        return result

    def reported(self) -> dict[str, int]:
        """The counters of the guest agent's last report to the host ({} before the first)."""
        report = self.host_stats()["report"]
        return dict(report["values"]) if report else {}

    def connected(self) -> bool:
        """True if the host agent has this guest's channel up (False while the agent is away)."""
        try:
            return bool(self.host_stats()["connected"])
        except (AssertionError, OSError):
            return False


def _counters(text: str, sep: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(sep)
        if value.split():
            out[key.strip()] = int(value.split()[0])
    return out
