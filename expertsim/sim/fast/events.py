"""The DES's link and CPU without SimPy: one copy engine with a priority queue, and one host CPU,
as a small event queue the compute stream advances (see :mod:`expertsim.sim.fast.stepped`).

It reproduces the SimPy processes of :mod:`expertsim.sim.des_link` for one copy engine, whole-expert
copies and no storage tier (what :func:`expertsim.sim.fast.stepped.supports_run` admits):

- a copy the compute stream issues starts (as a SimPy process) only when the stream next lets
  time or events move (it computes, waits or syncs), so a copy it drops before that never moves
  a byte; then it waits for its dependencies, in this order: the compute of the item whose room it
  reuses (``after``, the LayerServer's ``wait_compute``), then the previous copy into the same
  slot. Then it asks the engine at its priority (0 demand, >= 1 prefetch; granted at once when
  the engine is idle, else queued by (priority, time of the request, order of the requests), as
  SimPy's ``PriorityResource`` orders them). It holds the engine for its write-back (if any), its
  fixed overhead and its bytes, then frees it: the queue's head starts at that instant, before
  anything that the copy's end wakes (the copies waiting for this slot, the compute stream);
- a queued prefetch that is needed now is *promoted*: it leaves the queue and asks again at
  priority 0, after the copies the compute stream issues at that instant; one evicted while
  queued is *dropped* (it ends at that instant without moving a byte); one evicted while waiting
  for its dependencies is dropped when they are met; one evicted while running completes (its
  bytes count) but does not make its entry resident;
- the CPU runs one job at a time, first come first served.

Simultaneous events: everything the queue holds at time t is processed before the compute stream
acts at t (as SimPy processes the events scheduled earlier first). Times are the DES's integer
nanoseconds from the same cost model, so the numbers are equal to the DES's, not close; the tests
hold the two engines equal on random traces, systems and options.
"""
from __future__ import annotations

import bisect
import heapq

_COPY_END = 0
_CPU_END = 1


class Copy:
    """One host-to-device copy (a cache entry's, or a layer's streamed experts with ``key`` -1)."""

    __slots__ = ("key", "duration", "writeback", "priority", "prefetch", "after", "previous", "cancelled",
                 "queued", "done_ns", "waiters", "nbytes")

    def __init__(self, key, nbytes, duration, writeback, priority, prefetch, after, previous):
        self.key = key
        self.nbytes = nbytes
        self.duration = duration  # engine time: write-back + overhead + bytes
        self.writeback = writeback  # bytes copied back to host first (0: none)
        self.priority = priority
        self.prefetch = prefetch
        self.after = after  # a compute-done Signal of the compute stream, or None
        self.previous = previous  # the slot's previous Copy, or None
        self.cancelled = False
        self.queued = None  # the queue entry while waiting for the engine
        self.done_ns = -1  # when it ended (landed, or was dropped)
        self.waiters = None  # copies waiting for this one (the same slot)


class Signal:
    """A compute-done event of the compute stream: copies wait for it (``after``)."""

    __slots__ = ("fired", "waiters")

    def __init__(self):
        self.fired = False
        self.waiters = None


class CpuJob:
    __slots__ = ("duration", "done_ns")

    def __init__(self, duration):
        self.duration = duration
        self.done_ns = -1


