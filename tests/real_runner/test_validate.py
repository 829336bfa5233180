"""Validation end to end on the emulated device (a tiny slice), the CLI commands, and the GPU
script run on the CPU path so that it cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = {"layers": 1, "experts_scale": 1 / 32, "dtype": "fp32", "max_tokens": 40}


def _app():
    import typer

    from expertsim.analysis.commands import validate_command
    from expertsim.real_runner.commands import calibrate_command

    app = typer.Typer()
    app.command("calibrate")(calibrate_command)
    app.command("validate")(validate_command)
    return app


def test_kendall_tau():
    from expertsim.analysis.validate import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_validate_end_to_end_cpu(tmp_path):
    from expertsim.analysis.validate import validate

    report, paths = validate(device="cpu", model="mixtral-8x7b", trace_path=None, out=tmp_path,
                             policies=["no-cache", "lru:2", "all-on-gpu"], link_gbps=1.0, quick=True, **TINY)
    assert [p["policy"] for p in report["policies"]] == ["no-cache", "lru:2", "all-on-gpu"]
    for p in report["policies"]:
        assert p["hits_equal"] and p["measured_hit_rate"] == p["predicted_hit_rate"]
        assert p["measured_tpot_ms"] > 0 and p["predicted_tpot_ms"] > 0
    # Copies dominate on the emulated 1 GB/s link: both sides rank no-cache slowest, all-on-gpu fastest.
    by = {p["policy"]: p for p in report["policies"]}
    for side in ("measured_tpot_ms", "predicted_tpot_ms"):
        assert by["no-cache"][side] > by["all-on-gpu"][side]
    assert -1 <= report["kendall_tau"] <= 1
    assert np.isfinite(report["median_abs_error"]) and report["p95_abs_error"] >= report["median_abs_error"]
    import polars as pl

    assert pl.read_parquet(paths["policies"]).height == 3
    from expertsim.real_runner.measure import read_measured

    passes = len(read_measured(tmp_path / "measured")["runs"][0]["records"])
    assert pl.read_parquet(paths["per_token"]).height == 3 * passes
    assert "plotly" in paths["html"].read_text()[:5000].lower()


def test_cli_validate_json_and_measured_reuse(tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    args = ["validate", "--device", "cpu", "--layers", "1", "--experts-scale", "0.03125", "--max-tokens", "30",
            "--policies", "no-cache,all-on-gpu", "--out", str(tmp_path / "v"), "--quick", "--json"]
    res = runner.invoke(_app(), args)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert set(doc) >= {"median_abs_error", "p95_abs_error", "total_time_error", "kendall_tau", "policies"}
    assert [p["policy"] for p in doc["policies"]] == ["no-cache", "all-on-gpu"]
    # Predictions again from the measured folder alone.
    res2 = runner.invoke(_app(), ["validate", "--measured", str(tmp_path / "v" / "measured"),
                                  "--out", str(tmp_path / "again"), "--json"])
    assert res2.exit_code == 0, res2.output
    doc2 = json.loads(res2.stdout[res2.stdout.index("{"):])
    assert doc2["median_abs_error"] == doc["median_abs_error"]


def test_cli_calibrate_writes_a_profile_the_simulator_reads(tmp_path):
    from typer.testing import CliRunner

    from expertsim.real_runner import load_profile
    from expertsim.sim.cost import CostProfile

    out = tmp_path / "p.json"
    res = CliRunner().invoke(_app(), ["calibrate", "--device", "cpu", "--layers", "1", "--experts-scale", "0.03125",
                                      "--max-tokens", "8", "--max-context", "128", "--quick", "--out", str(out),
                                      "--clock", "cpu", "--link-gbps", "0.5"])
    assert res.exit_code == 0, res.output
    prof = load_profile(out)
    assert prof["device"].startswith("cpu-emulated") and prof["copy"]["bytes"][-1] == prof["expert_bytes"]
    # The cpu clock charges the nominal link time: bytes / 0.5 GB/s, plus the memcpy.
    assert all(ns >= n / 0.5 for n, ns in zip(prof["copy"]["bytes"], prof["copy"]["ns"]))
    assert prof["copy"]["ns"][-1] > prof["copy"]["ns"][0] > 0
    assert 0.2 < prof["copy_bandwidth_gbps"] <= 0.5
    assert CostProfile.from_dict(prof).ns_1d("expert", 3) > 0


def test_gpu_script_on_the_cpu_path(tmp_path):
    """benchmarks/gpu_validate.sh with --device cpu on a tiny bundle; then predictions from its folder."""
    from expertsim.real_runner import write_bundle
    from expertsim.analysis.validate import compare_measured, prepare_slice

    spec, trace = prepare_slice("mixtral-8x7b", None, layers=1, experts_scale=1 / 32, max_tokens=30, dtype="fp32")
    bundle = write_bundle(tmp_path / "slice.npz", trace, spec, {"layers": 1})
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run([str(REPO / "benchmarks" / "gpu_validate.sh"), "--device", "cpu", "--bundle", str(bundle),
                          "--out", str(tmp_path / "m"), "--policies", "no-cache,lru:2", "--quick"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{\n"):])
    assert summary["heavy_modules_imported"] == []
    report = compare_measured(tmp_path / "m")
    assert all(p["hits_equal"] for p in report["policies"])
    assert report["trace_tokens"] == trace.num_tokens


@pytest.mark.shared
def test_validate_shared_mixtral_trace_slice(tmp_path, mixtral_trace_path):
    from expertsim.analysis.validate import validate

    report, _ = validate(device="cpu", model="mixtral-8x7b", trace_path=str(mixtral_trace_path), out=tmp_path,
                         policies=["no-cache", "lru:2", "lru:4", "all-on-gpu"], link_gbps=1.0, quick=True,
                         layers=1, experts_scale=1 / 16, dtype="fp32", max_tokens=120)
    assert all(p["hits_equal"] for p in report["policies"])
    assert report["decode_tokens"] > 20


def test_median_records_takes_per_pass_medians():
    from expertsim.real_runner.measure import median_records

    def run(durs):
        t, out = 100, []
        for i, d in enumerate(durs):
            out.append({"iteration": i, "phase": 1, "start_ns": t, "end_ns": t + d, "stall_ns": d // 2, "hits": 1})
            t += d
        return out

    merged = median_records([run([10, 50, 30]), run([12, 20, 90]), run([11, 40, 31])])
    assert [r["end_ns"] - r["start_ns"] for r in merged] == [11, 40, 31]
    assert merged[0]["start_ns"] == 100 and merged[1]["start_ns"] == merged[0]["end_ns"]
    assert [r["stall_ns"] for r in merged] == [5, 20, 15]


def test_merge_profiles_means_every_table():
    from expertsim.real_runner.measure import merge_profiles

    a = {"copy": {"bytes": [1, 10], "ns": [10, 100]}, "dense": {"tokens": [1], "context": [1], "ns": [[4]]},
         "device": "x"}
    b = {"copy": {"bytes": [1, 10], "ns": [20, 200]}, "dense": {"tokens": [1], "context": [1], "ns": [[8]]},
         "device": "x"}
    m = merge_profiles(a, b)
    assert m["copy"]["ns"] == [15, 150] and m["dense"]["ns"] == [[6]] and m["device"] == "x"
    assert a["copy"]["ns"] == [10, 100]  # inputs untouched
