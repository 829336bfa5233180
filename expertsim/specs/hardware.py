"""HardwareSpec: the GPU, its host link, the host CPU and an optional storage tier."""
from __future__ import annotations

from dataclasses import dataclass, field

from expertsim.errors import SpecError


def _positive(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or value != value or value <= 0:
            raise SpecError(
                f"{owner}: {name} must be a positive number, got {value!r} "
                f"(set it in the TOML or with --set {owner.split()[0]}.{name}=VALUE)"
            )


def _non_negative(owner: str, **values: float) -> None:
    for name, value in values.items():
        if not isinstance(value, (int, float)) or value != value or value < 0:
            raise SpecError(f"{owner}: {name} must be >= 0, got {value!r}")


@dataclass(frozen=True)
class GpuSpec:
    memory_gb: float
    hbm_bandwidth_gbps: float  # GB/s, 1e9 bytes/s
    # Peak dense tensor-core throughput, TFLOP/s (1e12), per dtype; no sparsity.
    tflops: dict = field(default_factory=dict)
    # Achievable fraction of the peaks (roofline efficiency factors).
    compute_efficiency: float = 0.7
    memory_efficiency: float = 0.8
    launch_overhead_us: float = 5.0  # per kernel group (one expert FFN, one dense layer)
    workspace_gb: float = 1.0  # activations, CUDA context, allocator slack

    def __post_init__(self) -> None:
        _positive("gpu spec", memory_gb=self.memory_gb, hbm_bandwidth_gbps=self.hbm_bandwidth_gbps,
                  compute_efficiency=self.compute_efficiency, memory_efficiency=self.memory_efficiency)
        _non_negative("gpu spec", launch_overhead_us=self.launch_overhead_us,
                      workspace_gb=self.workspace_gb)
        if not self.tflops:
            raise SpecError("gpu spec: tflops is empty; give at least bf16 = <peak TFLOP/s>")
        for dtype, value in self.tflops.items():
            if not isinstance(value, (int, float)) or value != value or value <= 0:
                raise SpecError(
                    f"gpu spec: tflops.{dtype} must be a positive number, got {value!r} "
                    f"(set it with --set gpu.tflops.{dtype}=VALUE)"
                )

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; low-bit dtypes without their own entry run at bf16 rate
        (weights are dequantised to bf16 before the GEMM)."""
        value = self.tflops.get(dtype) or self.tflops.get("bf16") or self.tflops.get("fp16")
        if value is None:
            raise SpecError(f"gpu spec: no tflops entry for {dtype!r} nor bf16")
        return value * 1e12


@dataclass(frozen=True)
class LinkSpec:
    """Host-to-device link. bandwidth_gbps is the effective pinned-memory H2D rate that a large
    (>= 16 MB) cudaMemcpyAsync achieves, not the raw PCIe line rate."""

    kind: str
    bandwidth_gbps: float
    per_copy_overhead_us: float = 10.0
    pageable_bandwidth_gbps: float = 0.0  # 0 = half of pinned
    copy_engines: int = 1
    pinned: bool = True

    def __post_init__(self) -> None:
        _positive("link spec", bandwidth_gbps=self.bandwidth_gbps)
        _non_negative("link spec", per_copy_overhead_us=self.per_copy_overhead_us,
                      pageable_bandwidth_gbps=self.pageable_bandwidth_gbps)
        if not isinstance(self.copy_engines, int) or self.copy_engines < 1:
            raise SpecError(f"link spec: copy_engines must be an integer >= 1, got {self.copy_engines!r}")

    @property
    def effective_bandwidth_gbps(self) -> float:
        if self.pinned:
            return self.bandwidth_gbps
        return self.pageable_bandwidth_gbps or self.bandwidth_gbps / 2


@dataclass(frozen=True)
class CpuSpec:
    tflops: float  # sustained FP32/BF16 GEMM throughput of the host, TFLOP/s
    memory_bandwidth_gbps: float
    memory_gb: float = 512.0
    efficiency: float = 0.6
    # Sustained GEMM TFLOP/s per weight dtype where it differs from ``tflops``: what the
    # instruction set gives. bf16 on an AVX-512 CPU without AVX512_BF16 (Skylake/Cascade Lake)
    # is converted in software and runs far below fp32 (e.g. { bf16 = 0.05 }); AMX-BF16
    # (Sapphire Rapids) far above. Missing dtypes use ``tflops``.
    tflops_by_dtype: dict = field(default_factory=dict)
    # Single-thread speed of the host relative to the machine a runtime's host times were measured
    # on (dimensionless, 1.0 = the same): framework time per layer divides by it.
    host_speed: float = 1.0
    # The host's make-up (issue 17; optional, defaults describe one socket and change nothing).
    # With ``sockets`` > 1, ``tflops``, ``tflops_by_dtype`` and ``memory_bandwidth_gbps`` are
    # per socket (one NUMA node); what the sockets give together depends on where the weights
    # sit (:meth:`socket_scale`).
    sockets: int = 1
    cores: int = 0  # physical cores per socket (0 = not given; informational)
    isa: tuple = ()  # instruction-set features, e.g. ("avx2", "avx512", "avx512_bf16", "amx")
    memory_channels: int = 0  # DRAM channels per socket (0 = not given)
    memory_mts: float = 0.0  # DRAM transfer rate, MT/s (e.g. DDR5-4800 = 4800; 0 = not given)
    # Throughput of all sockets relative to one when the weights are placed per NUMA node
    # (copied onto every node, each socket reads its own): a second socket gives about 1.4x, not
    # 2x (KTransformers' DeepSeek-V3 tutorial: 8.73 -> 12.21 tok/s decode, 54.2 -> 82.9 prefill).
    numa_speedup: float = 1.4
    # The same when the weights are NOT placed per node (one copy, threads on every socket):
    # half the reads cross the socket link. 1.0 = no better and no worse than one socket.
    numa_unplaced_factor: float = 1.0

    def __post_init__(self) -> None:
        _positive("cpu spec", tflops=self.tflops, memory_bandwidth_gbps=self.memory_bandwidth_gbps,
                  memory_gb=self.memory_gb, efficiency=self.efficiency, host_speed=self.host_speed,
                  numa_speedup=self.numa_speedup, numa_unplaced_factor=self.numa_unplaced_factor)
        _non_negative("cpu spec", memory_mts=self.memory_mts)
        for name in ("sockets", "cores", "memory_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "sockets" else 0):
                raise SpecError(f"cpu spec: {name} must be an integer >= {1 if name == 'sockets' else 0}, got "
                                f"{value!r} (set it with --set cpu.{name}=VALUE)")
        if isinstance(self.isa, str) or not all(isinstance(f, str) for f in self.isa):
            raise SpecError(f"cpu spec: isa must be a list of feature names, e.g. [\"avx512\", \"amx\"], got "
                            f"{self.isa!r}")
        isa = tuple(f.lower().replace("-", "_") for f in self.isa)
        unknown = [f for f in isa if f not in ISA_FEATURES]
        if unknown:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(ISA_FEATURES), n=2)
            raise SpecError(f"cpu spec: unknown isa feature {unknown[0]!r}"
                            + (f" (did you mean {', '.join(close)}?)" if close else "")
                            + f"; known: {', '.join(sorted(ISA_FEATURES))}")
        # AMX comes in tiles per dtype; "amx" means AMX-BF16 and AMX-INT8 (Sapphire Rapids onwards)
        if "amx_bf16" in isa and "amx" not in isa:
            isa += ("amx",)
        object.__setattr__(self, "isa", isa)
        for dtype, value in self.tflops_by_dtype.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value <= 0 \
                    or value == float("inf"):
                raise SpecError(f"cpu spec: tflops_by_dtype.{dtype} must be a positive number (TFLOP/s), got "
                                f"{value!r} (set it with --set cpu.tflops_by_dtype.{dtype}=VALUE)")

    @property
    def theoretical_bandwidth_gbps(self) -> float:
        """Channels x MT/s x 8 bytes per socket (0 when the channels or the rate are not given)."""
        return self.memory_channels * self.memory_mts * 8 / 1e3

    def socket_scale(self, placed_per_node: bool) -> float:
        """What all sockets give relative to one (1.0 with one socket): ``numa_speedup`` when
        the weights are placed per node, else ``numa_unplaced_factor``."""
        if self.sockets <= 1:
            return 1.0
        return self.numa_speedup if placed_per_node else self.numa_unplaced_factor

    def gemm_flops(self, dtype: str) -> float:
        """Sustained FLOP/s of an expert GEMM with ``dtype`` weights (before ``efficiency``): the
        spec's ``tflops_by_dtype`` entry, else the rate its ``isa`` gives (:meth:`gemm_rate`)."""
        return self.gemm_rate(dtype)[0] * 1e12

    def gemm_rate(self, dtype: str) -> tuple[float, str]:
        """(TFLOP/s per socket, where it comes from) for ``dtype`` weights. Without a
        ``tflops_by_dtype`` entry, the ``isa`` scales the fp32 rate ``tflops`` by the unit that
        runs the dtype (:data:`ISA_RATE_MULTIPLIERS`, per core and cycle, from Intel's
        instruction throughputs); without either, the fp32 rate itself."""
        if dtype in self.tflops_by_dtype:
            return float(self.tflops_by_dtype[dtype]), f"cpu.tflops_by_dtype.{dtype}"
        if self.isa:  # the first unit the CPU has ("" = none of them)
            for feature, multiplier, why in ISA_RATE_MULTIPLIERS.get(dtype, ()):
                if feature == "" or feature in self.isa:
                    return self.tflops * multiplier, f"{multiplier:g} x the fp32 rate: {why}"
        return float(self.tflops), (f"the fp32 rate (cpu.tflops; no tflops_by_dtype.{dtype} entry"
                                    + (")" if self.isa else " and no isa)"))


# The instruction-set feature names a CPU spec's ``isa`` may list (lower case; "-" reads as "_").
ISA_FEATURES = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "avx512f", "avx512_vnni", "avx_vnni",
                          "avx512_bf16", "avx512_fp16", "amx", "amx_bf16", "amx_int8", "amx_fp16", "neon", "sve",
                          "sve2"})

