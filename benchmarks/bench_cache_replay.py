"""Cache replay throughput against libCacheSim on the same access stream.

The stream: the shared Mixtral MTBench trace flattened (all tokens, in order; per token the 32
MoE layers, per layer the two experts ascending; key = layer x 8 + expert): 1,743,616 accesses
over 256 keys, the ``standard`` semantics of ``expertsim cache``. One global cache of C entries
(every object size 1). For LRU, FIFO and Belady:

- ours: ``expertsim.sim.fast.replay_stream(keys, C, policy)`` on the key array in memory
  (Belady's next-use array computed inside the timing);
- ours end to end (LRU, FIFO): ``replay_cache(trace, policy, CacheConfig(global_slots=C), phase="all",
  scope="global", semantics="standard", engine="fast")`` from the RoutingTrace;
- libCacheSim: ``cache.process_trace(TraceReader(path, ORACLE_GENERAL_TRACE))`` on the same
  stream written once as an oracleGeneral binary file (its next-access field set for Belady);
- for scale, the general LayerServer path (``engine="des"``) on the first 30,000 accesses.

Miss counts must be equal (checked). Times are the best of ``--repeat`` runs, ours and
libCacheSim's alternating in one process.

    python benchmarks/bench_cache_replay.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import best_of, machine, save, shared_trace


def write_oracle_general(keys: np.ndarray, next_use: np.ndarray, path: Path) -> None:
    """libCacheSim's oracleGeneral binary: per request uint32 time, uint64 id, uint32 size,
    int64 next access (virtual time, -1 for none)."""
    n = len(keys)
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rec["t"] = np.arange(1, n + 1)
    rec["id"] = keys
    rec["size"] = 1
    rec["next"] = np.where(next_use < n, next_use + 1, -1)
    rec.tofile(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="32,64,128")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import libcachesim as lcs

    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim.cache_replay import replay_cache
    from expertsim.sim.fast import next_use_positions, replay_stream
    from expertsim.traces import read_trace

    trace = read_trace(shared_trace())
    n, L, k = trace.experts.shape
    E = trace.num_experts
    keys = (np.arange(L)[None, :, None] * E + np.sort(trace.experts, axis=2).astype(np.int64)).ravel()
    out = {"machine": machine(), "command": " ".join(["python"] + sys.argv), "accesses": len(keys),
           "distinct_keys": int(len(np.unique(keys))), "rows": []}
    classes = {"lru": lcs.LRU, "fifo": lcs.FIFO, "belady": lcs.Belady}
    replay_stream(keys[:1000], 8, "lru")  # compile once (cached on disk afterwards)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mixtral.oracleGeneral"
        write_oracle_general(keys, next_use_positions(keys), path)
        for size in [int(s) for s in args.sizes.split(",")]:
            for policy in ("lru", "fifo", "belady"):
                ours_s = lcs_s = float("inf")
                for _ in range(args.repeat):  # alternate, so load changes hit both alike
                    t, hit = best_of(lambda: replay_stream(keys, size, policy), 1)
                    ours_s = min(ours_s, t)
                    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
                    cache = classes[policy](size)
                    t0 = time.perf_counter()
                    miss_ratio, _ = cache.process_trace(reader)
                    lcs_s = min(lcs_s, time.perf_counter() - t0)
                ours_misses = int(len(keys) - hit.sum())
                lcs_misses = int(round(miss_ratio * len(keys)))
                row = {"policy": policy, "cache_entries": size, "misses": ours_misses,
                       "libcachesim_misses": lcs_misses, "equal": ours_misses == lcs_misses,
                       "ours_accesses_per_s": len(keys) / ours_s, "libcachesim_accesses_per_s": len(keys) / lcs_s,
                       "ratio": lcs_s / ours_s}
                if policy in ("lru", "fifo"):
                    cfg = CacheConfig(global_slots=size)
                    e2e, res = best_of(lambda: replay_cache(trace, make_policy(policy), cfg, phase="all", scope="global",
                                                            semantics="standard", engine="fast"), args.repeat)
                    assert res.misses == ours_misses
                    row["ours_end_to_end_accesses_per_s"] = len(keys) / e2e
                    row["ratio_end_to_end"] = lcs_s / e2e
                out["rows"].append(row)
                print(row)
    # The general path, for scale (a prefix: it is slow).
    prefix = trace.max_tokens(30_000 // (L * k))
    t0 = time.perf_counter()
    res = replay_cache(prefix, make_policy("lru"), CacheConfig(global_slots=64), phase="all", scope="global",
                       semantics="standard", engine="des")
    out["general_path_accesses_per_s"] = res.accesses / (time.perf_counter() - t0)
    print("general path", out["general_path_accesses_per_s"])
    # The together semantics the simulator uses (per-layer, 4 slots, decode, request scope).
    wall, res = best_of(lambda: replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=4), engine="fast"),
                        args.repeat)
    out["together_per_layer_4"] = {"accesses": res.accesses, "hit_rate": res.hit_rate, "wall_s": wall,
                                   "accesses_per_s": res.accesses / wall}
    print("together", out["together_per_layer_4"])
    from expertsim.sim.mrc import lru_mrc

    wall, curve = best_of(lambda: lru_mrc(trace, partition="global"), args.repeat)
    out["mrc_global_together"] = {"sizes": len(curve.sizes), "accesses": curve.accesses, "wall_s": wall}
    wall, curve = best_of(lambda: lru_mrc(trace, partition="per_layer"), args.repeat)
    out["mrc_per_layer_together"] = {"sizes": len(curve.sizes), "accesses": curve.accesses, "wall_s": wall}
    print(out["mrc_global_together"], out["mrc_per_layer_together"])
    save("cache_replay", out)


if __name__ == "__main__":
    main()
