"""The two devices the real runner drives: a CUDA GPU, and an emulated device on the CPU.

Both offer the same small interface, so the replay and the calibration are written once:

- ``stamp()``: a timestamp on the compute stream, taken when the work issued so far is done
  (CUDA: an event recorded on the compute stream; CPU: the clock now, work being synchronous).
- ``copy(dst, src, after)``: a host-to-device copy on the copy stream that starts only once the
  compute stream has reached ``after`` (a stamp, or None) and every earlier copy is done (one
  copy stream, FIFO, like one DMA engine). Returns a :class:`CopyOp`.
- ``wait(op)``: the compute stream waits until ``op`` has landed.
- ``ns(stamp)`` / ``copy_ns(op)``: times in ns since ``start_clock()``, after ``synchronize()``.

CUDA: copies are ``non_blocking=True`` from pinned memory on a separate copy stream; dependencies
are CUDA events; times come from CUDA events only (no host clock around asynchronous work).

CPU emulation: "device memory" is a separate set of CPU tensors; copies run on one copy thread
(``Tensor.copy_`` releases the GIL), computes on the main thread, timed with
``time.perf_counter_ns`` (on the CPU every operation is synchronous, so the clock is exact).
``link_gbps`` optionally makes the emulated link slower than memcpy: the copy thread first
sleeps ``bytes / link_gbps`` (the transfer), then writes the data (it lands at the end, as
over a real link), so the emulation keeps the GPU's ratio of copy time to compute time.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(dtype: str) -> torch.dtype:
    from expertsim.errors import ConfigError

    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise ConfigError(
            f"the real runner stores experts as fp32, bf16 or fp16, not {dtype!r}; shrink the model "
            f"with --dtype bf16"
        ) from None


@dataclass
class CopyOp:
    nbytes: int
    start: Any = None  # CUDA event, or ns int (CPU) once started
    end: Any = None
    done: threading.Event = field(default_factory=threading.Event)  # CPU emulation only
    error: BaseException | None = None


class CudaDevice:
    """One CUDA GPU: a compute stream, a copy stream, events for order and time."""

    kind = "cuda"
    emulated = False

    def __init__(self, index: int = 0):
        from expertsim.errors import ConfigError

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA GPU; use --device cpu (emulated)")
        self.torch_device = torch.device("cuda", index)
        self.compute_stream = torch.cuda.Stream(self.torch_device)
        self.copy_stream = torch.cuda.Stream(self.torch_device)
        self.name = f"cuda:{torch.cuda.get_device_name(self.torch_device)}"
        self._origin = None

    # Host memory: pinned, so non_blocking copies are truly asynchronous DMA.
    def host_empty(self, shape, dtype, pinned: bool = True) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=pinned)

    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def compute_context(self):
        return torch.cuda.stream(self.compute_stream)

    def _event(self):
        return torch.cuda.Event(enable_timing=True)

    def start_clock(self) -> None:
        self.synchronize()
        self._origin = self._event()
        self._origin.record(self.compute_stream)

    def stamp(self):
        ev = self._event()
        ev.record(self.compute_stream)
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> CopyOp:
        op = CopyOp(nbytes=src.numel() * src.element_size())
        if after is not None:
            self.copy_stream.wait_event(after)
        op.start, op.end = self._event(), self._event()
        op.start.record(self.copy_stream)
        with torch.cuda.stream(self.copy_stream):
            dst.copy_(src, non_blocking=True)
        op.end.record(self.copy_stream)
        return op

    def wait(self, op: CopyOp) -> None:
        self.compute_stream.wait_event(op.end)

    def is_done(self, op: CopyOp) -> bool:
        return op.end.query()  # a host-side poll; no synchronisation

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def ns(self, stamp) -> int:
        return int(round(self._origin.elapsed_time(stamp) * 1e6))

    def copy_ns(self, op: CopyOp) -> tuple[int, int]:
        return self.ns(op.start), self.ns(op.end)

    def close(self) -> None:
        self.synchronize()


class CpuEmulatedDevice:
    """The CPU playing a GPU: separate CPU tensors as device memory, a copy thread as the link."""

    kind = "cpu"
    emulated = True

    def __init__(self, link_gbps: float | None = None, threads: int = 1):
        self.torch_device = torch.device("cpu")
        self.link_gbps = link_gbps
        self.name = "cpu-emulated" + (f" (link {link_gbps:g} GB/s)" if link_gbps else "")
        # One compute thread, so that the copy thread has a core of its own on a 2-core machine.
        torch.set_num_threads(threads)
        self._origin = time.perf_counter_ns()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._copy_loop, name="expertsim-copy", daemon=True)
        self._thread.start()

    def host_empty(self, shape, dtype, pinned: bool = True) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def empty(self, shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype)

    def compute_context(self):
        import contextlib

        return contextlib.nullcontext()

    def start_clock(self) -> None:
        self.synchronize()
        self._origin = time.perf_counter_ns()

    def stamp(self) -> int:
        return time.perf_counter_ns()

    def _copy_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            op, dst, src = item
            try:
                op.start = time.perf_counter_ns()
                if self.link_gbps:
                    time.sleep(op.nbytes / (self.link_gbps * 1e9))
                dst.copy_(src)
                op.end = time.perf_counter_ns()
            except BaseException as exc:  # surfaced to the main thread by wait()
                op.error = exc
                op.end = time.perf_counter_ns()
            finally:
                op.done.set()

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> CopyOp:
        # ``after`` is a stamp of work the main thread has already finished: nothing to wait for.
        op = CopyOp(nbytes=src.numel() * src.element_size())
        self._queue.put((op, dst, src))
        return op

    def is_done(self, op: CopyOp) -> bool:
        return op.done.is_set() and op.error is None

    def wait(self, op: CopyOp) -> None:
        op.done.wait()
        if op.error is not None:
            raise op.error

    def synchronize(self) -> None:
        marker = CopyOp(nbytes=0)
        self._queue.put((marker, torch.empty(0), torch.empty(0)))
        marker.done.wait()

    def ns(self, stamp: int) -> int:
        return int(stamp - self._origin)

    def copy_ns(self, op: CopyOp) -> tuple[int, int]:
        return self.ns(op.start), self.ns(op.end)

    def close(self) -> None:
        self.synchronize()
        self._queue.put(None)
        self._thread.join(timeout=5)


def make_device(kind: str, *, link_gbps: float | None = None):
    from expertsim.errors import ConfigError

    if kind == "cuda":
        return CudaDevice()
    if kind == "cpu":
        return CpuEmulatedDevice(link_gbps=link_gbps)
    raise ConfigError(f"--device must be cuda or cpu, got {kind!r}")
