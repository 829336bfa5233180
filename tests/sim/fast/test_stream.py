"""Classic stream replay (LRU, FIFO, Belady) against libCacheSim and the general path."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expertsim.policies import CacheConfig, make_policy
from expertsim.sim.cache_replay import replay_cache
from expertsim.sim.fast import next_use_positions, replay_stream


def brute(keys, capacity, policy):
    """Reference replays in plain Python."""
    cache: list[int] = []
    hits = []
    nu = next_use_positions(np.asarray(keys))
    nxt: dict[int, int] = {}
    for i, key in enumerate(keys):
        hit = key in cache
        hits.append(hit)
        if hit and policy == "lru":
            cache.remove(key)
            cache.append(key)
        elif not hit:
            if len(cache) >= capacity:
                if policy == "belady":
                    cache.remove(max(cache, key=lambda c: nxt[c]))
                else:
                    cache.pop(0)
            cache.append(key)
        nxt[key] = int(nu[i])
    return np.array(hits)


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(0, 12), min_size=0, max_size=80), capacity=st.integers(1, 8),
       policy=st.sampled_from(["lru", "fifo", "belady"]))
def test_stream_equals_reference(keys, capacity, policy):
    got = replay_stream(np.array(keys, dtype=np.int64), capacity, policy)
    want = brute(keys, capacity, policy)
    if policy == "belady":  # ties between never-used-again keys may pick another victim: counts equal
        assert got.sum() == want.sum()
    else:
        assert (got == want).all()


@pytest.mark.parametrize("policy", ["lru", "fifo", "belady"])
@pytest.mark.parametrize("capacity", [3, 40])
def test_stream_equals_libcachesim(tmp_path, policy, capacity):
    lcs = pytest.importorskip("libcachesim")
    rng = np.random.default_rng(capacity)
    keys = (rng.zipf(1.2, 50_000) % 300).astype(np.int64)
    n, nu = len(keys), next_use_positions(keys)
    rec = np.zeros(n, dtype=[("t", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
    rec["t"], rec["id"], rec["size"] = np.arange(1, n + 1), keys, 1
    rec["next"] = np.where(nu < n, nu + 1, -1)
    path = tmp_path / "s.oracleGeneral"
    rec.tofile(path)
    cache = {"lru": lcs.LRU, "fifo": lcs.FIFO, "belady": lcs.Belady}[policy](capacity)
    miss_ratio, _ = cache.process_trace(lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE))
    assert n - replay_stream(keys, capacity, policy).sum() == round(miss_ratio * n)


@pytest.mark.shared
def test_mixtral_stream_lru_equals_standard_replay(mixtral_trace):
    n, L, k = mixtral_trace.experts.shape
    keys = (np.arange(L)[None, :, None] * 8 + np.sort(mixtral_trace.experts, axis=2).astype(np.int64)).ravel()
    r = replay_cache(mixtral_trace, make_policy("lru"), CacheConfig(global_slots=64), phase="all",
                     scope="global", semantics="standard", engine="fast")
    assert replay_stream(keys, 64, "lru").sum() == r.hits


def test_negative_keys_are_refused_before_the_kernel():
    from expertsim.errors import ConfigError

    with pytest.raises(ConfigError, match=r"keys must be >= 0, got -3 at position 2"):
        replay_stream(np.array([1, 2, -3, 4]), 2, "lru")
