"""Synthetic routing traces: a generator fitted to a real trace, plus uniform and Zipf baselines.

The fitted generator is an LRU-stack model per MoE layer, which is what makes sampled traces
reproduce a real trace's per-layer LRU hit-rate curve and its ``reuse_next_token``: both are
functions of where, in the request's recency order of experts at that layer, each expert a token
uses sits (its stack distance, see ``expertsim.traces.stats``). For each token and layer it

1. draws how many of the token's k experts are new to the request at this layer (never used
   before), given how many distinct experts the request has used so far (``m``);
2. draws the recency positions of the reused ones: the nearest position from ``first_position``,
   each further one from ``next_position`` given the previous (a chain over sorted positions, so
   pairs that travel together, like "the same two experts as the last token", stay together);
3. picks the new experts among those not yet used, by the layer's popularity, sharpened by the
   previous layer's choice for the same token (``transition``: cross-layer dependence);
4. draws the request's (prefill, decode) lengths from the real trace's pairs.

What it does not model: the router's order within a top-k (the sampled order is by recency) and
gate weights (none are sampled). Prefill tokens are sampled with the same tables from a fresh
state (the statistics are per phase, with the cache empty at a request's start).

A fit is a small JSON file of numbers derived from a trace (no token ids, no routing rows).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np

from expertsim.errors import TraceError
from expertsim.traces.stats import COLD, _phase_trace, token_stack_distances
from expertsim.traces.trace import DECODE, PREFILL, RoutingTrace, expert_dtype

FIT_FORMAT = "expertsim-routing-fit"
FIT_VERSION = 1
SHIPPED_FITS = {"mixtral-8x7b": "mixtral-8x7b.fit.json", "llama4-maverick": "llama4-maverick.fit.json"}
# Above this many experts the cross-layer transition table (experts x experts per layer) is not
# stored; new experts then follow popularity alone.
MAX_TRANSITION_EXPERTS = 64


def m_bucket_edges(num_experts: int) -> list[int]:
    """Lower edges of the buckets of ``m`` (distinct experts used so far): exact up to 16, then
    about x1.25 per bucket."""
    edges = list(range(min(num_experts, 16) + 1))
    while edges[-1] < num_experts:
        edges.append(min(num_experts, max(edges[-1] + 1, int(edges[-1] * 1.25))))
    return edges


def _bucket(m: np.ndarray, edges: np.ndarray) -> np.ndarray:
    return np.searchsorted(edges, m, side="right") - 1


def _round(a: np.ndarray, digits: int = 6) -> list:
    return np.round(np.asarray(a, dtype=np.float64), digits).tolist()


# --- fitting ------------------------------------------------------------------------------
def fit_trace(trace: RoutingTrace, *, phase: str | None = None, model: str | None = None) -> dict:
    """Fit the generator to ``trace`` (its decode tokens; prefill when it has none)."""
    if phase is None:
        phase = "decode" if (trace.phase == DECODE).any() else "prefill"
    sub = _phase_trace(trace, phase)
    n, num_layers, k = sub.experts.shape
    num_experts = sub.num_experts
    if k > num_experts:
        raise TraceError(f"top-{k} routing over {num_experts} experts is impossible")
    dist = token_stack_distances(sub.experts, sub.request, num_experts)
    cold = dist == COLD
    n_new = cold.sum(axis=2)  # [n, L]
    # m before each token: distinct experts used by earlier tokens of the request (per layer).
    starts = sub.request_starts()
    csum = np.cumsum(n_new, axis=0)
    req_start = np.repeat(starts[:-1], np.diff(starts))
    before_req = np.where(req_start[:, None] > 0, csum[np.maximum(req_start - 1, 0)], 0)
    m = csum - n_new - before_req
    edges = np.asarray(m_bucket_edges(num_experts))
    b = _bucket(m, edges)
    layer_idx = np.broadcast_to(np.arange(num_layers), (n, num_layers))
    new_count = np.zeros((num_layers, len(edges), k + 1))
    np.add.at(new_count, (layer_idx, b, n_new), 1)

    pos = np.sort(np.where(cold, num_experts, dist), axis=2)  # reused positions first, ascending
    # The nearest reused position depends strongly on m while few experts have been used (a
    # 128-expert layer fills slowly), so it is conditioned on m's bucket; stored ragged, only
    # positions below the bucket's largest m.
    first = np.zeros((num_layers, len(edges), num_experts))
    reused = ~cold.all(axis=2)
    np.add.at(first, (layer_idx[reused], b[reused], pos[:, :, 0][reused]), 1)
    bucket_max_m = np.append(edges[1:] - 1, num_experts)
    nxt = None
    if k > 1:
        nxt = np.zeros((num_layers, num_experts, num_experts))
        for j in range(1, k):
            ok = pos[:, :, j] < num_experts
            np.add.at(nxt, (layer_idx[ok], pos[:, :, j - 1][ok], pos[:, :, j][ok]), 1)

    pop = np.stack([np.bincount(sub.experts[:, l].ravel(), minlength=num_experts)
                    for l in range(num_layers)]).astype(np.float64)
    transition = None
    if num_experts <= MAX_TRANSITION_EXPERTS and num_layers > 1:
        transition = np.zeros((num_layers - 1, num_experts, num_experts))
        for l in range(num_layers - 1):
            np.add.at(transition[l], (sub.experts[:, l, 0].astype(np.int64)[:, None],
                                      sub.experts[:, l + 1].astype(np.int64)), 1)

    lengths = []
    for _, sl in trace.iter_requests():
        ph = trace.phase[sl]
        lengths.append([int((ph == PREFILL).sum()), int((ph == DECODE).sum())])

    from expertsim.traces.stats import lru_hit_curve, reuse_next_token

    # Sizes from top-k up: a smaller cache cannot hold one token's experts.
    sizes = list(range(k, num_experts + 1)) if num_experts <= 16 else \
        sorted({k, 2, 4, 8, 16, 32, 64, num_experts // 2, num_experts} & set(range(k, num_experts + 1)))
    curve = lru_hit_curve(sub, sizes, phase="all")
    single = sub.num_requests == sub.num_tokens
    targets = {"phase": phase, "lru_hit_curve": curve,
               "reuse_next_token": None if single else reuse_next_token(sub, phase="all")}

    def norm(a):
        s = a.sum(axis=-1, keepdims=True)
        return np.divide(a, s, out=np.zeros_like(a), where=s > 0)

    return {
        "format": FIT_FORMAT,
        "version": FIT_VERSION,
        "model": model or trace.metadata.get("model", "?"),
        "fitted_on": trace.metadata.get("source", "?"),
        "phase": phase,
        "num_layers": num_layers,
        "num_experts": num_experts,
        "top_k": k,
        "m_bucket_edges": edges.tolist(),
        "new_count": _round(norm(new_count)),
        "first_position": [[row[: int(bucket_max_m[i])] for i, row in enumerate(_round(norm(first[l])))]
                           for l in range(num_layers)],
        "next_position": None if nxt is None else _round(norm(nxt)),
        "popularity": _round(norm(pop)),
        "transition": None if transition is None else _round(norm(transition), 5),
        "lengths": lengths,
        "targets": targets,
    }


def save_fit(fit: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fit, separators=(",", ":")) + "\n")
    return path


def load_fit(path_or_name: str | Path) -> dict:
    """A fit JSON file, or the name of a shipped fit (``mixtral-8x7b``, ``llama4-maverick``)."""
    name = str(path_or_name)
    if name in SHIPPED_FITS:
        text = (resources.files("expertsim") / "data" / SHIPPED_FITS[name]).read_text()
        source = f"expertsim/data/{SHIPPED_FITS[name]}"
    else:
        path = Path(name)
        if not path.is_file():
            raise TraceError(
                f"fit {name!r} is neither a file nor a shipped fit ({', '.join(SHIPPED_FITS)}); "
                f"make one with `expertsim trace fit TRACE --out FIT.json`"
            )
        text, source = path.read_text(), str(path)
    try:
        fit = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TraceError(f"fit {source!r} is not valid JSON ({exc}); refit with `expertsim trace fit`") from None
    if not isinstance(fit, dict) or fit.get("format") != FIT_FORMAT:
        raise TraceError(
            f"{source!r} is not an expertsim routing fit (format {fit.get('format') if isinstance(fit, dict) else None!r}, "
            f"expected {FIT_FORMAT!r}); make one with `expertsim trace fit`"
        )
    if fit.get("version") != FIT_VERSION:
        raise TraceError(f"fit {source!r} has version {fit.get('version')}, this expertsim reads {FIT_VERSION}; refit it")
    fit.setdefault("_path", source)
    return fit


# --- sampling -----------------------------------------------------------------------------
def _categorical(rng: np.random.Generator, weights: np.ndarray) -> np.ndarray:
    """One draw per row of non-negative ``weights`` [..., n] (rows summing to 0 draw uniformly)."""
    total = weights.sum(axis=-1, keepdims=True)
    w = np.where(total > 0, weights, 1.0)
    cdf = np.cumsum(w, axis=-1)
    u = rng.random(w.shape[:-1] + (1,)) * cdf[..., -1:]
    return np.minimum((cdf <= u).sum(axis=-1), w.shape[-1] - 1)


class FittedGenerator:
    """Samples routing from a fit (see the module docstring)."""

    def __init__(self, fit: dict):
        self.fit = fit
        self.num_layers = int(fit["num_layers"])
        self.num_experts = int(fit["num_experts"])
        self.top_k = int(fit["top_k"])
        self.edges = np.asarray(fit["m_bucket_edges"])
        self.new_count = np.asarray(fit["new_count"], dtype=np.float64)
        self.first = np.zeros((self.num_layers, len(self.edges), self.num_experts))
        for l, rows in enumerate(fit["first_position"]):
            for i, row in enumerate(rows):
                self.first[l, i, : len(row)] = row
        # Buckets never seen in the fitted trace fall back to the layer's pooled distribution.
        pooled = self.first.sum(axis=1, keepdims=True)
        empty = self.first.sum(axis=2, keepdims=True) == 0
        self.first = np.where(empty, np.broadcast_to(pooled, self.first.shape), self.first)
        self.next = None if fit.get("next_position") is None else np.asarray(fit["next_position"], dtype=np.float64)
        self.pop = np.asarray(fit["popularity"], dtype=np.float64)
        self.transition = None if fit.get("transition") is None else np.asarray(fit["transition"], dtype=np.float64)
        self.lengths = np.asarray(fit["lengths"], dtype=np.int64).reshape(-1, 2)
        shapes = {"new_count": (self.num_layers, len(self.edges), self.top_k + 1),
                  "popularity": (self.num_layers, self.num_experts)}
        if len(fit["first_position"]) != self.num_layers or any(
                len(rows) != len(self.edges) for rows in fit["first_position"]):
            raise TraceError("fit field 'first_position' must list one row per layer and m bucket; refit")
        for key, shape in shapes.items():
            if np.asarray(fit[key]).shape != shape:
                raise TraceError(f"fit field {key!r} has shape {np.asarray(fit[key]).shape}, expected {shape}; refit")

    def __repr__(self) -> str:
        return (f"FittedGenerator(model={self.fit.get('model')!r}, layers={self.num_layers}, "
                f"experts={self.num_experts}, k={self.top_k}, phase={self.fit.get('phase')!r})")

    def sample_block(self, num_tokens: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Routing of len(num_tokens) independent requests (fresh state each), one array
        [num_tokens[r], layers, k] per request."""
        R, L, E, k = len(num_tokens), self.num_layers, self.num_experts, self.top_k
        num_tokens = np.asarray(num_tokens, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(num_tokens)])
        flat = np.empty((int(offsets[-1]), L, k), dtype=np.int64)
        # Requests longest first, so the active ones at each column are a prefix (views, no copies).
        by_len = np.argsort(-num_tokens, kind="stable")
        sorted_len = num_tokens[by_len]
        last = np.full((R, L, E), -1, dtype=np.int32)
        lidx = np.arange(L)
        pos_range = np.arange(E)
        for c in range(int(max(num_tokens, default=0))):
            a = int(np.searchsorted(-sorted_len, -c, side="left"))
            if a == 0:
                break
            act = by_len[:a]
            la = last[:a]  # [a, L, E], a view
            seen = la >= 0
            m = seen.sum(axis=2)  # [a, L]
            b = _bucket(m, self.edges)
            n_new = _categorical(rng, self.new_count[lidx[None, :], b])  # [a, L]
            n_new = np.clip(n_new, k - np.minimum(m, k), np.minimum(k, E - m))
            n_reuse = k - n_new
            # Recency order: experts sorted by last use, most recent first (unseen at the end).
            order = np.argsort(-la, axis=2, kind="stable")
            chosen = np.full((a, L, k), -1, dtype=np.int64)
            prev = None
            for j in range(k):
                need = n_reuse > j
                if not need.any():
                    break
                # Leave room for the remaining reused picks: positions < m - (n_reuse - 1 - j).
                limit = m - (n_reuse - 1 - j)
                if prev is None:
                    w = self.first[lidx[None, :], b]
                    lo = np.full((a, L), -1)
                else:
                    w = self.next[lidx[None, :], np.maximum(prev, 0)]
                    lo = prev
                allowed = (pos_range > lo[..., None]) & (pos_range < limit[..., None])
                p = _categorical(rng, np.where(allowed, w, 0.0) + np.where(allowed, 1e-12, 0.0))
                p = np.where(need, p, -1)
                chosen[..., j] = np.where(need, np.take_along_axis(order, np.maximum(p, 0)[..., None], 2)[..., 0], -1)
                prev = np.where(need, p, prev if prev is not None else -1)
            if (n_new > 0).any():
                self._new_experts(rng, chosen, n_reuse, n_new, seen)
            ids = chosen
            flat[offsets[act] + c] = ids
            # Update recency: the token's experts in ascending id order (higher id more recent).
            srt = np.sort(ids, axis=2)
            stamp = (c + 1) * k + np.arange(k)
            ar = np.arange(a)[:, None, None]
            la[ar, lidx[None, :, None], srt] = stamp
        return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

    def _new_experts(self, rng, chosen, n_reuse, n_new, seen) -> None:
        """Fill the new-expert slots. A (request, layer) whose previous layer's first expert is
        already known (reused, or layer 0) is done in one vectorised batch; the rest (the
        previous layer's first expert is itself new) go layer by layer, in order."""
        L = chosen.shape[1]
        need = n_new > 0
        known = np.ones_like(need)
        known[:, 1:] = n_reuse[:, :-1] > 0
        r, l = np.nonzero(need & known)
        self._fill(rng, chosen, n_reuse, n_new, seen, r, l)
        late = need & ~known
        for layer in range(1, L):
            rows = np.flatnonzero(late[:, layer])
            if len(rows):
                self._fill(rng, chosen, n_reuse, n_new, seen, rows, np.full(len(rows), layer))

    def _fill(self, rng, chosen, n_reuse, n_new, seen, r, l) -> None:
        if len(r) == 0:
            return
        base = self.pop[l]
        if self.transition is not None:
            has = l > 0
            anchor = chosen[r, np.maximum(l - 1, 0), 0]
            trans = self.transition[np.maximum(l - 1, 0), np.maximum(anchor, 0)]
            use = has & (anchor >= 0) & (trans.sum(axis=1) > 0)
            base = np.where(use[:, None], trans + 0.05 * base, base)
        taken = seen[r, l].copy()
        idx = np.arange(len(r))
        for j in range(chosen.shape[2]):
            want = n_new[r, l] > j
            if not want.any():
                break
            e = _categorical(rng, np.where(taken, 0.0, base + 1e-12))
            w = np.flatnonzero(want)
            chosen[r[w], l[w], n_reuse[r[w], l[w]] + j] = e[w]
            taken[idx[w], e[w]] = True

    def sample(self, num_requests: int, *, seed: int = 0, lengths=None, metadata: dict | None = None) -> RoutingTrace:
        """A trace of ``num_requests`` requests: (prefill, decode) lengths drawn from the fit's
        pairs (or given as ``lengths``), routing from the generator."""
        if num_requests < 1:
            raise TraceError(f"--requests must be >= 1, got {num_requests}")
        rng = np.random.default_rng(seed)
        if lengths is None:
            if len(self.lengths) == 0:
                raise TraceError("the fit has no request lengths; pass lengths=[(prefill, decode), ...]")
            lengths = self.lengths[rng.integers(0, len(self.lengths), size=num_requests)]
        lengths = np.asarray(lengths, dtype=np.int64).reshape(num_requests, 2)
        if (lengths.sum(axis=1) < 1).any():
            raise TraceError("every request needs at least one token")
        pre = self.sample_block(lengths[:, 0], rng)
        dec = self.sample_block(lengths[:, 1], rng)
        return _assemble(pre, dec, self.num_experts, metadata or {})


