"""Specs: every preset loads, derived sizes match hand arithmetic, published totals agree, and bad
input fails with a message that names the bad value."""
from __future__ import annotations

import dataclasses
import re
import sys
from importlib import resources

import pytest
from typer.testing import CliRunner

from expertsim.cli import app

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
from expertsim.errors import SpecError
from expertsim.specs import (
    apply_overrides,
    dtype_bits,
    hardware_from_dict,
    list_hardware,
    list_models,
    load_hardware,
    load_model,
    model_from_dict,
    parse_set_options,
)

MODELS = [
    "deepseek-v2-lite", "deepseek-v3", "gpt-oss-20b", "llama4-maverick", "mixtral-8x22b",
    "mixtral-8x7b", "olmoe-1b-7b", "phi-3.5-moe", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b",
    "switch-base-128",
]
HARDWARE = ["a100-80gb-pcie", "a40", "gh200", "h100-pcie", "h200", "l4", "rtx3060", "rtx4090", "t4"]

# Published total parameter counts, as the source writes them ("7B" is rounded to whole billions).
PUBLISHED_TOTALS = {
    "mixtral-8x7b": ("46.7B", "Mixtral paper, arXiv 2401.04088"),
    "mixtral-8x22b": ("141B", "Mistral AI release post mistral.ai/news/mixtral-8x22b"),
    "qwen1.5-moe-a2.7b": ("14.3B", "Qwen blog qwenlm.github.io/blog/qwen-moe"),
    "qwen3-30b-a3b": ("30.5B", "hf:Qwen/Qwen3-30B-A3B model card"),
    "deepseek-v2-lite": ("15.7B", "DeepSeek-V2 paper, arXiv 2405.04434"),
    "deepseek-v3": ("671B", "DeepSeek-V3 report, arXiv 2412.19437 (main model, without MTP)"),
    "olmoe-1b-7b": ("6.9B", "OLMoE paper, arXiv 2409.02060"),
    "switch-base-128": ("7B", "Switch Transformers paper, arXiv 2101.03961, Table 9"),
    "phi-3.5-moe": ("42B", "Phi-3 report, arXiv 2404.14219"),
    "gpt-oss-20b": ("20.91B", "gpt-oss model card, arXiv 2508.10925"),
    "llama4-maverick": ("400B", "Meta Llama 4 model card (text model; vision encoder not counted)"),
}
# Presets whose dense weights are stored in another dtype than the experts: dense_params there is
# the byte-equivalent count in the model's dtype, so the true count is dense_bytes / that dtype.
DENSE_STORAGE_DTYPE = {"gpt-oss-20b": "bf16"}

MIB = 2**20


def _preset_text(kind: str, name: str) -> str:
    return (resources.files("expertsim.specs") / "presets" / kind / f"{name}.toml").read_text()


def _published(text: str) -> tuple[float, float]:
    """'20.91B' -> (20.91e9, 0.005e9): the value and half a unit of its last written digit."""
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?B", text)
    assert match, text
    decimals = len(match.group(2) or "")
    return float(text[:-1]) * 1e9, 0.5 * 10.0 ** -decimals * 1e9


def _total_params(spec) -> float:
    dense = spec.dense_params
    if spec.name in DENSE_STORAGE_DTYPE:
        dense = spec.dense_bytes / (dtype_bits(DENSE_STORAGE_DTYPE[spec.name]) / 8)
    return dense + spec.num_experts * spec.num_moe_layers * spec.expert_params


# --- every preset loads --------------------------------------------------------------------------
def test_preset_lists_hold_every_shipped_name():
    assert set(MODELS) <= set(list_models())
    assert set(HARDWARE) <= set(list_hardware())


@pytest.mark.parametrize("name", MODELS)
def test_model_preset_loads_with_its_own_name_and_a_source(name):
    spec = load_model(name)
    assert spec.name == name
    assert spec.source.startswith("hf:")
    assert spec.num_moe_layers >= 1
    assert spec.expert_bytes() > 0
    assert spec.kv_bytes_per_token > 0
    # dense_params holds every weight that is not a routed expert, shared experts included
    assert spec.dense_params > spec.shared_expert_params * spec.num_moe_layers


@pytest.mark.parametrize("name", HARDWARE)
def test_hardware_preset_loads_with_one_h2d_copy_engine(name):
    spec = load_hardware(name)
    assert spec.name == name
    assert spec.link.copy_engines == 1
    assert spec.link.bandwidth_gbps > 0
    assert spec.gpu.peak_flops("bf16") > 0  # T4 has no bf16 entry and falls back to fp16


