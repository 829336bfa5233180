"""Runtime profiles (what a software stack pays around the roofline), quantised bits, per-dtype CPU
rates and the end-to-end throughput: each mechanism pinned to hand-worked times on the tiny
model (round numbers, see simhelpers)."""
from __future__ import annotations

import dataclasses

import pytest
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

from expertsim.errors import SpecError
from expertsim.policies import CacheConfig, make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.cost import CostModel, runtime_for
from expertsim.specs import (
    RuntimeSpec,
    apply_overrides,
    apply_runtime_overrides,
    list_runtimes,
    load_model,
    load_runtime,
)


def run(policy="lru", cache=CacheConfig(per_layer=2), runtime=None, engine="des", trace=None, model=None,
        hardware=None):
    trace = trace or synthetic_trace(num_requests=2, prompt=3, decode=6)
    return Simulation(model or tiny_model(), hardware or tiny_hardware(), make_policy(policy), cache,
                      SimOptions(runtime=runtime, engine=engine)).run(trace)


def test_presets_load_with_sources_and_named_systems_pick_their_own():
    assert {"default", "mixtral-offloading"} <= set(list_runtimes())
    for name in list_runtimes():
        spec = load_runtime(name)
        assert spec.source, name
    assert runtime_for(make_policy("lru")).name == "default"
    assert runtime_for(make_policy("mixtral-offloading")).name == "mixtral-offloading"
    assert runtime_for(make_policy("mixtral-offloading"), "default").name == "default"


def test_overrides_and_bad_values_name_the_field():
    rt = apply_runtime_overrides(load_runtime("default"), {"runtime.host_us_per_layer": "250",
                                                           "runtime.copy_stream": "compute"})
    assert rt.host_us_per_layer == 250.0 and rt.serialises_copies
    with pytest.raises(SpecError, match="host_us_per_layer must be a finite number >= 0"):
        apply_runtime_overrides(rt, {"runtime.host_us_per_layer": "-1"})
    with pytest.raises(SpecError, match="copy_stream must be 'copy' or 'compute'"):
        RuntimeSpec(name="x", copy_stream="side")
    with pytest.raises(SpecError, match="no field 'host_us_per_layr'"):
        apply_runtime_overrides(rt, {"runtime.host_us_per_layr": "1"})


def test_host_time_adds_per_layer_and_per_expert_call_on_both_engines():
    base = run("all-on-gpu", None)
    rt = RuntimeSpec(name="t", host_us_per_layer=100.0, host_us_per_expert=10.0)
    slow = run("all-on-gpu", None, runtime=rt)
    m = base.metrics
    passes, layers = m["iterations"], tiny_model().num_layers
    expert_calls = int(m["experts_per_layer_iteration"] * m["iterations"] * layers)
    added_ns = passes * layers * 100_000 + expert_calls * 10_000
    assert round((slow.metrics["total_s"] - m["total_s"]) * 1e9) == added_ns
    fast = run("all-on-gpu", None, runtime=rt, engine="fast")
    assert fast.config["engine"] == "fast"
    assert fast.metrics["total_s"] == slow.metrics["total_s"]
    # host time is divided by the host's single-thread speed
    quick_host = run("all-on-gpu", None, runtime=rt, hardware=tiny_hardware(cpu={"host_speed": 2.0}))
    assert round((quick_host.metrics["total_s"] - m["total_s"]) * 1e9) == added_ns // 2