def _assemble(pre: list, dec: list, num_experts: int, metadata: dict) -> RoutingTrace:
    experts, request, step, position, phase = [], [], [], [], []
    for r, (p, d) in enumerate(zip(pre, dec)):
        np_, nd = len(p), len(d)
        experts += [p, d]
        request.append(np.full(np_ + nd, r))
        step.append(np.concatenate([np.zeros(np_, dtype=np.int64),
                                    np.arange(1, nd + 1) if np_ else np.arange(nd)]))
        position.append(np.arange(np_ + nd))
        phase.append(np.concatenate([np.full(np_, PREFILL), np.full(nd, DECODE)]))
    ex = np.concatenate(experts).astype(expert_dtype(num_experts))
    return RoutingTrace(experts=ex, request=np.concatenate(request), step=np.concatenate(step),
                        position=np.concatenate(position), phase=np.concatenate(phase),
                        num_experts=num_experts, metadata=dict(metadata))


def synth_from_fit(fit: dict | str | Path, num_requests: int, *, seed: int = 0, lengths=None) -> RoutingTrace:
    """Sample a trace from a fit (dict, JSON path or shipped fit name), labelled as synthetic."""
    if not isinstance(fit, dict):
        fit = load_fit(fit)
    where = fit.get("_path", "a fit")
    meta = {"model": fit.get("model", "?"), "synthetic": "fitted",
            "source": f"synthetic: sampled from the {fit.get('model', '?')} fit ({where})",
            "seed": str(seed), "fitted_on": str(fit.get("fitted_on", "?"))}
    return FittedGenerator(fit).sample(num_requests, seed=seed, lengths=lengths, metadata=meta)


