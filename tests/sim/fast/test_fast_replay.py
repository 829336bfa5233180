"""The fast cache replay equals the general LayerServer replay, count for count."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fasthelpers import small_traces

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, System, make_policy
from expertsim.policies.eviction import LRU
from expertsim.sim import fast
from expertsim.sim.fast import lru
from expertsim.sim.cache_replay import replay_cache

# General path on the full shared Mixtral MTBench trace (decode, request scope, per-layer LRU,
# together semantics): hits out of 13,998 x 32 x 2 = 895,872 accesses. K=6 is 0.81360 with the
# current LayerServer (checked request block by request block against engine="des").
PINNED_HITS = {2: 316_154, 4: 534_827, 6: 728_879}
PINNED_RATE = {2: 0.35290, 4: 0.59699, 6: 0.81360}


@pytest.mark.shared
@pytest.mark.parametrize("K", [2, 4, 6])
def test_shared_trace_pinned(mixtral_trace, K):
    r = replay_cache(mixtral_trace, make_policy("lru"), CacheConfig(per_layer=K), engine="fast")
    assert r.accesses == 13_998 * 32 * 2
    assert r.hits == PINNED_HITS[K]
    assert round(r.hit_rate, 5) == PINNED_RATE[K]
    assert r.per_layer_hits.sum() == r.hits and r.per_layer_misses.sum() == r.misses


@pytest.mark.shared
def test_shared_trace_requests_equal_general_path(mixtral_trace):
    """Two requests of the real trace (cut to 240 tokens, prefill and decode), per-layer and
    global pools, both semantics."""
    starts = mixtral_trace.request_starts()
    sub = mixtral_trace.select(np.arange(starts[3], starts[5])).max_tokens(240)
    for cfg, semantics in ((CacheConfig(per_layer=2), "together"), (CacheConfig(per_layer=5), "standard"),
                           (CacheConfig(global_slots=70), "together"), (CacheConfig(global_slots=70), "standard")):
        for scope in ("request", "global"):
            a = replay_cache(sub, make_policy("lru"), cfg, engine="fast", semantics=semantics, scope=scope, phase="all")
            b = replay_cache(sub, make_policy("lru"), cfg, engine="des", semantics=semantics, scope=scope, phase="all")
            assert (a.hits, a.misses) == (b.hits, b.misses)
            assert (a.per_layer_hits == b.per_layer_hits).all()


def _config(draw_kind, size, trace):
    L, E, k = trace.num_layers, trace.num_experts, trace.top_k
    if draw_kind == 0:
        return CacheConfig(per_layer=min(k + size, E + 1))
    if draw_kind == 1:
        return CacheConfig(global_slots=min(k + size, L * E + 1))
    return CacheConfig(budget_bytes=k + size)  # expert_bytes = 1 without a model


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(), kind=st.integers(0, 2), size=st.integers(0, 12),
       scope=st.sampled_from(["request", "global"]), semantics=st.sampled_from(["together", "standard"]),
       phase=st.sampled_from(["decode", "prefill", "all"]),
       policy=st.sampled_from(["lru", "fifo", "no-cache"]), per_token=st.sampled_from([True, True, False]))
def test_random_configs_equal_general_path(trace, kind, size, scope, semantics, phase, policy, per_token):
    cfg = _config(kind, size, trace)
    kwargs = dict(phase=phase, scope=scope, semantics=semantics)
    if not fast.supports_cache_replay(make_policy(policy), cfg, semantics):
        return  # a built-in system whose hooks changed: left to the general path

    def run(engine):
        if per_token:
            return replay_cache(trace, make_policy(policy), cfg, engine=engine, **kwargs)
        # The trace's passes (prefill unions): the fast path is called directly until
        # replay_cache passes per_token on.
        if engine == "des":
            return replay_cache(trace, make_policy(policy), cfg, engine="des", per_token=False, **kwargs)
        return fast.replay_cache_fast(trace, make_policy(policy), cfg, per_token=False, **kwargs)

    try:
        b = run("des")
    except ConfigError as exc:
        with pytest.raises(ConfigError) as info:
            run("fast")
        assert str(info.value) == str(exc)
        return
    a = run("fast")
    assert (a.hits, a.misses) == (b.hits, b.misses)
    assert (a.per_layer_hits == b.per_layer_hits).all() and (a.per_layer_misses == b.per_layer_misses).all()


def test_supports_only_what_it_reproduces():
    class MyLRU(LRU):
        pass

    class MySystem(System):
        pass

    assert fast.supports_cache_replay(make_policy("lru"), CacheConfig(per_layer=2), "together")
    assert fast.supports_cache_replay(make_policy("no-cache"), None, "standard")
    assert not fast.supports_cache_replay(System(MyLRU()), CacheConfig(per_layer=2), "together")
    assert not fast.supports_cache_replay(MySystem(LRU()), CacheConfig(per_layer=2), "together")
    assert not fast.supports_cache_replay(make_policy("lru"), CacheConfig(per_layer=2), "other")
    with pytest.raises(ConfigError, match="does not support"):
        replay_cache_fast_unsupported()


def test_refuses_a_builtin_system_whose_hooks_changed(monkeypatch):
    """E.g. all-on-gpu reloading its residents after each request-scope reset: the kernels do
    not model that, so the reference engines run it."""
    from expertsim.policies.systems import AllOnGpu

    assert fast.supports_cache_replay(make_policy("all-on-gpu"), None, "together")
    monkeypatch.setattr(AllOnGpu, "on_request_start", lambda self, request: None, raising=False)
    assert not fast.supports_cache_replay(make_policy("all-on-gpu"), None, "together")
    assert fast.supports_cache_replay(make_policy("lru"), CacheConfig(per_layer=2), "together")


def replay_cache_fast_unsupported():
    from fasthelpers import make_trace

    trace = make_trace([[(1, 1)]], 1, 4, 2, 0)
    replay_cache(trace, System(type("Other", (LRU,), {})()), CacheConfig(per_layer=2), engine="fast")


def test_pure_python_kernels_agree(monkeypatch):
    """Without numba the kernels run as Python: same results (checked through py_func)."""
    if not fast.HAVE_NUMBA:
        pytest.skip("numba absent: the kernels already run as Python")
    from fasthelpers import make_trace

    trace = make_trace([[(0, 5), (1, 1), (1, 1), (0, 3), (1, 1)], [(1, 1)] * 6], 3, 6, 2, 7)
    cfg = CacheConfig(per_layer=3)
    want = replay_cache(trace, make_policy("lru"), cfg, engine="fast", phase="all")
    monkeypatch.setattr(lru, "_lru_steps", lru._lru_steps.py_func)  # _lru_kernel calls it by name
    got = replay_cache(trace, make_policy("lru"), cfg, engine="fast", phase="all")
    assert (got.hits, got.misses) == (want.hits, want.misses)


@pytest.mark.parametrize("cfg", [CacheConfig(per_layer=3), CacheConfig(global_slots=7)])
@pytest.mark.parametrize("phase,scope", [("decode", "request"), ("all", "global"), ("prefill", "request")])
def test_streamed_parquet_replay_equals_in_memory(tmp_path, cfg, phase, scope):
    from fasthelpers import make_trace

    from expertsim.traces import write_trace

    passes = [[(0, 4), (1, 1), (1, 1), (1, 1), (0, 3), (1, 1)], [(0, 2)] + [(1, 1)] * 9, [(1, 1)] * 5]
    trace = make_trace(passes, 3, 6, 2, 11)
    path = write_trace(trace, tmp_path / "t.parquet")
    want = replay_cache(trace, make_policy("lru"), cfg, phase=phase, scope=scope, engine="des")
    for chunk in (1, 4, 1000):  # chunk boundaries inside requests
        got = fast.replay_parquet_fast(path, cfg, phase=phase, scope=scope, num_experts=6, chunk_tokens=chunk)
        assert (got.hits, got.misses) == (want.hits, want.misses)
        assert (got.per_layer_hits == want.per_layer_hits).all()


def test_streamed_parquet_replay_refuses_expert_ids_out_of_range(tmp_path):
    """The streamed replay reads Parquet without building a RoutingTrace: it checks the ids
    itself before the compiled kernels index arrays with them."""
    import polars as pl
    from fasthelpers import make_trace

    from expertsim.traces import write_trace

    trace = make_trace([[(0, 3), (1, 1), (1, 1)]], 2, 6, 2, 5)
    path = write_trace(trace, tmp_path / "t.parquet")
    with pytest.raises(ConfigError, match=r"outside 0\.\.3 for 4 experts"):
        fast.replay_parquet_fast(path, CacheConfig(per_layer=2), num_experts=4)
    frame = pl.read_parquet(path).with_columns(pl.lit(-1).cast(pl.Int16).alias("expert_1"))
    frame.write_parquet(tmp_path / "negative.parquet")
    with pytest.raises(ConfigError, match="ids start at 0"):
        fast.replay_parquet_fast(tmp_path / "negative.parquet", CacheConfig(per_layer=2), num_experts=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=small_traces(), scope=st.sampled_from(["request", "global"]),
       semantics=st.sampled_from(["together", "standard"]), policy=st.sampled_from(["lru", "fifo", "no-cache", "all-on-gpu"]),
       size=st.integers(0, 3))
def test_random_configs_with_a_model_equal_general_path(trace, scope, semantics, policy, size):
    """With a model the systems fix their own caches (no-cache: top-k per layer; all-on-gpu:
    everything resident at the start) and budgets are in bytes."""
    from fasthelpers import tiny_model

    model = tiny_model(trace.num_layers, trace.num_experts, trace.top_k)
    cfg = CacheConfig(budget_bytes=(trace.top_k + size) * model.expert_bytes() + 5)
    kwargs = dict(model=model, phase="all", scope=scope, semantics=semantics)
    if not fast.supports_cache_replay(make_policy(policy), cfg, semantics):
        return  # a built-in system whose hooks changed: left to the general path
    b = replay_cache(trace, make_policy(policy), cfg, engine="des", **kwargs)
    a = replay_cache(trace, make_policy(policy), cfg, engine="fast", **kwargs)
    assert (a.hits, a.misses) == (b.hits, b.misses)
    assert (a.per_layer_hits == b.per_layer_hits).all()
