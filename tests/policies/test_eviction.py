"""Exact hit/miss counts of every eviction policy on tiny hand traces (libCacheSim's habit), per
layer and global partitions, and Belady's optimality on random traces."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertsim.errors import PolicyError
from expertsim.policies import CacheConfig, System, eviction_names, make_eviction, make_policy
from expertsim.sim.cache_replay import replay_cache

from policy_helpers import make_trace, replay_standard

A, B, C, D, E = range(5)
# Classic stream, capacity 3. Worked by hand in the comments of each test.
STREAM = [A, B, C, A, D, A, E, B, A, C]
# A three times, then B and C alternate: frequency keeps A, recency does not (capacity 2).
FREQ_STREAM = [A, A, A, B, C, B, C, A]


def test_lru_hand_trace():
    # A B C | A hit | D evicts B | A hit | E evicts C | B evicts D | A hit | C evicts E
    assert replay_standard("lru", STREAM, slots=3) == (3, 7)


def test_fifo_hand_trace():
    # A B C | A hit | D evicts A | A evicts B | E evicts C | B evicts D | A hit | C evicts A
    assert replay_standard("fifo", STREAM, slots=3) == (2, 8)


def test_lifo_hand_trace():
    # A B C | A hit | D evicts C (last in) | A hit | E evicts D | B hit | A hit | C evicts E
    assert replay_standard("lifo", STREAM, slots=3) == (4, 6)


def test_belady_hand_trace():
    # A B C | A hit | D evicts C (next use 10) | A hit | E evicts D (never again) | B, A hit | C miss
    assert replay_standard("belady", STREAM, slots=3) == (4, 6)


def test_lfu_keeps_the_frequent_expert():
    # LRU: A A A B | C evicts A | B C hit | A miss -> 4 misses.
    assert replay_standard("lru", FREQ_STREAM, slots=2) == (4, 4)
    # LFU (in-cache counts): A=3 stays; B and C evict each other on every use -> 5 misses.
    assert replay_standard("lfu", FREQ_STREAM, slots=2) == (3, 5)


def test_decayed_lfu_forgets():
    # decay 0.5 per tick: at C (tick 5) A's count is 1.75 * 0.25 < B's 1 * 0.5, so A leaves: as LRU.
    system = System(make_eviction("lfu", decay=0.5))
    assert replay_standard(system, FREQ_STREAM, slots=2) == (4, 4)


def test_perfect_lfu_remembers_evicted_counts():
    # A A B C B D A, capacity 2. In-cache LFU: C evicts B, B evicts C, D evicts B -> 5 misses.
    stream = [A, A, B, C, B, D, A]
    assert replay_standard("lfu", stream, slots=2) == (2, 5)
    # Perfect LFU: B comes back with count 2, so D ties A (2) vs B (2) -> LRU evicts A -> 6 misses.
    assert replay_standard(System(make_eviction("lfu", in_cache_only=False)), stream, slots=2) == (1, 6)


def test_random_is_seeded():
    a = replay_standard(System(make_eviction("random", seed=1)), STREAM * 5, slots=3)
    b = replay_standard(System(make_eviction("random", seed=1)), STREAM * 5, slots=3)
    assert a == b
    outcomes = {replay_standard(System(make_eviction("random", seed=s)), STREAM * 5, slots=3) for s in range(8)}
    assert len(outcomes) > 1  # the seed matters
    assert all(h + m == 50 for h, m in outcomes)


def test_static_hot_set_from_profile_file(tmp_path):
    # Profile A=5, B=4, C=0, D=0, E=1. D evicts C, E evicts D, C evicts E: A and B never leave.
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"counts": [[5, 4, 0, 0, 1]]}))
    system = System(make_eviction("static", profile=str(path)))
    assert replay_standard(system, STREAM, slots=3) == (4, 6)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"counts": [[1, 2]]}))
    with pytest.raises(PolicyError, match="shape"):
        replay_standard(System(make_eviction("static", profile=str(bad))), STREAM, slots=3)


def test_static_hot_set_profile_from_first_requests():
    # The first request (the profiling quarter of 4) uses A most: A is never evicted later.
    stream = [A, A, A, B] + [B, C, D, A] * 3
    requests = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    trace = make_trace(np.asarray(stream), 4, requests=requests)
    system = System(make_eviction("static", profile_fraction=0.25))
    r = replay_cache(trace, system, CacheConfig(global_slots=2), semantics="standard", phase="all", scope="global")
    # Profile A=3, B=1, C=D=0. Block 1: A A A B -> 2 hits. Block 2: B hit, C evicts B, D evicts C,
    # A hit. Blocks 3, 4: B evicts D, C evicts B, D evicts C, A hit. A never leaves.
    assert (r.hits, r.misses) == (2 + 2 + 1 + 1, 2 + 2 + 3 + 3)


def _together(policy, experts, weights, slots, num_experts):
    trace = make_trace(experts, num_experts, weights=weights)
    system = make_policy(policy) if isinstance(policy, str) else policy
    r = replay_cache(trace, system, CacheConfig(global_slots=slots), phase="all", scope="global")
    return r.hits, r.misses


# One layer, top-2 with gate weights, 3 slots. Token 2 needs C and D: one free slot, then one of
# A (.95) and B (.05) leaves. LRU evicts A (looked up first); score-aware policies evict B; token
# 3 uses A and C.
SCORE_EXPERTS = np.array([[[A, B]], [[C, D]], [[A, C]]])
SCORE_WEIGHTS = np.array([[[0.95, 0.05]], [[0.5, 0.5]], [[0.5, 0.5]]])


@pytest.mark.parametrize("policy, expected", [
    ("lru", (1, 5)),
    (System(make_eviction("hybrimoe", alpha=0.5)), (2, 4)),
    (System(make_eviction("fmoe", alpha=0.5)), (2, 4)),
])
def test_score_aware_policies_keep_high_gate_experts(policy, expected):
    assert _together(policy, SCORE_EXPERTS, SCORE_WEIGHTS, 3, 4) == expected


def test_moe_infinity_keeps_request_hot_experts():
    # A is used by both first tokens; D and E then evict B and C (EAM counts 1), not A (2).
    experts = np.array([[[A, B]], [[A, C]], [[D, E]], [[A, D]]])
    assert _together("lru", experts, None, 3, 5) == (2, 6)  # LRU evicts B then A
    assert _together(System(make_eviction("eam-priority")), experts, None, 3, 5) == (3, 5)


def test_moe_infinity_layer_proximity_prefers_early_layers():
    policy = make_eviction("eam-priority")
    from types import SimpleNamespace

    policy.prepare(SimpleNamespace(cache=SimpleNamespace(num_layers=4, num_experts=2)))
    policy.current_layer = 0
    keys = np.array([1 * 2, 3 * 2])  # expert 0 of layers 1 and 3, same (uniform) activation
    pri = policy.priorities(keys)
    assert pri[0] > pri[1]
    assert policy.victim(keys, 10, 0) == 6


def test_lifo_inactive_first_prefers_experts_the_layer_does_not_use():
    from types import SimpleNamespace

    policy = make_eviction("lifo")
    policy.prepare(SimpleNamespace(cache=SimpleNamespace(num_layers=1, num_experts=4)))
    for key, tick in ((0, 1), (1, 2), (2, 3)):
        policy.on_insert(key, tick, -1)
    policy.on_layer(SimpleNamespace(layer=0, cache=SimpleNamespace(num_experts=4), needed=np.array([2])))
    assert policy.victim(np.array([0, 1, 2]), 4, -1) == 1  # 2 is newest but active
    plain = make_eviction("lifo", inactive_first=False)
    plain.prepare(SimpleNamespace(cache=SimpleNamespace(num_layers=1, num_experts=4)))
    for key, tick in ((0, 1), (1, 2), (2, 3)):
        plain.on_insert(key, tick, -1)
    assert plain.victim(np.array([0, 1, 2]), 4, -1) == 2


def test_per_layer_partitions_versus_global_pool():
    # Layer 0 cycles over 3 experts, layer 1 always uses expert 0 (k = 1, 6 tokens).
    experts = np.array([[[i % 3], [0]] for i in range(6)])
    trace = make_trace(experts, 3)
    per_layer = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=2), semantics="standard",
                             phase="all", scope="global")
    assert (per_layer.hits, per_layer.misses) == (5, 7)  # layer 0 thrashes 2 slots: 6 + 1 misses
    pool = replay_cache(trace, make_policy("lru"), CacheConfig(global_slots=4), semantics="standard",
                        phase="all", scope="global")
    assert (pool.hits, pool.misses) == (8, 4)  # 4 slots hold all 4 keys: cold misses only
    assert per_layer.per_layer_misses.tolist() == [6, 1]


def test_every_eviction_policy_has_a_readable_repr_and_docstring():
    for name in eviction_names():
        policy = make_eviction(name)
        assert type(policy).__doc__ and len(type(policy).__doc__) > 30, name
        assert repr(policy).startswith(type(policy).__name__ + "(")
        assert policy.name == name


def test_bad_parameters_name_the_value():
    with pytest.raises(PolicyError, match="decay"):
        make_eviction("lfu", decay=1.5)
    with pytest.raises(PolicyError, match="bad parameters"):
        make_eviction("lru", nonsense=1)


# Every registered eviction policy that does not read the future (a new one is covered without
# editing this file); Belady is the oracle they are measured against.
ONLINE = [name for name in eviction_names() if not make_eviction(name).oracle]


def test_online_policies_come_from_the_registry():
    assert {"lru", "fifo", "lfu", "sequence-activation"} <= set(ONLINE)
    assert "belady" not in ONLINE


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_belady_beats_every_policy_on_random_traces(data):
    layers = data.draw(st.integers(1, 3))
    experts = data.draw(st.integers(2, 5))
    tokens = data.draw(st.integers(1, 25))
    stream = np.array(data.draw(st.lists(st.integers(0, experts - 1), min_size=tokens * layers,
                                          max_size=tokens * layers))).reshape(tokens, layers, 1)
    per_layer = data.draw(st.booleans())
    if per_layer:
        config = CacheConfig(per_layer=data.draw(st.integers(1, experts)))
    else:
        config = CacheConfig(global_slots=data.draw(st.integers(1, layers * experts)))
    trace = make_trace(stream, experts)

    def hits(name):
        r = replay_cache(trace, System(make_eviction(name)), config, semantics="standard", phase="all", scope="global")
        return r.hits

    best = hits("belady")
    for name in ONLINE:
        assert hits(name) <= best, name