def synth_baseline(num_layers: int, num_experts: int, top_k: int, num_requests: int, *,
                   prefill_tokens: int = 16, decode_tokens: int = 64, zipf: float | None = None,
                   seed: int = 0, model: str = "?") -> RoutingTrace:
    """Independent routing without a fit: uniform, or Zipf(``zipf``) popularity per layer (a
    random ranking of experts per layer). No temporal or cross-layer locality beyond popularity."""
    for name, value in (("layers", num_layers), ("experts", num_experts), ("top_k", top_k),
                        ("requests", num_requests)):
        if value < 1:
            raise TraceError(f"{name} must be >= 1, got {value}")
    if top_k > num_experts:
        raise TraceError(f"top_k={top_k} exceeds experts={num_experts}")
    if zipf is not None and zipf < 0:
        raise TraceError(f"--zipf must be >= 0 (0 is uniform), got {zipf}")
    rng = np.random.default_rng(seed)
    weights = np.ones((num_layers, num_experts))
    if zipf:
        ranks = np.argsort(rng.random((num_layers, num_experts)), axis=1) + 1
        weights = ranks.astype(np.float64) ** (-zipf)
    per = prefill_tokens + decode_tokens
    n = num_requests * per
    # Top-k without replacement by the Gumbel-top-k trick: k largest of log w + Gumbel noise.
    keys = np.log(weights)[None] + rng.gumbel(size=(n, num_layers, num_experts))
    experts = np.argsort(-keys, axis=2)[:, :, :top_k]
    request = np.repeat(np.arange(num_requests), per)
    position = np.tile(np.arange(per), num_requests)
    phase = np.where(position < prefill_tokens, PREFILL, DECODE)
    step = np.where(phase == PREFILL, 0, position - prefill_tokens + (1 if prefill_tokens else 0))
    kind = f"zipf({zipf})" if zipf else "uniform"
    return RoutingTrace(experts=experts.astype(expert_dtype(num_experts)), request=request, step=step,
                        position=position, phase=phase, num_experts=num_experts,
                        metadata={"model": model, "synthetic": kind, "seed": str(seed),
                                  "source": f"synthetic: independent {kind} routing, seed {seed}"})


