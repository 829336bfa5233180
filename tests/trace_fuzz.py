"""Mutation fuzzing of trace files: shared by tests/traces/test_fuzz_traces.py (a bounded
hypothesis run in CI) and benchmarks/fuzz_traces.py (a long seeded run).

A mutation starts from a small valid Mixtral-shaped trace (Parquet bytes and the long-format
frame) and applies one to three operations: to the file's bytes (flip, cut, splice, zero), to its
columns (drop, rename, cast to another dtype, add junk), to its values (a cell set to an edge
value: negative, huge, NaN, null, out of range), to its rows (duplicate, shuffle, drop), or to its
metadata (num_experts, model). ``outcome(path)`` then reads the file and, when it is accepted,
runs what a user would: ``trace info``'s scan, the cache replay, the LRU miss-ratio curve and a
short simulation. Every outcome must be ``"ok"`` (valid numbers) or ``"rejected"`` (the
project's own ExpertSimError); anything else is ``"crash"`` (another exception, a polars panic
included) or ``"invalid"`` (a hit rate outside [0, 1], a negative or non-finite time).
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from expertsim.errors import ExpertSimError
from expertsim.traces import RoutingTrace, trace_to_frame

MODEL = "mixtral-8x7b"
EDGE_VALUES = [None, -1, 0, 1, 7, 8, 9, 31, 32, 255, 256, 65535, 65536, 70000, 2**31 - 1, 2**31,
               2**40, 2**63 - 1, -(2**63), 0.5, 1.0, 1.5, -0.25, float("nan"), float("inf"),
               float("-inf"), 1e-300, "decode", "prefill", "x", ""]
DTYPES = [pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64,
          pl.Float32, pl.Float64, pl.String, pl.Categorical, pl.Boolean]
META_VALUES = ["8", "8.5", "0", "-3", "1e9", "65536", "65537", "abc", "", "mixtral-8x7b",
               "llama4-maverick", "deepseek-v2-lite", "tiny-mixtral-8x7b"]


def base_trace(requests: int = 2, prompt: int = 3, decode: int = 3, seed: int = 0) -> RoutingTrace:
    """A valid trace: ``requests`` requests of ``prompt`` prefill + ``decode`` decode tokens,
    32 MoE layers, top-2 of 8 with gate weights."""
    rng = np.random.default_rng(seed)
    n = prompt + decode
    experts = np.stack([np.stack([rng.choice(8, size=2, replace=False) for _ in range(32)])
                        for _ in range(requests * n)])
    step = np.r_[np.zeros(prompt, dtype=int), np.arange(1, decode + 1)]
    weights = rng.random(experts.shape).astype(np.float32)
    weights /= weights.sum(axis=2, keepdims=True)
    return RoutingTrace(experts=experts, request=np.repeat(np.arange(requests), n),
                        step=np.tile(step, requests), position=np.tile(np.arange(n), requests),
                        phase=np.tile(np.r_[np.zeros(prompt, int), np.ones(decode, int)], requests),
                        num_experts=8, weights=weights, metadata={"model": MODEL})


def _frame_bytes(frame: pl.DataFrame, metadata: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    frame.write_parquet(buf, metadata=metadata)
    return buf.getvalue()


@dataclass
class Mutant:
    data: bytes
    ops: list[str]


def mutate(rnd: random.Random, *, base: pl.DataFrame | None = None) -> Mutant:
    """One mutant of the base trace, driven by ``rnd`` (seeded: reproducible)."""
    frame = base if base is not None else trace_to_frame(base_trace())
    meta = {"expertsim.num_experts": "8", "expertsim.model": MODEL}
    ops: list[str] = []
    byte_ops = []
    for _ in range(rnd.randint(1, 3)):
        kind = rnd.choice(["cell", "cell", "cell", "cast", "column", "rows", "meta", "bytes"])
        if kind == "bytes":
            byte_ops.append(rnd.choice(["flip", "cut", "splice", "zero", "garbage"]))
            continue
        try:
            frame, op = _mutate_frame(rnd, frame, meta, kind)
        except (pl.exceptions.PolarsError, ValueError, TypeError, OverflowError):
            continue  # the mutation itself cannot be built (an impossible cast): skip it
        ops.append(op)
    try:
        data = _frame_bytes(frame, meta)
    except (pl.exceptions.PolarsError, ValueError, TypeError):
        data = _frame_bytes(base if base is not None else trace_to_frame(base_trace()), meta)
        ops.append("unwritable->base")
    for op in byte_ops:
        data = _mutate_bytes(rnd, data, op)
        ops.append(f"bytes:{op}")
    return Mutant(data=data, ops=ops)


def _mutate_frame(rnd: random.Random, df: pl.DataFrame, meta: dict, kind: str):
    col = rnd.choice(df.columns) if df.columns else None
    if kind == "cell" and col is not None and df.height:
        row = rnd.randrange(df.height)
        value = rnd.choice(EDGE_VALUES)
        values = df[col].to_list()
        values[row] = value
        try:
            series = pl.Series(col, values, dtype=df[col].dtype, strict=True)
        except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
            series = pl.Series(col, values, strict=False)  # the value does not fit: widen the column
        return df.with_columns(series), f"cell:{col}[{row}]={value!r}"
    if kind == "cast" and col is not None:
        dtype = rnd.choice(DTYPES)
        if dtype == pl.Categorical:
            return df.with_columns(pl.col(col).cast(pl.String).cast(pl.Categorical)), f"cast:{col}->Categorical"
        return df.with_columns(pl.col(col).cast(dtype, strict=False)), f"cast:{col}->{dtype}"
    if kind == "column" and col is not None:
        op = rnd.choice(["drop", "rename", "junk", "shift_ids"])
        if op == "drop":
            return df.drop(col), f"drop:{col}"
        if op == "rename":
            new = rnd.choice(["expert_5", "weight_9", "layer", "x_junk", "spec_d1_0", "prob_0", col.upper()])
            if new in df.columns:
                return df, "rename:noop"
            return df.rename({col: new}), f"rename:{col}->{new}"
        if op == "junk":
            name = rnd.choice(["spec_d1_0", "prob_0", "x_extra", "token_id", "weight_0"])
            value = rnd.choice(EDGE_VALUES[1:])
            return df.with_columns(pl.lit(value).alias(name)), f"junk:{name}={value!r}"
        if df[col].dtype.is_integer():
            shift = rnd.choice([-1, 1, 8, 1000, 2**20])
            return df.with_columns((pl.col(col).cast(pl.Int64) + shift).alias(col)), f"shift:{col}+{shift}"
        return df, "shift:noop"
    if kind == "rows" and df.height:
        op = rnd.choice(["dup", "shuffle", "reverse", "head", "tail", "drop_one", "sort_desc"])
        if op == "dup":
            i = rnd.randrange(df.height)
            return pl.concat([df.slice(0, i + 1), df.slice(i, 1), df.slice(i + 1)]), f"dup:{i}"
        if op == "shuffle":
            return df.sample(fraction=1.0, shuffle=True, seed=rnd.randrange(2**31)), "shuffle"
        if op == "reverse":
            return df.reverse(), "reverse"
        if op == "head":
            n = rnd.randrange(df.height)
            return df.head(n), f"head:{n}"
        if op == "tail":
            n = rnd.randrange(df.height)
            return df.tail(n), f"tail:{n}"
        if op == "drop_one":
            i = rnd.randrange(df.height)
            return pl.concat([df.slice(0, i), df.slice(i + 1)]), f"drop_row:{i}"
        return df.sort(by=df.columns[rnd.randrange(len(df.columns))], descending=True), "sort_desc"
    if kind == "meta":
        key = rnd.choice(["expertsim.num_experts", "expertsim.model"])
        meta[key] = rnd.choice(META_VALUES)
        return df, f"meta:{key}={meta[key]!r}"
    return df, "noop"


def _mutate_bytes(rnd: random.Random, data: bytes, op: str) -> bytes:
    b = bytearray(data)
    if not b:
        return bytes(rnd.randbytes(rnd.randint(0, 64)))
    if op == "flip":
        for _ in range(rnd.randint(1, 8)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif op == "cut":
        b = b[: rnd.randrange(len(b))]
    elif op == "splice":
        i = rnd.randrange(len(b))
        b[i:i] = rnd.randbytes(rnd.randint(1, 64))
    elif op == "zero":
        i = rnd.randrange(len(b))
        b[i: i + rnd.randint(1, 64)] = bytes(min(64, len(b) - i))
    else:
        b = bytearray(rnd.randbytes(rnd.randint(0, 2048)))
    return bytes(b)


# --- outcomes ------------------------------------------------------------------------------
def _check_metrics(metrics: dict, *, has_decode: bool) -> str | None:
    """None when every time and rate is finite and non-negative and every hit rate is in [0, 1].
    NaN means "nothing to measure" and is allowed only there: decode metrics (TPOT, tokens/s, ...)
    of a trace without decode tokens, and the hit rate of a phase without accesses."""
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if value != value:
            if not has_decode or "hit_rate" in key or "prefill" in key:
                continue
            return f"{key}=nan with decode tokens"
        if "hit_rate" in key and not 0.0 <= value <= 1.0:
            return f"{key}={value}"
        is_time = key.endswith(("_ms", "_s", "_ns", "_us")) or "per_s" in key
        if is_time and (not math.isfinite(value) or value < 0):
            return f"{key}={value}"
    return None


def outcome(path: str | Path) -> tuple[str, str]:
    """("ok" | "rejected" | "crash" | "invalid", detail) for the trace file at ``path``."""
    try:
        return _outcome(Path(path))
    except ExpertSimError as exc:
        return "rejected", str(exc)[:200]
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - a crash is what we are looking for
        return "crash", f"{type(exc).__name__}: {str(exc)[:300]}"


def _outcome(path: Path) -> tuple[str, str]:
    from expertsim.policies import CacheConfig, make_policy
    from expertsim.sim import Simulation
    from expertsim.sim.cache_replay import replay_cache
    from expertsim.sim.mrc import lru_mrc
    from expertsim.specs import load_hardware, load_model
    from expertsim.traces import read_trace
    from expertsim.traces.ops import lazy_info

    info = lazy_info(path)
    if not (info["tokens"] >= 0 and info["layers"] >= 1 and info["requests"] >= 0):
        return "invalid", f"trace info {info}"
    trace = read_trace(path)
    model, hardware = load_model(MODEL), load_hardware("a40")
    if trace.num_tokens < 1 or not np.isfinite(trace.weights if trace.weights is not None else 0).all():
        return "invalid", "accepted a trace without tokens or with non-finite weights"
    for phase in ("all", "decode"):
        if phase == "decode" and not (trace.phase == 1).any():
            continue
        result = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=2), model=model, phase=phase)
        if result.hits < 0 or result.misses < 0 or not 0.0 <= result.hit_rate <= 1.0:
            return "invalid", f"cache replay {result.to_dict()}"
        curve = lru_mrc(trace, model=model, phase=phase)
        rates = np.asarray(curve.hit_rate, dtype=float)
        if not (np.isfinite(rates).all() and ((rates >= 0) & (rates <= 1)).all()
                and (np.diff(rates) >= -1e-12).all()):
            return "invalid", f"mrc {curve.to_dict()}"
    sim = Simulation(model, hardware, make_policy("lru"), CacheConfig(per_layer=2))
    head = trace.max_tokens(64)
    bad = _check_metrics(sim.run(head).metrics, has_decode=bool((head.phase == 1).any()))
    if bad:
        return "invalid", f"simulation metric {bad}"
    return "ok", ""
