"""Trace handling: split by request, slice, concatenate, and lazy scans of large Parquet traces.

A lazy scan (``scan_trace``) is a polars LazyFrame over the file: filters and aggregations run
streaming, so ``info`` and request/layer slices never load a whole large trace.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from expertsim.errors import TraceError
from expertsim.traces.trace import RoutingTrace


def concat(traces: list[RoutingTrace], *, renumber: bool = False) -> RoutingTrace:
    """Traces one after another. Requests must not repeat across inputs unless ``renumber``
    (then each input's requests are shifted past the previous input's largest id)."""
    if not traces:
        raise TraceError("concat needs at least one trace")
    first = traces[0]
    for i, t in enumerate(traces[1:], 1):
        if t.experts.shape[1:] != first.experts.shape[1:]:
            raise TraceError(
                f"trace {i} has {t.num_layers} layers x top-{t.top_k} but trace 0 has "
                f"{first.num_layers} x top-{first.top_k}; only traces of one model concatenate"
            )
        if (t.weights is None) != (first.weights is None) or (t.token_id is None) != (first.token_id is None):
            raise TraceError(f"trace {i} differs from trace 0 in having gate weights or token ids; drop them first")
        if set(t.extras) != set(first.extras):
            raise TraceError(f"trace {i} has extras {sorted(t.extras)} but trace 0 has {sorted(first.extras)}")
    requests = []
    offset = 0
    for t in traces:
        r = t.request + offset if renumber else t.request
        requests.append(r)
        if renumber and len(r):
            offset = int(r.max()) + 1
    if not renumber:
        seen: set[int] = set()
        for i, t in enumerate(traces):
            ids = set(np.unique(t.request).tolist())
            dup = seen & ids
            if dup:
                raise TraceError(
                    f"request {min(dup)} appears in trace {i} and an earlier one; use --renumber "
                    f"(renumber=True) to shift request ids"
                )
            seen |= ids
    num_experts = max(t.num_experts for t in traces)
    cat = lambda get: np.concatenate([get(t) for t in traces])  # noqa: E731
    meta = dict(first.metadata)
    if len(traces) > 1:
        meta["source"] = "concat: " + " + ".join(str(t.metadata.get("source", "?")) for t in traces)
    return RoutingTrace(
        experts=cat(lambda t: t.experts.astype(np.uint16)),
        request=np.concatenate(requests), step=cat(lambda t: t.step), position=cat(lambda t: t.position),
        phase=cat(lambda t: t.phase), num_experts=num_experts,
        token_id=None if first.token_id is None else cat(lambda t: t.token_id),
        weights=None if first.weights is None else cat(lambda t: t.weights),
        metadata=meta, extras={k: cat(lambda t, k=k: t.extras[k]) for k in first.extras},
    )


def split_requests(trace: RoutingTrace, fraction: float = 0.8, *, seed: int = 0) -> tuple[RoutingTrace, RoutingTrace]:
    """(train, held-out): whole requests, shuffled with ``seed``, ``fraction`` of them in train."""
    if not 0.0 < fraction < 1.0:
        raise TraceError(f"split fraction must be strictly between 0 and 1, got {fraction}")
    ids = np.unique(trace.request)
    if len(ids) < 2:
        raise TraceError(f"cannot split a trace of {len(ids)} request by request; it needs at least 2")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(ids)
    n_train = min(max(1, int(round(fraction * len(ids)))), len(ids) - 1)
    train_ids = perm[:n_train]
    mask = np.isin(trace.request, train_ids)
    train, held = trace.select(mask), trace.select(~mask)
    train.metadata["split"] = f"train {fraction:g} of requests, seed {seed}"
    held.metadata["split"] = f"held-out {1 - fraction:g} of requests, seed {seed}"
    return train, held


def _parse_range(text: str | None, what: str) -> tuple[int | None, int | None] | None:
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2:
        raise TraceError(f"--{what} {text!r}: expected START:END (either may be empty), e.g. 0:10")
    try:
        a = int(parts[0]) if parts[0] else None
        b = int(parts[1]) if parts[1] else None
    except ValueError:
        raise TraceError(f"--{what} {text!r}: START and END must be integers") from None
    return a, b


def slice_trace(trace: RoutingTrace, *, requests: str | None = None, layers: str | None = None,
                phase: str = "all", max_tokens: int | None = None) -> RoutingTrace:
    """A part of a trace: requests START:END (by position in the trace, Python slice), layers
    START:END (MoE layers), one phase, and at most ``max_tokens`` tokens (cut at a pass)."""
    out = trace.only_phase(phase)
    rr = _parse_range(requests, "requests")
    if rr is not None:
        ids = np.unique(out.request)[slice(*rr)]
        if len(ids) == 0:
            raise TraceError(f"--requests {requests} selects no request (trace has {out.num_requests})")
        out = out.select(np.isin(out.request, ids))
    lr = _parse_range(layers, "layers")
    if lr is not None:
        sl = slice(*lr)
        keep = np.arange(out.num_layers)[sl]
        if len(keep) == 0:
            raise TraceError(f"--layers {layers} selects no layer (trace has {out.num_layers})")
        out = RoutingTrace(
            experts=out.experts[:, sl], request=out.request, step=out.step, position=out.position,
            phase=out.phase, num_experts=out.num_experts, token_id=out.token_id,
            weights=None if out.weights is None else out.weights[:, sl], metadata=dict(out.metadata),
            extras={k: (v[:, sl] if v.ndim >= 2 and v.shape[1] == trace.num_layers else v)
                    for k, v in out.extras.items()},
        )
        out.metadata["layers"] = f"{int(keep[0])}:{int(keep[-1]) + 1} of the original MoE layers"
    if max_tokens is not None:
        out = out.max_tokens(max_tokens)
    return out


# --- lazy access --------------------------------------------------------------------------
def scan_trace(path: str | Path):
    """A polars LazyFrame over a long-format Parquet trace (nothing is read yet)."""
    import polars as pl

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {str(path)!r} does not exist")
    return pl.scan_parquet(path)


def lazy_info(path: str | Path) -> dict:
    """Shape of a trace from a streaming aggregation (rows, layers, requests, tokens per phase)."""
    from expertsim.errors import foreign_errors
    from expertsim.traces.io import NOT_PARQUET_FIX

    with foreign_errors(TraceError, f"cannot read {str(path)!r} as a Parquet routing trace",
                        NOT_PARQUET_FIX, hold_native_stderr=True):
        return _lazy_info(path)


def _lazy_info(path: str | Path) -> dict:
    import polars as pl

    from expertsim.traces.io import REQUIRED, declared_num_experts, read_metadata

    meta = read_metadata(path)
    lf = scan_trace(path)
    names = lf.collect_schema().names()
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise TraceError(f"{path}: missing column(s) {missing}; a routing trace needs {list(REQUIRED)}")
    k = sum(1 for c in names if c.startswith("expert_"))
    agg = lf.select(
        pl.len().alias("rows"), pl.col("layer").max().alias("max_layer"),
        pl.col("request").n_unique().alias("requests"),
        (pl.col("phase").cast(pl.String) == "decode").sum().alias("decode_rows"),
        pl.max_horizontal([pl.col(f"expert_{j}").max() for j in range(k)]).max().alias("max_expert"),
    ).collect()
    row = agg.row(0, named=True)
    if not row["rows"] or row["max_layer"] is None or row["max_expert"] is None:
        raise TraceError(f"{path}: the trace has no rows (or only missing layer and expert ids)")
    layers = int(row["max_layer"]) + 1
    if layers < 1:
        raise TraceError(f"{path}: layer ids are negative (largest {row['max_layer']}); MoE layers count from 0")
    num_experts = declared_num_experts(meta, str(path)) or int(row["max_expert"]) + 1
    return {"path": str(path), "rows": row["rows"], "layers": layers, "top_k": k,
            "tokens": row["rows"] // layers, "decode_tokens": row["decode_rows"] // layers,
            "requests": row["requests"], "num_experts": num_experts,
            "weights": any(c.startswith("weight_") for c in names), "metadata": meta}


def read_requests(path: str | Path, requests: list[int] | None = None, *, layers=None) -> RoutingTrace:
    """Read only some requests (ids) of a large trace through a lazy scan."""
    import polars as pl

    from expertsim.traces.io import frame_to_trace, read_metadata

    from expertsim.errors import foreign_errors
    from expertsim.traces.io import NOT_PARQUET_FIX

    lf = scan_trace(path)
    if requests is not None:
        lf = lf.filter(pl.col("request").is_in(list(requests)))
    with foreign_errors(TraceError, f"cannot read {str(path)!r} as a Parquet routing trace",
                        NOT_PARQUET_FIX, hold_native_stderr=True):
        df = lf.collect()
    if df.height == 0:
        raise TraceError(f"{path}: none of requests {list(requests or [])[:8]} is in the trace")
    meta = read_metadata(path)
    meta.setdefault("source", Path(path).name)
    return frame_to_trace(df, metadata=meta, source=str(path))
