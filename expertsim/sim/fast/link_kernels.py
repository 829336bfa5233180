"""The DES's copy engine as compiled kernels (the compiled twin of
:class:`~expertsim.sim.fast.events.LinkQueue` for one copy engine): copies are rows of the copy
table (fields below), the engine's queue is kept in (priority, order of requests) order, and the
copies issued by the compute stream start with the next pending start, as SimPy processes do.
Used by :mod:`expertsim.sim.fast.prefetching`.

The whole link state is one int64 array ``lk`` (built by :func:`_link_state`), so that a helper
takes one reference-counted argument (numba counts references to every array argument at
every call, atomically, and that was most of the kernel's time): the header fields below, then at
fixed offsets the totals (``lk[TOT + T_*]``) and each key's latest copy (``lk[CUR + key]``, -1:
none), then, at the offsets the header holds, each slot's latest copy (``O_SLOT``: partition-major,
``SLOT_W`` slots a partition), the pending starts (``O_PEND``), the copies on the compute stream
(``O_STREAM``), the compute-done signals (``O_SIGF``: fired, ``O_SIGW``: the copy waiting), the
engine's queue (``O_Q``: ``Q_ROWS`` rows of (priority, copy), ``NQ`` of them from row ``QH``: the
head leaves by a step of ``QH``, and the queue moves back to row 0 when a request finds no row
after its tail) and the copy table (``O_CI``: ``CI_ROWS`` rows of ``NCF`` fields; copy ``c``'s
field ``F`` is ``lk[lk[O_CI] + c * NCF + F]``).
The queue and the table come last: they grow (:func:`_link_grown`), the rest keeps its offsets.
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.jit import _njit

# copy fields (a row of the copy table)
KEY, PRIO, PREFETCH, AFTER, PREV, NEXT, CANCELLED, QUEUED, DONE, WAITPREV, ISSUE, DUR, BYTES, WB = range(14)
NCF = 14
# the header of ``lk``: the engine's state, the counts, then the offsets and sizes of the regions
(BUSY, RUNNING, RUN_END, SEQ, NCOPY, NPEND, NQ, NSTREAM, O_SLOT, SLOT_W, O_PEND, O_STREAM, O_SIGF, O_SIGW, O_Q, Q_ROWS,
 O_CI, CI_ROWS, QH) = range(19)
NHEAD = 19
# totals (``lk[TOT + T_*]``)
(T_H2D, T_COPIES, T_PF_COPIES, T_CANCELLED, T_PF_ADMITTED, T_PF_HITS, T_STALL, T_EXPERT, T_DENSE, T_PEAK, T_CPU_NS,
 T_CPU_EXPERTS, T_D2H) = range(13)
NTOT = 13
TOT = NHEAD
CUR = TOT + NTOT  # each key's latest copy
# cache entry states (as ExpertCache)
ABSENT, RESIDENT, LOADING = 0, 1, 2


@_njit
def _link_state(num_keys, num_parts, slot_w, n_pend, n_sig, q_rows, ci_rows):
    """A link at rest: no copy, every key's and slot's latest copy -1, no signal waited for."""
    o_slot = CUR + num_keys
    o_pend = o_slot + num_parts * slot_w
    o_stream = o_pend + n_pend
    o_sigf = o_stream + n_pend
    o_sigw = o_sigf + n_sig
    o_q = o_sigw + n_sig
    o_ci = o_q + 2 * q_rows
    lk = np.zeros(o_ci + ci_rows * NCF, dtype=np.int64)
    lk[CUR:o_pend] = -1
    lk[o_sigw:o_q] = -1
    lk[RUNNING] = -1
    lk[O_SLOT], lk[SLOT_W], lk[O_PEND], lk[O_STREAM] = o_slot, slot_w, o_pend, o_stream
    lk[O_SIGF], lk[O_SIGW], lk[O_Q], lk[Q_ROWS], lk[O_CI], lk[CI_ROWS] = o_sigf, o_sigw, o_q, q_rows, o_ci, ci_rows
    return lk


@_njit
def _link_grown(lk, q_rows, ci_rows):
    """``lk`` with room for ``q_rows`` queue rows and ``ci_rows`` copies (at least as many as now)."""
    o_q = lk[O_Q]
    o_ci = o_q + 2 * q_rows
    out = np.zeros(o_ci + ci_rows * NCF, dtype=np.int64)
    out[:o_q] = lk[:o_q]
    out[o_q:o_q + 2 * lk[Q_ROWS]] = lk[o_q:lk[O_CI]]
    out[o_ci:o_ci + lk[CI_ROWS] * NCF] = lk[lk[O_CI]:]
    out[Q_ROWS], out[O_CI], out[CI_ROWS] = q_rows, o_ci, ci_rows
    return out


@_njit
def _request(lk, c, t):
    """Copy ``c`` asks for the engine at ``t`` (dropped at once when evicted meanwhile)."""
    ci0 = lk[O_CI]
    while c >= 0:
        b = ci0 + c * NCF
        if lk[b + CANCELLED] == 1:  # evicted before it could start: nothing moves
            lk[TOT + T_CANCELLED] += 1
            lk[b + DONE] = t
            n = lk[b + NEXT]
            c = -1
            if n >= 0 and lk[ci0 + n * NCF + WAITPREV] == 1:
                lk[ci0 + n * NCF + WAITPREV] = 0
                c = n
            continue
        if lk[BUSY] == 0:
            lk[BUSY] = 1
            lk[RUNNING] = c
            lk[RUN_END] = t + lk[b + DUR]
            return
        # queued by (priority, time, order of requests): SimPy's PriorityResource
        lk[SEQ] += 1
        nq = lk[NQ]
        if lk[QH] + nq == lk[Q_ROWS]:  # no row after the tail
            _queue_front(lk)
        q0 = lk[O_Q] + 2 * lk[QH]
        pos = nq
        prio = lk[b + PRIO]
        while pos > 0 and lk[q0 + 2 * (pos - 1)] > prio:  # equal keys keep their order (time and seq only grow)
            pos -= 1
        for j in range(q0 + 2 * nq + 1, q0 + 2 * pos + 1, -1):
            lk[j] = lk[j - 2]
        lk[q0 + 2 * pos] = prio
        lk[q0 + 2 * pos + 1] = c
        lk[NQ] = nq + 1
        lk[b + QUEUED] = 1
        return


@_njit
def _queue_front(lk):
    """The engine's queue moved back to the start of its rows."""
    q0 = lk[O_Q]
    h = 2 * lk[QH]
    for i in range(q0, q0 + 2 * lk[NQ]):
        lk[i] = lk[i + h]
    lk[QH] = 0