def compare_to_fit(fit: dict, sample: RoutingTrace) -> dict:
    """The sample's LRU curve and reuse_next_token next to the fit's real targets."""
    from expertsim.traces.stats import lru_hit_curve, reuse_next_token

    targets = fit["targets"]
    sizes = targets["lru_hit_curve"]["cache_sizes"]
    got = lru_hit_curve(sample, sizes, phase=targets["phase"])["hit_rate"]
    real = targets["lru_hit_curve"]["hit_rate"]
    out = {"cache_sizes": sizes, "real": real, "synthetic": got,
           "max_abs_error": float(max(abs(a - b) for a, b in zip(real, got)))}
    if targets.get("reuse_next_token") is not None:
        r = reuse_next_token(sample, phase=targets["phase"])
        out["reuse_next_token"] = {"real": targets["reuse_next_token"], "synthetic": r,
                                   "abs_error": abs(r - targets["reuse_next_token"])}
    return out


DEFAULT_TRACE_SOURCE = ("synthetic: sampled from the Mixtral-8x7B fit "
                        "(expertsim/data/mixtral-8x7b.fit.json)")


def default_trace(num_requests: int = 8, decode_tokens: int = 64, prefill_tokens: int = 16,
                  seed: int = 0) -> RoutingTrace:
    """The project's default trace: a small deterministic Mixtral-8x7B trace sampled from the
    shipped fit (8 requests of 16 prefill + 64 decode tokens, seed 0)."""
    fit = load_fit("mixtral-8x7b")
    lengths = [(prefill_tokens, decode_tokens)] * num_requests
    trace = synth_from_fit(fit, num_requests, seed=seed, lengths=lengths)
    trace.metadata.update({"model": "mixtral-8x7b", "source": DEFAULT_TRACE_SOURCE})
    return trace


