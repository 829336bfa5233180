"""Routing traces: the in-memory RoutingTrace, Parquet I/O and validation, locality statistics,
synthetic traces (``default_trace``), importers and capture (``expertsim.traces.capture``, torch)."""
from expertsim.traces.io import frame_to_trace, read_metadata, read_trace, trace_to_frame, write_trace
from expertsim.traces.stats import lru_hit_curve, reuse_next_token, trace_stats
from expertsim.traces.synth import default_trace
from expertsim.traces.trace import DECODE, PHASE_NAMES, PREFILL, RoutingTrace

__all__ = [
    "RoutingTrace", "PREFILL", "DECODE", "PHASE_NAMES", "read_trace", "write_trace",
    "read_metadata", "frame_to_trace", "trace_to_frame", "default_trace", "lru_hit_curve",
    "reuse_next_token", "trace_stats",
]
