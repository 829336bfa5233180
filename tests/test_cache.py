"""ExpertCache + LayerServer bookkeeping: exact counts on hand traces, invariants under hypothesis."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertsim.errors import ConfigError
from expertsim.policies import CacheConfig, ExpertCache, eviction_names, make_eviction, make_policy
from expertsim.policies.eviction import LRU
from expertsim.sim.cache_replay import replay_cache
from expertsim.traces import RoutingTrace


def decode_trace(rows: list[list[list[int]]], num_experts: int, requests=None) -> RoutingTrace:
    experts = np.array(rows)
    n = len(rows)
    request = np.zeros(n, dtype=int) if requests is None else np.array(requests)
    return RoutingTrace(experts=experts, request=request, step=np.arange(n), position=np.arange(n),
                        phase=np.ones(n, dtype=int), num_experts=num_experts)


def test_lru_together_semantics_hand_trace():
    # One layer, top-2 of 6, K=3. Tokens: {0,1} {1,2} {3,4} {0,1} {2,3}
    # t0: miss 0,1                     cache {0,1}
    # t1: hit 1, miss 2                cache {0,1,2}     recency 0<1<2
    # t2: miss 3,4; evict among {0,1,2}: LRU 0 then 1   cache {2,3,4}
    # t3: miss 0,1; evict 2 then 3      cache {4,0,1}
    # t4: miss 2,3; evict 4 then 0      cache {1,2,3}
    trace = decode_trace([[[0, 1]], [[1, 2]], [[3, 4]], [[0, 1]], [[2, 3]]], 6)
    result = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=3), engine="des")
    assert (result.hits, result.misses) == (1, 9)


def test_lookups_in_ascending_order_set_recency():
    # K=3, top-2. t0 {0,1}; t1 {1,2}: 1 hit; 1 and 2 recent, 0 oldest. t2 {3,4}: evicts 0 then 1,
    # keeps 2. t3 {2,5}: 2 hits. A policy giving misses a later tick than hits would evict 2 earlier.
    trace = decode_trace([[[0, 1]], [[2, 1]], [[3, 4]], [[5, 2]]], 6)
    result = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=3), engine="des")
    assert (result.hits, result.misses) == (2, 6)


def test_request_scope_empties_cache():
    rows = [[[0, 1]], [[0, 1]], [[0, 1]], [[0, 1]]]
    trace = decode_trace(rows, 4, requests=[0, 0, 1, 1])
    per_request = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=2), scope="request", engine="des")
    global_ = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=2), scope="global", engine="des")
    assert (per_request.hits, per_request.misses) == (4, 4)
    assert (global_.hits, global_.misses) == (6, 2)


def test_empty_cache_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"0 slots per layer holds no expert.*--per-layer 1"):
        ExpertCache(4, 8, 100, CacheConfig(per_layer=0), LRU(), top_k=2)
    with pytest.raises(ConfigError, match="exactly one cache size"):
        CacheConfig(per_layer=2, global_slots=3)


def test_fewer_slots_than_top_k_stream_the_experts_through_them():
    """mixtral-offloading with offload_per_layer=7 keeps 1 slot per layer for a top-2 model: a
    token's two experts pass through the slot one after the other, so only an expert used again
    right after its own use can hit; the layer's last expert stays resident."""
    rows = [[[0, 1]], [[1, 2]], [[2, 3]], [[3, 2]]]
    trace = decode_trace(rows, 4, requests=[0, 0, 0, 0])
    result = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=1), scope="global", engine="des")
    # token 0: 0 miss, 1 miss (evicts 0); token 1: 1 hit, 2 miss; token 2: 2 hit, 3 miss; token 3: 3 hit, 2 miss
    assert (result.hits, result.misses) == (3, 5)


@st.composite
def random_case(draw):
    layers = draw(st.integers(1, 3))
    experts = draw(st.integers(2, 8))
    k = draw(st.integers(1, min(3, experts)))
    tokens = draw(st.integers(1, 25))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    rows = [[rng.choice(experts, size=k, replace=False).tolist() for _ in range(layers)] for _ in range(tokens)]
    requests = np.sort(rng.integers(0, 3, size=tokens))
    mode = draw(st.sampled_from(["per_layer", "global"]))
    if mode == "per_layer":
        config = CacheConfig(per_layer=draw(st.integers(k, experts)))
    else:
        config = CacheConfig(global_slots=draw(st.integers(k, experts * layers)))
    return decode_trace(rows, experts, requests), config


def checking(name: str):
    """The registered eviction policy ``name``, subclassed to check the cache's invariants every
    time it is asked for a victim (every registered policy: a new one is covered by itself)."""
    def prepare(self, ctx):
        super(cls, self).prepare(ctx)
        self.checked_cache = ctx.cache

    def victim(self, candidates, tick, position):
        assert (self.checked_cache.used <= self.checked_cache.capacity).all()
        assert (self.checked_cache.pins[candidates] == 0).all()
        return super(cls, self).victim(candidates, tick, position)

    base = type(make_eviction(name))
    cls = type(f"Checking{base.__name__}", (base,), {"prepare": prepare, "victim": victim})
    return cls()


