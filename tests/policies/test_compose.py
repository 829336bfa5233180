"""``compose``: a system from registered parts by name (issue 15's per-part registries)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from expertsim.cli import app
from expertsim.errors import PolicyError
from expertsim.policies import CacheConfig, make_policy, make_system
from expertsim.policies.prefetch import Prefetcher, _requests
from expertsim.policies.registration import PARTS, PREFETCH, register_prefetch
from expertsim.sim import SimOptions, Simulation
from expertsim.specs import load_hardware, load_model

from policy_helpers import make_trace

MODEL = load_model("mixtral-8x7b")
HARDWARE = load_hardware("a100-80gb-pcie")


def _trace(tokens=60, seed=3):
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(MODEL.num_moe_layers)])
                   for _ in range(tokens)])
    return make_trace(ex, 8, requests=np.repeat(np.arange(3), tokens // 3))


def _metrics(system, trace, slots=3):
    sim = Simulation(MODEL, HARDWARE, system, CacheConfig(per_layer=slots),
                     options=SimOptions(engine="des", bounds=False))
    result = sim.run(trace)
    return result.metrics, result.iterations


def test_compose_defaults_are_plain_lru_and_parts_equal_the_named_system():
    trace = _trace()
    m_compose, it_compose = _metrics(make_system("compose"), trace)
    m_lru, it_lru = _metrics(make_policy("lru"), trace)
    for key in ("hit_rate", "total_s", "h2d_gb", "stall_fraction"):
        assert m_compose[key] == m_lru[key], key
    assert it_compose == it_lru and len(it_compose) == 60  # every per-iteration record
    # Pre-gated MoE is LRU + pre-gated prefetch: the same parts by name give the same run
    composed = make_system("compose", prefetch={"name": "pregated", "distance": 1, "accuracy": 1.0})
    m_c, _ = _metrics(composed, trace)
    m_p, _ = _metrics(make_system("pregated-moe"), trace)
    for key in ("hit_rate", "total_s", "h2d_gb", "stall_fraction"):
        assert m_c[key] == m_p[key], key
    assert m_c["hit_rate"] > m_lru["hit_rate"]  # the prefetch did something


def test_compose_label_names_every_part_with_its_parameters():
    system = make_system("compose", eviction="lfu", prefetch={"name": "ring", "depth": 2}, miss="cpu")
    assert system.label.startswith("compose(eviction=lfu(")
    assert "prefetch=ring(depth=2)" in system.label and "miss=cpu(" in system.label


@pytest.mark.parametrize("params, message", [
    ({"prefetch": "pregatd"}, "unknown prefetch 'pregatd'. Did you mean pregated"),
    ({"miss": {"name": "skip", "max_wieght": 0.2}}, "unknown max_wieght=0.2. Did you mean max_weight"),
    ({"eviction": {"distance": 2}}, "eviction must be a name or a table with a name"),
    ({"scheduler": "round-robin"}, "unknown scheduler 'round-robin'. Known: cache-aware, fifo, route-group"),
    ({"prefetch": {"name": "pregated", "accuracy": float("nan")}}, "not a finite number"),
    ({"miss": {"name": "skip", "max_weight": 2.0}}, "max_weight must be a gate weight in"),
    ({"scheduler": {"name": "route-group", "unknown_cost": -3}}, "unknown_cost must be a count of experts >= 0"),
])
def test_bad_parts_are_one_line_errors(params, message):
    with pytest.raises(PolicyError, match=message):
        make_system("compose", **params)


def test_a_plugin_prefetcher_is_a_part_without_editing_any_list():
    @register_prefetch("test-next-layer-01")
    class NextLayer01(Prefetcher):
        """Experts 0 and 1 of the next layer (a test plug-in)."""

        def prefetch(self, obs):
            if obs.layer + 1 >= obs.cache.num_layers:
                return []
            return _requests(obs.layer + 1, np.array([0, 1]), 1)

    try:
        ex = np.tile(np.array([0, 1]), (6, MODEL.num_moe_layers, 1))  # every token uses experts 0 and 1
        trace = make_trace(ex, 8, requests=np.zeros(6, dtype=int))
        plain, _ = _metrics(make_policy("lru"), trace)
        prefetched, _ = _metrics(make_system("compose", prefetch="test-next-layer-01"), trace)
        # LRU misses the first token's 32 layers; the plug-in loads layers 1..31 ahead of use
        assert plain["hit_rate"] == pytest.approx(1 - 1 / 6)
        assert prefetched["hit_rate"] == pytest.approx(1 - 1 / (6 * MODEL.num_moe_layers))
        rows = json.loads(CliRunner().invoke(app, ["policies", "list", "--json"]).stdout)
        assert next(r for r in rows if r["name"] == "test-next-layer-01")["kind"] == "prefetch"
    finally:
        PREFETCH.pop("test-next-layer-01", None)


def test_policies_list_shows_every_part_table():
    result = CliRunner().invoke(app, ["policies", "list", "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    for kind, table in PARTS.items():
        listed = {r["name"] for r in rows if r["kind"] == kind}
        assert listed == set(table) and listed, kind
    assert {"pregated", "ring", "eam", "learned"} <= {r["name"] for r in rows if r["kind"] == "prefetch"}


def test_compose_through_the_cli_with_a_table_parameter(tmp_path):
    from expertsim.traces import write_trace

    path = tmp_path / "t.parquet"
    write_trace(_trace(tokens=15), path)
    result = CliRunner().invoke(app, ["simulate", "-t", str(path), "-m", "mixtral-8x7b", "-H", "a100-80gb-pcie",
                                      "--system", "compose", "--param", "eviction=lfu",
                                      "--param", 'prefetch={name="pregated", distance=2}', "--per-layer", "3",
                                      "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    row = rows[0] if isinstance(rows, list) else rows
    assert "prefetch=pregated(distance=2" in json.dumps(row)
