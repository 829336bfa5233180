"""ExpertCache: the GPU expert cache's bookkeeping, shared by every engine.

The cache holds (layer, expert) entries, keyed ``key = layer * num_experts + expert``. Capacity is
in bytes per *partition*: one partition per MoE layer (``per_layer=K`` slots of a full-precision
expert each) or one global pool (``global_slots=N`` or ``budget_bytes=B``). Entries may be
smaller than a full expert (a low-precision copy), and are accounted by their bytes.

Every state change happens at a *logical* point of the replay (a lookup, an admission, an
eviction), never at a simulated time, so hits and misses do not depend on timing: the DES, the
fast engine and the real runner see the same sequence. Engines only attach times to it.

An entry is RESIDENT or LOADING (its copy was issued, logically it is there). Pinned entries (the
experts the current layer still needs) are never chosen as victims. Which unpinned entry goes is
the eviction policy's choice (`EvictionPolicy.victim`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from expertsim.errors import ConfigError

ABSENT = 0
RESIDENT = 1
LOADING = 2


@dataclass(frozen=True)
class CacheConfig:
    """How much GPU memory the expert cache has, and how it is partitioned.

    Exactly one of: ``per_layer`` (slots per MoE layer), ``global_slots`` (slots in one pool over
    all layers), ``budget_bytes`` (one pool of bytes), ``unlimited`` (every expert fits: the
    all-on-GPU bound).
    """

    per_layer: int | None = None
    global_slots: int | None = None
    budget_bytes: int | None = None
    unlimited: bool = False

    def __post_init__(self) -> None:
        given = [self.per_layer is not None, self.global_slots is not None,
                 self.budget_bytes is not None, self.unlimited]
        if sum(given) != 1:
            raise ConfigError(
                "give exactly one cache size: --per-layer K, --global-slots N or --cache-gb G"
            )
        for name in ("per_layer", "global_slots", "budget_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
                raise ConfigError(f"cache size {name}={value!r} must be a non-negative integer")

    def describe(self) -> str:
        if self.unlimited:
            return "all experts resident"
        if self.per_layer is not None:
            return f"{self.per_layer} slots per layer"
        if self.global_slots is not None:
            return f"{self.global_slots} slots in one global pool"
        return f"{self.budget_bytes / 1e9:.2f} GB global pool"

    def capacity_bytes(self, num_layers: int, num_experts: int, expert_bytes: int) -> int:
        if self.unlimited:
            return num_layers * num_experts * expert_bytes
        if self.per_layer is not None:
            return self.per_layer * num_layers * expert_bytes
        if self.global_slots is not None:
            return self.global_slots * expert_bytes
        return int(self.budget_bytes)


class ExpertCache:
    """Residency bookkeeping for the GPU expert cache (see the module docstring)."""

    def __init__(self, num_layers: int, num_experts: int, expert_bytes: int, config: CacheConfig,
                 eviction, *, top_k: int = 1):
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.expert_bytes = int(expert_bytes)
        self.config = config
        self.eviction = eviction
        n = num_layers * num_experts
        if config.per_layer is not None:
            if config.per_layer < 1:
                raise ConfigError(
                    f"cache of {config.per_layer} slots per layer holds no expert: give --per-layer 1 or "
                    f"more (fewer slots than top-k={top_k} stream a token's experts through them one by "
                    f"one, as mixtral-offloading with offload_per_layer=7 does)"
                )
            self.num_partitions = num_layers
            cap = config.per_layer * self.expert_bytes
        else:
            self.num_partitions = 1
            cap = config.capacity_bytes(num_layers, num_experts, self.expert_bytes)
            if not config.unlimited and cap < top_k * self.expert_bytes:
                raise ConfigError(
                    f"cache of {cap / 1e9:.3f} GB holds fewer than top-k={top_k} experts of "
                    f"{self.expert_bytes / 1e6:.1f} MB; give at least {top_k} slots "
                    f"({top_k * self.expert_bytes / 1e9:.3f} GB)"
                )
        self.capacity = np.full(self.num_partitions, cap, dtype=np.int64)
        # Python-int mirrors of capacity and use per partition (read at every admission; numpy's
        # per-element cost dominates there): change capacity through set_partition_capacity.
        self._capacity: list[int] = [int(cap)] * self.num_partitions
        self._used: list[int] = [0] * self.num_partitions
        self.state = np.zeros(n, dtype=np.int8)
        # The same states as a bytearray (read per lookup: a Python int, without numpy's per-element
        # cost); every change of state goes to both (admit, mark_resident, _remove).
        self.state_bytes = bytearray(n)
        # Per key, as Python lists (read and written per admission and eviction, where numpy's
        # per-element cost dominates; the numpy arrays are the properties of the same names):
        # an entry's bytes, whether it is a low-precision copy, its slot (-1: absent), whether it
        # was prefetched and not looked up since.
        self.bytes_by_key: list[int] = [0] * n
        self.low_by_key: list[bool] = [False] * n
        self._pins: dict[int, int] = {}  # key -> pin count, for the pinned keys only (see pins)
        self.slot_by_key: list[int] = [-1] * n
        self._used_sum = 0  # sum(self._used), kept as entries come and go
        self._free_slots: list[list[int]] = [[] for _ in range(self.num_partitions)]
        # Each partition's entries (keys, resident or loading), kept as they come and go: the
        # eviction candidates of a small partition or a pool holding few entries, without a pass
        # over every key of the pool.
        self._members: list[set[int]] = [set() for _ in range(self.num_partitions)]
        self._next_slot = np.zeros(self.num_partitions, dtype=np.int64)
        self.peak_used_bytes = 0
        self.evictions = 0
        self.tick = 0  # logical clock: one tick per lookup/admission
        self.preloaded = np.zeros(0, dtype=np.int64)  # keys resident without a copy (see preload)
        # Prefetch accounting: entries admitted ahead of need and not yet looked up.
        self.prefetched_by_key: list[bool] = [False] * n
        self.prefetch_admitted = 0
        self.prefetch_hits = 0

    @property
    def pins(self) -> np.ndarray:
        """Pin count per key (a copy: read-only; pin and unpin change them)."""
        out = np.zeros(self.num_layers * self.num_experts, dtype=np.int32)
        for key, count in self._pins.items():
            out[key] = count
        return out

    @property
    def entry_bytes(self) -> np.ndarray:
        """Bytes per key (a copy: read-only)."""
        return np.array(self.bytes_by_key, dtype=np.int64)

    @property
    def entry_low_precision(self) -> np.ndarray:
        """Per key, whether the entry is a low-precision copy (a copy: read-only)."""
        return np.array(self.low_by_key, dtype=bool)

    @property
    def slot(self) -> np.ndarray:
        """Slot per key, -1 when absent (a copy: read-only)."""
        return np.array(self.slot_by_key, dtype=np.int64)

    @property
    def prefetched(self) -> np.ndarray:
        """Per key, admitted by a prefetch and not looked up since (a copy: read-only)."""
        return np.array(self.prefetched_by_key, dtype=bool)

    @property
    def used(self) -> np.ndarray:
        """Bytes held per partition (a copy: read-only)."""
        return np.array(self._used, dtype=np.int64)

    # --- keys ----------------------------------------------------------------------------
    def key(self, layer: int, expert: int) -> int:
        return int(layer) * self.num_experts + int(expert)

    def split_key(self, key: int) -> tuple[int, int]:
        return divmod(int(key), self.num_experts)

    def partition(self, layer: int) -> int:
        return int(layer) if self.num_partitions > 1 else 0

    # --- queries -------------------------------------------------------------------------
    def contains(self, layer: int, expert: int) -> bool:
        return self.state[self.key(layer, expert)] != ABSENT

    def is_loading(self, layer: int, expert: int) -> bool:
        return self.state[self.key(layer, expert)] == LOADING

    def resident_experts(self, layer: int) -> np.ndarray:
        base = layer * self.num_experts
        return np.flatnonzero(self.state[base:base + self.num_experts] != ABSENT)

    def occupancy_bytes(self) -> int:
        return self._used_sum

    def occupancy_entries(self, layer: int | None = None) -> int:
        if layer is None:
            return int((self.state != ABSENT).sum())
        return len(self.resident_experts(layer))

    def free_bytes(self, layer: int) -> int:
        p = self.partition(layer)
        return self._capacity[p] - self._used[p]

    def set_partition_capacity(self, layer: int, capacity_bytes: int) -> list[int]:
        """Move capacity to or from one layer's partition (cross-layer allocation); evicts
        unpinned victims when it shrinks. Returns the evicted keys."""
        p = self.partition(layer)
        self.capacity[p] = int(capacity_bytes)
        self._capacity[p] = int(capacity_bytes)
        return self._make_room(p, 0, layer)

    # --- state changes -------------------------------------------------------------------
    def preload(self, keys) -> None:
        """Make ``keys`` resident with no copy (a system's initial residents: a static hot set,
        or every expert for all-on-GPU). They belong to the deployment, not to a request: a
        request-scope :meth:`reset` loads them again."""
        self.preloaded = np.asarray(keys, dtype=np.int64)
        self._load_preloaded()

    def _load_preloaded(self) -> None:
        for key in self.preloaded:
            layer, expert = divmod(int(key), self.num_experts)
            self.admit(layer, expert)
            self.mark_resident(layer, expert)

    def reset(self) -> None:
        """Empty the cache (request scope, or a cold start), then load the preloaded keys."""
        for key in np.flatnonzero(self.state != ABSENT):
            self._remove(int(key))
        self.eviction.reset()
        self._load_preloaded()

    def lookup_layer(self, layer: int, experts: list[int], position: int) -> tuple[list, list, list]:
        """Look up a layer's needed experts (Python ints) in order, the i-th at logical position
        ``position + i``, pinning each hit at once: :meth:`is_loading`, :meth:`lookup` and
        :meth:`pin` per expert, in one call. Returns ``(hit, loading, ticks)``: per expert
        whether it hit, whether its copy was still in flight, and the tick of its lookup."""
        base = int(layer) * self.num_experts
        state, prefetched, pins = self.state_bytes, self.prefetched_by_key, self._pins
        on_access = self.eviction.on_access
        hits, loading, ticks = [], [], []
        for i, expert in enumerate(experts):
            key = base + expert
            s = state[key]
            loading.append(s == LOADING)
            self.tick += 1
            hit = s != ABSENT
            if hit and prefetched[key]:
                prefetched[key] = False
                self.prefetch_hits += 1
            on_access(key, self.tick, hit, position + i)
            hits.append(hit)
            ticks.append(self.tick)
            if hit:
                pins[key] = pins.get(key, 0) + 1
        return hits, loading, ticks

    def unpin_layer(self, layer: int, experts) -> None:
        """Release the pins still held on ``experts`` of ``layer`` (the end of a layer)."""
        base = int(layer) * self.num_experts
        pins = self._pins
        for expert in experts:
            key = base + expert
            count = pins.get(key, 0)
            if count > 1:
                pins[key] = count - 1
            elif count == 1:
                del pins[key]

    def lookup(self, layer: int, expert: int, position: int = -1) -> bool:
        """Look an expert up; tells the eviction policy about the access. True on a hit
        (resident or loading)."""
        key = self.key(layer, expert)
        self.tick += 1
        hit = self.state[key] != ABSENT
        if hit and self.prefetched_by_key[key]:
            self.prefetched_by_key[key] = False
            self.prefetch_hits += 1
        self.eviction.on_access(key, self.tick, hit, position)
        return hit

    def pin(self, layer: int, expert: int) -> None:
        self.pin_key(self.key(layer, expert))

    def pin_key(self, key: int) -> None:
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, layer: int, expert: int) -> None:
        key = self.key(layer, expert)
        count = self._pins.get(key, 0)
        if count <= 0:
            raise RuntimeError(f"unpin of unpinned expert {self.split_key(key)}")
        if count == 1:
            del self._pins[key]
        else:
            self._pins[key] = count - 1

    def admit(self, layer: int, expert: int, nbytes: int | None = None, *, low_precision: bool = False,
              position: int = -1, required: bool = True, tick: int | None = None,
              prefetch: bool = False) -> tuple[bool, list[int]]:
        """Reserve room for an expert about to be copied (state LOADING) and return
        ``(admitted, evicted_keys)``. When room cannot be made among unpinned entries: a
        required (demand) admission raises ConfigError, an optional one (prefetch) returns
        ``(False, [])`` and changes nothing. ``tick``: the logical time of the lookup that missed
        (so a token's experts get recency in lookup order); default a new tick. ``prefetch``:
        admitted ahead of need; counted as useful when a lookup hits it before it leaves."""
        layer = int(layer)
        key = layer * self.num_experts + int(expert)
        if self.state_bytes[key]:  # != ABSENT
            return True, []
        nbytes = self.expert_bytes if nbytes is None else int(nbytes)
        p = layer if self.num_partitions > 1 else 0
        capacity = self._capacity[p]
        if nbytes > capacity:
            if required:
                raise ConfigError(
                    f"expert of {nbytes} bytes does not fit in a cache partition of {capacity} bytes"
                )
            return False, []
        used = self._used
        free = capacity - used[p]
        if free < nbytes:
            candidates = self._candidate_list(p, key)
            if not required and not self._frees(candidates, nbytes - free):
                return False, []
            evicted = self._make_room(p, nbytes, layer, exclude=key, position=position, candidates=candidates)
        else:
            evicted = []
        if tick is None:
            self.tick += 1
            tick = self.tick
        self.state[key] = self.state_bytes[key] = LOADING
        self.bytes_by_key[key] = nbytes
        if low_precision:  # an absent entry's flag is False (see _remove)
            self.low_by_key[key] = True
        used[p] += nbytes
        self._used_sum += nbytes
        free_slots = self._free_slots[p]
        self.slot_by_key[key] = free_slots.pop() if free_slots else self._take_slot(p)
        self._members[p].add(key)
        if prefetch:
            self.prefetched_by_key[key] = True
            self.prefetch_admitted += 1
        if self._used_sum > self.peak_used_bytes:
            self.peak_used_bytes = self._used_sum
        self.eviction.on_insert(key, tick, position)
        return True, evicted

    def mark_resident(self, layer: int, expert: int) -> None:
        key = int(layer) * self.num_experts + int(expert)
        if self.state_bytes[key] == LOADING:
            self.state[key] = self.state_bytes[key] = RESIDENT

    def evict(self, key: int) -> None:
        if key in self._pins:
            raise RuntimeError(f"evicting pinned expert {self.split_key(key)}")
        self._remove(key)
        self.evictions += 1
        self.eviction.on_evict(key)

    # --- internals -----------------------------------------------------------------------
    def _candidates(self, p: int, exclude: int = -1) -> np.ndarray:
        """The partition's unpinned entries (ascending keys), less ``exclude``."""
        return np.array(self._candidate_list(p, exclude), dtype=np.int64)

    def _candidate_list(self, p: int, exclude: int = -1) -> list[int]:
        """:meth:`_candidates` as a list of Python ints."""
        members = self._members[p]
        if len(members) <= 64:  # a handful of entries: Python ints beat numpy's per-call cost
            pins = self._pins
            return sorted(members.difference(pins, (exclude,)))  # members not pinned, less exclude
        lo = 0 if self.num_partitions == 1 else p * self.num_experts
        hi = len(self.state) if self.num_partitions == 1 else lo + self.num_experts
        mask = self.state[lo:hi] != ABSENT
        for key in self._pins:
            if lo <= key < hi:
                mask[key - lo] = False
        if lo <= exclude < hi:
            mask[exclude - lo] = False
        return (lo + np.flatnonzero(mask)).tolist()

    def _frees(self, candidates: list[int], need: int) -> bool:
        """Whether evicting every candidate frees at least ``need`` bytes."""
        entry_bytes, total = self.bytes_by_key, 0
        for key in candidates:
            total += entry_bytes[key]
            if total >= need:
                return True
        return need <= 0

    def _make_room(self, p: int, nbytes: int, layer: int, exclude: int = -1, position: int = -1,
                   candidates: list[int] | None = None) -> list[int]:
        """Evict the policy's victims among unpinned entries until ``nbytes`` fit in partition
        ``p``. ``candidates``: the partition's candidate list when the caller has just computed it."""
        evicted: list[int] = []
        capacity, used = self._capacity[p], self._used
        while capacity - used[p] < nbytes:
            if candidates is None:
                candidates = self._candidate_list(p, exclude)
            if len(candidates) == 0:
                raise ConfigError(
                    f"the expert cache partition for layer {layer} is full of experts the current "
                    f"layer still needs ({used[p]} of {capacity} bytes pinned); "
                    f"give the cache more room (at least top-k experts per layer)"
                )
            victim = int(self.eviction.victim(np.array(candidates, dtype=np.int64), self.tick, position))
            if victim not in candidates:
                raise RuntimeError(
                    f"eviction policy {self.eviction!r} chose {victim}, not one of the candidates"
                )
            self.evict(victim)
            evicted.append(victim)
            candidates = None
        return evicted

    def _take_slot(self, p: int) -> int:
        if self._free_slots[p]:
            return self._free_slots[p].pop()
        slot = int(self._next_slot[p])
        self._next_slot[p] += 1
        return slot

    def _remove(self, key: int) -> None:
        p = key // self.num_experts if self.num_partitions > 1 else 0
        nbytes = self.bytes_by_key[key]
        self._used[p] -= nbytes
        self._used_sum -= nbytes
        self._free_slots[p].append(self.slot_by_key[key])
        self._members[p].discard(key)
        self.state[key] = self.state_bytes[key] = ABSENT
        self.bytes_by_key[key] = 0
        self.low_by_key[key] = False
        self.prefetched_by_key[key] = False  # a prefetch that leaves unused was wasted
        self.slot_by_key[key] = -1