# --- derived sizes against hand arithmetic -------------------------------------------------------
def test_mixtral_8x7b_expert_is_336_mib():
    spec = load_model("mixtral-8x7b")
    assert spec.expert_params == 3 * 4096 * 14336
    assert spec.expert_bytes() == 3 * 4096 * 14336 * 2 == 336 * MIB
    assert spec.moe_layers == tuple(range(32))
    assert spec.total_expert_bytes == 32 * 8 * 336 * MIB
    assert spec.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2


def test_deepseek_v2_lite_layer_0_is_dense_and_26_layers_are_moe():
    spec = load_model("deepseek-v2-lite")
    assert spec.num_layers == 27
    assert spec.moe_layers == tuple(range(1, 27))
    assert 0 not in spec.moe_layers
    assert spec.num_moe_layers == 26
    assert spec.expert_bytes() == 3 * 2048 * 1408 * 2
    assert spec.shared_expert_params == 2 * 3 * 2048 * 1408
    assert spec.total_expert_bytes == 26 * 64 * 3 * 2048 * 1408 * 2
    assert spec.kv_bytes_per_token == (512 + 64) * 27 * 2  # MLA latent + RoPE key


def test_llama4_maverick_has_24_moe_layers_at_odd_indices():
    spec = load_model("llama4-maverick")
    assert spec.moe_layers == tuple(range(1, 48, 2))
    assert spec.num_moe_layers == 24
    assert all(layer % 2 == 1 for layer in spec.moe_layers)
    assert spec.expert_bytes() == 3 * 5120 * 8192 * 2 == 240 * MIB
    assert spec.shared_expert_params == 3 * 5120 * 8192


def test_deepseek_v3_has_58_moe_layers_of_fp8_experts():
    spec = load_model("deepseek-v3")
    assert spec.moe_layers == tuple(range(3, 61))
    assert spec.expert_bytes() == 3 * 7168 * 2048 * 1  # fp8: 1 byte per parameter
    assert spec.expert_bytes("bf16") == 2 * spec.expert_bytes()


def test_switch_base_128_has_two_matrix_fp32_experts_in_every_other_layer():
    spec = load_model("switch-base-128")
    assert spec.moe_layers == tuple(range(1, 24, 2))
    assert spec.expert_params == 2 * 768 * 3072
    assert spec.expert_bytes() == 2 * 768 * 3072 * 4 == 18 * MIB


def test_gpt_oss_20b_mxfp4_experts_count_their_biases():
    spec = load_model("gpt-oss-20b")
    assert spec.expert_params == 3 * 2880 * 2880 + 3 * 2880
    assert spec.expert_bytes() == round(spec.expert_params * 4.25 / 8)
    # dense weights are BF16: 1,797,824,064 params = 3.596e9 bytes, whatever the experts' dtype
    assert spec.dense_bytes == pytest.approx(1_797_824_064 * 2, abs=2)


@pytest.mark.parametrize("name", sorted(PUBLISHED_TOTALS))
def test_total_params_match_the_published_total(name):
    published_text, _source = PUBLISHED_TOTALS[name]
    published, rounding = _published(published_text)
    total = _total_params(load_model(name))
    # within 3%, or within the rounding of the published figure ("7B" means 6.5e9..7.5e9)
    assert abs(total - published) <= max(0.03 * published, rounding), (name, total, published)


# --- a user's own TOML file ----------------------------------------------------------------------
def test_user_model_toml_loads_like_the_preset(tmp_path):
    text = _preset_text("models", "mixtral-8x7b").replace('name = "mixtral-8x7b"', 'name = "my-mixtral"')
    path = tmp_path / "my-mixtral.toml"
    path.write_text(text)
    mine = load_model(path)
    assert mine.name == "my-mixtral"
    assert dataclasses.replace(mine, name="mixtral-8x7b") == load_model("mixtral-8x7b")
    assert load_model(str(path)) == mine


def test_user_hardware_toml_loads_like_the_preset(tmp_path):
    text = _preset_text("hardware", "a40").replace("bandwidth_gbps = 24.0", "bandwidth_gbps = 31.5")
    path = tmp_path / "my-box.toml"
    path.write_text(text)
    mine = load_hardware(path)
    assert mine.link.bandwidth_gbps == 31.5
    assert mine.gpu == load_hardware("a40").gpu


