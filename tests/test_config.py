"""Host agent configuration: defaults, the example file, and clear errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from hostagent import config
from hostagent.config import ConfigError

EXAMPLE = Path(config.__file__).with_name("hostagent.example.toml")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hostagent.toml"
    p.write_text(text)
    return p


def test_empty_document_is_all_defaults() -> None:
    c = config.parse({})
    assert c == config.Config()
    assert c.pool.limit_mib == 1024 and c.pool.host_reserve_mib == 1024
    assert c.pool.arena_dir == "/dev/shm/tmem" and c.pool.sample_interval == 1.0
    assert c.control.socket == "/run/tmem/control.sock"
    assert (c.channels.dir, c.channels.max_payload, c.channels.max_vector) == (
        "/run/tmem/guests",
        1 << 20,
        64,
    )
    assert c.defaults == config.GuestDefaults(weight=1, cap_mib=0, quota_mib=256, compress=True)
    assert c.guests == () and c.shared_pools == ()


def test_example_file_documents_exactly_the_defaults() -> None:
    c = config.load(EXAMPLE)
    assert c == config.Config()  # every value shown is the default; guests are commented out


def test_example_file_commented_guests_are_valid(tmp_path: Path) -> None:
    # Uncommenting the example's [[guest]] and [[shared_pool]] tables gives a valid file.
    text = EXAMPLE.read_text()
    head, tail = text.split("# [[guest]]", 1)
    tail = re.sub(r"^# (?=\[\[|\w+ = )", "", "# [[guest]]" + tail, flags=re.MULTILINE)
    c = config.load(write(tmp_path, head + tail))
    assert [g.name for g in c.guests] == ["g1", "g2"]
    assert c.guest("g1") is not None and c.guest("g1").weight == 3  # type: ignore[union-attr]
    assert c.shared_pools[0].guests == ("g1", "g2")


def test_guests_inherit_defaults_and_get_a_socket_in_the_channel_dir(tmp_path: Path) -> None:
    c = config.load(
        write(
            tmp_path,
            """
[channels]
dir = "/run/x"
[defaults]
weight = 2
quota_mib = 64
compress = false
[[guest]]
name = "g1"
[[guest]]
name = "g2"
socket = "/srv/g2.sock"
weight = 5
cap_mib = 100
compress = true
""",
        )
    )
    g1, g2 = c.guests
    assert g1 == config.GuestConfig(
        name="g1", socket="/run/x/g1.sock", weight=2, cap_mib=0, quota_mib=64, compress=False
    )
    assert g2 == config.GuestConfig(
        name="g2", socket="/srv/g2.sock", weight=5, cap_mib=100, quota_mib=64, compress=True
    )
    assert c.guest("g2") == g2 and c.guest("nope") is None


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    c = config.load(
        write(
            tmp_path,
            """
