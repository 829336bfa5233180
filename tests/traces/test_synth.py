"""Synthetic traces: fits reproduce the real LRU curve and reuse; baselines; the default trace."""
from __future__ import annotations

import json

import numpy as np
import pytest

from expertsim.errors import TraceError
from expertsim.traces.stats import lru_hit_curve, reuse_next_token
from expertsim.traces.synth import (
    DEFAULT_TRACE_SOURCE,
    compare_to_fit,
    default_trace,
    fit_trace,
    load_fit,
    save_fit,
    synth_baseline,
    synth_from_fit,
)


def assert_fit_quality(real, fit, sample, tol=0.02):
    sizes = list(range(1, real.num_experts + 1))
    want = lru_hit_curve(real, sizes)["hit_rate"]
    got = lru_hit_curve(sample, sizes)["hit_rate"]
    err = np.abs(np.array(want) - np.array(got))
    assert err.max() < tol, f"worst K={sizes[int(err.argmax())]}: real {want[int(err.argmax())]:.4f} synthetic {got[int(err.argmax())]:.4f}"
    assert abs(reuse_next_token(real) - reuse_next_token(sample)) < tol
    return err.max()


@pytest.mark.shared
@pytest.mark.slow
def test_mixtral_fit_meets_targets(mixtral_trace, tmp_path):
    fit = fit_trace(mixtral_trace, model="mixtral-8x7b")
    path = save_fit(fit, tmp_path / "m.fit.json")
    sample = synth_from_fit(load_fit(path), 53, seed=1)
    assert_fit_quality(mixtral_trace, fit, sample)
    # Fewer, shorter requests in the sample would not hide errors: the sample is comparable in size.
    assert sample.only_phase("decode").num_tokens > 10000


@pytest.mark.shared
@pytest.mark.slow
def test_llama_fit_meets_targets_at_every_cache_size(llama_trace):
    fit = fit_trace(llama_trace, model="llama4-maverick")
    sample = synth_from_fit(fit, 194, seed=2)
    assert_fit_quality(llama_trace, fit, sample)


@pytest.mark.shared
def test_shipped_fits_are_derived_from_the_shared_traces(mixtral_trace, llama_trace):
    for name, real in (("mixtral-8x7b", mixtral_trace), ("llama4-maverick", llama_trace)):
        fit = load_fit(name)
        t = fit["targets"]
        assert t["lru_hit_curve"]["hit_rate"] == pytest.approx(
            lru_hit_curve(real, t["lru_hit_curve"]["cache_sizes"])["hit_rate"], abs=1e-12)
        assert fit["num_layers"] == real.num_layers and fit["top_k"] == real.top_k


def test_shipped_fit_samples_match_its_targets():
    fit = load_fit("mixtral-8x7b")
    sample = synth_from_fit(fit, 30, seed=3)
    cmp = compare_to_fit(fit, sample)
    assert cmp["max_abs_error"] < 0.02
    assert cmp["reuse_next_token"]["abs_error"] < 0.02
    assert sample.metadata["source"].startswith("synthetic: sampled from the mixtral-8x7b fit")


def test_default_trace_is_small_deterministic_and_labelled():
    a = default_trace()
    b = default_trace()
    assert np.array_equal(a.experts, b.experts)
    assert a.num_requests == 8 and int((a.phase == 1).sum()) == 8 * 64
    assert a.metadata["source"] == DEFAULT_TRACE_SOURCE
    assert a.metadata["model"] == "mixtral-8x7b"
    assert a.num_layers == 32 and a.top_k == 2
    a.validate()
    # Its locality resembles the real Mixtral trace's, not uniform routing (reuse 0.25).
    assert 0.31 < reuse_next_token(a) < 0.40
    assert not np.array_equal(default_trace(seed=1).experts, a.experts)


def test_uniform_and_zipf_baselines():
    uni = synth_baseline(4, 8, 2, 20, decode_tokens=200, seed=0)
    assert reuse_next_token(uni) == pytest.approx(2 / 8, abs=0.01)
    uni.validate()
    z = synth_baseline(4, 8, 2, 20, decode_tokens=200, zipf=1.5, seed=0)
    shares = np.bincount(z.experts[:, 0].ravel(), minlength=8) / z.experts[:, 0].size
    assert shares.max() > 0.25  # a skewed popularity
    assert reuse_next_token(z) > reuse_next_token(uni) + 0.05
    with pytest.raises(TraceError, match="top_k=9 exceeds"):
        synth_baseline(2, 8, 9, 1)
    with pytest.raises(TraceError, match="--zipf must be >= 0"):
        synth_baseline(2, 8, 2, 1, zipf=-1)


def test_fit_errors(tmp_path):
    with pytest.raises(TraceError, match="neither a file nor a shipped fit"):
        load_fit("nope")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(TraceError, match="not an expertsim routing fit"):
        load_fit(bad)
    bad.write_text("{")
    with pytest.raises(TraceError, match="not valid JSON"):
        load_fit(bad)
    with pytest.raises(TraceError, match="--requests must be >= 1"):
        synth_from_fit(load_fit("mixtral-8x7b"), 0)


def test_fit_on_a_synthetic_trace_round_trips_its_locality():
    # A trace with strong reuse; its fit's samples keep that reuse (independent of shared data).
    src = synth_from_fit(load_fit("llama4-maverick"), 40, seed=5)
    fit = fit_trace(src)
    again = synth_from_fit(fit, 40, seed=6)
    assert abs(reuse_next_token(src) - reuse_next_token(again)) < 0.03