# Per dtype, the first instruction-set feature the CPU has (in this order), the multiplier of the
# AVX-512 / AVX2 fp32 FMA rate (``cpu.tflops``) it gives, and why. Per core and cycle (Intel 64 and
# IA-32 Optimization Reference Manual; Intel AMX: 1024 BF16 / 2048 INT8 ops per cycle per core
# against 64 fp32 FLOP with two AVX-512 FMA units): VPDPBUSD (AVX512-VNNI / AVX-VNNI) does 4 int8
# multiply-adds per 32-bit lane, VDPBF16PS (AVX512_BF16) 2 bf16 pairs; without them bf16 weights are
# converted to fp32 in software by PyTorch's reference kernels, far below the fp32 rate (the Xeon
# 6126 / i9-10900X presets' 0.1). Other dtypes (fp16, fp32) run at ``tflops``.
# The int8 entry is the VNNI dot-product path the GGUF kernels (llamafile, ggml) run; AMX-INT8 is
# used by kernels written for it (set tflops_by_dtype.int8 for those).
ISA_RATE_MULTIPLIERS: dict[str, tuple[tuple[str, float, str], ...]] = {
    "int8": (("avx512_vnni", 4.0, "AVX512-VNNI int8 dot products (4 per 32-bit lane)"),
             ("avx_vnni", 4.0, "AVX-VNNI int8 dot products (4 per 32-bit lane)"),
             ("", 1.0, "no VNNI: int8 dot products at about the fp32 rate")),
    "bf16": (("amx", 16.0, "AMX-BF16 tiles (1024 FLOP per cycle per core)"),
             ("avx512_bf16", 2.0, "AVX512_BF16 dot products (2 per 32-bit lane)"),
             ("", 0.1, "no AVX512_BF16 or AMX: bf16 converted to fp32 in software")),
}


@dataclass(frozen=True)
class StorageSpec:
    """Optional tier below host memory (NVMe -> host)."""

    bandwidth_gbps: float = 0.0  # 0 = no storage tier
    latency_us: float = 100.0

    def __post_init__(self) -> None:
        _non_negative("storage spec", bandwidth_gbps=self.bandwidth_gbps, latency_us=self.latency_us)


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    gpu: GpuSpec
    link: LinkSpec
    cpu: CpuSpec
    storage: StorageSpec = field(default_factory=StorageSpec)
    source: str = ""

    def summary(self) -> dict:
        return {
            "name": self.name,
            "gpu_memory_GB": self.gpu.memory_gb,
            "hbm_GBps": self.gpu.hbm_bandwidth_gbps,
            "bf16_TFLOPs": self.gpu.tflops.get("bf16"),
            "link": self.link.kind,
            "link_GBps": self.link.bandwidth_gbps,
            "copy_overhead_us": self.link.per_copy_overhead_us,
            "cpu_TFLOPs": self.cpu.tflops,
            "cpu_mem_GBps": self.cpu.memory_bandwidth_gbps,
        }
