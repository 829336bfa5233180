"""Named systems: compositions of eviction, prefetch, scheduling and miss handling.

:class:`ComposedSystem` wires the parts together; each named system is a small subclass with
explicit parameters and the paper it follows. Unless told otherwise (``--per-layer``,
``--global-slots``, ``--cache-gb``), a system's expert cache takes the GPU memory left after dense
weights, KV cache and workspace (``default_cache_config``), split evenly over layers (one pool
when that leaves fewer than top-k slots per layer; SE-MoE's ring and Fiddler's hot set are pools).
"""
from __future__ import annotations

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.allocation import CrossLayerAllocator
from expertsim.policies.base import (
    LayerDecision,
    LayerObservation,
    LayerOutcome,
    PrefetchRequest,
    RunContext,
    System,
    free_expert_memory_bytes,
)
from expertsim.policies.cache import CacheConfig
from expertsim.policies.eviction import FIFO, LRU, StaticHotSet, hottest
from expertsim.policies.miss import CpuWhenCheaper, GateThresholdPrecision, MissHandler, SkipMisses
from expertsim.policies.prefetch import (
    ActivationMatrixPrefetch,
    AdaptiveDistance,
    LayerRingPrefetch,
    LearnedPrefetch,
    ModelledSpeculation,
    PathPrefetch,
    Prefetcher,
    PregatedPrefetch,
    SpeculativePrefetch,
)
from expertsim.policies.registration import register_system
from expertsim.policies.scheduling import FifoScheduler, RouteGroupScheduler, RouteTracker, cache_aware_order


@register_system("no-cache")
class NoCache(System):
    """Every expert use is copied to the GPU and dropped after the layer: the offloading baseline.
    Hit rate 0 by construction. The GPU holds one staging buffer of top-k experts, reused by
    every layer (a pass whose union is larger streams through it)."""

    description = "copy every expert on every use (one staging buffer of top-k experts)"

    def __init__(self):
        super().__init__(LRU())

    def cache_config(self, model):
        return CacheConfig(global_slots=model.top_k)

    def on_layer_end(self, obs: LayerObservation, outcome: LayerOutcome) -> None:
        cache = obs.cache
        for expert in cache.resident_experts(obs.layer):
            cache.evict(cache.key(obs.layer, expert))


@register_system("all-on-gpu")
class AllOnGpu(System):
    """Every expert resident from the start, no copies: the compute-only bound. It ignores GPU
    capacity (a bound, not a feasible system when the model does not fit)."""

    description = "all experts resident, no copies (bound; ignores GPU capacity)"
    ignores_capacity = True

    def __init__(self):
        super().__init__(LRU())

    def cache_config(self, model):
        return CacheConfig(unlimited=True)

    def initial_residents(self, model) -> np.ndarray:
        return np.arange(model.num_moe_layers * model.num_experts)


