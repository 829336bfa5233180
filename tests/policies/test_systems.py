"""Behaviour of miss handling, prefetch, scheduling and the named systems."""
from __future__ import annotations

import numpy as np
import pytest

from expertsim.errors import ConfigError, PolicyError
from expertsim.policies import CacheConfig, MissAction, make_policy, make_system, system_names
from expertsim.policies.base import free_expert_memory_bytes
from expertsim.policies.miss import CpuWhenCheaper, cumulative_levels
from expertsim.policies.prefetch import PregatedPrefetch
from expertsim.policies.systems import ComposedSystem
from expertsim.sim.cache_replay import replay_cache
from expertsim.specs import load_hardware, load_model

from policy_helpers import make_trace

MIXTRAL = load_model("mixtral-8x7b")


def random_trace(tokens=40, layers=6, experts=8, k=2, requests=2, seed=0, weights=False):
    rng = np.random.default_rng(seed)
    ex = np.stack([np.stack([rng.choice(experts, k, replace=False) for _ in range(layers)]) for _ in range(tokens)])
    w = None
    if weights:
        w = rng.dirichlet(np.ones(k), size=(tokens, layers)).astype(np.float32)
        w = -np.sort(-w, axis=2)
    req = np.repeat(np.arange(requests), tokens // requests)
    return make_trace(ex, experts, weights=w, requests=req, token_id=rng.integers(0, 50, tokens))


# --- miss handling ----------------------------------------------------------------------
def test_hobbit_thresholds_split_full_low_skip_by_cumulative_gate_weight():
    experts = np.array([[0, 1, 2, 3]])
    weights = np.array([[0.5, 0.3, 0.15, 0.05]])
    # cumulative weight ranked above: 0, .5, .8, .95 -> full, full (< .6), low (< .9), skip
    assert cumulative_levels(experts, weights, 0.6, 0.9) == {0: 2, 1: 2, 2: 1, 3: 0}
    assert cumulative_levels(experts, weights, 0.4, 0.7) == {0: 2, 1: 1, 2: 0, 3: 0}
    # an expert shared by two tokens takes the higher level
    both = cumulative_levels(np.array([[0, 1], [1, 0]]), np.array([[0.95, 0.05], [0.95, 0.05]]), 0.6, 0.9)
    assert both == {0: 2, 1: 2}


def test_hobbit_levels_of_a_few_tokens_equal_the_array_path():
    """A decode token's levels come from Python floats: they must equal the array path's on the
    same rows (float32 weights with ties and sums near the thresholds, and no weights)."""
    from expertsim.policies.miss import _cumulative_levels_few

    rng = np.random.default_rng(3)
    experts = rng.integers(0, 8, size=(40, 4))
    weights = rng.choice(np.array([0.1, 0.2, 0.3, 0.5, 0.05], dtype=np.float32), size=(40, 4))
    for w in (weights, None):
        for full, low in ((0.6, 0.9), (0.3, 0.6), (0.0, 0.5)):
            # 160 choices: the array path; the helper is the few-token path on the same rows
            assert cumulative_levels(experts, w, full, low) == _cumulative_levels_few(experts, w, full, low)


def test_hobbit_system_reports_degraded_and_dropped_gate_mass():
    # One layer, 4 experts, top-2; cache of 2 slots per layer; weights (.7,.3) and (.95,.05).
    experts = np.array([[[0, 1]], [[2, 3]]])
    weights = np.array([[[0.7, 0.3]], [[0.95, 0.05]]])
    trace = make_trace(experts, 4, weights=weights)
    system = make_system("hobbit", full_threshold=0.6, low_threshold=0.9)
    from expertsim.policies.serve import LayerServer
    from expertsim.policies import ExpertCache, RunContext

    cache = ExpertCache(1, 4, 100, CacheConfig(per_layer=2), system.eviction, top_k=2)
    system.prepare(RunContext(model=None, hardware=None, cost=None, cache=cache, trace=trace))
    server = LayerServer(system, cache, 100, 25)
    plans = []
    for t in range(2):
        obs = server.observe(now_ns=0, iteration=t, layer=0, tokens=np.array([t]), experts=experts[t, 0:1],
                             weights=weights[t, 0:1], phase=1, trace=trace)
        plan, _ = server.serve(obs)
        plans.append(plan)
        from expertsim.policies import LayerOutcome
        server.finish(obs, plan, LayerOutcome(0, plan.hits, plan.misses, 0, 0, 0))
    actions = [{i.expert: i.action for i in p.items} for p in plans]
    assert actions[0] == {0: MissAction.COPY, 1: MissAction.LOW_PRECISION}  # .7 ranked above: low
    assert actions[1] == {2: MissAction.COPY, 3: MissAction.SKIP}  # .95 ranked above: skip
    assert plans[0].degraded_gate_mass == pytest.approx(0.3)
    assert plans[1].dropped_gate_mass == pytest.approx(0.05)
    assert [i.copy_bytes for i in plans[0].items] == [100, 25]


class FakeCost:
    def __init__(self, transfer, gpu, cpu):
        self.t, self.g, self.c = transfer, gpu, cpu

    def transfer_time_ns(self, nbytes):
        return self.t

    def expert_time_ns(self, tokens, low_precision_dtype=None):
        return self.g * tokens

    def cpu_expert_time_ns(self, tokens):
        return self.c * tokens


def _ctx(cost, trace, cache_config=CacheConfig(per_layer=2), eviction=None):
    from types import SimpleNamespace

    from expertsim.policies import ExpertCache, RunContext
    from expertsim.policies.eviction import LRU

    cache = ExpertCache(trace.num_layers, trace.num_experts, 100, cache_config, eviction or LRU(), top_k=trace.top_k)
    model = SimpleNamespace(expert_bytes=lambda dtype=None: 100, top_k=trace.top_k)
    ctx = RunContext(model=model, hardware=None, cost=cost, cache=cache, trace=trace)
    cache.eviction.prepare(ctx)
    return ctx


def test_cpu_when_cheaper_follows_the_cost_model():
    handler = CpuWhenCheaper()
    trace = make_trace(np.array([[[0, 1]]]), 4)
    # copy 1000 ns + GPU 10 ns/token vs CPU 300 ns/token: CPU wins at 1 token, copy at 4 tokens
    handler.prepare(_ctx(FakeCost(1000, 10, 300), trace))
    assert handler.cpu_is_cheaper(1) and handler.cpu_is_cheaper(3)
    assert not handler.cpu_is_cheaper(4)
    with pytest.raises(PolicyError, match="cost model"):
        CpuWhenCheaper().prepare(_ctx(None, trace))


def test_fiddler_computes_misses_on_cpu_when_copy_is_slower():
    model, hw = MIXTRAL, load_hardware("rtx4090")
    from expertsim.sim.cost import CostModel

    cost = CostModel(model, hw)
    assert cost.cpu_expert_time_ns(1) < cost.transfer_time_ns(model.expert_bytes()) + cost.expert_time_ns(1)
    trace = random_trace(tokens=12, layers=32, requests=3)
    system = make_system("fiddler", profile_fraction=0.34)
    r = replay_cache(trace, system, CacheConfig(global_slots=40), model=model, hardware=hw, phase="all", scope="global")
    # the hot set (40 most used keys of request 0) is resident from the start; decode misses go
    # to the CPU, so the cache never changes
    hot = set(system.eviction.hot_keys(40).tolist())
    assert set(np.flatnonzero(system._cache.state != 0).tolist()) == hot
    assert system._cache.evictions == 0
    assert r.hits > 0 and r.misses > 0


def test_skip_misses_keeps_top1_and_drops_light_experts():
    system = make_system("skip-misses", max_weight=0.3)
    trace = make_trace(np.array([[[0, 1]], [[2, 3]]]), 4, weights=np.array([[[0.8, 0.2]], [[0.6, 0.4]]]))
    ctx = _ctx(None, trace, eviction=system.eviction)
    system.prepare(ctx)
    from expertsim.policies.serve import LayerServer

    server = LayerServer(system, ctx.cache, 100, 25)
    obs = server.observe(now_ns=0, iteration=0, layer=0, tokens=np.array([0]), experts=trace.experts[0:1, 0],
                         weights=trace.weights[0:1, 0], phase=1, trace=trace)
    plan, decision = server.serve(obs)
    assert decision.miss_actions == {1: MissAction.SKIP}
    assert plan.dropped_gate_mass == pytest.approx(0.2)


# --- prefetch ---------------------------------------------------------------------------
def test_pregated_accuracy_one_gives_zero_demand_misses_after_warmup():
    trace = random_trace(tokens=30, layers=8, requests=1)
    system = make_system("pregated-moe", accuracy=1.0)
    r = replay_cache(trace, system, CacheConfig(global_slots=6), phase="all", scope="global")
    # layer 0 is not prefetched (nothing runs before it); every later layer was loaded one ahead
    assert r.per_layer_misses[1:].sum() == 0
    assert r.per_layer_misses[0] > 0


def test_pregated_lower_accuracy_misses_more():
    trace = random_trace(tokens=30, layers=8, requests=1)

    def misses(acc):
        return replay_cache(trace, make_system("pregated-moe", accuracy=acc), CacheConfig(global_slots=6),
                            phase="all", scope="global").misses

    assert misses(1.0) < misses(0.5) < misses(0.0) + 1
    assert make_system("pregated-moe").oracle


def test_speculative_prefetch_needs_recorded_speculation():
    trace = random_trace(tokens=10, layers=4)
    with pytest.raises(PolicyError, match="spec-depth"):
        replay_cache(trace, make_system("mixtral-offloading", speculation="trace"), CacheConfig(per_layer=2),
                     phase="all", scope="global")
    # with the true next-layer routing recorded as speculation, later layers never miss
    spec = np.full_like(trace.experts, 255)
    spec[:, :-1] = trace.experts[:, 1:]
    trace.extras["spec_d1"] = spec
    r = replay_cache(trace, make_system("mixtral-offloading", speculation="trace"), CacheConfig(per_layer=4),
                     phase="all", scope="global")
    assert r.per_layer_misses[1:].sum() == 0


def test_se_moe_ring_loads_whole_next_layer():
    trace = random_trace(tokens=10, layers=4, experts=4)
    r = replay_cache(trace, make_system("se-moe"), CacheConfig(global_slots=8), phase="all", scope="global")
    # the ring wraps: after the first layer every layer is fully resident when it runs
    assert r.misses == 2
    cfg = make_system("se-moe").default_cache_config(MIXTRAL, load_hardware("h200"), 0)
    assert cfg.global_slots == 16


def test_moe_infinity_prefetch_matches_history():
    # two requests with the same routing: the second request's later layers are prefetched
    one = random_trace(tokens=6, layers=6, requests=1, seed=3).experts
    trace = make_trace(np.concatenate([one, one]), 8, requests=np.repeat([0, 1], 6))
    r = replay_cache(trace, make_system("moe-infinity", depth=1), CacheConfig(global_slots=10), phase="all",
                     scope="request")
    base = replay_cache(trace, make_policy("lru"), CacheConfig(global_slots=10), phase="all", scope="request")
    assert r.per_layer_misses[6 // 2:].sum() < base.per_layer_misses[6 // 2:].sum()
    assert r.misses < base.misses


def test_adaptive_distance_grows_on_stalls_and_shrinks_when_calm():
    from expertsim.policies import LayerOutcome
    from expertsim.policies.prefetch import AdaptiveDistance

    pf = AdaptiveDistance(PregatedPrefetch(1), min_distance=1, max_distance=3, calm_layers=2)
    trace = random_trace(tokens=4, layers=6)
    pf.prepare(_ctx(FakeCost(10, 10, 300), trace))  # copy of top-k = one layer's compute: distance 1
    from types import SimpleNamespace

    obs = SimpleNamespace(layer=0)
    for stall in (5, 5, 5, 0, 0, 0, 0):
        pf.on_layer_end(obs, LayerOutcome(0, 0, 0, stall, 0, 0))
    assert pf.history == [2, 3, 3, 3, 2, 2, 1]


def test_adaptive_initial_distance_from_bandwidth_and_compute():
    from expertsim.policies.prefetch import AdaptiveDistance
    from expertsim.sim.cost import CostModel

    pf = AdaptiveDistance(PregatedPrefetch(1), max_distance=8)
    trace = random_trace(tokens=4, layers=32)
    ctx = _ctx(CostModel(MIXTRAL, load_hardware("rtx4090")), trace)
    ctx.model = MIXTRAL
    # a Mixtral copy (~14 ms) dwarfs a layer's compute: the distance saturates
    assert pf.initial_distance(ctx) == 8


# --- scheduling -------------------------------------------------------------------------
def test_route_group_scheduler_minimises_distinct_experts():
    from expertsim.policies.scheduling import RouteGroupScheduler

    routes = {0: np.array([1, 2]), 1: np.array([7, 8]), 2: np.array([1, 3]), 3: np.array([2, 1])}
    s = RouteGroupScheduler()
    batch = s.select([0, 1, 2, 3], 2, routes)
    assert batch == [0, 3]  # request 3 adds no new expert
    assert s.distinct_experts(batch, routes) == 2
    assert s.distinct_experts([0, 1], routes) == 4
    assert s.select([0, 1, 2, 3], 3, routes) == [0, 3, 2]
    assert s.select([1, 0], 1, routes) == [1]  # the oldest always runs


def test_cache_aware_scheduler_prefers_resident_routes():
    from expertsim.policies.scheduling import CacheAwareScheduler

    resident = np.zeros(10, dtype=bool)
    resident[[4, 5]] = True
    routes = {0: np.array([1]), 1: np.array([1, 2]), 2: np.array([4, 5]), 3: None}
    assert CacheAwareScheduler().select([0, 1, 2, 3], 3, routes, resident) == [0, 2, 1]


def test_system_select_batch_uses_routes_seen_so_far():
    trace = random_trace(tokens=8, layers=2, requests=4)
    system = make_system("expertflow", prefetch="path", train_fraction=0.5)
    replay_cache(trace, system, CacheConfig(per_layer=4), phase="all", scope="global")
    routes = system.tracker.routes([0, 1, 2, 3])
    last = [np.flatnonzero(trace.request == r)[-1] for r in range(4)]
    for r, t in zip(range(4), last):
        expected = np.unique(np.concatenate([layer * 8 + trace.experts[t, layer].astype(np.int64) for layer in range(2)]))
        assert routes[r].tolist() == expected.tolist()
    chosen = system.select_batch([0, 1, 2, 3], 2, 0)
    assert chosen[0] == 0 and len(chosen) == 2


def test_cache_aware_expert_order_serves_resident_first():
    from expertsim.policies.scheduling import cache_aware_order

    trace = make_trace(np.array([[[0, 3]], [[1, 3]]]), 4)
    ctx = _ctx(None, trace, CacheConfig(per_layer=3))
    ctx.cache.admit(0, 3)
    ctx.cache.mark_resident(0, 3)
    from expertsim.policies.serve import LayerServer

    server = LayerServer(ComposedSystem(), ctx.cache, 100, 25)
    obs = server.observe(now_ns=0, iteration=0, layer=0, tokens=np.array([0, 1]), experts=trace.experts[:, 0],
                         weights=None, phase=0, trace=trace)
    assert cache_aware_order(obs) == [3, 0, 1]


# --- allocation and sizing --------------------------------------------------------------
def _numpy_proportional_slots(total, demand, minimum, maximum):
    """The split as first written, in numpy (the reference the compiled one must equal)."""
    n = len(demand)
    slots = np.full(n, minimum, dtype=np.int64)
    spare = min(total - minimum * n, (maximum - minimum) * n)
    weight = np.asarray(demand, dtype=np.float64) + 1e-9
    while spare > 0:
        room = slots < maximum
        share = np.where(room, weight, 0.0)
        ideal = share / share.sum() * spare
        add = np.minimum(np.floor(ideal).astype(np.int64), maximum - slots)
        left = spare - int(add.sum())
        if left > 0:
            order = np.lexsort((np.arange(n), -(ideal - np.floor(ideal)) * room))
            for i in order[:left]:
                if slots[i] + add[i] < maximum:
                    add[i] += 1
        if add.sum() == 0:
            break
        slots += add
        spare -= int(add.sum())
    return slots


def test_compiled_split_is_the_numpy_one():
    """proportional_slots (compiled, numpy's summation order) equals the numpy split on random
    demands (few layers to 200: past numpy's 128-element pairwise block), including ties and
    layers at their maximum; and numpy's sum itself on random float64 arrays."""
    from expertsim.policies.allocation import proportional_slots
    from expertsim.policies.allocation_kernels import _numpy_sum

    rng = np.random.default_rng(11)
    for _ in range(3000):
        n = int(rng.integers(1, 200))
        maximum = int(rng.integers(1, 12))
        minimum = int(rng.integers(0, maximum + 1))
        demand = rng.integers(0, maximum + 1, n) * rng.integers(0, 2, n)
        total = minimum * n + int(rng.integers(0, (maximum - minimum) * n + 3))
        expected = _numpy_proportional_slots(total, demand, minimum, maximum)
        assert proportional_slots(total, demand, minimum, maximum).tolist() == expected.tolist()
        a = rng.random(n) * 10.0 ** rng.integers(-6, 6, n)
        assert _numpy_sum(a, 0, n) == a.sum()


def test_cross_layer_allocation_moves_slots_to_busy_layers():
    from expertsim.policies.allocation import proportional_slots

    assert proportional_slots(12, np.array([0, 0, 10, 0]), 2, 8).tolist() == [2, 2, 6, 2]
    assert proportional_slots(12, np.array([1, 1, 1, 1]), 2, 8).tolist() == [3, 3, 3, 3]
    # layer 0 uses 4 experts, layer 1 one: after reallocation layer 0 has more room and stops missing
    ex = np.array([[[i % 4], [0]] for i in range(64)])
    trace = make_trace(ex, 4)
    from expertsim.policies.allocation import CrossLayerAllocator

    system = ComposedSystem(allocator=CrossLayerAllocator(interval=4, min_slots=1))
    r = replay_cache(trace, system, CacheConfig(per_layer=3), phase="all", scope="global")
    fixed = replay_cache(trace, make_policy("lru"), CacheConfig(per_layer=3), phase="all", scope="global")
    assert system.allocator.reallocations > 0
    cache = system._cache
    assert (cache.capacity // cache.expert_bytes).tolist() == [4, 2]  # 6 slots; at most 4 experts a layer
    assert fixed.per_layer_misses.tolist() == [64, 1]  # LRU on a cycle of 4 in 3 slots always misses
    # 4 cold misses in the first interval of 4 passes (expert 0 evicted by 3), one refill after it
    assert r.per_layer_misses.tolist() == [5, 1]


def test_default_cache_takes_the_free_gpu_memory():
    hw = load_hardware("rtx4090")
    free = free_expert_memory_bytes(MIXTRAL, hw, 0)
    expected = hw.gpu.memory_bytes - MIXTRAL.dense_bytes - int(hw.gpu.workspace_gb * 1e9)
    assert free == expected
    for name in system_names():
        system = make_system(name)
        fixed = system.cache_config(MIXTRAL)
        cfg = fixed or system.default_cache_config(MIXTRAL, hw, 4096)
        assert cfg.capacity_bytes(32, 8, MIXTRAL.expert_bytes()) <= free or getattr(system, "ignores_capacity", False) \
            or name == "no-cache", name
    big = make_system("cache-moe").default_cache_config(MIXTRAL, load_hardware("h200"), 0)
    assert big.per_layer >= 2
    with pytest.raises(ConfigError, match="short|left"):
        free_expert_memory_bytes(load_model("deepseek-v3"), hw, 100_000)  # 7 GB of KV on top of 19 GB dense


def test_every_system_has_docstring_description_and_label():
    for name in system_names():
        system = make_system(name)
        assert type(system).__doc__ and system.description, name
        assert system.label.startswith(name)
        assert repr(system)


def test_exact_prefetch_copies_no_more_than_demand_paging():
    # Predicted experts already resident are protected (on_predicted), and prefetches are capped
    # to the partition, so exact prefetch never copies more than LRU's demand misses.
    from expertsim.sim import Simulation

    trace = random_trace(tokens=20, layers=32, requests=2, seed=4)
    hw = load_hardware("a40")
    copies = {}
    for name in ("lru", "pregated-moe"):
        copies[name] = Simulation(MIXTRAL, hw, make_policy(name), CacheConfig(per_layer=3)).run(trace).metrics["h2d_copies"]
    assert copies["pregated-moe"] <= copies["lru"]


def test_fit_prefetches_caps_per_partition_and_lru_protects_predicted():
    from expertsim.policies import PrefetchRequest
    from expertsim.policies.serve import LayerServer

    trace = make_trace(np.array([[[0, 1], [2, 3]]]), 8)
    ctx = _ctx(None, trace, CacheConfig(per_layer=3))
    server = LayerServer(ComposedSystem(), ctx.cache, 100, 25)
    obs = server.observe(now_ns=0, iteration=0, layer=0, tokens=np.array([0]), experts=trace.experts[:, 0],
                         weights=None, phase=1, trace=trace)
    reqs = [PrefetchRequest(1, e, priority=1) for e in range(5)] + [PrefetchRequest(0, 7, priority=2)]
    kept = ComposedSystem.fit_prefetches(obs, reqs)
    assert [(r.layer, r.expert) for r in kept] == [(1, 0), (1, 1), (1, 2), (0, 7)]  # 3 slots; layer 0 has 3 - 2
    lru = ctx.cache.eviction
    lru.on_insert(8 + 5, 3, -1)
    lru.on_predicted(8 + 5, 10)
    assert lru.score[13] == 10


@pytest.mark.parametrize("model_name", ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite"])
def test_every_system_fits_every_hardware_that_holds_the_dense_part(model_name):
    from expertsim.sim import Simulation
    from expertsim.specs import list_hardware

    model = load_model(model_name)
    context = 4096
    checked = 0
    for hw_name in list_hardware():
        hw = load_hardware(hw_name)
        try:
            free_expert_memory_bytes(model, hw, context)
        except ConfigError:
            continue  # the dense part (or top-k experts) does not fit: no system can run
        for name in system_names():
            if name == "no-cache":
                continue  # reserves top-k slots per layer (memory of 2 x layers experts): see its docstring
            system = make_system(name)
            config = system.cache_config(model) or system.default_cache_config(model, hw, context)
            Simulation(model, hw, system, config).memory_check(context)  # raises when it does not fit
            checked += 1
    assert checked >= len(system_names())


def test_fiddler_hot_set_survives_request_scope_resets():
    trace = random_trace(tokens=12, layers=32, requests=3)
    system = make_system("fiddler")
    replay_cache(trace, system, CacheConfig(global_slots=40), model=MIXTRAL, hardware=load_hardware("rtx4090"),
                 phase="all", scope="request")
    hot = set(system.eviction.hot_keys(40).tolist())
    assert set(np.flatnonzero(system._cache.state != 0).tolist()) == hot


def test_route_grouping_runs_under_continuous_batching():
    from expertsim.policies.scheduling import RouteGroupScheduler
    from expertsim.sim import SimOptions, Simulation

    trace = random_trace(tokens=24, layers=32, requests=6, seed=2)
    calls = []

    class Recording(RouteGroupScheduler):
        def select(self, ready, max_batch, routes=None, resident=None):
            calls.append((list(ready), {r: routes.get(r) is not None for r in ready}))
            return super().select(ready, max_batch, routes, resident)

    system = ComposedSystem(scheduler=Recording(), expert_order="cache-aware")
    result = Simulation(MIXTRAL, load_hardware("a40"), system, CacheConfig(per_layer=3),
                        options=SimOptions(batch=3, arrival="offline")).run(trace)
    assert result.metrics["tokens"] == 24
    assert calls and any(len(ready) > 3 for ready, _ in calls)  # a real choice was made
    assert any(any(known.values()) for _, known in calls[1:])  # routes learned from served layers


def test_eam_prefetch_equals_its_array_definition():
    """The eam prefetcher scores on Python floats, keeps the history's blocks per request and the
    query's norm as a running sum of squares: its requests must equal the array computation
    (cosine match over layers 0..l, normalised rows, lexsort by score then id) at every layer."""
    from types import SimpleNamespace

    from expertsim.policies.prefetch import ActivationMatrixPrefetch

    L, E, k = 6, 8, 2
    rng = np.random.default_rng(5)
    pf = ActivationMatrixPrefetch(depth=2, history=3)
    pf.prepare(SimpleNamespace(cache=SimpleNamespace(num_layers=L, num_experts=E), trace=SimpleNamespace(top_k=k)))
    current, past = np.zeros((L, E)), []
    for request in range(6):
        pf.on_request_start(request)
        if current.any():
            past = (past + [current / current.sum()])[-3:]
        current = np.zeros((L, E))
        for _ in range(int(rng.integers(1, 5))):
            for layer in range(L):
                experts = rng.choice(E, size=(int(rng.integers(1, 3)), k))
                got = [(r.layer, r.expert, r.priority) for r in pf.prefetch(SimpleNamespace(layer=layer, experts=experts))]
                np.add.at(current[layer], experts.ravel(), 1.0)
                match = None
                if past:
                    hist = np.stack(past)
                    q = current[:layer + 1].ravel()
                    h = hist[:, :layer + 1].reshape(len(hist), -1)
                    sim = h @ q / (np.linalg.norm(h, axis=1) * (np.linalg.norm(q) or 1.0) + 1e-12)
                    match = hist[int(np.argmax(sim))]
                want = []
                for d in (1, 2):
                    t = layer + d
                    if t >= L:
                        break
                    score = current[t] / max(current[t].sum(), 1.0)
                    if match is not None:
                        score = score + match[t] / max(match[t].sum(), 1e-12)
                    if not score.any():
                        continue
                    best = np.lexsort((np.arange(E), -score))[:k]
                    want += [(t, int(e), d) for e in sorted(best[score[best] > 0].tolist())]
                assert got == want, (request, layer)
                assert np.array_equal(pf.current, current)


def test_observe_of_a_few_tokens_equals_the_array_path():
    """A small pass's needed experts, token counts and gate mass come from Python ints and floats:
    they must equal np.unique / np.bincount on the same float32 weights (repeated experts too)."""
    from expertsim.policies import ExpertCache, RunContext
    from expertsim.policies.serve import LayerServer

    rng = np.random.default_rng(7)
    experts = rng.integers(0, 8, size=(6, 1, 4))
    weights = rng.dirichlet(np.ones(4), size=(6, 1)).astype(np.float32)
    trace = make_trace(experts, 8, weights=weights)
    system = make_system("skip-misses")
    cache = ExpertCache(1, 8, 100, CacheConfig(per_layer=4), system.eviction, top_k=4)
    system.prepare(RunContext(model=None, hardware=None, cost=None, cache=cache, trace=trace))
    server = LayerServer(system, cache, 100, 25)
    for rows in (slice(0, 1), slice(0, 3), slice(0, 6)):
        ex, w = experts[rows, 0], weights[rows, 0]
        obs = server.observe(now_ns=0, iteration=0, layer=0, tokens=np.arange(6)[rows], experts=ex, weights=w,
                             phase=1, trace=trace)
        needed, inverse = np.unique(ex, return_inverse=True)
        assert obs.needed.tolist() == needed.tolist()
        assert obs.tokens_per_expert.tolist() == np.bincount(inverse.ravel()).tolist()
        mass = np.bincount(inverse.ravel(), weights=w.ravel().astype(np.float64), minlength=len(needed))
        assert obs.gate_mass.dtype == mass.dtype and np.array_equal(obs.gate_mass, mass)