class LinkQueue:
    """The copy engine, its queue and the CPU, advanced to a time by :meth:`advance`."""

    def __init__(self, totals, on_landed):
        self.totals = totals
        self.on_landed = on_landed  # on_landed(copy): the copy moved every byte and was not evicted
        self.heap: list = []  # (time, seq, kind, object)
        self.seq = 0
        self.busy = False  # the engine is held by a copy
        self.queue: list = []  # (priority, request time, seq, copy): SimPy's PriorityResource order
        self.cpu_busy = False
        self.cpu_queue: list = []
        self.pending: list = []  # (copy, time) issued by the compute stream, not started yet

    # --- the engine ---------------------------------------------------------------------
    def issue(self, copy: Copy, now: int) -> None:
        """A copy process starts at ``now``: it waits for its dependencies, then asks the engine.
        As a SimPy process, it starts only when the compute stream next lets time or events
        move (:meth:`start_pending`): a copy the compute stream drops before that never moves a byte."""
        self.pending.append((copy, now))

    def start_pending(self) -> None:
        """Start the copies issued so far (the compute stream computes, waits or syncs)."""
        pending = self.pending
        if pending:
            self.pending = []
            for copy, now in pending:
                self._start_process(copy, now)

    def _start_process(self, copy: Copy, now: int) -> None:
        if copy.after is not None and not copy.after.fired:
            if copy.after.waiters is None:
                copy.after.waiters = [copy]
            else:
                copy.after.waiters.append(copy)
            return
        self._after_met(copy, now)

    def _after_met(self, copy: Copy, now: int) -> None:
        prev = copy.previous
        copy.after = copy.previous = None  # met (or about to be): a chain of copies is not kept alive
        if prev is not None and prev.done_ns < 0:
            if prev.waiters is None:
                prev.waiters = [copy]
            else:
                prev.waiters.append(copy)
            return
        self._request(copy, now)

    def fire(self, signal: Signal, now: int) -> None:
        """The compute stream fired ``signal`` at ``now``: the copies waiting for it go on."""
        self.start_pending()
        signal.fired = True
        waiters = signal.waiters
        if waiters:
            signal.waiters = None
            for copy in waiters:
                self._after_met(copy, now)

    def _request(self, copy: Copy, now: int) -> None:
        if copy.cancelled:  # evicted before it could start: dropped, nothing moved
            self._drop(copy, now)
            return
        if not self.busy:
            self._start(copy, now)
            return
        self.seq += 1
        entry = (copy.priority, now, self.seq, copy)
        copy.queued = entry
        bisect.insort_right(self.queue, entry)

    def _start(self, copy: Copy, now: int) -> None:
        self.busy = True
        self.seq += 1
        heapq.heappush(self.heap, (now + copy.duration, self.seq, _COPY_END, copy))

    def _drop(self, copy: Copy, now: int) -> None:
        self.totals.cancelled_prefetches += 1
        self._end(copy, now)

    def _end(self, copy: Copy, now: int) -> None:
        copy.done_ns = now
        waiters = copy.waiters
        if waiters:
            copy.waiters = None
            for other in waiters:
                self._request(other, now)

    def _finish(self, copy: Copy, now: int) -> None:
        """The copy's engine time is over: the engine goes to the queue's head, then the copy lands."""
        self.busy = False
        totals = self.totals
        if copy.writeback:
            totals.d2h_bytes += copy.writeback
        totals.h2d_bytes += copy.nbytes
        totals.copies += 1
        if copy.prefetch:
            totals.prefetch_copies += 1
        if self.queue:
            entry = self.queue.pop(0)
            entry[3].queued = None
            self._start(entry[3], now)
        if not copy.cancelled and copy.key >= 0:
            self.on_landed(copy)
        self._end(copy, now)

    def promote(self, copies: list, dropped: list, now: int) -> None:
        """After the compute stream's copies of this instant: the evicted queued prefetches
        (``dropped``) leave the queue, then the promoted ones (``copies``) ask again at priority 0."""
        self.start_pending()
        for copy in dropped:
            self.queue.remove(copy.queued)
            copy.queued = None
        for copy in copies:
            self.queue.remove(copy.queued)
            copy.queued = None
        waiting = []
        for copy in dropped:  # each ends now; the copies waiting for its slot ask after the promoted
            self.totals.cancelled_prefetches += 1
            copy.done_ns = now
            if copy.waiters:
                waiting.extend(copy.waiters)
                copy.waiters = None
        for copy in copies:
            self._request(copy, now)
        for copy in waiting:
            self._request(copy, now)

    # --- the CPU ------------------------------------------------------------------------
    def cpu(self, job: CpuJob, now: int) -> None:
        if not self.cpu_busy:
            self._cpu_start(job, now)
        else:
            self.cpu_queue.append(job)

    def _cpu_start(self, job: CpuJob, now: int) -> None:
        self.cpu_busy = True
        self.seq += 1
        heapq.heappush(self.heap, (now + job.duration, self.seq, _CPU_END, job))

    # --- time ---------------------------------------------------------------------------
    def advance(self, now: int, start_pending: bool = True) -> None:
        """Process every event due at or before ``now`` (after starting the pending copies)."""
        if start_pending:
            self.start_pending()
        heap = self.heap
        while heap and heap[0][0] <= now:
            t, _, kind, obj = heapq.heappop(heap)
            if kind == _COPY_END:
                self._finish(obj, t)
            else:
                self.cpu_busy = False
                self.totals.cpu_ns += obj.duration
                obj.done_ns = t
                if self.cpu_queue:
                    self._cpu_start(self.cpu_queue.pop(0), t)

    def wait(self, obj) -> int:
        """Run the queue until ``obj`` (a Copy or CpuJob) is done; returns its end time."""
        self.start_pending()
        heap = self.heap
        while obj.done_ns < 0:
            if not heap:  # pragma: no cover - a copy waits only for events in the queue
                raise RuntimeError("the link queue ran dry before a copy the compute stream waits for ended")
            self.advance(heap[0][0])
        return obj.done_ns

    def drain(self) -> None:
        """The end of the run: every copy and CPU job still queued or running ends."""
        self.start_pending()
        while self.heap:
            self.advance(self.heap[0][0])
