"""scripts/bench_seed.config_lab: each configuration's lab description (pure: no lab is started)."""

from __future__ import annotations

import pytest

from scripts import bench_seed, lab

BASE = lab.load_lab(bench_seed.DEFAULT_LAB)
LEAN = {"tmem-1": 235, "tmem-2": 234, "tmem-3": 233}


def test_only_tmem_has_the_balloon_controller_and_the_pool_swap_device() -> None:
    tmem = bench_seed.config_lab(BASE, "tmem", None)
    assert tmem.host["balloon"] == {"enabled": True}  # the defaults: the 64 MiB reserve
    assert lab.swap_mib(tmem) > 0
    for name in ("plain", "plain_lean", "host_cache", "zswap"):
        other = bench_seed.config_lab(BASE, name, LEAN)
        assert "balloon" not in other.host and lab.swap_mib(other) == 0, name


def test_lean_configurations_boot_at_tmems_end_memory_and_only_host_cache_caches() -> None:
    plain = bench_seed.config_lab(BASE, "plain", None)
    assert [g.memory_mib for g in plain.guests] == [g.memory_mib for g in BASE.guests]
    for name in ("plain_lean", "host_cache", "zswap"):
        spec = bench_seed.config_lab(BASE, name, LEAN)
        assert {g.name: g.memory_mib for g in spec.guests} == LEAN
        assert {g.disk_cache for g in spec.guests} == {"writeback" if name == "host_cache" else "none"}
        assert all(g.read_iops_sec == 200 and g.write_iops_sec == 200 for g in spec.guests)


def test_a_lean_configuration_without_tmems_memory_is_refused() -> None:
    with pytest.raises(lab.LabError, match="run tmem first"):
        bench_seed.config_lab(BASE, "plain_lean", None)
