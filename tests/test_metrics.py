"""The Prometheus endpoint of a real host agent, scraped over HTTP and parsed with
prometheus_client's own text parser; its values must be those of `hostagent stats --json`."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from guestagent.protocol.wire import PoolFlag
from hostagent import metrics
from tests.support.host_agent import HostAgentProcess, stats_json
from tests.support.wire_guest import connected, page

PERSISTENT = int(PoolFlag.PERSISTENT)


@pytest.fixture
def agent(host_agent_stopped: HostAgentProcess) -> HostAgentProcess:
    """A host agent with the endpoint on (port 0: a free port, read back from stats)."""
    path = host_agent_stopped.config_path
    path.write_text(
        path.read_text().replace(
            "[libvirt]", '[metrics]\nenabled = true\naddress = "127.0.0.1"\nport = 0\n[libvirt]'
        )
    )
    host_agent_stopped.start()
    return host_agent_stopped


def url(agent: HostAgentProcess, path: str = "/metrics") -> str:
    m = agent.stats()["agent"]["metrics"]
    return f"http://{m['address']}:{m['port']}{path}"


def scrape(agent: HostAgentProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url(agent), timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def load(agent: HostAgentProcess) -> None:
    """Some traffic from g1 (both kinds) and g2, then quiet: the counters stand still."""
    with connected(agent, "g1") as g:
        eph, pers = g.new_pool(0), g.new_pool(PERSISTENT)
        for i in range(20):
            g.put(eph, 1, i, page(i, compressible=i % 2 == 0))
        for i in range(7):
            g.put(pers, 2, i, page(100 + i))
        for i in range(5):
            assert g.get(eph, 1, i) is not None
        assert g.get(eph, 9, 0) is None
        with connected(agent, "g2") as g2:
            p2 = g2.new_pool(0)
            g2.put(p2, 3, 0, page(7))
        # g1 is still connected here, g2 is not
        yield_point(agent)


def yield_point(agent: HostAgentProcess) -> None:
    """Wait until the agent has noticed g2's close (connected flags are part of the comparison)."""
    deadline = time.monotonic() + 5
    while agent.stats()["guests"]["g2"]["connected"]:
        assert time.monotonic() < deadline, "g2 still connected"
        time.sleep(0.02)
    samples = scrape(agent)
    stats = stats_json(agent)
    compare(samples, stats)


def compare(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], stats: dict[str, Any]) -> None:
    pool = stats["pool"]
    for name, key in (
        ("tmem_pool_limit_bytes", "limit_bytes"),
        ("tmem_pool_used_bytes", "used_bytes"),
        ("tmem_pool_budget_bytes", "budget_bytes"),
        ("tmem_pools", "pools"),
        ("tmem_pool_evictions_total", "evictions"),
        ("tmem_pool_compactions_total", "compactions"),
    ):
        assert samples[(name, ())] == pool[key], name
    for kind in ("ephemeral", "persistent"):
        assert samples[("tmem_pool_pages", (("kind", kind),))] == pool[f"{kind}_pages"]
    assert pool["ephemeral_pages"] > 0 and pool["persistent_pages"] == 7
    for gname, g in stats["guests"].items():
        labels = (("domain", gname), ("uuid", ""))
        assert samples[("tmem_guest_connected", labels)] == (1 if g["connected"] else 0)
        assert samples[("tmem_guest_quota_bytes", labels)] == g["quota_bytes"]
        for kind in ("ephemeral", "persistent"):
            kl = (("domain", gname), ("kind", kind), ("uuid", ""))
            for name, field in (
                ("puts_total", "puts"),
                ("gets_total", "gets"),
                ("hits_total", "hits"),
                ("flushes_total", "flushes"),
                ("puts_refused_total", "puts_refused"),
                ("evicted_pages_total", "evicted"),
                ("pages", "pages"),
                ("stored_bytes", "bytes"),
            ):
                assert samples[(f"tmem_guest_{name}", kl)] == g[kind][field], (gname, kind, name)
    assert samples[("tmem_guest_connected", (("domain", "g1"), ("uuid", "")))] == 1
    assert samples[("tmem_guest_puts_total", (("domain", "g1"), ("kind", "ephemeral"), ("uuid", "")))] == 20


def test_scrape_matches_stats_json(agent: HostAgentProcess) -> None:
    load(agent)
    assert agent.stats()["agent"]["metrics"]["scrapes"] >= 1


def test_names_follow_prometheus_conventions(agent: HostAgentProcess) -> None:
    with urllib.request.urlopen(url(agent), timeout=10) as resp:
        text = resp.read().decode()
    families = list(text_string_to_metric_families(text))
    assert families
    for fam in families:
        assert fam.name.startswith("tmem_"), fam.name
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name.endswith("_total") or s.name.endswith("_created"), s.name
            else:
                assert not s.name.endswith("_total"), s.name
        # a unit, if any, is a base unit
        assert not any(u in fam.name for u in ("_kib", "_mib", "_kb", "_ms")), fam.name


