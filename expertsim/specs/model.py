"""ModelSpec: the shape of an MoE model, as far as offloading cares."""
from __future__ import annotations

from dataclasses import dataclass, field

from expertsim.errors import SpecError

# Bits per parameter of each storage dtype an expert may be kept in.
DTYPE_BITS = {
    "fp32": 32,
    "bf16": 16,
    "fp16": 16,
    "fp8": 8,
    "int8": 8,
    "int4": 4,
    "fp4": 4,
    "mxfp4": 4.25,  # 4-bit values + one 8-bit shared exponent per 32 values (OCP MX spec)
    "int3": 3,
    "int2": 2,
}


def dtype_bits(dtype: str) -> float:
    try:
        return DTYPE_BITS[dtype]
    except KeyError:
        raise SpecError(
            f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPE_BITS))}"
        ) from None


@dataclass(frozen=True)
class ModelSpec:
    """An MoE transformer's shape.

    Layers are numbered 0..num_layers-1 in the model; ``moe_layers`` lists the ones that have
    routed experts (DeepSeek's first layer is dense, Llama-4-Maverick interleaves). A trace's
    layer index i means the i-th MoE layer, ``moe_layers[i]`` in the model.
    """

    name: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    d_model: int
    d_ff_expert: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dense_params: int
    kv_bytes_per_token: int
    dtype: str = "bf16"
    num_shared_experts: int = 0
    d_ff_shared: int = 0
    d_ff_dense: int = 0
    expert_matrices: int = 3  # SwiGLU: w1, w3, w2; a plain ReLU FFN (Switch) has 2
    expert_params_override: int = 0  # for experts with biases etc.; 0 = matrices*d_model*d_ff
    # Storage bits per weight, fractional for grouped quantisation (scales and zeros included):
    # HQQ 2-bit group 16 with 8-bit scale/zero = 3.0, HQQ 3-bit group 64 = 3.45, HQQ 4-bit group 64
    # = 4.25, GGUF Q4_K_M ~4.5-4.8, Q8_0 8.5, MXFP4 4.25. 0 = the bits of ``dtype``.
    expert_bits: float = 0.0  # routed experts (what crosses the link and what a cache slot holds)
    dense_bits: float = 0.0  # every other weight (attention, norms, embeddings, shared experts)
    kv_bits: float = 0.0  # KV cache entries (kv_bytes_per_token is given at ``dtype``)
    family: str = ""
    source: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_experts", "top_k", "d_model", "d_ff_expert",
                     "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise SpecError(f"model {self.name!r}: {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise SpecError(
                f"model {self.name!r}: top_k={self.top_k} exceeds num_experts={self.num_experts}"
            )
        if not self.moe_layers:
            raise SpecError(f"model {self.name!r}: moe_layers is empty; list the layers that have experts")
        bad = [layer for layer in self.moe_layers if not 0 <= layer < self.num_layers]
        if bad:
            raise SpecError(
                f"model {self.name!r}: moe_layers {bad} are outside 0..{self.num_layers - 1}"
            )
        if list(self.moe_layers) != sorted(set(self.moe_layers)):
            raise SpecError(f"model {self.name!r}: moe_layers must be strictly increasing")
        if self.dense_params < 0 or self.kv_bytes_per_token < 0:
            raise SpecError(f"model {self.name!r}: dense_params and kv_bytes_per_token must be >= 0")
        dtype_bits(self.dtype)
        for name in ("expert_bits", "dense_bits", "kv_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
                    or not 0 <= value <= 64 or 0 < value < 1:
                raise SpecError(
                    f"model {self.name!r}: {name} must be 0 (the dtype's bits) or bits per weight in [1, 64], "
                    f"got {value!r} (e.g. --set model.{name}=4.25)"
                )

    # --- derived sizes -------------------------------------------------------------------
    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def expert_params(self) -> int:
        if self.expert_params_override:
            return self.expert_params_override
        return self.expert_matrices * self.d_model * self.d_ff_expert

    @property
    def expert_storage_bits(self) -> float:
        """Bits per weight of a routed expert as stored (``expert_bits``, else the dtype's)."""
        return float(self.expert_bits or dtype_bits(self.dtype))

    @property
    def experts_quantised(self) -> bool:
        """Experts stored in fewer bits than the compute dtype: dequantised at compute time."""
        return self.expert_storage_bits < dtype_bits(self.dtype)

    def expert_bytes(self, dtype: str | None = None) -> int:
        """Bytes of one routed expert's weights in ``dtype`` (default: as stored, ``expert_bits``
        or the model's dtype)."""
        bits = dtype_bits(dtype) if dtype else self.expert_storage_bits
        return int(round(self.expert_params * bits / 8))

    @property
    def shared_expert_params(self) -> int:
        return self.num_shared_experts * self.expert_matrices * self.d_model * self.d_ff_shared

    @property
    def bytes_per_param(self) -> float:
        return dtype_bits(self.dtype) / 8

    @property
    def dense_bytes_per_param(self) -> float:
        return (self.dense_bits or dtype_bits(self.dtype)) / 8

    @property
    def dense_bytes(self) -> int:
        """Every weight that is not a routed expert (attention, norms, embeddings, shared experts,
        dense FFN layers): it stays on the GPU, stored in ``dense_bits`` (default the dtype)."""
        return int(round(self.dense_params * self.dense_bytes_per_param))

    @property
    def total_expert_bytes(self) -> int:
        return self.expert_bytes() * self.num_experts * self.num_moe_layers

    @property
    def embedding_bytes(self) -> int:
        """Input embedding table: gathered, not streamed, so it costs no per-layer reads."""
        return int(self.vocab_size * self.d_model * self.dense_bytes_per_param)

    @property
    def dense_bytes_per_layer(self) -> float:
        """Dense weight bytes read per layer per pass (everything but the input embedding,
        spread evenly over layers; the LM head is counted in this spread)."""
        return max(self.dense_bytes - self.embedding_bytes, 0) / self.num_layers

    @property
    def kv_bytes_per_token_stored(self) -> float:
        """KV bytes per token as stored: ``kv_bytes_per_token`` (at ``dtype``) scaled to ``kv_bits``."""
        if not self.kv_bits:
            return self.kv_bytes_per_token
        return self.kv_bytes_per_token * self.kv_bits / dtype_bits(self.dtype)

    @property
    def kv_bytes_per_token_per_layer(self) -> float:
        return self.kv_bytes_per_token_stored / self.num_layers

    def expert_flops(self, tokens: int) -> float:
        """FLOPs of one routed expert over ``tokens`` tokens (2 per multiply-add)."""
        return 2.0 * self.expert_params * tokens

    def dense_flops_per_layer(self, tokens: int, context_tokens: int) -> float:
        """Dense FLOPs of one layer: weight GEMMs plus attention scores/values over the context."""
        weight_flops = 2.0 * (self.dense_params - self.vocab_size * self.d_model) / self.num_layers * tokens
        attention_flops = 4.0 * self.num_heads * self.head_dim * context_tokens * tokens
        return max(weight_flops, 0.0) + attention_flops

    def summary(self) -> dict:
        return {
            "name": self.name,
            "layers": self.num_layers,
            "moe_layers": self.num_moe_layers,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "shared_experts": self.num_shared_experts,
            "d_model": self.d_model,
            "d_ff_expert": self.d_ff_expert,
            "dtype": self.dtype,
            "expert_bits": self.expert_storage_bits,
            "expert_MiB": round(self.expert_bytes() / 2**20, 2),
            "all_experts_GB": round(self.total_expert_bytes / 1e9, 2),
            "dense_GB": round(self.dense_bytes / 1e9, 2),
            "kv_KiB_per_token": round(self.kv_bytes_per_token / 1024, 1),
        }
