"""Serving: request arrivals and continuous batching, turning a trace into iterations.

Each request of the trace is a sequence of passes in trace order (a prefill pass over a prompt,
one decode pass per generated token, possibly a later turn's prefill). Requests arrive
(:func:`arrival_times_ns`):

- ``closed`` (default): ``max_batch`` clients, each sending its next request when the previous
  one finishes; request i+B arrives when a running request ends. At batch 1 this is the trace
  replayed one request after another, the engine's historical behaviour.
- ``offline``: every request queued at t=0 (MoE-Lightning's throughput mode).
- ``poisson``: arrivals at ``rate`` per second, exponential gaps from a seeded generator; the
  first request arrives at t=0.
- explicit timestamps (ns), one per request in trace order.

Continuous batching (Orca/vLLM): before every iteration the ready requests (arrived, unfinished;
running ones first in the order they started, then waiting ones by arrival) are offered to
``System.select_batch(ready, max_batch, now_ns)``; each chosen request contributes its next pass,
or the next ``prefill_chunk_tokens`` tokens of a prefill pass (chunked prefill). A request holds
its KV cache from its first iteration to its end.

Per request it records arrival, first scheduling, first token (end of its first pass), finish, and
per decode token the duration of the iteration that produced it (the token's TPOT).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from expertsim.errors import ConfigError
from expertsim.sim.workload import Iteration
from expertsim.traces import RoutingTrace

ARRIVAL_MODES = ("closed", "offline", "poisson")


def arrival_times_ns(num_requests: int, mode: str, *, rate_per_s: float | None = None,
                     seed: int = 0, timestamps_ns: Sequence[int] | None = None) -> np.ndarray | None:
    """Arrival time of each request (trace order), or None for the closed loop."""
    if timestamps_ns is not None:
        ts = np.asarray(timestamps_ns, dtype=np.int64)
        if ts.shape != (num_requests,):
            raise ConfigError(f"arrival timestamps: need one per request ({num_requests}), got {ts.shape[0]}")
        if (ts < 0).any() or (np.diff(ts) < 0).any():
            raise ConfigError("arrival timestamps must be >= 0 and non-decreasing (trace order)")
        return ts
    if mode == "closed":
        return None
    if mode == "offline":
        return np.zeros(num_requests, dtype=np.int64)
    if mode == "poisson":
        if rate_per_s is None or not rate_per_s > 0 or rate_per_s == float("inf"):
            raise ConfigError(f"--rate must be a positive number of requests per second, got {rate_per_s!r}")
        gaps = np.random.default_rng(seed).exponential(1.0 / rate_per_s, size=num_requests)
        return np.round(np.concatenate([[0.0], np.cumsum(gaps[:-1])]) * 1e9).astype(np.int64)
    raise ConfigError(f"arrival mode must be one of {', '.join(ARRIVAL_MODES)}, got {mode!r}")


@dataclass
class RequestState:
    request: int  # the trace's request id
    passes: list[tuple[int, int]]  # (start, stop) trace rows of each pass
    arrival_ns: int | None = None
    pass_index: int = 0
    offset: int = 0  # tokens of the current pass already processed (chunked prefill)
    start_ns: int | None = None
    first_token_ns: int | None = None
    finish_ns: int | None = None
    context_tokens: int = 0  # KV length held now
    decode_latencies_ns: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.pass_index >= len(self.passes)


class ContinuousBatcher:
    """Builds iterations on demand (see the module docstring). ``next_iteration(now)`` gives the
    next iteration or None when nothing is ready; ``complete(it, start, end)`` advances the
    requests; ``next_arrival_ns()`` tells the engine how long to idle."""

    def __init__(self, trace: RoutingTrace, *, max_batch: int = 1, arrivals_ns: np.ndarray | None = None,
                 prefill_chunk_tokens: int | None = None,
                 select_batch: Callable[[list[int], int, int], list[int]] | None = None):
        if not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise ConfigError(f"--batch must be an integer >= 1, got {max_batch!r}")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise ConfigError(f"prefill chunk must be >= 1 token, got {prefill_chunk_tokens!r}")
        self.trace = trace
        self.max_batch = int(max_batch)
        self.chunk = prefill_chunk_tokens
        self.select_batch = select_batch or (lambda ready, n, now: list(ready)[:n])
        starts = trace.pass_starts().tolist()
        by_request: dict[int, list[tuple[int, int]]] = {}
        order: list[int] = []
        for a, b in zip(starts[:-1], starts[1:]):
            rid = int(trace.request[a])
            if rid not in by_request:
                by_request[rid] = []
                order.append(rid)
            by_request[rid].append((a, b))
        self.states = [RequestState(rid, by_request[rid]) for rid in order]
        self.by_id = {s.request: s for s in self.states}
        if len(self.by_id) != len(self.states):
            raise ConfigError("the trace's requests are not contiguous; sort it by request first")
        self.closed = arrivals_ns is None
        if self.closed:
            for s in self.states[:self.max_batch]:
                s.arrival_ns = 0
            self._next_closed = min(self.max_batch, len(self.states))
        else:
            for s, t in zip(self.states, np.asarray(arrivals_ns).tolist()):
                s.arrival_ns = int(t)
        self._running: list[int] = []  # started, unfinished, in start order
        self._waiting_from = 0  # index of the first state that may still be waiting
        self.index = 0

    # --- queries -------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(s.finished for s in self.states)

    def ready(self, now_ns: int) -> list[int]:
        waiting = []
        for s in self.states[self._waiting_from:]:
            if s.arrival_ns is None or s.arrival_ns > now_ns:
                if self.closed:
                    break
                continue
            if s.start_ns is None:
                waiting.append(s.request)
        return list(self._running) + waiting

    def next_arrival_ns(self) -> int | None:
        future = [s.arrival_ns for s in self.states if s.start_ns is None and s.arrival_ns is not None]
        return min(future) if future else None

    def kv_tokens(self) -> int:
        """KV tokens held by the running requests."""
        return sum(self.by_id[r].context_tokens for r in self._running)

    # --- stepping ------------------------------------------------------------------------
    def next_iteration(self, now_ns: int) -> tuple[Iteration | None, list[int]]:
        """The next iteration and the requests it starts, or (None, []) when nothing is ready."""
        ready = self.ready(now_ns)
        if not ready:
            return None, []
        chosen = [int(r) for r in self.select_batch(list(ready), self.max_batch, now_ns)]
        if not chosen or len(chosen) > self.max_batch or len(set(chosen)) != len(chosen) \
                or not set(chosen) <= set(ready):
            raise ConfigError(
                f"select_batch chose {chosen} from ready requests {ready} with max_batch "
                f"{self.max_batch}: it must pick 1..max_batch distinct ready requests"
            )
        rows, tokens, contexts, started = [], [], [], []
        phase = 1
        trace = self.trace
        for rid in chosen:
            s = self.by_id[rid]
            if s.start_ns is None:
                s.start_ns = now_ns
                self._running.append(rid)
                started.append(rid)
            a, b = s.passes[s.pass_index]
            a += s.offset
            if self.chunk is not None and int(trace.phase[a]) == 0:
                b = min(b, a + self.chunk)
            rows.append(np.arange(a, b))
            tokens.append(b - a)
            contexts.append(int(trace.position[b - 1]) + 1)
            if int(trace.phase[a]) == 0:
                phase = 0
        if len(chosen) == 1:
            a, b = int(rows[0][0]), int(rows[0][-1]) + 1
            it = Iteration(index=self.index, start=a, stop=b, request=chosen[0], phase=phase,
                           context_tokens=contexts[0], requests=tuple(chosen),
                           request_tokens=tuple(tokens), request_contexts=tuple(contexts))
        else:
            index = np.concatenate(rows)
            it = Iteration(index=self.index, start=int(index[0]), stop=int(index[-1]) + 1,
                           request=chosen[0], phase=phase, context_tokens=sum(contexts),
                           token_index=index, requests=tuple(chosen), request_tokens=tuple(tokens),
                           request_contexts=tuple(contexts))
        self.index += 1
        return it, started

    def complete(self, it: Iteration, start_ns: int, end_ns: int) -> list[int]:
        """Advance the iteration's requests; returns the requests that finished."""
        finished = []
        trace = self.trace
        for rid, ntok, ctx in zip(it.requests, it.request_tokens, it.request_contexts):
            s = self.by_id[rid]
            a, b = s.passes[s.pass_index]
            if int(trace.phase[a]) == 1:
                s.decode_latencies_ns.extend([end_ns - start_ns] * ntok)
            s.context_tokens = ctx
            s.offset += ntok
            if s.offset >= b - a:
                s.pass_index += 1
                s.offset = 0
                if s.first_token_ns is None:
                    s.first_token_ns = end_ns
            if s.finished:
                s.finish_ns = end_ns
                s.context_tokens = 0
                self._running.remove(rid)
                finished.append(rid)
                if self.closed and self._next_closed < len(self.states):
                    self.states[self._next_closed].arrival_ns = end_ns
                    self._next_closed += 1
        while self._waiting_from < len(self.states) and self.states[self._waiting_from].start_ns is not None:
            self._waiting_from += 1
        return finished

    def request_records(self) -> list[dict]:
        return [{"request": s.request, "arrival_ns": s.arrival_ns, "start_ns": s.start_ns,
                 "first_token_ns": s.first_token_ns, "finish_ns": s.finish_ns,
                 "decode_tokens": len(s.decode_latencies_ns),
                 "tpot_ns": float(np.mean(s.decode_latencies_ns)) if s.decode_latencies_ns else float("nan")}
                for s in self.states]

    def decode_latencies_ns(self) -> np.ndarray:
        lat = [s.decode_latencies_ns for s in self.states]
        return np.concatenate([np.asarray(x, dtype=np.int64) for x in lat]) if lat else np.zeros(0, np.int64)


def plan_iterations(trace: RoutingTrace, *, max_batch: int, prefill_chunk_tokens: int | None = None,
                    select_batch=None, arrivals_ns: np.ndarray | None = None) -> list[Iteration] | None:
    """The iterations when they do not depend on timing (closed loop, or everything queued at
    t=0), for oracles' access plans and the bounds: a dry run of the batcher with unit-time
    iterations. None when arrivals spread over time (composition depends on the run)."""
    if arrivals_ns is not None and (np.asarray(arrivals_ns) != 0).any():
        return None
    batcher = ContinuousBatcher(trace, max_batch=max_batch, arrivals_ns=arrivals_ns,
                                prefill_chunk_tokens=prefill_chunk_tokens, select_batch=select_batch)
    out = []
    now = 0
    while not batcher.done:
        it, _ = batcher.next_iteration(now)
        if it is None:  # pragma: no cover - closed/offline always have a ready request
            raise RuntimeError("batcher stalled in a timing-independent mode")
        out.append(it)
        batcher.complete(it, now, now + 1)
        now += 1
    return out
