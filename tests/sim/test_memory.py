"""GPU memory accounting and the errors bad configurations give."""
from __future__ import annotations

import pytest
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.errors import ConfigError, SpecError
from expertsim.policies import CacheConfig, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.specs import apply_overrides, load_hardware, load_model


def sim(hw=None, cache=CacheConfig(per_layer=2), policy="lru", model=None, **options):
    return Simulation(model or tiny_model(), hw or tiny_hardware(), make_policy(policy), cache,
                      options=SimOptions(**options))


def test_peak_memory_adds_dense_kv_workspace_and_cache():
    trace = synthetic_trace(num_requests=2, prompt=4, decode=6)
    r = sim().run(trace)
    # dense 6e6 B + KV 10 tokens x 1000 B + workspace 1e9 + cache 2 layers x 2 slots x 12e6 B
    assert r.metrics["peak_gpu_gb"] == pytest.approx((6e6 + 10_000 + 1e9 + 48e6) / 1e9)
    assert r.metrics["kv_peak_gb"] == pytest.approx(10_000 / 1e9)


def test_kv_grows_with_the_requests_in_flight():
    trace = synthetic_trace(num_requests=4, prompt=4, decode=6)
    r = sim(batch=4, arrival="offline").run(trace)
    assert r.metrics["kv_peak_gb"] == pytest.approx(4 * 10 * 1000 / 1e9)


def test_dense_plus_kv_overflow_says_by_how_much():
    model = tiny_model(kv_bytes_per_token=100_000_000)  # 0.1 GB per token
    trace = synthetic_trace(num_requests=1, prompt=4, decode=100)  # 104 tokens: 10.4 GB of KV
    with pytest.raises(ConfigError, match=r"short by 1\.41 GB"):
        sim(model=model).run(trace)


def test_kv_overflow_under_batching_names_the_iteration():
    model = tiny_model(kv_bytes_per_token=10_000_000)  # 10 MB per token; 8.9 GB free
    trace = synthetic_trace(num_requests=8, prompt=100, decode=20)  # one request: 1.2 GB, fits
    sim(model=model, cache=CacheConfig(per_layer=2)).run(synthetic_trace(num_requests=1, prompt=100, decode=20))
    with pytest.raises(ConfigError, match=r"at iteration \d+ with \d+ requests in flight"):
        sim(model=model, batch=8, arrival="offline").run(trace)


def test_cache_larger_than_gpu_memory_is_an_error():
    with pytest.raises(ConfigError, match=r"expert cache of 24\.00 GB does not fit.*at most 749 experts"):
        sim(cache=CacheConfig(global_slots=2000)).run(synthetic_trace())
    # all-on-GPU ignores capacity (a bound)
    big = tiny_model(num_experts=4, d_ff_expert=200_000)  # 1.2 GB experts: 8 of them = 9.6 GB
    r = sim(model=big, policy="all-on-gpu", cache=None).run(synthetic_trace())
    assert r.metrics["peak_gpu_gb"] > 10


def test_negative_or_zero_bandwidth_is_rejected():
    m, h = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie")
    with pytest.raises(SpecError, match="bandwidth_gbps must be a positive number"):
        apply_overrides(m, h, {"link.bandwidth_gbps": "-5"})
    with pytest.raises(SpecError, match="hbm_bandwidth_gbps"):
        apply_overrides(m, h, {"gpu.hbm_bandwidth_gbps": "0"})
    with pytest.raises(ConfigError, match="copy chunk"):
        SimOptions(copy_chunk_bytes=-1).validate()


def test_what_if_overrides_change_the_result_in_the_expected_direction():
    m, h = load_model("mixtral-8x7b"), load_hardware("rtx4090")
    _, h5 = apply_overrides(m, h, {"link.bandwidth_gbps": "48"})
    from expertsim.sim.cost import CostModel

    slow, fast = CostModel(m, h).transfer_time_ns(m.expert_bytes()), CostModel(m, h5).transfer_time_ns(m.expert_bytes())
    assert slow - 10_000 == pytest.approx(2 * (fast - 10_000), abs=2)
    _, h48 = apply_overrides(m, h, {"gpu.memory_gb": "48"})
    assert h48.gpu.memory_bytes == 48_000_000_000
