"""Each cost term against hand arithmetic (tiny model and hardware with round numbers)."""
from __future__ import annotations

import json

import pytest
from simhelpers import tiny_hardware, tiny_model

from expertsim.errors import ConfigError
from expertsim.sim.cost import CostModel, CostProfile, LinkCurve

# Expert: 3 x 1000 x 2000 = 6e6 params, 12e6 bytes; link 12 GB/s + 10 us.
EXPERT_BYTES = 12_000_000


def cost(**hw):
    return CostModel(tiny_model(), tiny_hardware(**hw))


def test_transfer_time_is_overhead_plus_bytes_over_bandwidth():
    c = cost()
    assert c.transfer_time_ns(EXPERT_BYTES) == 10_000 + 1_000_000  # 12e6 B / 12e9 B/s = 1 ms
    assert c.transfer_time_ns(0) == 0
    # Overhead and wire split the same total: the engine holds a copy engine for the first and
    # the wire for the second.
    assert c.copy_overhead_ns(EXPERT_BYTES) == 10_000
    assert c.copy_wire_ns(EXPERT_BYTES) == 1_000_000


def test_pageable_copies_use_the_pageable_rate():
    c = cost(link={"pinned": False, "pageable_bandwidth_gbps": 6.0})
    assert c.transfer_time_ns(EXPERT_BYTES) == 10_000 + 2_000_000
    c = cost(link={"pinned": False})  # 0 = half of pinned
    assert c.transfer_time_ns(EXPERT_BYTES) == 10_000 + 2_000_000


def test_link_curve_interpolates_bandwidth_by_copy_size():
    curve = LinkCurve(nbytes=(1e6, 10e6, 100e6), gbps=(4.0, 10.0, 20.0))
    c = CostModel(tiny_model(), tiny_hardware(), link_curve=curve)
    assert c.link_bandwidth_gbps(1e6) == 4.0
    assert c.link_bandwidth_gbps(55e6) == pytest.approx(15.0)
    assert c.link_bandwidth_gbps(1e9) == 20.0  # clamped beyond the table
    # 12e6 bytes: 10 + (12-10)/(100-10) x 10 = 10.2222 GB/s -> 12e6 / 10.2222e9 s
    assert c.transfer_time_ns(12_000_000) == 10_000 + round(12e6 / (10 + 2 / 90 * 10) / 1e9 * 1e9)
    # pageable scales the curve by pageable/pinned
    c2 = CostModel(tiny_model(), tiny_hardware(link={"pinned": False}), link_curve=curve)
    assert c2.link_bandwidth_gbps(1e6) == 2.0


def test_link_curve_rejects_bad_tables():
    with pytest.raises(ConfigError, match="increasing"):
        LinkCurve(nbytes=(2.0, 1.0), gbps=(1.0, 2.0))
    with pytest.raises(ConfigError, match="> 0"):
        LinkCurve(nbytes=(1.0, 2.0), gbps=(1.0, -2.0))


def test_chunks_split_a_copy_and_each_pays_the_overhead():
    c = cost()
    assert c.chunk_sizes(EXPERT_BYTES, None) == [EXPERT_BYTES]
    assert c.chunk_sizes(EXPERT_BYTES, 5_000_000) == [5_000_000, 5_000_000, 2_000_000]
    chunks = c.chunk_sizes(EXPERT_BYTES, 3_000_000)
    assert sum(c.transfer_time_ns(x) for x in chunks) == 4 * 10_000 + 1_000_000
    assert c.chunked_wire_ns(EXPERT_BYTES, 3_000_000) == 1_000_000
    # 4e6 / 12e9 s = 333_333.3 ns, rounded per chunk
    assert c.chunked_wire_ns(EXPERT_BYTES, 4_000_000) == 3 * 333_333


def test_storage_read_is_latency_plus_bytes_over_storage_bandwidth():
    c = cost(storage={"bandwidth_gbps": 6.0, "latency_us": 100.0})
    assert c.storage_read_ns(EXPERT_BYTES) == 100_000 + 2_000_000
    with pytest.raises(ConfigError, match="storage.bandwidth_gbps"):
        cost().storage_read_ns(EXPERT_BYTES)


def test_expert_time_is_a_roofline_in_tokens():
    c = cost()
    # 1 token: memory-bound, 12e6 B / 1000 GB/s = 12 us (FLOPs 1.2e7 / 1e14 = 0.12 us)
    assert c.expert_time_ns(1) == 12_000
    assert c.expert_time_ns(100) == 12_000  # 1.2e9 FLOPs / 1e14 = 12 us: the ridge point
    assert c.expert_time_ns(1000) == 120_000  # compute-bound: 1.2e10 / 1e14 = 120 us
    assert c.expert_time_ns(0) == 0
    c = cost(gpu={"launch_overhead_us": 5.0, "memory_efficiency": 0.5})
    assert c.expert_time_ns(1) == 5_000 + 24_000


def test_low_precision_expert_reads_fewer_bytes_and_pays_dequantisation():
    c = cost()
    # int4: 3e6 bytes -> 3 us; FLOPs 2 x 6e6 (GEMM, 1 token) + 2 x 6e6 (dequant) = 2.4e7 -> 0.24 us
    assert c.expert_time_ns(1, low_precision_dtype="int4") == 3_000
    # at 1000 tokens: (1.2e10 + 1.2e7) / 1e14 = 120.12 us
    assert c.expert_time_ns(1000, low_precision_dtype="int4") == 120_120
    assert c.dequant_time_ns("int4") == 120