def test_bad_requests_get_errors_and_the_agent_keeps_serving(agent: HostAgentProcess) -> None:
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url(agent, "/nothing"), timeout=10)
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url(agent), data=b"x", method="POST"), timeout=10)
    assert e.value.code == 405
    m = agent.stats()["agent"]["metrics"]
    with socket.create_connection((m["address"], m["port"]), timeout=10) as s:
        s.sendall(b"\x00\xff garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    # a client that connects and says nothing holds one connection, not the loop
    idle = socket.create_connection((m["address"], m["port"]), timeout=10)
    try:
        t0 = time.monotonic()
        assert agent.stats()["pool"]["limit_bytes"] > 0
        assert scrape(agent)
        assert time.monotonic() - t0 < 2
    finally:
        idle.close()
    assert agent.alive


def test_metrics_config_is_checked() -> None:
    from hostagent import config as configmod

    assert configmod.parse({}).metrics == configmod.MetricsConfig(False, "127.0.0.1", 9787)
    assert configmod.parse({"metrics": {"enabled": True, "port": 0}}).metrics.port == 0
    for bad, key in (
        ({"address": ""}, "metrics.address"),
        ({"port": 65536}, "metrics.port"),
        ({"enabled": "yes"}, "metrics.enabled"),
        ({"path": "/x"}, "metrics.path"),
    ):
        with pytest.raises(configmod.ConfigError, match=key):
            configmod.parse({"metrics": bad})


def test_off_by_default(host_agent: HostAgentProcess) -> None:
    assert host_agent.stats()["agent"]["metrics"] is None
    assert "metrics" not in host_agent.log()


def test_families_label_domains_by_name_and_uuid() -> None:
    """Pure: a libvirt domain's series carry its name and UUID; report values are in bytes."""
    uuid = "0b7c3f5e-1111-2222-3333-444455556666"
    stats = {
        "pool": {"limit_bytes": 1, "ephemeral_pages": 2, "persistent_pages": 3},
        "guests": {
            uuid: {
                "name": "web1",
                "uuid": uuid,
                "connected": True,
                "quota_bytes": 5,
                "ephemeral": {"puts": 9, "pages": 2},
                "persistent": {"puts": 4},
                "report": {"values": {"committed_as_kib": 10, "precache_hits": 3}},
                "domain": {"actual_kib": 2, "max_kib": 4, "cpu_seconds": 1.5},
            }
        },
        "agent": {"cpu_seconds": 0.5},
    }
    text = metrics.render(stats).decode()
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    lab = (("domain", "web1"), ("uuid", uuid))
    assert got[("tmem_guest_puts_total", (("domain", "web1"), ("kind", "ephemeral"), ("uuid", uuid)))] == 9
    assert got[("tmem_guest_committed_as_bytes", lab)] == 10 * 1024
    assert got[("tmem_guest_precache_hits_total", lab)] == 3
    assert got[("tmem_domain_memory_actual_bytes", lab)] == 2048
    assert got[("tmem_domain_cpu_seconds_total", lab)] == 1.5
    assert got[("tmem_agent_cpu_seconds_total", ())] == 0.5


@pytest.fixture
def watch(agent: HostAgentProcess) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        agent.cli_argv("stats", "--watch", "0.3", "--compact"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def test_stats_watch_compact_appends_lines_without_escape_codes(
    agent: HostAgentProcess, watch: subprocess.Popen[str]
) -> None:
    time.sleep(0.5)
    with connected(agent, "g1") as g:
        pool = g.new_pool(0)
        for i in range(30):
            g.put(pool, 1, i, page(i))
        time.sleep(1.2)
    watch.terminate()
    out, _ = watch.communicate(timeout=10)
    assert "\x1b" not in out
    lines = out.splitlines()
    pool_lines = [ln for ln in lines if " pool used " in ln]
    g1 = [ln for ln in lines if " g1 " in ln]
    assert len(pool_lines) >= 4 and len(g1) == len(pool_lines), out
    assert any(" put/s " in ln for ln in g1), out  # rates once there is a previous sample
    assert any(" up " in ln and " eph 30p " in ln for ln in g1), out
    assert all(ln[:8].count(":") == 2 for ln in lines), out  # each line starts with the time


def test_stats_json_watch_is_one_object_per_line(agent: HostAgentProcess) -> None:
    proc = subprocess.Popen(
        agent.cli_argv("stats", "--watch", "0.2", "--json"),
        stdout=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    rows = [json.loads(ln) for ln in out.splitlines()]
    assert len(rows) >= 2 and all("pool" in r for r in rows)


@pytest.mark.parametrize("append", [False, True])
def test_stats_watch_on_a_terminal_redraws_unless_append(agent: HostAgentProcess, append: bool) -> None:
    """On a terminal the table is redrawn (clear screen); --append keeps every sample."""
    import pty

    main, sub = pty.openpty()
    proc = subprocess.Popen(
        agent.cli_argv("stats", "--watch", "0.2", *(["--append"] if append else [])),
        stdout=sub,
        stderr=subprocess.DEVNULL,
    )
    os.close(sub)
    out = b""
    deadline = time.monotonic() + 30  # two samples, however slow a busy machine starts Python
    while out.count(b"pool: ") < 2 and time.monotonic() < deadline:
        if select.select([main], [], [], 1.0)[0]:
            out += os.read(main, 65536)
    proc.terminate()
    proc.wait(10)
    os.close(main)
    assert out.count(b"pool: ") >= 2, out
    assert (b"\x1b[2J" in out) is not append
