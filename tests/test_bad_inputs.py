"""A catalogue of bad inputs through the `expertsim` command (main(), as a user runs it).

Every case must end with exit status 2 and exactly one line on stderr that starts with
``error: ``, names the bad value, and carries no traceback. The cases are families from issue 13:
trace files, importers, numbers in specs and options, files and folders, sweeps and results,
filters (no code execution), plug-ins and the real runner. Each is cheap: the error comes before
any simulation.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import polars as pl
import pytest

from expertsim.cli import main
from expertsim.traces import RoutingTrace, trace_to_frame, write_trace

PRESET = "mixtral-8x7b"


# --- the files the cases name ------------------------------------------------------------------
def _tiny_trace(weights: bool = True, phase=(0, 1, 1), step=(0, 1, 2)) -> RoutingTrace:
    """2 requests x 3 tokens, Mixtral-shaped (32 MoE layers, top-2 of 8)."""
    rng = np.random.default_rng(0)
    experts = np.stack([np.stack([rng.choice(8, size=2, replace=False) for _ in range(32)])
                        for _ in range(6)])
    return RoutingTrace(
        experts=experts, request=np.repeat([0, 1], 3), step=np.tile(step, 2),
        position=np.tile([0, 1, 2], 2), phase=np.tile(phase, 2), num_experts=8,
        weights=rng.random(experts.shape).astype(np.float32) / 2 if weights else None,
    )


def _set(df: pl.DataFrame, col: str, row: int, value, dtype=None) -> pl.DataFrame:
    """``df`` with ``df[row, col] = value`` (cast to ``dtype`` first when given)."""
    series = df[col] if dtype is None else df[col].cast(dtype)
    values = series.to_list()
    values[row] = value
    return df.with_columns(pl.Series(col, values, dtype=dtype or series.dtype, strict=False))


def _token_rows(df: pl.DataFrame, token: int, col: str, value) -> pl.DataFrame:
    """Set ``col`` on all 32 layer rows of one token."""
    idx = pl.int_range(pl.len())
    return df.with_columns(pl.when((idx // 32) == token).then(pl.lit(value)).otherwise(pl.col(col))
                           .cast(df[col].dtype).alias(col))


def _frames() -> dict[str, tuple[pl.DataFrame, dict]]:
    """name -> (long-format frame, extra key/value metadata) of each bad trace."""
    base = trace_to_frame(_tiny_trace())
    meta = {"expertsim.num_experts": "8"}
    f = {
        "no_phase": (base.drop("phase"), meta),
        "null_phase": (_set(base, "phase", 5, None, pl.String), meta),
        "bad_phase": (_set(base, "phase", 3, "decoding", pl.String), meta),
        "neg_step": (_set(base, "step", 40, -3, pl.Int64), meta),
        "neg_position": (_set(base, "position", 40, -7, pl.Int64), meta),
        "neg_request": (_set(base, "request", 0, -1, pl.Int64), meta),
        "huge_layer": (_set(base, "layer", 10, 2**31 - 1, pl.Int64), meta),
        "neg_layer": (_set(base, "layer", 10, -2, pl.Int64), meta),
        "expert_70000": (_set(base, "expert_0", 9, 70000, pl.UInt32), {}),
        "expert_9_of_8": (_set(base, "expert_1", 9, 9), meta),
        "neg_expert": (_set(base, "expert_0", 9, -4, pl.Int16), meta),
        "float_expert": (base.with_columns(pl.col("expert_0").cast(pl.Float64)), meta),
        "string_request": (base.with_columns(pl.col("request").cast(pl.String)), meta),
        "null_expert": (_set(base, "expert_0", 12, None), meta),
        "num_experts_frac": (base, {"expertsim.num_experts": "8.5"}),
        "num_experts_huge": (base, {"expertsim.num_experts": "100000"}),
        "num_experts_text": (base, {"expertsim.num_experts": "eight"}),
        "dup_token": (pl.concat([base.head(64), base.slice(32, 32), base.slice(64)]), meta),
        "reversed_steps": (_token_rows(_token_rows(base, 1, "step", 2), 2, "step", 1), meta),
        "equal_steps": (base.with_columns(pl.lit(0, dtype=pl.UInt32).alias("step")), meta),
        "neg_weight": (_set(base, "weight_0", 7, -0.25), meta),
        "nan_weight": (_set(base, "weight_1", 7, float("nan")), meta),
        "big_weight": (_set(base, "weight_0", 7, 1.5), meta),
        "inf_weight": (_set(base, "weight_0", 7, float("inf")), meta),
        "cat_weight": (base.with_columns(pl.col("weight_0").cast(pl.String).cast(pl.Categorical)), meta),
        "no_rows": (base.head(0), meta),
        "gap_experts": (base.rename({"expert_1": "expert_2"}), meta),
        "other_model": (base, {**meta, "expertsim.model": "llama4-maverick"}),
    }
    return f


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad inputs")  # a space in the path on purpose
    paths = {}
    for name, (frame, meta) in _frames().items():
        path = d / f"{name}.parquet"
        frame.write_parquet(path, metadata=meta)
        paths[name] = path
    good = write_trace(_tiny_trace(), d / "good.parquet")
    data = good.read_bytes()
    (d / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (d / "random.parquet").write_bytes(np.random.default_rng(1).bytes(4096))
    (d / "empty.parquet").write_bytes(b"")
    (d / "README.md").write_text("# not a trace\n")
    (d / "a_file").write_text("x")
    write_trace(_tiny_trace(phase=(0, 0, 0), step=(0, 0, 0)), d / "prefill_only.parquet")
    # importers
    rng = np.random.default_rng(2)
    (d / "random.npy").write_bytes(rng.bytes(512))
    (d / "random.npz").write_bytes(rng.bytes(512))
    np.save(d / "object.npy", np.array([[1, 2], [3]], dtype=object), allow_pickle=True)
    with open(d / "pickled.npy", "wb") as fh:
        pickle.dump({"experts": [1, 2]}, fh)
    np.save(d / "empty.npy", np.zeros((0, 32, 2), dtype=np.int64))
    np.save(d / "floats.npy", np.full((4, 32, 2), 1.5))
    np.save(d / "huge_ids.npy", np.full((4, 32, 2), 2**40, dtype=np.int64))
    np.save(d / "neg_ids.npy", np.full((4, 32, 2), -1, dtype=np.int64))
    np.save(d / "text.npy", np.array([["a", "b"]]))
    np.savez(d / "ids_70000.npz", routed_experts=np.full((4, 32, 2), 70000, dtype=np.int64))
    np.savez(d / "float_lengths.npz", routed_experts=np.zeros((4, 32, 2), dtype=np.int64),
             request_lengths=np.array([1.5, 2.5]))
    np.savez(d / "bad_offsets.npz", routed_experts=np.zeros((4, 32, 2), dtype=np.int64),
             request_offsets=np.array([0, 3]))
    (d / "random.csv").write_bytes(rng.bytes(300))
    # specs, studies, plug-ins
    (d / "binary.toml").write_bytes(rng.bytes(300))
    (d / "bad_model.toml").write_text('name = "m"\nnum_layers = "many"\n')
    study = '[fixed]\nmodel = "mixtral-8x7b"\nhardware = "a40"\ntrace_max_tokens = 20\n'
    (d / "typo_override.toml").write_text(study + '[grid]\n"link.bandwidht_gbps" = [16, 32]\ncache_per_layer = [2]\n')
    (d / "zero_bw.toml").write_text(study + '[grid]\n"link.bandwidth_gbps" = [16, 0]\ncache_per_layer = [2]\n')
    (d / "typo_key.toml").write_text(study + 'cache_per_layr = 2\n')
    (d / "bad_policy.toml").write_text(study + 'policy = "lruu"\ncache_per_layer = 2\n')
    (d / "nan_cache.toml").write_text(study + 'cache_gb = nan\n')
    (d / "syntax_plugin.py").write_text("import math\n\ndef broken(:\n    pass\n")
    (d / "raising_plugin.py").write_text("x = 1\nraise RuntimeError('plugin boom')\n")
    # results folders
    garbage = d / "garbage_sweep"
    (garbage / "runs").mkdir(parents=True)
    (garbage / "runs" / "0123456789abcdef.json").write_bytes(rng.bytes(200))
    (garbage / "runs" / "list.json").write_text("[1, 2]")
    bad_table = d / "bad_table"
    bad_table.mkdir()
    (bad_table / "results.parquet").write_bytes(rng.bytes(200))
    sweep = d / "sweep"
    (sweep / "runs").mkdir(parents=True)
    record = {"run_id": "00000000000000aa", "status": "ok", "error": None,
              "config": {"model": PRESET, "hardware": "a40", "policy": "lru"},
              "metrics": {"tpot_ms": 12.5, "hit_rate": 0.5}}
    (sweep / "runs" / "00000000000000aa.json").write_text(json.dumps(record))
    for path in d.iterdir():  # every file by its name; Parquet files also by their stem
        paths.setdefault(path.name, path)
        if path.suffix == ".parquet":
            paths.setdefault(path.stem, path)
    paths.update({"dir": d, "README": d / "README.md"})
    return paths


# --- the catalogue: (args, words the one line must contain) -------------------------------------
T = "{%s}"  # a placeholder for a file of the fixture: T % "neg_step" -> "{neg_step}"

TRACE_CASES = [
    # unreadable files: every reading command, one line
    (["trace", "info", T % "README"], ["README.md", "not Parquet"]),
    (["trace", "info", T % "truncated"], ["truncated.parquet"]),
    (["trace", "info", T % "random"], ["random.parquet"]),
    (["trace", "info", T % "empty"], ["empty.parquet"]),
    (["trace", "info", T % "a_file"], ["a_file"]),
    (["trace", "info", T % "no_phase"], ["phase"]),
    (["trace", "info", T % "num_experts_text"], ["eight"]),
    (["trace", "stats", T % "README"], ["README.md"]),
    (["trace", "stats", T % "truncated"], ["truncated.parquet"]),
    (["cache", "-t", T % "random"], ["random.parquet"]),
    (["mrc", "-t", T % "empty"], ["empty.parquet"]),
    (["simulate", "-t", T % "truncated"], ["truncated.parquet"]),
    (["trace", "fit", T % "README", "--out", "{dir}/fit.json"], ["README.md"]),
    (["trace", "slice", T % "random", "--out", "{dir}/s.parquet"], ["random.parquet"]),
    (["cache", "-t", "{dir}/absent.parquet"], ["absent.parquet"]),
    # schema and values
    (["cache", "-t", T % "no_phase"], ["'phase'"]),
    (["cache", "-t", T % "null_phase"], ["'phase'", "None"]),
    (["cache", "-t", T % "bad_phase"], ["decoding"]),
    (["cache", "-t", T % "neg_step"], ["'step'", "-3"]),
    (["cache", "-t", T % "neg_position"], ["'position'", "-7"]),
    (["cache", "-t", T % "neg_request"], ["'request'", "-1"]),
    (["cache", "-t", T % "huge_layer"], ["'layer'", "2147483647"]),
    (["mrc", "-t", T % "neg_layer"], ["'layer'", "-2"]),
    (["cache", "-t", T % "expert_70000"], ["'expert_0'", "70000"]),
    (["cache", "-t", T % "expert_9_of_8"], ["'expert_1'", "9"]),
    (["simulate", "-t", T % "neg_expert"], ["'expert_0'", "-4"]),
    (["cache", "-t", T % "float_expert"], ["'expert_0'", "Float64"]),
    (["cache", "-t", T % "string_request"], ["'request'", "String"]),
    (["cache", "-t", T % "null_expert"], ["'expert_0'", "None"]),
    (["cache", "-t", T % "num_experts_frac"], ["8.5"]),
    (["cache", "-t", T % "num_experts_huge"], ["100000"]),
    (["trace", "stats", T % "num_experts_text"], ["eight"]),
    (["cache", "-t", T % "dup_token"], ["position 1", "duplicated"]),
    (["cache", "-t", T % "reversed_steps"], ["step 1 after 2"]),
    (["simulate", "-t", T % "equal_steps"], ["step 0 after 0", "decode"]),
    (["cache", "-t", T % "neg_weight"], ["'weight_0'", "-0.25"]),
    (["cache", "-t", T % "nan_weight"], ["'weight_1'", "nan"]),
    (["cache", "-t", T % "big_weight"], ["'weight_0'", "1.5"]),
    (["trace", "stats", T % "inf_weight"], ["'weight_0'", "inf"]),
    (["cache", "-t", T % "cat_weight"], ["'weight_0'", "Categorical"]),
    (["cache", "-t", T % "no_rows"], ["no rows"]),
    (["cache", "-t", T % "gap_experts"], ["expert_2"]),
    (["cache", "-t", T % "other_model", "-m", PRESET], ["llama4-maverick", PRESET]),
    (["simulate", "-t", T % "other_model", "-m", PRESET], ["llama4-maverick"]),
    (["simulate", "-t", T % "good", "-m", "llama4-maverick"], ["llama4-maverick"]),
]

IMPORT_CASES = [
    (["trace", "import", T % "random.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["random.npy"]),
    (["trace", "import", T % "random.npy", "--format", "vllm", "--out", "{dir}/o.parquet"], ["random.npy"]),
    (["trace", "import", T % "random.npz", "--format", "vllm", "--out", "{dir}/o.parquet"], ["random.npz"]),
    (["trace", "import", T % "object.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["object.npy", "allow_pickle"]),
    (["trace", "import", T % "pickled.npy", "--format", "vllm", "--out", "{dir}/o.parquet"], ["pickled.npy", "pickled"]),
    (["trace", "import", T % "empty.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["empty.npy", "empty"]),
    (["trace", "import", T % "floats.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["floats.npy", "float64"]),
    (["trace", "import", T % "huge_ids.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["1099511627776"]),
    (["trace", "import", T % "huge_ids.npy", "--format", "vllm", "--out", "{dir}/o.parquet"], ["1099511627776"]),
    (["trace", "import", T % "neg_ids.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["-1"]),
    (["trace", "import", T % "text.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["text.npy", "<U1"]),
    (["trace", "import", T % "ids_70000.npz", "--format", "vllm", "--out", "{dir}/o.parquet"], ["70000"]),
    (["trace", "import", T % "float_lengths.npz", "--format", "vllm", "--out", "{dir}/o.parquet"], ["request_lengths", "1.5"]),
    (["trace", "import", T % "bad_offsets.npz", "--format", "vllm", "--out", "{dir}/o.parquet"], ["request boundaries", "[0, 3]"]),
    (["trace", "import", T % "random.csv", "--format", "csv", "--out", "{dir}/o.parquet"], ["random.csv"]),
    (["trace", "import", T % "README", "--format", "moe-lightning", "--out", "{dir}/o.parquet"], ["README.md", "input_ids"]),
    (["trace", "import", T % "good", "--format", "yaml", "--out", "{dir}/o.parquet"], ["yaml"]),
    (["trace", "import", "{dir}/absent.npy", "--format", "numpy", "--out", "{dir}/o.parquet"], ["absent.npy"]),
    (["trace", "import", T % "huge_ids.npy", "--format", "numpy", "--num-experts", "0", "--out", "{dir}/o.parquet"], ["--num-experts", "'0'"]),
    (["trace", "import", T % "huge_ids.npy", "--format", "numpy", "--num-experts", "70000", "--out", "{dir}/o.parquet"], ["--num-experts", "70000"]),
    (["trace", "import", T % "random.npy", "--format", "numpy", "--model", "nope", "--out", "{dir}/o.parquet"], ["nope"]),
]

SPEC_CASES = [
    (["simulate", "--set", "link.bandwidth_gbps=1e-30"], ["link.bandwidth_gbps", "1e-30", "GB/s"]),
    (["simulate", "--set", "link.bandwidth_gbps=0"], ["bandwidth_gbps", "0"]),
    (["simulate", "--set", "link.bandwidth_gbps=-1"], ["bandwidth_gbps", "-1"]),
    (["simulate", "--set", "link.bandwidth_gbps=-inf"], ["bandwidth_gbps", "-inf"]),
    (["simulate", "--set", "cpu.memory_gb=inf"], ["cpu.memory_gb", "inf"]),
    (["simulate", "--set", "link.bandwidth_gbps=nan"], ["bandwidth_gbps", "nan"]),
    (["simulate", "--set", "link.bandwidth_gbps=fast"], ["link.bandwidth_gbps", "fast"]),
    (["simulate", "--set", "gpu.memory_gb=1e400"], ["gpu.memory_gb", "inf"]),
    (["simulate", "--set", "link.bandwidth_gbps=1e7"], ["link.bandwidth_gbps", "10000000.0", "GB/s"]),
    (["simulate", "--set", "gpu.tflops.bf16=1e-30"], ["gpu.tflops.bf16", "1e-30", "TFLOP/s"]),
    (["simulate", "--set", "gpu.tflops=5"], ["gpu.tflops", "table"]),
    (["simulate", "--set", "gpu.memory_gb=inf"], ["gpu.memory_gb", "inf"]),
    (["simulate", "--set", "gpu.memory_gb=1e-30"], ["gpu.memory_gb", "1e-30", "GB"]),
    (["simulate", "--set", "gpu.workspace_gb=100"], ["gpu.workspace_gb", "100"]),
    (["simulate", "--set", "gpu.compute_efficiency=2"], ["gpu.compute_efficiency", "2"]),
    (["simulate", "--set", "cpu.tflops=1e-12"], ["cpu.tflops", "1e-12"]),
    (["simulate", "--set", "storage.bandwidth_gbps=1e-9"], ["storage.bandwidth_gbps", "1e-09"]),
    (["simulate", "--set", "link.copy_engines=0"], ["copy_engines", "0"]),
    (["simulate", "--set", "link.copy_engines=1.5"], ["link.copy_engines", "1.5"]),
    (["simulate", "--set", "model.expert_matrices=0"], ["model.expert_matrices", "0"]),
    (["simulate", "--set", "model.expert_params_override=-5"], ["model.expert_params_override", "-5"]),
    (["simulate", "--set", "model.num_shared_experts=-1"], ["model.num_shared_experts", "-1"]),
    (["simulate", "--set", "model.num_experts=1e9"], ["model.num_experts", "1000000000"]),
    (["simulate", "--set", "model.top_k=100"], ["top_k", "100"]),
    (["simulate", "--set", "model.dtype=int1"], ["int1"]),
    (["simulate", "--set", "link.bandwdth_gbps=5"], ["bandwdth_gbps", "bandwidth_gbps"]),
    (["simulate", "--set", "nokey=5"], ["nokey"]),
    (["simulate", "--set", "link.bandwidth_gbps"], ["link.bandwidth_gbps", "KEY=VALUE"]),
    (["simulate", "-m", "mixtrl-8x7b"], ["mixtrl-8x7b", "mixtral-8x7b"]),
    (["simulate", "-H", "a4"], ["a4"]),
    (["simulate", "-m", T % "binary.toml"], ["binary.toml"]),
    (["simulate", "-m", T % "bad_model.toml"], ["many"]),
]

OPTION_CASES = [
    (["simulate", "--cache-gb", "nan"], ["--cache-gb", "nan"]),
    (["simulate", "--cache-gb", "inf"], ["--cache-gb", "inf"]),
    (["simulate", "--cache-gb", "-1"], ["--cache-gb", "-1"]),
    (["cache", "--cache-gb", "nan", "-m", PRESET], ["--cache-gb", "nan"]),
    (["cache", "--cache-gb", "1"], ["--cache-gb", "--model"]),
    (["simulate", "--max-tokens", "0"], ["--max-tokens", "'0'"]),
    (["simulate", "--max-tokens", "-5"], ["--max-tokens", "'-5'"]),
    (["simulate", "--max-tokens", "many"], ["--max-tokens", "'many'"]),
    (["simulate", "--requests", "0"], ["--requests", "'0'"]),
    (["simulate", "--prefill-chunk", "0"], ["--prefill-chunk", "'0'"]),
    (["simulate", "--seed", "-1"], ["--seed", "'-1'"]),
    (["simulate", "--batch", "0"], ["--batch", "'0'"]),
    (["simulate", "--rate", "0"], ["--rate", "0"]),
    (["simulate", "--rate", "inf"], ["--rate", "inf"]),
    (["simulate", "--rate", "nan"], ["--rate", "nan"]),
    (["simulate", "--copy-chunk-mb", "0"], ["--copy-chunk-mb", "0"]),
    (["simulate", "--copy-chunk-mb", "inf"], ["--copy-chunk-mb", "inf"]),
    (["simulate", "--rate", "2", "--offline"], ["--rate", "--offline"]),
    (["simulate", "--per-layer", "2", "--global-slots", "4"], ["--per-layer", "--global-slots"]),
    (["cache", "--per-layer", "-1"], ["--per-layer", "'-1'"]),
    (["cache", "--global-slots", "-2"], ["--global-slots", "'-2'"]),
    (["cache", "-p", "lru", "--system", "no-cache"], ["--policy lru", "--system no-cache"]),
    (["simulate", "-p", "lru", "--system", "fiddler"], ["--policy lru", "--system fiddler"]),
    (["cache", "-p", "lruu"], ["lruu", "lru"]),
    (["cache", "--system", "fidler"], ["fidler", "fiddler"]),
    (["cache", "--param", "nokey"], ["nokey", "KEY=VALUE"]),
    (["cache", "--param", "accuracy=nan"], ["accuracy", "nan"]),
    (["cache", "--system", "fiddler", "--param", "profile_fraction=nan"], ["profile_fraction", "nan"]),
    (["cache", "--system", "fiddler", "--param", "profile_fraction=lots"], ["profile_fraction", "lots"]),
    (["cache", "--system", "fiddler", "--param", "profil=x"], ["profil", "profile"]),
    (["cache", "--phase", "both"], ["both"]),
    (["cache", "--nope"], ["--nope"]),
    (["trace", "synth", "--out", "{dir}/s.parquet", "--uniform", "--model", PRESET, "--decode-tokens", "0"], ["--decode-tokens", "'0'"]),
    (["trace", "synth", "--out", "{dir}/s.parquet", "--uniform", "--model", PRESET, "--requests", "0"], ["--requests", "'0'"]),
    (["trace", "synth", "--out", "{dir}/s.parquet", "--zipf", "-1", "--model", PRESET], ["--zipf", "-1"]),
    (["trace", "synth", "--out", "{dir}/s.parquet", "--zipf", "nan", "--model", PRESET], ["--zipf", "nan"]),
    (["trace", "split", T % "good", "--train", "{dir}/a.parquet", "--held-out", "{dir}/b.parquet", "--fraction", "1.5"], ["1.5"]),
    (["trace", "slice", T % "good", "--out", "{dir}/s.parquet", "--requests", "a:b"], ["a:b"]),
    (["trace", "slice", T % "good", "--out", "{dir}/s.parquet", "--max-tokens", "0"], ["--max-tokens", "'0'"]),
    (["results", "{sweep}", "--limit", "0"], ["--limit", "'0'"]),
    (["results", "{sweep}", "--limit", "-5"], ["--limit", "'-5'"]),
    (["sweep", T % "typo_key.toml", "--out", "{dir}/o", "--jobs", "-1"], ["--jobs", "'-1'"]),
    (["validate", "--device", "cpu", "--experts-scale", "nan", "--out", "{dir}/v"], ["--experts-scale", "nan"]),
    (["calibrate", "--device", "cpu", "--link-gbps", "0", "--out", "{dir}/p.json"], ["--link-gbps", "0"]),
    (["calibrate", "--device", "tpu", "--out", "{dir}/p.json"], ["tpu"]),
]

PATH_CASES = [
    (["simulate", "--timeline", "{a_file}/t.json"], ["--timeline", "a_file"]),
    (["simulate", "--timeline", "{dir}"], ["--timeline", "folder"]),
    (["trace", "synth", "--out", "{a_file}/s.parquet", "--uniform", "--model", PRESET], ["--out", "a_file"]),
    (["trace", "import", T % "good", "--format", "parquet", "--out", "{a_file}/o.parquet"], ["--out", "a_file"]),
    (["trace", "slice", T % "good", "--out", "{a_file}/deeper/s.parquet"], ["--out", "a_file"]),
    (["trace", "split", T % "good", "--train", "{a_file}/a.parquet", "--held-out", "{dir}/b.parquet"], ["--train", "a_file"]),
    (["trace", "stats", T % "good", "--html", "{a_file}/h.html"], ["--html", "a_file"]),
    (["trace", "fit", T % "good", "--out", "{a_file}/f.json"], ["--out", "a_file"]),
    (["report", "{sweep}", "--path", "{a_file}/r.html"], ["--path", "a_file"]),
    (["report", "{dir}/no_such_sweep"], ["no_such_sweep"]),
    (["calibrate", "--device", "cpu", "--out", "{a_file}/p.json"], ["--out", "a_file"]),
    (["validate", "--device", "cpu", "--out", "{a_file}/v"], ["--out", "a_file"]),
    (["validate", "--device", "cpu", "--out", "{a_file}"], ["--out", "a_file", "not a folder"]),
    (["sweep", T % "typo_key.toml", "--out", "{a_file}"], ["--out", "a_file", "not a folder"]),
    (["sweep", T % "typo_key.toml", "--out", "{a_file}/o"], ["--out", "a_file"]),
]

SWEEP_CASES = [
    (["sweep", T % "binary.toml", "--out", "{dir}/o"], ["binary.toml", "not a text file"]),
    (["sweep", T % "typo_override.toml", "--out", "{dir}/o", "--plan"], ["bandwidht_gbps", "bandwidth_gbps"]),
    (["sweep", T % "zero_bw.toml", "--out", "{dir}/o", "--plan"], ["bandwidth_gbps", "0"]),
    (["sweep", T % "typo_key.toml", "--out", "{dir}/o", "--plan"], ["typo_key.toml", "cache_per_layr", "cache_per_layer"]),
    (["sweep", T % "bad_policy.toml", "--out", "{dir}/o", "--plan"], ["lruu"]),
    (["sweep", T % "nan_cache.toml", "--out", "{dir}/o", "--plan"], ["cache_gb", "nan"]),
    (["sweep", "{dir}/absent.toml", "--out", "{dir}/o"], ["absent.toml"]),
    (["results", "{garbage_sweep}"], ["garbage_sweep", "0123456789abcdef.json"]),
    (["results", "{bad_table}"], ["results.parquet"]),
    (["results", "{dir}/absent_sweep"], ["absent_sweep"]),
    (["results", "{sweep}", "--sort", "nosuch"], ["nosuch"]),
    (["results", "{sweep}", "--columns", "run_id,nosuch"], ["nosuch"]),
    (["results", "{sweep}", "--format", "yaml"], ["yaml"]),
    (["results", "{sweep}", "--filter", "pl.DataFrame().write_csv('x')"], ["--filter", "write_csv"]),
    (["results", "{sweep}", "--filter", "__import__('os').system('true')"], ["--filter", "__import__"]),
    (["results", "{sweep}", "--filter", "status = "], ["--filter", "status = "]),
    (["results", "{sweep}", "--filter", "nosuch = 1"], ["nosuch"]),
    (["results", "{sweep}", "--filter", "tpot_ms"], ["tpot_ms"]),
]

OTHER_CASES = [
    (["cache", "--plugin", T % "syntax_plugin.py"], ["syntax_plugin.py:3", "SyntaxError"]),
    (["cache", "--plugin", T % "raising_plugin.py"], ["raising_plugin.py:2", "plugin boom"]),
    (["cache", "--plugin", "{dir}/absent_plugin.py"], ["absent_plugin.py"]),
    (["cache", "--plugin", "no_such_module_xyz"], ["no_such_module_xyz"]),
    (["validate", "--device", "cpu", "-t", T % "prefill_only", "--out", "{dir}/v"], ["prefill_only", "decode"]),
    (["specs", "show", "nope"], ["nope"]),
    (["trace", "synth", "--out", "{dir}/s.parquet", "--fit", "nofit"], ["nofit"]),
]

CASES = TRACE_CASES + IMPORT_CASES + SPEC_CASES + OPTION_CASES + PATH_CASES + SWEEP_CASES + OTHER_CASES


def _fill(arg: str, files: dict) -> str:
    """``{name}`` -> the fixture's path of that name (a file of the fixture's folder)."""
    import re

    return re.sub(r"\{([^{}]+)\}", lambda m: str(files.get(m.group(1), files["dir"] / m.group(1))), arg)


def test_catalogue_is_large_and_distinct():
    assert len(CASES) >= 100
    assert len({tuple(args) for args, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("args, words", CASES, ids=[" ".join(a)[:70] for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(args, words, files, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing a case writes lands in the repository
    argv = [_fill(a, files) for a in args]
    monkeypatch.setattr("sys.argv", ["expertsim", *argv])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert _fill(word, files) in lines[0], (word, lines[0])


def test_malicious_filter_runs_nothing(files, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    for text in ("pl.DataFrame().write_csv('x')", "__import__('os').system('touch y')",
                 "read_csv('x')", "1; COPY x TO 'y'"):
        monkeypatch.setattr("sys.argv", ["expertsim", "results", str(files["sweep"]), "--filter", text])
        with pytest.raises(SystemExit) as info:
            main()
        assert info.value.code == 2
        assert capsys.readouterr().err.startswith("error: --filter")
    assert list(tmp_path.iterdir()) == []


def test_valid_edge_inputs_still_work(files, monkeypatch, capsys, tmp_path):
    """Valid inputs near the edges give a result, not an error: a path with a space, a cache
    larger than the number of experts, a SQL filter that keeps the row."""
    def run(*args):
        monkeypatch.setattr("sys.argv", ["expertsim", *args])
        with pytest.raises(SystemExit) as info:
            main()
        return info.value.code, capsys.readouterr()

    code, out = run("cache", "-t", str(files["good"]), "--per-layer", "100", "--json")
    assert code == 0, out.err
    result = json.loads(out.out)
    assert result["misses"] == result["accesses"] - result["hits"] and 0 <= result["hit_rate"] <= 1
    code, out = run("results", str(files["sweep"]), "--filter", "hit_rate >= 0.5 AND status = 'ok'",
                    "--format", "csv")
    assert code == 0 and "00000000000000aa" in out.out
    spaced = tmp_path / "a folder with spaces" / "t.parquet"
    code, out = run("trace", "synth", "--out", str(spaced), "--uniform", "--model", PRESET,
                    "--requests", "1", "--decode-tokens", "2", "--prefill-tokens", "1")
    assert code == 0 and spaced.is_file(), out.err


def test_torn_run_file_is_rerun_with_a_warning(tmp_path, capsys):
    from expertsim.analysis.study import expand
    from expertsim.analysis.sweep import finished_run_ids, run_sweep

    study = expand({"fixed": {"model": PRESET, "hardware": "a40", "trace_max_tokens": 8,
                              "trace_phase": "decode", "cache_per_layer": 2},
                    "grid": {"policy": ["lru", "lfu"]}})
    out = tmp_path / "sweep"
    run_sweep(study, out, jobs=1, progress=False)
    assert finished_run_ids(out) == set(study.run_ids)
    torn = out / "runs" / f"{study.run_ids[0]}.json"
    torn.write_bytes(torn.read_bytes()[:40])
    stale = out / "runs" / ".x.json.999999999.tmp"
    stale.write_text("{")
    assert finished_run_ids(out) == {study.run_ids[1]}
    import io

    stream = io.StringIO()
    summary = run_sweep(study, out, jobs=1, progress=False, stream=stream)
    assert summary.ran == 1 and summary.skipped == 1
    assert f"{study.run_ids[0]}.json is torn" in stream.getvalue()
    assert finished_run_ids(out) == set(study.run_ids) and not stale.exists()
    assert json.loads(torn.read_text())["status"] == "ok"
