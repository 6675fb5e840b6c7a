"""Execution models: how the requests in service on one device progress.

A device is where one copy of a model runs: its GPUs, an MME instance's GPU
(shared by every model loaded there), or an instance's CPUs. The hosting
modes decide which request starts when (queues, concurrency caps, loads) and
hand it to its device with :meth:`Device.start`; the device decides when it
ends and calls the mode back with ``done(i, device)``. This is the one place
where a request's service starts and ends.

Execution models, by name (:data:`EXECUTION`):

- ``slots``: every request in service runs at full speed, as on independent
  servers (CPU workers; the no-op default without ``service.batching``). A
  request costs one calendar entry, its completion.
- ``continuous_batching``: a language model's copy runs iterations over a
  batch with a KV cache (:mod:`sim.hosting.continuous`).
- ``batching``: processor sharing with a capacity function. While ``k``
  requests are in service on the device, each progresses at ``1 /
  slowdown(k)`` of its speed alone (:class:`~sim.scenario.schema.BatchingSpec`).
  All requests of one curve progress at one rate, so the device keeps a
  virtual work clock per curve (the work a request alone would have done since
  the start), a heap of finishing tags on it and a single pending calendar
  entry: a start or a finish moves the clocks and reschedules that one entry,
  never every request (as :class:`~sim.hosting.loading.SharedLink` does for loads).

Both take the sustained-load speed (``service.sustained``): each device keeps a
warmth state that scales a request's work at its start.
"""
from __future__ import annotations

import math
from heapq import heappop, heappush
from typing import Any, Callable

from simpy.core import NORMAL

from ..core.engine import Call, Engine

Done = Callable[[int, "Device"], None]


def slowdown_table(points: dict[int, float]) -> Callable[[int], float]:
    """``slowdown(k)`` of a curve: 1 at k = 1 unless given, linear between the points, proportional to
    ``k`` beyond the last (no more throughput)."""
    pts = dict(points)
    pts.setdefault(1, 1.0)
    ks = sorted(pts)
    fs = [pts[k] for k in ks]
    last_k, last_f = ks[-1], fs[-1]

    def factor(k: int) -> float:
        if k >= last_k:
            return last_f * k / last_k
        if k <= ks[0]:
            return fs[0]
        j = next(n for n, x in enumerate(ks) if x >= k)
        k0, k1 = ks[j - 1], ks[j]
        return fs[j - 1] + (fs[j] - fs[j - 1]) * (k - k0) / (k1 - k0)

    return factor


class DeviceSet:
    """What an endpoint's devices share: the engine, the request table, the execution model its models
    call for, their sustained-load parameters and the index of every device of the run (the request
    table's ``device`` column; ``engine.device_gpus`` holds each device's GPUs)."""

    def __init__(self, engine: Engine, models: tuple, served: tuple[int, ...], log: Any = None):
        self.engine = engine
        self.requests = engine.requests
        self.log = log   # the endpoint's log (sim.hosting.base.EndpointLog)
        # model -> its continuous-batching configuration (a language model's copy runs iterations)
        self.llm = {m: cb for m in served if (cb := getattr(models[m], "llm", None)) is not None}
        # model -> (factor, time constant, rest time constant or 0), for the models whose speed changes
        # under sustained load; None if none
        self.sustained = {m: (s.factor, s.time_constant, s.rest_time_constant or 0.0)
                          for m in served if (s := models[m].service.sustained) is not None} or None
        if self.sustained:
            self.requests.keep_draws()
        curves = {m: models[m].service.batching for m in served}
        self.kind = "batching" if any(c is not None for c in curves.values()) else "slots"
        # model -> index of its curve (requests of one curve share a virtual clock); a model without a
        # curve runs at full speed, yet counts in k
        self.curves: list[Callable[[int], float]] = []
        self.curve_of: dict[int, int] = {}
        keys: dict[Any, int] = {}
        for m, c in curves.items():
            key = None if c is None else tuple(sorted(c.slowdown.items()))
            if key not in keys:
                keys[key] = len(self.curves)
                self.curves.append((lambda k: 1.0) if c is None else slowdown_table(c.slowdown))
            self.curve_of[m] = keys[key]

    def new(self, done: Done, gpus: int, owner: Any = None, model: int | None = None) -> "Device":
        """A device of ``gpus`` GPUs (0: CPUs) that calls ``done(i, device)`` as each request ends;
        ``owner``: what the hosting mode runs there (an instance, a copy); ``model``: the one model it
        serves, where there is one (a language model's copy runs continuous batching)."""
        engine = self.engine
        index = len(engine.device_gpus)
        engine.device_gpus.append(gpus)
        cfg = self.llm.get(model) if model is not None else None
        if cfg is not None:
            dev = EXECUTION["continuous_batching"](self, index, done, cfg)
            dev.owner = owner
            return dev
        kind = EXECUTION[self.kind]
        if kind is Slots and self.sustained is not None:
            kind = WarmSlots
        elif kind is Batching and len(self.curves) == 1:
            kind = SharedBatching
        dev = kind(self, index, done)
        dev.owner = owner
        return dev


