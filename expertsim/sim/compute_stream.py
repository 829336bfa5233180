"""What the DES's compute stream (:mod:`expertsim.sim.engine`) and the fast engine's stepped run
(:mod:`expertsim.sim.fast.stepped`) keep alike: the KV check of an iteration, the progress line,
and the end of an MoE layer (its counts, the run's totals, the system's feedback)."""
from __future__ import annotations

import time

from expertsim.policies import LayerOutcome


class ComputeStreamBook:
    """A mixin of both runs; they set ``sim``, ``trace``, ``batcher``, ``server``, ``memory``,
    ``totals``, ``max_kv_tokens``, ``wants_outcome``, ``now``, ``progress``, ``_tokens_done``,
    ``_wall0`` and ``_last_report``."""

    PROGRESS_EVERY_S = 5.0  # wall seconds between progress lines
    ENGINE_NAME = "des"

    def _check_kv(self, it) -> None:
        """KV held during the iteration: every running request's context, the iteration's
        requests at their context after the pass."""
        batcher = self.batcher
        chosen = set(it.requests)
        kv = sum(c for c in it.request_contexts) + sum(
            batcher.by_id[r].context_tokens for r in batcher._running if r not in chosen)
        if kv > self.max_kv_tokens:
            self.max_kv_tokens = kv
            if self.sim.options.check_memory:
                self.memory.check(kv, where=f" at iteration {it.index} with {len(batcher._running)} "
                                            f"requests in flight (--batch {batcher.max_batch})")

    def _report(self, tokens: int) -> None:
        self._tokens_done += tokens
        now = time.perf_counter()
        if now - self._last_report >= self.PROGRESS_EVERY_S:
            self._last_report = now
            total = self.trace.num_tokens
            self.progress(f"{self.ENGINE_NAME}: {self._tokens_done:,}/{total:,} tokens "
                          f"({100 * self._tokens_done / max(total, 1):.0f}%), "
                          f"{self.now / 1e9:,.1f} s simulated, {now - self._wall0:.0f} s wall")

    def _end_layer(self, obs, plan, stats: dict, stall: int, layer_start: int) -> None:
        """The layer's counts into the iteration's ``stats`` and the run's totals; its pins go
        and the system hears the outcome (when it reads it)."""
        stats["hits"] += plan.hits
        stats["misses"] += plan.misses
        stats["stall_ns"] += stall
        stats["experts"] += len(plan.items)
        totals = self.totals
        totals.stall_ns += stall
        totals.dropped_gate_mass += plan.dropped_gate_mass
        totals.degraded_gate_mass += plan.degraded_gate_mass
        totals.cpu_experts += plan.cpu_experts
        outcome = LayerOutcome(layer=obs.layer, hits=plan.hits, misses=plan.misses, stall_ns=stall,
                               start_ns=layer_start, end_ns=self.now) if self.wants_outcome else None
        self.server.finish(obs, plan, outcome)
