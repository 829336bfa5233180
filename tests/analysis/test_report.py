from __future__ import annotations

import re
import shutil
import subprocess

import polars as pl
import pytest

from expertsim.analysis import figures as F
from expertsim.analysis.report import summary_rows, write_report
from expertsim.analysis.study import load_study
from expertsim.analysis.sweep import run_sweep

from .conftest import skip_unless_required, write_study

REPORT_STUDY = """
name = "report-test"
baseline = "no-cache"

[fixed]
model = "mixtral-8x7b"
hardware = "a100-80gb-pcie"
trace = "default"
trace_requests = 1
trace_phase = "decode"
trace_max_tokens = 8

[grid]
"gpu.memory_gb" = [40, 80]
"link.bandwidth_gbps" = [16, 64]
policy = ["lru", "belady", "no-cache"]
cache_per_layer = [2, 4]

[output]
timeline = true
timeline_iterations = [0, 2]
"""


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    study = load_study(write_study(tmp, REPORT_STUDY))
    out = tmp / "out"
    run_sweep(study, out, jobs=2, progress=False)
    pl.DataFrame({"label": ["a", "b"], "predicted_tpot_ms": [10.0, 20.0],
                  "measured_tpot_ms": [11.0, 19.0]}).write_csv(out / "validation.csv")
    return out, study, write_report(out)


EXPECTED_FIGURES = ["Miss-ratio curve", "TPOT and throughput vs cache size", "TPOT vs link bandwidth",
                    "GPU memory x link bandwidth", "Latency breakdown", "Timeline:", "Timeline:",
                    "Predicted vs measured", "Trace locality: popularity", "Trace locality: reuse distance"]


def _figure_titles(text: str) -> list[str]:
    return re.findall(r"data-figure='\d+'><h3>([^<]*)</h3>", text)


def test_report_is_self_contained_with_every_figure(report_dir):
    out, study, path = report_dir
    text = path.read_text()
    titles = _figure_titles(text)
    assert len(titles) == len(EXPECTED_FIGURES)
    for title, expected in zip(titles, EXPECTED_FIGURES):
        assert title.startswith(expected), (title, expected)
    # plotly.js inlined exactly once, nothing fetched from the network.
    assert len(re.findall(r"\* plotly\.js v\d", text)) == 1
    assert not re.search(r"<script[^>]+src=", text)  # (the bundle names cdn.plot.ly only for geo maps)
    assert "Failed runs" in text and "does not fit" in text  # 40 GB cannot hold 4 per layer
    assert "expertsim_version" not in text and "sha256" in text and "study file" in text.lower()


def test_summary_best_policy_and_gain(report_dir):
    out, _, _ = report_dir
    from expertsim.analysis.results import load_results

    frame = load_results(out)
    rows = summary_rows(frame, "no-cache")
    assert len(rows) == 4  # memory x bandwidth scenarios
    for row in rows:
        # belady is a bound, no-cache is slower; at 2 slots per layer (top-2) lru has no choice
        assert row["best policy"] == "lru"
        assert row["speed-up vs baseline"] == pytest.approx(row["baseline (no-cache) TPOT ms"] / row["TPOT ms"])
        assert row["speed-up vs baseline"] > 1
        assert row["bound TPOT ms"] <= row["TPOT ms"]


def test_summary_on_a_crafted_frame():
    frame = pl.DataFrame({
        "run_id": list("abcdef"), "status": ["ok"] * 6,
        "hardware": ["x", "x", "x", "y", "y", "y"],
        "policy": ["no-cache", "lru", "lfu", "no-cache", "lru", "lfu"],
        "policy_label": ["no-cache", "lru", "lfu", "no-cache", "lru", "lfu"],
        "cache_label": [None, "2", "2", None, "2", "2"],
        "tpot_ms": [100.0, 50.0, 40.0, 10.0, 5.0, 8.0],
    })
    rows = summary_rows(frame, "no-cache")
    assert [(r["hardware"], r["best policy"], r["speed-up vs baseline"]) for r in rows] == [
        ("x", "lfu", 2.5), ("y", "lru", 2.0)]


