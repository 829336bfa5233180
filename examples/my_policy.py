"""A user's own eviction policy, as a plug-in: one class in its own file, one decorator line.

Use it from any command with ``--plugin examples/my_policy.py`` (or package it and declare an
entry point in the ``expertsim.policies`` group), then name it like a built-in:

    expertsim policies list --plugin examples/my_policy.py
    expertsim cache --plugin examples/my_policy.py --policy mru --trace T.parquet --per-layer 4
    expertsim simulate --plugin examples/my_policy.py --policy mru --per-layer 2

or from Python:

    from expertsim.policies import load_plugin, make_policy
    load_plugin("examples/my_policy.py")
    system = make_policy("mru")   # a System that copies on every miss and evicts with MRU

An eviction policy keeps its own state and answers ``victim(candidates, tick, position)``: which
of the unpinned cached keys (``layer * num_experts + expert``) leaves. The hooks it may override
are on :class:`expertsim.policies.EvictionPolicy` (``prepare``, ``on_access``, ``on_insert``,
``on_evict``, ``on_layer``, ``reset``).
"""
from __future__ import annotations

import numpy as np

from expertsim.policies import EvictionPolicy, register_eviction


@register_eviction("mru")
class MostRecentlyUsed(EvictionPolicy):
    """Most recently used leaves (Chou & DeWitt, VLDB 1985): good for cyclic scans longer than
    the cache, where LRU always evicts the expert needed next."""

    description = "most recently used leaves (example plug-in)"

    def prepare(self, ctx):
        self.last = np.zeros(ctx.cache.num_layers * ctx.cache.num_experts, dtype=np.int64)

    def on_access(self, key, tick, hit, position):
        self.last[key] = tick

    def on_insert(self, key, tick, position):
        self.last[key] = tick

    def victim(self, candidates, tick, position):
        return int(candidates[np.argmax(self.last[candidates])])