def test_dense_layer_time_reads_the_kv_cache():
    c = cost()
    # dense bytes per layer = (6e6 - 2e6 embedding) / 2 layers = 2e6; KV 1000 B/token / 2 layers
    assert c.dense_layer_time_ns(1, 2) == 2_001  # (2e6 + 2 x 500) B / 1e12
    assert c.dense_layer_time_ns(1, 2000) == 3_000  # (2e6 + 1e6) B / 1e12
    # compute-bound prefill of 1000 tokens with context 1000: weights (3e6 - 1e6 embedding) / 2
    # layers = 1e6 params -> 2 x 1e6 x 1000 = 2e9 FLOPs; attention 4 x 8 x 125 x 1000 x 1000 = 4e9
    # FLOPs -> 6e9 / 1e14 = 60 us
    assert c.dense_layer_time_ns(1000, 1000) == 60_000
    # a batch of two requests (500 tokens at context 500 each): pairs = 2 x 500 x 500
    assert c.dense_layer_time_ns(1000, 1000, attention_pairs=500_000) == 40_000  # (2e9 + 2e9) / 1e14
    assert c.dense_layer_time_ns(0, 10) == 0


def test_router_time_is_reported_alone():
    # router weights 1000 x 4 x 2 B = 8000 B -> 8 ns at 1000 GB/s
    assert cost().router_time_ns(1) == 8


def test_cpu_expert_time_includes_activation_copies_both_ways():
    c = cost()
    # weights 12e6 B / 100 GB/s = 120 us; FLOPs 1.2e7 / 1e12 = 12 us; activations 1000 x 2 B
    # over the link: 10 us + 2000 / 12e9 s = 10_167 ns each way
    assert c.cpu_compute_ns(1) == 120_000
    assert c.activation_copy_ns(1) == 10_167
    assert c.cpu_expert_time_ns(1) == 120_000 + 2 * 10_167
    # 1000 tokens: FLOPs 1.2e10 / 1e12 = 12 ms (compute-bound)
    assert c.cpu_compute_ns(1000) == 12_000_000


def _profile_dict():
    return {
        "format": "expertsim-profile", "version": 1, "device": "test", "model": "tiny",
        "copy": {"bytes": [1_000_000, 10_000_000], "ns": [100_000, 1_000_000]},
        "expert": {"tokens": [1, 10], "ns": [10_000, 20_000]},
        "dense": {"tokens": [1, 100], "context": [1, 1000], "ns": [[1_000, 2_000], [5_000, 6_000]]},
        "cpu_expert": {"tokens": [1, 2], "ns": [500_000, 900_000]},
    }


def test_profile_tables_interpolate_and_extrapolate(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(_profile_dict()))
    c = CostModel(tiny_model(), tiny_hardware(), profile=CostProfile.load(path))
    assert c.transfer_time_ns(1_000_000) == 100_000
    assert c.transfer_time_ns(5_500_000) == 550_000  # halfway
    assert c.transfer_time_ns(19_000_000) == 1_900_000  # slope 0.1 ns/B beyond the table
    assert c.transfer_time_ns(10) == 100_000  # never below the first point
    assert c.expert_time_ns(4) == 10_000 + round(3 / 9 * 10_000)
    assert c.dense_layer_time_ns(1, 1000) == 2_000
    assert c.dense_layer_time_ns(100, 500) == 5_000 + round(499 / 999 * 1_000)  # along context
    assert c.dense_layer_time_ns(50, 1) == 1_000 + round(49 / 99 * 4_000)
    assert c.cpu_expert_time_ns(3) == 1_300_000 + 2 * c.activation_copy_ns(3)
    assert c.describe()["source"].startswith("profile")


def test_profile_of_a_shrunk_model_scales_expert_and_dense_times(tmp_path):
    import dataclasses

    data = _profile_dict()
    measured = tiny_model(d_ff_expert=1000)  # half the expert
    spec = dataclasses.asdict(measured)
    spec["moe_layers"] = list(spec["moe_layers"])
    data["model_spec"] = spec
    profile = CostProfile.from_dict(data, model=tiny_model())
    assert profile.expert_scale == 2.0
    c = CostModel(tiny_model(), tiny_hardware(), profile=profile)
    assert c.expert_time_ns(1) == 20_000


def test_bad_profiles_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CostProfile.load(tmp_path / "missing.json")
    bad = _profile_dict()
    del bad["expert"]
    with pytest.raises(ConfigError, match="'expert' is missing"):
        CostProfile.from_dict(bad)
    bad = _profile_dict()
    bad["copy"]["bytes"] = [10, 1]
    with pytest.raises(ConfigError, match="increasing"):
        CostProfile.from_dict(bad)


def test_vectorised_dense_times_equal_the_scalar_ones_for_every_preset():
    """The fast engine's array form of the dense-layer roofline gives the same integer ns as the
    scalar one the DES calls, for every shipped model and GPU (same float operations)."""
    import numpy as np

    from expertsim.specs import list_hardware, list_models, load_hardware, load_model

    tokens = np.repeat(np.array([0, 1, 2, 3, 7, 64, 512, 4096]), 60)
    context = np.tile(np.arange(0, 300_000, 5_000), 8)
    for model in list_models():
        for hardware in list_hardware():
            c = CostModel(load_model(model), load_hardware(hardware))
            want = [c.dense_layer_time_ns(int(t), int(x)) for t, x in zip(tokens, context)]
            assert c.dense_layer_times_ns(tokens, context).tolist() == want, (model, hardware)
