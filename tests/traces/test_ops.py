"""split / slice / concat / lazy scans, and the CLI around them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from expertsim.errors import TraceError
from expertsim.traces import read_trace, write_trace
from expertsim.traces.ops import concat, lazy_info, read_requests, slice_trace, split_requests
from expertsim.traces.synth import synth_baseline


@pytest.fixture()
def trace():
    t = synth_baseline(4, 8, 2, 10, prefill_tokens=3, decode_tokens=5, zipf=1.0, seed=0, model="toy")
    t.extras["spec_d1"] = t.experts.copy()
    return t


def test_split_is_a_partition_of_whole_requests(trace):
    train, held = split_requests(trace, 0.7, seed=1)
    a, b = set(np.unique(train.request)), set(np.unique(held.request))
    assert not a & b and a | b == set(range(10)) and len(a) == 7
    assert train.num_tokens + held.num_tokens == trace.num_tokens
    assert split_requests(trace, 0.7, seed=1)[0].request.tolist() == train.request.tolist()
    with pytest.raises(TraceError, match="strictly between 0 and 1"):
        split_requests(trace, 1.0)


def test_slice_requests_layers_phase(trace):
    s = slice_trace(trace, requests="2:4", layers="1:3", phase="decode")
    assert set(np.unique(s.request)) == {2, 3} and s.num_layers == 2 and (s.phase == 1).all()
    assert np.array_equal(s.experts, trace.experts[(np.isin(trace.request, [2, 3])) & (trace.phase == 1)][:, 1:3])
    assert s.extras["spec_d1"].shape == s.experts.shape
    with pytest.raises(TraceError, match="START:END"):
        slice_trace(trace, layers="1-3")
    with pytest.raises(TraceError, match="selects no layer"):
        slice_trace(trace, layers="9:")


def test_concat_checks_and_renumbers(trace):
    a, b = trace.head_requests(3), trace.select(np.isin(trace.request, [5, 6]))
    c = concat([a, b])
    assert c.num_tokens == a.num_tokens + b.num_tokens and "spec_d1" in c.extras
    with pytest.raises(TraceError, match="--renumber"):
        concat([a, a])
    r = concat([a, a], renumber=True)
    assert sorted(np.unique(r.request).tolist()) == [0, 1, 2, 3, 4, 5]
    other = synth_baseline(3, 8, 2, 1, seed=0)
    with pytest.raises(TraceError, match="only traces of one model"):
        concat([a, other])


def test_lazy_info_and_request_reads(trace, tmp_path):
    path = write_trace(trace, tmp_path / "t.parquet")
    info = lazy_info(path)
    assert (info["tokens"], info["layers"], info["top_k"], info["requests"], info["decode_tokens"]) == (80, 4, 2, 10, 50)
    part = read_requests(path, [3, 4])
    assert np.array_equal(part.experts, trace.experts[np.isin(trace.request, [3, 4])])
    with pytest.raises(TraceError, match="none of requests"):
        read_requests(path, [99])


def run_cli(*args):
    from typer.testing import CliRunner

    from expertsim.cli import app

    return CliRunner().invoke(app, ["trace", *args])


def test_cli_stats_json_synth_split(tmp_path):
    from expertsim.traces.stats import reuse_next_token

    out = tmp_path / "s.parquet"
    r = run_cli("synth", "--fit", "mixtral-8x7b", "--requests", "3", "--seed", "4", "--out", str(out))
    assert r.exit_code == 0, r.output
    r = run_cli("stats", str(out), "--json", "--html", str(tmp_path / "s.html"))
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert st["layers"] == 32 and st["lru_hit_curve"]["cache_sizes"] == list(range(2, 9))  # K >= top-k
    assert st["reuse_next_token"] == pytest.approx(reuse_next_token(read_trace(out)))
    assert "plotly" in (tmp_path / "s.html").read_text()
    r = run_cli("split", str(out), "--train", str(tmp_path / "a.parquet"), "--held-out", str(tmp_path / "b.parquet"))
    assert r.exit_code == 0 and read_trace(tmp_path / "a.parquet").num_requests == 2
    r = run_cli("synth", "--uniform", "--out", str(tmp_path / "u.parquet"))
    assert isinstance(r.exception, TraceError) and "--model" in str(r.exception)


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "expertsim.cli", "trace", "import", "--format", "vllm",
                        str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x.parquet")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
