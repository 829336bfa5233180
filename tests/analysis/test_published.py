"""`expertsim validate --published`: predicting measurement files, ranking groups, and --fit
recovering a runtime parameter from rows simulated with it."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from expertsim.analysis.published import load_measurements, validate_published
from expertsim.analysis.study import normalise_config
from expertsim.analysis.sweep import run_one
from expertsim.cli import app, main
from expertsim.errors import ConfigError

BASE = {"model": "mixtral-8x7b", "hardware": "a40", "trace": "default", "trace_max_tokens": 300}
ROWS = [("lru2", "lru", {"cache_per_layer": 2}), ("lru3", "lru", {"cache_per_layer": 3}),
        ("nocache", "no-cache", {})]


def _speed(config: dict, metric="e2e_tokens_per_s") -> float:
    record = run_one({**normalise_config(config), "run_id": "x"})
    assert record["status"] == "ok", record["error"]
    return record["metrics"][metric]


def _toml_value(v):
    return json.dumps(v) if isinstance(v, str) else ("true" if v is True else "false" if v is False else repr(v))


def write_file(path, rows, fit_params=None):
    lines = []
    if fit_params:
        lines.append("fit_params = [" + ", ".join(json.dumps(k) for k in fit_params) + "]")
    for row in rows:
        lines.append("[[measurement]]")
        lines += [f"{json.dumps(k) if '.' in k else k} = {_toml_value(v)}" for k, v in row.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_fit_recovers_a_known_host_time_and_predicts_the_held_out_row(tmp_path):
    truth = 5000.0  # us per layer
    rows = []
    for rid, policy, cache in ROWS:
        config = {**BASE, "policy": policy, **cache}
        value = _speed({**config, "runtime.host_us_per_layer": truth})
        rows.append({"id": rid, "source": "simulated", "value": value, "unit": "tok/s", "counts_prefill": True,
                     "group": "g", "fit": rid != "lru3", **config})
    path = write_file(tmp_path / "m.toml", rows, fit_params=["runtime.host_us_per_layer"])
    plain = validate_published(path, jobs=1)
    assert plain["median_abs_error"] > 0.15  # the default runtime pays no host time: too fast
    fitted = validate_published(path, fit=True, jobs=1)
    value = fitted["fitted"]["a40"]["runtime.host_us_per_layer"]
    assert value == pytest.approx(truth, rel=0.02)
    held = [r for r in fitted["rows"] if not r["fit"]]
    assert [r["id"] for r in held] == ["lru3"]
    assert held[0]["ratio"] == pytest.approx(1.0, abs=0.02)
    assert fitted["rank_agreement"] == 1.0


def test_cli_json_ratios_units_and_ranking(tmp_path):
    lru = {**BASE, "policy": "lru", "cache_per_layer": 2}
    speed = _speed(lru, "tokens_per_s")
    rows = [
        # decode rate given as seconds per token, 10% slower than predicted: ratio 1.1
        {"id": "spt", "source": "paper A", "value": 1.1 / speed, "unit": "s/token", "group": "g", **lru},
        # a row the model must rank above the first (all experts resident)
        {"id": "all", "source": "paper B", "value": 1e6, "unit": "tok/s", "group": "g",
         **{**BASE, "policy": "all-on-gpu"}},
    ]
    path = write_file(tmp_path / "m.toml", rows)
    result = CliRunner().invoke(app, ["validate", "--published", str(path), "--json", "--jobs", "1",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    by_id = {r["id"]: r for r in data["rows"]}
    assert by_id["spt"]["ratio"] == pytest.approx(1.1, rel=1e-6)
    assert by_id["spt"]["metric"] == "decode"
    assert data["rank_agreement"] == 1.0 and data["groups"][0]["same_order"]
    html = (tmp_path / "out" / "published.html").read_text()
    assert "Predicted vs published" in html and "plotly" in html.lower()


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "value": 1.0, "unit": "tokens"}, "unit must be one of tok/s, s/token"),
    ({"id": "a", "value": -1.0, "unit": "tok/s"}, "value must be a positive number"),
    ({"value": 1.0, "unit": "tok/s"}, "has no id"),
    ({"id": "a", "value": 1.0, "unit": "tok/s", "polcy": "lru"}, "unknown key 'polcy'"),
    ({"id": "a", "value": 1.0, "unit": "tok/s", "metric": "ttft"}, "metric must be one of"),
])
def test_bad_measurement_files_fail_before_running(tmp_path, row, message):
    path = write_file(tmp_path / "m.toml", [{**row, **{k: v for k, v in BASE.items() if k != "trace"}}])
    with pytest.raises(ConfigError, match=message):
        load_measurements(path)


def test_bad_file_through_the_cli_is_one_line(tmp_path, monkeypatch, capsys):
    path = tmp_path / "m.toml"
    path.write_text("[[measurement]]\nid = 'a'\nvalue = 1\nunit = 'tok/h'\n")
    monkeypatch.setattr("sys.argv", ["expertsim", "validate", "--published", str(path)])
    with pytest.raises(SystemExit) as info:
        main()
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: ") and "tok/h" in err and "Traceback" not in err


@pytest.mark.parametrize("key, value, message", [
    ("runtime", "mixtral-offloadin", "unknown runtime preset 'mixtral-offloadin'. Did you mean mixtral-offloading"),
    ("runtime.host_us_per_layr", 10, "no field 'host_us_per_layr'. Did you mean host_us_per_layer"),
    ("runtime.host_us_per_layer", -5, "host_us_per_layer must be a finite number >= 0"),
    ("model.expert_bits", 0.5, "expert_bits"),
])
def test_bad_runtime_and_bits_in_a_measurement_fail_at_load(tmp_path, key, value, message):
    row = {"id": "a", "value": 1.0, "unit": "tok/s", "policy": "lru", "cache_per_layer": 2,
           **{k: v for k, v in BASE.items() if k != "trace"}, key: value}
    with pytest.raises(ConfigError, match=message):
        load_measurements(write_file(tmp_path / "m.toml", [row]))


def test_group_order_pairs_ties_and_failed_rows():
    from expertsim.analysis.published import group_order

    published = {"a": 88.2, "b": 88.5, "c": 81.9, "d": 80.0}
    # predicted strictly decreasing: a > b is against 88.2 < 88.5, but that pair is a published tie (0.3%)
    predicted = {"a": 72.8, "b": 72.7, "c": 72.4, "d": 71.9}
    same, wrong, ties = group_order(published, predicted, tolerance=0.01)
    assert same and wrong == [] and ties == [("a", "b")]
    same, wrong, ties = group_order(published, predicted, tolerance=0.0)  # strict: every pair counts
    assert not same and wrong == [("a", "b")] and ties == []
    # a real inversion outside the tolerance is still an error
    same, wrong, _ = group_order(published, {**predicted, "d": 73.0}, tolerance=0.01)
    assert not same and ("a", "d") in wrong and ("c", "d") in wrong
    # a failed row (NaN prediction) cannot be in the published order
    same, wrong, _ = group_order({"a": 1.0, "b": 2.0}, {"a": float("nan"), "b": 2.0})
    assert not same and wrong == [("a", "b")]


def test_rank_tolerance_out_of_range_is_one_line(tmp_path):
    path = write_file(tmp_path / "m.toml", [{"id": "a", "source": "s", "value": 1.0, "unit": "tok/s", **BASE}])
    result = CliRunner().invoke(app, ["validate", "--published", str(path), "--rank-tolerance", "1.5"])
    assert result.exit_code == 2
