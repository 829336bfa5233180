"""RuntimeSpec: what a software stack pays around the roofline (the third spec kind, beside
models and hardware).

The roofline of :mod:`expertsim.sim.cost` says how long the bytes and FLOPs take. A real serving
stack adds time the hardware does not dictate, and it decides how copies meet compute. Each
field is one mechanism, with a unit in its name and a default that changes nothing, so that
runs on the ``default`` runtime reproduce the numbers documented before runtimes existed:

- ``host_us_per_layer``: host (framework) time per transformer layer per pass that the GPU
  does *not* hide, in microseconds: PyTorch eager with HuggingFace module calls at batch 1
  issues tens of small kernels per layer from Python, and a stack that synchronises with the
  host inside every layer (``.tolist()`` of the routing, as mixtral-offloading and HF Mixtral
  do) cannot run ahead of the GPU, so this time adds to the layer's GPU time. CUDA graphs or a
  fused engine make it about zero.
- ``host_us_per_expert``: the same per routed expert computed in a layer (the expert module
  call: indexing the expert's tokens, its GEMM kernels, the weighted index-add).
- ``kernel_us_per_layer`` / ``kernel_us_per_expert``: GPU time of the stack's own kernels
  beyond the roofline, per layer and per expert call, in microseconds: tens of tiny eager
  kernels that are launch-latency bound, or quantised GEMV kernels (e.g. HQQ's Triton 2/3-bit
  kernels at batch 1) far from the memory roofline. It is stream time: copies queued on the
  compute stream cannot overlap it (host time can).
- ``copy_stream``: ``"copy"`` = expert copies run on their own CUDA stream and overlap
  compute; ``"compute"`` = copies are queued on the compute stream (``non_blocking=True``
  copies on the current stream), so a copy starts only after the kernel before it, and no
  kernel runs while it is in flight.
- ``writeback``: an evicted expert is copied back to host memory (device-to-host, on the same
  stream as the copy that replaces it) before its slot is reused: a *swap*, not an overwrite.
- ``pinned_host``: host-side expert buffers pinned (true) or pageable (false); unset = the
  hardware's ``link.pinned``.

CPU expert kernels (issue 17: systems that compute routed experts on the host):

- ``cpu_bandwidth_fraction``: the fraction of the host's sustained memory bandwidth
  (``cpu.memory_bandwidth_gbps``) the stack's CPU expert kernels reach at decode (quantised
  GEMV kernels are memory-bound but do not stream at the STREAM rate); 1.0 = the full rate.
- ``cpu_flops_fraction``: the same for the GEMM rate of prefill on the CPU (compute-bound), a
  fraction of ``cpu.gemm_flops(cpu_gemm_dtype) x cpu.efficiency``.
- ``cpu_gemm_dtype``: the arithmetic the CPU kernels run in (a key of ``cpu.tflops_by_dtype``,
  e.g. ``"int8"`` for AVX512-VNNI dot products of GGUF blocks, ``"bf16"`` for AMX); empty = the
  model's dtype.
- ``cpu_kernels_by_format``: per expert storage format, the kernel the stack runs instead of the
  default one: ``{ fp8 = { gemm_dtype = "bf16", flops_fraction = 0.1 } }``. The format of a run's
  experts is the model's dtype when they are stored at its full width (``"fp8"`` for FP8 weights
  at 8 bits), else ``"quantised"`` (GGUF-style blocks below the dtype's width). Missing formats
  use ``cpu_gemm_dtype`` / ``cpu_flops_fraction``. KTransformers' kt-kernel converts FP8 weights
  to BF16 tile by tile before its AMX-BF16 GEMM (kt-kernel/operators/amx/fp8-moe.hpp:27), a
  different rate from its int8 (GGUF / llamafile) path.
- ``cpu_sync_us_per_layer``: host time per layer whose experts run on the CPU, paid once per
  layer per pass on top of the CPU kernels, in microseconds: handing the layer over to the CPU
  and back (a GPU stream synchronisation and the activation copies' launch at each of the two
  backend boundaries) and the CPU thread pool's barriers between the layer's graph nodes. In
  llama.cpp each CPU expert layer is two graph splits at decode (GPU->CPU and CPU->GPU) and its
  CPU part is 2 top-k + 4 nodes (3 ``mul_mat_id``, the GLU, the weighting ``mul``, top-k views,
  top-k - 1 adds: ``build_moe_ffn`` in src/llama-graph.cpp), each followed by a thread barrier
  (``ggml_barrier``). 0 for a stack that submits the layer's experts as one job.
- ``numa_placement``: ``"node"`` = expert weights copied onto every NUMA node, each socket reads
  its own (KTransformers ``USE_NUMA=1``): the sockets give ``cpu.numa_speedup``; ``"none"`` =
  one copy (``cpu.numa_unplaced_factor``).

Host times are per host at the speed of the machine the source measured on: the hardware spec's
``cpu.host_speed`` (relative single-thread speed, default 1.0) divides them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from expertsim.errors import SpecError

COPY_STREAMS = ("copy", "compute")
NUMA_PLACEMENTS = ("none", "node")


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    host_us_per_layer: float = 0.0  # µs of exposed host time per transformer layer per pass
    host_us_per_expert: float = 0.0  # µs of exposed host time per routed expert computed in a layer
    kernel_us_per_layer: float = 0.0  # µs of GPU stream time per layer beyond the roofline
    kernel_us_per_expert: float = 0.0  # µs of GPU stream time per expert call beyond the roofline
    copy_stream: str = "copy"  # "copy" (own stream, overlaps compute) | "compute" (serialised with kernels)
    writeback: bool = False  # evicted expert copied back to host (D2H) before its slot is reused
    pinned_host: bool | None = None  # None: the hardware's link.pinned
    cpu_bandwidth_fraction: float = 1.0  # of cpu.memory_bandwidth_gbps reached by the CPU expert kernels
    cpu_flops_fraction: float = 1.0  # of cpu.gemm_flops(cpu_gemm_dtype) x cpu.efficiency reached at prefill
    cpu_gemm_dtype: str = ""  # arithmetic of the CPU kernels (cpu.tflops_by_dtype key); "" = the model dtype
    numa_placement: str = "none"  # "node": weights copied per NUMA node; "none": one copy
    cpu_sync_us_per_layer: float = 0.0  # µs of host time per CPU-expert layer per pass (hand-over + barriers)
    cpu_kernels_by_format: dict = field(default_factory=dict)  # format -> {gemm_dtype, flops_fraction}
    source: str = ""
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name in ("host_us_per_layer", "host_us_per_expert", "kernel_us_per_layer", "kernel_us_per_expert",
                     "cpu_sync_us_per_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise SpecError(f"runtime {self.name!r}: {name} must be a finite number >= 0 (microseconds), "
                                f"got {value!r} (set it with --set runtime.{name}=VALUE)")
        for name in ("cpu_bandwidth_fraction", "cpu_flops_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0 < value <= 1:
                raise SpecError(f"runtime {self.name!r}: {name} must be a fraction in (0, 1], got {value!r} "
                                f"(set it with --set runtime.{name}=VALUE)")
        if not isinstance(self.cpu_gemm_dtype, str):
            raise SpecError(f"runtime {self.name!r}: cpu_gemm_dtype must be a dtype name such as \"int8\" or \"bf16\", "
                            f"got {self.cpu_gemm_dtype!r}")
        if not isinstance(self.cpu_kernels_by_format, dict):
            raise SpecError(f"runtime {self.name!r}: cpu_kernels_by_format must be a table such as "
                            f"{{ fp8 = {{ gemm_dtype = \"bf16\", flops_fraction = 0.1 }} }}, got {self.cpu_kernels_by_format!r}")
        for fmt, kernel in self.cpu_kernels_by_format.items():
            if not isinstance(kernel, dict) or set(kernel) - {"gemm_dtype", "flops_fraction"}:
                raise SpecError(f"runtime {self.name!r}: cpu_kernels_by_format.{fmt} must be a table with gemm_dtype "
                                f"and/or flops_fraction, got {kernel!r}")
            frac = kernel.get("flops_fraction", 1.0)
            if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not math.isfinite(frac) or not 0 < frac <= 1:
                raise SpecError(f"runtime {self.name!r}: cpu_kernels_by_format.{fmt}.flops_fraction must be a fraction "
                                f"in (0, 1], got {frac!r}")
            if not isinstance(kernel.get("gemm_dtype", ""), str):
                raise SpecError(f"runtime {self.name!r}: cpu_kernels_by_format.{fmt}.gemm_dtype must be a dtype name "
                                f"such as \"bf16\", got {kernel.get('gemm_dtype')!r}")
        if self.numa_placement not in NUMA_PLACEMENTS:
            raise SpecError(f"runtime {self.name!r}: numa_placement must be 'none' or 'node', got "
                            f"{self.numa_placement!r} (--set runtime.numa_placement=node)")
        if self.copy_stream not in COPY_STREAMS:
            raise SpecError(f"runtime {self.name!r}: copy_stream must be 'copy' or 'compute', got "
                            f"{self.copy_stream!r} (--set runtime.copy_stream=copy)")
        if not isinstance(self.writeback, bool):
            raise SpecError(f"runtime {self.name!r}: writeback must be true or false, got {self.writeback!r}")
        if self.pinned_host is not None and not isinstance(self.pinned_host, bool):
            raise SpecError(f"runtime {self.name!r}: pinned_host must be true or false, got {self.pinned_host!r}")

    @property
    def serialises_copies(self) -> bool:
        return self.copy_stream == "compute"

    @property
    def fast_engine_ok(self) -> bool:
        """Whether the fast engine reproduces runs on this runtime: host and kernel times fold
        into the cost model's compute terms, and copies on the compute stream have a closed form
        for its copy-on-miss systems; a write-back needs the DES."""
        return not self.writeback

    def summary(self) -> dict:
        return {"name": self.name, "host_us_per_layer": self.host_us_per_layer,
                "host_us_per_expert": self.host_us_per_expert, "kernel_us_per_layer": self.kernel_us_per_layer,
                "kernel_us_per_expert": self.kernel_us_per_expert, "copy_stream": self.copy_stream,
                "writeback": self.writeback, "pinned_host": self.pinned_host,
                "cpu_bandwidth_fraction": self.cpu_bandwidth_fraction, "cpu_flops_fraction": self.cpu_flops_fraction,
                "cpu_gemm_dtype": self.cpu_gemm_dtype, "numa_placement": self.numa_placement,
                "cpu_sync_us_per_layer": self.cpu_sync_us_per_layer,
                "cpu_kernels_by_format": dict(self.cpu_kernels_by_format)}

    def cpu_kernel(self, expert_format: str) -> tuple[str, float]:
        """(GEMM dtype, flops fraction) of the CPU expert kernel for ``expert_format``
        (``"fp8"``, ``"quantised"``, ...): the format's entry, else the runtime-wide fields."""
        kernel = self.cpu_kernels_by_format.get(expert_format, {})
        return str(kernel.get("gemm_dtype", self.cpu_gemm_dtype)), float(kernel.get("flops_fraction",
                                                                                    self.cpu_flops_fraction))

    def describe(self) -> str:
        """One line for a run's printed assumptions."""
        if self == RuntimeSpec(name=self.name, source=self.source):
            return (f"runtime {self.name}: no framework time, copies on their own stream overlap compute, "
                    f"no write-back (the roofline alone)")
        copies = ("copies queued on the compute stream (no copy/compute overlap)" if self.serialises_copies
                  else "copies on their own stream")
        return (f"runtime {self.name}: {self.host_us_per_layer:g} us host time per layer + "
                f"{self.host_us_per_expert:g} us per expert call (exposed, divided by cpu.host_speed); "
                f"{self.kernel_us_per_layer:g} us GPU stream time per layer + {self.kernel_us_per_expert:g} us per "
                f"expert call beyond the roofline; {copies}; "
                + ("evicted experts written back to host" if self.writeback else "no write-back")
                + (f"; {'pinned' if self.pinned_host else 'pageable'} host buffers" if self.pinned_host is not None else "")
                + (f"; CPU expert kernels at {self.cpu_bandwidth_fraction:g} of the host memory bandwidth and "
                   f"{self.cpu_flops_fraction:g} of its {self.cpu_gemm_dtype or 'model-dtype'} GEMM rate, weights "
                   + ("per NUMA node" if self.numa_placement == "node" else "in one NUMA copy")
                   if (self.cpu_bandwidth_fraction, self.cpu_flops_fraction, self.cpu_gemm_dtype, self.numa_placement)
                   != (1.0, 1.0, "", "none") else "")
                + (f"; {self.cpu_sync_us_per_layer:g} us host time per CPU-expert layer (hand-over and thread "
                   f"barriers, divided by cpu.host_speed)" if self.cpu_sync_us_per_layer else ""))