def fit_report(pairs: list[tuple[str, str]], *, seed: int = 0) -> tuple[str, list]:
    """For each (fit, real trace path): sample as many requests as the real trace has and compare
    every cache size. Returns the markdown and [(title, fit, real curve, synthetic curve)]."""
    from expertsim.traces.io import read_trace
    from expertsim.traces.stats import lru_hit_curve, reuse_next_token

    lines, curves = [], []
    for fit_name, real_path in pairs:
        fit = load_fit(fit_name)
        real = read_trace(real_path)
        phase = fit["targets"]["phase"]
        sample = synth_from_fit(fit, real.num_requests, seed=seed)
        sizes = list(range(int(fit["top_k"]), fit["num_experts"] + 1))
        r = lru_hit_curve(real, sizes, phase=phase)["hit_rate"]
        s = lru_hit_curve(sample, sizes, phase=phase)["hit_rate"]
        err = [abs(a - b) for a, b in zip(r, s)]
        title = f"{fit.get('model')} (fit {fit.get('_path')})"
        curves.append((title, sizes, r, s))
        shown = [i for i, k in enumerate(sizes) if len(sizes) <= 16 or k in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)]
        lines += [f"### {title}", "",
                  f"Real: `{Path(real_path).name}` ({real.only_phase(phase).num_tokens} {phase} tokens, "
                  f"{real.num_requests} requests). Synthetic: {sample.num_requests} requests sampled with "
                  f"seed {seed} ({sample.only_phase(phase).num_tokens} {phase} tokens). Worst error over all "
                  f"{len(sizes)} cache sizes: {max(err):.4f} (at K={sizes[int(np.argmax(err))]}).", "",
                  "| K (slots per layer) | real hit rate | synthetic hit rate | abs error |",
                  "| ---: | ---: | ---: | ---: |"]
        lines += [f"| {sizes[i]} | {r[i]:.4f} | {s[i]:.4f} | {err[i]:.4f} |" for i in shown]
        rr, rs = reuse_next_token(real, phase=phase), reuse_next_token(sample, phase=phase)
        lines += ["", f"reuse_next_token: real {rr:.4f}, synthetic {rs:.4f} (abs error {abs(rr - rs):.4f}).", ""]
    return "\n".join(lines), curves


