"""The policy contract every engine drives (DESIGN.md, "Engines and policies").

An engine walks the workload iteration by iteration (a forward pass over one or more requests'
tokens) and, inside it, layer by layer. At each MoE layer it builds a :class:`LayerObservation`
(time, the tokens and the experts they need with gate weights, the cache) and asks the
:class:`System` for a :class:`LayerDecision`: the order to serve the needed experts in, what to do
for each missing one (:class:`MissAction`), and which copies to start ahead
(:class:`PrefetchRequest`). Which resident expert leaves when room is needed is the
:class:`EvictionPolicy`'s choice, called by the shared :class:`~expertsim.policies.cache.ExpertCache`.

A policy sees only the past and the present (the current layer's routing, and for speculative
prefetchers what the trace recorded as speculation at this point) unless it sets
``oracle = True``; oracle results are labelled as bounds.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from expertsim.policies.cache import ExpertCache
    from expertsim.specs import HardwareSpec, ModelSpec
    from expertsim.traces import RoutingTrace


class MissAction(enum.Enum):
    COPY = "copy"  # stall on a host-to-device copy of the full-precision expert
    CPU = "cpu"  # compute the expert on the host CPU (Fiddler); activations cross the link
    LOW_PRECISION = "low_precision"  # copy a low-bit version instead (HOBBIT)
    SKIP = "skip"  # drop the expert; its gate mass is reported as dropped
    # Copy the expert's weights for this pass only (a staging buffer outside the cache), compute it
    # on the GPU, drop it: llama.cpp's op offload of large batches, KTransformers' layerwise prefill.
    STREAM = "stream"


@dataclass(frozen=True)
class PrefetchRequest:
    layer: int
    expert: int
    priority: int = 1  # lower runs first on the link; demand copies use 0
    low_precision: bool = False


@dataclass
class LayerObservation:
    """What a policy may see at one MoE layer of one iteration."""

    now_ns: int
    iteration: int
    layer: int  # MoE layer index (0 .. num_moe_layers-1)
    tokens: np.ndarray  # trace token indices in this iteration
    experts: np.ndarray  # [n_tokens, k] chosen experts at this layer
    weights: np.ndarray | None  # [n_tokens, k] gate weights, when the trace has them
    needed: np.ndarray  # sorted unique experts this layer needs
    tokens_per_expert: np.ndarray  # how many of the tokens route to each of `needed`
    gate_mass: np.ndarray  # summed gate weight per needed expert (1/k per use without weights)
    resident: np.ndarray  # bool per needed expert: resident or loading at the layer's start
    phase: int  # 0 prefill, 1 decode (of the iteration's first token)
    cache: "ExpertCache"
    trace: "RoutingTrace"
    position: int  # logical access position (for oracles), see AccessPlan

    # An engine may build an observation from Python lists (:meth:`from_lists`): a plain policy
    # never reads the four numpy arrays, and at a handful of experts per layer building them
    # costs more than the rest of the observation. They are made on first read, from lists taken
    # when the observation was built (so ``resident`` is the state at the layer's start, as ever).
    _LAZY = {"needed": np.int64, "tokens_per_expert": np.intp, "gate_mass": np.float64, "resident": bool}

    @classmethod
    def from_lists(cls, now_ns, iteration, layer, tokens, experts, weights, needed: list, tokens_per_expert: list,
                   gate_mass: list, resident: list, phase, cache, trace, position) -> "LayerObservation":
        """The observation with ``needed``, ``tokens_per_expert``, ``gate_mass`` and ``resident``
        given as lists; each becomes its numpy array (the dtypes of :meth:`LayerServer.observe`'s
        numpy path) when first read."""
        obs = cls.__new__(cls)
        obs.__dict__ = {"now_ns": now_ns, "iteration": iteration, "layer": layer, "tokens": tokens,
                        "experts": experts, "weights": weights, "phase": phase, "cache": cache, "trace": trace,
                        "position": position, "_lists": {"needed": needed, "tokens_per_expert": tokens_per_expert,
                                                         "gate_mass": gate_mass, "resident": resident}}
        return obs

    def __getattr__(self, name):  # only called for an attribute not set: a lazy array not read yet
        lists = self.__dict__.get("_lists")
        if lists is None or name not in lists:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = np.array(lists[name], dtype=self._LAZY[name])
        return value

    def needed_lists(self) -> tuple[list, list, list]:
        """``needed``, ``tokens_per_expert`` and ``gate_mass`` as lists of Python numbers."""
        lists = self.__dict__.get("_lists")
        if lists is not None:
            return lists["needed"], lists["tokens_per_expert"], lists["gate_mass"]
        return self.needed.tolist(), self.tokens_per_expert.tolist(), self.gate_mass.tolist()


@dataclass
class LayerDecision:
    order: Sequence[int] | None = None  # serve order of `needed`; None = hits first, then misses, ascending
    miss_actions: dict[int, MissAction] = field(default_factory=dict)  # default COPY
    prefetch: list[PrefetchRequest] = field(default_factory=list)


@dataclass
class LayerOutcome:
    """What happened at a layer, told back to the policy for feedback (adaptive policies)."""

    layer: int
    hits: int
    misses: int
    stall_ns: int
    start_ns: int
    end_ns: int


@dataclass
class RunContext:
    """Everything a policy may read before the run: specs, cost model, cache, workload."""

    model: "ModelSpec"
    hardware: "HardwareSpec"
    cost: Any  # expertsim.sim.cost.CostModel (policies must not import sim)
    cache: "ExpertCache"
    trace: "RoutingTrace"
    plan: "AccessPlan | None" = None


@dataclass
class AccessPlan:
    """The order in which an engine looks experts up, known before the run when iterations do
    not depend on timing. ``keys[p]`` is the p-th lookup (layer * num_experts + expert).
    Oracles (Belady) use it; online policies must not."""

    keys: np.ndarray
    num_experts: int

    def next_use(self) -> np.ndarray:
        """next_use[p] = the next position > p that looks up keys[p] again (len(keys) if none)."""
        return next_use_positions(self.keys)


def next_use_positions(keys: np.ndarray) -> np.ndarray:
    """next_use[p] = the next position > p with the same key as ``keys[p]`` (len(keys) if none):
    the oracles' input (Belady, the bounds, the stream replay's libCacheSim file). One stable sort
    by key; consecutive positions of a key link up."""
    keys = np.asarray(keys)
    n = len(keys)
    nxt = np.full(n, n, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def param_label(name: str, params: dict) -> str:
    """``name(k=v, ...)``, or ``name`` without parameters: how systems and their parts are shown
    in tables and results."""
    return name + (f"({', '.join(f'{k}={v}' for k, v in params.items())})" if params else "")


class Parameterised:
    """A policy part with parameters: ``params()`` (shown in labels and results) and a repr
    built from them."""

    def params(self) -> dict:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


class EvictionPolicy(Parameterised):
    """Chooses which unpinned cache entry leaves. One small interface, as in libCacheSim.

    Subclasses keep their own state and override ``victim`` and the hooks they need. ``tick`` is
    the cache's logical clock (one per lookup or admission), ``position`` the lookup's index in
    the engine's AccessPlan.
    """

    name = "base"
    oracle = False
    uses_gate_weights = False  # decisions read the trace's gate weights (1/k each without them)

    def prepare(self, ctx: RunContext) -> None:
        """Called once before the run (size arrays, read a profile, read the plan if oracle)."""

    def reset(self) -> None:
        """Called when the cache empties (request scope)."""

    def on_request_start(self, request: int) -> None:
        """Called (through the system) when a request's first pass starts."""

    def on_access(self, key: int, tick: int, hit: bool, position: int) -> None:
        pass

    def on_insert(self, key: int, tick: int, position: int) -> None:
        pass

    def on_evict(self, key: int) -> None:
        pass

    def on_predicted(self, key: int, tick: int) -> None:
        """A prefetcher predicts ``key`` will be used soon and it is already resident (so no
        admission tells the policy). Recency policies refresh it, so the coming prefetches do
        not evict it; default: ignored."""

    def on_layer(self, obs: LayerObservation) -> None:
        """Called by the system at each MoE layer after the layer's lookups and before its
        admissions: score-aware policies (fMoE, HybriMoE, MoE-Infinity) read the routing here."""

    def victim(self, candidates: np.ndarray, tick: int, position: int) -> int:
        raise NotImplementedError  # abstract: every eviction policy defines its choice