@_njit
def _advance(lk, cstate, t, start_pending):
    """Every event due at or before ``t`` (after starting the pending copies)."""
    if start_pending and lk[NPEND] > 0:
        _start_pending(lk)
    while lk[BUSY] == 1 and lk[RUN_END] <= t:
        _finish(lk, cstate)


@_njit
def _finish(lk, cstate):
    """The running copy's engine time is over: the engine goes to the queue's head, then it lands
    (the copy waiting for its slot asks next)."""
    c = lk[RUNNING]
    t = lk[RUN_END]
    ci0 = lk[O_CI]
    b = ci0 + c * NCF
    lk[BUSY] = 0
    lk[RUNNING] = -1
    lk[TOT + T_H2D] += lk[b + BYTES]
    lk[TOT + T_D2H] += lk[b + WB]
    lk[TOT + T_COPIES] += 1
    if lk[b + PREFETCH] == 1:
        lk[TOT + T_PF_COPIES] += 1
    if lk[NQ] > 0:  # the head leaves the queue
        head = lk[lk[O_Q] + 2 * lk[QH] + 1]
        lk[QH] += 1
        lk[NQ] -= 1
        lk[ci0 + head * NCF + QUEUED] = 0
        lk[BUSY] = 1
        lk[RUNNING] = head
        lk[RUN_END] = t + lk[ci0 + head * NCF + DUR]
    key = lk[b + KEY]
    if lk[b + CANCELLED] == 0 and lk[CUR + key] == c and cstate[key] == LOADING:
        cstate[key] = RESIDENT
    lk[b + DONE] = t
    n = lk[b + NEXT]
    if n >= 0 and lk[ci0 + n * NCF + WAITPREV] == 1:
        lk[ci0 + n * NCF + WAITPREV] = 0
        _request(lk, n, t)


@_njit
def _start_pending(lk):
    """The copies issued so far start (as SimPy processes, when the compute stream lets time move)."""
    n = lk[NPEND]
    if n == 0:
        return
    lk[NPEND] = 0
    ci0 = lk[O_CI]
    o_pend = lk[O_PEND]
    for i in range(n):
        c = lk[o_pend + i]
        if lk[ci0 + c * NCF + AFTER] >= 0:
            continue  # registered on its signal at issue; the signal starts it
        _after_met(lk, c, lk[ci0 + c * NCF + ISSUE])


@_njit
def _after_met(lk, c, t):
    """Copy ``c`` may start at ``t``: it asks for the engine, or waits for its slot's previous copy."""
    ci0 = lk[O_CI]
    p = lk[ci0 + c * NCF + PREV]
    if p >= 0 and lk[ci0 + p * NCF + DONE] < 0:
        lk[ci0 + c * NCF + WAITPREV] = 1
        return
    _request(lk, c, t)


@_njit
def _wait(lk, cstate, c):
    """Run the link until copy ``c`` ends; its end time."""
    if lk[NPEND] > 0:
        _start_pending(lk)
    done = lk[O_CI] + c * NCF + DONE
    while lk[done] < 0:
        _finish(lk, cstate)
    return lk[done]


