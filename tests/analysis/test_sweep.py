from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from expertsim.analysis.results import load_results
from expertsim.analysis.study import load_study, normalise_config
from expertsim.analysis.sweep import finished_run_ids, run_one, run_sweep

from .conftest import ERROR_VARIANTS, SMALL_STUDY, skip_unless_required, write_study

TINY = {"model": "mixtral-8x7b", "hardware": "a100-80gb-pcie", "trace": "default", "trace_requests": 1,
        "trace_phase": "decode", "trace_max_tokens": 6}


def _config(**kw):
    return normalise_config({**TINY, **kw})


def test_run_one_ok_record():
    rec = run_one(_config(policy="lru", cache_per_layer=4))
    assert rec["status"] == "ok", rec.get("error")
    m = rec["metrics"]
    assert m["decode_tokens"] == 6 and m["tpot_ms"] > 0
    assert m["cache_experts"] == 4 * 32
    assert rec["provenance"]["model_spec"]["name"] == "mixtral-8x7b"
    assert rec["provenance"]["trace_sha256"] is None  # synthetic
    json.dumps(rec)  # JSON-friendly


def test_run_one_applies_overrides_and_max_cache():
    slow = run_one(_config(policy="lru", cache_per_layer=2, **{"link.bandwidth_gbps": 8}))
    fast = run_one(_config(policy="lru", cache_per_layer=2, **{"link.bandwidth_gbps": 64}))
    assert slow["metrics"]["tpot_ms"] > 2 * fast["metrics"]["tpot_ms"]
    assert slow["provenance"]["hardware_spec"]["link"]["bandwidth_gbps"] == 8
    full = run_one(_config(policy="lru", cache_per_layer="max"))
    assert full["status"] == "ok"
    # "max" is the largest size that fits: one more slot per layer does not.
    k = full["metrics"]["cache_experts"] // 32
    assert full["metrics"]["cache_experts"] == 32 * k and 2 <= k < 8
    assert run_one(_config(policy="lru", cache_per_layer=k + 1))["status"] == "error"


def test_auto_engine_matches_the_des():
    auto = run_one(_config(policy="lru", cache_per_layer=3))
    des = run_one(_config(policy="lru", cache_per_layer=3, engine="des"))
    assert des["engine_used"] == "des" and auto["engine_used"] in ("fast", "des")
    drop = {"wall_s"}
    same = [json.dumps({k: v for k, v in r["metrics"].items() if k not in drop}, sort_keys=True)
            for r in (auto, des)]  # (NaN-safe comparison)
    assert same[0] == same[1]
    # Every eviction policy and every named system runs on the fast engine, with the DES's numbers;
    # a timeline needs the DES.
    assert run_one(_config(policy="belady", cache_per_layer=3))["engine_used"] == "fast"
    se_moe = [run_one(_config(policy="se-moe", cache_per_layer=3, **extra)) for extra in ({}, {"engine": "des"})]
    assert [r["engine_used"] for r in se_moe] == ["fast", "des"]
    assert se_moe[0]["metrics"]["total_s"] == se_moe[1]["metrics"]["total_s"]
    from expertsim.errors import ConfigError

    with pytest.raises(ConfigError, match="engine"):
        _config(policy="lru", cache_per_layer=3, engine="warp")


def test_run_one_records_errors_instead_of_raising():
    rec = run_one(_config(policy="lru", cache_per_layer=4, **{"gpu.memory_gb": 8}))
    assert rec["status"] == "error"
    assert rec["error"].startswith("ConfigError:") and "does not fit" in rec["error"]
    rec = run_one(_config(policy="no-such-policy", cache_per_layer=4))
    assert rec["status"] == "error" and "unknown policy" in rec["error"]


def test_sweep_writes_every_run_and_resumes_without_rerunning(tmp_path):
    study = load_study(write_study(tmp_path, SMALL_STUDY + ERROR_VARIANTS))
    out = tmp_path / "out"
    summary = run_sweep(study, out, jobs=2, progress=False)
    assert summary.ran == len(study) == 16 and summary.skipped == 0
    frame = load_results(out)
    assert sorted(frame["run_id"].to_list()) == sorted(study.run_ids)
    errors = frame.filter(pl.col("status") == "error")
    # Every 8 GB LRU run fails (dense + workspace leave no room for 2+ slots per layer); the
    # sweep went on. no-cache needs only one staging buffer of top-k experts: it fits.
    assert errors.height == 6 and set(errors["label"].to_list()) == {"8 GB"}
    assert set(errors["policy"].to_list()) == {"lru"}
    assert all("GB" in e for e in errors["error"].to_list())
    ok = frame.filter(pl.col("status") == "ok")
    lru = ok.filter(pl.col("policy") == "lru").sort("link.bandwidth_gbps", "cache_per_layer")
    # More cache, more hits (LRU inclusion); more bandwidth, lower TPOT.
    hits = lru.filter(pl.col("link.bandwidth_gbps") == 16)["hit_rate"].to_list()
    assert hits == sorted(hits) and hits[-1] > hits[0]
    tpot = {bw: lru.filter(pl.col("link.bandwidth_gbps") == bw)["tpot_ms"].to_list() for bw in (16, 64)}
    assert all(a > b for a, b in zip(tpot[16], tpot[64]))
    again = run_sweep(study, out, jobs=2, progress=False)
    assert again.ran == 0 and again.skipped == 16
    import io

    stream = io.StringIO()
    retry = run_sweep(study, out, jobs=1, retry_errors=True, stream=stream)
    assert retry.ran == 6 and retry.errors == 6
    assert "16/16 runs, 6 errors" in stream.getvalue().strip().splitlines()[-1]
    # Resuming with the errors skipped counts them as done and failed from the start.
    (out / "runs" / f"{lru['run_id'][0]}.json").unlink()
    stream = io.StringIO()
    assert run_sweep(study, out, jobs=1, stream=stream).ran == 1
    assert "16/16 runs, 6 errors" in stream.getvalue().strip().splitlines()[-1]


