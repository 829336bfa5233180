"""The exact hit and miss counts of every built-in eviction policy on one shared trace slice
(libCacheSim's habit): the golden table ``tests/data/eviction_counts.csv``, what it means, and
the one command that writes it. ``test_eviction_counts.py`` checks it.

Regenerate (after adding an eviction policy, or after a change that is meant to alter counts;
read the diff before committing it)::

    .venv/bin/python tests/policies/eviction_counts.py            # writes the table
    .venv/bin/python tests/policies/eviction_counts.py --markdown # prints it for BENCHMARKS.md

The slice: the first request of the shared Mixtral MTBench dev trace (``SHARED``), 128 tokens: an
88-token prefill pass, then 40 decode tokens (41 passes); the model is mixtral-8x7b (32 MoE
layers, 8 experts, top-2); the cache is ``SLOTS`` slots per MoE layer, kept across requests
(scope global). Two semantics, one row per (semantics, policy, slots):

- ``together``: a timed batch-1 run (:class:`expertsim.sim.Simulation`): the LayerServer's
  semantics, a pass's needed experts looked up together and pinned, a prefill pass needing the
  union of its tokens' experts. Every built-in eviction policy. Hits and misses (= expert copies)
  are the run's; the SimPy DES computes the table, and the fast engine must give the same.
- ``standard``: the classic stream (each access alone, evict on insert; one cache per MoE layer):
  :func:`expertsim.sim.cache_replay.replay_cache` with ``semantics="standard"``, every token of
  the slice. For the policies libCacheSim implements (``LIBCACHESIM``), which must give the same.

With 2 slots per layer and top-2 routing every policy gives the same ``together`` counts (the
cache holds only the layer's two needed experts), so the sizes start at 3.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

SHARED = "mixtral-8x7b-mtbench.dev.parquet"
MODEL = "mixtral-8x7b"
HARDWARE = "a40"  # any: these policies' decisions do not depend on time (memory is not checked)
SLOTS = (3, 4, 6)
REQUESTS = 1
LIBCACHESIM = {"lru": "LRU", "fifo": "FIFO", "belady": "Belady"}  # ours -> libcachesim class
TABLE = Path(__file__).resolve().parents[1] / "data" / "eviction_counts.csv"
COMMAND = ".venv/bin/python tests/policies/eviction_counts.py"
COLUMNS = ("semantics", "policy", "slots_per_layer", "hits", "misses")


def builtin_eviction_names() -> list[str]:
    """The registered eviction policies that ship with expertsim (a plug-in a test registers is
    not one of them)."""
    from expertsim.policies.registry import EVICTION, eviction_names

    return [name for name in eviction_names() if EVICTION[name].__module__.startswith("expertsim.")]


def trace_slice(trace):
    return trace.head_requests(REQUESTS)


def together_counts(view, policy: str, slots: int, engine: str) -> tuple[int, int]:
    """(hits, misses) of a timed batch-1 run on ``engine`` ("des" or "fast"; "fast" refuses a
    run it cannot reproduce rather than falling back)."""
    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim import SimOptions, Simulation
    from expertsim.specs import load_hardware, load_model

    options = SimOptions(engine=engine, check_memory=False, bounds=False)
    result = Simulation(load_model(MODEL), load_hardware(HARDWARE), make_policy(policy), CacheConfig(per_layer=slots),
                        options=options).run(view)
    assert result.config["engine"] == engine, (policy, result.config["engine"])
    return int(result.metrics["hits"]), int(result.metrics["misses"])


def standard_counts(view, policy: str, slots: int, engine: str) -> tuple[int, int]:
    """(hits, misses) of the standard-semantics replay: "des" the policy class through the
    LayerServer; "fast" the fast engine's kernels (LRU/FIFO replay, Belady's stream kernel per
    layer)."""
    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim.cache_replay import replay_cache

    if engine == "fast" and policy == "belady":
        from expertsim.sim.fast import replay_stream

        streams = layer_streams(view)
        hits = sum(int(replay_stream(keys, slots, "belady").sum()) for keys in streams)
        return hits, sum(len(keys) for keys in streams) - hits
    result = replay_cache(view, make_policy(policy), CacheConfig(per_layer=slots), semantics="standard", phase="all",
                          scope="global", engine=engine)
    return int(result.hits), int(result.misses)


def flattened_keys(trace) -> np.ndarray:
    """The standard semantics' stream: tokens in order, then layers, then expert ids ascending;
    key = layer x experts + expert."""
    n, layers, k = trace.experts.shape
    layer = np.arange(layers, dtype=np.int64)[None, :, None]
    return (layer * trace.num_experts + np.sort(trace.experts, axis=2).astype(np.int64)).ravel()


def layer_streams(trace) -> list[np.ndarray]:
    """The standard stream split by MoE layer (one cache per layer), each in stream order."""
    keys = flattened_keys(trace)
    return [keys[keys // trace.num_experts == layer] for layer in range(trace.num_layers)]


def libcachesim_counts(cache_name: str, slots: int, keys: np.ndarray) -> tuple[int, int]:
    """(hits, misses) of libCacheSim's ``cache_name`` cache of ``slots`` unit-size objects."""
    import libcachesim as lcs

    never = np.iinfo(np.int64).max
    next_access = np.full(len(keys), never, dtype=np.int64)
    last: dict[int, int] = {}
    for i in range(len(keys) - 1, -1, -1):
        next_access[i] = last.get(int(keys[i]), never)
        last[int(keys[i])] = i
    cache = getattr(lcs, cache_name)(slots)
    hits = 0
    for i, key in enumerate(keys.tolist()):
        # obj_id 0 is reserved in libCacheSim: shift keys by one.
        hits += cache.get(lcs.Request(obj_size=1, obj_id=key + 1, clock_time=i,
                                      next_access_vtime=int(next_access[i])))
    return hits, len(keys) - hits