def per_layer_default(model, hardware, max_context_tokens: int = 0) -> CacheConfig:
    """The free GPU memory split evenly over MoE layers; one pool when that leaves fewer than
    top-k slots per layer (every system must run where the dense part fits)."""
    free = free_expert_memory_bytes(model, hardware, max_context_tokens)
    per_layer = min(free // (model.expert_bytes() * model.num_moe_layers), model.num_experts)
    if per_layer >= model.top_k:
        return CacheConfig(per_layer=int(per_layer))
    return CacheConfig(budget_bytes=int(free))


class ComposedSystem(System):
    """A system from parts: an eviction policy, a prefetcher, a miss handler, a batch scheduler,
    an expert serve order (``"hits-first"`` or ``"cache-aware"``) and an optional cross-layer
    slot allocator. Oracle when any part is."""

    description = "eviction + prefetch + miss handling + token scheduling"

    def __init__(self, eviction=None, prefetcher: Prefetcher | None = None, miss: MissHandler | None = None,
                 scheduler: FifoScheduler | None = None, expert_order: str = "hits-first",
                 allocator: CrossLayerAllocator | None = None):
        super().__init__(eviction if eviction is not None else LRU())
        if expert_order not in ("hits-first", "cache-aware"):
            raise PolicyError(f"expert_order must be 'hits-first' or 'cache-aware', got {expert_order!r}")
        self.prefetcher = prefetcher or Prefetcher()
        self.miss = miss or MissHandler()
        self.scheduler = scheduler or FifoScheduler()
        self.expert_order = expert_order
        self.allocator = allocator
        self.tracker: RouteTracker | None = None
        self._cache = None

    @property
    def oracle(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.eviction, "oracle", False) or getattr(self.prefetcher, "oracle", False))

    @property
    def uses_gate_weights(self) -> bool:  # type: ignore[override]
        return bool(getattr(self.eviction, "uses_gate_weights", False) or getattr(self.miss, "uses_gate_weights", False))

    def trace_notes(self, trace) -> list[str]:
        notes = super().trace_notes(trace)
        note = getattr(self.prefetcher, "trace_note", lambda trace: None)(trace)
        if note:
            notes.append(f"{self.label}: {note}")
        return notes

    def default_cache_config(self, model, hardware, max_context_tokens=0):
        """Per-layer partitions of the free GPU memory: the layers are visited cyclically, so one
        recency-ordered pool smaller than every layer's working set evicts each expert before its
        reuse; partitions keep every layer's recent experts."""
        return per_layer_default(model, hardware, max_context_tokens)

    def parts(self) -> dict:
        return {"eviction": self.eviction, "prefetch": self.prefetcher, "miss": self.miss,
                "scheduler": self.scheduler, "expert_order": self.expert_order,
                "allocator": self.allocator}

    def prepare(self, ctx: RunContext) -> None:
        super().prepare(ctx)
        self._cache = ctx.cache
        self.prefetcher.prepare(ctx)
        self.miss.prepare(ctx)
        if self.allocator is not None:
            self.allocator.prepare(ctx)
        self.tracker = RouteTracker(ctx.cache.num_experts)

    def on_request_start(self, request: int) -> None:
        super().on_request_start(request)
        self.prefetcher.on_request_start(request)

    def select_batch(self, ready, max_batch, now_ns):
        routes = self.tracker.routes(ready) if self.tracker is not None else {}
        resident = self._cache.state != 0 if self._cache is not None else None
        return self.scheduler.select(ready, max_batch, routes, resident)

    def on_layer(self, obs: LayerObservation) -> LayerDecision:
        if hasattr(self.eviction, "on_layer"):
            self.eviction.on_layer(obs)
        if self.tracker is not None:
            self.tracker.observe(obs)
        actions = self.miss.decide(obs)
        prefetch = self.fit_prefetches(obs, self.prefetcher.prefetch(obs))
        self._protect_predicted(obs, prefetch)
        background = self.miss.background_copies(obs, actions)
        if background:
            low = max([p.priority for p in prefetch], default=0) + 1
            prefetch += [PrefetchRequest(obs.layer, int(e), priority=low) for e in background]
        order = cache_aware_order(obs) if self.expert_order == "cache-aware" else None
        return LayerDecision(order=order, miss_actions=actions, prefetch=prefetch)

    def _protect_predicted(self, obs: LayerObservation, prefetch: list[PrefetchRequest]) -> None:
        """Predicted experts already resident are skipped by the admissions, so the eviction
        policy hears of them here (ExpertFlow's predictive caching: predicted experts stay)."""
        hook = getattr(self.eviction, "on_predicted", None)
        if hook is None:
            return
        cache = obs.cache
        state, num_experts = cache.state, cache.num_experts
        for r in prefetch:
            key = int(r.layer) * num_experts + int(r.expert)  # cache.key
            if state[key]:  # cache.contains
                hook(key, cache.tick)

    @staticmethod
    def fit_prefetches(obs: LayerObservation, requests) -> list[PrefetchRequest]:
        """Drop the prefetches that could only evict earlier prefetches of the same decision:
        per target layer at most its partition's slots; in one pool at most the slots the
        current layer's experts leave. Nearer (lower priority value) requests are kept first."""
        if not requests:
            return []
        cache = obs.cache
        requests = sorted(requests, key=lambda r: r.priority)  # stable: the prefetcher's order within a priority
        slots = (cache.capacity // max(cache.expert_bytes, 1)).tolist()
        pool = cache.num_partitions == 1
        own, needed = cache.partition(obs.layer), len(obs.needed)
        out, used = [], {}
        for r in requests:
            p = 0 if pool else int(r.layer)  # cache.partition
            limit = slots[p] - (needed if pool or p == own else 0)
            n = used.get(p, 0)
            if n < limit:
                out.append(r)
                used[p] = n + 1
        return out

    def on_layer_end(self, obs: LayerObservation, outcome: LayerOutcome) -> None:
        self.prefetcher.on_layer_end(obs, outcome)
        if self.allocator is not None:
            self.allocator.on_layer_end(obs, outcome)

    def params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={v!r}" for k, v in self.parts().items() if v is not None)
        return f"{type(self).__name__}({parts})"


def _speculation(mode: str, distance: int = 1, recall: float | None = None) -> Prefetcher:
    """``trace``: the trace's recorded speculation (required); ``none``; ``modelled``: a guess
    of the given ``recall``; ``auto``: the recorded speculation when the trace has it, else the
    modelled guess when ``recall`` is given, else none (resolved in prepare)."""
    if mode == "trace":
        return SpeculativePrefetch(distance)
    if mode == "none":
        return Prefetcher()
    if mode == "modelled":
        return ModelledSpeculation(distance, recall=0.8 if recall is None else recall)
    if mode == "auto":
        return _AutoSpeculation(distance, recall)
    raise PolicyError(f"speculation must be 'auto', 'trace', 'modelled' or 'none', got {mode!r}")


class _AutoSpeculation(Prefetcher):
    """Speculative prefetch from the trace's recorded ``spec_d{distance}``; when the trace has
    none, a modelled guess of the given ``recall`` (:class:`ModelledSpeculation`), or none when
    ``recall`` is None."""

    def __init__(self, distance: int = 1, recall: float | None = None):
        self.distance = int(distance)
        self.recall = recall
        self.inner: Prefetcher = Prefetcher()

    def params(self) -> dict:
        return {"distance": self.distance, "using": self.inner.name}

    def trace_note(self, trace) -> str | None:
        if f"spec_d{self.distance}" in trace.extras:
            return None
        if self.recall is not None:
            return (f"the trace has no recorded speculative routing (spec_d{self.distance}): the speculative "
                    f"prefetch is modelled, each of the next layer's true experts guessed with probability "
                    f"{self.recall:g} (else a random wrong one); capture the real guess with `expertsim trace "
                    f"capture --spec-depth {self.distance}`")
        return (f"the trace has no recorded speculative routing (spec_d{self.distance}), so the speculative "
                f"prefetch is off and every miss is loaded on demand (capture one with `expertsim trace capture "
                f"--spec-depth {self.distance}`)")

    def prepare(self, ctx):
        has = ctx.trace is not None and f"spec_d{self.distance}" in ctx.trace.extras
        if has:
            self.inner = SpeculativePrefetch(self.distance)
        elif self.recall is not None:
            self.inner = ModelledSpeculation(self.distance, recall=self.recall)
        else:
            self.inner = Prefetcher()
        self.inner.prepare(ctx)

    def prefetch(self, obs):
        return self.inner.prefetch(obs)


@register_system("cache-moe")
class CacheMoE(ComposedSystem):
    """Fixed per-layer LRU expert cache with CPU fallback on a miss: the miss is computed on the
    host CPU at once (Fiddler's CPU path, arXiv 2402.07033) while the expert is copied in the
    background so later tokens hit (the per-layer LRU cache of Eliseev & Mazur, arXiv
    2312.17238). ``cpu="always"`` or ``"cheaper"`` (only when the cost model says the CPU wins)."""

    description = "per-layer LRU; misses computed on the CPU, copied in the background"
    # No released code (a composition): Fiddler's stack, runtimes/cache-moe.toml says why.
    runtime = "cache-moe"

    def __init__(self, cpu: str = "always"):
        if cpu not in ("always", "cheaper"):
            raise PolicyError(f"cache-moe cpu must be 'always' or 'cheaper', got {cpu!r}")
        self.cpu = cpu
        super().__init__(LRU(), miss=CpuWhenCheaper(always=cpu == "always", cache_after_cpu=True))

    def params(self) -> dict:
        return {"cpu": self.cpu}


@register_system("mixtral-offloading")
class MixtralOffloading(ComposedSystem):
    """mixtral-offloading (Eliseev & Mazur, "Fast Inference of Mixture-of-Experts Language Models
    with Offloading", arXiv 2312.17238): a per-layer LRU expert cache plus speculative loading of
    the next layer's experts, chosen by applying the next layer's gate to the current hidden
    state (the trace's ``spec_d1``; ``speculation="auto"`` runs without it when not recorded)."""

    description = "per-layer LRU + next-layer gate speculation (trace spec_d1, else modelled)"
    runtime = "mixtral-offloading"

    def __init__(self, speculation: str = "auto", recall: float = 0.8):
        # recall: the share of the next layer's experts the speculative guess contains when the
        # trace did not record it. Eliseev & Mazur (arXiv 2312.17238, Sec. 3.2 and Fig. 2 right):
        # guessing 1 layer ahead with the next gate on the current hidden state recovers about
        # 80-90% of the experts actually used when 2 are prefetched; 0.8 takes the low end.
        if not 0 <= float(recall) <= 1:
            raise PolicyError(f"mixtral-offloading recall must be in [0, 1], got {recall!r}")
        self.speculation = speculation
        self.recall = float(recall)
        super().__init__(LRU(), prefetcher=_speculation(speculation, 1, self.recall))

    def params(self) -> dict:
        return {"speculation": self.speculation, "recall": self.recall}


@register_system("se-moe")
class SEMoE(ComposedSystem):
    """SE-MoE (Shen et al., "SE-MoE: A Scalable and Efficient Mixture-of-Experts Distributed
    Training and Inference System", arXiv 2205.10034): a ring of ``depth + 1`` layer buffers;
    while layer l computes, every expert of layers l+1 .. l+depth loads; FIFO frees the oldest
    layer's buffer. Default cache: the ring (capped by free GPU memory)."""

    description = "ring of layer buffers: whole next layer(s) prefetched, FIFO"
    runtime = "se-moe"

    def __init__(self, depth: int = 1):
        self.depth = int(depth)
        super().__init__(FIFO(), prefetcher=LayerRingPrefetch(depth))

    def params(self) -> dict:
        return {"depth": self.depth}

    def default_cache_config(self, model, hardware, max_context_tokens=0):
        free = free_expert_memory_bytes(model, hardware, max_context_tokens)
        slots = min((self.depth + 1) * model.num_experts, free // model.expert_bytes())
        return CacheConfig(global_slots=int(max(slots, model.top_k)))


@register_system("pregated-moe")
class PregatedMoE(ComposedSystem):
    """Pre-gated MoE (Hwang et al., ISCA 2024, arXiv 2308.12066): a pre-gate at layer l selects
    layer l+1's experts, which load while layer l computes. Modelled as exact next-layer prefetch
    with ``accuracy`` (an oracle: it reads the trace's next-layer routing), LRU eviction.
    ``minimal=True`` gives the paper's memory footprint: two layers' active experts."""

    description = "pre-gate prefetch of layer l+1 at layer l (accuracy parameter; oracle)"
    runtime = "pregated-moe"  # FasterTransformer, copy stream, pinned (ranggihwang/Pregated_MoE)

    def __init__(self, accuracy: float = 1.0, distance: int = 1, minimal: bool = False, seed: int = 0):
        self.accuracy, self.distance, self.minimal, self.seed = float(accuracy), int(distance), bool(minimal), int(seed)
        super().__init__(LRU(), prefetcher=PregatedPrefetch(distance, accuracy, seed))

    def params(self) -> dict:
        return {"accuracy": self.accuracy, "distance": self.distance, "minimal": self.minimal}

    def default_cache_config(self, model, hardware, max_context_tokens=0):
        if self.minimal:
            return CacheConfig(global_slots=(self.distance + 1) * model.top_k)
        return per_layer_default(model, hardware, max_context_tokens)


@register_system("expertflow")
class ExpertFlow(ComposedSystem):
    """ExpertFlow (He et al., arXiv 2410.17954; adaptive version arXiv 2510.26730): predictive
    caching with a learned routing predictor (``prefetch="adaptive"``: next-layer predictions at
    a distance adapted to bandwidth, expert bytes, compute time and observed stalls;
    ``"path"``: the whole routing path predicted before the first MoE layer), token scheduling
    that regroups requests by predicted route, cache-aware expert order, LRU (prefetched experts
    are the most recent, so predicted ones stay) and, with per-layer partitions, cross-layer slot
    allocation toward the layers that miss most. The predictor trains on the first
    ``train_fraction`` of the run's requests."""

    description = "learned route prediction + adaptive prefetch distance + route-grouped batches"
    runtime = "expertflow"  # code not found: HF eager assumed (runtimes/expertflow.toml)

    def __init__(self, prefetch: str = "adaptive", max_distance: int = 3, train_fraction: float = 0.5,
                 reallocate_every: int = 16):
        if prefetch not in ("adaptive", "path"):
            raise PolicyError(f"expertflow prefetch must be 'adaptive' or 'path', got {prefetch!r}")
        self.prefetch_mode, self.max_distance = prefetch, int(max_distance)
        self.train_fraction, self.reallocate_every = float(train_fraction), int(reallocate_every)
        if prefetch == "adaptive":
            pf: Prefetcher = AdaptiveDistance(LearnedPrefetch(1, train_fraction=train_fraction,
                                                              max_distance=max_distance),
                                              max_distance=max_distance)
        else:
            pf = PathPrefetch(train_fraction=train_fraction)
        super().__init__(LRU(), prefetcher=pf, scheduler=RouteGroupScheduler(), expert_order="cache-aware",
                         allocator=CrossLayerAllocator(reallocate_every))

    def params(self) -> dict:
        return {"prefetch": self.prefetch_mode, "max_distance": self.max_distance,
                "train_fraction": self.train_fraction, "reallocate_every": self.reallocate_every}


@register_system("moe-infinity")
class MoEInfinity(ComposedSystem):
    """MoE-Infinity (Xue et al., arXiv 2401.14361): request-level expert activation matrices;
    prefetch by matching the current request's matrix against past ones (``depth`` layers
    ahead), cache priority from activation ratio, frequency and layer proximity."""

    description = "activation-matrix matching prefetch + activation-aware cache priority"
    runtime = "moe-infinity"  # HF eager + C++ expert dispatcher (EfficientMoE/MoE-Infinity)

    def __init__(self, depth: int = 2, history: int = 128):
        from expertsim.policies.eviction import ActivationPriority

        self.depth, self.history = int(depth), int(history)
        super().__init__(ActivationPriority(), prefetcher=ActivationMatrixPrefetch(depth, history=history))

    def params(self) -> dict:
        return {"depth": self.depth, "history": self.history}


@register_system("fiddler")
class Fiddler(ComposedSystem):
    """Fiddler (Kamahori et al., "Fiddler: CPU-GPU Orchestration for Fast Inference of
    Mixture-of-Experts Models", arXiv 2402.07033): the GPU holds a static hot set from a profile
    (filled before the run); a missing expert is computed on the CPU when the cost model says
    that beats copy + GPU compute, else copied (the coldest resident makes room)."""

    description = "static hot set from a profile; misses on the CPU when cheaper"

    runtime = "fiddler"

    def __init__(self, profile: str | None = None, profile_fraction: float = 0.25):
        self.profile, self.profile_fraction = profile, float(profile_fraction)
        super().__init__(StaticHotSet(profile, profile_fraction), miss=CpuWhenCheaper())

    def params(self) -> dict:
        return {"profile": self.profile, "profile_fraction": self.profile_fraction}

    def default_cache_config(self, model, hardware, max_context_tokens=0):
        """One pool of the free GPU memory: the hot set may favour some layers."""
        return System.default_cache_config(self, model, hardware, max_context_tokens)

    def initial_residents(self, model) -> np.ndarray:
        cache = self._cache
        if cache is None:
            return np.zeros(0, dtype=np.int64)
        if cache.num_partitions == 1:
            return self.eviction.hot_keys(int(cache.capacity[0] // cache.expert_bytes))
        keys = []
        counts = self.eviction.counts.reshape(cache.num_layers, cache.num_experts)
        for layer in range(cache.num_layers):
            n = int(cache.capacity[layer] // cache.expert_bytes)
            keys += (layer * cache.num_experts + hottest(counts[layer], n)).tolist()
        return np.asarray(keys, dtype=np.int64)


@register_system("hobbit")
class Hobbit(ComposedSystem):
    """HOBBIT (Tang et al., arXiv 2411.01433): a missing expert is loaded in full precision, in
    low precision (int4) or skipped by the cumulative gate weight of the experts its token ranks
    above it (``full_threshold``, ``low_threshold``); next-layer gate speculation when the trace
    recorded it (``speculation``); LRU eviction."""

    description = "mixed precision on miss by gate weight (full / int4 / skip) + speculation"
    runtime = "hobbit"  # built on llama.cpp (arXiv 2411.01433)

    def __init__(self, full_threshold: float = 0.6, low_threshold: float = 0.9, speculation: str = "auto"):
        self.full_threshold, self.low_threshold, self.speculation = float(full_threshold), float(low_threshold), speculation
        super().__init__(LRU(), prefetcher=_speculation(speculation, 1),
                         miss=GateThresholdPrecision(full_threshold, low_threshold))

    def params(self) -> dict:
        return {"full_threshold": self.full_threshold, "low_threshold": self.low_threshold,
                "speculation": self.speculation}


@register_system("promoe")
class ProMoE(ComposedSystem):
    """ProMoE (Song et al., "ProMoE: Fast MoE-based LLM Serving using Proactive Caching", arXiv
    2410.22134): learned predictors prefetch the experts ``distance`` layers ahead (trained on
    the first ``train_fraction`` of the run's requests), LRU cache, cache-aware serve order."""

    description = "learned predictor prefetch d layers ahead + LRU"
    runtime = "promoe"  # code not found (runtimes/promoe.toml)

    def __init__(self, distance: int = 2, train_fraction: float = 0.5):
        self.distance, self.train_fraction = int(distance), float(train_fraction)
        super().__init__(LRU(), prefetcher=LearnedPrefetch(distance, train_fraction=train_fraction),
                         expert_order="cache-aware")

    def params(self) -> dict:
        return {"distance": self.distance, "train_fraction": self.train_fraction}


@register_system("skip-misses")
class SkipOnMiss(ComposedSystem):
    """Skip missing experts and renormalise the remaining gates (AdapMoE's adaptive gating, Zhong
    et al., arXiv 2408.10284): a miss whose gate weight is at most ``max_weight`` for every
    token, and that is no token's first choice (``keep_top1``), is skipped; the dropped gate mass
    is reported. LRU eviction."""

    description = "skip low-weight misses (dropped gate mass reported) + LRU"
    runtime = "adapmoe"  # AdapMoE's released code: mixtral-offloading's stack + a copy stream

    def __init__(self, max_weight: float = 0.3, keep_top1: bool = True):
        self.max_weight, self.keep_top1 = float(max_weight), bool(keep_top1)
        super().__init__(LRU(), miss=SkipMisses(max_weight, keep_top1))

    def params(self) -> dict:
        return {"max_weight": self.max_weight, "keep_top1": self.keep_top1}


class _DaopPlacement(CpuWhenCheaper):
    """DAOP's miss handling: a missing expert runs on the CPU (no copy on the critical path); at
    a sequence's prefill, the layer's most-activated experts of the prompt that are not on the GPU
    are copied in the background (after the layer's own work), evicting the ones the sequence
    uses least (:class:`SequenceActivation`): the per-sequence placement."""

    name = "daop-placement"

    def __init__(self):
        super().__init__(always=True, cache_after_cpu=False)

    def params(self) -> dict:
        return {}

    def background_copies(self, obs, actions):
        if obs.phase != 0:
            return []
        counts = np.bincount(obs.experts.ravel().astype(np.int64), minlength=obs.cache.num_experts)
        partition = obs.cache.partition(obs.layer)
        slots = int(obs.cache.capacity[partition] // max(obs.cache.expert_bytes, 1))
        top = [int(e) for e in np.argsort(-counts, kind="stable")[:slots] if counts[e] > 0]
        return [e for e in top if not obs.cache.contains(obs.layer, e)]


@register_system("daop")
class DAOP(ComposedSystem):
    """DAOP (Zhang et al., "DAOP: Data-Aware Offloading and Predictive Pre-Calculation for
    Efficient MoE Inference", arXiv 2501.10375): per-sequence expert placement between CPU and
    GPU. Each sequence's prefill places its most-activated experts on the GPU (background copies,
    :class:`_DaopPlacement`), evicting those it routes the fewest tokens to
    (:class:`SequenceActivation`); every expert not on the GPU runs on the CPU. DAOP's predictive
    pre-calculation (the next layer's CPU experts started early from the current hidden state) is
    not modelled: CPU experts start at their own layer, so this is a conservative DAOP, and the
    run's assumptions say so."""

    description = "per-sequence placement at prefill; experts not on the GPU run on the CPU"
    runtime = "daop"  # HF loop derived from Fiddler's; swaps write the evicted expert back

    def __init__(self):
        from expertsim.policies.eviction import SequenceActivation

        super().__init__(SequenceActivation(), miss=_DaopPlacement())

    def trace_notes(self, trace) -> list[str]:
        return super().trace_notes(trace) + [
            "daop: the predictive pre-calculation of the next layer's CPU experts is not modelled (CPU "
            "experts start at their own layer): a conservative DAOP"]
