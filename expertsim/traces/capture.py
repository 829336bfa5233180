"""Capture routing traces from Hugging Face transformers MoE causal LMs (needs the torch extra).

Forward hooks on each MoE layer's router record the top-k expert ids exactly as the router
returned them (never recomputed from logits: DeepSeek-V3's sigmoid + bias + group-limited choice
cannot be), its gate weights and, optionally, the full router scores. Prefill and greedy decode
(``generate``) of left-padded batches are recorded; padding tokens, and tokens fed after a row
already produced its EOS, are dropped.

Speculative routing: for d = 1..D, layer l+d's router applied to layer l's router input (the
hidden state mixtral-offloading and HOBBIT prefetch from) goes into ``extras["spec_d{d}"]``,
``[tokens, layers, k]``. Where MoE layer l+d does not exist the entries hold ``SPEC_INVALID``
of the array's dtype: the largest value of ``expert_dtype(num_experts + 1)`` (255 for up to 255
experts, 65535 above), which is never a valid id. Router scores go to
``extras["router_probs"]``, float16 ``[tokens, layers, experts]``: softmax of the router logits,
sigmoid for DeepSeek-V3.

Within a token, (id, weight) pairs are stored best first by gate weight (DeepSeek's routers
return them unsorted); the set is the router's.

Families (transformers >= 5 router modules, which return ``(logits, weights, ids)``): Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3, GPT-OSS, Phi-3.5-MoE. torch and
transformers are imported inside functions: this module imports without them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from expertsim.errors import TraceError
from expertsim.traces.trace import DECODE, PREFILL, RoutingTrace, expert_dtype

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "gpt_oss", "phimoe")
_ALIASES = {
    "mixtral": "mixtral", "qwen2moe": "qwen2_moe", "qwen15moe": "qwen2_moe", "qwenmoe": "qwen2_moe",
    "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "deepseekv2": "deepseek_v2", "deepseek": "deepseek_v2",
    "deepseekv3": "deepseek_v3", "gptoss": "gpt_oss", "phimoe": "phimoe", "phi35moe": "phimoe",
    "phi3moe": "phimoe",
}
_ROUTER_PATHS = ("mlp.gate", "mlp.router", "block_sparse_moe.gate", "block_sparse_moe.router",
                 "feed_forward.router")
TINY_VOCAB = 259  # byte-level ids 3..258 for tiny models; 0 = pad, 1 = bos, 2 = eos


def spec_invalid(num_experts: int) -> int:
    """The sentinel of speculative-routing arrays: never a valid expert id."""
    return int(np.iinfo(expert_dtype(num_experts + 1)).max)


def normalize_family(name: str) -> str:
    key = "".join(ch for ch in str(name).lower() if ch.isalnum())
    if key in _ALIASES:
        return _ALIASES[key]
    for alias in sorted(_ALIASES, key=len, reverse=True):
        if key.startswith(alias):
            return _ALIASES[alias]
    raise TraceError(
        f"model family {name!r} is not supported for capture; supported: {', '.join(FAMILIES)}"
    )


def _require_torch():
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise TraceError(
            f"trace capture needs torch and transformers ({exc}); install the extra: "
            f"pip install 'expertsim[torch]'"
        ) from None


# --- tiny random models -------------------------------------------------------------------
def tiny_config(family: str, *, num_layers: int = 3, num_experts: int = 8, top_k: int = 2,
                first_dense_layers: int | None = None, hidden_size: int = 64, seed: int = 0):
    """A tiny random-initialisable transformers config of ``family`` (untrained: its routing is
    degenerate, fine for tests and demos, meaningless as data)."""
    _require_torch()
    import transformers

    family = normalize_family(family)
    heads = 4
    common = dict(vocab_size=TINY_VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=heads,
                  max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  num_experts_per_tok=top_k, tie_word_embeddings=False)
    if family == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=num_experts)
    elif family in ("qwen2_moe", "qwen3_moe"):
        cls = transformers.Qwen2MoeConfig if family == "qwen2_moe" else transformers.Qwen3MoeConfig
        extra = {"shared_expert_intermediate_size": hidden_size} if family == "qwen2_moe" else {}
        cfg = cls(**common, num_experts=num_experts, moe_intermediate_size=hidden_size,
                  decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, **extra)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, num_experts=num_experts)
    elif family in ("deepseek_v2", "deepseek_v3"):
        # DeepSeek's attention in transformers needs as many kv heads as attention heads.
        dense = 1 if first_dense_layers is None else first_dense_layers
        mla = dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
                   v_head_dim=16, moe_intermediate_size=hidden_size, n_shared_experts=1,
                   first_k_dense_replace=dense, n_routed_experts=num_experts)
        if family == "deepseek_v2":
            cfg = transformers.DeepseekV2Config(**common, **mla, topk_method="greedy")
        else:
            groups = 4 if num_experts % 4 == 0 and num_experts // 4 * 2 >= top_k else 1
            cfg = transformers.DeepseekV3Config(**common, **mla, n_group=groups,
                                                topk_group=max(1, groups // 2), norm_topk_prob=True)
    elif family == "gpt_oss":
        # GPT-OSS's YaRN rope expects its full context length (a shorter one triggers a warning).
        common["max_position_embeddings"] = 131072
        cfg = transformers.GptOssConfig(**common, num_local_experts=num_experts, head_dim=hidden_size // heads,
                                        sliding_window=64)
    elif family == "phimoe":
        if top_k != 2:
            raise TraceError(f"Phi-3.5-MoE's sparsemixer router is top-2 only, got top_k={top_k}")
        cfg = transformers.PhimoeConfig(**common, num_local_experts=num_experts)
    else:  # pragma: no cover - normalize_family guards
        raise TraceError(f"unsupported family {family!r}")
    cfg.expertsim_family = family
    return cfg


def tiny_config_from_spec(spec, *, num_layers: int = 4, max_experts: int = 16):
    """A tiny config shaped like a ModelSpec preset: its family, its first dense layers (one
    kept), at most ``max_experts`` experts, top-k scaled down to fit."""
    family = normalize_family(spec.family or spec.name)
    experts = min(spec.num_experts, max_experts)
    top_k = 2 if family == "phimoe" else max(1, min(spec.top_k, experts // 4 if family == "deepseek_v3" else experts // 2))
    dense = 1 if spec.moe_layers[0] > 0 else 0
    return tiny_config(family, num_layers=num_layers, num_experts=experts, top_k=top_k,
                       first_dense_layers=dense)


def build_tiny_model(config, seed: int = 0):
    _require_torch()
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


# --- router discovery ---------------------------------------------------------------------
def _family_of(model) -> str:
    cfg = model.config
    return getattr(cfg, "expertsim_family", None) or normalize_family(getattr(cfg, "model_type", ""))


def find_routers(model) -> list[tuple[int, object]]:
    """(model layer index, router module) of each MoE layer, in order."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise TraceError(f"{type(model).__name__} has no .model.layers; is it a decoder-only causal LM?")
    found = []
    for i, layer in enumerate(layers):
        for path in _ROUTER_PATHS:
            mod = layer
            for part in path.split("."):
                mod = getattr(mod, part, None)
                if mod is None:
                    break
            if mod is not None:
                found.append((i, mod))
                break
    if not found:
        raise TraceError(
            f"no MoE router found in {type(model).__name__} (looked for {', '.join(_ROUTER_PATHS)} "
            f"in each decoder layer); supported families: {', '.join(FAMILIES)}"
        )
    return found