def test_copies_on_the_compute_stream_do_not_overlap_compute():
    """No-cache: every expert is copied. On a copy stream the next copy overlaps the current
    expert's compute; on the compute stream each pass is the plain sum of its parts."""
    trace = synthetic_trace(num_requests=1, prompt=1, decode=4)
    overlap = run("no-cache", None, trace=trace)
    serial = run("no-cache", None, trace=trace, runtime=RuntimeSpec(name="s", copy_stream="compute"))
    cost = CostModel(tiny_model(), tiny_hardware())
    m = serial.metrics
    copies = m["h2d_copies"]
    expected_ns = (copies * cost.transfer_time_ns(tiny_model().expert_bytes())
                   + round(m["expert_compute_s"] * 1e9) + round(m["dense_compute_s"] * 1e9))
    assert round(m["total_s"] * 1e9) == expected_ns
    assert overlap.metrics["total_s"] < m["total_s"]
    assert overlap.metrics["hits"] == m["hits"] and overlap.metrics["h2d_gb"] == m["h2d_gb"]
    # a write-back: the stepped fast engine (expertsim.sim.fast.stepped), equal to the DES
    swap = RuntimeSpec(name="s", copy_stream="compute", writeback=True)
    auto = run("no-cache", None, trace=trace, runtime=swap, engine="auto")
    des = run("no-cache", None, trace=trace, runtime=swap, engine="des")
    assert auto.config["engine"] == "fast" and des.config["engine"] == "des"
    assert {k: v for k, v in auto.metrics.items() if k != "wall_s"} == \
        {k: v for k, v in des.metrics.items() if k != "wall_s"}
    assert auto.metrics["d2h_gb"] > 0


@pytest.mark.parametrize("policy, cache", [("lru", CacheConfig(per_layer=2)), ("lru", CacheConfig(per_layer=3)),
                                           ("fifo", CacheConfig(per_layer=2)), ("no-cache", None),
                                           ("lru", CacheConfig(global_slots=5)), ("lfu", CacheConfig(per_layer=2)),
                                           ("belady", CacheConfig(global_slots=5))])
@pytest.mark.parametrize("host_us", [0.0, 30.0, 5000.0])
def test_fast_engine_equals_the_des_with_copies_on_the_compute_stream(policy, cache, host_us):
    """The fast engine's closed form for compute-stream copies (each miss: its compute plus the
    part of its copy its own host time does not cover) against the DES, every metric."""
    rt = RuntimeSpec(name="s", copy_stream="compute", host_us_per_layer=200.0, host_us_per_expert=host_us,
                     kernel_us_per_layer=50.0)
    trace = synthetic_trace(num_requests=3, prompt=5, decode=7, experts=4, seed=3)
    des = run(policy, cache, runtime=rt, trace=trace, engine="des")
    fast = run(policy, cache, runtime=rt, trace=trace, engine="fast")
    assert fast.config["engine"] == "fast"
    skip = {"wall_s"}
    for key, value in des.metrics.items():
        if key in skip:
            continue
        other = fast.metrics[key]
        if isinstance(value, float) and value != value:
            assert other != other, key
        elif value is None or isinstance(value, str):
            assert other == value, key
        else:
            assert other == pytest.approx(value, rel=1e-12, abs=1e-12), key


def test_write_back_copies_every_evicted_expert_home():
    trace = synthetic_trace(num_requests=1, prompt=1, decode=12, experts=4)
    plain = run("lru", CacheConfig(per_layer=2), trace=trace)
    swap = run("lru", CacheConfig(per_layer=2), trace=trace, runtime=RuntimeSpec(name="w", writeback=True))
    assert plain.metrics["d2h_gb"] == 0 and swap.metrics["hits"] == plain.metrics["hits"]
    # with 2 slots per layer and 2 experts per token, every miss after the warm-up evicts one
    bytes_per_expert = tiny_model().expert_bytes()
    evictions = swap.metrics["misses"] - 2 * tiny_model().num_layers
    assert swap.metrics["d2h_gb"] == pytest.approx(evictions * bytes_per_expert / 1e9)
    assert swap.metrics["total_s"] > plain.metrics["total_s"]


