"""What a run accumulates: :class:`RunTotals`, the counters every engine (the SimPy DES, the fast
engine) and the real runner fill, and the metric definitions (:mod:`expertsim.sim.metrics`) read.

One typed record instead of a dict each module spells out: a misspelt counter is an
AttributeError, not a silent new key. Units are in the field names.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(slots=True)
class RunTotals:
    h2d_bytes: int = 0  # host-to-device bytes copied (demand, prefetch, streamed)
    d2h_bytes: int = 0  # device-to-host bytes (write-back of evicted experts)
    copies: int = 0  # host-to-device copies that moved bytes
    prefetch_copies: int = 0  # of which prefetches
    cancelled_prefetches: int = 0  # prefetch copies dropped before they moved every byte
    prefetch_admitted: int = 0  # prefetches admitted to the cache
    prefetch_hits: int = 0  # of which used before eviction
    stall_ns: int = 0  # GPU time waiting for copies (and CPU experts)
    expert_compute_ns: int = 0  # GPU expert compute
    dense_compute_ns: int = 0  # GPU dense compute (attention, router, shared experts)
    cpu_ns: int = 0  # host CPU expert compute
    cpu_experts: int = 0  # experts computed on the host CPU
    storage_bytes: int = 0  # bytes read from the storage tier
    idle_ns: int = 0  # time with no request in flight (open arrivals)
    dropped_gate_mass: float = 0.0  # gate mass of skipped experts (sum over tokens)
    degraded_gate_mass: float = 0.0  # gate mass computed from low-precision copies

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "RunTotals":
        """From a saved record, e.g. the real runner's measurements JSON (unknown keys ignored,
        missing ones zero)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
