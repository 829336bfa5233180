"""Hybrid CPU/GPU systems (issue 17): ktransformers and llamacpp, hand-worked on tiny specs."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from expertsim.analysis.study import normalise_config
from expertsim.cli import app
from expertsim.errors import ConfigError, SpecError
from expertsim.policies import make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.cost import CostModel
from expertsim.specs import RuntimeSpec
from expertsim.traces.synth import uniform_trace
from simhelpers import synthetic_trace, tiny_hardware, tiny_model

PLAIN = RuntimeSpec(name="plain")  # fractions 1.0: the roofline terms alone


def _run(system, trace, hardware=None, runtime=PLAIN):
    sim = Simulation(tiny_model(), hardware or tiny_hardware(), system,
                     options=SimOptions(engine="des", runtime=runtime, bounds=False))
    return sim, sim.run(trace)


def test_cpu_time_scales_with_runtime_fraction_and_numa_placement():
    model = tiny_model()  # expert = 12e6 bytes; CPU 100 GB/s -> 120 us at full rate
    assert CostModel(model, tiny_hardware(), runtime=PLAIN).cpu_compute_ns(1) == 120_000
    half = RuntimeSpec(name="h", cpu_bandwidth_fraction=0.5)
    assert CostModel(model, tiny_hardware(), runtime=half).cpu_compute_ns(1) == 240_000
    two = tiny_hardware(cpu=dict(sockets=2, numa_speedup=1.5, numa_unplaced_factor=0.5))
    assert CostModel(model, two, runtime=RuntimeSpec(name="n", numa_placement="node")).cpu_compute_ns(1) == 80_000
    assert CostModel(model, two, runtime=PLAIN).cpu_compute_ns(1) == 240_000
    # A layer's CPU experts as one job: activations (1 token x 1000 x 2 B) cross once each way
    # (10 us + 2000 B / 12 GB/s = 10167 ns), then the two experts add.
    assert CostModel(model, tiny_hardware(), runtime=PLAIN).cpu_layer_time_ns([1, 1], 1) == 2 * 10_167 + 2 * 120_000


def test_ktransformers_decode_computes_every_expert_on_the_cpu_per_layer():
    trace = synthetic_trace(num_requests=1, prompt=1, decode=2)
    sim, result = _run(make_policy("ktransformers"), trace)
    cost = sim.cost
    per_pass = [2 * cost.dense_layer_time_ns(1, pos + 1) + 2 * cost.cpu_layer_time_ns([1, 1], 1) for pos in range(3)]
    assert result.metrics["total_s"] == pytest.approx(sum(per_pass) / 1e9, abs=1e-9)
    assert result.metrics["h2d_gb"] == 0
    assert result.metrics["hit_rate"] == 0


def test_cpu_sync_time_is_paid_once_per_cpu_layer_per_pass_at_host_speed():
    trace = synthetic_trace(num_requests=1, prompt=1, decode=2)  # 3 passes x 2 layers, all experts on the CPU
    _, base = _run(make_policy("llamacpp"), trace)
    sync = RuntimeSpec(name="s", cpu_sync_us_per_layer=100.0)
    _, synced = _run(make_policy("llamacpp"), trace, runtime=sync)
    assert synced.metrics["total_s"] - base.metrics["total_s"] == pytest.approx(3 * 2 * 100e-6, abs=1e-9)
    # host time: a host twice as fast pays half
    fast_host = tiny_hardware(cpu=dict(host_speed=2.0))
    _, fast = _run(make_policy("llamacpp"), trace, hardware=fast_host, runtime=sync)
    _, fast_base = _run(make_policy("llamacpp"), trace, hardware=fast_host)
    assert fast.metrics["total_s"] - fast_base.metrics["total_s"] == pytest.approx(3 * 2 * 50e-6, abs=1e-9)
    with pytest.raises(SpecError, match="cpu_sync_us_per_layer"):
        RuntimeSpec(name="bad", cpu_sync_us_per_layer=-1.0)


def test_ktransformers_streams_a_large_pass_layer_by_layer():
    trace = synthetic_trace(num_requests=1, prompt=3, decode=0)
    sim, result = _run(make_policy("ktransformers", gpu_prefill_token_threshold=3), trace)
    cost, expected, copied = sim.cost, 0, 0
    for layer in range(2):
        used, counts = np.unique(trace.experts[:, layer], return_counts=True)
        nbytes = len(used) * 12_000_000
        copied += nbytes
        # the layer's experts arrive in one copy, then each computes on the GPU (no overlap)
        expected += cost.dense_layer_time_ns(3, 3) + cost.transfer_time_ns(nbytes) + sum(
            cost.expert_time_ns(int(c)) for c in counts)
    assert result.metrics["total_s"] == pytest.approx(expected / 1e9, abs=1e-9)
    assert result.metrics["h2d_gb"] == pytest.approx(copied / 1e9)


def test_streaming_needs_room_for_one_layer_else_the_cpu_computes_it():
    small = tiny_hardware(gpu=dict(memory_gb=1.04))  # 40 MB left: less than 4 experts of 12 MB
    trace = synthetic_trace(num_requests=1, prompt=3, decode=0)
    sim, result = _run(make_policy("ktransformers", gpu_prefill_token_threshold=3), trace, hardware=small)
    assert result.metrics["h2d_gb"] == 0
    assert any("do not fit" in line for line in result.assumptions)


def test_llamacpp_keeps_the_experts_of_the_first_n_layers_on_the_cpu():
    trace = synthetic_trace(num_requests=1, prompt=1, decode=0)
    sim, result = _run(make_policy("llamacpp", n_cpu_moe=1), trace)
    cost = sim.cost
    # layer 0: CPU job; layer 1: its experts are resident on the GPU (two 1-token experts)
    expected = 2 * cost.dense_layer_time_ns(1, 1) + cost.cpu_layer_time_ns([1, 1], 1) + 2 * cost.expert_time_ns(1)
    assert result.metrics["total_s"] == pytest.approx(expected / 1e9, abs=1e-9)
    assert result.metrics["hit_rate"] == pytest.approx(0.5)


def test_ktransformers_gpu_experts_are_the_most_used():
    system = make_policy("ktransformers", gpu_experts_per_layer=1)
    trace = synthetic_trace(num_requests=1, prompt=6, decode=4, seed=3)
    _run(system, trace)
    for layer in range(2):
        counts = np.bincount(trace.experts[:, layer].ravel(), minlength=4)
        assert system.initial_residents(tiny_model())[layer] == layer * 4 + int(np.argmax(counts))


def test_runtime_rejects_bad_cpu_fraction():
    with pytest.raises(SpecError, match="cpu_bandwidth_fraction"):
        RuntimeSpec(name="x", cpu_bandwidth_fraction=1.5)
    with pytest.raises(SpecError, match="numa_placement"):
        RuntimeSpec(name="x", numa_placement="everywhere")


def test_uniform_trace_is_seeded_distinct_and_sized_from_the_model():
    a = uniform_trace(3, 16, 4, 5, 2, seed=1)
    b = uniform_trace(3, 16, 4, 5, 2, seed=1)
    assert np.array_equal(a.experts, b.experts)
    assert a.experts.shape == (7, 3, 4)
    assert (np.diff(np.sort(a.experts.astype(int), axis=2), axis=2) > 0).all()
    assert (a.phase == 0).sum() == 5 and (a.phase == 1).sum() == 2


def test_uniform_trace_keys_only_with_the_uniform_trace():
    config = normalise_config({"trace": "uniform", "trace_prompt_tokens": 10})
    assert config["trace_path"] == "uniform" and config["trace_decode_tokens"] == 128
    with pytest.raises(ConfigError, match="only apply to trace"):
        normalise_config({"trace_prompt_tokens": 10})
    with pytest.raises(ConfigError, match="trace_decode_tokens"):
        normalise_config({"trace": "uniform", "trace_decode_tokens": -1})


def test_policies_list_shows_both_systems_with_parameters():
    result = CliRunner().invoke(app, ["policies", "list"])
    assert result.exit_code == 0
    text = result.stdout
    assert "ktransformers" in text and "gpu_experts_per_layer=0" in text and "gpu_prefill_token_threshold=4096" in text
    assert "llamacpp" in text and "n_cpu_moe=-1" in text


def test_simulate_ktransformers_on_a_uniform_trace_reports_prefill_and_decode_speed():
    result = CliRunner().invoke(app, ["simulate", "--system", "ktransformers", "-m", "qwen3-30b-a3b", "-H",
                                      "rtx4090-48g-2x-xeon8488c", "--trace", "uniform", "--prompt-tokens", "64",
                                      "--decode-tokens", "3", "--json"])
    assert result.exit_code == 0, result.stdout
    metrics = json.loads(result.stdout)
    assert metrics["prefill_tokens_per_s"] > 0 and metrics["tokens_per_s"] > 0
    assert metrics["tokens_per_s"] < metrics["prefill_tokens_per_s"]


def test_cpu_kernel_by_expert_format_changes_only_that_format():
    """FP8 experts at full width run kt-kernel's FP8->BF16 kernel (cpu_kernels_by_format.fp8);
    GGUF-quantised experts keep the int8 path."""
    import dataclasses

    from expertsim.sim.cost import CostModel
    from expertsim.specs import load_hardware, load_model, load_runtime

    hw = load_hardware("rtx4090-48g-2x-xeon8488c")
    rt = load_runtime("ktransformers")
    assert rt.cpu_kernel("fp8")[0] == "bf16" and rt.cpu_kernel("quantised") == ("int8", rt.cpu_flops_fraction)
    plain = dataclasses.replace(rt, cpu_kernels_by_format={})
    fp8 = dataclasses.replace(load_model("minimax-m2.1"), expert_bits=8.0)
    q4 = dataclasses.replace(fp8, expert_bits=4.8)
    assert CostModel(fp8, hw, runtime=rt).cpu_compute_ns(256) != CostModel(fp8, hw, runtime=plain).cpu_compute_ns(256)
    assert CostModel(q4, hw, runtime=rt).cpu_compute_ns(256) == CostModel(q4, hw, runtime=plain).cpu_compute_ns(256)


def test_cpu_kernels_by_format_rejects_bad_fraction():
    import pytest

    from expertsim.errors import SpecError
    from expertsim.specs.loader import runtime_from_dict

    with pytest.raises(SpecError, match="flops_fraction"):
        runtime_from_dict({"cpu_kernels_by_format": {"fp8": {"flops_fraction": 2.0}}})


def test_model_top_k_override_runs_ktransformers_six_of_eight_mode():
    """KTransformers' 6-of-8 experts mode: --set model.top_k=6 routes 6 experts per token (the
    uniform trace is sized from the overridden model) and decode reads fewer expert bytes."""
    def decode(top_k: int) -> dict:
        result = CliRunner().invoke(app, ["simulate", "--system", "ktransformers", "-m", "qwen3-30b-a3b", "-H",
                                          "rtx4090-48g-2x-xeon8488c", "--trace", "uniform", "--prompt-tokens", "0",
                                          "--decode-tokens", "4", "--set", f"model.top_k={top_k}", "--json"])
        assert result.exit_code == 0, result.stdout
        return json.loads(result.stdout)

    six, eight = decode(6), decode(8)
    assert six["tokens_per_s"] > eight["tokens_per_s"]
    result = CliRunner().invoke(app, ["simulate", "--system", "ktransformers", "-m", "qwen3-30b-a3b", "-H",
                                      "rtx4090-48g-2x-xeon8488c", "--trace", "uniform", "--set", "model.top_k=0"])
    assert isinstance(result.exception, SpecError) and "top_k" in str(result.exception)  # main(): exit 2


@pytest.mark.parametrize("name,moe_layers,experts,top_k,total_b", [
    ("kimi-k2", 60, 384, 8, 1026.4), ("gpt-oss-120b", 36, 128, 4, 116.8), ("deepseek-v3", 58, 256, 8, 671.0)])
def test_large_model_presets_match_their_public_configs(name, moe_layers, experts, top_k, total_b):
    from expertsim.specs import load_model

    m = load_model(name)
    assert (m.num_moe_layers, m.num_experts, m.top_k) == (moe_layers, experts, top_k)
    # Expert parameters plus the true dense count (the preset comments) give the published total.
    assert abs(m.num_moe_layers * m.num_experts * m.expert_params / 1e9 - total_b) / total_b < 0.03