def test_missing_user_toml_is_reported(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_model(tmp_path / "nope.toml")


# --- errors with clear messages ------------------------------------------------------------------
def test_unknown_model_preset_lists_the_known_names():
    with pytest.raises(SpecError) as info:
        load_model("mixtral-8x7")
    message = str(info.value)
    assert "'mixtral-8x7'" in message
    assert "Did you mean mixtral-8x7b" in message
    for name in MODELS:
        assert name in message


def test_unknown_hardware_preset_lists_the_known_names():
    with pytest.raises(SpecError) as info:
        load_hardware("b200")
    for name in HARDWARE:
        assert name in str(info.value)


def _hardware_dict(**link):
    return {
        "name": "box",
        "gpu": {"memory_gb": 24.0, "hbm_bandwidth_gbps": 1000.0, "tflops": {"bf16": 100.0}},
        "link": {"kind": "pcie4-x16", "bandwidth_gbps": 24.0, **link},
        "cpu": {"tflops": 1.0, "memory_bandwidth_gbps": 80.0},
    }


def test_negative_bandwidth_is_rejected():
    assert hardware_from_dict(_hardware_dict()).link.bandwidth_gbps == 24.0
    with pytest.raises(SpecError, match=r"bandwidth_gbps must be a positive number, got -1"):
        hardware_from_dict(_hardware_dict(bandwidth_gbps=-1.0))
    with pytest.raises(SpecError, match=r"bandwidth_gbps must be a positive number, got -5"):
        apply_overrides(load_model("mixtral-8x7b"), load_hardware("a40"), {"link.bandwidth_gbps": "-5"})


def _mixtral_dict(**changes):
    data = tomllib.loads(_preset_text("models", "mixtral-8x7b"))
    data.update(changes)
    return data


def test_top_k_above_num_experts_is_rejected():
    assert model_from_dict(_mixtral_dict(top_k=8)).top_k == 8
    with pytest.raises(SpecError, match=r"top_k=9 exceeds num_experts=8"):
        model_from_dict(_mixtral_dict(top_k=9))
    with pytest.raises(SpecError, match=r"top_k=9 exceeds num_experts=8"):
        apply_overrides(load_model("mixtral-8x7b"), load_hardware("a40"), {"model.top_k": "9"})


def test_moe_layers_out_of_range_are_rejected():
    assert model_from_dict(_mixtral_dict(moe_layers=[0, 31])).moe_layers == (0, 31)
    with pytest.raises(SpecError, match=r"moe_layers \[32\] are outside 0\.\.31"):
        model_from_dict(_mixtral_dict(moe_layers=[0, 32]))
    with pytest.raises(SpecError, match=r"moe_layers \[-1\] are outside"):
        model_from_dict(_mixtral_dict(moe_layers=[-1, 3]))


def test_unknown_fields_are_rejected_by_name():
    with pytest.raises(SpecError, match=r"unknown field\(s\) \['num_expert'\]"):
        model_from_dict(_mixtral_dict(num_expert=8))
    with pytest.raises(SpecError, match=r"\[link\]: unknown field\(s\) \['bandwith_gbps'\]"):
        hardware_from_dict(_hardware_dict(bandwith_gbps=24.0))


def test_override_changes_only_the_named_number():
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a40")
    new_model, new_hardware = apply_overrides(model, hardware, parse_set_options(["link.bandwidth_gbps=64"]))
    assert new_hardware.link.bandwidth_gbps == 64.0
    assert isinstance(new_hardware.link.bandwidth_gbps, float)
    assert new_model == model
    before, after = dataclasses.asdict(hardware), dataclasses.asdict(new_hardware)
    changed = {(part, key) for part in before if isinstance(before[part], dict)
               for key in before[part] if before[part][key] != after[part][key]}
    assert changed == {("link", "bandwidth_gbps")}
    assert hardware.link.bandwidth_gbps == 24.0  # the original is untouched


def test_override_with_a_bad_key_names_the_key():
    model, hardware = load_model("mixtral-8x7b"), load_hardware("a40")
    with pytest.raises(SpecError, match=r"--set link\.bandwith_gbps: .*Did you mean bandwidth_gbps"):
        apply_overrides(model, hardware, parse_set_options(["link.bandwith_gbps=64"]))
    with pytest.raises(SpecError, match=r"--set pcie\.bandwidth_gbps: keys start with model\."):
        apply_overrides(model, hardware, {"pcie.bandwidth_gbps": "64"})
    with pytest.raises(SpecError, match=r"--set 'link\.bandwidth_gbps': expected KEY=VALUE"):
        parse_set_options(["link.bandwidth_gbps"])
    with pytest.raises(SpecError, match=r"--set link\.bandwidth_gbps='fast': not a number"):
        apply_overrides(model, hardware, {"link.bandwidth_gbps": "fast"})


# --- the CLI -------------------------------------------------------------------------------------
def test_cli_specs_list_prints_every_preset():
    result = CliRunner().invoke(app, ["specs", "list"])
    assert result.exit_code == 0, result.output
    for name in MODELS + HARDWARE:
        assert name in result.output


def test_cli_specs_show_prints_the_preset_and_its_sources():
    result = CliRunner().invoke(app, ["specs", "show", "mixtral-8x7b"])
    assert result.exit_code == 0, result.output
    assert "# ModelSpec mixtral-8x7b" in result.output
    assert "num_experts = 8" in result.output
    assert "'expert_MiB': 336.0" in result.output
    assert "# num_hidden_layers" in result.output  # the preset file's source comments


def test_layout_and_missing_field_errors_name_the_field():
    from expertsim.errors import SpecError
    from expertsim.specs import hardware_from_dict, load_hardware, model_from_dict, load_model
    import dataclasses

    base = {f.name: getattr(load_model("mixtral-8x7b"), f.name)
            for f in dataclasses.fields(load_model("mixtral-8x7b"))}
    base.pop("moe_layers")
    with pytest.raises(SpecError, match=r"moe_layer_step must be an integer >= 1, got 0"):
        model_from_dict({**base, "moe_layer_step": 0})
    with pytest.raises(SpecError, match=r"either an explicit moe_layers list or"):
        model_from_dict({**base, "moe_layers": [0, 1], "first_dense_layers": 1})
    hw = load_hardware("a40")
    gpu = dataclasses.asdict(hw.gpu)
    gpu.pop("memory_gb")
    with pytest.raises(SpecError, match=r"\[gpu\].*memory_gb"):
        hardware_from_dict({"name": "x", "gpu": gpu, "link": dataclasses.asdict(hw.link),
                            "cpu": dataclasses.asdict(hw.cpu)})
    with pytest.raises(SpecError, match=r"--set gpu.tflops.bf16=VALUE"):
        dataclasses.replace(hw.gpu, tflops={"bf16": -1.0})


def test_cpu_gemm_rate_comes_from_the_spec_else_the_instruction_set():
    from expertsim.specs.hardware import CpuSpec

    spr = CpuSpec(tflops=4.5, memory_bandwidth_gbps=245.0, isa=("avx512", "avx512_vnni", "avx512_bf16", "amx"))
    assert spr.gemm_rate("int8")[0] == pytest.approx(18.0)  # VNNI: 4 x fp32
    assert spr.gemm_rate("bf16")[0] == pytest.approx(72.0)  # AMX-BF16: 16 x fp32
    assert "AMX-BF16" in spr.gemm_rate("bf16")[1]
    skylake = CpuSpec(tflops=1.4, memory_bandwidth_gbps=120.0, isa=("avx2", "avx512"))
    assert skylake.gemm_rate("bf16")[0] == pytest.approx(0.14)  # software conversion
    assert skylake.gemm_rate("int8")[0] == pytest.approx(1.4)
    given = CpuSpec(tflops=1.4, memory_bandwidth_gbps=120.0, isa=("avx512",), tflops_by_dtype={"bf16": 0.5})
    assert given.gemm_rate("bf16") == (0.5, "cpu.tflops_by_dtype.bf16")  # the spec wins
    bare = CpuSpec(tflops=2.0, memory_bandwidth_gbps=100.0)  # no isa: nothing to derive, the fp32 rate
    assert bare.gemm_rate("bf16")[0] == 2.0 and bare.gemm_rate("int8")[0] == 2.0
    assert bare.gemm_flops("fp32") == 2.0e12


def test_cpu_isa_names_are_checked():
    from expertsim.specs.hardware import CpuSpec

    assert CpuSpec(tflops=1.0, memory_bandwidth_gbps=10.0, isa=("AVX512-VNNI",)).isa == ("avx512_vnni",)
    with pytest.raises(SpecError, match="unknown isa feature 'avx512vnni' .did you mean avx512_vnni"):
        CpuSpec(tflops=1.0, memory_bandwidth_gbps=10.0, isa=("avx512vnni",))
