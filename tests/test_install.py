"""`hostagent install|uninstall` into a staging root (the real paths, with the agent started, are
tested in test_lab_deploy.py under the lab's lock): idempotent, and uninstall leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from hostagent import config as configmod
from hostagent import install

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "hostagent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_install_twice_then_uninstall_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    first = cli("install", "--root", str(root), "--json")
    assert first.returncode == 0, first.stderr
    r1 = json.loads(first.stdout)
    assert set(r1["changed"]) == {install.CONFIG, install.UNIT, install.LINK, install.WANTS}
    assert r1["running"] is None  # a staging root: nothing started
    before = {p: (root / p).read_bytes() if (root / p).is_file() else None for p in tree(root)}

    second = cli("install", "--root", str(root), "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["changed"] == []
    assert {p: (root / p).read_bytes() if (root / p).is_file() else None for p in tree(root)} == before

    unit = (root / install.UNIT.lstrip("/")).read_text()
    assert "Type=notify" in unit and "Restart=on-failure" in unit
    assert f"ExecStart={sys.executable} -m hostagent run --config {install.CONFIG}" in unit
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(root / install.UNIT.lstrip("/"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr
    cfg_text = (root / install.CONFIG.lstrip("/")).read_text()
    assert cfg_text == install.default_config()
    cfg = configmod.parse(tomllib.loads(cfg_text))
    assert cfg == configmod.Config() and cfg.metrics.enabled is False  # documented defaults
    assert os.stat(root / install.CONFIG.lstrip("/")).st_mode & 0o077 == 0
    wants = root / install.WANTS.lstrip("/")
    assert os.readlink(wants) == "../tmem-hostagent.service" and wants.resolve().is_file()
    assert os.readlink(root / install.LINK.lstrip("/")) == str(Path(sys.executable).parent / "hostagent")

    gone = cli("uninstall", "--root", str(root))
    assert gone.returncode == 0, gone.stderr
    assert tree(root) == []
    again = cli("uninstall", "--root", str(root))
    assert again.returncode == 0 and "nothing installed" in again.stdout


def test_config_given_replaces_and_a_bad_one_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    bad = tmp_path / "bad.toml"
    bad.write_text("[metrics]\nport = 70000\n")
    res = cli("install", "--root", str(root), "--config", str(bad))
    assert res.returncode == 1 and "metrics.port" in res.stderr, res.stderr
    assert tree(root) == []

    good = tmp_path / "good.toml"
    good.write_text("[metrics]\nenabled = true\nport = 9999\n")
    assert cli("install", "--root", str(root), "--config", str(good)).returncode == 0
    assert (root / install.CONFIG.lstrip("/")).read_text() == good.read_text()
    res = cli("install", "--root", str(root), "--config", str(good), "--json")
    assert json.loads(res.stdout)["changed"] == []
    # without --config an installed (operator-edited) configuration is kept
    assert cli("install", "--root", str(root)).returncode == 0
    assert (root / install.CONFIG.lstrip("/")).read_text() == good.read_text()
    assert cli("uninstall", "--root", str(root), "--keep-config").returncode == 0
    assert tree(root) == ["etc", "etc/tmem", "etc/tmem/hostagent.toml"]


def test_an_existing_configuration_is_not_ours_to_remove(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc/tmem").mkdir(parents=True)
    mine = root / "etc/tmem/hostagent.toml"
    mine.write_text("# the operator's\n[pool]\nlimit_mib = 2048\n")
    assert cli("install", "--root", str(root)).returncode == 0
    assert mine.read_text().startswith("# the operator's")
    assert cli("uninstall", "--root", str(root)).returncode == 0
    assert tree(root) == ["etc", "etc/tmem", "etc/tmem/hostagent.toml"]


def test_the_guest_deb_carries_every_guestagent_module(tmp_path: Path) -> None:
    """The .deb holds the whole guestagent package, subpackages (protocol, channel) included: a
    guest agent missing one cannot start."""
    from hostagent import guestinstall

    deb = guestinstall.build_deb(tmp_path)
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True)
    site = "./usr/lib/python3/dist-packages/guestagent/"
    shipped = {line.split()[-1].removeprefix(site) for line in listing.stdout.splitlines()}
    tree_files = {
        str(p.relative_to(ROOT / "guestagent"))
        for p in (ROOT / "guestagent").rglob("*")
        if p.suffix in (".py", ".toml") and "__pycache__" not in p.parts
    }
    assert tree_files and tree_files <= shipped, sorted(tree_files - shipped)
    assert {"protocol/wire.py", "channel/client.py"} <= shipped
