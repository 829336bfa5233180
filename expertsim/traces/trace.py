"""RoutingTrace: which experts each token used at each MoE layer, as contiguous numpy arrays."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import numpy as np

from expertsim.errors import TraceError

if TYPE_CHECKING:
    from expertsim.specs import ModelSpec

PREFILL = 0
DECODE = 1
PHASE_NAMES = ("prefill", "decode")
MAX_EXPERTS = 65536  # expert ids are stored in 16 bits


def expert_dtype(num_experts: int) -> np.dtype:
    """Smallest unsigned dtype that holds expert ids below ``num_experts``."""
    return np.dtype(np.uint8 if num_experts <= 256 else np.uint16)


@dataclass
class RoutingTrace:
    """A routing trace in memory.

    Tokens are rows, ordered by request then position (a request's prefill tokens, then its decode
    tokens). ``experts[t, l, j]`` is the j-th choice (router order, best first) of token t at MoE
    layer l (l counts MoE layers only). ``weights`` has the same shape when gate weights were
    recorded. A *pass* is one forward pass of the model: the tokens of one request that share a
    ``step`` (a whole prompt in prefill, one token in decode).
    """

    experts: np.ndarray  # [tokens, moe_layers, k], unsigned ints
    request: np.ndarray  # [tokens] int64
    step: np.ndarray  # [tokens] int64: forward pass index within the request
    position: np.ndarray  # [tokens] int64
    phase: np.ndarray  # [tokens] uint8: PREFILL or DECODE
    num_experts: int
    token_id: np.ndarray | None = None  # [tokens] int64
    weights: np.ndarray | None = None  # [tokens, moe_layers, k] float32
    metadata: dict = field(default_factory=dict)
    # Optional per-token arrays, e.g. speculative routing "spec_d1": [tokens, layers, k].
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, (int, np.integer)) \
                or not 1 <= int(self.num_experts) <= MAX_EXPERTS:
            raise TraceError(f"num_experts must be an integer in 1..{MAX_EXPERTS} (ids are stored in "
                             f"16 bits), got {self.num_experts!r}")
        self.num_experts = int(self.num_experts)
        self.experts = np.asarray(self.experts)
        if not np.issubdtype(self.experts.dtype, np.integer):
            raise TraceError(f"expert ids must be integers, got dtype {self.experts.dtype}")
        if self.experts.ndim != 3:
            raise TraceError(
                f"experts must have shape [tokens, layers, k], got {self.experts.shape}"
            )
        n = self.experts.shape[0]
        for name in ("request", "step", "position", "phase"):
            arr = np.asarray(getattr(self, name))
            if arr.shape != (n,):
                raise TraceError(f"{name} must have shape ({n},) to match experts, got {arr.shape}")
            setattr(self, name, arr.astype(np.uint8 if name == "phase" else np.int64, copy=False))
        if self.token_id is not None:
            self.token_id = np.asarray(self.token_id).astype(np.int64, copy=False)
            if self.token_id.shape != (n,):
                raise TraceError(f"token_id must have shape ({n},), got {self.token_id.shape}")
        if self.weights is not None:
            self.weights = np.asarray(self.weights, dtype=np.float32)
            if self.weights.shape != self.experts.shape:
                raise TraceError(
                    f"weights shape {self.weights.shape} differs from experts shape {self.experts.shape}"
                )
        if self.experts.size and np.issubdtype(self.experts.dtype, np.signedinteger):
            low = int(self.experts.min())
            if low < 0:
                t, l, j = np.argwhere(self.experts < 0)[0]
                raise TraceError(
                    f"negative expert id {low} at token {t}, layer {l}, choice {j}; ids start at 0"
                )
        if self.experts.size and int(self.experts.max()) >= self.num_experts:
            t, l, j = np.argwhere(self.experts >= self.num_experts)[0]
            raise TraceError(
                f"expert id {int(self.experts[t, l, j])} at token {t}, layer {l} is out of range for "
                f"{self.num_experts} experts (valid ids 0..{self.num_experts - 1}); "
                f"check that the trace belongs to this model"
            )
        self.experts = self.experts.astype(expert_dtype(self.num_experts), copy=False)

    # --- shape ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_requests(self) -> int:
        return int(len(np.unique(self.request)))

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        model = self.metadata.get("model", "?")
        return (
            f"RoutingTrace(model={model!r}, tokens={self.num_tokens}, layers={self.num_layers}, "
            f"k={self.top_k}, experts={self.num_experts}, requests={self.num_requests}, "
            f"decode={int((self.phase == DECODE).sum())}, weights={self.weights is not None})"
        )

    # --- structure -----------------------------------------------------------------------
    def pass_starts(self) -> np.ndarray:
        """Start index of every forward pass (a change of request or step), plus the end."""
        if self.num_tokens == 0:
            return np.zeros(1, dtype=np.int64)
        change = np.ones(self.num_tokens, dtype=bool)
        change[1:] = (self.request[1:] != self.request[:-1]) | (self.step[1:] != self.step[:-1])
        return np.append(np.flatnonzero(change), self.num_tokens)

    def request_starts(self) -> np.ndarray:
        """Start index of every request, plus the end."""
        if self.num_tokens == 0:
            return np.zeros(1, dtype=np.int64)
        change = np.ones(self.num_tokens, dtype=bool)
        change[1:] = self.request[1:] != self.request[:-1]
        return np.append(np.flatnonzero(change), self.num_tokens)

    def iter_requests(self) -> Iterator[tuple[int, slice]]:
        starts = self.request_starts()
        for a, b in zip(starts[:-1], starts[1:]):
            yield int(self.request[a]), slice(int(a), int(b))

    def select(self, mask_or_index: np.ndarray) -> "RoutingTrace":
        """A new trace with the chosen tokens (boolean mask or index array), order kept."""
        idx = np.asarray(mask_or_index)
        return RoutingTrace(
            experts=self.experts[idx],
            request=self.request[idx],
            step=self.step[idx],
            position=self.position[idx],
            phase=self.phase[idx],
            num_experts=self.num_experts,
            token_id=None if self.token_id is None else self.token_id[idx],
            weights=None if self.weights is None else self.weights[idx],
            metadata=dict(self.metadata),
            extras={k: v[idx] for k, v in self.extras.items()},
        )

    def only_phase(self, phase: str) -> "RoutingTrace":
        """Tokens of one phase ('prefill' or 'decode'); 'all' returns self."""
        if phase == "all":
            return self
        if phase not in PHASE_NAMES:
            raise TraceError(f"phase must be prefill, decode or all, got {phase!r}")
        return self.select(self.phase == PHASE_NAMES.index(phase))

    def head_requests(self, n: int) -> "RoutingTrace":
        """The first ``n`` requests (in trace order)."""
        starts = self.request_starts()
        end = int(starts[min(n, len(starts) - 1)])
        return self.select(np.arange(end))

    def max_tokens(self, n: int) -> "RoutingTrace":
        """The first ``n`` tokens, cut at a pass boundary so no pass is split."""
        if n >= self.num_tokens:
            return self
        starts = self.pass_starts()
        end = int(starts[starts <= n].max()) if (starts <= n).any() else 0
        return self.select(np.arange(max(end, 1)))

    # --- validation against a model ------------------------------------------------------
    def check_model(self, model: "ModelSpec", *, allow_smaller_k: bool = False) -> None:
        """Raise TraceError when the trace cannot belong to ``model``."""
        named = str(self.metadata.get("model") or "")
        if named and named != model.name and not model.name.startswith(named + "-"):
            from expertsim.specs import list_models

            if named in list_models():
                raise TraceError(
                    f"trace metadata names model {named!r} but --model is {model.name!r}; pick "
                    f"--model {named} (or the model the trace was captured from)"
                )
        if self.num_layers != model.num_moe_layers:
            raise TraceError(
                f"trace has {self.num_layers} MoE layers but model {model.name!r} has "
                f"{model.num_moe_layers}; pick the matching --model (or slice the trace's layers)"
            )
        if self.top_k != model.top_k and not (allow_smaller_k and self.top_k < model.top_k):
            raise TraceError(
                f"trace has top-{self.top_k} routing but model {model.name!r} uses top-{model.top_k}; "
                f"pick the matching --model"
            )
        if self.num_experts > model.num_experts:
            high = int(self.experts.max()) if self.experts.size else -1
            if high >= model.num_experts:
                t, l, j = np.argwhere(self.experts >= model.num_experts)[0]
                raise TraceError(
                    f"expert id {int(self.experts[t, l, j])} at token {t}, layer {l} (largest id {high}) "
                    f"is out of range for model "
                    f"{model.name!r} with {model.num_experts} experts per layer (ids 0..{model.num_experts - 1})"
                )
        self.num_experts = model.num_experts

    def validate(self) -> None:
        """Structural checks that do not need a model: duplicates in a top-k, NaN weights, order."""
        if self.num_tokens == 0:
            raise TraceError("trace has no tokens")
        if self.top_k > 1:
            srt = np.sort(self.experts, axis=2)
            dup = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)
            if dup.any():
                t, l = np.argwhere(dup)[0]
                raise TraceError(
                    f"token {t} (request {self.request[t]}, position {self.position[t]}) at layer {l} "
                    f"lists expert {int(srt[t, l][np.flatnonzero(srt[t, l][1:] == srt[t, l][:-1])[0]])} "
                    f"twice in its top-{self.top_k}: {self.experts[t, l].tolist()}; a top-k has distinct experts"
                )
        if self.weights is not None:
            bad = ~(np.isfinite(self.weights) & (self.weights >= 0) & (self.weights <= 1))
            if bad.any():
                t, l, j = np.argwhere(bad)[0]
                raise TraceError(
                    f"gate weight {self.weights[t, l, j]} at token {t}, layer {l}, choice {j} is not "
                    f"in [0, 1] (NaN, infinite or out of range); drop the weight columns or fix the capture"
                )
        for name in ("request", "step", "position"):
            arr = getattr(self, name)
            if int(arr.min()) < 0:
                t = int(np.flatnonzero(arr < 0)[0])
                raise TraceError(f"{name} {int(arr[t])} at token {t} is negative; {name}s count from 0")
        if int(self.phase.max()) > DECODE:
            t = int(np.flatnonzero(self.phase > DECODE)[0])
            raise TraceError(f"phase {int(self.phase[t])} at token {t}: 0 is prefill, 1 is decode")
        if (np.diff(self.request_starts()) <= 0).any():
            raise TraceError("trace has an empty request")
        starts = self.request_starts()
        seen = self.request[starts[:-1]]
        if len(np.unique(seen)) != len(seen):
            values, counts = np.unique(seen, return_counts=True)
            raise TraceError(
                f"request {int(values[counts > 1][0])} appears in more than one block; a trace lists "
                f"each request's tokens contiguously (sort by request, position)"
            )
        self._check_order()

    def _check_order(self) -> None:
        """Within a request, positions strictly increase (so no (request, position, layer) row
        repeats), steps never decrease, and a decode token is a forward pass of its own (its step
        differs from its neighbours'); otherwise passes and TPOT are meaningless."""
        same = self.request[1:] == self.request[:-1]
        d_pos = np.diff(self.position)
        d_step = np.diff(self.step)
        decode = self.phase == DECODE
        alone = decode[1:] | decode[:-1]
        rules = (
            (same & (d_pos <= 0), "position", "positions strictly increase within a request "
             "(a repeated position is a duplicated token row)"),
            (same & (d_step < 0), "step", "steps never decrease within a request"),
            (same & (d_step == 0) & alone, "step", "a decode token is one forward pass: its step "
             "differs from the tokens before and after it"),
        )
        for bad, name, rule in rules:
            if bad.any():
                t = int(np.flatnonzero(bad)[0]) + 1
                raise TraceError(
                    f"token {t} (request {int(self.request[t])}, position {int(self.position[t])}) has "
                    f"{name} {int(getattr(self, name)[t])} after {int(getattr(self, name)[t - 1])}: {rule}; "
                    f"sort the rows by request, position, layer and fix the steps"
                )
