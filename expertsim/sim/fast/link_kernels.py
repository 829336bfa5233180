"""The DES's copy engine as compiled kernels (the compiled twin of
:class:`~expertsim.sim.fast.events.LinkQueue` for one copy engine): copies are rows of ``ci``
(fields below), the engine's queue ``q`` is kept in (priority, order of requests) order, and the
copies issued by the compute stream start with the next pending start, as SimPy processes do.
Used by :mod:`expertsim.sim.fast.prefetching`.
"""
from __future__ import annotations

import numpy as np

from expertsim.sim.fast.jit import _njit, _njit_inline

# copy fields (columns of ``ci``)
KEY, PRIO, PREFETCH, AFTER, PREV, NEXT, CANCELLED, QUEUED, DONE, WAITPREV, ISSUE, DUR, BYTES, WB = range(14)
NCF = 14
# link state (``ls``)
BUSY, RUNNING, RUN_END, SEQ, NCOPY, NPEND, NQ = range(7)
# totals (``tot``)
(T_H2D, T_COPIES, T_PF_COPIES, T_CANCELLED, T_PF_ADMITTED, T_PF_HITS, T_STALL, T_EXPERT, T_DENSE, T_PEAK, T_CPU_NS,
 T_CPU_EXPERTS, T_D2H) = range(13)
NTOT = 13
# cache entry states (as ExpertCache)
ABSENT, RESIDENT, LOADING = 0, 1, 2


@_njit_inline
def _end(ci, ls, q, cstate, cur, tot, c, t):
    """Copy ``c`` ended at ``t`` (landed or dropped): the copy waiting for its slot asks next."""
    ci[c, DONE] = t
    n = ci[c, NEXT]
    if n >= 0 and ci[n, WAITPREV] == 1:
        ci[n, WAITPREV] = 0
        _request(ci, ls, q, cstate, cur, tot, n, t)


@_njit
def _request(ci, ls, q, cstate, cur, tot, c, t):
    """Copy ``c`` asks for the engine at ``t`` (dropped at once when evicted meanwhile)."""
    while c >= 0:
        if ci[c, CANCELLED] == 1:  # evicted before it could start: nothing moves
            tot[T_CANCELLED] += 1
            ci[c, DONE] = t
            n = ci[c, NEXT]
            c = -1
            if n >= 0 and ci[n, WAITPREV] == 1:
                ci[n, WAITPREV] = 0
                c = n
            continue
        if ls[BUSY] == 0:
            _start(ci, ls, c, t)
            return
        # queued by (priority, time, order of requests): SimPy's PriorityResource
        ls[SEQ] += 1
        nq = ls[NQ]
        pos = nq
        prio = ci[c, PRIO]
        while pos > 0 and q[pos - 1, 0] > prio:  # equal keys keep their order (time and seq only grow)
            pos -= 1
        for j in range(nq, pos, -1):
            q[j, 0] = q[j - 1, 0]
            q[j, 1] = q[j - 1, 1]
        q[pos, 0] = prio
        q[pos, 1] = c
        ls[NQ] = nq + 1
        ci[c, QUEUED] = 1
        return


@_njit_inline
def _start(ci, ls, c, t):
    ls[BUSY] = 1
    ls[RUNNING] = c
    ls[RUN_END] = t + ci[c, DUR]


@_njit_inline
def _dequeue(ci, ls, q, c):
    nq = ls[NQ]
    for j in range(nq):
        if q[j, 1] == c:
            for i in range(j, nq - 1):
                q[i, 0] = q[i + 1, 0]
                q[i, 1] = q[i + 1, 1]
            ls[NQ] = nq - 1
            ci[c, QUEUED] = 0
            return


@_njit
def _advance(ci, ls, q, pend, cstate, cur, tot, t, start_pending):
    """Every event due at or before ``t`` (after starting the pending copies)."""
    if start_pending and ls[NPEND] > 0:
        _start_pending(ci, ls, q, pend, cstate, cur, tot)
    while ls[BUSY] == 1 and ls[RUN_END] <= t:
        _finish(ci, ls, q, cstate, cur, tot)


@_njit
def _finish(ci, ls, q, cstate, cur, tot):
    """The running copy's engine time is over: the engine goes to the queue's head, then it lands."""
    c = ls[RUNNING]
    t = ls[RUN_END]
    ls[BUSY] = 0
    ls[RUNNING] = -1
    tot[T_H2D] += ci[c, BYTES]
    tot[T_D2H] += ci[c, WB]
    tot[T_COPIES] += 1
    if ci[c, PREFETCH] == 1:
        tot[T_PF_COPIES] += 1
    if ls[NQ] > 0:
        head = q[0, 1]
        _dequeue(ci, ls, q, head)
        _start(ci, ls, head, t)
    key = ci[c, KEY]
    if ci[c, CANCELLED] == 0 and cur[key] == c and cstate[key] == LOADING:
        cstate[key] = RESIDENT
    _end(ci, ls, q, cstate, cur, tot, c, t)


