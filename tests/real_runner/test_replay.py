"""The replay engine on the emulated CPU device: same decisions as the simulator, copies complete
before their experts compute, timeline rows, import hygiene."""
from __future__ import annotations

import subprocess
import sys

import pytest

from expertsim.policies import CacheConfig, make_policy
from expertsim.real_runner.replay import Replayer, iterations

TIMING_INDEPENDENT = [("no-cache", None), ("lru", 2), ("lru", 3), ("lfu", 2), ("fifo", 2), ("all-on-gpu", None)]


def _sim(spec, trace, name, k):
    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware

    sim = Simulation(spec, load_hardware("a40"), make_policy(name), CacheConfig(per_layer=k) if k else None,
                     options=SimOptions(timeline=True, check_memory=False))
    return sim.run(trace)


def test_iterations_match_the_simulator(tiny_trace):
    from expertsim.sim.workload import iterations_batch1

    ours = iterations(tiny_trace)
    theirs = iterations_batch1(tiny_trace)
    assert [(p.index, p.start, p.stop, p.request, p.phase, p.context_tokens) for p in ours] == \
        [(i.index, i.start, i.stop, i.request, i.phase, i.context_tokens) for i in theirs]


@pytest.mark.parametrize("name, k", TIMING_INDEPENDENT)
def test_hits_misses_and_copies_equal_the_simulator(tiny_spec, tiny_trace, cpu_device, name, k):
    result = Replayer(tiny_spec, make_policy(name), cpu_device, CacheConfig(per_layer=k) if k else None).run(tiny_trace)
    sim = _sim(tiny_spec, tiny_trace, name, k)
    assert [(r["hits"], r["misses"]) for r in result.records] == \
        [(r["hits"], r["misses"]) for r in sim.iterations]
    tl = sim.timeline.to_dict()

    def copies(cols):
        return sorted((i, layer, e) for res, kind, i, layer, e in
                      zip(cols["resource"], cols["kind"], cols["iteration"], cols["layer"], cols["expert"])
                      if res == "link")

    assert copies(result.timeline) == copies(tl)
    if name != "all-on-gpu":
        assert result.totals.copies == sim.metrics["h2d_copies"] > 0
    assert result.outputs_finite


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_copy_lands_before_its_expert_computes(tiny_spec, tiny_trace, clock):
    """Slots start NaN; a slow emulated link makes every copy long. Outputs stay finite, and on
    the timeline (either clock) every expert that was copied starts after its copy ended."""
    from expertsim.real_runner.device import CpuEmulatedDevice

    dev = CpuEmulatedDevice(link_gbps=0.2, clock=clock)
    try:
        result = Replayer(tiny_spec, make_policy("no-cache"), dev).run(tiny_trace.max_tokens(20))
    finally:
        dev.close()
    assert result.outputs_finite
    t = result.timeline
    copy_end = {(i, layer, e): end for res, i, layer, e, end in
                zip(t["resource"], t["iteration"], t["layer"], t["expert"], t["end_ns"]) if res == "link"}
    checked = 0
    for kind, i, layer, e, start in zip(t["kind"], t["iteration"], t["layer"], t["expert"], t["start_ns"]):
        if kind == "expert":
            assert start >= copy_end[(i, layer, e)]
            checked += 1
    assert checked > 10
    assert result.totals.stall_ns > 0
    if clock == "cpu":  # copies run back to back on the virtual link at the nominal rate or slower
        starts = sorted(zip(t["start_ns"], t["end_ns"], t["bytes"]))
        link = [(a, b, n) for (a, b, n), res in zip(zip(t["start_ns"], t["end_ns"], t["bytes"]), t["resource"])
                if res == "link"]
        assert all(b - a >= n / 0.2 for a, b, n in link)
        assert all(b1 <= a2 for (a1, b1, _), (a2, b2, _) in zip(link, link[1:]))
        assert starts


def test_poisoned_slots_catch_a_missing_wait(tiny_spec, tiny_trace):
    """The check above can fail: computing without waiting for the copy reads NaN slots."""
    from expertsim.real_runner.device import CpuEmulatedDevice

    dev = CpuEmulatedDevice(link_gbps=0.2)
    try:
        result = Replayer(tiny_spec, make_policy("no-cache"), dev).run(tiny_trace.max_tokens(8),
                                                                    unsafe_skip_copy_wait=True)
    finally:
        dev.close()
    assert not result.outputs_finite


def test_experts_are_distinct_and_output_depends_on_them(tiny_spec, cpu_device):
    from expertsim.real_runner.weights import ExpertStore

    store = ExpertStore(tiny_spec, cpu_device, __import__("torch").float32)
    rows = store.host
    assert rows.shape[0] == tiny_spec.num_moe_layers * tiny_spec.num_experts
    assert not bool((rows[0] == rows[1]).all()) and bool(rows.isfinite().all())
    assert store.row_bytes == tiny_spec.expert_bytes()


