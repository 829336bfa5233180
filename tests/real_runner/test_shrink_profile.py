"""shrink_model, slice_layers, the numpy bundle, and the profile format (tables, interpolation)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from expertsim.errors import ConfigError
from expertsim.real_runner import interp_ns, load_profile, read_bundle, save_profile, shrink_model, slice_layers, write_bundle
from expertsim.specs import load_model


def test_shrink_model_keeps_routing_and_scales_widths():
    full = load_model("mixtral-8x7b")
    small = shrink_model(full, layers=4, experts_scale=0.125)
    assert (small.num_layers, small.moe_layers, small.num_experts, small.top_k) == (4, (0, 1, 2, 3), 8, 2)
    assert (small.d_model, small.d_ff_expert) == (512, 1792)
    assert small.num_heads // small.num_kv_heads == full.num_heads // full.num_kv_heads
    assert small.expert_bytes() == 3 * 512 * 1792 * 2
    assert small.dtype == "bf16" and shrink_model(full, 2, 0.5, dtype="fp32").dtype == "fp32"
    # KV bytes follow the stand-in's GQA shape: 2 x layers x kv heads x head_dim x bytes.
    assert small.kv_bytes_per_token == 2 * 4 * small.num_kv_heads * 128 * 2
    assert shrink_model(full).expert_bytes() == full.expert_bytes()


def test_shrink_model_first_dense_layer_kept():
    ds = load_model("deepseek-v2-lite")  # layer 0 dense, MoE from layer 1
    small = shrink_model(ds, layers=2, experts_scale=0.25)
    assert small.moe_layers == (1, 2) and small.num_layers == 3


@pytest.mark.parametrize("layers, scale", [(0, 1.0), (33, 1.0), (2, 0.0), (2, 1.5)])
def test_shrink_model_rejects_bad_sizes(layers, scale):
    with pytest.raises(ConfigError):
        shrink_model(load_model("mixtral-8x7b"), layers=layers, experts_scale=scale)


def test_slice_layers_and_bundle_round_trip(tmp_path, tiny_trace, tiny_spec):
    from expertsim.traces.synth import default_trace

    full = default_trace(num_requests=2, decode_tokens=5)
    cut = slice_layers(full, 3)
    assert cut.num_layers == 3 and np.array_equal(cut.experts, full.experts[:, :3])
    path = write_bundle(tmp_path / "b.npz", tiny_trace, tiny_spec, {"layers": 2})
    trace, spec, settings = read_bundle(path)
    assert spec == tiny_spec and settings == {"layers": 2}
    assert np.array_equal(trace.experts, tiny_trace.experts)
    assert np.array_equal(trace.position, tiny_trace.position) and np.array_equal(trace.phase, tiny_trace.phase)


def _profile():
    return {"format": "expertsim-profile", "version": 1, "device": "test", "model": "m", "created": "now",
            "copy": {"bytes": [100, 1000], "ns": [1100, 2000]},
            "copy_pageable": {"bytes": [100, 1000], "ns": [1200, 4000]},
            "expert": {"tokens": [1, 4], "ns": [100, 400]},
            "cpu_expert": {"tokens": [1, 4], "ns": [1000, 4000]},
            "dense": {"tokens": [1, 3], "context": [10, 20], "ns": [[10, 20], [30, 60]]}}


def test_interp_ns_linear_extrapolated_and_clamped():
    p = _profile()
    assert interp_ns(p["copy"], 550) == 1550
    assert interp_ns(p["copy"], 2000) == 3000  # beyond: the last segment's slope
    assert interp_ns(p["copy"], 10) == 1100  # below: the first point (a fixed cost)
    assert interp_ns(p["expert"], 2) == 200
    assert interp_ns(p["dense"], 2, 15) == 30  # bilinear: (15 + 45) / 2
    assert interp_ns(p["dense"], 1, 40) == 40
    with pytest.raises(ConfigError):
        interp_ns(p["dense"], 1)


def test_profile_save_load_and_errors(tmp_path):
    path = save_profile(_profile(), tmp_path / "p.json")
    assert load_profile(path)["copy"]["ns"] == [1100, 2000]
    bad = _profile()
    bad["expert"]["tokens"] = [4, 1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="increasing"):
        load_profile(tmp_path / "bad.json")
    bad = _profile()
    bad["dense"]["ns"] = [[1, 2]]
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    with pytest.raises(ConfigError, match="dense"):
        load_profile(tmp_path / "bad2.json")
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile(tmp_path / "missing.json")


def test_simulator_reads_the_profile_format(tmp_path, tiny_spec):
    """The simulator's cost model reads this format and applies the same interpolation rule."""
    from expertsim.sim.cost import CostProfile

    prof = CostProfile.from_dict(_profile())
    for x in (10, 550, 2000):
        assert round(prof.ns_1d("copy", x)) == interp_ns(_profile()["copy"], x)
    assert round(prof.ns_dense(2, 15)) == interp_ns(_profile()["dense"], 2, 15)