[pool]
arena_dir = "arena"
[control]
socket = "ctl.sock"
[channels]
dir = "guests"
[[guest]]
name = "a"
[[guest]]
name = "b"
socket = "b/b.sock"
""",
        )
    )
    base = tmp_path.resolve()
    assert c.pool.arena_dir == str(base / "arena")
    assert c.control.socket == str(base / "ctl.sock")
    assert [g.socket for g in c.guests] == [str(base / "guests/a.sock"), str(base / "b/b.sock")]


def test_shared_pool_acl() -> None:
    c = config.parse(
        {
            "guest": [{"name": "g1"}, {"name": "g2"}, {"name": "g3"}],
            "shared_pool": [{"uuid": "6f1c2a94-3b5e-4c1d-9a8f-0e2d4b6c8a10", "guests": ["g1", "g2"]}],
        }
    )
    u = bytes.fromhex("6f1c2a943b5e4c1d9a8f0e2d4b6c8a10")
    assert c.shared_pools == (config.SharedPoolConfig(uuid=u, guests=("g1", "g2")),)
    assert c.shared_acl() == {u: frozenset({"g1", "g2"})}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"poool": {}}, "poool"),
    ({"pool": {"limit": 5}}, "pool.limit"),
    ({"pool": {"limit_mib": "1G"}}, "pool.limit_mib"),
    ({"pool": {"limit_mib": 0}}, "pool.limit_mib"),
    ({"pool": {"limit_mib": True}}, "pool.limit_mib"),
    ({"pool": {"host_reserve_mib": -1}}, "pool.host_reserve_mib"),
    ({"pool": {"sample_interval": 0}}, "pool.sample_interval"),
    ({"pool": {"arena_dir": 3}}, "pool.arena_dir"),
    ({"pool": 3}, "pool"),
    ({"control": {"socket": ""}}, "control.socket"),
    ({"control": {"socket": "/" + "x" * 200}}, "control.socket"),
    ({"channels": {"max_payload": 100}}, "channels.max_payload"),
    ({"channels": {"max_vector": 0}}, "channels.max_vector"),
    ({"channels": {"max_payload": 65536, "max_vector": 64}}, "channels.max_vector"),
    ({"defaults": {"weight": 0}}, "defaults.weight"),
    ({"defaults": {"cap_mib": -1}}, "defaults.cap_mib"),
    ({"defaults": {"compress": "yes"}}, "defaults.compress"),
    ({"defaults": {"colour": 1}}, "defaults.colour"),
    ({"guest": {"name": "g1"}}, "guest"),
    ({"guest": [{}]}, "guest[0].name"),
    ({"guest": [{"name": "bad/name"}]}, "guest[0].name"),
    ({"guest": [{"name": "-x"}]}, "guest[0].name"),
    ({"guest": [{"name": "g" * 65}]}, "guest[0].name"),
    ({"guest": [{"name": "g1", "weigth": 2}]}, "guest 'g1'.weigth"),
    ({"guest": [{"name": "g1", "quota_mib": -5}]}, "guest 'g1'.quota_mib"),
    ({"guest": [{"name": "g1"}, {"name": "g1"}]}, "guest 'g1'"),
    ({"guest": [{"name": "g1", "socket": "/s"}, {"name": "g2", "socket": "/s"}]}, "guest 'g2'.socket"),
    ({"control": {"socket": "/s"}, "guest": [{"name": "g1", "socket": "/s"}]}, "control.socket"),
    ({"shared_pool": [{"uuid": "nope", "guests": []}]}, "shared_pool[0].uuid"),
    (
        {"shared_pool": [{"uuid": "00000000-0000-0000-0000-000000000000", "guests": []}]},
        "shared_pool[0].uuid",
    ),
    ({"shared_pool": [{"uuid": "6f1c2a94-3b5e-4c1d-9a8f-0e2d4b6c8a10"}]}, "shared_pool[0].guests"),
    (
        {"shared_pool": [{"uuid": "6f1c2a94-3b5e-4c1d-9a8f-0e2d4b6c8a10", "guests": ["zz"]}]},
        "shared_pool[0].guests",
    ),
    (
        {"shared_pool": [{"uuid": "6f1c2a94-3b5e-4c1d-9a8f-0e2d4b6c8a10", "guests": [1]}]},
        "shared_pool[0].guests",
    ),
    ({"swap": {"size_mib": 0}}, "swap.size_mib"),
    ({"swap": {"enabled": "yes"}}, "swap.enabled"),
    ({"swap": {"sock": "/x"}}, "swap.sock"),
    ({"swap": {"socket": ""}}, "swap.socket"),
    ({"swap": {"enabled": True, "socket": "/s"}, "control": {"socket": "/s"}}, "swap.socket"),
]


@pytest.mark.parametrize(("doc", "key"), BAD, ids=[key for _, key in BAD])
def test_bad_settings_are_refused_naming_the_key(doc: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert str(info.value).startswith(key + ":") or str(info.value).startswith(key + " "), str(info.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError, match=r"missing\.toml: no such file"):
        config.load(missing)
    bad = write(tmp_path, "[pool\nlimit_mib = 3\n")
    with pytest.raises(ConfigError, match=r"hostagent\.toml: "):
        config.load(bad)
    wrong = write(tmp_path, "[pool]\nlimit_mib = -3\n")
    with pytest.raises(ConfigError, match=r"hostagent\.toml: pool\.limit_mib: must be at least 1"):
        config.load(wrong)