def test_timeline_rows_and_request_scope(tiny_spec, tiny_trace, cpu_device):
    rep = Replayer(tiny_spec, make_policy("lru"), cpu_device, CacheConfig(per_layer=2), scope="request")
    result = rep.run(tiny_trace)
    sim_iters = len(iterations(tiny_trace))
    t = result.timeline
    kinds = set(zip(t["resource"], t["kind"]))
    assert {("gpu", "dense"), ("gpu", "expert"), ("link", "copy")} <= kinds
    dense = [k for k in t["kind"] if k == "dense"]
    assert len(dense) == sim_iters * tiny_spec.num_layers
    assert all(e > s for s, e in zip(t["start_ns"], t["end_ns"]))
    ends = [r["end_ns"] for r in result.records]
    assert ends == sorted(ends) and result.records[1]["start_ns"] == result.records[0]["end_ns"]
    m = result.metrics()
    assert 0 < m["hit_rate"] < 1 and m["tpot_ms"] > 0


def test_low_precision_miss_is_refused(tiny_spec, tiny_trace, cpu_device):
    from expertsim.errors import ConfigError
    from expertsim.policies import LayerDecision, MissAction, System
    from expertsim.policies.eviction import LRU

    class Hobbit(System):
        name = "test-lowp"

        def on_layer(self, obs):
            return LayerDecision(miss_actions={int(e): MissAction.LOW_PRECISION for e in obs.needed})

    with pytest.raises(ConfigError, match="low-precision"):
        Replayer(tiny_spec, Hobbit(LRU()), cpu_device, CacheConfig(per_layer=2)).run(tiny_trace.max_tokens(8))


def test_real_runner_imports_torch_and_numpy_only():
    code = ("import sys; import expertsim.real_runner.measure, expertsim.real_runner.replay, "
            "expertsim.real_runner.calibrate, expertsim.real_runner.commands; "
            "bad = [m for m in ('polars', 'plotly', 'simpy', 'sklearn', 'expertsim.sim') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # Importing the package (what cli.py does for the commands) does not even import torch.
    code = "import sys, expertsim.real_runner.commands; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_prefetched_hit_released_mid_layer_still_waits_for_its_copy(tiny_spec):
    """Prefill needs all 8 experts with 4 slots per layer: the prefetched hits are released for
    the misses while their prefetch copies are still on a slow link. They must still wait."""
    from expertsim.policies import system_names
    from expertsim.real_runner import slice_layers
    from expertsim.real_runner.device import CpuEmulatedDevice
    from expertsim.traces.synth import default_trace

    if "pregated-moe" not in system_names():
        pytest.skip("no pregated-moe system registered")
    trace = slice_layers(default_trace(num_requests=1, decode_tokens=4, prefill_tokens=32), 2)
    dev = CpuEmulatedDevice(link_gbps=0.2)
    try:
        result = Replayer(tiny_spec, make_policy("pregated-moe"), dev, CacheConfig(per_layer=4)).run(trace)
    finally:
        dev.close()
    released_hits = [log for log in result.layer_log if sum(log[2]) and len(log[2]) > 4]
    assert released_hits and result.totals.prefetch_copies > 0
    assert result.outputs_finite
    sim = _sim(tiny_spec, trace, "pregated-moe", 4)
    assert [(r["hits"], r["misses"]) for r in result.records] == [(r["hits"], r["misses"]) for r in sim.iterations]


def test_request_scope_reloads_preloaded_experts_as_the_simulator_does(tiny_spec, tiny_trace, cpu_device):
    """A system's initial residents belong to the deployment: with the cache emptied per request,
    all-on-GPU stays all-hit on every request on the device, as in the simulator (it used to go
    cold after the first request), and the reload is outside the measured passes."""
    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware

    result = Replayer(tiny_spec, make_policy("all-on-gpu"), cpu_device, None, scope="request").run(tiny_trace)
    sim = Simulation(tiny_spec, load_hardware("a40"), make_policy("all-on-gpu"), None,
                     options=SimOptions(scope="request", check_memory=False)).run(tiny_trace)
    assert [(r["hits"], r["misses"]) for r in result.records] == \
        [(r["hits"], r["misses"]) for r in sim.iterations]
    assert sum(r["misses"] for r in result.records) == 0 and result.totals.copies == 0
    requests = [r["request"] for r in result.records]
    assert len(set(requests)) == 3
    m = result.metrics()
    assert m["total_s"] * 1e9 == pytest.approx(sum(r["end_ns"] - r["start_ns"] for r in result.records))
