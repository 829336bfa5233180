"""Read and write routing traces as long-format Parquet (one row per token and MoE layer).

Columns: request, step, position, phase ('prefill'/'decode'), optional token_id, layer (MoE layer
index, 0-based), expert_0..expert_{k-1} (router order, best first), optional
weight_0..weight_{k-1}. Sorted by request, position, layer. File-level key/value metadata carries
``expertsim.*`` keys (model, source, dataset, num_experts, format version).

``RoutingTrace.extras`` round-trip as further columns of the same rows (token t, layer l):

- ``spec_d{d}`` ([tokens, layers, k], speculative routing: layer l+d's router on layer l's
  hidden state) -> columns ``spec_d{d}_0..spec_d{d}_{k-1}`` (UInt8/UInt16; the sentinel for "layer
  l+d does not exist" is the dtype's largest value, also in metadata ``spec_invalid``);
- ``router_probs`` ([tokens, layers, experts] float16) -> columns ``prob_0..prob_{E-1}`` (Float32
  on disk, float16 in memory);
- any other ``[tokens, layers, n]`` array ``name`` -> columns ``x_{name}_0..``, and a ``[tokens]``
  array -> column ``x_{name}`` (repeated on the token's layer rows). The dtype is kept.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from expertsim.errors import TraceError, foreign_errors
from expertsim.traces.trace import PHASE_NAMES, RoutingTrace, expert_dtype

FORMAT_VERSION = "1"
REQUIRED = ("request", "step", "position", "phase", "layer", "expert_0")
_META_PREFIX = "expertsim."


def _polars():
    import polars as pl

    return pl


def _columns_k(names: list[str], prefix: str) -> list[str]:
    found = sorted(
        (int(m.group(1)), n) for n in names if (m := re.fullmatch(rf"{prefix}_(\d+)", n))
    )
    cols = [n for _, n in found]
    expected = [f"{prefix}_{i}" for i in range(len(cols))]
    if cols != expected:
        raise TraceError(
            f"{prefix} columns must be {prefix}_0..{prefix}_{len(cols) - 1} without gaps, found {cols}"
        )
    return cols


def read_metadata(path: str | Path) -> dict[str, str]:
    pl = _polars()
    with foreign_errors(TraceError, f"cannot read {str(path)!r} as a Parquet routing trace",
                        NOT_PARQUET_FIX, hold_native_stderr=True):
        raw = pl.read_parquet_metadata(str(path))
    return {k[len(_META_PREFIX):]: v for k, v in raw.items() if k.startswith(_META_PREFIX)}


NOT_PARQUET_FIX = ("the file is truncated or not Parquet; convert other formats with "
                   "`expertsim trace import`")
# Expert ids are stored in 16 bits (uint16); steps and positions must fit int32.
MAX_EXPERTS = 65536
MAX_LAYERS = 4096
MAX_INDEX = 2**31 - 1
MAX_REQUEST = 2**53


def declared_num_experts(metadata: dict | None, source: str) -> int | None:
    """``num_experts`` from a trace's metadata: None when absent, else an integer in
    1..65536 (TraceError otherwise)."""
    raw = (metadata or {}).get("num_experts")
    if raw in (None, ""):
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise TraceError(f"{source}: metadata num_experts={raw!r} is not an integer; rewrite the trace "
                         f"with `expertsim trace import --num-experts N`") from None
    if not 1 <= value <= MAX_EXPERTS:
        raise TraceError(f"{source}: metadata num_experts={value} is outside 1..{MAX_EXPERTS}; "
                         f"rewrite the trace with `expertsim trace import --num-experts N`")
    return value


def _first_bad(df, condition, source: str, col: str, rule: str, fix: str) -> None:
    """Raise TraceError naming the first row (0-based) where ``condition`` holds, if any."""
    keys = [c for c in ("request", "position", "layer") if c in df.columns and c != col]
    bad = df.with_row_index("_row").filter(condition).select("_row", col, *keys).head(1)
    if bad.height:
        row = bad.row(0, named=True)
        where = ", ".join(f"{k} {row[k]}" for k in keys)
        raise TraceError(f"{source}: column {col!r} is {row[col]!r} at row {row['_row']} ({where}); "
                         f"{rule}; {fix}")


def check_frame(df, *, source: str, num_experts: int | None = None) -> None:
    """The trace schema, checked before anything is allocated by an id: columns, dtypes, nulls,
    id ranges and gate weights. The order of tokens (steps, positions) is RoutingTrace.validate's."""
    pl = _polars()
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise TraceError(
            f"{source}: missing column(s) {missing}; a routing trace needs {list(REQUIRED)} "
            f"(plus expert_1.. for top-k > 1); found {df.columns[:20]}"
        )
    expert_cols = _columns_k(df.columns, "expert")
    weight_cols = _columns_k(df.columns, "weight") if any(c.startswith("weight_") for c in df.columns) else []
    if weight_cols and len(weight_cols) != len(expert_cols):
        raise TraceError(
            f"{source}: {len(expert_cols)} expert columns but {len(weight_cols)} weight columns"
        )
    if df.height == 0:
        raise TraceError(f"{source}: the trace has no rows")
    spec_cols = [c for c in df.columns if _SPEC_RE.fullmatch(c)]
    int_cols = ["request", "step", "position", "layer"] + expert_cols + spec_cols + \
        (["token_id"] if "token_id" in df.columns else [])
    for col in int_cols:
        if not df[col].dtype.is_integer():
            raise TraceError(f"{source}: column {col!r} must be integer, got {df[col].dtype}; "
                             f"write ids as integers")
    for col in weight_cols:
        if not df[col].dtype.is_float():
            raise TraceError(f"{source}: gate weight column {col!r} must be float, got {df[col].dtype}; "
                             f"write gate weights as Float32 (or drop the weight columns)")
    if df["phase"].dtype not in (pl.String, pl.Categorical) and not isinstance(df["phase"].dtype, pl.Enum):
        raise TraceError(f"{source}: column 'phase' must be text ('prefill'/'decode'), got {df['phase'].dtype}")
    for col in int_cols + ["phase"] + weight_cols:
        if df[col].null_count():
            _first_bad(df, pl.col(col).is_null(), source, col, "a trace has no missing values",
                       "fill or drop those rows")
    phase = df["phase"].unique().cast(pl.String)  # distinct values only: cheap on big traces
    bad_phase = phase.filter(~phase.is_in(list(PHASE_NAMES)))
    if len(bad_phase):
        raise TraceError(f"{source}: phase must be 'prefill' or 'decode', found {bad_phase[0]!r}")

    max_layers = min(MAX_LAYERS, df.height)
    limit = min(num_experts or MAX_EXPERTS, MAX_EXPERTS)
    ranges = [("request", MAX_REQUEST, "request ids are integers in 0..2^53"),
              ("step", MAX_INDEX, "steps count forward passes from 0 (below 2^31)"),
              ("position", MAX_INDEX, "positions count tokens from 0 (below 2^31)"),
              ("layer", max_layers - 1, f"MoE layer ids run 0..L-1 with one row per token and layer "
                                        f"(at most {max_layers} layers in a {df.height}-row trace)")]
    ranges += [(c, limit - 1, f"expert ids run 0..{limit - 1}"
                + (f" ({num_experts} experts per layer)" if num_experts else " (16-bit storage)"))
               for c in expert_cols]
    # Speculative routing may hold its dtype's largest value as "no such layer".
    ranges += [(c, MAX_EXPERTS - 1, "speculative expert ids fit 16 bits") for c in spec_cols]
    stats = df.select(*[pl.col(c).min().alias(f"{c}:min") for c, _, _ in ranges],
                      *[pl.col(c).max().alias(f"{c}:max") for c, _, _ in ranges]).row(0, named=True)
    for col, high, rule in ranges:
        if stats[f"{col}:min"] < 0 or stats[f"{col}:max"] > high:
            _first_bad(df, (pl.col(col) < 0) | (pl.col(col) > high), source, col, rule,
                       "fix the trace, or check that it belongs to this model")
    for col in weight_cols:
        w = pl.col(col)
        _first_bad(df, ~w.is_finite() | (w < 0) | (w > 1), source, col,
                   "gate weights are finite and in [0, 1]", "drop the weight columns or fix the capture")


