"""Capture from tiny random transformers models of the eight supported families (offline)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="capture needs the torch extra")
transformers = pytest.importorskip("transformers", reason="capture needs the torch extra")

from expertsim.errors import TraceError  # noqa: E402
from expertsim.traces.capture import (  # noqa: E402
    FAMILIES,
    build_tiny_model,
    capture,
    capture_batch,
    find_routers,
    spec_invalid,
    tiny_config,
    tiny_config_from_spec,
)

pytestmark = pytest.mark.torch

CONFIG_CLASS = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
                "olmoe": "OlmoeConfig", "deepseek_v2": "DeepseekV2Config", "deepseek_v3": "DeepseekV3Config",
                "gpt_oss": "GptOssConfig", "phimoe": "PhimoeConfig"}
# Families whose choice is a plain top-k of the logits (softmax is monotone): recomputable.
RECOMPUTABLE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "gpt_oss", "phimoe"}
TOP_K = {"phimoe": 2, "deepseek_v3": 2}
_MODELS: dict = {}


def tiny(family):
    if not hasattr(transformers, CONFIG_CLASS[family]):
        pytest.skip(f"transformers {transformers.__version__} has no {CONFIG_CLASS[family]}")
    if family not in _MODELS:
        # DeepSeek keeps its first layer dense: 4 layers give 3 MoE layers like the others.
        cfg = tiny_config(family, num_layers=4 if family.startswith("deepseek") else 3,
                          num_experts=8, top_k=TOP_K.get(family, 3))
        _MODELS[family] = build_tiny_model(cfg, seed=0)
    return _MODELS[family]


class RawRouterLog:
    """An independent hook: the raw (ids, weights, input) of every router call."""

    def __init__(self, model):
        self.calls = {i: [] for i in range(len(find_routers(model)))}
        self.handles = [mod.register_forward_hook(self._hook(i)) for i, (_, mod) in enumerate(find_routers(model))]

    def _hook(self, i):
        def hook(module, args, out):
            self.calls[i].append((out[2].detach().clone(), out[1].detach().float().clone(), args[0].detach().clone()))
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def sorted_pairs(ids, weights):
    order = np.argsort(ids, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.take_along_axis(weights, order, -1)


PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.mark.parametrize("family", FAMILIES)
def test_ids_and_weights_equal_router_output(family):
    model = tiny(family)
    raw = RawRouterLog(model)
    try:
        tr = capture_batch(model, [PROMPT], max_new_tokens=4, router_probs=True)
    finally:
        raw.close()
    L = len(find_routers(model))
    assert tr.num_layers == L and tr.num_tokens == len(PROMPT) + 3  # the last new token is never fed
    assert (tr.phase == 0).sum() == len(PROMPT) and tr.step.tolist() == [0] * len(PROMPT) + [1, 2, 3]
    assert tr.token_id[: len(PROMPT)].tolist() == PROMPT
    for l in range(L):
        ids = torch.cat([c[0] for c in raw.calls[l]]).numpy()
        w = torch.cat([c[1] for c in raw.calls[l]]).numpy()
        want_ids, want_w = sorted_pairs(ids, w)
        got_ids, got_w = sorted_pairs(tr.experts[:, l].astype(np.int64), tr.weights[:, l])
        assert np.array_equal(got_ids, want_ids), (family, l)
        assert np.allclose(got_w, want_w, atol=1e-6), (family, l)
    # Best first by gate weight.
    assert (np.diff(tr.weights, axis=2) <= 1e-7).all()
    probs = tr.extras["router_probs"].astype(np.float32)
    assert probs.shape == (tr.num_tokens, L, 8)
    if family != "deepseek_v3":
        assert np.allclose(probs.sum(axis=2), 1.0, atol=1e-2)


@pytest.mark.parametrize("family", sorted(RECOMPUTABLE))
def test_hooks_agree_with_output_router_logits(family):
    model = tiny(family)
    tr = capture_batch(model, [PROMPT], max_new_tokens=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([PROMPT]), output_router_logits=True)
    k = tr.top_k
    for l, logits in enumerate(out.router_logits):
        want = torch.topk(logits.float(), k, dim=-1).indices.sort(-1).values.numpy()
        got = np.sort(tr.experts[:, l].astype(np.int64), axis=1)
        assert np.array_equal(got, want), (family, l)


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_routing_shape_and_values(family):
    model = tiny(family)
    routers = [m for _, m in find_routers(model)]
    raw = RawRouterLog(model)
    try:
        tr = capture_batch(model, [PROMPT[:4]], max_new_tokens=3, spec_depth=2)
    finally:
        raw.close()
    L, k = tr.num_layers, tr.top_k
    bad = spec_invalid(8)
    for d in (1, 2):
        spec = tr.extras[f"spec_d{d}"]
        assert spec.shape == (tr.num_tokens, L, k)
        assert (spec[:, L - d:] == bad).all() and (spec[:, : L - d] < 8).all()
    # Recompute: router 1 and router 2 on the hidden states router 0 saw (router 0 is never
    # called speculatively, so its calls are the real passes; one prompt, no padding).
    hidden = torch.cat([c[2].reshape(-1, c[2].shape[-1]) for c in raw.calls[0]])
    assert hidden.shape[0] == tr.num_tokens
    with torch.no_grad():
        for d in (1, 2):
            want = routers[d](hidden)[2].numpy()
            assert np.array_equal(np.sort(tr.extras[f"spec_d{d}"][:, 0], axis=1), np.sort(want, axis=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_records_no_padding(family):
    model = tiny(family)
    long, short = [1, 30, 31, 32, 33, 34], [1, 50]
    batch = capture_batch(model, [long, short], max_new_tokens=3, pad_token_id=0)
    assert batch.num_tokens == len(long) + len(short) + 2 * 2
    # Prefill holds exactly the prompts' tokens (the pad id 0 never appears; a random model may
    # still generate id 0 later, which is a real token).
    assert batch.token_id[batch.phase == 0].tolist() == long + short
    r1 = batch.select(batch.request == 1)
    assert r1.position.tolist() == [0, 1, 2, 3] and r1.token_id[:2].tolist() == short
    alone = capture_batch(model, [short], max_new_tokens=3)
    same = (np.sort(alone.experts, axis=2) == np.sort(r1.experts, axis=2)).all(axis=2)
    assert same.mean() >= 0.9, same  # padding is masked out: routing as if alone (up to float ties)


def test_tokens_after_eos_are_dropped():
    model = tiny("mixtral")
    prompts = [[1, 60, 61], [1, 70, 71, 72]]
    with torch.no_grad():
        first = [int(model.generate(input_ids=torch.tensor([p]), max_new_tokens=1, do_sample=False,
                                    pad_token_id=0)[0, -1]) for p in prompts]
    if first[0] == first[1]:
        pytest.skip("both prompts start with the same greedy token")
    tr = capture_batch(model, prompts, max_new_tokens=4, eos_token_id=first[0])
    r0 = tr.select(tr.request == 0)
    assert (r0.phase == 1).sum() == 0 and first[0] not in tr.token_id[tr.phase == 1].tolist()
    assert (tr.select(tr.request == 1).phase == 1).sum() >= 1


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "deepseek-v3", "qwen1.5-moe-a2.7b", "gpt-oss-20b",
                                    "phi-3.5-moe", "olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v2-lite"])
def test_tiny_configs_from_presets(preset):
    from expertsim.specs import list_models, load_model

    if preset not in list_models():
        pytest.skip(f"preset {preset} not shipped yet")
    spec = load_model(preset)
    cfg = tiny_config_from_spec(spec)
    model = build_tiny_model(cfg)
    tr = capture(model, [[1, 5, 6], [1, 7]], batch_size=2, max_new_tokens=2, spec_depth=1)
    moe = len(spec.moe_layers)
    assert tr.num_layers == (3 if spec.moe_layers[0] > 0 else 4) and moe > 0
    assert tr.num_experts == min(spec.num_experts, 16)
    tr.validate()


def test_unsupported_family_and_missing_torch():
    with pytest.raises(TraceError, match="supported: mixtral"):
        tiny_config("llama4")
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "import expertsim.traces.capture as c\n"
            "try:\n    c.tiny_config('mixtral')\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.startswith("TraceError") and "pip install 'expertsim[torch]'" in out


def test_cli_capture_tiny(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n{"text": "a second prompt"}\n')
    out = tmp_path / "c.parquet"
    from typer.testing import CliRunner

    from expertsim.cli import app

    r = CliRunner().invoke(app, ["trace", "capture", "--prompts", str(prompts), "--tiny", "mixtral-8x7b",
                                 "--max-new-tokens", "3", "--spec-depth", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    from expertsim.traces import read_trace

    tr = read_trace(out)
    assert tr.metadata["untrained"] == "true" and "spec_d1" in tr.extras
    assert tr.num_requests == 2 and (tr.phase == 1).sum() == 4
    assert (tr.phase == 0).sum() == len("hello there") + 1 + len("a second prompt") + 1


def test_capture_from_a_local_checkpoint_offline(tmp_path):
    """--model-path: a saved checkpoint with its tokenizer, loaded with local_files_only."""
    tokenizers = pytest.importorskip("tokenizers")
    from expertsim.traces.capture import capture_from_files

    words = ["<pad>", "<s>", "</s>", "<unk>", "hello", "world", "the", "cat"] + [f"w{i}" for i in range(40)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>")
    cfg = tiny_config("qwen3_moe", num_layers=2, num_experts=8, top_k=2)
    cfg.vocab_size = len(words)
    ckpt = tmp_path / "ckpt"
    build_tiny_model(cfg).save_pretrained(ckpt)
    fast.save_pretrained(ckpt)
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world the cat\n\nthe cat\n")
    tr = capture_from_files(prompts_path=prompts, model_path=ckpt, max_new_tokens=3, batch_size=2)
    assert tr.num_requests == 2 and tr.metadata["model"] == "ckpt"
    assert tr.token_id[tr.phase == 0].tolist() == [4, 5, 6, 7, 6, 7]
    with pytest.raises(TraceError, match="exactly one of --model-path"):
        capture_from_files(prompts_path=prompts, model_path=ckpt, tiny="mixtral-8x7b")
    with pytest.raises(TraceError, match="not a directory"):
        capture_from_files(prompts_path=prompts, model_path=tmp_path / "none")


def test_spec_sentinel_is_never_a_valid_id():
    assert spec_invalid(8) == 255 and spec_invalid(255) == 255
    assert spec_invalid(256) == 65535  # DeepSeek-V3: ids 0..255 fill uint8, so uint16
