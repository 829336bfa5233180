"""DES vs fast engine on the shared Mixtral trace: Mixtral-8x7B on an A100-80GB, per-layer LRU
with 4 slots, batch 1, cache kept across requests (the defaults). Reports events/s and the
real-time factor (simulated seconds per wall second), and checks that both engines give the
same metrics on the same inputs.

    python benchmarks/bench_engines.py                  # DES on the first 4 requests, fast on all
    python benchmarks/bench_engines.py --des-requests all
    python benchmarks/bench_engines.py --profile        # cProfile summaries of both engines

Events (the same count for both engines): dense-layer computes (iterations x model layers) +
expert computes + expert copies. For the DES the number of SimPy events it processed is
reported as well.
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import math
import pstats
import statistics
import sys
import time

from common import SimpyEventCounter, best_of, machine, save, shared_trace


def events(metrics: dict, model) -> int:
    experts = round(metrics["experts_per_layer_iteration"] * metrics["iterations"] * model.num_moe_layers)
    return int(metrics["iterations"] * model.num_layers + experts + metrics["h2d_copies"])


def compare(a: dict, b: dict) -> list[str]:
    bad = []
    for key in a:
        if key == "wall_s":
            continue
        x, y = a[key], b.get(key)
        if isinstance(x, float) and math.isnan(x):
            ok = isinstance(y, float) and math.isnan(y)
        elif isinstance(x, float):
            ok = y == x or abs(y - x) <= 1e-9 * abs(x)
        else:
            ok = x == y
        if not ok:
            bad.append(f"{key}: des {x!r} fast {y!r}")
    return bad


def simpy_floor(n: int = 300_000) -> dict:
    """SimPy's own cost on this machine: one process yielding ``n`` bare timeouts, no other work."""
    import simpy

    env = simpy.Environment()

    def proc():
        for _ in range(n):
            yield env.timeout(1)

    env.process(proc())
    t0 = time.perf_counter()
    env.run()
    wall = time.perf_counter() - t0
    return {"timeouts": n, "wall_s": wall, "events_per_s": n / wall}


def profile(fn, top: int = 14) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--des-requests", default="4", help="requests for the DES run, or 'all'")
    parser.add_argument("--repeat", type=int, default=15, help="fast-engine repetitions (best and median kept)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--name", default="engines")
    args = parser.parse_args()

    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim import SimOptions, Simulation
    from expertsim.sim.fast import simulate_fast
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces import read_trace

    trace = read_trace(shared_trace())
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie")
    cfg = CacheConfig(per_layer=4)
    des_trace = trace if args.des_requests == "all" else trace.head_requests(int(args.des_requests))
    out = {"machine": machine(), "command": " ".join(["python"] + sys.argv),
           "setup": "mixtral-8x7b on a100-80gb-pcie, lru 4 slots per layer, batch 1, scope global, "
                    "default SimOptions (bounds on)"}

    def run_fast(tr, **opts):
        return simulate_fast(model, hardware, make_policy("lru"), cfg, dataclasses.replace(tr),
                             SimOptions(**opts))

    run_fast(trace.head_requests(1))  # compile (numba caches to disk; first use in a fresh checkout)
    for label, opts in (("fast", {}), ("fast_no_bounds", {"bounds": False})):
        walls: list[float] = []
        wall, res = best_of(lambda: run_fast(trace, **opts), args.repeat, walls)
        ev = events(res.metrics, model)
        median = statistics.median(walls)
        out[label] = {"tokens": res.metrics["tokens"], "iterations": res.metrics["iterations"],
                      "simulated_s": res.metrics["total_s"], "wall_s": wall, "events": ev,
                      "events_per_s": ev / wall, "realtime_factor": res.metrics["total_s"] / wall,
                      "repeats": len(walls), "wall_median_s": median,
                      "realtime_factor_median": res.metrics["total_s"] / median}
        print(label, out[label])

    # The DES, counting SimPy's own events.
    with SimpyEventCounter() as counter:
        t0 = time.perf_counter()
        des = Simulation(model, hardware, make_policy("lru"), cfg, options=SimOptions(engine="des")).run(
            dataclasses.replace(des_trace))
        wall = time.perf_counter() - t0
    ev = events(des.metrics, model)
    out["des"] = {"requests": args.des_requests, "tokens": des.metrics["tokens"],
                  "iterations": des.metrics["iterations"], "simulated_s": des.metrics["total_s"],
                  "wall_s": wall, "events": ev, "events_per_s": ev / wall, "simpy_events": counter.count,
                  "simpy_events_per_s": counter.count / wall, "realtime_factor": des.metrics["total_s"] / wall}
    # The ceiling of any SimPy DES that processes as many SimPy events: their bare cost alone.
    floor = simpy_floor()
    moe_layers = des.metrics["iterations"] * model.num_moe_layers
    out["simpy_floor"] = {**floor, "des_simpy_events_per_moe_layer": counter.count / moe_layers,
                          "ceiling_realtime_factor": des.metrics["total_s"] / (counter.count / floor["events_per_s"])}
    print("des", out["des"])
    print("simpy floor", out["simpy_floor"])
    same = run_fast(des_trace)
    out["fast_same_input"] = {"wall_s": same.metrics["wall_s"],
                              "realtime_factor": same.metrics["total_s"] / same.metrics["wall_s"],
                              "speedup_vs_des": wall / same.metrics["wall_s"]}
    out["equal_metrics"] = compare(des.metrics, same.metrics) == [] and des.iterations == same.iterations
    out["differences"] = compare(des.metrics, same.metrics)
    print("fast on the DES input:", out["fast_same_input"], "equal:", out["equal_metrics"], out["differences"])
    if args.profile:
        small = trace.head_requests(2)
        out["profile_des"] = profile(lambda: Simulation(model, hardware, make_policy("lru"), cfg,
                                                        options=SimOptions(engine="des")).run(dataclasses.replace(small)))
        out["profile_fast"] = profile(lambda: run_fast(trace))
        print(out["profile_des"])
        print(out["profile_fast"])
    save(args.name, out)


if __name__ == "__main__":
    main()
