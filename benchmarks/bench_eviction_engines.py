"""DES vs fast engine per eviction policy (issue 16, first slice): every built-in eviction policy
as a plain copy-on-miss system, Mixtral-8x7B on an A40, 3 slots per layer, the first 3,000
tokens of the shared Mixtral trace (cut at a pass boundary), batch 1, closed loop, cache kept
across requests, bounds on (the default). LRU and FIFO take the compiled cache kernels; static,
eam-priority and sequence-activation the prefetching kernel (as the ComposedSystem a plain system
acts as); every other policy the general pass (expertsim.sim.fast.general: the system's own
ExpertCache and LayerServer once, then the compiled timing kernels). Checks that both engines give
the same metrics and iteration records.

    python benchmarks/bench_eviction_engines.py                        # results/eviction_engines.json
    python benchmarks/bench_eviction_engines.py --policies lfu,belady --tokens 1000
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from bench_engines import compare
from common import machine, save, shared_trace


def _path(model, hardware, system, cfg) -> str:
    """Which fast path the dispatch gives this run, in words."""
    from expertsim.sim import SimOptions, Simulation
    from expertsim.sim.engine import _fast_path_of
    from expertsim.sim.fast import plans, support

    sim = Simulation(model, hardware, system, cfg, options=SimOptions(engine="fast"))
    path = _fast_path_of(sim, sim.options)
    if support.supports_simulation(system, cfg, sim.options, model=model, hardware=hardware):
        return "compiled cache kernel"
    return "compiled prefetching kernel" if path is plans.simulate else "general pass"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", default=None, help="comma-separated eviction policies (default: all)")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--repeat", type=int, default=2, help="fast-engine runs per policy (best kept)")
    parser.add_argument("--des-repeat", type=int, default=1)
    args = parser.parse_args()

    from expertsim.policies import CacheConfig, make_policy
    from expertsim.policies.registry import eviction_names
    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces import read_trace

    trace = read_trace(shared_trace()).max_tokens(args.tokens)
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a40")
    cfg = CacheConfig(per_layer=3)
    names = args.policies.split(",") if args.policies else eviction_names()

    def run(name, engine):
        t0 = time.perf_counter()
        result = Simulation(model, hardware, make_policy(name), cfg, options=SimOptions(engine=engine)).run(
            dataclasses.replace(trace))
        return time.perf_counter() - t0, result

    run("lfu", "fast")  # compile the kernels once, outside the timings
    rows = []
    for name in names:
        des_wall, des = min((run(name, "des") for _ in range(args.des_repeat)), key=lambda r: r[0])
        fast_wall, fast = min((run(name, "fast") for _ in range(args.repeat)), key=lambda r: r[0])
        bad = compare(des.metrics, fast.metrics)
        if des.iterations != fast.iterations:
            bad.append("iteration records differ")
        simulated = des.metrics["total_s"]
        row = {"policy": name, "path": _path(model, hardware, make_policy(name), cfg),
               "tokens": des.metrics["tokens"], "simulated_s": simulated, "hit_rate": des.metrics["hit_rate"],
               "des_wall_s": des_wall, "fast_wall_s": fast_wall, "des_realtime_factor": simulated / des_wall,
               "fast_realtime_factor": simulated / fast_wall, "speedup": des_wall / fast_wall,
               "equal": not bad, "differences": bad}
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    save("eviction_engines", {"machine": machine(), "command": " ".join(["python"] + sys.argv),
                              "setup": f"mixtral-8x7b on a40, 3 slots per layer, first {args.tokens} tokens of "
                                       f"{shared_trace().name}, batch 1, closed loop, scope global, bounds on; "
                                       f"DES best of {args.des_repeat}, fast best of {args.repeat}",
                              "rows": rows})
    if not all(r["equal"] for r in rows):
        sys.exit("engines differ: " + "; ".join(f"{r['policy']}: {r['differences'][:3]}" for r in rows if not r["equal"]))


if __name__ == "__main__":
    main()