@settings(max_examples=150, deadline=None)
@given(random_case(), st.sampled_from(["together", "standard"]), st.sampled_from(["request", "global"]),
       st.sampled_from(eviction_names()))
def test_hits_plus_misses_equal_accesses_and_capacity_holds(case, semantics, scope, policy):
    from expertsim.policies.base import System

    trace, config = case
    system = System(checking(policy))
    result = replay_cache(trace, system, config, semantics=semantics, scope=scope, engine="des")
    n, layers, k = trace.experts.shape
    assert result.hits + result.misses == n * layers * k  # distinct experts per token and layer
    cache = system.eviction.checked_cache
    assert (cache.used <= cache.capacity).all()
    if config.per_layer is not None:
        for layer in range(layers):
            assert cache.occupancy_entries(layer) <= config.per_layer
    else:
        assert cache.occupancy_entries() <= config.global_slots
    assert (cache.pins == 0).all()  # every pin released after each layer


def test_preloaded_experts_survive_a_request_scope_reset():
    from expertsim.specs import load_model

    model = load_model("mixtral-8x7b")
    rng = np.random.default_rng(1)
    rows = [[rng.choice(8, size=2, replace=False).tolist() for _ in range(32)] for _ in range(6)]
    trace = decode_trace(rows, 8, requests=[0, 0, 1, 1, 2, 2])
    for engine in ("des", "auto"):
        result = replay_cache(trace, make_policy("all-on-gpu"), None, model=model, scope="request",
                              engine=engine)
        assert (result.hits, result.misses) == (6 * 32 * 2, 0)
    cache = ExpertCache(2, 4, 10, CacheConfig(per_layer=2), LRU(), top_k=1)
    cache.eviction.score = np.zeros(8, dtype=np.int64)
    cache.preload([1, 6])
    cache.admit(0, 3)
    cache.reset()
    assert sorted(np.flatnonzero(cache.state).tolist()) == [1, 6]


class _Recorder(LRU):
    """LRU that records every call the cache makes to it, in order."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def on_access(self, key, tick, hit, position):
        self.calls.append(("access", key, tick, bool(hit), position))
        super().on_access(key, tick, hit, position)

    def on_insert(self, key, tick, position):
        self.calls.append(("insert", key, tick, position))
        super().on_insert(key, tick, position)

    def on_evict(self, key):
        self.calls.append(("evict", key))


def _cache(config):
    policy = _Recorder()

    class Ctx:
        pass

    cache = ExpertCache(3, 6, 100, config, policy, top_k=2)
    ctx = Ctx()
    ctx.cache = cache
    policy.prepare(ctx)
    return cache, policy


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(0, 2), st.sets(st.integers(0, 5), min_size=1, max_size=5),
                                st.booleans()), min_size=1, max_size=40),
       per_layer=st.sampled_from([None, 3, 4]))
def test_layer_lookups_and_admissions_equal_the_per_expert_calls(steps, per_layer):
    """lookup_layer/unpin_layer against the one-expert calls (is_loading, lookup, pin, unpin): the
    same hits, loading flags, ticks, pins, policy calls, evictions and occupancy; an optional
    admission is refused exactly when evicting every unpinned entry would not make room."""
    config = CacheConfig(per_layer=per_layer) if per_layer else CacheConfig(global_slots=5)
    fast, fast_policy = _cache(config)
    slow, slow_policy = _cache(config)
    position = 0
    for layer, experts, small in steps:
        ids = sorted(experts)
        hit, loading, ticks = fast.lookup_layer(layer, ids, position)
        ref = []
        for i, e in enumerate(ids):
            was_loading = bool(slow.is_loading(layer, e))
            h = bool(slow.lookup(layer, e, position + i))
            ref.append((h, was_loading, slow.tick))
            if h:
                slow.pin(layer, e)
        assert list(zip(hit, loading, ticks)) == ref
        for cache in (fast, slow):
            for e, h, tick in zip(ids, hit, ticks):
                if not h:
                    nbytes, p = 60 if small else 100, layer if per_layer else 0
                    free = int(cache.capacity[p] - cache.used[p])
                    evictable = int(cache.entry_bytes[cache._candidates(p, cache.key(layer, e))].sum())
                    room = bool(cache.state[cache.key(layer, e)]) or evictable + free >= nbytes
                    ok, out = cache.admit(layer, e, nbytes, position=position, required=False, tick=tick)
                    assert ok == room
                    if ok:
                        cache.pin(layer, e)
        fast.unpin_layer(layer, ids)
        for e in ids:
            if slow.pins[slow.key(layer, e)] > 0:
                slow.unpin(layer, e)
        position += len(ids)
        assert fast_policy.calls == slow_policy.calls
        for name in ("state", "pins", "slot", "entry_bytes", "used"):
            assert np.array_equal(getattr(fast, name), getattr(slow, name)), name
        assert fast.occupancy_bytes() == int(fast.used.sum())
        assert fast.peak_used_bytes >= fast.occupancy_bytes()
