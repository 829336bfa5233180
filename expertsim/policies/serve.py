"""The logical step every engine takes at one MoE layer: look up, decide, admit, evict.

``LayerServer.serve`` turns (iteration tokens, layer) into a :class:`LayerPlan`: which needed
experts hit, what happens to each miss, which entries were evicted to make room, which prefetch
copies were admitted, and the ordering constraints between copies and computes. Engines attach
time to the plan (the SimPy DES, the fast engine, the real runner), so all of them see the same
hits, misses and evictions for the same inputs.

Semantics ("together"): the needed experts of a layer (the union over the iteration's tokens)
are looked up in ascending id order; hits are pinned; misses are admitted in serve order, each
evicting unpinned entries chosen by the eviction policy. When every entry is pinned (the union is
larger than the cache), the earliest-served experts are released in serve order and the copy
that reuses their room waits for their compute (``wait_compute``). After the layer every pin is
released, so at batch 1 with K >= top_k slots, eviction happens among experts the token did not
use until at most K remain.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from expertsim.errors import ConfigError
from expertsim.policies.base import (
    LayerDecision,
    LayerObservation,
    LayerOutcome,
    MissAction,
    System,
)
from expertsim.policies.cache import ExpertCache

# The miss actions as module constants: reading an Enum member off its class costs a descriptor
# call (some 0.25 us), and serve reads them per miss.
COPY, CPU, LOW_PRECISION, SKIP, STREAM = (MissAction.COPY, MissAction.CPU, MissAction.LOW_PRECISION, MissAction.SKIP,
                                          MissAction.STREAM)


@dataclass(slots=True)
class ServeItem:
    expert: int
    tokens: int  # tokens of the iteration routed to this expert
    gate_mass: float
    hit: bool
    action: MissAction | None  # None for a hit
    low_precision: bool  # computed from a low-precision copy
    copy_bytes: int  # bytes copied over the link for this item (0 for hits, CPU, skip)
    slot: int  # cache slot of the expert (-1 when not in the cache)
    wait_compute: int = -1  # index (in serve order) whose compute must end before the copy starts
    loading_at_lookup: bool = False  # a hit on an entry whose copy was still in flight
    released: bool = False  # unpinned mid-layer to make room for a later miss


@dataclass(slots=True)
class PrefetchItem:
    layer: int
    expert: int
    copy_bytes: int
    slot: int
    priority: int
    low_precision: bool


@dataclass(slots=True)
class LayerPlan:
    layer: int
    items: list[ServeItem]
    prefetches: list[PrefetchItem]
    evicted: list[int]  # keys evicted while serving this layer (demand and prefetch)
    hits: int
    misses: int
    position: int  # AccessPlan position of the layer's first lookup
    dropped_gate_mass: float = 0.0
    degraded_gate_mass: float = 0.0
    cpu_experts: int = 0
    streamed_experts: int = 0  # MissAction.STREAM: copied for this pass only (the engine times them)
    prefetch_issued: int = 0
    needed: list | None = None  # the layer's needed experts (the items' experts) in id order


@dataclass
class LayerServer:
    """Applies a System's decisions to the shared ExpertCache (see the module docstring)."""

    system: System
    cache: ExpertCache
    expert_bytes: int
    low_precision_bytes: int
    position: int = 0  # running AccessPlan position
    totals: dict = field(default_factory=lambda: {"prefetch_issued": 0, "prefetch_used": 0})

    def observe(self, *, now_ns: int, iteration: int, layer: int, tokens: np.ndarray,
                experts: np.ndarray, weights: np.ndarray | None, phase: int, trace) -> LayerObservation:
        if experts.size <= 64:  # a decode token or a small batch: numpy's per-call overhead dominates
            flat = experts.ravel().tolist()
            ids = sorted(set(flat))
            where = None
            if len(ids) == len(flat):  # one token (its top-k experts are distinct)
                count = [1] * len(ids)
            else:
                where = {e: i for i, e in enumerate(ids)}
                count = [0] * len(ids)
                for e in flat:
                    count[where[e]] += 1
            if weights is not None:  # np.bincount's sums: 0.0 plus each weight in input order
                where = where or {e: i for i, e in enumerate(ids)}
                sums = [0.0] * len(ids)
                for e, w in zip(flat, weights.ravel().astype(np.float64).tolist()):
                    sums[where[e]] += w
            elif where is None:  # one token: each count is 1, and its mass 1 / k
                sums = [1 / experts.shape[1]] * len(ids)
            else:  # counts / k, as numpy divides them (IEEE division of the same doubles)
                k = experts.shape[1]
                sums = [c / k for c in count]
            state, base = self.cache.state_bytes, layer * self.cache.num_experts
            resident = [state[base + e] != 0 for e in ids]
            # The numpy arrays (needed, tokens_per_expert, gate_mass, resident) are built only if
            # the system reads them (LayerObservation.from_lists).
            return LayerObservation.from_lists(now_ns, iteration, layer, tokens, experts, weights, ids, count, sums,
                                               resident, phase, self.cache, trace, self.position)
        needed, inverse = np.unique(experts, return_inverse=True)
        inverse = inverse.ravel()
        needed = needed.astype(np.int64)
        counts = np.bincount(inverse, minlength=len(needed))
        if weights is not None:
            mass = np.bincount(inverse, weights=weights.ravel().astype(np.float64), minlength=len(needed))
        else:
            mass = counts / experts.shape[1]
        resident = np.array([self.cache.contains(layer, e) for e in needed], dtype=bool)
        # LayerObservation(now_ns, iteration, layer, tokens, experts, weights, needed,
        # tokens_per_expert, gate_mass, resident, phase, cache, trace, position)
        return LayerObservation(now_ns, iteration, layer, tokens, experts, weights, needed, counts, mass,
                                resident, phase, self.cache, trace, self.position)

    def serve(self, obs: LayerObservation) -> tuple[LayerPlan, LayerDecision]:
        cache, layer = self.cache, obs.layer
        position0 = self.position
        # 1. Lookups in ascending id order (the eviction policy sees every access). Python
        # lists and ints here: a layer needs a handful of experts, where numpy's per-call cost
        # dominates.
        needed, tokens_per_expert, gate_mass = obs.needed_lists()
        hit, loading, ticks = cache.lookup_layer(layer, needed, position0)  # pins the hits
        self.position += len(needed)
        # 2. The system decides (it sees which experts hit through obs.resident).
        decision = self.system.on_layer(obs)
        hits = sum(hit)
        if decision.order is None:
            if hits == len(hit) or hits == 0:  # all hits or all misses: ascending ids
                order = range(len(hit))
            else:
                order = [i for i, h in enumerate(hit) if h] + [i for i, h in enumerate(hit) if not h]
        else:
            index = {e: i for i, e in enumerate(needed)}
            order = [index[int(e)] for e in decision.order]
            if sorted(order) != list(range(len(hit))):
                raise ConfigError(
                    f"system {self.system.name!r} returned a serve order {list(decision.order)} that is "
                    f"not a permutation of the needed experts {obs.needed.tolist()}"
                )
        # 3. Misses: admit (evicting), or compute elsewhere, or skip.
        items: list[ServeItem] = []
        evicted: list[int] = []
        released = 0  # how many earliest-served items have been unpinned for room
        plan = LayerPlan(layer, items, [], evicted, hits, len(hit) - hits, position0)
        plan.needed = needed
        base = layer * cache.num_experts
        miss_actions = decision.miss_actions
        entry_low_precision, slot_of = cache.low_by_key, cache.slot_by_key
        for i in order:
            e = needed[i]
            key = base + e
            # ServeItem(expert, tokens, gate_mass, hit, action, low_precision, copy_bytes, slot,
            # wait_compute, loading_at_lookup), positional: this runs per expert per layer. The
            # lists hold Python numbers already; an absent entry's slot is -1.
            if hit[i]:
                item = ServeItem(e, tokens_per_expert[i], gate_mass[i], True, None, entry_low_precision[key],
                                 0, slot_of[key], -1, loading[i])
                if loading[i]:
                    self.totals["prefetch_used"] += 1
            else:
                item = ServeItem(e, tokens_per_expert[i], gate_mass[i], False, None, False, 0, -1, -1, loading[i])
                action = miss_actions.get(e, COPY) if miss_actions else COPY
                item.action = action
                if action is COPY or action is LOW_PRECISION:
                    low = action is LOW_PRECISION
                    nbytes = self.low_precision_bytes if low else self.expert_bytes
                    while True:
                        ok, out = cache.admit(layer, e, nbytes, low_precision=low,
                                              position=position0 + i, required=False,
                                              tick=ticks[i])
                        if ok:
                            break
                        # Everything left is pinned by this layer: release the earliest-served.
                        while released < len(items) and (items[released].slot < 0 or items[released].released):
                            released += 1
                        if released >= len(items):
                            raise ConfigError(
                                f"layer {layer}: cannot make room for expert {e}: the cache partition "
                                f"is smaller than one expert ({nbytes} bytes); give it more room"
                            )
                        cache.unpin(layer, items[released].expert)
                        items[released].released = True
                        released += 1
                    # A copy into room freed by an expert of this layer waits for its compute.
                    if released and out:
                        for j, other in enumerate(items):
                            if other.released and base + other.expert in out:
                                item.wait_compute = max(item.wait_compute, j)
                    evicted.extend(out)
                    cache.pin_key(key)
                    item.copy_bytes = nbytes
                    item.slot = slot_of[key]
                    item.low_precision = low
                elif action is CPU:
                    plan.cpu_experts += 1
                elif action is SKIP:
                    plan.dropped_gate_mass += item.gate_mass
                elif action is STREAM:
                    plan.streamed_experts += 1
                else:  # pragma: no cover - enum is closed
                    raise ConfigError(f"unknown miss action {action!r}")
            if item.low_precision:
                plan.degraded_gate_mass += item.gate_mass
            items.append(item)
        # 4. Prefetches (optional admissions: dropped when no unpinned room).
        num_layers, num_experts, state_bytes = cache.num_layers, cache.num_experts, cache.state_bytes  # slot_of: above
        for req in decision.prefetch:
            if not 0 <= req.layer < num_layers or not 0 <= req.expert < num_experts:
                raise ConfigError(
                    f"system {self.system.name!r} asked to prefetch (layer {req.layer}, expert "
                    f"{req.expert}), outside {num_layers} layers x {num_experts} experts"
                )
            key = int(req.layer) * num_experts + int(req.expert)
            if state_bytes[key]:  # resident or loading (cache.contains)
                continue
            nbytes = self.low_precision_bytes if req.low_precision else self.expert_bytes
            ok, out = cache.admit(req.layer, req.expert, nbytes, low_precision=req.low_precision,
                                  position=self.position, required=False, prefetch=True)
            if not ok:
                continue
            evicted.extend(out)
            # PrefetchItem(layer, expert, copy_bytes, slot, priority, low_precision), positional
            plan.prefetches.append(PrefetchItem(req.layer, req.expert, nbytes, int(slot_of[key]),
                                                max(int(req.priority), 1), req.low_precision))
        plan.prefetch_issued = len(plan.prefetches)
        self.totals["prefetch_issued"] += plan.prefetch_issued
        return plan, decision

    @property
    def wants_outcome(self) -> bool:
        """Whether the system reads a layer's outcome (overrides ``System.on_layer_end``); when
        not, an engine may pass None to :meth:`finish`."""
        return getattr(self.system.on_layer_end, "__func__", None) is not System.on_layer_end

    def finish(self, obs: LayerObservation, plan: LayerPlan, outcome: LayerOutcome | None) -> None:
        """Release the layer's pins and give the system its feedback."""
        self.cache.unpin_layer(obs.layer, plan.needed)  # the items' experts, in id order
        if outcome is not None:  # None: the system does not read it (wants_outcome)
            self.system.on_layer_end(obs, outcome)