class Device:
    """One device: requests start with :meth:`start`; ``done(i, self)`` is called as each ends.
    ``busy``: requests in service. After :meth:`stop` (its instance failed) nothing more ends."""

    __slots__ = ("index", "owner", "busy", "dead", "done", "_set", "_r", "_env", "warm", "warm_t")

    def __init__(self, devices: DeviceSet, index: int, done: Done):
        self.index = index
        self.owner: Any = None
        self.busy = 0
        self.dead = False
        self.done = done
        self._set = devices
        self._r = devices.requests
        self._env = devices.engine.env
        self.warm, self.warm_t = 1.0, self._env._now

    def start(self, i: int, now: float) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:
        """The device is gone (its instance failed): the requests on it end unseen."""
        self.dead = True

    def job(self, work: float, on_done: Callable[[], None], model: int | None = None) -> None:
        """Work that is no request, ``work`` seconds long alone, then ``on_done()``: a model's init on an
        instance's CPUs, done on the cores its requests use (``model``: the model it is for). Independent
        slots do not share the device: it is a plain delay. An execution model that shares the device
        (``batching``) runs it as one more job in service: it slows the requests as one more request
        would, and it progresses at the share they get."""
        self._set.engine.at(work, lambda call: on_done())

    # The speed under sustained load. ``warm`` is the part of the device's speed-up not yet gained, 1 at
    # rest: while it serves requests it decays as exp(-t / time_constant); while it serves none (idle, or
    # its instance loading a model) it comes back as 1 - (1 - warm) * exp(-t / rest_time_constant), at
    # once when that is 0. A request's work is its draw times factor + (1 - factor) * warm at its start.
    # ``warm_t``: when ``warm`` was last brought up to date; ``busy``: the requests in service (counted
    # before the call). The constants are those of the model served at each change.
    def _warm_work(self, i: int, now: float) -> float:
        """Request ``i``'s work, starting at ``now``: its draw scaled, written to the request table (a
        retried request is scaled anew from its draw)."""
        r = self._r
        p = self._set.sustained.get(r.model[i])
        dt = now - self.warm_t
        if p is not None and dt > 0.0:
            if self.busy:
                self.warm *= math.exp(-dt / p[1])
            elif p[2] > 0.0:
                self.warm = 1.0 - (1.0 - self.warm) * math.exp(-dt / p[2])
            else:
                self.warm = 1.0
            self.warm_t = now
        if p is None:
            return r.service[i]
        f = p[0]
        t = r.service[i] = r.drawn[i] * (f + (1.0 - f) * self.warm)
        return t

    def _warm_end(self, i: int, now: float) -> None:
        p = self._set.sustained.get(self._r.model[i])
        if p is not None:
            self.warm *= math.exp((self.warm_t - now) / p[1])
            self.warm_t = now


class Slots(Device):
    """Independent slots at full speed: a request ends its work after it starts."""

    __slots__ = ("_cbs", "_dcol", "_svc", "_spare")

    def __init__(self, devices: DeviceSet, index: int, done: Done):
        super().__init__(devices, index, done)
        self._cbs = [self._fire]
        self._dcol = self._r.device
        self._svc = self._r.service
        self._spare: Call | None = None   # the entry that just fired, for the next start to reuse

    # The methods below run once per request: keep them lean.
    def _entry(self, i: int) -> Call:
        call = self._spare
        if call is None:
            return Call(self._cbs, i)
        self._spare = None
        call.callbacks = self._cbs
        call.arg = i
        return call

    def start(self, i: int, now: float) -> None:
        self._dcol[i] = self.index
        self.busy += 1
        env = self._env
        call = self._spare
        if call is None:
            call = Call(self._cbs, i)
        else:   # reuse the entry that just fired (a start from within done): cheaper than a new one
            self._spare = None
            call.callbacks = self._cbs
            call.arg = i
        # Inlined Environment.schedule: this is the hot path.
        heappush(env._queue, (now + self._svc[i], NORMAL, next(env._eid), call))

    def _fire(self, call: Call) -> None:
        if self.dead:
            return
        self.busy -= 1
        self._spare = call
        self.done(call.arg, self)