def compute_rows(view) -> list[dict]:
    """The table from the reference engines (the DES and the LayerServer replay)."""
    rows = []
    for policy in builtin_eviction_names():
        for slots in SLOTS:
            hits, misses = together_counts(view, policy, slots, "des")
            rows.append({"semantics": "together", "policy": policy, "slots_per_layer": slots, "hits": hits,
                         "misses": misses})
    for policy in sorted(LIBCACHESIM):
        for slots in SLOTS:
            hits, misses = standard_counts(view, policy, slots, "des")
            rows.append({"semantics": "standard", "policy": policy, "slots_per_layer": slots, "hits": hits,
                         "misses": misses})
    return rows


def read_table(path: Path = TABLE) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return [{k: (int(v) if k in ("slots_per_layer", "hits", "misses") else v) for k, v in row.items()}
            for row in csv.DictReader(lines)]


def write_table(rows: list[dict], path: Path = TABLE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write(f"# Exact hit and miss counts per built-in eviction policy: the first {REQUESTS} request"
                f"{'s' if REQUESTS > 1 else ''} of\n"
                f"# {SHARED}, {MODEL}, per-layer cache; see tests/policies/eviction_counts.py.\n"
                f"# Written by: {COMMAND}\n")
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict]) -> str:
    """Misses per policy (rows) and slots per layer (columns), one table per semantics."""
    out = []
    for semantics in ("together", "standard"):
        mine = [r for r in rows if r["semantics"] == semantics]
        out.append(f"| {semantics} | " + " | ".join(f"{s} slots" for s in SLOTS) + " |")
        out.append("|---|" + "---:|" * len(SLOTS))
        for policy in sorted({r["policy"] for r in mine}):
            misses = {r["slots_per_layer"]: r["misses"] for r in mine if r["policy"] == policy}
            out.append(f"| {policy} | " + " | ".join(f"{misses[s]:,}" for s in SLOTS) + " |")
        accesses = mine[0]["hits"] + mine[0]["misses"]
        out.append(f"\n({semantics}: {accesses:,} accesses)\n")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared_traces
    from shared_traces import shared_traces_dir

    from expertsim.traces import read_trace

    path = shared_traces_dir() / SHARED
    if not path.is_file():
        print(f"error: shared trace {path} not found; set EXPERTSIM_SHARED_TRACES", file=sys.stderr)
        return 2
    if argv == ["--markdown"]:
        print(markdown(read_table()))
        return 0
    if argv:
        print(f"error: unknown arguments {argv}; run without arguments, or with --markdown", file=sys.stderr)
        return 2
    rows = compute_rows(trace_slice(read_trace(path)))
    write_table(rows)
    print(f"wrote {len(rows)} rows to {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
