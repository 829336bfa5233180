"""Helpers for the simulator tests: a tiny model and hardware with round numbers, synthetic
traces, and the shared real traces (skipped cleanly when absent)."""
from __future__ import annotations


import numpy as np

from expertsim.specs.loader import hardware_from_dict, model_from_dict
from expertsim.traces import RoutingTrace

from shared_traces import load_shared, shared_trace_path  # noqa: E402,F401  (re-exported)


def tiny_model(**changes):
    """2 MoE layers x 4 experts, top-2; expert = 3 x 1000 x 2000 = 6e6 params = 12e6 bytes (bf16)."""
    data = dict(name="tiny", num_layers=2, num_experts=4, top_k=2, d_model=1000, d_ff_expert=2000,
                num_heads=8, num_kv_heads=8, head_dim=125, vocab_size=1000, dense_params=3_000_000,
                kv_bytes_per_token=1000, dtype="bf16")
    data.update(changes)
    return model_from_dict(data)


def tiny_hardware(**sections):
    """Round numbers: 10 GB GPU, 1000 GB/s HBM (eff 1), 100 TFLOP/s (eff 1), 0 launch; link
    12 GB/s + 10 us per copy (one expert copy = 1.01 ms); CPU 1 TFLOP/s, 100 GB/s."""
    data = {
        "name": "tiny-gpu",
        "gpu": dict(memory_gb=10.0, hbm_bandwidth_gbps=1000.0, tflops={"bf16": 100.0},
                    compute_efficiency=1.0, memory_efficiency=1.0, launch_overhead_us=0.0, workspace_gb=1.0),
        "link": dict(kind="test", bandwidth_gbps=12.0, per_copy_overhead_us=10.0, copy_engines=1),
        "cpu": dict(tflops=1.0, memory_bandwidth_gbps=100.0, memory_gb=64.0, efficiency=1.0),
    }
    for key, values in sections.items():
        data[key] = {**data.get(key, {}), **values}
    return hardware_from_dict(data)


def synthetic_trace(num_requests=3, prompt=4, decode=5, layers=2, experts=4, k=2, seed=0,
                    prompts=None, decodes=None) -> RoutingTrace:
    """Requests of one prefill pass (``prompt`` tokens) then ``decode`` one-token passes, random
    distinct top-k experts per token and layer."""
    rng = np.random.default_rng(seed)
    rows = {"request": [], "step": [], "position": [], "phase": []}
    for r in range(num_requests):
        p = prompts[r] if prompts is not None else prompt
        d = decodes[r] if decodes is not None else decode
        for pos in range(p):
            rows["request"].append(r); rows["step"].append(0); rows["position"].append(pos); rows["phase"].append(0)
        for i in range(d):
            rows["request"].append(r); rows["step"].append(1 + i); rows["position"].append(p + i); rows["phase"].append(1)
    n = len(rows["request"])
    ex = np.stack([np.stack([rng.permutation(experts)[:k] for _ in range(layers)]) for _ in range(n)])
    return RoutingTrace(experts=ex, num_experts=experts, metadata={"source": "synthetic-test"},
                        **{k_: np.asarray(v) for k_, v in rows.items()})
