"""Importers of public formats, extras round-trip, and validation of every shared trace."""
from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from expertsim.errors import TraceError
from expertsim.traces import RoutingTrace, read_trace, trace_to_frame, write_trace
from expertsim.traces.importers import import_trace, parse_moe_lightning

SHARED = ["mixtral-8x7b-mtbench.dev.parquet", "llama4-maverick-mmlu.dev.parquet",
          "deepseek-v2-lite-puffin.dev.parquet", "mixtral-8x7b-humaneval-gsm8k-gates.dev.parquet"]
MODEL_OF = {"mixtral-8x7b-mtbench.dev.parquet": "mixtral-8x7b", "llama4-maverick-mmlu.dev.parquet": "llama4-maverick",
            "deepseek-v2-lite-puffin.dev.parquet": "deepseek-v2-lite",
            "mixtral-8x7b-humaneval-gsm8k-gates.dev.parquet": "mixtral-8x7b"}


def routed(n, layers=4, experts=8, k=2, seed=0):
    rng = np.random.default_rng(seed)
    return np.argsort(rng.random((n, layers, experts)), axis=2)[:, :, :k]


@pytest.mark.shared
@pytest.mark.parametrize("name", SHARED)
def test_every_shared_trace_imports_and_validates(name, tmp_path, shared_path):
    path = shared_path(name)
    trace = import_trace("parquet", path, model=MODEL_OF[name])
    trace.validate()
    assert trace.metadata["model"] == MODEL_OF[name]
    # The CSV form of the same rows imports to the same routing.
    small = trace.head_requests(2)
    csv = tmp_path / "t.csv"
    trace_to_frame(small).with_columns(pl.col("phase").cast(pl.String)).write_csv(csv)
    back = import_trace("csv", csv, model=MODEL_OF[name])
    assert np.array_equal(back.experts, small.experts)
    assert np.array_equal(back.phase, small.phase)


def test_vllm_npz_with_request_boundaries(tmp_path):
    ex = routed(30)
    np.savez(tmp_path / "r.npz", routed_experts=ex, request_lengths=[10, 20], prompt_lengths=[4, 5])
    tr = import_trace("vllm", tmp_path / "r.npz")
    assert tr.num_requests == 2 and np.array_equal(tr.experts, ex)
    assert tr.phase[:10].tolist() == [0] * 4 + [1] * 6
    assert tr.step[:10].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]
    assert tr.position[10:13].tolist() == [0, 1, 2]
    # Offsets and per-token request ids give the same split.
    np.savez(tmp_path / "o.npz", routed_experts=ex, request_offsets=[0, 10, 30])
    np.savez(tmp_path / "i.npz", experts=ex, request_ids=np.repeat([7, 9], [10, 20]))
    for f in ("o.npz", "i.npz"):
        other = import_trace("vllm", tmp_path / f)
        assert np.array_equal(other.request, np.repeat([0, 1], [10, 20]))


def test_vllm_per_request_arrays_and_npy(tmp_path):
    a, b = routed(5, seed=1), routed(7, seed=2)
    np.savez(tmp_path / "p.npz", request_0=a, request_1=b)
    tr = import_trace("vllm", tmp_path / "p.npz")
    assert np.array_equal(tr.experts, np.concatenate([a, b])) and tr.num_requests == 2
    np.save(tmp_path / "one.npy", a)
    assert import_trace("vllm", tmp_path / "one.npy").num_requests == 1


def test_vllm_ragged_layers_error_names_layer_and_fix(tmp_path):
    ex = routed(12)
    np.savez(tmp_path / "rag.npz", layer_0=ex[:, 0], layer_1=ex[:, 1], layer_2=ex[:9, 2], layer_3=ex[:, 3])
    with pytest.raises(TraceError, match=r"layer 2 has 9 tokens.*--truncate-ragged"):
        import_trace("vllm", tmp_path / "rag.npz")
    tr = import_trace("vllm", tmp_path / "rag.npz", truncate_ragged=True)
    assert tr.num_tokens == 9 and np.array_equal(tr.experts, ex[:9])


def test_vllm_bad_boundaries_and_ids(tmp_path):
    np.savez(tmp_path / "b.npz", routed_experts=routed(10), request_lengths=[4, 4])
    with pytest.raises(TraceError, match="do not cover the 10 tokens"):
        import_trace("vllm", tmp_path / "b.npz")
    np.save(tmp_path / "f.npy", routed(4).astype(np.float32))
    with pytest.raises(TraceError, match="must be integers"):
        import_trace("vllm", tmp_path / "f.npy")
    np.save(tmp_path / "big.npy", routed(4) + 8)
    with pytest.raises(TraceError, match="out of range"):
        import_trace("vllm", tmp_path / "big.npy", model="mixtral-8x7b")