def _split_router_output(out, num_experts: int):
    """(logits [T, E], weights [T, k], ids [T, k]) from a router's output tuple."""
    import torch

    if isinstance(out, torch.Tensor):
        raise TraceError(
            "the router returns only logits (an older transformers?); capture needs routers that "
            "return their chosen ids: upgrade to transformers >= 5"
        )
    tensors = [t for t in out if isinstance(t, torch.Tensor)]
    ids = next((t for t in tensors if not t.is_floating_point()), None)
    floats = [t for t in tensors if t.is_floating_point()]
    logits = next((t for t in floats if t.shape[-1] == num_experts), None)
    weights = next((t for t in floats if ids is not None and t.shape == ids.shape), None)
    if ids is None or weights is None:
        raise TraceError(f"cannot find the chosen ids and weights in the router output {[tuple(t.shape) for t in tensors]}")
    if weights.shape[-1] == num_experts and ids.shape[-1] != num_experts:  # dense scores: gather
        weights = weights.gather(-1, ids)
    return logits, weights, ids


class RoutingRecorder:
    """Hooks that record the routing of every forward pass of ``model`` (a context manager)."""

    def __init__(self, model, *, spec_depth: int = 0, router_probs: bool = False):
        self.model = model
        self.family = _family_of(model)
        self.routers = find_routers(model)
        self.num_layers = len(self.routers)
        cfg = model.config
        self.num_experts = int(next(getattr(cfg, a) for a in ("num_local_experts", "num_experts", "n_routed_experts")
                                    if getattr(cfg, a, None)))
        self.spec_depth = int(spec_depth)
        if self.spec_depth < 0:
            raise TraceError(f"--spec-depth must be >= 0, got {spec_depth}")
        self.router_probs = router_probs
        self.passes: list[dict] = []
        self._handles = []
        self._speculating = False

    def __enter__(self):
        self._handles.append(self.model.register_forward_pre_hook(self._on_pass, with_kwargs=True))
        for idx, (_, mod) in enumerate(self.routers):
            self._handles.append(mod.register_forward_hook(self._make_hook(idx)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _on_pass(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:
            raise TraceError("capture needs input_ids (inputs_embeds-only calls are not supported)")
        s = ids.shape[1]
        valid = np.ones(tuple(ids.shape), dtype=bool) if mask is None else mask[:, -s:].bool().cpu().numpy()
        self.passes.append({"input_ids": ids.detach().cpu().numpy(), "valid": valid, "layers": {}})

    def _make_hook(self, idx: int):
        def hook(module, args, out):
            if self._speculating or not self.passes:
                return
            import torch

            logits, weights, ids = _split_router_output(out, self.num_experts)
            w = weights.detach().float()
            order = torch.argsort(-w, dim=-1, stable=True)
            rec = {"ids": ids.gather(-1, order).cpu().numpy(), "w": w.gather(-1, order).cpu().numpy()}
            if self.router_probs:
                lg = logits.detach().float().reshape(-1, self.num_experts)
                p = lg.sigmoid() if self.family == "deepseek_v3" else lg.softmax(-1)
                rec["probs"] = p.cpu().numpy().astype(np.float16)
            if self.spec_depth:
                hidden = args[0].detach()
                hidden = hidden.reshape(-1, hidden.shape[-1])
                rec["spec"] = {}
                self._speculating = True
                try:
                    with torch.no_grad():
                        for d in range(1, self.spec_depth + 1):
                            if idx + d < self.num_layers:
                                _, sw, sid = _split_router_output(self.routers[idx + d][1](hidden), self.num_experts)
                                so = torch.argsort(-sw.float(), dim=-1, stable=True)
                                rec["spec"][d] = sid.gather(-1, so).cpu().numpy()
                finally:
                    self._speculating = False
            self.passes[-1]["layers"][idx] = rec
        return hook

    def to_trace(self, *, sequences=None, prompt_width: int | None = None, eos_token_id=None,
                 request_offset: int = 0, metadata: dict | None = None) -> RoutingTrace:
        """Assemble the recorded passes (one generate/forward call over a batch) into a trace.
        ``sequences`` (generate's output) and ``eos_token_id`` let decode tokens fed after a
        row's EOS be dropped."""
        if not self.passes:
            raise TraceError("no forward pass was recorded")
        batch = self.passes[0]["input_ids"].shape[0]
        prompt_len = self.passes[0]["valid"].sum(axis=1)
        eos = set(np.atleast_1d(eos_token_id).tolist()) if eos_token_id is not None else set()
        k = next(iter(self.passes[0]["layers"].values()))["ids"].shape[-1]
        per_row: list[list] = [[] for _ in range(batch)]
        for p, rec in enumerate(self.passes):
            missing = [i for i in range(self.num_layers) if i not in rec["layers"]]
            if missing:
                raise TraceError(f"pass {p} recorded no routing at MoE layers {missing}")
            b_, s = rec["input_ids"].shape
            valid = rec["valid"].copy()
            if p > 0 and sequences is not None and eos and prompt_width is not None:
                # Pass p feeds generated token p-1; drop it if it, or an earlier one, was EOS.
                gen = sequences[:, prompt_width: prompt_width + p]
                done = np.isin(gen, list(eos)).any(axis=1)
                valid &= ~done[:, None]
            for b in range(b_):
                cols = np.flatnonzero(valid[b])
                if len(cols) == 0:
                    continue
                rows = b * s + cols
                layers = rec["layers"]
                entry = {
                    "experts": np.stack([layers[i]["ids"][rows] for i in range(self.num_layers)], axis=1),
                    "weights": np.stack([layers[i]["w"][rows] for i in range(self.num_layers)], axis=1),
                    "token_id": rec["input_ids"][b, cols],
                    "step": p,
                    "position": (np.arange(len(cols)) if p == 0 else np.array([prompt_len[b] + p - 1])),
                    "phase": PREFILL if p == 0 else DECODE,
                }
                if self.router_probs:
                    entry["probs"] = np.stack([layers[i]["probs"][rows] for i in range(self.num_layers)], axis=1)
                if self.spec_depth:
                    sdt = expert_dtype(self.num_experts + 1)
                    for d in range(1, self.spec_depth + 1):
                        arr = np.full((len(rows), self.num_layers, k), spec_invalid(self.num_experts), dtype=sdt)
                        for i in range(self.num_layers - d):
                            arr[:, i] = layers[i]["spec"][d][rows]
                        entry[f"spec_d{d}"] = arr
                per_row[b].append(entry)
        parts = [(request_offset + b, e) for b in range(batch) for e in per_row[b]]
        if not parts:
            raise TraceError("every recorded token was padding")
        cat = lambda key: np.concatenate([e[key] for _, e in parts])  # noqa: E731
        n_of = [len(e["token_id"]) for _, e in parts]
        extras = {}
        if self.router_probs:
            extras["router_probs"] = cat("probs")
        for d in range(1, self.spec_depth + 1):
            extras[f"spec_d{d}"] = cat(f"spec_d{d}")
        meta = {"num_experts": str(self.num_experts), "family": self.family, **(metadata or {})}
        if self.spec_depth:
            meta["spec_invalid"] = str(spec_invalid(self.num_experts))
        return RoutingTrace(
            experts=cat("experts").astype(expert_dtype(self.num_experts)),
            request=np.repeat([r for r, _ in parts], n_of),
            step=np.repeat([e["step"] for _, e in parts], n_of),
            position=cat("position"),
            phase=np.repeat([e["phase"] for _, e in parts], n_of),
            num_experts=self.num_experts,
            token_id=cat("token_id"),
            weights=cat("weights"),
            metadata=meta,
            extras=extras,
        )


def capture_batch(model, prompts: list[list[int]], *, max_new_tokens: int = 16, pad_token_id: int = 0,
                  eos_token_id=None, spec_depth: int = 0, router_probs: bool = False,
                  request_offset: int = 0, metadata: dict | None = None) -> RoutingTrace:
    """Route one left-padded batch of token-id prompts: prefill, then greedy decode of
    ``max_new_tokens`` tokens (0: prefill only, a plain forward)."""
    _require_torch()
    import torch

    if not prompts or any(len(p) == 0 for p in prompts):
        raise TraceError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    model.eval()  # routers add jitter noise (Mixtral, Phi-MoE) or sample (sparsemixer) in training mode
    rec = RoutingRecorder(model, spec_depth=spec_depth, router_probs=router_probs)
    sequences = None
    with rec, torch.no_grad():
        if max_new_tokens > 0:
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                                 use_cache=True)
            sequences = out.cpu().numpy()
        else:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
    return rec.to_trace(sequences=sequences, prompt_width=width, eos_token_id=eos_token_id,
                        request_offset=request_offset, metadata=metadata)


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-empty line) or JSONL (``prompt`` or ``text`` field)."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"prompt file {str(path)!r} does not exist")
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix == ".jsonl":
        prompts = []
        for i, ln in enumerate(lines, 1):
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}:{i}: not JSON ({exc}); a .jsonl prompt file has one object per line") from None
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise TraceError(f"{path}:{i}: no string 'prompt' or 'text' field in {ln[:60]!r}")
            prompts.append(text)
    else:
        prompts = lines
    if not prompts:
        raise TraceError(f"prompt file {str(path)!r} has no prompts")
    return prompts