@_njit
def _issue(lk, key, part, sl, prio, prefetch, after, now, dur, nbytes, wb, serial, fifo_link):
    """A copy issued by the compute stream at ``now`` into slot ``sl`` of partition ``part`` (it
    starts with the next pending start; on the stream when ``serial``; after compute-done signal
    ``after`` when that has not fired); ``wb``: the bytes written back to the host first (included
    in ``dur``)."""
    c = lk[NCOPY]
    lk[NCOPY] = c + 1
    ci0 = lk[O_CI]
    b = ci0 + c * NCF
    lk[b + KEY] = key
    lk[b + PRIO] = 0 if fifo_link else prio
    lk[b + PREFETCH] = 1 if prefetch else 0
    lk[b + NEXT] = -1
    lk[b + CANCELLED] = 0
    lk[b + QUEUED] = 0
    lk[b + DONE] = -1
    lk[b + WAITPREV] = 0
    lk[b + ISSUE] = now
    lk[b + DUR] = dur
    lk[b + BYTES] = nbytes
    lk[b + WB] = wb
    s = lk[O_SLOT] + part * lk[SLOT_W] + sl
    prev = lk[s]
    lk[b + PREV] = prev
    if prev >= 0:
        lk[ci0 + prev * NCF + NEXT] = c
    lk[s] = c
    lk[CUR + key] = c
    if serial:
        lk[lk[O_STREAM] + lk[NSTREAM]] = c
        lk[NSTREAM] += 1
    if after >= 0 and lk[lk[O_SIGF] + after] == 0:
        lk[b + AFTER] = after
        lk[lk[O_SIGW] + after] = c
    else:
        lk[b + AFTER] = -1
    lk[lk[O_PEND] + lk[NPEND]] = c
    lk[NPEND] += 1


@_njit
def _promote(lk, promoted, npro, dropped, ndrop, now, waiting):
    """LinkQueue.promote: the evicted queued prefetches leave the queue and end, the promoted ones
    ask again at priority 0, then the copies waiting for the dropped ones' slots."""
    ci0 = lk[O_CI]
    for i in range(ndrop):  # (all queued) marked, then out of the queue in one pass
        lk[ci0 + dropped[i] * NCF + QUEUED] = 2
    for i in range(npro):
        lk[ci0 + promoted[i] * NCF + QUEUED] = 2
    q0 = lk[O_Q] + 2 * lk[QH]
    m = 0
    for j in range(lk[NQ]):
        c = lk[q0 + 2 * j + 1]
        if lk[ci0 + c * NCF + QUEUED] == 2:
            lk[ci0 + c * NCF + QUEUED] = 0
        else:
            lk[q0 + 2 * m] = lk[q0 + 2 * j]
            lk[q0 + 2 * m + 1] = c
            m += 1
    lk[NQ] = m
    nw = 0
    for i in range(ndrop):
        b = ci0 + dropped[i] * NCF
        lk[TOT + T_CANCELLED] += 1
        lk[b + DONE] = now
        n = lk[b + NEXT]
        if n >= 0 and lk[ci0 + n * NCF + WAITPREV] == 1:
            lk[ci0 + n * NCF + WAITPREV] = 0
            waiting[nw] = n
            nw += 1
    for i in range(npro):
        _request(lk, promoted[i], now)
    for i in range(nw):
        _request(lk, waiting[i], now)


@_njit
def _compact(lk):
    """Drop the copies that ended from the table, renumbering the others in order. At a layer's
    start nothing is pending, no compute-done signal is waited for and the stream is drained,
    so a copy that ended is only referred to by the keys' and slots' latest copies and its
    neighbours' PREV/NEXT, where it means what no copy means (it has landed or was dropped:
    nothing to wait for, nothing to promote or cancel)."""
    n = lk[NCOPY]
    ci0 = lk[O_CI]
    new_id = np.full(n, -1, dtype=np.int64)
    m = 0
    for c in range(n):
        if lk[ci0 + c * NCF + DONE] < 0:
            new_id[c] = m
            m += 1
    for c in range(n):
        d = new_id[c]
        if d >= 0:
            for f in range(NCF):
                lk[ci0 + d * NCF + f] = lk[ci0 + c * NCF + f]
            for f in (PREV, NEXT):
                x = lk[ci0 + d * NCF + f]
                lk[ci0 + d * NCF + f] = new_id[x] if x >= 0 else -1
    for i in range(CUR, lk[O_PEND]):  # the keys' and the slots' latest copies
        if lk[i] >= 0:
            lk[i] = new_id[lk[i]]
    q0 = lk[O_Q] + 2 * lk[QH]
    for j in range(lk[NQ]):
        lk[q0 + 2 * j + 1] = new_id[lk[q0 + 2 * j + 1]]
    if lk[RUNNING] >= 0:
        lk[RUNNING] = new_id[lk[RUNNING]]
    lk[NCOPY] = m
