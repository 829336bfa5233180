"""`expertsim compare` writes a sweep's layout: one results schema, `results` and `report` read it."""
from __future__ import annotations

import json

import polars as pl
import pytest
from typer.testing import CliRunner

from expertsim.analysis.compare import run_compare
from expertsim.analysis.results import results_frame
from expertsim.analysis.study import load_study
from expertsim.analysis.sweep import run_sweep
from expertsim.cli import app

from .conftest import SMALL_STUDY, write_study

runner = CliRunner()
SCHEMA = ["run_id", "status", "error", "policy", "policy_label", "cache_label", "tpot_ms", "hit_rate"]


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    # lru:7 does not fit in an A40 beside the dense weights: a failed row, the rest still runs.
    report = run_compare(policies=["lru:2", "lru:7", "no-cache"], max_tokens=120, out=out, progress=False)
    return out, report


def test_compare_records_a_failed_entry_and_goes_on(compare_dir):
    out, report = compare_dir
    rows = report.rows
    assert [(r["policy"], r["status"]) for r in rows] == [("lru", "ok"), ("lru", "error"), ("no-cache", "ok")]
    assert "does not fit" in rows[1]["error"] and rows[0]["error"] is None
    assert rows[0]["tpot_ms"] > 0 and rows[1]["tpot_ms"] is None
    table = report.table_rows()
    assert table[1]["status"] == "error" and "does not fit" in table[1]["error"]
    html = report.html_path.read_text()
    assert "Failed runs" in html and "does not fit" in html


def test_compare_and_sweep_write_one_schema(compare_dir, tmp_path):
    out, _ = compare_dir
    compared = pl.read_parquet(out / "results.parquet")
    study = load_study(write_study(tmp_path, SMALL_STUDY))
    run_sweep(study, tmp_path / "sweep", jobs=1, progress=False)
    swept = pl.read_parquet(tmp_path / "sweep" / "results.parquet")
    for column in SCHEMA:
        assert column in compared.columns and column in swept.columns, column
        assert compared.schema[column] == swept.schema[column], column
    assert compared.equals(results_frame(out))  # rebuilt from runs/, in the compared order


def test_results_and_report_commands_read_compare_output(compare_dir):
    out, _ = compare_dir
    res = runner.invoke(app, ["results", str(out), "--format", "json"])
    assert res.exit_code == 0, res.stdout
    data = json.loads(res.stdout)
    assert [r["policy_label"] for r in data] == ["lru", "lru", "no-cache"]
    assert [r["status"] for r in data] == ["ok", "error", "ok"]
    res = runner.invoke(app, ["report", str(out), "--path", str(out / "again.html")])
    assert res.exit_code == 0, res.stdout
    text = (out / "again.html").read_text()
    assert "expertsim compare: mixtral-8x7b on a40" in text and "TPOT per configuration" in text


def test_compare_replaces_its_own_runs_but_never_a_sweeps(compare_dir, tmp_path):
    from expertsim.errors import ConfigError

    out = tmp_path / "c"
    run_compare(policies=["lru:2", "no-cache"], max_tokens=40, out=out, progress=False)
    second = run_compare(policies=["no-cache"], max_tokens=40, out=out, progress=False)
    assert [r["policy"] for r in second.rows] == ["no-cache"]
    assert len(list((out / "runs").glob("*.json"))) == 1
    study = load_study(write_study(tmp_path, SMALL_STUDY))
    run_sweep(study, tmp_path / "sweep", jobs=1, progress=False)
    with pytest.raises(ConfigError, match="holds the runs of a sweep"):
        run_compare(policies=["no-cache"], max_tokens=40, out=tmp_path / "sweep", progress=False)


def test_compare_cli_takes_simulate_options_and_report_reads_its_folder(tmp_path):
    """The README's comparison: `--set link.bandwidth_gbps=400 --requests 2`, then `report`."""
    out = tmp_path / "c"
    args = ["compare", "--policy", "lru:2", "--policy", "pregated-moe", "--param", "accuracy=0.5",
            "--set", "link.bandwidth_gbps=400", "--requests", "1", "--max-tokens", "60",
            "--link-queue", "fifo", "--out", str(out), "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.stdout
    rows = json.loads(res.stdout)["rows"]
    assert [r["policy"] for r in rows] == ["lru", "pregated-moe"]
    assert all(r["link.bandwidth_gbps"] == 400 and r["link_queue"] == "fifo" for r in rows)
    assert json.loads(rows[1]["policy_params"]) == {"accuracy": 0.5}  # only the system that takes it
    assert json.loads(rows[0]["policy_params"]) == {}
    assert rows[0]["trace_requests"] == 1 and rows[0]["decode_tokens"] < 60
    assert any("400.0 GB/s" in a for a in json.loads(res.stdout)["assumptions"])
    slow = run_compare(policies=["lru:2"], requests=1, max_tokens=60, out=tmp_path / "slow", progress=False)
    assert rows[0]["tpot_ms"] < slow.rows[0]["tpot_ms"]  # a faster link, a faster token
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0 and res.stdout.strip() == str(out / "report.html")


@pytest.mark.parametrize("args, message", [
    (["--set", "link.bandwith_gbps=4"], "no field 'bandwith_gbps'"),
    (["--param", "nope=1"], "--param nope: no compared policy or system takes it"),
    (["--policy", "lur:2"], "unknown policy 'lur'"),
    (["--offline", "--rate", "2"], "not both"),
    (["--engine", "quick"], "'quick' is not one of"),
    (["--plugin", "examples/my_policy.py", "--policy", "mru:2", "--jobs", "2"], "--jobs 2 with --plugin"),
])
def test_compare_bad_input_is_one_line(monkeypatch, capsys, tmp_path, args, message):
    from expertsim.cli import main

    monkeypatch.setattr("sys.argv", ["expertsim", "compare", "--out", str(tmp_path / "o"), *args])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "runs").exists()  # rejected before any run


def test_compare_in_worker_processes_equals_one_process(compare_dir, tmp_path):
    _, one = compare_dir
    two = run_compare(policies=["lru:2", "lru:7", "no-cache"], max_tokens=120, out=tmp_path / "two",
                      progress=False, jobs=2)
    keep = ["policy_label", "cache_label", "status", "tpot_ms", "hit_rate", "h2d_gb", "total_s"]
    assert two.frame.select(keep).to_dicts() == one.frame.select(keep).to_dicts()
