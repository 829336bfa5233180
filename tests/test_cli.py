"""The `expertsim` command end to end: main job, simulate, cache, errors."""
from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from expertsim.cli import app, main

runner = CliRunner()


def invoke(args):
    result = runner.invoke(app, args, catch_exceptions=True)
    return result


def run_main(monkeypatch, capsys, args):
    """Run through main() so user errors become one line and exit 2."""
    monkeypatch.setattr("sys.argv", ["expertsim", *args])
    with pytest.raises(SystemExit) as info:
        main()
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def test_help_lists_the_commands():
    result = invoke(["--help"])
    assert result.exit_code == 0
    for command in ("compare", "simulate", "cache", "specs", "trace"):
        assert command in result.output


def test_compare_default_study_prints_table_and_writes_report(tmp_path):
    result = invoke(["compare", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    policies = [(r["policy_label"], r["cache_label"]) for r in data["rows"]]
    assert policies == [("no-cache", "2 slots in one global pool"), ("lru", "2 slots per layer"),
                        ("lru", "3 slots per layer"), ("all-on-gpu", "all experts resident")]
    tpot = [r["tpot_ms"] for r in data["rows"]]
    assert tpot[0] > tpot[1] > tpot[2] > tpot[3]
    assert data["rows"][0]["hit_rate"] == 0 and data["rows"][3]["hit_rate"] == 1
    assert any("synthetic" in a for a in data["assumptions"])
    html = (tmp_path / "report.html").read_text()
    titles = re.findall(r"data-figure='\d+'><h3>([^<]*)</h3>", html)
    for expected in ("TPOT per configuration", "Latency breakdown", "Timeline: "):
        assert any(t.startswith(expected) for t in titles), (expected, titles)
    assert html.count('class="plotly-graph-div"') == len(titles)
    assert not re.search(r"<script[^>]*\bsrc=", html)  # offline: plotly.js inlined, nothing fetched
    assert "Plotly.newPlot" in html and len(html) > 3_000_000
    assert (tmp_path / "results.parquet").stat().st_size > 0


def test_compare_table_has_units_and_policies(tmp_path):
    result = invoke(["compare", "--out", str(tmp_path), "--max-tokens", "200"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if line.startswith("policy"))
    for column in ("hit_rate", "TPOT_ms", "tokens_per_s", "GB_over_link", "stall_share"):
        assert column in header
    assert "starts cold" in result.stdout


def test_simulate_json_keys(tmp_path):
    result = invoke(["simulate", "--policy", "lru", "--per-layer", "2", "--max-tokens", "150", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("hit_rate", "ttft_ms", "tpot_ms", "tokens_per_s", "h2d_gb", "stall_fraction", "wall_s"):
        assert key in data
    assert 0 < data["hit_rate"] < 1 and data["h2d_gb"] > 0


def test_simulate_timeline_writes_chrome_trace(tmp_path):
    out = tmp_path / "tl.json"
    result = invoke(["simulate", "--policy", "lru", "--per-layer", "2", "--max-tokens", "40",
                     "--timeline", str(out)])
    assert result.exit_code == 0, result.output
    events = json.loads(out.read_text())["traceEvents"]
    kinds = {e.get("cat") for e in events}
    assert {"dense", "expert", "copy"} <= kinds
    assert all(e["dur"] >= 0 for e in events if e.get("ph") == "X")


@pytest.mark.parametrize("args, message", [
    (["simulate", "--hardware", "a4O"], "unknown hardware preset 'a4O'. Did you mean a40"),
    (["simulate", "--model", "mixtral"], "unknown model preset 'mixtral'"),
    (["simulate", "--policy", "lru", "--per-layer", "0"], "holds no expert"),
    (["simulate", "--policy", "lru", "--per-layer", "2", "--set", "link.bandwidth_gbps=0"],
     "bandwidth_gbps must be a positive number, got 0"),
    (["simulate", "--policy", "lru", "--per-layer", "2", "--set", "link.bandwith_gbps=10"],
     "no field 'bandwith_gbps'. Did you mean bandwidth_gbps"),
    (["simulate", "--policy", "lru", "--per-layer", "7"], "does not fit"),
    (["simulate", "--policy", "lur", "--per-layer", "2"], "unknown policy 'lur'. Did you mean lru"),
    (["cache", "--per-layer", "2", "--phase", "decoding"], "'decoding' is not one of 'decode', 'prefill', 'all'"),
    (["simulate", "--engine", "quick"], "'quick' is not one of 'auto', 'des', 'fast'"),
    (["simulate", "--no-such-option"], "No such option: --no-such-option"),
])
def test_bad_input_gives_one_clear_line(monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.shared
@pytest.mark.slow
def test_lru_hit_rates_on_shared_mixtral_trace(mixtral_trace_path):
    expected = {2: 0.3529, 4: 0.5970, 6: 0.8136}
    for k, value in expected.items():
        result = invoke(["cache", "--trace", str(mixtral_trace_path), "--policy", "lru", "--per-layer",
                         str(k), "--phase", "decode", "--scope", "request", "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert round(data["hit_rate"], 4) == value
        assert data["hits"] + data["misses"] == 13998 * 32 * 2


def test_param_sets_a_system_parameter_and_prefetch_precision_follows_it():
    out = {}
    for accuracy in (1.0, 0.5):
        result = invoke(["simulate", "--system", "pregated-moe", "--param", f"accuracy={accuracy}",
                         "--max-tokens", "300", "--json"])
        assert result.exit_code == 0, result.output
        out[accuracy] = json.loads(result.stdout)
        assert f"accuracy={accuracy}" in out[accuracy]["config"]["policy"]
    # A perfect pre-gate never prefetches a wrong expert; a 50% one wastes about half.
    assert out[1.0]["prefetch_precision"] == 1.0
    assert 0.35 < out[0.5]["prefetch_precision"] < 0.65
    assert out[1.0]["prefetch_recall"] > out[0.5]["prefetch_recall"]
    assert out[1.0]["hit_rate"] > out[0.5]["hit_rate"]
    plain = json.loads(invoke(["simulate", "--policy", "lru", "--per-layer", "2", "--max-tokens", "100",
                               "--json"]).stdout)
    assert plain["prefetch_precision"] is None  # nothing prefetched: not applicable


def test_python_m_expertsim_runs_the_cli():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "expertsim", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "Usage: python -m expertsim" in res.stdout and "compare" in res.stdout


def test_specs_show_reads_a_hardware_toml(tmp_path):
    from expertsim.specs.loader import _PRESETS

    path = tmp_path / "my-gpu.toml"
    path.write_text((_PRESETS / "hardware" / "a40.toml").read_text())
    result = invoke(["specs", "show", str(path)])
    assert result.exit_code == 0, result.stdout
    assert result.stdout.startswith("# HardwareSpec a40") and "memory_gb" in result.stdout


@pytest.mark.parametrize("name, message", [
    ("h100-pcee", "unknown hardware preset 'h100-pcee'. Did you mean h100-pcie"),
    ("mixtrall-8x7b", "unknown model preset 'mixtrall-8x7b'. Did you mean mixtral-8x7b"),
])
def test_specs_show_names_the_kind_of_a_misspelt_preset(monkeypatch, capsys, name, message):
    code, out, err = run_main(monkeypatch, capsys, ["specs", "show", name])
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("suffix", [".json", ".json.gz", ".parquet"])
def test_timeline_is_written_in_the_format_its_suffix_names(tmp_path, suffix):
    import gzip

    import polars as pl

    out = tmp_path / f"tl{suffix}"
    result = invoke(["simulate", "--policy", "lru", "--per-layer", "2", "--max-tokens", "40",
                     "--timeline", str(out), "--timeline-window", "2:4"])
    assert result.exit_code == 0, result.stdout
    if suffix == ".parquet":
        frame = pl.read_parquet(out)
        assert set(frame["iteration"].unique().to_list()) == {2, 3}
        return
    raw = out.read_bytes()
    if suffix == ".json.gz":
        assert raw[:2] == b"\x1f\x8b"  # gzip's magic number
        raw = gzip.decompress(raw)
    events = json.loads(raw)["traceEvents"]
    assert {e["args"]["iteration"] for e in events if e.get("ph") == "X"} == {2, 3}


@pytest.mark.parametrize("args, message", [
    (["--timeline", "tl.csv"], "--timeline 'tl.csv': give a .json or .json.gz file"),
    (["--timeline", "tl.json", "--timeline-window", "4:2"], "--timeline-window '4:2': give A:B"),
    (["--timeline-window", "1:2"], "--timeline-window needs --timeline PATH"),
])
def test_timeline_options_reject_bad_values_before_the_run(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(monkeypatch, capsys, ["simulate", "--per-layer", "2", *args])
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_predictor_learner_is_not_called_model():
    result = invoke(["policies", "predictor", "--help"])
    assert "--predictor-model" in result.stdout and "ridge" in result.stdout and "logistic" in result.stdout
    assert not re.search(r"│ +--model ", result.stdout)  # (the help may name it, as the MoE model)


def test_help_lists_the_choices():
    result = invoke(["simulate", "--help"])
    assert "auto|des|fast" in result.stdout and "priority|fifo" in result.stdout


def test_console_table_is_rich_plain_text():
    from expertsim.console import format_value, render_table

    text = render_table([{"policy": "lru [2 slots]", "TPOT_ms": 633.61, "GB": 123456.7, "x": None},
                         {"policy": "no-cache", "TPOT_ms": 966.0, "GB": float("nan"), "x": "ok"}])
    lines = text.splitlines()
    assert lines[0].split() == ["policy", "TPOT_ms", "GB", "x"] and set(lines[1]) <= {"-", " "}
    assert lines[2].startswith("lru [2 slots]")  # brackets are text, not rich markup
    assert lines[2].index("633.6") + len("633.6") == lines[3].index("966") + len("966")  # right-aligned
    assert "123,457" in lines[2] and lines[3].split()[-2:] == ["-", "ok"]
    assert "\x1b" not in text  # no colour codes
    assert [format_value(v) for v in (None, float("nan"), 0.123456, 2e5, 3)] == ["-", "-", "0.1235", "200,000", "3"]