def test_summary_lists_ties():
    frame = pl.DataFrame({"run_id": list("abc"), "status": ["ok"] * 3, "policy": ["lru", "lfu", "no-cache"],
                          "policy_label": ["lru", "lfu", "no-cache"], "cache_label": ["2", "2", None],
                          "tpot_ms": [5.0, 5.0, 9.0]})
    (row,) = summary_rows(frame, "no-cache")
    assert row["best policy"] == "lfu = lru" and row["speed-up vs baseline"] == pytest.approx(1.8)


def test_scenario_bars_one_panel_per_undetermined_column():
    frame = pl.DataFrame({
        "run_id": list("abcdefgh"), "status": ["ok"] * 8,
        "label": ["base", "base", "fast", "fast"] * 2, "link.bandwidth_gbps": [24, 24, 50, 50] * 2,
        "model.dtype": ["bf16"] * 4 + ["int4"] * 4, "policy": ["lru", "belady"] * 4,
        "policy_label": ["lru", "belady"] * 4, "cache_label": ["x"] * 8,
        "tpot_ms": [100.0, 50.0, 60.0, 30.0, 10.0, 5.0, 8.0, 4.0]})
    fig = F.scenario_bars(frame, order=["fast", "base"])
    assert len(fig.data) == 2  # bf16 and int4 panels; bandwidth is determined by the label
    assert list(fig.data[0].x) == ["fast", "base"] and list(fig.data[0].y) == [60.0, 100.0]
    assert list(fig.data[1].y) == [8.0, 10.0]  # the bound (belady) is not a candidate


def test_figures_need_their_data():
    frame = pl.DataFrame({"run_id": ["a"], "status": ["ok"], "policy": ["lru"], "policy_label": ["lru"],
                          "cache_label": ["2"], "tpot_ms": [1.0], "hit_rate": [0.5],
                          "cache_experts": [64], "expert_cache_gb": [22.0], "tokens_per_s": [1.0],
                          "link.bandwidth_gbps": [16]})
    assert F.miss_ratio_curve(frame) is None  # one cache size: no curve
    assert F.tpot_vs_bandwidth(frame) is None
    assert F.memory_bandwidth_heatmap(frame) is None
    assert F.predicted_vs_measured(pl.DataFrame({"x": [1]})) is None


def test_miss_ratio_curve_marks_bounds():
    frame = pl.DataFrame({
        "run_id": list("abcd"), "status": ["ok"] * 4, "policy": ["lru", "lru", "belady", "belady"],
        "policy_label": ["lru", "lru", "belady", "belady"], "cache_label": list("1212"),
        "cache_experts": [64, 128] * 2, "hit_rate": [0.3, 0.6, 0.4, 0.7],
        "link.bandwidth_gbps": [16, 16, 16, 16], "hardware": ["h"] * 4})
    fig = F.miss_ratio_curve(frame)
    names = sorted(t.name for t in fig.data)
    assert names == ["belady (bound)", "lru"]
    bound = next(t for t in fig.data if t.name == "belady (bound)")
    assert bound.line.dash == "dash" and list(bound.y) == [0.4, 0.7]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium(report_dir):
    """Every figure div holds rendered plotly SVG after the page's scripts ran (CI installs
    Debian's chromium; skipped locally when it is absent)."""
    browser = _chromium()
    if browser is None:
        skip_unless_required("chromium", "chromium not installed (apt-get install -y chromium)")
    _, _, path = report_dir
    res = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--virtual-time-budget=15000", "--dump-dom", path.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    dom = res.stdout
    assert dom, res.stderr[-2000:]
    parts = re.split(r'<div class="figure" id="figure-\d+" data-figure="\d+">', dom)
    figures = parts[1:]
    assert len(figures) == len(EXPECTED_FIGURES)
    for i, part in enumerate(figures):
        assert 'class="plot-container plotly"' in part, f"figure {i} has no plotly container"
        assert len(re.findall(r'<svg class="main-svg"', part)) >= 2, f"figure {i} did not render"