def frame_to_trace(df, *, num_experts: int | None = None, metadata: dict | None = None,
                   source: str = "<frame>") -> RoutingTrace:
    """Convert a long-format polars DataFrame to a RoutingTrace, with validation (``check_frame``
    first, so a bad id never sizes an allocation)."""
    pl = _polars()
    declared = num_experts or declared_num_experts(metadata, source)
    check_frame(df, source=source, num_experts=declared)
    expert_cols = _columns_k(df.columns, "expert")
    weight_cols = _columns_k(df.columns, "weight") if any(c.startswith("weight_") for c in df.columns) else []

    layer = df["layer"].to_numpy()
    num_layers = int(layer.max()) + 1
    n_rows = df.height
    expected_layer = np.arange(num_layers)
    ok = n_rows % num_layers == 0 and bool((layer.reshape(-1, num_layers) == expected_layer).all())
    if ok:
        # Each block of num_layers rows must also be one token (same request and position).
        for col in ("request", "position"):
            block = df[col].to_numpy().reshape(-1, num_layers)
            ok = ok and bool((block == block[:, :1]).all())
    if not ok:
        # Find the first token whose layer rows are not exactly 0..L-1, for the message.
        keys = df.select("request", "position").to_numpy()
        i = 0
        while i < n_rows:
            j = i
            while j < n_rows and keys[j, 0] == keys[i, 0] and keys[j, 1] == keys[i, 1]:
                j += 1
            got = layer[i:j]
            if not np.array_equal(got, expected_layer):
                have = sorted(set(got.tolist()))
                lacking = sorted(set(range(num_layers)) - set(have))
                raise TraceError(
                    f"{source}: token at request {keys[i, 0]}, position {keys[i, 1]} has layer rows "
                    f"{have[:8]}{'...' if len(have) > 8 else ''} "
                    f"(missing {lacking[:8]}); every token needs one row per MoE layer 0..{num_layers - 1} "
                    f"in order. Sort by request, position, layer, or truncate the file at a token boundary"
                )
            i = j
        raise TraceError(f"{source}: rows are not grouped one per (token, layer)")

    tok = df.gather_every(num_layers)
    experts = np.stack([df[c].to_numpy() for c in expert_cols], axis=1).reshape(
        n_rows // num_layers, num_layers, len(expert_cols)
    )
    declared = declared or int(experts.max()) + 1  # check_frame bounded every id by `declared`
    weights = None
    if weight_cols:
        weights = np.stack([df[c].cast(pl.Float32).to_numpy() for c in weight_cols], axis=1)
        weights = weights.reshape(experts.shape)
    meta = dict(metadata or {})
    meta.setdefault("num_experts", str(declared))
    trace = RoutingTrace(
        experts=experts.astype(expert_dtype(declared)),
        request=tok["request"].to_numpy(),
        step=tok["step"].to_numpy(),
        position=tok["position"].to_numpy(),
        phase=(tok["phase"].cast(pl.String) == "decode").to_numpy().astype(np.uint8),
        num_experts=declared,
        token_id=tok["token_id"].to_numpy() if "token_id" in tok.columns else None,
        weights=weights,
        metadata=meta,
        extras=_read_extras(df, n_rows // num_layers, num_layers, source),
    )
    trace.validate()
    return trace


_SPEC_RE = re.compile(r"spec_d(\d+)_(\d+)")
_EXTRA_RE = re.compile(r"x_(.+)_(\d+)")


def _read_extras(df, num_tokens: int, num_layers: int, source: str) -> dict:
    """Extras arrays from their columns (see the module docstring)."""
    pl = _polars()
    groups: dict[str, list[tuple[int, str]]] = {}
    singles = []
    for name in df.columns:
        if (m := _SPEC_RE.fullmatch(name)):
            groups.setdefault(f"spec_d{m.group(1)}", []).append((int(m.group(2)), name))
        elif (m := re.fullmatch(r"prob_(\d+)", name)):
            groups.setdefault("router_probs", []).append((int(m.group(1)), name))
        elif (m := _EXTRA_RE.fullmatch(name)):
            groups.setdefault(m.group(1), []).append((int(m.group(2)), name))
        elif name.startswith("x_"):
            singles.append(name)
    extras = {}
    for key, cols in groups.items():
        cols.sort()
        if [i for i, _ in cols] != list(range(len(cols))):
            raise TraceError(f"{source}: extra {key!r} columns {[c for _, c in cols]} have gaps")
        if any(df[c].null_count() for _, c in cols):
            raise TraceError(f"{source}: extra {key!r} has missing values")
        if key == "router_probs":
            if not all(df[c].dtype.is_numeric() for _, c in cols):
                raise TraceError(f"{source}: router probability columns prob_* must be numeric; "
                                 f"drop them or write them as Float32")
            for _, c in cols:
                p = pl.col(c).cast(pl.Float64)
                _first_bad(df, ~p.is_finite() | (p < 0) | (p > 1), source, c,
                           "router probabilities are finite and in [0, 1]", "drop the prob_* columns")
        arr = np.stack([df[c].to_numpy() for _, c in cols], axis=1).reshape(num_tokens, num_layers, len(cols))
        extras[key] = arr.astype(np.float16) if key == "router_probs" else arr
    for name in singles:
        extras[name[2:]] = df[name].to_numpy()[::num_layers]
    return extras


def read_trace(path: str | Path, *, num_experts: int | None = None) -> RoutingTrace:
    """Read a long-format Parquet routing trace (the format of ../shared/traces and of
    ``write_trace``). Raises TraceError with the problem and its fix on bad input."""
    pl = _polars()
    path = Path(path)
    if not path.exists():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    if path.is_dir():
        raise TraceError(f"trace path {str(path)!r} is a directory; give a .parquet file")
    metadata = read_metadata(path)
    with foreign_errors(TraceError, f"cannot read {str(path)!r} as a Parquet routing trace",
                        NOT_PARQUET_FIX, hold_native_stderr=True):
        df = pl.read_parquet(path)
    metadata.setdefault("path", str(path))
    metadata.setdefault("source", path.name)
    return frame_to_trace(df, num_experts=num_experts, metadata=metadata, source=str(path))


def trace_to_frame(trace: RoutingTrace):
    """The long-format polars DataFrame of a trace (one row per token and layer)."""
    pl = _polars()
    n, num_layers, k = trace.experts.shape
    rep = lambda a: np.repeat(a, num_layers)  # noqa: E731
    cols = {
        "request": pl.Series(rep(trace.request), dtype=pl.UInt32),
        "step": pl.Series(rep(trace.step), dtype=pl.UInt32),
        "position": pl.Series(rep(trace.position), dtype=pl.UInt32),
        "phase": pl.Series(np.array(PHASE_NAMES)[rep(trace.phase)]).cast(pl.Categorical),
    }
    if trace.token_id is not None:
        cols["token_id"] = pl.Series(rep(trace.token_id), dtype=pl.UInt32)
    cols["layer"] = pl.Series(np.tile(np.arange(num_layers), n), dtype=pl.UInt16 if num_layers > 255 else pl.UInt8)
    flat = trace.experts.reshape(n * num_layers, k)
    edt = pl.UInt8 if trace.num_experts <= 256 else pl.UInt16
    for j in range(k):
        cols[f"expert_{j}"] = pl.Series(flat[:, j], dtype=edt)
    if trace.weights is not None:
        wflat = trace.weights.reshape(n * num_layers, k)
        for j in range(k):
            cols[f"weight_{j}"] = pl.Series(wflat[:, j], dtype=pl.Float32)
    for key, arr in trace.extras.items():
        arr = np.asarray(arr)
        if arr.shape[0] != n:
            raise TraceError(f"extra {key!r} has {arr.shape[0]} rows but the trace has {n} tokens")
        if arr.ndim == 1:
            cols[f"x_{key}"] = pl.Series(rep(arr))
            continue
        if arr.ndim != 3 or arr.shape[1] != num_layers:
            raise TraceError(
                f"extra {key!r} has shape {arr.shape}; extras are [tokens] or [tokens, layers, n] "
                f"arrays (layers = {num_layers})"
            )
        flat_x = arr.reshape(n * num_layers, arr.shape[2])
        if re.fullmatch(r"spec_d\d+", key):
            names = [f"{key}_{j}" for j in range(arr.shape[2])]
        elif key == "router_probs":
            names = [f"prob_{e}" for e in range(arr.shape[2])]
            flat_x = flat_x.astype(np.float32)
        else:
            names = [f"x_{key}_{j}" for j in range(arr.shape[2])]
        for j, name in enumerate(names):
            cols[name] = pl.Series(flat_x[:, j])
    return pl.DataFrame(cols)


def write_trace(trace: RoutingTrace, path: str | Path, **metadata: str) -> Path:
    """Write ``trace`` as zstd Parquet with its metadata (plus any keyword metadata given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**trace.metadata, **metadata, "num_experts": str(trace.num_experts),
            "format_version": FORMAT_VERSION}
    meta.pop("path", None)
    kv = {f"{_META_PREFIX}{k}": v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    tmp = path.with_name(path.name + ".tmp")
    trace_to_frame(trace).write_parquet(tmp, compression="zstd", metadata=kv)
    tmp.replace(path)
    return path
