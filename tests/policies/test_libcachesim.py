"""Hit and miss counts of LRU, FIFO and Belady equal libCacheSim's exactly on the shared Mixtral
trace, with the standard (flattened, evict-on-insert) semantics and one global pool.

The policy classes through the general LayerServer path (~200 us per access) on a slice, the
decode tokens of the first 2 requests (18,880 accesses); the whole decode trace (895,872
accesses) through the fast engine, which the perf tests hold equal to the general path.
"""
from __future__ import annotations

import pytest

from expertsim.policies import CacheConfig, make_policy
from expertsim.sim.cache_replay import replay_cache

from eviction_counts import flattened_keys, libcachesim_counts

pytest.importorskip("libcachesim")


@pytest.mark.shared
@pytest.mark.parametrize("slots", [72, 160])
@pytest.mark.parametrize("name, cache_cls, engine", [("lru", "LRU", "des"), ("lru", "LRU", "auto"),
                                                     ("fifo", "FIFO", "des"), ("belady", "Belady", "des")])
def test_counts_equal_libcachesim(mixtral_trace, name, cache_cls, engine, slots):
    """engine "des": the policy classes through the general LayerServer; "auto": the fast replay
    where it supports the policy (LRU)."""
    view = mixtral_trace.head_requests(2).only_phase("decode")
    keys = flattened_keys(view)
    assert len(keys) == 18_880
    expected = libcachesim_counts(cache_cls, slots, keys)
    result = replay_cache(view, make_policy(name), CacheConfig(global_slots=slots), semantics="standard",
                          phase="decode", scope="global", engine=engine)
    assert (result.hits, result.misses) == expected
    assert expected[0] > 0  # a slice where the cache matters


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("slots", [64, 160])
def test_whole_decode_trace_equals_libcachesim(mixtral_trace, slots):
    """The whole decode trace (895,872 accesses): LRU and FIFO through `expertsim cache
    --semantics standard --global-slots N` (the fast replay, equal to the general path by the
    perf tests), Belady through the fast engine's stream kernel, against libCacheSim."""
    from expertsim.sim.fast import replay_stream

    view = mixtral_trace.only_phase("decode")
    keys = flattened_keys(view)
    assert len(keys) == 895_872
    for name, cache_cls in (("lru", "LRU"), ("fifo", "FIFO")):
        expected = libcachesim_counts(cache_cls, slots, keys)
        result = replay_cache(view, make_policy(name), CacheConfig(global_slots=slots), semantics="standard",
                              phase="decode", scope="global", engine="fast")
        assert (result.hits, result.misses) == expected, name
    hits = int(replay_stream(keys, slots, "belady").sum())
    assert (hits, len(keys) - hits) == libcachesim_counts("Belady", slots, keys)