def test_report_takes_validation_from_expertsim_validate(report_dir, tmp_path):
    from expertsim.errors import ConfigError

    out, _, _ = report_dir
    folder = tmp_path / "validate-out"
    folder.mkdir()
    pl.DataFrame({"policy": ["lru", "no-cache"], "predicted_tpot_ms": [5.0, 9.0],
                  "measured_tpot_ms": [4.0, 10.0]}).write_parquet(folder / "validation.parquet")
    text = write_report(out, tmp_path / "r.html", validation=folder).read_text()
    assert "validation.parquet, from `expertsim validate`" in text
    assert "mean abs. error 17.5%" in text  # (1/4 + 1/10) / 2
    with pytest.raises(ConfigError, match="does not exist"):
        write_report(out, tmp_path / "r2.html", validation=tmp_path / "missing")


def test_report_when_every_run_failed(tmp_path):
    study = load_study(write_study(tmp_path, '[fixed]\nhardware = "a100-80gb-pcie"\ntrace_requests = 1\n'
                                             'trace_max_tokens = 4\n"gpu.memory_gb" = 4\n'
                                             '[grid]\ncache_per_layer = [2, 3]\n'))
    run_sweep(study, tmp_path / "out", jobs=1, progress=False)
    text = write_report(tmp_path / "out").read_text()
    assert "2 runs finished of 2 planned: 0 ok, 2 failed" in text and "Failed runs" in text
    assert _figure_titles(text) == ["Trace locality: popularity (default)", "Trace locality: reuse distance (default)"]


def test_figures_export_as_svg_or_say_what_is_missing(report_dir, tmp_path):
    """`--format svg` writes every figure through plotly's static export (Kaleido); without
    Kaleido it fails with one line before writing anything. The HTML's camera button saves SVG."""
    import importlib.util

    from expertsim.errors import ConfigError

    out, _, path = report_dir
    assert '"toImageButtonOptions": {"format": "svg", "filename": "miss-ratio-curve"}' in path.read_text()
    if importlib.util.find_spec("kaleido") is None:
        with pytest.raises(ConfigError, match="--format svg needs Kaleido"):
            write_report(out, tmp_path / "r.html", figure_format="svg")
        assert not (tmp_path / "r.html").exists() and not (out / "figures").exists()
        return
    write_report(out, tmp_path / "r.html", figure_format="svg")
    svgs = sorted((out / "figures").glob("*.svg"))
    assert len(svgs) == len(EXPECTED_FIGURES) and all(p.read_text().startswith("<svg") for p in svgs)


def test_line_figures_are_small_multiples_not_spaghetti(report_dir):
    from expertsim.analysis.results import load_results

    out, _, _ = report_dir
    frame = load_results(out)
    fig = F.tpot_vs_bandwidth(frame)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    policies = {t.name for t in lines}
    assert policies == {"lru", "belady (bound)", "no-cache"}  # one series per policy, not per configuration
    assert sum(t.showlegend for t in lines) == len(policies)  # each once in the legend
    colors = {}
    for t in lines:
        assert colors.setdefault(t.name, t.line.color) == t.line.color  # the same colour in every panel
    panels = {(t.xaxis, t.yaxis) for t in lines}
    assert len(panels) >= 4 and fig.layout.height >= 300 * 2  # memory x cache size panels, height grows
    breakdown = F.latency_breakdown(frame)
    stall = next(t for t in breakdown.data if t.name == "stall on copies")
    assert stall.marker.color == F.BREAKDOWN_COLORS["stall on copies"] == "#d62728"
    assert max(len(y) for y in stall.y) <= 76 and len(set(stall.y)) == len(stall.y)  # short, distinct
    assert breakdown.layout.height == F.bar_height(len(stall.y))
