"""Fixtures for the analysis tests: small studies on the synthetic default trace (fast), and the
shared real traces (skipped cleanly when absent)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A small sweep: 2 bandwidths x (lru at 3 cache sizes) + no-cache once per bandwidth = 8 runs,
# plus one run whose cache does not fit (an error row). ~0.1 s of simulation a run.
SMALL_STUDY = """
name = "small"
description = "test sweep"
baseline = "no-cache"

[fixed]
model = "mixtral-8x7b"
hardware = "a100-80gb-pcie"
trace = "default"
trace_requests = 1
trace_phase = "decode"
trace_max_tokens = 8

[grid]
"link.bandwidth_gbps" = [16, 64]
policy = ["lru", "no-cache"]
cache_per_layer = [2, 4, 6]
"""

ERROR_VARIANTS = """
[[variants]]
label = "80 GB"
[[variants]]
label = "8 GB"
"gpu.memory_gb" = 8
"""


def write_study(tmp_path: Path, text: str = SMALL_STUDY, name: str = "study.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


from shared_traces import shared_trace_path, shared_traces_dir  # noqa: E402,F401  (re-exported)


def skip_unless_required(what: str, reason: str) -> None:
    """Skip (locally) or fail (in CI) when an optional tool is missing: CI sets
    EXPERTSIM_REQUIRE=chromium,ray so that these tests cannot silently skip there."""
    required = {w.strip() for w in os.environ.get("EXPERTSIM_REQUIRE", "").split(",")}
    if what in required:
        pytest.fail(f"{reason} (EXPERTSIM_REQUIRE={os.environ['EXPERTSIM_REQUIRE']})")
    pytest.skip(reason)
