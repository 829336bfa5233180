from __future__ import annotations

import csv
import io
import json

import polars as pl
import pytest
from typer.testing import CliRunner

from expertsim.analysis.__main__ import app
from expertsim.analysis.results import apply_filter, format_frame, results_frame
from expertsim.analysis.study import load_study
from expertsim.analysis.sweep import run_sweep
from expertsim.errors import ConfigError

from .conftest import ERROR_VARIANTS, SMALL_STUDY, write_study


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("results")
    study = load_study(write_study(tmp, SMALL_STUDY + ERROR_VARIANTS))
    run_sweep(study, tmp / "out", jobs=2, progress=False)
    return tmp / "out", study


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')",
    "pl.__class__",
    "pl.col('x').__class__.__bases__",
    "(lambda: 1)()",
    "[c for c in 'ab']",
    "open('/etc/passwd')",
    "pl.DataFrame().write_csv('pwned.csv')",
    "read_csv('/etc/passwd')",
    "status = ",
    "   ",
])
def test_filter_is_sql_never_python(text):
    """Python is not SQL: each fails to parse, or (``pl.__class__`` reads as a struct field of a
    column named ``pl``) fails on the table; either way one ConfigError and nothing runs."""
    frame = pl.DataFrame({"status": ["ok"], "x": [1]})
    with pytest.raises(ConfigError, match="--filter"):
        apply_filter(frame, text)


def test_filter_selects_rows(sweep_dir):
    out, study = sweep_dir
    frame = results_frame(out)
    assert frame.height == len(study)
    lru = apply_filter(frame, "policy = 'lru' AND status = 'ok'")
    assert lru.height == 6 and set(lru["policy"].to_list()) == {"lru"}
    fast = apply_filter(frame, '"link.bandwidth_gbps" >= 64')
    assert set(fast["link.bandwidth_gbps"].to_list()) == {64}
    with pytest.raises(ConfigError, match="failed on the results"):
        apply_filter(frame, "no_such_column = 1")
    with pytest.raises(ConfigError, match="failed on the results"):
        apply_filter(frame, "1 + 1")  # not a condition


def test_malicious_filter_writes_nothing_and_exits_2(sweep_dir, tmp_path, monkeypatch, capsys):
    from expertsim.cli import main

    out, _ = sweep_dir
    monkeypatch.chdir(tmp_path)
    for text in ("pl.DataFrame().write_csv('x')", "__import__('os').system('touch y')"):
        monkeypatch.setattr("sys.argv", ["expertsim", "results", str(out), "--filter", text])
        with pytest.raises(SystemExit) as info:
            main()
        err = capsys.readouterr().err
        assert info.value.code == 2
        assert err.startswith("error: --filter") and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_results_cli_formats(sweep_dir):
    out, study = sweep_dir
    runner = CliRunner()
    res = runner.invoke(app, ["results", str(out), "--format", "csv", "--filter", "status = 'ok'"])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert len(rows) == 10 and {r["status"] for r in rows} == {"ok"}
    assert {"run_id", "status", "link.bandwidth_gbps", "tpot_ms"} <= set(rows[0])
    res = runner.invoke(app, ["results", str(out), "--format", "json", "--all"])
    data = json.loads(res.stdout)
    assert sorted(r["run_id"] for r in data) == sorted(study.run_ids)
    assert any(r["status"] == "error" and "does not fit" in r["error"] for r in data)
    res = runner.invoke(app, ["results", str(out), "--format", "markdown", "-c", "run_id,status",
                              "--sort", "run_id", "--limit", "3"])
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "| run_id | status |" and len(lines) == 2 + 3
    res = runner.invoke(app, ["results", str(out)])
    assert res.exit_code == 0 and "run_id" in res.stdout.splitlines()[0]
    res = runner.invoke(app, ["results", str(out), "--format", "yaml"])
    assert res.exit_code != 0


def test_results_table_rebuilt_when_runs_are_newer(sweep_dir, tmp_path):
    import shutil

    from expertsim.analysis.results import load_results

    out, _ = sweep_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "results.parquet").unlink()
    assert load_results(copy).height == load_results(out).height


def test_format_frame_handles_nan_and_none():
    frame = pl.DataFrame({"a": [1.0, float("nan")], "b": ["x", None]})
    assert "-" in format_frame(frame, "table")
    assert format_frame(frame, "markdown").count("\n") == 3


def test_report_cli_writes_html(sweep_dir, tmp_path):
    out, _ = sweep_dir
    target = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["report", str(out), "--path", str(target)])
    assert res.exit_code == 0, res.output
    text = target.read_text()
    assert text.startswith("<!DOCTYPE html>") and "best policy per scenario" in text
    assert "16 runs finished of 16 planned: 10 ok, 6 failed" in text