def write_ml_log(path, passes):
    """A MoE-Lightning-style log: input_ids, then one topk_ids tensor per layer."""
    lines = []
    for ids, layers in passes:
        lines.append(f"input_ids: tensor([{[int(x) for x in ids]}], device='cuda:0')")
        for l, rows in enumerate(layers):
            body = ",\n        ".join(str([int(x) for x in r]) for r in rows)
            lines.append(f"Layer {l} topk_ids: tensor([{body}], device='cuda:0')")
    path.write_text("\n".join(lines) + "\n")


def test_moe_lightning_log(tmp_path):
    ex = routed(6, layers=3)
    passes = [([1, 2, 3, 4], [ex[:4, l] for l in range(3)])]
    passes += [([5 + i], [ex[4 + i: 5 + i, l] for l in range(3)]) for i in range(2)]
    write_ml_log(tmp_path / "c0.log", passes)
    write_ml_log(tmp_path / "c1.log", passes[:2])
    tr = import_trace("moe-lightning", [tmp_path / "c0.log", tmp_path / "c1.log"])
    assert tr.num_requests == 2 and tr.num_tokens == 11
    assert np.array_equal(tr.experts[:6], ex)
    assert tr.phase[:6].tolist() == [0, 0, 0, 0, 1, 1]
    assert tr.step[:6].tolist() == [0, 0, 0, 0, 1, 2]
    assert tr.token_id[:6].tolist() == [1, 2, 3, 4, 5, 6]
    assert tr.position[:6].tolist() == list(range(6))


def test_moe_lightning_ragged_and_abbreviated(tmp_path):
    ex = routed(5, layers=2)
    log = tmp_path / "r.log"
    write_ml_log(log, [([1, 2, 3, 4], [ex[:4, 0], ex[:4, 1]]), ([5], [ex[4:5, 0]])])
    with pytest.raises(TraceError, match=r"no topk_ids for layers \[1\].*--truncate-ragged"):
        import_trace("moe-lightning", log)
    assert import_trace("moe-lightning", log, truncate_ragged=True).num_tokens == 4
    with pytest.raises(TraceError, match="abbreviated"):
        parse_moe_lightning("input_ids: tensor([[1, ..., 9]])\n", "x.log")
    with pytest.raises(TraceError, match="no 'input_ids"):
        parse_moe_lightning("hello\n", "x.log")


def test_numpy_and_unknown_format(tmp_path):
    np.save(tmp_path / "a.npy", routed(8, k=1)[:, :, 0])
    tr = import_trace("numpy", tmp_path / "a.npy", phase="prefill")
    assert tr.top_k == 1 and (tr.phase == 0).all()
    with pytest.raises(TraceError, match="unknown import format"):
        import_trace("json", tmp_path / "a.npy")
    with pytest.raises(TraceError, match="does not exist"):
        import_trace("numpy", tmp_path / "missing.npy")


def test_model_with_dense_layers_keeps_moe_layers(tmp_path):
    # deepseek-v2-lite: 27 layers, layer 0 dense; a file listing every layer is cut to the 26 MoE.
    ex = routed(4, layers=27, experts=64, k=6)
    np.save(tmp_path / "all.npy", ex)
    tr = import_trace("vllm", tmp_path / "all.npy", model="deepseek-v2-lite")
    assert tr.num_layers == 26 and np.array_equal(tr.experts, ex[:, 1:])


def test_extras_round_trip(tmp_path):
    n, L, k, E = 6, 3, 2, 8
    tr = RoutingTrace(experts=routed(n, L, E, k), request=[0] * 3 + [1] * 3, step=[0, 0, 1, 0, 1, 2],
                      position=[0, 1, 2, 0, 1, 2], phase=[0, 0, 1, 0, 1, 1], num_experts=E,
                      weights=np.full((n, L, k), 0.5))
    spec = routed(n, L, E, k, seed=3).astype(np.uint8)
    spec[:, -1] = 255
    probs = np.random.default_rng(0).random((n, L, E)).astype(np.float16)
    tr.extras = {"spec_d1": spec, "router_probs": probs, "entropy": np.arange(n, dtype=np.float32)}
    back = read_trace(write_trace(tr, tmp_path / "x.parquet"))
    assert set(back.extras) == {"spec_d1", "router_probs", "entropy"}
    assert np.array_equal(back.extras["spec_d1"], spec) and back.extras["spec_d1"].dtype == np.uint8
    assert np.array_equal(back.extras["router_probs"], probs) and back.extras["router_probs"].dtype == np.float16
    assert np.array_equal(back.extras["entropy"], np.arange(n, dtype=np.float32))
    tr.extras = {"bad": np.zeros((n, L + 1, 2))}
    with pytest.raises(TraceError, match="extras are"):
        write_trace(tr, tmp_path / "y.parquet")
