"""Bad traces give a TraceError that names the value and the fix."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from expertsim.errors import TraceError
from expertsim.specs import load_model
from expertsim.traces import RoutingTrace, read_trace, trace_to_frame, write_trace


def tiny_trace(num_experts=8, k=2, layers=32, tokens=6, weights=False) -> RoutingTrace:
    rng = np.random.default_rng(0)
    experts = np.stack([
        np.stack([rng.choice(num_experts, size=k, replace=False) for _ in range(layers)])
        for _ in range(tokens)
    ])
    return RoutingTrace(
        experts=experts, request=np.repeat([0, 1], tokens // 2), step=np.tile([0, 1, 2], 2),
        position=np.tile([0, 1, 2], 2), phase=np.tile([0, 1, 1], 2), num_experts=num_experts,
        weights=rng.random(experts.shape).astype(np.float32) if weights else None,
    )


def test_round_trip_keeps_everything(tmp_path):
    trace = tiny_trace(weights=True)
    path = write_trace(trace, tmp_path / "t.parquet", model="mixtral-8x7b", dataset="unit")
    back = read_trace(path)
    assert np.array_equal(back.experts, trace.experts)
    assert np.allclose(back.weights, trace.weights)
    assert np.array_equal(back.phase, trace.phase)
    assert back.metadata["model"] == "mixtral-8x7b" and back.metadata["dataset"] == "unit"


def test_expert_id_out_of_range_for_model():
    trace = tiny_trace(num_experts=8)
    trace.num_experts = 16
    trace.experts[3, 5, 1] = 12
    with pytest.raises(TraceError, match=r"expert id 12 at token 3, layer 5 .*8 experts per layer"):
        trace.check_model(load_model("mixtral-8x7b"))


def test_wrong_layer_count_and_k_for_model():
    with pytest.raises(TraceError, match=r"24 MoE layers but model 'mixtral-8x7b' has 32"):
        tiny_trace(layers=24).check_model(load_model("mixtral-8x7b"))
    with pytest.raises(TraceError, match=r"top-1 routing but model 'mixtral-8x7b' uses top-2"):
        tiny_trace(k=1).check_model(load_model("mixtral-8x7b"))


def test_duplicate_expert_in_topk():
    trace = tiny_trace()
    trace.experts[2, 7] = [4, 4]
    with pytest.raises(TraceError, match=r"token 2 .*layer 7 lists expert 4 twice"):
        trace.validate()


def test_nan_weight(tmp_path):
    trace = tiny_trace(weights=True)
    trace.weights[1, 3, 0] = np.nan
    path = write_trace(trace, tmp_path / "nan.parquet")
    with pytest.raises(TraceError, match=r"'weight_0' is nan at row 35 \(request 0, position 1, layer 3\)"):
        read_trace(path)


def test_missing_columns(tmp_path):
    df = trace_to_frame(tiny_trace()).drop("phase")
    df.write_parquet(tmp_path / "m.parquet")
    with pytest.raises(TraceError, match=r"missing column\(s\) \['phase'\]"):
        read_trace(tmp_path / "m.parquet")


def test_truncated_and_not_parquet(tmp_path):
    path = write_trace(tiny_trace(), tmp_path / "ok.parquet")
    data = path.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(TraceError, match=r"truncated or not Parquet"):
        read_trace(tmp_path / "cut.parquet")
    (tmp_path / "text.parquet").write_text("request,step\n0,0\n")
    with pytest.raises(TraceError, match=r"truncated or not Parquet"):
        read_trace(tmp_path / "text.parquet")
    with pytest.raises(TraceError, match=r"does not exist"):
        read_trace(tmp_path / "absent.parquet")


def test_missing_layer_row_is_located(tmp_path):
    df = trace_to_frame(tiny_trace())
    df = df.filter(~((pl.col("request") == 1) & (pl.col("position") == 1) & (pl.col("layer") == 9)))
    df.write_parquet(tmp_path / "hole.parquet")
    with pytest.raises(TraceError, match=r"request 1, position 1 .*missing \[9\]"):
        read_trace(tmp_path / "hole.parquet")


@pytest.mark.shared
def test_every_shared_trace_reads_and_validates(shared_dir):
    expected = {
        "mixtral-8x7b-mtbench": (27244, 32, 2, 8),
        "llama4-maverick-mmlu": (28076, 24, 1, 128),
        "deepseek-v2-lite-puffin": (28081, 26, 6, 64),
        "mixtral-8x7b-humaneval-gsm8k-gates": (577, 32, 2, 8),
    }
    for stem, (tokens, layers, k, experts) in expected.items():
        trace = read_trace(shared_dir / f"{stem}.dev.parquet")
        assert (trace.num_tokens, trace.num_layers, trace.top_k) == (tokens, layers, k)
        assert trace.num_experts <= experts
    mixtral = read_trace(shared_dir / "mixtral-8x7b-mtbench.dev.parquet")
    assert int((mixtral.phase == 1).sum()) == 13998
    assert len(mixtral.pass_starts()) - 1 == 71 + 13998  # prefill passes + one pass per decode token
