"""Miss handling: what a system does with a needed expert that is not on the GPU.

A handler returns ``{expert: MissAction}`` for the layer's missing experts (absent experts
default to ``MissAction.COPY``). Handlers that change what is computed (low precision, skip) need
no bookkeeping of their own: the LayerServer sums the gate mass of every skipped expert into
``LayerPlan.dropped_gate_mass`` and of every low-precision one into ``degraded_gate_mass``, and the
engines report the totals (``dropped_gate_mass``, ``degraded_gate_mass``).
"""
from __future__ import annotations

import numpy as np

from expertsim.errors import PolicyError
from expertsim.policies.base import LayerObservation, MissAction, Parameterised, RunContext
from expertsim.policies.registration import register_miss


def missing_experts(obs: LayerObservation) -> np.ndarray:
    """The needed experts that were neither resident nor loading at the layer's lookups."""
    return obs.needed[~obs.resident]


@register_miss("copy")
class MissHandler(Parameterised):
    """Stall and copy: every miss waits for a full-precision host-to-device copy (the default of
    every offloading system without a CPU path)."""

    name = "copy"
    uses_gate_weights = False

    def prepare(self, ctx: RunContext) -> None:
        pass

    def decide(self, obs: LayerObservation) -> dict[int, MissAction]:
        return {}

    def background_copies(self, obs: LayerObservation, actions: dict[int, MissAction]) -> list[int]:
        """Experts to copy in the background (after the layer's demand copies), e.g. a miss that
        ran on the CPU but should be cached for later tokens."""
        return []


@register_miss("cpu")
class CpuWhenCheaper(MissHandler):
    """Compute a missing expert on the host CPU when the cost model says that is faster than
    copying it and computing it on the GPU: Fiddler (Kamahori et al., arXiv 2402.07033) and DAOP
    (Zhang et al., arXiv 2501.10375). ``always=True`` sends every miss to the CPU (a CPU fallback,
    as Cache-MoE-style systems do). ``cache_after_cpu`` copies a CPU-computed expert in the
    background so later tokens find it (off for Fiddler, whose GPU set is static)."""

    name = "cpu"

    def __init__(self, always: bool = False, cache_after_cpu: bool = False):
        self.always = bool(always)
        self.cache_after_cpu = bool(cache_after_cpu)
        self._cost = None

    def params(self) -> dict:
        return {"always": self.always, "cache_after_cpu": self.cache_after_cpu}

    def prepare(self, ctx: RunContext) -> None:
        self._cost = ctx.cost
        self._expert_bytes = ctx.model.expert_bytes() if ctx.model is not None else None
        if self._cost is None and not self.always:
            raise PolicyError(
                "computing misses on the CPU when cheaper needs a cost model: give the model and "
                "hardware (--model, --hardware)"
            )

    def cpu_is_cheaper(self, tokens: int) -> bool:
        """CPU compute of ``tokens`` tokens beats copy + GPU compute (strictly)."""
        if self.always:
            return True
        gpu = self._cost.transfer_time_ns(self._expert_bytes) + self._cost.expert_time_ns(tokens)
        return self._cost.cpu_expert_time_ns(tokens) < gpu

    def decide(self, obs: LayerObservation) -> dict[int, MissAction]:
        out = {}
        for i in np.flatnonzero(~obs.resident):
            if self.cpu_is_cheaper(int(obs.tokens_per_expert[i])):
                out[int(obs.needed[i])] = MissAction.CPU
        return out

    def background_copies(self, obs, actions):
        if not self.cache_after_cpu:
            return []
        return [e for e, a in actions.items() if a is MissAction.CPU]


def cumulative_levels(experts: np.ndarray, weights: np.ndarray | None, full_threshold: float,
                      low_threshold: float) -> dict[int, int]:
    """HOBBIT's per-token precision choice: a token's experts sorted by gate weight, descending;
    with ``c`` the weight of the experts ranked above one, it gets full precision (2) when
    ``c < full_threshold``, low precision (1) when ``c < low_threshold``, else it is skipped (0).
    An expert used by several tokens takes the highest level any of them asks for. Without gate
    weights every choice weighs 1/k."""
    n, k = experts.shape
    if n * k <= 64:  # a decode token or a few: the same float64 arithmetic on Python floats
        return _cumulative_levels_few(experts, weights, full_threshold, low_threshold)
    w = np.full((n, k), 1.0 / k) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-w, axis=1, kind="stable")
    w_sorted = np.take_along_axis(w, order, axis=1)
    e_sorted = np.take_along_axis(experts.astype(np.int64), order, axis=1)
    before = np.cumsum(w_sorted, axis=1) - w_sorted
    level = np.where(before < full_threshold, 2, np.where(before < low_threshold, 1, 0))
    out: dict[int, int] = {}
    for e, lv in zip(e_sorted.ravel().tolist(), level.ravel().tolist()):
        out[e] = max(out.get(e, 0), lv)
    return out