def test_batch_option_passes_through_or_fails_clearly():
    from dataclasses import fields

    from expertsim.sim import SimOptions

    rec = run_one(_config(policy="lru", cache_per_layer=4, batch=2))
    if "batch" in {f.name for f in fields(SimOptions)}:
        assert rec["status"] == "ok", rec["error"]
    else:
        assert rec["status"] == "error" and "no 'batch' option" in rec["error"]


# The DES (not the fast engine) so that runs take long enough to kill the sweep between them.
KILL_STUDY = SMALL_STUDY.replace("trace_max_tokens = 8", 'trace_max_tokens = 24\nengine = "des"').replace(
    '"link.bandwidth_gbps" = [16, 64]', '"link.bandwidth_gbps" = [8, 16, 32, 64]')


def test_killed_sweep_resumes_without_losing_or_repeating_runs(tmp_path):
    """SIGKILL the whole sweep (parent and workers) after some runs finished; resume; every run
    of the grid is there exactly once and the runs finished before the kill were not redone."""
    study_path = write_study(tmp_path, KILL_STUDY)
    study = load_study(study_path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "expertsim.analysis", "sweep", str(study_path), "--out", str(out), "--jobs", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 900  # generous: a loaded machine is slow, never a failure
    while len(finished_run_ids(out)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert 3 <= len(before) < len(study), f"kill came too late: {len(before)} of {len(study)} finished"
    for name in before:  # every file on disk is a whole record (atomic writes)
        json.loads((out / "runs" / name).read_text())
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"{len(before)} already finished" in res.stderr
    frame = load_results(out)
    ids = frame["run_id"].to_list()
    assert sorted(ids) == sorted(study.run_ids) and len(set(ids)) == len(ids)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    assert all(after[n] == t for n, t in before.items()), "a finished run was run again"
    assert (frame["status"] == "ok").all()


def test_plan_flag_counts_runs(tmp_path):
    from typer.testing import CliRunner

    from expertsim.analysis.__main__ import app

    study_path = write_study(tmp_path)
    res = CliRunner().invoke(app, ["sweep", str(study_path), "--out", str(tmp_path / "o"), "--plan"])
    assert res.exit_code == 0, res.output
    assert "8 runs" in res.output and "8 to run" in res.output
    assert not (tmp_path / "o").exists()


def test_ray_backend_matches_local(tmp_path):
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        skip_unless_required("ray", "the ray extra is not installed (pip install 'expertsim[ray]')")
    study = load_study(write_study(tmp_path))
    local = run_sweep(study, tmp_path / "local", jobs=2, progress=False)
    ray_ = run_sweep(study, tmp_path / "ray", backend="ray", jobs=2, progress=False)
    assert local.ran == ray_.ran == len(study)
    a = load_results(tmp_path / "local").drop("wall_s").sort("run_id")
    b = load_results(tmp_path / "ray").drop("wall_s").sort("run_id")
    assert a.columns == b.columns
    assert a.equals(b), "ray and local results differ"
    assert a.height == len(study)


@pytest.mark.shared
def test_shared_mixtral_trace_run_records_its_hash():
    from .conftest import shared_trace_path

    path = shared_trace_path("mixtral-8x7b-mtbench.dev.parquet")
    from expertsim.analysis.sweep import file_sha256

    config = normalise_config({"trace": str(path), "trace_requests": 1, "trace_phase": "decode",
                               "trace_max_tokens": 16, "policy": "lru", "cache_per_layer": 4,
                               "model.dtype": "int4"})
    assert config["trace"] == path.name
    rec = run_one(config)
    assert rec["status"] == "ok", rec["error"]
    assert rec["provenance"]["trace_sha256"] == file_sha256(str(path)) and len(file_sha256(str(path))) == 64
    assert rec["metrics"]["decode_tokens"] == 16 and 0 < rec["metrics"]["hit_rate"] < 1


def test_progress_line_reports_rate_and_eta():
    import io

    from expertsim.analysis.sweep import Progress

    stream = io.StringIO()
    bar = Progress(10, already=2, stream=stream, min_interval_s=0)
    time.sleep(0.05)
    bar.update("ok")
    bar.update("error")
    lines = stream.getvalue().strip().splitlines()
    assert "4/10 runs, 1 errors" in lines[-1] and "━" in lines[-1]  # rich's bar
    rate = float(re.search(r"([\d.]+) runs/min", lines[-1]).group(1))
    assert rate > 0 and "ETA" in lines[-1]