def test_quantised_bits_shrink_what_is_stored_and_copied():
    m = load_model("mixtral-8x7b")
    q, _ = apply_overrides(m, tiny_hardware(), {"model.expert_bits": "3.0", "model.dense_bits": "4.25",
                                                "model.kv_bits": "8"})
    assert q.expert_bytes() == round(m.expert_params * 3.0 / 8)
    assert q.expert_bytes("bf16") == m.expert_bytes()
    assert q.dense_bytes == round(m.dense_params * 4.25 / 8)
    assert q.kv_bytes_per_token_stored == m.kv_bytes_per_token / 2
    assert q.experts_quantised and not m.experts_quantised
    with pytest.raises(SpecError, match="expert_bits must be 0"):
        dataclasses.replace(m, expert_bits=0.5)
    # a quantised expert pays its dequantisation FLOPs at compute time
    hw = tiny_hardware(gpu={"hbm_bandwidth_gbps": 1e6})  # compute-bound: the FLOPs decide
    small = tiny_model(expert_bits=4.0)
    t_q = CostModel(small, hw).expert_time_ns(1)
    t_b = CostModel(tiny_model(), hw).expert_time_ns(1)
    assert t_q > t_b


def test_cpu_rate_per_dtype():
    slow_bf16 = tiny_hardware(cpu={"tflops_by_dtype": {"bf16": 0.01}})
    fast = CostModel(tiny_model(), tiny_hardware()).cpu_compute_ns(8)
    slow = CostModel(tiny_model(), slow_bf16).cpu_compute_ns(8)
    flops = tiny_model().expert_flops(8)
    assert slow == round(flops / 0.01e12 * 1e9)
    assert fast < slow


def test_e2e_rate_counts_each_requests_first_token_and_the_prefill_time():
    result = run("lru", CacheConfig(per_layer=2))
    m = result.metrics
    assert m["e2e_tokens_per_s"] == pytest.approx((m["decode_tokens"] + m["requests"]) / m["total_s"])
    assert m["e2e_tokens_per_s"] < m["tokens_per_s"]
    assert m["prefill_tokens_per_s"] > 0
    assert any(a.startswith("runtime default") for a in result.assumptions)


def test_cli_runtime_option_set_keys_and_specs_listing():
    import json

    from typer.testing import CliRunner

    from expertsim.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["simulate", "--policy", "lru", "--per-layer", "2", "--max-tokens", "60",
                                 "--runtime", "mixtral-offloading", "--set", "runtime.host_us_per_layer=100",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["config"]["runtime"] == "mixtral-offloading"
    assert any("100 us host time per layer" in a for a in data["assumptions"])
    listing = json.loads(runner.invoke(app, ["specs", "list", "--json"]).stdout)
    assert {"default", "mixtral-offloading", "fiddler"} <= {r["name"] for r in listing["runtimes"]}
    shown = runner.invoke(app, ["specs", "show", "mixtral-offloading"])
    assert shown.exit_code == 0 and "src/expert_cache.py" in shown.stdout


def test_compute_stream_timeline_rows_on_the_gpu_never_overlap():
    """The GPU row of a run with copies on the compute stream is one sequence: a layer's host part,
    the stall while its copies land, then its kernels, one after another."""
    rt = RuntimeSpec(name="s", copy_stream="compute", host_us_per_layer=300.0, host_us_per_expert=200.0)
    trace = synthetic_trace(num_requests=2, prompt=3, decode=5, experts=4, seed=1)
    result = Simulation(tiny_model(), tiny_hardware(), make_policy("lru"), CacheConfig(per_layer=2),
                        SimOptions(runtime=rt, engine="des", timeline=True)).run(trace)
    frame = result.timeline.to_frame()
    gpu = frame.filter(frame["resource"] == "gpu").sort("start_ns")
    start, end = gpu["start_ns"].to_numpy(), gpu["end_ns"].to_numpy()
    assert len(start) > 0 and (start[1:] >= end[:-1]).all()
    assert {"dense", "expert", "stall"} <= set(gpu["kind"].to_list())
