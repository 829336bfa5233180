"""Mutation fuzzing of trace files, long: N mutants of a small valid trace (bytes, columns,
dtypes, values, rows, metadata; see tests/trace_fuzz.py), each read and, when accepted, run
through `trace info`'s scan, the cache replay, the LRU miss-ratio curve and a short simulation.

    python benchmarks/fuzz_traces.py [N] [SEED]      # default 2000 mutants from seed 0

Prints the count of each outcome: ok (valid numbers), rejected (expertsim's own one-line error),
crash (any other exception, polars panics included) and invalid (a hit rate outside [0, 1], a
negative or non-finite time), and the first few crashes and invalid results with the mutation
that made them (rerun one with its seed). Writes benchmarks/results/fuzz_traces.json.
Goal: 0 crashes and 0 invalid.
"""
from __future__ import annotations

import collections
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import machine, save  # noqa: E402
from trace_fuzz import base_trace, mutate, outcome  # noqa: E402

from expertsim.traces import trace_to_frame  # noqa: E402


def main(n: int = 2000, seed: int = 0) -> dict:
    base = trace_to_frame(base_trace())
    counts: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    failures = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutant.parquet"
        for i in range(seed, seed + n):
            mutant = mutate(random.Random(i), base=base)
            ops.update(op.split(":")[0] for op in mutant.ops)
            path.write_bytes(mutant.data)
            kind, detail = outcome(path)
            counts[kind] += 1
            if kind in ("crash", "invalid"):
                failures.append({"seed": i, "kind": kind, "ops": mutant.ops, "detail": detail})
                print(f"seed {i}: {kind}: {detail} <- {mutant.ops}", flush=True)
            if (i - seed + 1) % 500 == 0:
                print(f"{i - seed + 1}/{n}: {dict(counts)}", file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    result = {"mutants": n, "seed": seed, "outcomes": {k: counts.get(k, 0) for k in ("ok", "rejected", "crash", "invalid")},
              "operations": dict(ops.most_common()), "failures": failures[:50], "wall_s": round(wall, 1),
              "machine": machine()}
    print(f"{n} mutants (seeds {seed}..{seed + n - 1}) in {wall:.0f} s: "
          + ", ".join(f"{k} {v}" for k, v in result["outcomes"].items()))
    save("fuzz_traces", result)
    return result


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