@_njit
def _start_pending(ci, ls, q, pend, cstate, cur, tot):
    """The copies issued so far start (as SimPy processes, when the compute stream lets time move)."""
    n = ls[NPEND]
    if n == 0:
        return
    ls[NPEND] = 0
    for i in range(n):
        c = pend[i]
        t = ci[c, ISSUE]
        if ci[c, AFTER] >= 0:
            continue  # registered on its signal at issue; the signal starts it
        _after_met(ci, ls, q, cstate, cur, tot, c, t)


@_njit
def _after_met(ci, ls, q, cstate, cur, tot, c, t):
    p = ci[c, PREV]
    if p >= 0 and ci[p, DONE] < 0:
        ci[c, WAITPREV] = 1
        return
    _request(ci, ls, q, cstate, cur, tot, c, t)


@_njit
def _wait(ci, ls, q, pend, cstate, cur, tot, c):
    """Run the link until copy ``c`` ends; its end time."""
    if ls[NPEND] > 0:
        _start_pending(ci, ls, q, pend, cstate, cur, tot)
    while ci[c, DONE] < 0:
        _finish(ci, ls, q, cstate, cur, tot)
    return ci[c, DONE]


@_njit
def _issue(ci, ls, pend, cur, slot_copy, stream, nstream, sig_fired, sig_waiter, key, part, sl, prio, prefetch,
           after, now, dur, nbytes, wb, serial, fifo_link):
    """A copy issued by the compute stream at ``now`` (it starts with the next pending start);
    ``wb``: the bytes written back to the host first (included in ``dur``)."""
    c = ls[NCOPY]
    ls[NCOPY] = c + 1
    ci[c, KEY] = key
    ci[c, PRIO] = 0 if fifo_link else prio
    ci[c, PREFETCH] = 1 if prefetch else 0
    ci[c, NEXT] = -1
    ci[c, CANCELLED] = 0
    ci[c, QUEUED] = 0
    ci[c, DONE] = -1
    ci[c, WAITPREV] = 0
    ci[c, ISSUE] = now
    ci[c, DUR] = dur
    ci[c, BYTES] = nbytes
    ci[c, WB] = wb
    prev = slot_copy[part, sl]
    ci[c, PREV] = prev
    if prev >= 0:
        ci[prev, NEXT] = c
    slot_copy[part, sl] = c
    cur[key] = c
    if serial:
        stream[nstream[0]] = c
        nstream[0] += 1
    if after >= 0 and sig_fired[after] == 0:
        ci[c, AFTER] = after
        sig_waiter[after] = c
    else:
        ci[c, AFTER] = -1
    pend[ls[NPEND]] = c
    ls[NPEND] += 1


@_njit
def _promote(ci, ls, q, cstate, cur, tot, promoted, npro, dropped, ndrop, now, waiting):
    """LinkQueue.promote: the evicted queued prefetches leave the queue and end, the promoted ones
    ask again at priority 0, then the copies waiting for the dropped ones' slots."""
    for i in range(ndrop):
        _dequeue(ci, ls, q, dropped[i])
    for i in range(npro):
        _dequeue(ci, ls, q, promoted[i])
    nw = 0
    for i in range(ndrop):
        c = dropped[i]
        tot[T_CANCELLED] += 1
        ci[c, DONE] = now
        n = ci[c, NEXT]
        if n >= 0 and ci[n, WAITPREV] == 1:
            ci[n, WAITPREV] = 0
            waiting[nw] = n
            nw += 1
    for i in range(npro):
        _request(ci, ls, q, cstate, cur, tot, promoted[i], now)
    for i in range(nw):
        _request(ci, ls, q, cstate, cur, tot, waiting[i], now)


@_njit
def _compact(ci, ls, q, cur, slot_copy):
    """Drop the copies that ended from the table, renumbering the others in order. At a layer's
    start nothing is pending, no compute-done signal is waited for and the stream is drained,
    so a copy that ended is only referred to by ``cur``, ``slot_copy`` and its neighbours'
    PREV/NEXT, where it means what no copy means (it has landed or was dropped: nothing to
    wait for, nothing to promote or cancel)."""
    n = ls[NCOPY]
    new_id = np.full(n, -1, dtype=np.int64)
    m = 0
    for c in range(n):
        if ci[c, DONE] < 0:
            new_id[c] = m
            m += 1
    for c in range(n):
        d = new_id[c]
        if d >= 0:
            for f in range(NCF):
                ci[d, f] = ci[c, f]
            for f in (PREV, NEXT):
                x = ci[d, f]
                ci[d, f] = new_id[x] if x >= 0 else -1
    for k in range(cur.shape[0]):
        if cur[k] >= 0:
            cur[k] = new_id[cur[k]]
    for p in range(slot_copy.shape[0]):
        for s in range(slot_copy.shape[1]):
            if slot_copy[p, s] >= 0:
                slot_copy[p, s] = new_id[slot_copy[p, s]]
    for j in range(ls[NQ]):
        q[j, 1] = new_id[q[j, 1]]
    if ls[RUNNING] >= 0:
        ls[RUNNING] = new_id[ls[RUNNING]]
    ls[NCOPY] = m


@_njit
def _grown(a, rows):
    out = np.zeros((rows, a.shape[1]), dtype=a.dtype)
    out[:a.shape[0]] = a
    return out