class System:
    """A complete offloading system: an eviction policy plus decisions at each MoE layer.

    The base class serves needed experts hits-first, copies every miss, prefetches nothing and
    schedules tokens first-come first-served. Named systems override ``on_layer`` (and
    ``prepare``/``on_layer_end`` for state). ``cache_config`` may be fixed by the system
    (no-cache, all-on-gpu) or left to the user (None).
    """

    name = "system"
    description = ""
    citation = ""
    oracle = False
    # The software stack it runs on by default (a runtime preset, expertsim/specs/presets/runtimes):
    # a named system runs on the stack it was released with; a run's ``runtime`` overrides it.
    runtime = "default"

    @property
    def uses_gate_weights(self) -> bool:
        """Whether its decisions read the trace's gate weights (1/k per choice without them)."""
        return bool(getattr(self.eviction, "uses_gate_weights", False))

    def trace_notes(self, trace) -> list[str]:
        """What this system would use that ``trace`` does not carry (said in the run's
        assumptions, so that a system that quietly falls back is not mistaken for its full form)."""
        if trace.weights is None and self.uses_gate_weights:
            return [f"the trace has no gate weights: {self.label} weighs each routed expert 1/{trace.top_k}, "
                    f"so its weight thresholds and scores see equal weights (use a trace with weight_* columns)"]
        return []

    def __init__(self, eviction: EvictionPolicy | None = None):
        self.eviction = eviction

    # Fixed cache sizing, if the system dictates one (CacheConfig), else None.
    def cache_config(self, model: "ModelSpec"):
        return None

    def default_cache_config(self, model: "ModelSpec", hardware: "HardwareSpec",
                             max_context_tokens: int = 0):
        """The cache size to use when the user gives none: by default one global pool of the GPU
        memory left after dense weights, the KV cache at ``max_context_tokens`` and the workspace
        (see :func:`free_expert_memory_bytes`). Systems with per-layer caches override it."""
        from expertsim.policies.cache import CacheConfig

        return CacheConfig(budget_bytes=free_expert_memory_bytes(model, hardware, max_context_tokens))

    # Copies of low-precision experts (MissAction.LOW_PRECISION) are stored in this dtype.
    low_precision_dtype = "int4"

    def initial_residents(self, model: "ModelSpec") -> np.ndarray:
        """Keys (layer * num_experts + expert) resident before the run starts, with no copy
        (a warm or static cache). Default: none, the cache starts cold."""
        return np.zeros(0, dtype=np.int64)

    def prepare(self, ctx: RunContext) -> None:
        if self.eviction is not None:
            self.eviction.prepare(ctx)

    def on_request_start(self, request: int) -> None:
        if self.eviction is not None and hasattr(self.eviction, "on_request_start"):
            self.eviction.on_request_start(request)

    def select_batch(self, ready: Sequence[int], max_batch: int, now_ns: int) -> list[int]:
        """Token scheduling: which ready requests run in the next iteration (at most
        ``max_batch``). Default first-come first-served. ExpertFlow-style schedulers regroup by
        predicted route. Engines without batching never call it."""
        return list(ready)[:max_batch]

    def on_layer(self, obs: LayerObservation) -> LayerDecision:
        if self.eviction is not None and hasattr(self.eviction, "on_layer"):
            self.eviction.on_layer(obs)
        return LayerDecision()

    def on_layer_end(self, obs: LayerObservation, outcome: LayerOutcome) -> None:
        pass

    def params(self) -> dict:
        return {}

    @property
    def label(self) -> str:
        """Name with parameters, for tables."""
        return param_label(self.name, self.params())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eviction={self.eviction!r}, {self.params()})"


def free_expert_memory_bytes(model: "ModelSpec", hardware: "HardwareSpec", max_context_tokens: int = 0) -> int:
    """GPU bytes left for the expert cache after dense weights, the KV cache of
    ``max_context_tokens`` tokens and the workspace (the engines' memory check, same terms).
    Raises ConfigError when fewer than top-k experts fit."""
    from expertsim.errors import ConfigError

    gpu = hardware.gpu
    base = model.dense_bytes + int(round(model.kv_bytes_per_token_stored * int(max_context_tokens))) + int(gpu.workspace_gb * 1e9)
    free = gpu.memory_bytes - base
    need = model.top_k * model.expert_bytes()
    if free < need:
        raise ConfigError(
            f"{hardware.name} ({gpu.memory_gb} GB) has {free / 1e9:.2f} GB left after dense weights "
            f"({model.dense_bytes / 1e9:.2f} GB), KV cache of {max_context_tokens} tokens and workspace "
            f"({gpu.workspace_gb} GB); the expert cache needs at least top-k={model.top_k} experts "
            f"({need / 1e9:.2f} GB). Use a larger GPU or a shorter context"
        )
    return int(free)
