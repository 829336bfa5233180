"""RunTotals: the one typed record of a run's counters (engines, real runner, metrics)."""
from __future__ import annotations

import pytest

from expertsim.policies.records import RunTotals


def test_run_totals_is_typed_and_round_trips():
    totals = RunTotals()
    totals.h2d_bytes += 10
    with pytest.raises(AttributeError):
        totals.h2d_byte = 1  # a misspelt counter fails instead of becoming a new key
    saved = totals.as_dict()
    assert saved["h2d_bytes"] == 10 and saved["stall_ns"] == 0
    assert RunTotals.from_dict({**saved, "from_an_older_file": 3}) == totals


def test_des_and_fast_engine_fill_the_same_record(tmp_path):
    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces.synth import uniform_trace

    model, hardware = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie")
    trace = uniform_trace(model.num_moe_layers, model.num_experts, model.top_k, 4, 6, seed=1, model=model.name)
    results = [Simulation(model, hardware, make_policy("lru"), CacheConfig(per_layer=3),
                          options=SimOptions(engine=engine, bounds=False)).run(trace) for engine in ("des", "fast")]
    keys = ("h2d_gb", "h2d_copies", "stall_s", "expert_compute_s", "dense_compute_s")
    assert [results[0].metrics[k] for k in keys] == [results[1].metrics[k] for k in keys]
    assert results[0].metrics["h2d_copies"] > 0
