"""The calibrated hardware profile: measured cost tables, in JSON, read with json + numpy only.

It lives with the specs because it overrides datasheet numbers, and both the real runner (which
writes it) and the simulator (which reads it) import it. ``expertsim calibrate`` writes it; ``expertsim simulate --profile`` (the simulator's CostModel)
reads it through :func:`load_profile` and :func:`interp_ns`. Format (version 1)::

    {
      "format": "expertsim-profile", "version": 1,
      "device": "cuda:NVIDIA H200" | "cpu-emulated",   # what was measured
      "model": "mixtral-8x7b-L4-x0.5",                  # the (shrunk) ModelSpec name measured
      "model_spec": {...},                              # that ModelSpec as a dict (dataclasses.asdict)
      "created": "2026-11-29T01:02:03Z",
      "expert_bytes": 88080384,                         # bytes of one expert (one copy)
      "copy":          {"bytes": [...], "ns": [...]},   # pinned host->device copy, one call
      "copy_pageable": {"bytes": [...], "ns": [...]},   # the same from pageable host memory
      "copy_overhead_ns": 9500,                         # intercept of ns = overhead + bytes/bw
      "copy_bandwidth_gbps": 51.2,                      # slope of that fit (1e9 bytes/s)
      "expert": {"tokens": [...], "ns": [...]},         # one routed expert's FFN on the device
      "dense": {"tokens": [...], "context": [...],      # one layer's dense stand-in (attention,
                "ns": [[...], ...]},                    #   projections, router) and the runner's
                                                        #   routing decision: ns[i][j] at tokens[i], context[j]
      "decision": {"tokens": [...], "ns": [...]},       # that decision alone (included in "dense")
      "cpu_expert": {"tokens": [...], "ns": [...]},     # one expert's FFN on the host CPU (<= 32 tokens)
      "notes": "..."
    }

Times are integer nanoseconds (medians of repeated runs, warm-up excluded); ``bytes``,
``tokens`` and ``context`` are increasing. :func:`interp_ns` interpolates linearly between
points (bilinearly for ``dense``) and extrapolates linearly beyond the last two points (never
below the first point's time at the low end), so a table answers for any size.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from expertsim.errors import ConfigError

PROFILE_FORMAT = "expertsim-profile"
PROFILE_VERSION = 1
TABLES_1D = {"copy": "bytes", "copy_pageable": "bytes", "expert": "tokens", "cpu_expert": "tokens"}


def validate_profile(profile: dict, source: str = "profile") -> dict:
    """Check the structure; raise ConfigError naming the bad part."""
    if profile.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{source} is not an expertsim profile (format={profile.get('format')!r}); "
                          f"write one with `expertsim calibrate`")
    for name, axis in TABLES_1D.items():
        table = profile.get(name)
        if table is None:
            raise ConfigError(f"{source}: table {name!r} is missing; recalibrate")
        x, y = np.asarray(table.get(axis, [])), np.asarray(table.get("ns", []))
        if len(x) == 0 or x.shape != y.shape:
            raise ConfigError(f"{source}: table {name!r} needs equal, non-empty {axis!r} and 'ns' lists")
        if (np.diff(x) <= 0).any():
            raise ConfigError(f"{source}: table {name!r} {axis!r} must be strictly increasing")
    dense = profile.get("dense")
    if dense is None:
        raise ConfigError(f"{source}: table 'dense' is missing; recalibrate")
    ns = np.asarray(dense["ns"], dtype=float)
    if ns.shape != (len(dense["tokens"]), len(dense["context"])):
        raise ConfigError(f"{source}: dense ns must be [len(tokens)][len(context)], got {ns.shape}")
    return profile


def save_profile(profile: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(validate_profile(profile), indent=1))
    return path


def read_profile_json(path: str | Path) -> dict:
    """The profile file's JSON, with a clear error when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"profile {str(path)!r} does not exist; write one with `expertsim calibrate`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"profile {str(path)!r} is not valid JSON: {exc}") from None


def load_profile(path: str | Path) -> dict:
    """Read and check a profile written by ``expertsim calibrate``."""
    return validate_profile(read_profile_json(path), f"profile {str(path)!r}")


def interp_ns(table: dict, x: float, context: float | None = None) -> int:
    """Time in ns from a profile table at ``x`` (bytes or tokens); for the ``dense`` table give
    ``x`` = tokens and ``context`` = KV length. Linear in between, linear extrapolation beyond
    the last point, clamped at the first point below the table (a fixed cost does not shrink)."""
    ns = np.asarray(table["ns"], dtype=float)
    if "context" in table:
        if context is None:
            raise ConfigError("the dense table needs a context length: interp_ns(table, tokens, context)")
        tokens = np.asarray(table["tokens"], dtype=float)
        ctx = np.asarray(table["context"], dtype=float)
        # Interpolate along context at every token point, then along tokens.
        column = np.array([interp_extrapolate(ctx, row, context) for row in ns])
        return int(round(max(interp_extrapolate(tokens, column, x), 0.0)))
    axis = "bytes" if "bytes" in table else "tokens"
    return int(round(max(interp_extrapolate(np.asarray(table[axis], dtype=float), ns, x), 0.0)))


def interp_extrapolate(x: np.ndarray, y: np.ndarray, q: float) -> float:
    """The one interpolation rule of profile tables: linear between points, the first value
    below the table (a fixed cost does not shrink), linear extrapolation with a non-negative
    slope beyond the last point."""
    if len(x) == 1 or q <= x[0]:
        return float(y[0])
    if q >= x[-1]:
        slope = (y[-1] - y[-2]) / (x[-1] - x[-2])
        return float(y[-1] + max(slope, 0.0) * (q - x[-1]))
    return float(np.interp(q, x, y))