class WarmSlots(Slots):
    """Slots whose speed changes under sustained load (``service.sustained``)."""

    __slots__ = ()

    def start(self, i: int, now: float) -> None:
        self._dcol[i] = self.index
        svc = self._warm_work(i, now)
        self.busy += 1
        env = self._env
        heappush(env._queue, (now + svc, NORMAL, next(env._eid), self._entry(i)))

    def _fire(self, call: Call) -> None:
        if self.dead:
            return
        self.busy -= 1
        i = call.arg
        self._warm_end(i, self._env._now)
        self._spare = call
        self.done(i, self)


class Batching(Device):
    """Processor sharing with a capacity function: ``k`` requests in service each progress at ``1 /
    slowdown(k)`` of their speed alone (``k`` over every model on the device)."""

    __slots__ = ("_v", "_heaps", "_t", "_pending", "_firing", "_tables", "_fire_cbs", "_jobs", "_jt", "_jcall",
                 "_job_cbs")

    def __init__(self, devices: DeviceSet, index: int, done: Done):
        super().__init__(devices, index, done)
        n = len(devices.curves)
        self._v = [0.0] * n                     # per curve: work done by a request in service since 0
        self._heaps: list[list[tuple[float, int]]] = [[] for _ in range(n)]   # (finishing tag, request)
        self._t = self._env._now                # when the clocks were last moved
        self._pending: Call | None = None       # the one calendar entry: the next finish
        self._firing = False
        # per curve, slowdown(k + jobs) for k = 0, 1, ... requests in service (extended as k grows)
        self._tables: list[list[float]] = [[1.0] for _ in range(n)]
        self._fire_cbs = [self._fire]
        # Jobs that are no request (job): each [work left alone, its curve, on_done, its slowdown since
        # _jt], few (loads), each counting in k. They keep their own calendar entry.
        self._jobs: list[list] = []
        self._jt = 0.0
        self._jcall: Call | None = None
        self._job_cbs = [self._job_end]

    def _factor(self, c: int, k: int) -> float:
        tab = self._tables[c]
        while len(tab) <= k:
            tab.append(self._set.curves[c](len(tab) + len(self._jobs)))
        return tab[k]

    def job(self, work: float, on_done: Callable[[], None], model: int | None = None) -> None:
        if self.dead:
            super().job(work, on_done)
            return
        now = self._env._now
        self._jobs_advance(now)
        c = 0 if model is None else self._set.curve_of.get(model, 0)
        self._reshare(now, self._jobs + [[work, c, on_done, 1.0]])
        self._jobs_sync(now)

    def _jobs_advance(self, now: float) -> None:
        """The jobs progress until ``now`` at the slowdown each had since the last change."""
        dt = now - self._jt
        self._jt = now
        if dt > 0.0:
            for j in self._jobs:
                j[0] -= dt / j[3]

    def _jobs_sync(self, now: float) -> None:
        """After a change of what is in service on the device (called at once, before the clock moves on):
        the jobs progress until ``now`` at the slowdown they had, and from then on at their curve's
        slowdown(requests + jobs); their next end is scheduled anew."""
        self._jobs_advance(now)
        k = self.busy + len(self._jobs)
        curves = self._set.curves
        best = math.inf
        for j in self._jobs:
            f = j[3] = curves[j[1]](k)
            t = j[0] * f
            if t < best:
                best = t
        if self._jcall is not None:
            self._jcall.callbacks = []   # void it
            self._jcall = None
        if self._jobs:
            env = self._env
            call = self._jcall = Call(self._job_cbs)
            heappush(env._queue, (now + max(best, 0.0), NORMAL, next(env._eid), call))

    def _job_end(self, call: Call) -> None:
        self._jcall = None
        now = self._env._now
        self._jobs_advance(now)
        jobs = self._jobs
        # the end this entry was scheduled for is due, whatever float residue is left; so is any other
        # due within a nanosecond
        first = min(jobs, key=lambda j: j[0] * j[3])
        due = [j for j in jobs if j is first or j[0] * j[3] <= 1e-9]
        self._reshare(now, [j for j in jobs if j is not first and j[0] * j[3] > 1e-9])
        self._jobs_sync(now)
        for j in due:
            j[2]()

    def _reshare(self, now: float, jobs: list[list]) -> None:
        """The requests in service progress at the share they had until ``now``, and from then on at
        slowdown(k + jobs) with the device's jobs ``jobs``."""
        self._advance(now)
        self._jobs = jobs
        self._retable()
        if not self._firing:
            self._schedule()

    def _retable(self) -> None:
        self._tables = [[1.0] for _ in self._tables]

    def _advance(self, now: float) -> None:
        dt = now - self._t
        if dt > 0.0:
            k = self.busy
            if k:
                v = self._v
                for c in range(len(v)):
                    if self._heaps[c]:
                        v[c] += dt / self._factor(c, k)
            self._t = now

    def _schedule(self) -> None:
        if self._pending is not None:
            self._pending.callbacks = []        # void it: SimPy calls no callback then
            self._pending = None
        k = self.busy
        if not k:
            return
        best = math.inf
        for c, h in enumerate(self._heaps):
            if h:
                dt = (h[0][0] - self._v[c]) * self._factor(c, k)
                if dt < best:
                    best = dt
        env = self._env
        call = self._pending = Call(self._fire_cbs)
        heappush(env._queue, (env._now + max(best, 0.0), NORMAL, next(env._eid), call))

    def start(self, i: int, now: float) -> None:
        r = self._r
        r.device[i] = self.index
        self._advance(now)
        work = r.service[i] if self._set.sustained is None else self._warm_work(i, now)
        c = self._set.curve_of[r.model[i]]
        if not self._heaps[c]:
            self._v[c] = 0.0                    # an idle clock restarts at 0: tags stay small
        heappush(self._heaps[c], (self._v[c] + work, i))
        self.busy += 1
        if self._jobs:
            self._jobs_sync(now)
        if not self._firing:
            self._schedule()

    def _fire(self, call: Call) -> None:
        self._pending = None
        if self.dead:
            return
        now = self._env._now
        k = self.busy
        self._advance(now)
        # The finish this entry was scheduled for is due, whatever float residue is left; so is any
        # other due within a nanosecond.
        first, best = -1, math.inf
        for c, h in enumerate(self._heaps):
            if h:
                rem = (h[0][0] - self._v[c]) * self._factor(c, k)
                if rem < best:
                    first, best = c, rem
        due = [heappop(self._heaps[first])[1]]
        for c, h in enumerate(self._heaps):
            v = self._v[c]
            f = self._factor(c, k)
            while h and (h[0][0] - v) * f <= 1e-9:
                due.append(heappop(h)[1])
        self.busy -= len(due)
        self._firing = True
        try:
            for i in due:
                if self._set.sustained is not None:
                    self._warm_end(i, now)
                self.done(i, self)
        finally:
            self._firing = False
        if not self.dead:
            if self._jobs:
                self._jobs_sync(now)
            self._schedule()

    def stop(self) -> None:
        super().stop()
        if self._pending is not None:
            self._pending.callbacks = []
            self._pending = None
        if self._jobs:   # the jobs end as they would alone from here (a load on a failed instance)
            self._jobs_advance(self._env._now)
            self._jcall.callbacks = []
            self._jcall = None
            for j in self._jobs:
                Device.job(self, max(j[0], 0.0), j[2])
            self._jobs = []


