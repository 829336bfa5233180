"""Sweep throughput: runs per minute of a 200-run study on this machine's cores (2 here), with
expertsim.analysis.sweep (local process pool), every run on the engine "auto" picks (the fast
engine for these built-in policies), and the same 200 configs as a plain loop of fast-engine runs
in one process for comparison.

Study: the shared Mixtral MTBench trace (all 27,244 tokens), Mixtral-8x7B, per-layer LRU;
hardware {a100-80gb-pcie, h100-pcie} x cache 2..6 slots per layer x link bandwidth (10 values,
8..256 GB/s) x scope {global, request} = 200 runs.

    python benchmarks/bench_sweep.py [--jobs 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import Counter

from common import machine, save, shared_trace

STUDY = {
    "name": "bench-200",
    "fixed": {"model": "mixtral-8x7b", "trace": str(shared_trace()), "policy": "lru"},
    "grid": {
        "hardware": ["a100-80gb-pcie", "h100-pcie"],
        "cache_per_layer": [2, 3, 4, 5, 6],
        "link.bandwidth_gbps": [8, 16, 24, 32, 48, 64, 96, 128, 192, 256],
        "scope": ["global", "request"],
    },
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    from expertsim.analysis.study import expand
    from expertsim.analysis.sweep import iter_records, run_sweep

    study = expand(STUDY)
    assert len(study) == 200, len(study)
    out = {"machine": machine(), "command": " ".join(["python"] + sys.argv), "runs": len(study), "jobs": args.jobs}
    with tempfile.TemporaryDirectory() as tmp:
        summary = run_sweep(study, tmp, backend="local", jobs=args.jobs, progress=False)
        records = list(iter_records(tmp))
    engines = Counter(r.get("engine_used") for r in records)
    statuses = Counter(r["status"] for r in records)
    out["sweep"] = {"wall_s": summary.wall_s, "runs_per_minute": 60 * summary.ran / summary.wall_s,
                    "engines": dict(engines), "statuses": dict(statuses),
                    "mean_run_wall_s": sum(r["wall_s"] for r in records) / len(records)}
    print("sweep", out["sweep"])

    # The same configs as a loop of fast-engine runs in this process (trace loaded once).
    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim import SimOptions
    from expertsim.sim.fast import simulate_fast
    from expertsim.specs import apply_overrides, load_hardware, load_model
    from expertsim.traces import read_trace

    trace = read_trace(shared_trace())
    model = load_model("mixtral-8x7b")
    simulate_fast(model, load_hardware("a100-80gb-pcie"), make_policy("lru"), CacheConfig(per_layer=2),
                  dataclasses.replace(trace.head_requests(1)), SimOptions())  # compile
    t0 = time.perf_counter()
    for config in study.runs:
        hw = load_hardware(config["hardware"])
        m, hw = apply_overrides(model, hw, {"link.bandwidth_gbps": config["link.bandwidth_gbps"]})
        simulate_fast(m, hw, make_policy("lru"), CacheConfig(per_layer=config["cache_per_layer"]),
                      dataclasses.replace(trace), SimOptions(scope=config["scope"]))
    wall = time.perf_counter() - t0
    out["fast_loop_one_process"] = {"wall_s": wall, "runs_per_minute": 60 * len(study) / wall}
    print("loop", out["fast_loop_one_process"])
    save("sweep", out)


if __name__ == "__main__":
    main()
