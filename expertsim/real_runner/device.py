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

CPU emulation: "device memory" is a separate set of CPU tensors; copies run in order in one copy
*process* (a thread would share the GIL: every hand-over to a thread the OS has not scheduled yet
stalls the compute thread for a scheduler tick on a busy machine), computes on the calling
thread; host and device tensors live in shared memory so both processes see them. Times are
``time.perf_counter_ns`` (CLOCK_MONOTONIC, the same clock in both processes; on the CPU every
operation is synchronous, so the clock is exact).
``clock="cpu"`` (CPU emulation only) times the emulation on a busy machine, where the OS
scheduler's delays swamp wall time: the compute stream advances by the compute thread's CPU time
(``time.thread_time_ns``), the link serves copies in order, each taking its nominal transfer
time plus the memcpy's CPU time, and a wait advances the compute stream to the copy's end. The
work and every dependency are still real (the copies run, computes wait for them); only the
clock that times them is the device's own, not the machine's. ``clock="wall"`` is the default.

``link_gbps`` optionally makes the emulated link slower than memcpy: the copy process first
sleeps ``bytes / link_gbps`` (the transfer), then writes the data (it lands at the end, as
over a real link), so the emulation keeps the GPU's ratio of copy time to compute time.
"""
from __future__ import annotations

import os
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
    after: Any = None  # cpu clock: the compute stream's virtual time at issue
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
        self._flush = None

    # Host memory: pinned, so non_blocking copies are truly asynchronous DMA.
    def host_empty(self, shape, dtype, pinned: bool = True) -> torch.Tensor:
        if pinned:
            try:
                return torch.empty(shape, dtype=dtype, pin_memory=True)
            except RuntimeError:  # pinned memory limited (containers): say so in the device name
                if "pageable" not in self.name:
                    self.name += " (pageable host memory: pinning failed)"
        return torch.empty(shape, dtype=dtype)

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

    def flush_caches(self) -> None:
        """Evict the L2 cache (a write larger than it) so a timed operation starts cold."""
        if self._flush is None:
            self._flush = torch.empty(256 * 2**20, dtype=torch.uint8, device=self.torch_device)
        self._flush.zero_()

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.torch_device)

    def ns(self, stamp) -> int:
        return int(round(self._origin.elapsed_time(stamp) * 1e6))

    def copy_ns(self, op: CopyOp) -> tuple[int, int]:
        return self.ns(op.start), self.ns(op.end)

    def close(self) -> None:
        self.synchronize()


def _copy_process(commands, replies, link_gbps: float | None, cpus: set[int] | None) -> None:
    """The emulated link: a process of its own (no GIL shared with the compute thread) that
    copies between shared-memory buffers, in order, and replies (op, start_ns, end_ns).
    Uses no torch (it may be forked from a process whose thread pools are running)."""
    from multiprocessing import resource_tracker, shared_memory

    import numpy as np

    if cpus:
        os.sched_setaffinity(0, cpus)
    segments, views = [], {}
    while True:
        msg = commands.recv()
        if msg[0] == "register":
            _, buf_id, name, nbytes = msg
            shm = shared_memory.SharedMemory(name=name)
            try:  # attached, not owned: the creating process unlinks it
                resource_tracker.unregister(shm._name, "shared_memory")
            except Exception:
                pass
            segments.append(shm)
            views[buf_id] = np.frombuffer(shm.buf, dtype=np.uint8, count=nbytes)
        elif msg[0] == "copy":
            _, op_id, dst, dst_off, src, src_off, n = msg
            start = time.perf_counter_ns()
            if link_gbps:  # the bytes cross the link; they land at the end
                time.sleep(n / (link_gbps * 1e9))
            cpu0 = time.thread_time_ns()
            np.copyto(views[dst][dst_off:dst_off + n], views[src][src_off:src_off + n])
            replies.send((op_id, start, time.perf_counter_ns(), time.thread_time_ns() - cpu0))
        else:
            break
    views.clear()
    for shm in segments:
        shm.close()


class CpuEmulatedDevice:
    """The CPU playing a GPU: separate CPU tensors (shared memory) as device memory, a copy
    process as the link, the calling thread as the compute stream."""

    kind = "cpu"
    emulated = True

    def __init__(self, link_gbps: float | None = None, threads: int = 1, clock: str = "wall"):
        import multiprocessing as mp

        from expertsim.errors import ConfigError

        if clock not in ("wall", "cpu"):
            raise ConfigError(f"--clock must be wall or cpu, got {clock!r}")
        self.torch_device = torch.device("cpu")
        self.link_gbps = link_gbps
        self.clock = clock
        notes = ([f"link {link_gbps:g} GB/s"] if link_gbps else []) + (["cpu clock"] if clock == "cpu" else [])
        self.name = "cpu-emulated" + (f" ({', '.join(notes)})" if notes else "")
        self._v = 0  # cpu clock: the compute stream's virtual time (ns)
        self._v_cpu = time.thread_time_ns()  # thread CPU time already charged to it
        self._link_v = 0  # cpu clock: when the virtual link is free
        # One compute thread, so that the copy process has a core of its own on a 2-core machine.
        torch.set_num_threads(threads)
        self._origin = time.perf_counter_ns()
        self._flush = None
        self._segments = []  # SharedMemory blocks we own
        self._buffers: list[tuple[int, int, int]] = []  # (base pointer, bytes, id)
        self._ops: dict[int, CopyOp] = {}
        self._next_op = 0
        # The link and the compute stream on cores of their own (when there are two): waking the
        # copy process must not preempt the compute thread on its core.
        self._affinity = None
        copy_cpus = None
        if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
            self._affinity = os.sched_getaffinity(0)
            cpus = sorted(self._affinity)
            copy_cpus = {cpus[-1]}
            os.sched_setaffinity(0, set(cpus[:-1]))
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        cmd_recv, self._commands = ctx.Pipe(duplex=False)
        self._replies, reply_send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(target=_copy_process, args=(cmd_recv, reply_send, link_gbps, copy_cpus),
                                    name="expertsim-copy", daemon=True)
        self._process.start()
        cmd_recv.close()
        reply_send.close()

    def _shared(self, shape, dtype) -> torch.Tensor:
        from multiprocessing import shared_memory

        numel = 1
        for n in (shape if isinstance(shape, (tuple, list)) else (shape,)):
            numel *= int(n)
        nbytes = max(numel * torch.empty(0, dtype=dtype).element_size(), 1)
        shm = shared_memory.SharedMemory(create=True, size=nbytes)
        self._segments.append(shm)
        t = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
        buf_id = len(self._buffers)
        self._buffers.append((t.data_ptr(), nbytes, buf_id))
        self._commands.send(("register", buf_id, shm.name, nbytes))
        return t[: numel * torch.empty(0, dtype=dtype).element_size()].view(dtype).view(shape)

    def host_empty(self, shape, dtype, pinned: bool = True) -> torch.Tensor:
        return self._shared(shape, dtype)

    def empty(self, shape, dtype) -> torch.Tensor:
        return self._shared(shape, dtype)

    def compute_context(self):
        import contextlib

        return contextlib.nullcontext()

    def start_clock(self) -> None:
        self.synchronize()
        self._origin = time.perf_counter_ns()
        self._v, self._link_v, self._v_cpu = 0, 0, time.thread_time_ns()

    def stamp(self) -> int:
        if self.clock == "wall":
            return time.perf_counter_ns()
        now = time.thread_time_ns()
        self._v += now - self._v_cpu
        self._v_cpu = now
        return self._v

    def _locate(self, t: torch.Tensor) -> tuple[int, int]:
        if not t.is_contiguous():
            raise ValueError("the emulated link copies contiguous tensors only")
        ptr = t.data_ptr()
        for base, nbytes, buf_id in self._buffers:
            if base <= ptr and ptr + t.numel() * t.element_size() <= base + nbytes:
                return buf_id, ptr - base
        raise ValueError("copy between tensors the emulated device did not allocate (host_empty/empty)")

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None) -> CopyOp:
        # ``after`` is a stamp of work this thread has already finished: nothing to wait for.
        op = CopyOp(nbytes=src.numel() * src.element_size())
        op.after = self.stamp() if self.clock == "cpu" else None
        dst_id, dst_off = self._locate(dst)
        src_id, src_off = self._locate(src)
        op_id = self._next_op
        self._next_op += 1
        self._ops[op_id] = op
        self._commands.send(("copy", op_id, dst_id, dst_off, src_id, src_off, op.nbytes))
        return op

    def _receive(self) -> None:
        op_id, start, end, copy_cpu = self._replies.recv()
        op = self._ops.pop(op_id)
        if self.clock == "wall":
            op.start, op.end = start, end
        else:  # the virtual link: in order, nominal transfer time + the memcpy's CPU time
            op.start = max(self._link_v, op.after)
            nominal = int(op.nbytes / self.link_gbps) if self.link_gbps else 0
            op.end = self._link_v = op.start + nominal + copy_cpu
        op.done.set()

    def wait(self, op: CopyOp) -> None:
        if self.clock == "cpu":
            self.stamp()  # charge the work so far; the wait itself is not compute
        while not op.done.is_set():
            self._receive()  # copies complete in order: earlier ones arrive first
        if self.clock == "cpu":
            self._v = max(self._v, op.end)
            self._v_cpu = time.thread_time_ns()

    def flush_caches(self) -> None:
        """Evict the CPU caches (a write of 64 MiB, twice a large L3) so a timed operation starts cold."""
        if self._flush is None:
            self._flush = torch.empty(16 * 2**20, dtype=torch.float32)
        self._flush.fill_(1.0)

    def synchronize(self) -> None:
        while self._ops:
            self._receive()

    def ns(self, stamp: int) -> int:
        return int(stamp - self._origin) if self.clock == "wall" else int(stamp)

    def copy_ns(self, op: CopyOp) -> tuple[int, int]:
        return self.ns(op.start), self.ns(op.end)

    def close(self) -> None:
        if self._process is None:
            return
        self.synchronize()
        self._commands.send(("stop",))
        self._process.join(timeout=10)
        self._process = None
        if self._affinity is not None:
            os.sched_setaffinity(0, self._affinity)
        self._commands.close()
        self._replies.close()
        for shm in self._segments:
            try:
                shm.close()
            except BufferError:  # a tensor still views it; the block is unlinked all the same
                pass
            shm.unlink()
        self._segments = []


def make_device(kind: str, *, link_gbps: float | None = None, clock: str = "wall"):
    from expertsim.errors import ConfigError

    if kind == "cuda":
        return CudaDevice()
    if kind == "cpu":
        return CpuEmulatedDevice(link_gbps=link_gbps, clock=clock)
    raise ConfigError(f"--device must be cuda or cpu, got {kind!r}")