def _cumulative_levels_few(experts, weights, full_threshold: float, low_threshold: float) -> dict[int, int]:
    """:func:`cumulative_levels` row by row: a stable sort by descending weight, the running sum
    added in order (as cumsum) less the expert's own weight."""
    n, k = experts.shape
    rows = [[1.0 / k] * k] * n if weights is None else np.asarray(weights, dtype=np.float64).tolist()
    out: dict[int, int] = {}
    for ex, w in zip(experts.tolist(), rows):
        total = 0.0
        for j in sorted(range(k), key=lambda j: -w[j]):
            total += w[j]
            before = total - w[j]
            lv = 2 if before < full_threshold else (1 if before < low_threshold else 0)
            e = int(ex[j])
            out[e] = max(out.get(e, 0), lv)
    return out


@register_miss("hobbit")
class GateThresholdPrecision(MissHandler):
    """HOBBIT's mixed-precision loading (Tang et al., "HOBBIT: A Mixed Precision Expert
    Offloading System for Fast MoE Inference", arXiv 2411.01433): a missing expert is copied in
    full precision, in low precision (the system's ``low_precision_dtype``) or skipped, by the
    cumulative gate weight of the experts its token ranks above it (see
    :func:`cumulative_levels`). Hits are computed as resident."""

    name = "hobbit"
    uses_gate_weights = True

    def __init__(self, full_threshold: float = 0.6, low_threshold: float = 0.9):
        if not 0 <= full_threshold <= low_threshold:
            raise PolicyError(
                f"hobbit needs 0 <= full_threshold <= low_threshold, got {full_threshold!r}, {low_threshold!r}"
            )
        self.full_threshold = float(full_threshold)
        self.low_threshold = float(low_threshold)

    def params(self) -> dict:
        return {"full_threshold": self.full_threshold, "low_threshold": self.low_threshold}

    def decide(self, obs):
        missing = missing_experts(obs).tolist()
        if not missing:
            return {}
        levels = cumulative_levels(obs.experts, obs.weights, self.full_threshold, self.low_threshold)
        out = {}
        for e in missing:
            lv = levels.get(int(e), 2)
            if lv == 1:
                out[int(e)] = MissAction.LOW_PRECISION
            elif lv == 0:
                out[int(e)] = MissAction.SKIP
        return out


@register_miss("skip")
class SkipMisses(MissHandler):
    """Skip missing experts and renormalise the remaining gates (AdapMoE-style adaptive gating,
    Zhong et al., arXiv 2408.10284; Lina and others drop low-weight experts): a miss is skipped
    when every token using it gives it at most ``max_weight``, and, with ``keep_top1``, it is
    no token's first choice (those are copied). The dropped gate mass is reported."""

    name = "skip"
    uses_gate_weights = True

    def __init__(self, max_weight: float = 1.0, keep_top1: bool = True):
        if not 0.0 <= float(max_weight) <= 1.0:
            raise PolicyError(f"skip: max_weight must be a gate weight in [0, 1] (1 = skip any miss that is no "
                              f"token's first choice), got {max_weight!r}")
        self.max_weight = float(max_weight)
        self.keep_top1 = bool(keep_top1)

    def params(self) -> dict:
        return {"max_weight": self.max_weight, "keep_top1": self.keep_top1}

    def decide(self, obs):
        n, k = obs.experts.shape
        w = np.full((n, k), 1.0 / k) if obs.weights is None else np.asarray(obs.weights, dtype=np.float64)
        heavy = set(obs.experts[w > self.max_weight].astype(np.int64).tolist())
        if self.keep_top1:
            top = np.argmax(w, axis=1)
            heavy |= set(obs.experts[np.arange(n), top].astype(np.int64).tolist())
        return {int(e): MissAction.SKIP for e in missing_experts(obs).tolist() if int(e) not in heavy}
