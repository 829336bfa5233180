"""The SimPy DES's processes beside the compute stream: host-to-device copies, streamed experts,
storage reads and CPU experts (:class:`LinkProcesses`, a part of the engine's ``_DesRun``).

Resources (created by the engine):

- the host-to-device link: ``copy_engines`` copy engines (a priority resource) and one wire (a
  priority resource of capacity 1). A copy (or each chunk of it, with ``copy_chunk_bytes``) takes
  an engine, spends its fixed overhead (``CostModel.copy_overhead_ns``), then takes the wire for
  its bytes (``copy_wire_ns``), then frees both. With one engine this is a serial link (the
  engine is the wire: one timeout per chunk); with more, one copy's overhead overlaps another's
  bytes. Demand copies (priority 0) go before prefetches; a started chunk runs to completion, and
  a prefetch evicted while in flight stops at the next chunk boundary (ProMoE);
- the storage tier (NVMe -> host, one reader) for experts that do not fit in host memory;
- the host CPU (for experts computed there).

How they run on SimPy (with the engine's ``SKIP_COMPUTES``; off, the plain DES uses SimPy's own
Process, PriorityResource and every event, and the tests hold the two equal): each process is
a :class:`_Task` (SimPy's resumes without a Process object or an end event), started when the
main process next waits (:meth:`LinkProcesses._spawn`); the engines and the wire are a
:class:`LinkResource`; an event nobody waits for is not scheduled (:func:`fire`), and a
process's closing event resumes its waiters at once when nothing else is due
(:meth:`LinkProcesses._fire_last`). Each of these leaves out only events whose processing could
change nothing or that SimPy would process next with nothing in between, so every other event
keeps its time and its order among equal times.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import simpy

from expertsim.sim.workload import Iteration


@dataclass(slots=True)
class _Copy:
    """One host-to-device copy in the DES."""

    key: int
    done: simpy.Event
    prefetch: bool
    priority: int
    started: bool = False
    cancelled: bool = False
    landed: bool = False  # done has fired (copy.done.triggered, without the property's call)
    # Fired when a queued prefetch is needed now, or dropped. Made when first needed: most copies
    # are never woken, and only a prefetch waiting in the link queue waits for it (_acquire).
    promote: simpy.Event | None = None

    def woken(self) -> bool:
        return self.promote is not None and self.promote.triggered

    def wake_event(self, env: simpy.Environment) -> simpy.Event:
        if self.promote is None:
            self.promote = env.event()
        return self.promote


class _Task:
    """A generator run on SimPy's events as a SimPy Process runs it, without the Process: it
    starts at an event scheduled as SimPy's ``Initialize`` (now, urgent), or is started by the
    main process (see :meth:`LinkProcesses._spawn`); it is resumed by each event it yields (at
    once when that event was processed already) with the event's value, and ends without an
    end-of-process event (nobody waits for the DES's copy, CPU and stream processes, or for the
    main one; that event would only hold back the compute stream's clock, see
    engine._DesRun._compute). The same events in the same order, less SimPy's per-resume work.
    The generators never fail an event, nor read ``env.active_process``. ``on_suspend``: called
    each time the task gives control back to SimPy (it waits, or it ended)."""

    __slots__ = ("gen", "on_suspend")

    def __init__(self, env: simpy.Environment, gen, on_suspend=None, start: bool = True):
        self.gen, self.on_suspend = gen, on_suspend
        if start:
            event = simpy.Event(env)
            event._ok, event._value = True, None  # as simpy.events.Initialize
            event.callbacks.append(self._resume)
            env.schedule(event, simpy.events.URGENT)

    def _resume(self, event) -> None:
        send = self.gen.send
        while True:
            try:
                event = send(event._value)
            except StopIteration:
                break
            if event.callbacks is not None:  # not processed yet: wait for it
                event.callbacks.append(self._resume)
                break
        if self.on_suspend is not None:
            self.on_suspend()


class _Started:
    """What a task started by the main process is resumed with (a processed event's value)."""

    _value = None


class _SortedQueue(list):
    """A PriorityResource's request queue kept in order by inserting each request at its place
    (bisect) rather than re-sorting the whole queue per request, as SimPy's SortedQueue does
    (quadratic when a prefetching system queues hundreds of copies). The same order: requests
    with equal keys stay in arrival order."""

    def __init__(self, maxlen: int | None = None):
        super().__init__()
        self.maxlen = maxlen

    def append(self, item) -> None:
        if self.maxlen is not None and len(self) >= self.maxlen:
            raise RuntimeError("Cannot append event. Queue is full.")
        bisect.insort_right(self, item, key=_request_key)


def _request_key(request):
    return request.key


class SortedPriorityResource(simpy.PriorityResource):
    """SimPy's PriorityResource with :class:`_SortedQueue` (the plain DES's link resources)."""

    PutQueue = _SortedQueue

    def cancel(self, request) -> None:
        request.cancel()


class LinkResource:
    """What the copies use of SimPy's PriorityResource (:class:`SortedPriorityResource`), without
    its layered Put/Get event classes; the same events at the same points, so the same order:

    - ``request(priority)`` returns a plain event, queued by ``(priority, time of the request)``
      (equal keys in arrival order); the head of the queue is granted at once when a unit is free
      (SimPy's ``_trigger_put``, which looks at the head only). A granted request is an event
      that succeeds; SimPy's own callback on it (``_trigger_get``) has nothing to do here, as no
      release is ever pending;
    - ``release(request)`` frees the unit at once and fires a release event whose processing
      grants the head of the queue (SimPy's ``Release``). With ``elide`` and one unit, when the
      queue is empty at the release that event is left out: it could grant nothing. A request
      arriving before it would have been processed takes the free unit at once, and any later
      one waits behind it (the holder cannot release before its grant, which comes after the
      release event), so at its processing the unit is taken or nobody waits;
    - ``cancel(request)``: a request not granted leaves the queue.
    """

    def __init__(self, env: simpy.Environment, capacity: int = 1, elide: bool = True):
        self.env, self.capacity = env, capacity
        self.users = 0
        self.queue: list[simpy.Event] = []  # waiting requests, by key
        self.elide = elide and capacity == 1

    def request(self, priority: int = 0) -> simpy.Event:
        req = simpy.Event(self.env)
        req.key = (priority, self.env.now)
        if self.queue:
            bisect.insort_right(self.queue, req, key=_request_key)
            self._grant()
        elif self.users < self.capacity:  # the queue's head is this request
            self.users += 1
            req.succeed()
        else:
            self.queue.append(req)
        return req

    def _grant(self, _event=None) -> None:
        if self.queue and self.users < self.capacity:
            self.users += 1
            self.queue.pop(0).succeed()

    def release(self, request: simpy.Event) -> None:
        self.users -= 1
        if self.elide and not self.queue:
            return
        event = simpy.Event(self.env)
        event.callbacks.append(self._grant)
        event.succeed()

    def cancel(self, request: simpy.Event) -> None:
        if not request.triggered:
            self.queue.remove(request)


def fire(event: simpy.Event, elide: bool) -> None:
    """``event.succeed()``; with ``elide``, an event nobody waits for yet is marked processed
    instead of being scheduled. Every waiter of the DES's copy, compute, CPU and promotion events
    checks ``triggered`` before it waits, so nobody will wait for it later either: its
    processing would do nothing (its only effect would be on the compute stream's clock, which
    may not skip past a pending event; see engine._DesRun._compute)."""
    if elide and not event.callbacks:
        event._ok, event._value, event.callbacks = True, None, None  # as Environment.step leaves it
    else:
        event.succeed()


class LinkProcesses:
    """The copy, stream and CPU processes of one DES run. A mixin of the engine's ``_DesRun``,
    whose ``__init__`` sets what they use: ``env``, ``cost``, ``cache``, ``totals``, ``timeline``,
    ``engines``, ``wire``, ``storage``, ``cpu``, ``copies``, ``slot_copy``, ``stream_copies``,
    ``serial``, ``fifo_link``, ``chunk_bytes``, ``on_storage``, ``any_on_storage``,
    ``num_experts``, ``per_layer_partitions``, ``_copy_ns``, ``_spawned``, ``_queue`` and ``SKIP_COMPUTES``."""

    # --- timeline -------------------------------------------------------------------------
    def _row(self, resource, kind, it, layer, expert, start, end, nbytes=0):
        if self.timeline is not None and self._record_iteration and end > start:
            request = it.request if it.num_requests == 1 else -1
            self.timeline.add(resource, kind, it.index, request, layer, expert, start, end, nbytes)

    # --- copies ---------------------------------------------------------------------------
    def _start_copy(self, it: Iteration, layer: int, expert: int, slot: int, nbytes: int,
                    priority: int, after: simpy.Event | None, writeback_bytes: int = 0) -> None:
        """``priority``: 0 for a demand copy, >= 1 for a prefetch (served in issue order anyway
        with ``link_queue="fifo"``). ``writeback_bytes``: an evicted expert copied back to host
        first, on the same engine (a swap, runtime ``writeback``)."""
        layer = int(layer)
        key = layer * self.num_experts + int(expert)  # cache.key(layer, expert)
        copy = _Copy(key, self.env.event(), priority > 0, 0 if self.fifo_link else priority)
        self.copies[key] = copy
        if self.serial:
            self.stream_copies.append(copy)
        slot_id = (layer if self.per_layer_partitions else 0, slot)
        previous = self.slot_copy.get(slot_id)
        self.slot_copy[slot_id] = copy
        self._spawn(self._copy(copy, it, layer, expert, nbytes, after, previous, writeback_bytes))

    def _acquire(self, resource: SortedPriorityResource, copy: _Copy):
        """Queue on ``resource`` at the copy's priority; a queued prefetch that is promoted
        re-queues as demand. Returns the granted request, or None when the copy was dropped."""
        if copy.priority > 0 and not copy.woken():
            req = resource.request(priority=copy.priority)
            yield req | copy.wake_event(self.env)
            if req.triggered:
                return req
            resource.cancel(req)
        if copy.cancelled:
            return None
        req = resource.request(priority=0)
        yield req
        return req

    def _copy(self, copy: _Copy, it, layer, expert, nbytes, after, previous, writeback_bytes=0):
        env, cost = self.env, self.cost
        if after is not None and not after.triggered:
            yield after
        if previous is not None and not previous.landed:
            yield previous.done  # the slot's previous copy must land before this one overwrites it
        if self.any_on_storage and not copy.cancelled and self.on_storage[copy.key]:
            with self.storage.request() as req:  # NVMe -> host bounce buffer first
                yield req
                start = env.now
                yield env.timeout(cost.storage_read_ns(nbytes))
                self.totals.storage_bytes += nbytes
                self._row("storage", "read", it, layer, expert, start, env.now, nbytes)
        kind = "prefetch" if copy.prefetch else "copy"
        copied = 0
        for chunk in (cost.chunk_sizes(nbytes, self.chunk_bytes) if self.chunk_bytes else (nbytes,)):
            if copy.cancelled:
                engine = None
            elif copy.priority > 0 and not copy.woken():
                engine = yield from self._acquire(self.engines, copy)
            else:  # as _acquire does for a demand copy
                engine = self.engines.request(0)
                yield engine
            if engine is not None and copy.cancelled:
                self.engines.release(engine)
                engine = None
            if engine is None:  # evicted before this chunk started: dropped, the rest costs nothing
                self.totals.cancelled_prefetches += 1
                break
            copy.started = True
            if writeback_bytes:  # the evicted expert goes back to host before the new one comes in
                start = env.now
                yield env.timeout(cost.transfer_time_ns(writeback_bytes))
                self.totals.d2h_bytes += writeback_bytes
                self._row("link", "writeback", it, layer, expert, start, env.now, writeback_bytes)
                writeback_bytes = 0
            start = env.now
            times = self._copy_ns.get(chunk)
            if times is None:
                times = self._copy_ns[chunk] = (cost.copy_overhead_ns(chunk), cost.copy_wire_ns(chunk))
            if self.wire is None:  # one engine: its overhead then the bytes, nothing comes between
                yield env.timeout(times[0] + times[1])
            else:
                yield env.timeout(times[0])
                wire = yield from self._take(self.wire, copy.priority)
                yield env.timeout(times[1])
                self.wire.release(wire)
            self.engines.release(engine)
            copied += chunk
            if self.timeline is not None:
                self._row("link", kind, it, layer, expert, start, env.now, chunk)
        if copied:
            self.totals.h2d_bytes += copied
            self.totals.copies += 1
            if copy.prefetch:
                self.totals.prefetch_copies += 1
        if copied == nbytes and self.copies.get(copy.key) is copy:
            self.cache.mark_resident(layer, expert)
        copy.landed = True
        self._fire_last(copy.done)

    def _fire_last(self, event: simpy.Event) -> None:
        """:func:`fire`, as the last act of a copy, CPU or stream process: when no other event is
        due now (none queued at this time, no started process waiting to run), the event would be
        the very next one SimPy processes, right after this process's step, so its waiters are
        resumed at once, as ``Environment.step`` would (this process does nothing after it)."""
        if self.SKIP_COMPUTES and event.callbacks:
            queue = self._queue
            if not self._spawned and not (queue and queue[0][0] <= self.env.now):
                event._ok, event._value = True, None
                callbacks, event.callbacks = event.callbacks, None
                for callback in callbacks:
                    callback(event)
                return
        fire(event, self.SKIP_COMPUTES)

    def _spawn(self, gen) -> None:
        """Start the process ``gen`` (a copy, a CPU job, a stream; the main process starts them).

        In the plain DES (``SKIP_COMPUTES`` off, which the tests compare with) it is a SimPy
        Process: SimPy schedules its start (now, urgent) and it runs to its first wait once the
        main process waits. With ``SKIP_COMPUTES`` it is a :class:`_Task` that the main process
        runs itself to its first wait at that same point, the moment it gives control back to
        SimPy (:meth:`_start_spawned`), in the order started: the urgent start events would be
        the first events SimPy processes then (no other urgent event is ever due: only the main
        process starts processes, and it runs on normal events), nothing runs in between, so
        everything happens in the same order, one event fewer per process. Until then the
        compute stream counts them as events due now: a compute is not skipped past them
        (engine._DesRun._compute)."""
        if self.SKIP_COMPUTES:
            self._spawned.append(_Task(self.env, gen, start=False))
        else:
            self.env.process(gen)

    def _start_spawned(self) -> None:
        """Run the processes :meth:`_spawn` started to their first wait (the main process's
        ``on_suspend``)."""
        if self._spawned:
            tasks, self._spawned = self._spawned, []
            for task in tasks:
                task._resume(_Started)

    def _in_flight(self, key: int) -> bool:
        copy = self.copies.get(key)
        return copy is not None and not copy.landed

    def _take(self, resource, priority: int = 0):
        req = resource.request(priority=priority)
        yield req
        return req

    def _cancel_evicted(self, keys: list[int]) -> None:
        for key in keys:
            copy = self.copies.get(key)
            if copy is not None and not copy.landed and not self.fifo_link:
                copy.cancelled = True  # not started: dropped; started: stops after its current chunk
                if not copy.started and not copy.woken():
                    fire(copy.wake_event(self.env), self.SKIP_COMPUTES)  # wake it so it leaves the link queue at once
            if copy is not None:
                del self.copies[key]

    # --- CPU experts ----------------------------------------------------------------------
    def _cpu_expert(self, it, layer, expert, tokens, done: simpy.Event):
        with self.cpu.request() as req:
            yield req
            start = self.env.now
            t = self.cost.cpu_expert_time_ns(tokens)
            yield self.env.timeout(t)
            self.totals.cpu_ns += t
            self._row("cpu", "cpu_expert", it, layer, expert, start, self.env.now)
        self._fire_last(done)

    def _cpu_layer(self, it, layer, expert_tokens, layer_tokens, done: simpy.Event):
        with self.cpu.request() as req:
            yield req
            start = self.env.now
            t = self.cost.cpu_layer_time_ns(expert_tokens, layer_tokens)
            yield self.env.timeout(t)
            self.totals.cpu_ns += t
            self._row("cpu", "cpu_experts", it, layer, -1, start, self.env.now)
        self._fire_last(done)

    def _stream(self, it, layer, nbytes, done: simpy.Event):
        """One demand copy of a layer's streamed experts into a staging buffer (no cache entry)."""
        engine = yield from self._take(self.engines, 0)
        start = self.env.now
        yield self.env.timeout(self.cost.transfer_time_ns(nbytes))
        self.engines.release(engine)
        self.totals.h2d_bytes += nbytes
        self.totals.copies += 1
        self._row("link", "stream", it, layer, -1, start, self.env.now, nbytes)
        self._fire_last(done)