def byte_tokens(text: str, max_tokens: int) -> list[int]:
    """Byte-level ids for tiny models (no tokenizer): bos, then byte + 3."""
    return [1] + [b + 3 for b in text.encode()[: max_tokens - 1]]


def capture(model, prompts: list[list[int]], *, batch_size: int = 4, **kwargs) -> RoutingTrace:
    """Capture ``prompts`` (token ids) in batches; requests are numbered in prompt order."""
    from expertsim.traces.ops import concat

    if batch_size < 1:
        raise TraceError(f"--batch-size must be >= 1, got {batch_size}")
    parts = [capture_batch(model, prompts[i: i + batch_size], request_offset=i, **kwargs)
             for i in range(0, len(prompts), batch_size)]
    return concat(parts)


def capture_from_files(*, prompts_path: str | Path, model_path: str | Path | None = None,
                       tiny: str | None = None, max_new_tokens: int = 16, max_prompt_tokens: int = 256,
                       batch_size: int = 4, spec_depth: int = 0, router_probs: bool = False,
                       seed: int = 0) -> RoutingTrace:
    """The `expertsim trace capture` entry: a local checkpoint (offline) or a tiny random model
    shaped like a ModelSpec preset (``tiny``: a preset name)."""
    _require_torch()
    texts = read_prompts(prompts_path)
    if (model_path is None) == (tiny is None):
        raise TraceError("give exactly one of --model-path DIR (a local checkpoint) or --tiny PRESET")
    if tiny is not None:
        from expertsim.specs import load_model

        spec = load_model(tiny)
        model = build_tiny_model(tiny_config_from_spec(spec), seed=seed)
        prompts = [byte_tokens(t, max_prompt_tokens) for t in texts]
        meta = {"model": f"tiny-{spec.name}", "untrained": "true",
                "source": f"capture: tiny random-initialised {spec.family or spec.name} config shaped like "
                          f"preset {spec.name} (untrained: routing is degenerate, not data)"}
        return capture(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       pad_token_id=0, eos_token_id=None, spec_depth=spec_depth,
                       router_probs=router_probs, metadata=meta)
    import transformers

    path = Path(model_path)
    if not path.is_dir():
        raise TraceError(f"--model-path {str(path)!r} is not a directory with a checkpoint (config.json)")
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype="auto")
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [tok(t, add_special_tokens=True)["input_ids"][:max_prompt_tokens] for t in texts]
    meta = {"model": path.name, "model_path": str(path),
            "source": f"capture: {path.name} on {Path(prompts_path).name}, greedy decode {max_new_tokens} tokens"}
    return capture(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                   pad_token_id=pad, eos_token_id=tok.eos_token_id, spec_depth=spec_depth,
                   router_probs=router_probs, metadata=meta)
