"""Peak memory of a cache replay over a synthetic 1M-token trace shaped like DeepSeek-V3
(58 MoE layers, 256 routed experts, top-8), streamed from Parquet.

    python benchmarks/bench_memory.py generate /tmp/ds3-1m.parquet   # ~58M rows, written in chunks
    python benchmarks/bench_memory.py measure /tmp/ds3-1m.parquet    # each replay in a fresh process

The trace is synthetic (routing drawn with per-layer popularity skew and token-to-token reuse);
only its shape matters here: 1,000,000 tokens (2,000 requests of 100 prompt + 400 decode tokens)
x 58 layers x 8 experts. ``measure`` runs, each in its own process, reporting the peak resident
set (ru_maxrss): the streamed per-layer LRU replay (expertsim.sim.fast.replay_parquet_fast,
16 slots per layer, decode tokens, cache emptied per request), and for contrast the same replay
after loading the whole trace (read_trace + replay_cache engine="fast").
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import machine, save

TOKENS, LAYERS, EXPERTS, K = 1_000_000, 58, 256, 8
PROMPT, DECODE = 100, 400


def generate(path: str, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    popularity = np.stack([rng.permutation(EXPERTS) for _ in range(LAYERS)])  # [layer, rank] -> expert
    per_request = PROMPT + DECODE
    requests = TOKENS // per_request
    schema = pa.schema([("request", pa.uint32()), ("step", pa.uint32()), ("position", pa.uint32()),
                        ("phase", pa.dictionary(pa.int8(), pa.string())), ("layer", pa.uint8())]
                       + [(f"expert_{j}", pa.uint8()) for j in range(K)])
    phases = pa.array(["prefill", "decode"])
    t0 = time.perf_counter()
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for r0 in range(0, requests, 20):
            r = np.arange(r0, min(r0 + 20, requests))
            n = len(r) * per_request
            request = np.repeat(r, per_request)
            position = np.tile(np.arange(per_request), len(r))
            phase = (position >= PROMPT).astype(np.int8)
            step = np.where(phase == 1, position - PROMPT + 1, 0)
            # Rank j of block j (8 blocks of 32 ranks): distinct; skewed towards low ranks.
            offset = np.minimum(rng.geometric(0.15, size=(n, LAYERS, K)) - 1, EXPERTS // K - 1)
            ranks = np.arange(K)[None, None, :] * (EXPERTS // K) + offset
            reuse = rng.random((n, LAYERS)) < 0.5  # token-to-token locality: repeat the previous route
            for t in range(1, n):
                ranks[t, reuse[t]] = ranks[t - 1, reuse[t]]
            experts = popularity[np.arange(LAYERS)[None, :, None], ranks]
            rows = n * LAYERS
            cols = {"request": pa.array(np.repeat(request, LAYERS).astype(np.uint32)),
                    "step": pa.array(np.repeat(step, LAYERS).astype(np.uint32)),
                    "position": pa.array(np.repeat(position, LAYERS).astype(np.uint32)),
                    "phase": pa.DictionaryArray.from_arrays(pa.array(np.repeat(phase, LAYERS)), phases),
                    "layer": pa.array(np.tile(np.arange(LAYERS, dtype=np.uint8), n))}
            flat = experts.reshape(rows, K).astype(np.uint8)
            for j in range(K):
                cols[f"expert_{j}"] = pa.array(flat[:, j])
            writer.write_table(pa.table(cols, schema=schema), row_group_size=1_000_000)
    print(f"wrote {path}: {TOKENS} tokens x {LAYERS} layers in {time.perf_counter() - t0:.0f} s")


def child(kind: str, path: str) -> None:
    """One replay; prints JSON with its peak RSS."""
    from expertsim.policies import CacheConfig, make_policy

    t0 = time.perf_counter()
    if kind == "stream":
        from expertsim.sim.fast import replay_parquet_fast

        r = replay_parquet_fast(path, CacheConfig(per_layer=16), phase="decode", scope="request",
                                num_experts=EXPERTS)
    else:
        from expertsim.sim.cache_replay import replay_cache
        from expertsim.traces import read_trace

        trace = read_trace(path)
        r = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=16), phase="decode", scope="request",
                         engine="fast")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"kind": kind, "hits": r.hits, "misses": r.misses, "hit_rate": r.hit_rate,
                      "wall_s": time.perf_counter() - t0, "peak_rss_mb": peak_mb}))


def measure(path: str, kinds: list[str]) -> None:
    out = {"machine": machine(), "command": " ".join(["python"] + sys.argv), "trace": {
        "tokens": TOKENS, "layers": LAYERS, "experts": EXPERTS, "top_k": K,
        "rows": TOKENS * LAYERS, "file_mb": Path(path).stat().st_size / 2**20}, "runs": []}
    for kind in kinds:
        proc = subprocess.run([sys.executable, __file__, "child", kind, path], capture_output=True, text=True)
        if proc.returncode != 0:
            out["runs"].append({"kind": kind, "error": proc.stderr[-2000:]})
        else:
            out["runs"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(out["runs"][-1])
    save("memory", out)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "generate":
        generate(sys.argv[2])
    elif cmd == "child":
        child(sys.argv[2], sys.argv[3])
    else:
        measure(sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else ["stream", "in-memory"])
