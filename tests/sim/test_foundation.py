"""Foundation issue: Mixtral-8x7B on an A100-80GB PCIe, the shared MTBench trace.

The no-cache TPOT derived by hand from the specs, and TPOTs ordered
no-cache > LRU-2 > LRU-4 > all-on-GPU.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from simhelpers import load_shared

from expertsim.policies import CacheConfig, make_policy
from expertsim.sim import Simulation
from expertsim.specs import load_hardware, load_model

TRACE = "mixtral-8x7b-mtbench.dev.parquet"


def small_slice():
    """The first two conversations: request 0 whole (88-token prompt, 40 decode tokens) and
    request 1's 320-token prompt with its first 20 decode tokens."""
    trace = load_shared(TRACE).head_requests(2)
    keep = (trace.request == trace.request[0]) | (trace.position < 340)
    return trace.select(np.flatnonzero(keep))


def hand_decode_pass_ns(context: int) -> float:
    """One no-cache decode pass of Mixtral-8x7B (bf16) on an A100-80GB PCIe, from the specs.

    Per layer (32 layers, all MoE):
    - dense: 5 us launch + (dense bytes per layer + KV read) / (1935 GB/s x 0.8 = 1548 B/ns).
      Dense bytes = 1.605e9 params x 2 B = 3.21e9 B, minus the embedding 32000 x 4096 x 2 B =
      262,144,000 B, over 32 layers = 92,120,500 B; the KV read is context x 131072 B / 32 layers
      = context x 4096 B. (FLOPs: 2 x 46e6 per token / 218 TFLOP/s = 0.4 us: memory-bound.)
    - two copies, serial on the link: each 10 us + 352,321,536 B / 25 GB/s = 14,102,861 ns
      (expert = 3 x 4096 x 14336 params x 2 B).
    - the first expert's compute (5 us + 352,321,536 B / 1548 B/ns = 232,598 ns) overlaps the
      second copy; the second expert's compute follows it.
    So a layer takes dense + 2 x copy + 1 expert compute.
    """
    dense = 5_000 + (92_120_500 + 4096 * context) / 1548
    copy = 10_000 + 352_321_536 / 25
    expert = 5_000 + 352_321_536 / 1548
    return 32 * (dense + 2 * copy + expert)


@pytest.fixture(scope="module")
def runs():
    trace = small_slice()
    m, h = load_model("mixtral-8x7b"), load_hardware("a100-80gb-pcie")
    out = {}
    for label, policy, cache in [("no-cache", "no-cache", None), ("lru-2", "lru", CacheConfig(per_layer=2)),
                                 ("lru-4", "lru", CacheConfig(per_layer=4)), ("all-on-gpu", "all-on-gpu", None)]:
        out[label] = Simulation(m, h, make_policy(policy), cache).run(trace)
    return trace, out


def test_no_cache_tpot_matches_hand_arithmetic(runs):
    trace, results = runs
    r = results["no-cache"]
    decode = [rec for rec in r.iterations if rec["phase"] == 1]
    # each decode pass's context = its position + 1
    positions = trace.position[trace.phase == 1]
    assert len(decode) == len(positions) == 60
    for rec, pos in zip(decode, positions):
        assert abs((rec["end_ns"] - rec["start_ns"]) - hand_decode_pass_ns(int(pos) + 1)) <= 32 * 4  # rounding, per term
    expected_ms = np.mean([hand_decode_pass_ns(int(p) + 1) for p in positions]) / 1e6
    assert r.metrics["tpot_ms"] == pytest.approx(expected_ms, abs=1e-3)
    assert r.metrics["tpot_ms"] == pytest.approx(912.1, abs=0.5)  # 32 x (0.0645 + 28.2057 + 0.2326) ms
    assert r.metrics["hit_rate"] == 0


def test_tpot_ordering(runs):
    _, results = runs
    tpot = {k: v.metrics["tpot_ms"] for k, v in results.items()}
    assert tpot["no-cache"] > tpot["lru-2"] > tpot["lru-4"] > tpot["all-on-gpu"]
    # all-on-GPU is the compute bound: dense + 2 experts per layer
    assert tpot["all-on-gpu"] == pytest.approx(32 * (0.0645 + 2 * 0.2326), abs=0.05)
    for r in results.values():
        assert r.metrics["total_s"] >= max(r.metrics["compute_bound_s"], r.metrics["link_bound_s"])


def test_cli_simulate_json_reports_the_new_fields(tmp_path):
    from typer.testing import CliRunner

    from expertsim.cli import app
    from simhelpers import shared_trace_path

    path = shared_trace_path(TRACE)
    timeline = tmp_path / "t.json"
    res = CliRunner().invoke(app, ["simulate", "-m", "mixtral-8x7b", "-H", "a100-80gb-pcie", "-t", str(path),
                                   "--system", "no-cache", "--max-tokens", "100", "--json",
                                   "--timeline", str(timeline)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    for key in ("total_s", "compute_bound_s", "link_bound_s", "peak_gpu_gb", "experts_per_layer_iteration", "wall_s"):
        assert key in out
    assert out["total_s"] >= out["link_bound_s"] > out["compute_bound_s"] > 0
    assert timeline.is_file()
    # a bad configuration is one clear line, exit status 2
    res = CliRunner().invoke(app, ["simulate", "-m", "mixtral-8x7b", "-H", "rtx4090", "-t", str(path),
                                   "-p", "lru", "--per-layer", "4", "--max-tokens", "100"])
    assert res.exit_code != 0
    assert "does not fit" in str(res.exception)