class SharedBatching(Batching):
    """:class:`Batching` where every model on the device follows one curve (the usual case: one model,
    or models with the same curve): one clock, one heap, the slowdown table indexed directly. It computes
    what :class:`Batching` computes, in the same order (the same floats), with less bookkeeping."""

    __slots__ = ("_heap", "_tab", "_curve", "_spare", "_dcol", "_svc", "_sus")

    def __init__(self, devices: DeviceSet, index: int, done: Done):
        super().__init__(devices, index, done)
        self._v = 0.0                   # work done by a request in service since the clock's start
        self._heap: list[tuple[float, int]] = []   # (finishing tag, request)
        self._curve = devices.curves[0]
        self._tab = [1.0, self._curve(1)]   # slowdown(k), k = 0, 1, ...: always covers busy
        self._spare: Call | None = None    # the entry that just fired, for the next schedule to reuse
        self._dcol = self._r.device
        self._svc = self._r.service
        self._sus = devices.sustained is not None

    # The methods below run once or twice per request: keep them lean (Batching's _advance and
    # _schedule inlined).
    def start(self, i: int, now: float) -> None:
        self._dcol[i] = self.index
        heap = self._heap
        k = self.busy
        if k:
            dt = now - self._t
            if dt > 0.0:
                self._v += dt / self._tab[k]
                self._t = now
            v = self._v
        else:   # an idle clock restarts at 0: tags stay small
            self._t = now
            v = self._v = 0.0
        work = self._warm_work(i, now) if self._sus else self._svc[i]
        heappush(heap, (v + work, i))
        k += 1
        self.busy = k
        tab = self._tab
        if k == len(tab):
            tab.append(self._curve(k + len(self._jobs)))
        if self._jobs:
            self._jobs_sync(now)
        if self._firing:
            return
        pending = self._pending
        if pending is not None:
            pending.callbacks = ()   # void it: SimPy calls no callback then
        dt = (heap[0][0] - v) * tab[k]
        call = self._spare
        if call is None:
            call = Call(self._fire_cbs)
        else:
            self._spare = None
            call.callbacks = self._fire_cbs
        self._pending = call
        env = self._env
        heappush(env._queue, (now + (dt if dt > 0.0 else 0.0), NORMAL, next(env._eid), call))

    # Batching's clock and calendar on the one curve: for jobs, off the requests' path.
    def _advance(self, now: float) -> None:
        k = self.busy
        if k and now > self._t:
            self._v += (now - self._t) / self._tab[k]
        self._t = now

    def _schedule(self) -> None:
        if self._pending is not None:
            self._pending.callbacks = ()
            self._pending = None
        k = self.busy
        if not k:
            return
        dt = (self._heap[0][0] - self._v) * self._tab[k]
        env = self._env
        call = self._pending = Call(self._fire_cbs)
        heappush(env._queue, (env._now + (dt if dt > 0.0 else 0.0), NORMAL, next(env._eid), call))

    def _retable(self) -> None:
        jobs = len(self._jobs)
        self._tab = [1.0] + [self._curve(k + jobs) for k in range(1, len(self._tab))]

    def _fire(self, call: Call) -> None:
        self._pending = None
        if self.dead:
            return
        env = self._env
        now = env._now
        k = self.busy   # > 0: an entry is pending only while requests are in service
        tab = self._tab
        f = tab[k]
        dt = now - self._t
        if dt > 0.0:
            v = self._v = self._v + dt / f
            self._t = now
        else:
            v = self._v
        # The finish this entry was scheduled for is due, whatever float residue is left; so is any
        # other due within a nanosecond.
        heap = self._heap
        i = heappop(heap)[1]
        done = self.done
        self._firing = True
        if heap and (heap[0][0] - v) * f <= 1e-9:
            due = [i]
            while heap and (heap[0][0] - v) * f <= 1e-9:
                due.append(heappop(heap)[1])
            self.busy = k - len(due)
            try:
                for i in due:
                    if self._sus:
                        self._warm_end(i, now)
                    done(i, self)
            finally:
                self._firing = False
        else:
            self.busy = k - 1
            try:
                if self._sus:
                    self._warm_end(i, now)
                done(i, self)
            finally:
                self._firing = False
        if self.dead:
            return
        if self._jobs:
            self._jobs_sync(now)
        k = self.busy
        if not k:
            self._spare = call
            return
        v = self._v
        dt = (heap[0][0] - v) * self._tab[k]   # the table anew: a job in a callback replaces it
        call.callbacks = self._fire_cbs
        self._pending = call
        heappush(env._queue, (now + (dt if dt > 0.0 else 0.0), NORMAL, next(env._eid), call))


# Execution models by name.
EXECUTION: dict[str, type[Device]] = {"slots": Slots, "batching": Batching}

from .continuous import ContinuousBatching  # noqa: E402  (it builds on Device)

EXECUTION["continuous_batching"] = ContinuousBatching
