"""The fast engine for the hybrid CPU/GPU systems (expertsim.sim.fast.hybrid): equal to the DES on
every metric and iteration record, with GPU-resident experts or none, streamed large passes or CPU
only, chunked prefill, offline arrivals and a dense first layer."""
from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fasthelpers import small_traces, tiny_hardware, tiny_model
from test_fast_simulate import assert_same_run

from expertsim.policies import make_policy
from expertsim.sim import SimOptions, Simulation
from expertsim.sim.fast import hybrid


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(max_layers=4, max_experts=6), gpu=st.integers(0, 3), threshold=st.integers(1, 8),
       llama=st.booleans(), n_cpu_moe=st.integers(-1, 3), chunk=st.sampled_from([None, None, 2]),
       arrival=st.sampled_from(["closed", "offline"]), dense_first=st.integers(0, 1), bounds=st.booleans())
def test_random_runs_equal_des(trace, gpu, threshold, llama, n_cpu_moe, chunk, arrival, dense_first, bounds):
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    model = tiny_model(L, E, k, dense_first)
    hw = tiny_hardware()
    if llama:
        system = ("llamacpp", {"n_cpu_moe": n_cpu_moe, "min_offload_batch": threshold})
    else:
        system = ("ktransformers", {"gpu_experts_per_layer": min(gpu, E), "gpu_prefill_token_threshold": threshold})
    options = SimOptions(arrival=arrival, prefill_chunk_tokens=chunk, bounds=bounds)
    assert hybrid.supports_simulation(make_policy(system[0], **system[1]), None, options, model=model, hardware=hw)

    def run(engine):
        return Simulation(model, hw, make_policy(system[0], **system[1]), None,
                          options=dataclasses.replace(options, engine=engine)).run(dataclasses.replace(trace))

    des, got = run("des"), run("fast")
    assert got.config["engine"] == "fast"
    assert_same_run(des, got)
    for name in des.columns:
        assert got.columns[name].tolist() == des.columns[name].tolist(), name


def test_compute_stream_runtimes_are_left_to_the_stepped_path():
    model, hw = tiny_model(2, 4, 2), tiny_hardware()
    assert not hybrid.supports_simulation(make_policy("llamacpp"), None, SimOptions(runtime="cache-moe"),
                                          model=model, hardware=hw)
    assert not hybrid.supports_simulation(make_policy("llamacpp"), None, SimOptions(batch=2), model=model, hardware=hw)
    assert not hybrid.supports_simulation(make_policy("lru"), None, SimOptions(), model=model, hardware=hw)
