"""The compiled kernel of the fast engine for prefetching systems: an expert cache (LRU, FIFO or
a static hot set) with the :class:`~expertsim.policies.cache.ExpertCache`'s bookkeeping (pins,
slots, ticks, prefetch flags), the :class:`~expertsim.policies.serve.LayerServer`'s serve order
and releases, misses copied, skipped or computed on the host CPU, and the DES's copy engine
(priority queue, promotion, dropped prefetches, the slot's previous copy, copies on the compute
stream), in one pass over the batch-1 schedule.

It is :class:`~expertsim.sim.fast.stepped.SteppedRun` over :class:`~expertsim.sim.fast.events.LinkQueue`
(itself held equal to the DES) for the systems whose every decision it can take itself; their
prefetch requests and miss rules depend on the trace alone and are computed before the run
(:mod:`expertsim.sim.fast.plans`). With one copy engine at most one copy runs at a time, so the
event queue reduces to the running copy's end and the engine's queue; the CPU runs its jobs in
the order they come, so a job's end is known when it starts.
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.cache_kernels import (
    _cache_aware, _evict, _reallocate, _serve_order, _take_slot, _unpinned_bytes, _victim, _victim_priority,
    _victim_sequence,
)
from expertsim.sim.fast.groups import _widest_group
from expertsim.sim.fast.jit import _njit
from expertsim.sim.fast.link_kernels import (  # noqa: F401  (field and total indices re-exported)
    ABSENT, BUSY, CANCELLED, CI_ROWS, CUR, DONE, LOADING, NCF, NCOPY, NPEND, NQ, NSTREAM, O_CI, O_SIGF, O_SIGW,
    O_STREAM, PRIO, Q_ROWS, QUEUED, RESIDENT, NTOT, RUN_END, T_CANCELLED, T_COPIES, T_CPU_EXPERTS, T_CPU_NS, T_D2H,
    T_DENSE, T_EXPERT, T_H2D, T_PEAK, T_PF_ADMITTED, T_PF_COPIES, T_PF_HITS, T_STALL, TOT, _advance, _after_met,
    _compact, _finish, _issue, _link_grown, _link_state, _promote, _start_pending, _wait,
)


@_njit
def simulate_kernel(num_layers, moe_of_layer, p_dense, gstart, keys, gtok, pf_start, pf_key, pf_prio,
                    per_layer, cap, refresh, protect, num_experts, expert_ns, copy_ns, host_layer_ns, host_expert_ns,
                    serial, fifo_link, expert_bytes, miss_mode, rule_ok, gate_mass, cpu_ns, background, cache_aware,
                    copy_rows, counts, initial, low_bytes, copy_ns_low, expert_ns_low, level, ev_kind,
                    new_request, bg_rank, wb_ns, adapt, alloc):
    """One batch-1 run (see the module docstring). Per pass: (start_ns, end_ns, hits, misses, stall_ns, experts);
    ``tot``: the totals (T_* indices); ``err``: -1, or the group whose admission found no room (the DES raises
    there), or -2: the distance moved to an absent plan; the dropped gate mass. ``miss_mode`` 0: every miss is
    copied; 1: a miss where ``rule_ok`` (per access) is skipped (SkipMisses), dropping its ``gate_mass``; 2: one
    where ``rule_ok`` is computed on the host CPU (CpuWhenCheaper; one job at a time, ``cpu_ns`` by tokens), then
    copied in the background when ``background``; 3: by ``level`` (per access, HOBBIT's GateThresholdPrecision): 2
    copied, 1 copied in low precision (``low_bytes``, ``copy_ns_low``; computed in ``expert_ns_low`` by tokens, as
    are the hits on it), 0 skipped. ``cap``: each partition's capacity in bytes (entries take their copy's bytes;
    with whole experts only, a count of slots). ``cache_aware``: the serve order of
    :func:`~expertsim.policies.scheduling.cache_aware_order` (resident, then loading, then misses; more tokens
    first, then the lowest id). ``copy_rows``: the copy table's first size (it drops the copies that ended, then
    grows, as needed). ``counts``: a static hot set's profile per key (its eviction order), else empty; ``initial``:
    keys resident before the run (ExpertCache.preload, one tick each). ``ev_kind`` 1: the victims of
    :class:`~expertsim.policies.eviction.ActivationPriority` (MoE-Infinity), from the current request's and the
    run's activation counts (``new_request``: the passes that start a request, where the request's counts restart);
    2: of :class:`~expertsim.policies.eviction.SequenceActivation` (DAOP: the request's count). The CPU's experts
    copied in the background are the accesses with ``bg_rank`` >= 0, in its order. ``wb_ns`` > 0 (a write-back
    runtime): as many of a layer's copies as it evicted entries not being copied first write one expert back, taking
    ``wb_ns`` more. ``pf_start`` [distances, groups + 1]: the prefetch plan of each distance (one row unless
    adaptive), trimmed here as ComposedSystem.fit_prefetches with the partitions' current slots. ``adapt`` (initial,
    min, max distance, calm layers; initial 0: fixed): AdaptiveDistance, one layer further after a layer that
    stalled, one nearer after ``calm`` layers without. ``alloc`` (interval, min slots; interval 0: none):
    CrossLayerAllocator, every ``interval`` passes each partition resized by its working set
    (:func:`~expertsim.policies.allocation.proportional_slots`, compiled), shrinking first, evicting
    the policy's victims. Returns also the gate mass computed from low-precision copies."""
    n_pass = p_dense.shape[0]
    num_moe = 0
    for layer in range(num_layers):
        if moe_of_layer[layer] >= 0:
            num_moe += 1
    num_keys = num_moe * num_experts
    num_parts = cap.shape[0]
    max_slots = num_experts if alloc[0] > 0 else 1  # entries a partition can hold (slots handed out)
    for p in range(num_parts):
        max_slots = max(max_slots, cap[p] // max(1, min(expert_bytes, low_bytes)))
    distance = adapt[0]  # AdaptiveDistance's state
    calm = 0
    n_used = np.zeros(num_parts, dtype=np.int64)  # fit_prefetches' count per partition
    worked = np.zeros((num_moe, num_experts), dtype=np.bool_)  # CrossLayerAllocator's working sets
    alloc_slots = cap // expert_bytes
    passes_done = 0
    n_acc = keys.shape[0]
    widest = _widest_group(gstart)  # a layer's needed experts
    max_pf = widest  # a layer's prefetches (the widest plan), and its background copies
    for d in range(pf_start.shape[0]):
        max_pf = max(max_pf, _widest_group(pf_start[d]) + widest)
    kept = np.zeros(max_pf + 1, dtype=np.int64)  # the fitted requests of a layer
    # the link state (see link_kernels): the copy table drops ended copies, then grows (doubling); the queue grows
    # (with the FIFO link nothing leaves it early); the pending starts and the stream hold two layers' issues
    max_copies = max(1, min(n_acc + pf_key.shape[0] + 1, copy_rows))
    lk = _link_state(num_keys, num_parts, max_slots + 1, 2 * (widest + max_pf) + 1, widest, 1024, max_copies)
    oc = lk[O_CI]  # the copy table's offset (it moves when the link state grows)
    o_stream, o_sigf, o_sigw = lk[O_STREAM], lk[O_SIGF], lk[O_SIGW]  # these do not
    cstate = np.zeros(num_keys, dtype=np.int8)
    pins = np.zeros(num_keys, dtype=np.int64)
    score = np.zeros(num_keys, dtype=np.int64)
    slot = np.full(num_keys, -1, dtype=np.int64)
    prefetched = np.zeros(num_keys, dtype=np.bool_)
    eam = np.zeros((num_moe, num_experts))  # ActivationPriority's counts: this request's, the run's
    freq = np.zeros((num_moe, num_experts))
    eam_sum = np.zeros(num_moe)
    freq_total = 0.0
    ebytes = np.zeros(num_keys, dtype=np.int64)  # an entry's bytes (ExpertCache.entry_bytes)
    lowp = np.zeros(num_keys, dtype=np.bool_)  # ExpertCache.entry_low_precision
    it_low = np.zeros(widest, dtype=np.bool_)  # computed from a low-precision copy
    nbytes_of = np.zeros(widest, dtype=np.int64)  # a miss's copy bytes
    used = np.zeros(num_parts, dtype=np.int64)
    free = np.zeros((num_parts, max_slots + 1), dtype=np.int64)
    nfree = np.zeros(num_parts, dtype=np.int64)
    next_slot = np.zeros(num_parts, dtype=np.int64)
    slot_key = np.full((num_parts, max_slots + 1), -1, dtype=np.int64)  # the key in each slot
    has_sig = np.zeros(widest, dtype=np.bool_)
    it_key = np.zeros(widest, dtype=np.int64)
    it_hit = np.zeros(widest, dtype=np.bool_)
    it_load = np.zeros(widest, dtype=np.bool_)
    it_tok = np.zeros(widest, dtype=np.int64)
    it_tick = np.zeros(widest, dtype=np.int64)
    it_rel = np.zeros(widest, dtype=np.bool_)
    it_wait = np.zeros(widest, dtype=np.int64)
    it_copy = np.zeros(widest, dtype=np.bool_)
    it_hc = np.zeros(widest, dtype=np.int64)
    it_slot = np.zeros(widest, dtype=np.int64)  # the slot at admission (ServeItem.slot)
    it_acc = np.zeros(widest, dtype=np.int64)  # the access index (skip_ok, gate_mass)
    it_skip = np.zeros(widest, dtype=np.bool_)  # skipped or on the CPU: no room, no copy
    it_cpu = np.zeros(widest, dtype=np.bool_)
    cpu_keys = np.zeros(widest, dtype=np.int64)
    cpu_rank = np.zeros(widest, dtype=np.int64)
    cpu_end = np.zeros(widest, dtype=np.int64)
    cpu_free = 0  # when the host CPU's last job ends
    dropped_mass = 0.0
    degraded_mass = 0.0
    scratch = np.zeros((6, widest), dtype=np.int64)  # _serve_order's
    pfi_key = np.zeros(max_pf, dtype=np.int64)
    req_key = np.zeros(max_pf, dtype=np.int64)
    req_prio = np.zeros(max_pf, dtype=np.int64)
    pfi_prio = np.zeros(max_pf, dtype=np.int64)
    pfi_slot = np.zeros(max_pf, dtype=np.int64)
    per_room = expert_bytes // max(1, min(expert_bytes, low_bytes)) + 1  # evictions one admission may take
    waiting = np.zeros((widest + max_pf) * per_room, dtype=np.int64)  # _promote's
    evicted = np.zeros((widest + max_pf) * per_room, dtype=np.int64)
    promoted = np.zeros(widest, dtype=np.int64)
    dropped = np.zeros((widest + max_pf) * per_room, dtype=np.int64)
    out_start = np.zeros(n_pass, dtype=np.int64)
    out_end = np.zeros(n_pass, dtype=np.int64)
    out_hits = np.zeros(n_pass, dtype=np.int64)
    out_misses = np.zeros(n_pass, dtype=np.int64)
    out_stall = np.zeros(n_pass, dtype=np.int64)
    out_experts = np.zeros(n_pass, dtype=np.int64)
    # _issue's arguments as typed values, not literals (one compiled _issue, not one per literal)
    demand, no_signal = np.int64(0), np.int64(-1)
    is_prefetch, no_prefetch = np.bool_(True), np.bool_(False)
    now = 0
    tick = 0
    entries = 0  # bytes held (ExpertCache._used_sum) and their peak
    peak = 0
    for key in initial:  # ExpertCache.preload: admitted in order (a tick each), resident at once
        p = key // num_experts if per_layer else 0
        tick += 1
        cstate[key] = RESIDENT
        used[p] += expert_bytes
        ebytes[key] = expert_bytes
        _take_slot(p, key, slot, slot_key, free, nfree, next_slot)
        score[key] = tick
        entries += expert_bytes
        peak = max(peak, entries)
    err = -1
    g = -1
    for pi in range(n_pass):
        if ev_kind > 0 and new_request[pi]:
            eam[:] = 0.0
            eam_sum[:] = 0.0
        start_iter = now
        t_dense = p_dense[pi]
        stall_it = 0
        for layer in range(num_layers):
            if serial:
                host = min(host_layer_ns, t_dense)
                if lk[NPEND] > 0:
                    _start_pending(lk)
                now += host
                for s in range(lk[NSTREAM]):  # drain the stream
                    end = _wait(lk, cstate, lk[o_stream + s])
                    if end > now:
                        stall_it += end - now
                        lk[TOT + T_STALL] += end - now
                        now = end
                lk[NSTREAM] = 0
                if lk[NPEND] > 0:
                    _start_pending(lk)
                now += t_dense - host
            else:
                if lk[NPEND] > 0:
                    _start_pending(lk)
                now += t_dense
            m = moe_of_layer[layer]
            if m < 0:
                continue
            g += 1
            if lk[NPEND] > 0 or (lk[BUSY] == 1 and lk[RUN_END] <= now):  # else nothing is due
                _advance(lk, cstate, now, True)
            if lk[NCOPY] + widest + max_pf + 1 > lk[CI_ROWS]:  # room for this layer's copies
                _compact(lk)  # the copies that ended leave the table
                if 2 * (lk[NCOPY] + widest + max_pf + 1) > lk[CI_ROWS]:
                    lk = _link_grown(lk, lk[Q_ROWS], 2 * lk[CI_ROWS] + widest + max_pf)
            if lk[NQ] + widest + max_pf + 1 > lk[Q_ROWS]:
                lk = _link_grown(lk, 2 * lk[Q_ROWS] + widest + max_pf, lk[CI_ROWS])
            oc = lk[O_CI]
            a = gstart[g]
            n = gstart[g + 1] - a
            part = m if per_layer else 0
            # 1. lookups, ascending ids (ExpertCache.lookup_layer)
            h = 0
            for i in range(n):
                key = keys[a + i]
                tick += 1
                s = cstate[key]
                hit = s != ABSENT
                if hit and prefetched[key]:
                    prefetched[key] = False
                    lk[TOT + T_PF_HITS] += 1
                if refresh:
                    score[key] = tick
                if hit:
                    pins[key] += 1
                    h += 1
                it_key[i] = key
                it_hit[i] = hit
                it_load[i] = s == LOADING
                it_tick[i] = tick
                it_tok[i] = gtok[a + i]
                it_acc[i] = a + i
            # serve order: hits ascending, then misses ascending (or the cache-aware order)
            nh = h
            if 0 < nh < n:  # else already in order
                _serve_order(it_key, it_hit, it_load, it_tick, it_tok, it_acc, n, nh, scratch)
            if cache_aware:
                _cache_aware(it_key, it_hit, it_load, it_tick, it_tok, it_acc, n)
            if ev_kind > 0:  # ActivationPriority / SequenceActivation.on_layer: every use counts
                for i in range(n):
                    e = it_key[i] - m * num_experts
                    eam[m, e] += it_tok[i]
                    freq[m, e] += it_tok[i]
                    eam_sum[m] += it_tok[i]
                    freq_total += it_tok[i]
            # 2. the system's prefetch requests, fitted (fit_prefetches: per partition at most its
            # slots, less the layer's needs in its own or the one pool); predicted residents get
            # recency (on_predicted)
            row = distance - adapt[1] if adapt[0] > 0 else 0
            nkept = 0
            for r in range(pf_start[row, g], pf_start[row, g + 1]):
                pp = pf_key[r] // num_experts if per_layer else 0
                limit = cap[pp] // expert_bytes - (n if (not per_layer or pp == part) else 0)
                if n_used[pp] < limit:
                    kept[nkept] = r
                    nkept += 1
                    n_used[pp] += 1
            for j in range(nkept):
                n_used[pf_key[kept[j]] // num_experts if per_layer else 0] = 0
            if protect:
                for j in range(nkept):
                    k = pf_key[kept[j]]
                    if cstate[k] != ABSENT and score[k] < tick:
                        score[k] = tick
            # 3. misses: admit (evicting), releasing the earliest-served when all is pinned
            nev = 0
            rel_ptr = 0
            for i in range(n):
                it_rel[i] = False
                it_wait[i] = -1
                it_copy[i] = False
                it_skip[i] = False
                it_cpu[i] = False
                has_sig[i] = False
                it_low[i] = it_hit[i] and lowp[it_key[i]]
            layer_drop = 0.0
            ncpu = 0
            for i in range(nh, n):
                key = it_key[i]
                skip = miss_mode != 0 and miss_mode != 3 and rule_ok[it_acc[i]]
                if skip or (miss_mode == 3 and level[it_acc[i]] == 0):  # skipped or on the CPU: no room, no copy
                    it_skip[i] = True
                    it_slot[i] = -1
                    if miss_mode == 2:
                        it_cpu[i] = True
                        cpu_keys[ncpu] = key
                        cpu_rank[ncpu] = bg_rank[it_acc[i]] if background else -1
                        ncpu += 1
                    else:
                        layer_drop += gate_mass[it_acc[i]]
                    continue
                nb = expert_bytes
                if miss_mode == 3 and level[it_acc[i]] == 1:
                    nb = low_bytes
                    it_low[i] = True
                nbytes_of[i] = nb
                nev0 = nev
                while cap[part] - used[part] < nb:  # ExpertCache.admit (optional) in the release loop
                    v = _victim(pins, score, slot_key, part, next_slot[part], key, counts) if ev_kind == 0 else \
                        _victim_priority(pins, score, slot_key, part, next_slot[part], key, prefetched, m, eam, eam_sum,
                                         freq, freq_total, num_moe, num_experts) if ev_kind == 1 else \
                        _victim_sequence(pins, score, slot_key, part, next_slot[part], key, eam, num_experts)
                    # room: the first victim alone frees enough (whole experts), or all candidates do
                    if v >= 0 and (cap[part] - used[part] + ebytes[v] >= nb or cap[part] - used[part] + _unpinned_bytes(
                            pins, ebytes, slot_key, part, next_slot[part], key) >= nb):
                        while True:  # _make_room: the policy's victims until it fits
                            entries -= _evict(v, cstate, slot, slot_key, free, nfree, used, prefetched, ebytes, lowp,
                                              per_layer, num_experts)
                            evicted[nev] = v
                            nev += 1
                            if cap[part] - used[part] >= nb:
                                break
                            v = _victim(pins, score, slot_key, part, next_slot[part], key, counts) \
                                if ev_kind == 0 else _victim_priority(
                                    pins, score, slot_key, part, next_slot[part], key, prefetched, m, eam, eam_sum,
                                    freq, freq_total, num_moe, num_experts) if ev_kind == 1 else _victim_sequence(
                                    pins, score, slot_key, part, next_slot[part], key, eam, num_experts)
                        break
                    while rel_ptr < i and (it_rel[rel_ptr] or it_skip[rel_ptr]):
                        rel_ptr += 1
                    if rel_ptr >= i:
                        err = g
                        break
                    pins[it_key[rel_ptr]] -= 1
                    it_rel[rel_ptr] = True
                    rel_ptr += 1
                if err >= 0:
                    break
                if nev > nev0 and rel_ptr > 0:
                    for j in range(i):
                        if it_rel[j] and j > it_wait[i]:
                            for e in range(nev0, nev):
                                if it_key[j] == evicted[e]:
                                    it_wait[i] = j
                cstate[key] = LOADING
                used[part] += nb
                ebytes[key] = nb
                lowp[key] = it_low[i]
                _take_slot(part, key, slot, slot_key, free, nfree, next_slot)
                it_slot[i] = slot[key]
                score[key] = it_tick[i]
                entries += nb
                if entries > peak:
                    peak = entries
                pins[key] += 1
                it_copy[i] = True
                if it_wait[i] >= 0:
                    has_sig[it_wait[i]] = True
            if err >= 0:
                break
            if miss_mode == 3:  # LayerServer: the gate mass of the items computed from low precision
                layer_degraded = 0.0
                for i in range(n):
                    if it_low[i]:
                        layer_degraded += gate_mass[it_acc[i]]
                degraded_mass += layer_degraded
            # 4. prefetch admissions (optional: dropped when no unpinned room)
            # the requests: the system's (trimmed), then the CPU's experts copied in the background
            nreq = 0
            low = 0
            for j in range(nkept):
                r = kept[j]
                req_key[nreq] = pf_key[r]
                req_prio[nreq] = max(pf_prio[r], 1)
                low = max(low, pf_prio[r])
                nreq += 1
            if background and ncpu > 0:  # by rank (the miss handler's order), below every prefetch
                for i in range(1, ncpu):  # insertion sort: a handful
                    x, xr = cpu_keys[i], cpu_rank[i]
                    j = i - 1
                    while j >= 0 and cpu_rank[j] > xr:
                        cpu_keys[j + 1], cpu_rank[j + 1] = cpu_keys[j], cpu_rank[j]
                        j -= 1
                    cpu_keys[j + 1], cpu_rank[j + 1] = x, xr
                for r in range(ncpu):
                    if cpu_rank[r] >= 0:
                        req_key[nreq] = cpu_keys[r]
                        req_prio[nreq] = low + 1
                        nreq += 1
            npf = 0
            for r in range(nreq):  # optional admissions: skipped when present or when no unpinned room
                key = req_key[r]
                if cstate[key] != ABSENT:
                    continue
                pp = key // num_experts if per_layer else 0
                if cap[pp] - used[pp] < expert_bytes:
                    v = _victim(pins, score, slot_key, pp, next_slot[pp], key, counts) if ev_kind == 0 else \
                        _victim_priority(pins, score, slot_key, pp, next_slot[pp], key, prefetched, m, eam, eam_sum,
                                         freq, freq_total, num_moe, num_experts) if ev_kind == 1 else \
                        _victim_sequence(pins, score, slot_key, pp, next_slot[pp], key, eam, num_experts)
                    if v < 0 or (cap[pp] - used[pp] + ebytes[v] < expert_bytes and cap[pp] - used[pp] + _unpinned_bytes(
                            pins, ebytes, slot_key, pp, next_slot[pp], key) < expert_bytes):
                        continue  # no unpinned room
                    while True:
                        entries -= _evict(v, cstate, slot, slot_key, free, nfree, used, prefetched, ebytes, lowp,
                                          per_layer, num_experts)
                        evicted[nev] = v
                        nev += 1
                        if cap[pp] - used[pp] >= expert_bytes:
                            break
                        v = _victim(pins, score, slot_key, pp, next_slot[pp], key, counts) if ev_kind == 0 else \
                            _victim_priority(pins, score, slot_key, pp, next_slot[pp], key, prefetched, m, eam, eam_sum,
                                             freq, freq_total, num_moe, num_experts) if ev_kind == 1 else \
                            _victim_sequence(pins, score, slot_key, pp, next_slot[pp], key, eam, num_experts)
                tick += 1
                cstate[key] = LOADING
                used[pp] += expert_bytes
                ebytes[key] = expert_bytes
                _take_slot(pp, key, slot, slot_key, free, nfree, next_slot)
                pfi_slot[npf] = slot[key]
                prefetched[key] = True
                lk[TOT + T_PF_ADMITTED] += 1
                score[key] = tick
                entries += expert_bytes
                if entries > peak:
                    peak = entries
                pfi_key[npf] = key
                pfi_prio[npf] = req_prio[r]
                npf += 1
            # --- timing (SteppedRun._moe_layer) ---
            npro = 0
            for i in range(nh):
                c = lk[CUR + it_key[i]]
                it_hc[i] = c
                if it_load[i] and c >= 0 and lk[oc + c * NCF + DONE] < 0 and lk[oc + c * NCF + PRIO] > 0:
                    lk[oc + c * NCF + PRIO] = 0
                    if lk[oc + c * NCF + QUEUED] == 1 and lk[oc + c * NCF + CANCELLED] == 0:
                        promoted[npro] = c
                        npro += 1
            nwb = 0  # the write-backs: the evicted entries not being copied (before their cancels)
            if wb_ns > 0:
                nwb = nev
                for e in range(nev):
                    c = lk[CUR + evicted[e]]
                    if c >= 0 and lk[oc + c * NCF + DONE] < 0:
                        nwb -= 1
            nissued = 0
            ndrop = 0
            for e in range(nev):
                key = evicted[e]
                own = False
                for i in range(nh):
                    if it_key[i] == key:
                        own = True
                if not own:
                    c = lk[CUR + key]
                    if c >= 0 and lk[oc + c * NCF + DONE] < 0 and not fifo_link:
                        lk[oc + c * NCF + CANCELLED] = 1
                        if lk[oc + c * NCF + QUEUED] == 1:
                            dropped[ndrop] = c
                            ndrop += 1
                lk[CUR + key] = -1
            for i in range(n):
                lk[o_sigf + i] = 0
                lk[o_sigw + i] = -1
            if not serial:
                for i in range(nh, n):
                    if it_copy[i]:
                        key = it_key[i]
                        _issue(lk, key,
                               part, it_slot[i], demand, no_prefetch, it_wait[i], now,
                               (copy_ns_low if it_low[i] else copy_ns) + (wb_ns if nissued < nwb else 0), nbytes_of[i],
                               expert_bytes if nissued < nwb else 0, serial, fifo_link)
                        nissued += 1
                for r in range(npf):
                    key = pfi_key[r]
                    pp = key // num_experts if per_layer else 0
                    _issue(lk, key, pp,
                           pfi_slot[r], pfi_prio[r], is_prefetch, no_signal, now,
                           copy_ns + (wb_ns if nissued < nwb else 0), expert_bytes,
                           expert_bytes if nissued < nwb else 0, serial, fifo_link)
                    nissued += 1
            if npro > 0 or ndrop > 0:
                _start_pending(lk)
                _promote(lk, promoted, npro, dropped, ndrop, now, waiting)
            stall = 0
            computed = 0
            host_ns = host_expert_ns if serial else 0
            dropped_mass += layer_drop
            njobs = 0
            for i in range(n):
                key = it_key[i]
                if it_cpu[i]:  # a host CPU job, first come first served
                    if lk[NPEND] > 0 or (lk[BUSY] == 1 and lk[RUN_END] <= now):  # else nothing is due
                        _advance(lk, cstate, now, True)
                    d = cpu_ns[it_tok[i]]
                    cpu_free = max(now, cpu_free) + d
                    cpu_end[njobs] = cpu_free
                    njobs += 1
                    lk[TOT + T_CPU_NS] += d
                    continue
                if it_skip[i]:
                    continue
                if serial and it_copy[i]:
                    if lk[NPEND] > 0 or (lk[BUSY] == 1 and lk[RUN_END] <= now):  # else nothing is due
                        _advance(lk, cstate, now, True)
                    _issue(lk, key,
                           part, it_slot[i], demand, no_prefetch, it_wait[i], now,
                           (copy_ns_low if it_low[i] else copy_ns) + (wb_ns if nissued < nwb else 0), nbytes_of[i],
                           expert_bytes if nissued < nwb else 0, serial, fifo_link)
                    nissued += 1
                t = expert_ns_low[it_tok[i]] if it_low[i] else expert_ns[it_tok[i]]
                host = min(host_ns, t)
                if host > 0:
                    if lk[NPEND] > 0:
                        _start_pending(lk)
                    now += host
                    for s in range(lk[NSTREAM]):
                        end = _wait(lk, cstate, lk[o_stream + s])
                        if end > now:
                            stall += end - now
                            now = end
                    lk[NSTREAM] = 0
                c = it_hc[i] if it_hit[i] else lk[CUR + key]
                if c >= 0:
                    end = lk[oc + c * NCF + DONE] if lk[NPEND] == 0 and lk[oc + c * NCF + DONE] >= 0 else \
                        _wait(lk, cstate, c)
                    if end > now:
                        stall += end - now
                        now = end
                if serial:
                    for s in range(lk[NSTREAM]):
                        end = _wait(lk, cstate, lk[o_stream + s])
                        if end > now:
                            stall += end - now
                            now = end
                    lk[NSTREAM] = 0
                if lk[NPEND] > 0:
                    _start_pending(lk)
                now += t - host
                computed += t
                if has_sig[i]:
                    if lk[NPEND] > 0 or (lk[BUSY] == 1 and lk[RUN_END] <= now):  # else nothing is due
                        _advance(lk, cstate, now, True)
                    lk[o_sigf + i] = 1
                    w = lk[o_sigw + i]
                    if w >= 0:
                        lk[o_sigw + i] = -1
                        _after_met(lk, w, now)
            lk[TOT + T_EXPERT] += computed
            if serial and npf > 0:
                if lk[NPEND] > 0 or (lk[BUSY] == 1 and lk[RUN_END] <= now):  # else nothing is due
                    _advance(lk, cstate, now, True)
                for r in range(npf):
                    key = pfi_key[r]
                    pp = key // num_experts if per_layer else 0
                    _issue(lk, key, pp,
                           pfi_slot[r], pfi_prio[r], is_prefetch, no_signal, now,
                           copy_ns + (wb_ns if nissued < nwb else 0), expert_bytes,
                           expert_bytes if nissued < nwb else 0, serial, fifo_link)
                    nissued += 1
            for j in range(njobs):  # the layer ends when its CPU jobs have
                if cpu_end[j] > now:
                    stall += cpu_end[j] - now
                    now = cpu_end[j]
            lk[TOT + T_CPU_EXPERTS] += ncpu
            out_hits[pi] += nh
            out_misses[pi] += n - nh
            stall_it += stall
            out_experts[pi] += n
            lk[TOT + T_STALL] += stall
            for i in range(n):  # LayerServer.finish: the layer's pins go
                if pins[it_key[i]] > 0:
                    pins[it_key[i]] -= 1
            if adapt[0] > 0:  # AdaptiveDistance.on_layer_end
                if stall > 0:
                    distance = min(distance + 1, adapt[2])
                    calm = 0
                else:
                    calm += 1
                    if calm >= adapt[3]:
                        distance = max(distance - 1, adapt[1])
                        calm = 0
                if pf_start[distance - adapt[1], 0] < 0:  # a plan not made: err -2 (plans.simulate makes it)
                    err = -2
                    break
            if alloc[0] > 0 and per_layer:  # CrossLayerAllocator.on_layer_end
                for i in range(n):
                    worked[m, it_key[i] - m * num_experts] = True
                if m == num_moe - 1:
                    passes_done += 1
                    if passes_done % alloc[0] == 0:
                        entries -= _reallocate(worked, alloc_slots, alloc[1], cap, used, expert_bytes, pins, score,
                                               slot_key, next_slot, counts, prefetched, m, eam, eam_sum, freq,
                                               freq_total, ev_kind, cstate, slot, free, nfree, ebytes, lowp, num_moe,
                                               num_experts)
        if err != -1:
            break
        lk[TOT + T_DENSE] += t_dense * num_layers
        out_start[pi] = start_iter
        out_end[pi] = now
        out_stall[pi] = stall_it
    _start_pending(lk)
    while lk[BUSY] == 1:
        _finish(lk, cstate)
    lk[TOT + T_PEAK] = peak
    tot = lk[TOT:TOT + NTOT].copy()
    return out_start, out_end, out_hits, out_misses, out_stall, out_experts, tot, err, dropped_mass, degraded_mass
