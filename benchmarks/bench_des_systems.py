"""The DES's speed per named system: Mixtral-8x7B on an A100-80GB, 4 slots per layer, the first
3 requests of the shared Mixtral trace, bounds off. The speed of this machine drifts, so each
system's best wall is also given in units of SimPy's bare cost measured alongside it (the wall
of 100,000 bare timeouts), and the SimPy events per MoE layer, a count that does not
depend on the machine at all.

    python benchmarks/bench_des_systems.py                 # results/des_systems.json
    python benchmarks/bench_des_systems.py --systems lru,promoe --repeat 2
    python benchmarks/bench_des_systems.py --systems lru --out des_lru    # results/des_lru.json

A name that is not a named system is a plain eviction policy with copy on miss (``lru``).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from bench_engines import simpy_floor
from common import SimpyEventCounter, machine, save, shared_trace

SYSTEMS = ("no-cache", "cache-moe", "mixtral-offloading", "se-moe", "pregated-moe", "expertflow",
           "moe-infinity", "fiddler", "hobbit", "promoe")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="des_systems", help="results/<OUT>.json")
    args = parser.parse_args()

    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces import read_trace

    trace = read_trace(shared_trace()).head_requests(args.requests)
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie")
    rows = []
    for name in args.systems.split(","):
        def run():
            return Simulation(model, hardware, make_policy(name), CacheConfig(per_layer=4),
                              options=SimOptions(bounds=False, engine="des")).run(dataclasses.replace(trace))

        walls, floors = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = run()
            walls.append(time.perf_counter() - t0)
            floors.append(simpy_floor(100_000)["wall_s"])
        wall, floor = min(walls), min(floors)
        with SimpyEventCounter() as counter:
            run()
        events = counter.count
        row = {"system": name, "tokens": result.metrics["tokens"], "simulated_s": result.metrics["total_s"],
               "wall_s": wall, "realtime_factor": result.metrics["total_s"] / wall,
               "simpy_floor_100k_s": floor, "wall_in_floor_units": wall / floor,
               "simpy_events_per_moe_layer": events / (result.metrics["iterations"] * model.num_moe_layers),
               "hit_rate": result.metrics["hit_rate"], "prefetch_copies": result.metrics["prefetch_copies"]}
        rows.append(row)
        print(row, flush=True)
    save(args.out, {"machine": machine(), "command": " ".join(["python"] + sys.argv),
                         "setup": f"mixtral-8x7b on a100-80gb-pcie, 4 slots per layer, first {args.requests} "
                                  f"requests, bounds off, best of {args.repeat}", "rows": rows})


if __name__ == "__main__":
    main()
