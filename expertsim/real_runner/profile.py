"""Calibration helpers of the real runner; the profile format itself is
:mod:`expertsim.specs.profile` (shared with the simulator, which reads it)."""
from __future__ import annotations

import time

import numpy as np

from expertsim.specs.profile import (  # noqa: F401  (the runner's profile API)
    PROFILE_FORMAT,
    PROFILE_VERSION,
    TABLES_1D,
    interp_ns,
    load_profile,
    save_profile,
    validate_profile,
)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fit_copy_line(nbytes: list[int], ns: list[int]) -> tuple[float, float]:
    """(overhead_ns, bandwidth_gbps) of ns = overhead + bytes / bandwidth, least squares in
    relative error (each point weighs 1/ns, so small copies fix the overhead and large ones the
    bandwidth)."""
    x, y = np.asarray(nbytes, dtype=float), np.asarray(ns, dtype=float)
    if len(x) < 2:
        return float(y[0]) if len(y) else 0.0, float("nan")
    slope, intercept = np.polyfit(x, y, 1, w=1.0 / np.maximum(y, 1.0))
    bandwidth = 1.0 / slope if slope > 0 else float("inf")  # bytes per ns = GB/s
    return max(float(intercept), 0.0), float(bandwidth)