def fit_report_figure(curves: list, path: str | Path) -> Path:
    """Real vs synthetic LRU hit-rate curves as a self-contained plotly HTML file."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(curves), subplot_titles=[c[0] for c in curves])
    for i, (_, sizes, real, synth) in enumerate(curves, 1):
        fig.add_trace(go.Scatter(x=sizes, y=real, mode="lines+markers", name="real", legendgroup="real",
                                 showlegend=i == 1, line={"color": "black"}), 1, i)
        fig.add_trace(go.Scatter(x=sizes, y=synth, mode="lines", name="synthetic", legendgroup="synth",
                                 showlegend=i == 1, line={"color": "crimson", "dash": "dash"}), 1, i)
        fig.update_xaxes(title_text="cache slots per layer (K)", row=1, col=i)
    fig.update_yaxes(title_text="LRU hit rate (decode)", row=1, col=1)
    fig.update_layout(title="Per-layer LRU hit rate: real traces vs samples of their fits", height=450)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(out, include_plotlyjs=True, full_html=True)
    return out


def uniform_trace(num_layers: int, num_experts: int, top_k: int, prompt_tokens: int, decode_tokens: int, *,
                  num_requests: int = 1, seed: int = 0, model: str = "?") -> RoutingTrace:
    """Uniform top-k routing per token and MoE layer, seeded: every token picks ``top_k`` distinct
    experts uniformly at random, independently per layer (the ``trace = "uniform"`` run key, for
    models without a captured trace). Each request has ``prompt_tokens`` prefill tokens then
    ``decode_tokens`` decode tokens. Memory is the trace itself (tokens x layers x k small ints):
    the k-subsets come from Floyd's algorithm, k draws per row, not a sort over all experts."""
    for name, value in (("layers", num_layers), ("experts", num_experts), ("top_k", top_k),
                        ("requests", num_requests)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise TraceError(f"uniform trace: {name} must be an integer >= 1, got {value!r}")
    for name, value in (("trace_prompt_tokens", prompt_tokens), ("trace_decode_tokens", decode_tokens)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= 10_000_000:
            raise TraceError(f"uniform trace: {name} must be an integer in 0..10000000, got {value!r}")
    if prompt_tokens + decode_tokens < 1:
        raise TraceError("uniform trace: give at least one token (trace_prompt_tokens + trace_decode_tokens >= 1)")
    if top_k > num_experts:
        raise TraceError(f"uniform trace: top_k={top_k} exceeds experts={num_experts}")
    rng = np.random.default_rng(seed)
    per = prompt_tokens + decode_tokens
    rows = num_requests * per * num_layers
    chosen = np.empty((rows, top_k), dtype=np.int64)
    # Floyd: for j = E-k .. E-1 draw t in [0, j]; take t unless already taken, else j (never taken yet).
    for i, j in enumerate(range(num_experts - top_k, num_experts)):
        t = rng.integers(0, j + 1, size=rows)
        taken = (chosen[:, :i] == t[:, None]).any(axis=1) if i else np.zeros(rows, dtype=bool)
        chosen[:, i] = np.where(taken, j, t)
    experts = chosen.reshape(num_requests * per, num_layers, top_k).astype(expert_dtype(num_experts))
    request = np.repeat(np.arange(num_requests), per)
    position = np.tile(np.arange(per), num_requests)
    phase = np.where(position < prompt_tokens, PREFILL, DECODE)
    step = np.where(phase == PREFILL, 0, position - prompt_tokens + (1 if prompt_tokens else 0))
    return RoutingTrace(experts=experts, request=request, step=step, position=position, phase=phase,
                        num_experts=num_experts,
                        metadata={"model": model, "synthetic": "uniform", "seed": str(seed),
                                  "source": f"synthetic: uniform top-{top_k} routing per token and layer, "
                                            f"{prompt_tokens} prompt + {decode_tokens} decode tokens, seed {seed}"})
