"""Inference components: several models on one endpoint, each with its own
reserved resources and number of copies, packed onto the endpoint's instances.

A component names a model and what one copy of it reserves on an instance:
whole accelerators (a copy's GPUs are its own), host memory and vCPUs. Copies
of different components share an instance as long as its free GPUs, memory
and vCPUs allow; where a copy goes is the endpoint's ``placement`` strategy
(:mod:`sim.hosting.placement`). A copy that fits nowhere waits for capacity.

A copy placed after time 0 loads before it serves (the load pipeline of
:mod:`sim.hosting.loading`: download unless the artifact is already on that
instance's disk, disk read, host to GPU, init); the initial deployment is
ready at time 0, as the instances of the other modes are. Each copy is a FIFO
queue in front of ``max_concurrency`` slots; the endpoint's routing policy
chooses among a component's copies that serve. With no such copy a request
fails at once with status ``no_capacity`` (NoCapacityInvocationFailures).

Scaling, as SageMaker does it:
- copies, per component: its ``autoscaling`` (target tracking on
  ``invocations_per_copy`` or ``concurrent_requests_per_copy``, through
  :mod:`sim.autoscaling`); no datapoint while the component has no copy in
  service. A component with ``copies.min`` 0 also gets the step-scaling alarm
  of ``scale_from_zero``: NoCapacityInvocationFailures >= 1 over a period
  adds a copy when it has none.
- instances (managed instance scaling, ``instances: {min, max}``): copies
  that cannot be placed ask for as many instances as a binpack of them needs
  (billed from the request, serving after ``provisioning``), up to max;
  instances are given back by ``scale_in_policy``: ``idle_release`` releases
  an instance that has held no copy for ``scale_in_cooldown``;
  ``consolidation`` also, at most once per cooldown and not within one of a
  scale-out, moves the copies of the emptiest instance to the others (each
  replacement loads, then the original drains) and releases it.

Packing quality is logged as it changes (:class:`ICLog`): over the instances
in service, GPUs reserved and stranded (reserved by no copy; ``fragmented``:
free GPUs on an instance where no component's copy fits any more), host
memory reserved and stranded, GPU memory stranded (on free GPUs, or on
reserved GPUs beyond what their model uses).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .. import autoscaling, routing
from ..core.engine import NO_CAPACITY, OK, THROTTLED, Call, Engine
from ..scenario.resolve import Component, Endpoint, Model
from ..service import sample
from . import placement
from .base import EndpointLog, EndpointRuntime, Instance
from .loading import Loader, LoadRecord, LoadSpeeds

# Defaults of the ic-only keys (SageMaker's managed instance scaling).
SCALE_IN_POLICY = "idle_release"
SCALE_IN_COOLDOWN = 1200.0      # 20 minutes
DATA_CACHE = True
MANAGED_PERIOD = 60.0           # how often managed instance scaling looks for instances to give back

# States of a copy.
LOADING, READY, MOVING, DRAINING, GONE = range(5)

# Columns of ICLog.packing after t (totals over the instances in service).
PACKING = ("copies", "copies_loading", "copies_pending", "gpus", "gpus_reserved", "gpus_stranded",
           "gpus_fragmented", "memory_gb", "memory_reserved_gb", "memory_stranded_gb", "gpu_memory_gb",
           "gpu_memory_stranded_gb", "cpus", "cpus_reserved")


@dataclass
class CopyRecord:
    """One copy's life: where it was placed, on which GPUs, and when it could serve."""

    comp: int
    model: int
    instance: int
    gpus: tuple[int, ...]
    placed: float
    ready: float = -1.0       # could serve from then on
    retired: float = -1.0     # took no new request from then on
    released: float = -1.0    # gave its resources back
    moved: bool = False       # a consolidation's replacement


def _step_means(rows: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Time average over each ``[edges[k], edges[k+1])`` of the columns of a
    right-continuous step function whose rows are ``(t, values...)`` (0 before the first)."""
    t = rows[:, 0]
    v = rows[:, 1:]
    cum = np.vstack([np.zeros((1, v.shape[1])), np.cumsum(v[:-1] * np.diff(t)[:, None], axis=0)])
    k = np.searchsorted(t, edges, side="right") - 1
    F = np.zeros((len(edges), v.shape[1]))
    ok = k >= 0
    F[ok] = cum[k[ok]] + v[k[ok]] * (edges[ok] - t[k[ok]])[:, None]
    width = np.diff(edges)
    return np.diff(F, axis=0) / np.where(width > 0, width, 1.0)[:, None]


@dataclass
class ICLog(EndpointLog):
    """An inference-component endpoint's log: the shared one, plus

    ``packing``: ``(t, *PACKING)`` at each change; ``copies``: ``(t, component,
    desired, live, serving)`` at each change of a component; ``copy_records``;
    ``decisions``: ``(t, component, source, old, new, metric)`` of the copy
    autoscaling and scale-from-zero alarms; ``instance_events``: ``(t,
    instance, "request" | "up" | "release")``.
    """

    packing: list[tuple] = field(default_factory=list)
    copies: list[tuple[float, int, int, int, int]] = field(default_factory=list)
    copy_records: list[CopyRecord] = field(default_factory=list)
    decisions: list[tuple[float, int, str, int, int, float]] = field(default_factory=list)
    instance_events: list[tuple[float, int, str]] = field(default_factory=list)

    def timeline_columns(self, edges: np.ndarray) -> dict[str, np.ndarray]:
        """Per bin of ``edges``, the time average of each packing figure (timeline.csv's extra columns)."""
        edges = np.asarray(edges, dtype=float)
        means = _step_means(np.asarray(self.packing, dtype=float), edges)
        return {k: means[:, j] for j, k in enumerate(PACKING)}

    def summary_block(self, t0: float, t1: float) -> dict[str, float | int | None]:
        """Packing and scaling figures over ``[t0, t1)`` for summary.json's endpoint block."""
        rows = np.asarray(self.packing, dtype=float)
        m = _step_means(rows, np.array([t0, t1]))[0]
        avg = dict(zip(PACKING, m.tolist()))
        k0 = max(int(np.searchsorted(rows[:, 0], t0, side="right")) - 1, 0)
        k1 = int(np.searchsorted(rows[:, 0], t1, side="left"))
        copies_max = int(rows[k0:max(k1, k0 + 1), 1].max())
        inside = lambda t: t0 <= t < t1  # noqa: E731
        out: dict[str, float | int | None] = {f"{k}_mean": avg[k] for k in (
            "copies", "copies_pending", "gpus_reserved", "gpus_stranded", "gpus_fragmented", "memory_reserved_gb",
            "memory_stranded_gb", "gpu_memory_stranded_gb", "cpus_reserved")}
        out["copies_max"] = copies_max
        out["gpu_stranded_fraction"] = avg["gpus_stranded"] / avg["gpus"] if avg["gpus"] > 0 else None
        out["gpu_memory_stranded_fraction"] = (avg["gpu_memory_stranded_gb"] / avg["gpu_memory_gb"]
                                               if avg["gpu_memory_gb"] > 0 else None)
        out["copy_scaling_events"] = sum(1 for d in self.decisions if inside(d[0]))
        out["instances_requested"] = sum(1 for e in self.instance_events if e[2] == "request" and inside(e[0]))
        out["instances_released"] = sum(1 for e in self.instance_events if e[2] == "release" and inside(e[0]))
        out["copies_moved"] = sum(1 for c in self.copy_records if c.moved and inside(c.placed))
        return out


class ICInstance(Instance):
    __slots__ = ("free", "count", "copies", "gpu_free", "gpu_mem", "loader", "disk", "disk_used", "empty_since",
                 "leaving")

    def __init__(self, index: int, now: float, cap: tuple[float, float, float], loader: Loader):
        super().__init__(index, 0, now)
        self.free = list(cap)                  # [GPUs, host memory GB, vCPUs] reserved by no copy
        self.count: dict[int, int] = {}        # copies per component
        self.copies: list[Copy] = []
        self.gpu_free = list(range(int(cap[0])))
        self.gpu_mem = 0.0                     # GPU memory the models of its copies use
        self.loader = loader
        self.disk: dict[int, float] = {}       # artifacts on the instance volume (data cache)
        self.disk_used = 0.0
        self.empty_since = now
        self.leaving = False                   # consolidation empties it: no new copy goes there


class Copy:
    """A copy of a component on an instance: a FIFO queue in front of ``slots`` servers, on a
    device of its own (its GPUs, or CPUs). ``n`` counts its requests in flight (routing reads it;
    ``seen``: as last refreshed, with ``routing_refresh``)."""

    __slots__ = ("comp", "inst", "gpus", "state", "slots", "busy", "n", "seen", "queue", "record", "replaces",
                 "device")

    def __init__(self, comp: "Comp", inst: ICInstance, gpus: tuple[int, ...], record: CopyRecord, device):
        self.comp = comp
        self.inst = inst
        self.gpus = gpus
        self.state = LOADING
        self.slots = comp.spec.max_concurrency
        self.busy = 0
        self.n = 0
        self.seen = 0
        self.queue: deque[int] = deque()
        self.record = record
        self.replaces: Copy | None = None
        self.device = device
        device.owner = self


class Comp:
    """A component at run time: its copies by state and its autoscaling counters."""

    __slots__ = ("spec", "index", "model", "need", "gpu_mem", "size_gb", "init_s", "ready", "loading", "pending",
                 "moving", "desired", "rr", "inv", "inv_mark", "nocap", "nocap_mark", "inflight", "area", "t_area",
                 "area_mark")

    def __init__(self, spec: Component, model: Model, on_gpu: bool):
        self.spec = spec
        self.index = spec.index
        self.model = spec.model
        self.need = (spec.accelerators, spec.memory_gb, spec.cpus)
        self.gpu_mem = model.memory_gb if on_gpu else 0.0
        self.size_gb = model.size_gb
        self.init_s = model.init_time
        self.ready: list[Copy] = []      # serving (READY, or MOVING until its replacement serves)
        self.loading: list[Copy] = []
        self.pending = 0                 # copies waiting for capacity
        self.moving = 0                  # copies whose replacement is loading
        self.desired = spec.copies.start
        self.rr = 0                      # round-robin state of the routing policy
        self.inv = self.inv_mark = 0     # invocations routed to a copy
        self.nocap = self.nocap_mark = 0  # NoCapacityInvocationFailures
        # requests in flight on its copies and their time integral (for concurrent_requests_per_copy)
        self.inflight = 0
        self.area = self.area_mark = 0.0
        self.t_area = 0.0

    @property
    def live(self) -> int:
        """Copies that count toward the desired count: waiting, loading or serving (a move counts once)."""
        return self.pending + len(self.loading) + len(self.ready) - self.moving


class _Tracking:
    """A copy-scaling policy that sees no datapoint while its component has no copy
    in service (CloudWatch has none then), and starts afresh after."""

    def __init__(self, make):
        self.make = make
        self.policy = make()

    @property
    def lo(self) -> int:
        return self.policy.lo

    @lo.setter
    def lo(self, v: int) -> None:
        self.policy.lo = v

    @property
    def hi(self) -> int:
        return self.policy.hi

    @hi.setter
    def hi(self, v: int) -> None:
        self.policy.hi = v

    def evaluate(self, t: float, value: float, current: int, capacity: int | None = None) -> int | None:
        if current == 0:
            lo, hi = self.policy.lo, self.policy.hi
            self.policy = self.make()
            self.policy.lo, self.policy.hi = lo, hi
            return None
        return self.policy.evaluate(t, value, current, capacity)


class _FromZero:
    """The scale-from-zero step alarm: it acts only on a component that has no copy."""

    def __init__(self, policy: autoscaling.StepScaling):
        self.policy = policy

    def evaluate(self, t: float, value: float, current: int, capacity: int | None = None) -> int | None:
        if (current if capacity is None else capacity) > 0:
            return None
        return self.policy.evaluate(t, value, current, capacity)


class ICEndpoint(EndpointRuntime):
    def __init__(self, engine: Engine, ep: Endpoint, models: tuple[Model, ...]):
        it = ep.instance_type
        super().__init__(engine, ep, (it.total_gpu_memory_gb, it.memory_gb, it.storage_gb), models)
        self.log = ICLog(self.log.capacity)
        self.devices.log = self.log   # the devices (continuous batching) write their rows to this log
        spec = ep.spec
        self.on_gpu = it.gpus > 0
        self.cap = (it.gpus, it.memory_gb, float(it.vcpus))
        self.gpu_mem_total = it.total_gpu_memory_gb
        self.strategy = spec.placement
        self.choose = placement.get(spec.placement)
        self.scale_in_policy = spec.scale_in_policy or SCALE_IN_POLICY
        self.cooldown = SCALE_IN_COOLDOWN if spec.scale_in_cooldown is None else spec.scale_in_cooldown
        self.data_cache = DATA_CACHE if spec.data_cache is None else spec.data_cache
        self.queue_limit = ep.queue_limit
        self.speeds = LoadSpeeds(download_gbs=it.network_gbps / 8.0, disk_gbs=ep.disk_gbs or it.disk_read_gbs,
                                 h2d_gbs=ep.h2d_gbs, init_s=ep.load_overhead_s)
        self.comps = [Comp(c, models[c.model], self.on_gpu) for c in ep.components]
        # Least outstanding requests among a component's copies in O(log n) (sim.routing.LoadList); the
        # copies of all components share a class, so one component with many copies indexes all.
        self._copy_cls = Copy
        stale = ep.spec.routing_refresh is not None
        if any(routing.load_indexed(ep.routing, stale, c.copies.hi) for c in ep.components):
            self._copy_cls = routing.tracked(Copy)
            for comp in self.comps:
                comp.ready = routing.LoadList()
        self.comp_of: list[Comp | None] = [None] * len(models)
        for comp in self.comps:
            self.comp_of[comp.model] = comp
        self.waiting: list[Comp] = []       # one entry per copy waiting for capacity, oldest first
        self.booting: list[ICInstance] = []  # asked for, not yet in service
        self.last_out = -math.inf           # last instance asked for
        self.last_consolidation = -math.inf
        self._last_copies: dict[int, tuple[int, int, int]] = {}
        self._deploy()

    def _routed(self):
        """Routing chooses among each component's copies in service."""
        return [c for comp in self.comps for c in comp.ready]

    # -- the initial deployment ------------------------------------------------------------
    def _deploy(self) -> None:
        n0 = self.ep.instances.start
        for _ in range(n0):
            inst = self._new_instance()
            self.instances.append(inst)
            self.active.append(inst)
            self.billed += 1
        needs, owners = [], []
        for comp in self.comps:
            needs += [comp.need] * comp.desired
            owners += [comp.index] * comp.desired
        bins, left = placement.pack(needs, self.cap, self.strategy, owners, bins=[self.cap] * n0, max_bins=n0)
        for b in bins:
            for k in b.items:
                self._place(self.comps[owners[k]], self.active[b.index], ready=True)
        for k in left:
            comp = self.comps[owners[k]]
            comp.pending += 1
            self.waiting.append(comp)
        self._log_fleet()
        self._log_state()
        if self.waiting:
            # Ask for instances once the run starts (the provisioning stream is set by then).
            self.engine.at(0.0, lambda call: self._pump())

    def _new_instance(self) -> ICInstance:
        return ICInstance(len(self.instances), self.engine.env._now, self.cap, Loader(self.engine, self.speeds))

    def start(self) -> None:
        """Start the copy autoscalers, the scale-from-zero alarms and managed instance scaling."""
        env = self.engine.env
        for comp in self.comps:
            c = comp.spec
            a = c.autoscaling
            lo, hi = c.copies.lo, c.copies.hi
            if a is not None:
                policy = _Tracking(lambda a=a, lo=lo, hi=hi: autoscaling.policy_from_spec(a, lo, hi))
                bounds = None
                if a.schedule:
                    acts = [autoscaling.ScheduledAction(x.at_seconds, x.min, x.max) for x in a.schedule]
                    bounds = lambda t, acts=acts, lo=lo, hi=hi: autoscaling.scheduled_bounds(acts, t, lo, hi)  # noqa: E731
                env.process(autoscaling.drive(
                    env, a.period or autoscaling.METRIC_PERIODS[a.metric], policy,
                    lambda p, comp=comp, name=a.metric: self.metric_of(comp, name, p),
                    lambda comp=comp: comp.desired,
                    lambda n, comp=comp, policy=policy: self._scaled(comp, n, policy.policy, "autoscaling"),
                    bounds, lambda comp=comp: len(comp.ready)))
            w = c.scale_from_zero
            if w is not None and hi > 0:   # copies.max 0: the component never gets a copy
                step = autoscaling.StepScaling([autoscaling.Step(1, above=0.0)], 0, hi, w.cooldown,
                                               w.datapoints)
                env.process(autoscaling.drive(
                    env, w.period, _FromZero(step), lambda p, comp=comp: self._no_capacity(comp),
                    lambda comp=comp: comp.desired,
                    lambda n, comp=comp, step=step: self._scaled(comp, n, step, "scale_from_zero"),
                    None, lambda comp=comp: len(comp.ready)))
        if self.ep.instances.lo < self.ep.instances.hi:
            env.process(self._manage())

    # -- requests (hot path) ------------------------------------------------------------------
    def arrive(self, i: int) -> None:
        r = self.requests
        comp = self.comp_of[r.model[i]]
        ready = comp.ready
        if not ready:
            comp.nocap += 1
            self.engine.finish(i, NO_CAPACITY, self.engine.env._now)
            return
        comp.inv += 1
        env = self.engine.env
        now = env._now
        comp.area += comp.inflight * (now - comp.t_area)
        comp.t_area = now
        c = ready[0] if len(ready) == 1 else self.route(ready, r.u1[i], r.u2[i], comp)
        r.instance[i] = c.inst.index
        if c.busy < c.slots:
            c.busy += 1
            c.n += 1
            comp.inflight += 1
            r.start[i] = now
            c.device.start(i, now)
        elif self.queue_limit is not None and len(c.queue) >= self.queue_limit:
            self.engine.finish(i, THROTTLED, now)
        else:
            c.queue.append(i)
            c.n += 1
            comp.inflight += 1

    def _done(self, i: int, dev) -> None:
        c = dev.owner
        r = self.requests
        now = self.engine.env._now
        comp = c.comp
        comp.area += comp.inflight * (now - comp.t_area)
        comp.t_area = now
        j, dropped = self._pop_live(c.queue, now)
        c.n -= 1 + dropped
        comp.inflight -= 1 + dropped
        if j >= 0:
            r.start[j] = now
            dev.start(j, now)
        else:
            c.busy -= 1
        if now - r.arrival[i] <= self.timeout and not self.engine.closed_loop:   # _served's usual case
            r.status[i] = OK
            r.end[i] = now
        else:
            self._served(i, now)
        if c.n == 0 and c.state == DRAINING:
            self._free(c)

    # -- copies --------------------------------------------------------------------------------
    def _place(self, comp: Comp, inst: ICInstance, ready: bool = False) -> Copy:
        """Reserve a copy's resources on ``inst``; it serves at once (``ready``) or after its load."""
        now = self.engine.env._now
        acc = comp.spec.accelerators
        gpus = tuple(inst.gpu_free[:acc])
        del inst.gpu_free[:acc]
        need = comp.need
        f = inst.free
        f[0] -= need[0]
        f[1] -= need[1]
        f[2] -= need[2]
        inst.count[comp.index] = inst.count.get(comp.index, 0) + 1
        inst.gpu_mem += comp.gpu_mem
        rec = CopyRecord(comp.index, comp.model, inst.index, gpus, now)
        self.log.copy_records.append(rec)
        copy = self._copy_cls(comp, inst, gpus, rec, self.devices.new(self._done, len(gpus), model=comp.model))
        inst.copies.append(copy)
        m = comp.model
        if m in inst.disk:
            inst.disk[m] = inst.disk.pop(m)   # most recently used last
        if ready:
            if self.data_cache and m not in inst.disk:
                self._cache_artifact(inst, m, comp.size_gb)
            copy.state = READY
            rec.ready = now
            comp.ready.append(copy)
        else:
            comp.loading.append(copy)
            self._load(copy, m in inst.disk)
        peak = self.log.peaks.setdefault(inst.index, [0.0, 0.0, 0.0, 0])
        for k, v in enumerate((inst.gpu_mem, self.cap[1] - f[1], inst.disk_used, len(inst.copies))):
            peak[k] = max(peak[k], v)
        return copy

    def _load(self, copy: Copy, on_disk: bool) -> None:
        """Download the artifact (unless on the instance's disk), then read it, copy it to the GPU, init."""
        inst, comp = copy.inst, copy.comp
        m, size = comp.model, comp.size_gb
        now = self.engine.env._now
        rec = LoadRecord(inst.index, m, now, now)
        self.log.loads.append(rec)

        def fetched() -> None:
            # On disk from now on: a later copy of the model on this instance skips the download.
            if self.data_cache and m not in inst.disk:
                self._cache_artifact(inst, m, size)
            inst.loader.load(size, True, comp.init_s, rec, lambda: self._loaded(copy), self.on_gpu)

        if on_disk:
            fetched()
        else:
            inst.loader.net.transfer(size, fetched)

    def _cache_artifact(self, inst: ICInstance, m: int, size: float) -> None:
        """Keep an artifact on the instance volume, deleting the least recently used unused ones for room."""
        cap = self.ep.instance_type.storage_gb
        in_use = {c.comp.model for c in inst.copies}
        for k in list(inst.disk):
            if inst.disk_used + size <= cap + 1e-9:
                break
            if k not in in_use:
                inst.disk_used -= inst.disk.pop(k)
        if inst.disk_used + size <= cap + 1e-9:
            inst.disk[m] = size
            inst.disk_used += size

    def _loaded(self, copy: Copy) -> None:
        if copy.state != LOADING:
            return   # cancelled while it loaded
        comp = copy.comp
        comp.loading.remove(copy)
        copy.state = READY
        copy.record.ready = self.engine.env._now
        comp.ready.append(copy)
        orig = copy.replaces
        if orig is not None:
            comp.moving -= 1
            self._retire(orig)
        self._log_state()

    def _retire(self, copy: Copy) -> None:
        """The copy takes no new request; it leaves when those it has are done."""
        copy.comp.ready.remove(copy)
        copy.state = DRAINING
        copy.record.retired = self.engine.env._now
        if copy.n == 0:
            self._free(copy)

    def _cancel(self, copy: Copy) -> None:
        """A copy still loading is dropped (its load finishes unseen)."""
        copy.comp.loading.remove(copy)
        copy.record.retired = self.engine.env._now
        self._free(copy)

    def _free(self, copy: Copy) -> None:
        now = self.engine.env._now
        copy.state = GONE
        copy.record.released = now
        inst = copy.inst
        comp = copy.comp
        inst.copies.remove(copy)
        inst.gpu_free.extend(copy.gpus)
        inst.gpu_free.sort()
        need = comp.need
        f = inst.free
        f[0] += need[0]
        f[1] += need[1]
        f[2] += need[2]
        inst.count[comp.index] -= 1
        inst.gpu_mem -= comp.gpu_mem
        if not inst.copies:
            inst.empty_since = now
            if inst.leaving:
                inst.leaving = False
                if len(self.active) + len(self.booting) > self.ep.instances.lo:
                    self._release_instance(inst)
        self._pump()
        self._log_state()

    def _set_desired(self, comp: Comp, n: int) -> None:
        comp.desired = n
        live = comp.live
        while live < n:
            comp.pending += 1
            self.waiting.append(comp)
            live += 1
        while live > n:
            self._remove_one(comp)
            live -= 1
        self._pump()
        self._log_state()

    def _remove_one(self, comp: Comp) -> None:
        """Scale in by one copy: a waiting one, else a loading one, else one that serves."""
        if comp.pending:
            comp.pending -= 1
            for k in range(len(self.waiting) - 1, -1, -1):
                if self.waiting[k] is comp:
                    del self.waiting[k]
                    break
            return
        plain = [c for c in comp.loading if c.replaces is None]
        if plain:
            self._cancel(plain[-1])
            return
        serving = [c for c in comp.ready if c.state == READY]
        if serving:
            if self.strategy == "spread":   # keep the copies spread: take from where the component has most
                key = lambda c: (-c.inst.count[comp.index], c.n, -c.inst.index)  # noqa: E731
            else:                           # free instances: take from the emptiest
                key = lambda c: (len(c.inst.copies), c.n, -c.inst.index)  # noqa: E731
            self._retire(min(serving, key=key))
            return
        rep = comp.loading[-1]               # only moves in flight: undo one and retire its original
        orig = rep.replaces
        comp.moving -= 1
        self._cancel(rep)
        self._retire(orig)

    def _pump(self) -> None:
        """Place the copies that wait, oldest first, where the strategy puts them; ask for instances for the rest."""
        if not self.waiting:
            return
        cands = [i for i in self.active if not i.leaving]
        still = []
        for comp in self.waiting:
            inst = self.choose(cands, comp.need, comp.index, self.cap) if cands else None
            if inst is None:
                still.append(comp)
                continue
            comp.pending -= 1
            self._place(comp, inst)
        self.waiting = still
        if still:
            self._grow()

    # -- managed instance scaling ---------------------------------------------------------------
    def _grow(self) -> None:
        """Ask for the instances a binpack of the waiting copies needs beyond those already booting."""
        room = self.ep.instances.hi - len(self.active) - len(self.booting)
        if room <= 0:
            return
        needs = [c.need for c in self.waiting]
        owners = [c.index for c in self.waiting]
        nb = len(self.booting)
        bins, _ = placement.pack(needs, self.cap, "binpack", owners, bins=[self.cap] * nb)
        for _ in range(min(len(bins) - nb, room)):
            self._request_instance()

    def _provisioning_delay(self) -> float:
        p = self.ep.spec.provisioning
        if p.mean <= 0:
            return 0.0
        if self.provision_rng is None:
            return float(p.mean)
        return float(sample(self.provision_rng, p.dist, p.mean, p.cv, 1)[0])

    def _request_instance(self) -> None:
        now = self.engine.env._now
        inst = self._new_instance()
        self.instances.append(inst)
        self.booting.append(inst)
        self.billed += 1
        self.last_out = now
        self.log.instance_events.append((now, inst.index, "request"))
        self._log_fleet()
        self.engine.at(self._provisioning_delay(), self._instance_up, None, inst)

    def _instance_up(self, call: Call) -> None:
        inst = call.obj
        now = self.engine.env._now
        self.booting.remove(inst)
        inst.up_since = inst.empty_since = now
        self.active.append(inst)
        self.log.instance_events.append((now, inst.index, "up"))
        self._log_fleet()
        self._pump()
        self._log_state()

    def _release_instance(self, inst: ICInstance) -> None:
        self.active.remove(inst)
        self.billed -= 1
        self.log.instance_events.append((self.engine.env._now, inst.index, "release"))
        self._log_fleet()
        self._log_state()

    def _manage(self):
        """Managed instance scaling's scale-in, evaluated every minute."""
        env = self.engine.env
        lo = self.ep.instances.lo
        while True:
            yield env.timeout(MANAGED_PERIOD)
            now = env.now
            if self.scale_in_policy == "consolidation":
                self._consolidate(now)
            for inst in list(self.active):
                if len(self.active) + len(self.booting) <= lo:
                    break
                if not inst.copies and not inst.leaving and now - inst.empty_since >= self.cooldown - 1e-9:
                    self._release_instance(inst)

    def _consolidate(self, now: float) -> None:
        """Move the copies of the emptiest instance to the others when they fit there."""
        cd = self.cooldown
        if (self.waiting or any(c.moving for c in self.comps) or now - self.last_out < cd
                or now - self.last_consolidation < cd
                or len(self.active) + len(self.booting) - 1 < self.ep.instances.lo):
            return
        held = [i for i in self.active if i.copies and not i.leaving]
        if len(held) < 2:
            return
        cap = self.cap
        movable = [i for i in held if all(c.state == READY for c in i.copies)]
        if not movable:
            return
        victim = min(movable, key=lambda i: (placement.size([c - f for c, f in zip(cap, i.free)], cap), -i.index))
        others = [placement.Bin(i.index, i.free) for i in held if i is not victim]
        plan = []
        for copy in sorted(victim.copies, key=lambda c: -placement.size(c.comp.need, cap)):
            b = placement.binpack(others, copy.comp.need, copy.comp.index, cap)
            if b is None:
                return
            b.put(0, copy.comp.need, copy.comp.index)
            plan.append((copy, self.instances[b.index]))
        self.last_consolidation = now
        victim.leaving = True
        for copy, target in plan:
            comp = copy.comp
            copy.state = MOVING
            comp.moving += 1
            rep = self._place(comp, target)
            rep.replaces = copy
            rep.record.moved = True
        self._log_state()

    # -- autoscaling ----------------------------------------------------------------------------
    def metric_of(self, comp: Comp, name: str, period: float) -> float:
        """A component's autoscaling metric over the period just ended (per copy in service)."""
        n = len(comp.ready)
        if name == "invocations_per_copy":
            count = comp.inv - comp.inv_mark
            comp.inv_mark = comp.inv
            return count / n * (60.0 / period) if n else 0.0
        if name == "concurrent_requests_per_copy":
            # The time average over the period of the requests in flight on the component's copies.
            now = self.engine.env._now
            comp.area += comp.inflight * (now - comp.t_area)
            comp.t_area = now
            area = comp.area - comp.area_mark
            comp.area_mark = comp.area
            return area / (period * n) if n else 0.0
        raise ValueError(f"metric {name!r} does not apply to an inference component")

    def _no_capacity(self, comp: Comp) -> float:
        count = comp.nocap - comp.nocap_mark
        comp.nocap_mark = comp.nocap
        return float(count)

    def _scaled(self, comp: Comp, n: int, policy, source: str) -> None:
        d = policy.decisions[-1] if policy.decisions else None
        value = d.metric if d is not None and d.t == self.engine.env._now else float("nan")
        self.log.decisions.append((self.engine.env._now, comp.index, source, comp.desired, n, value))
        self._set_desired(comp, n)

    # -- logs -------------------------------------------------------------------------------------
    def _log_state(self) -> None:
        now = self.engine.env._now
        G, M, C = self.cap
        act = self.active
        n = len(act)
        gfree = frag = 0
        mem_res = cpu_res = gpu_mem = disk = 0.0
        for inst in act:
            free = len(inst.gpu_free)
            gfree += free
            if free and not any(placement.fits(inst.free, c.need) for c in self.comps):
                frag += free
            mem_res += M - inst.free[1]
            cpu_res += C - inst.free[2]
            gpu_mem += inst.gpu_mem
            disk += inst.disk_used
        serving = sum(len(c.ready) for c in self.comps)
        loading = sum(len(c.loading) for c in self.comps)
        gtot = n * self.gpu_mem_total
        self.log.packing.append((now, serving, loading, len(self.waiting), n * G, n * G - gfree, gfree, frag,
                                 n * M, mem_res, n * M - mem_res, gtot, gtot - gpu_mem, n * C, cpu_res))
        self.log.memory.append((now, serving, gpu_mem, mem_res, disk))
        for comp in self.comps:
            row = (comp.desired, comp.live, len(comp.ready))
            if self._last_copies.get(comp.index) != row:
                self._last_copies[comp.index] = row
                self.log.copies.append((now,) + (comp.index,) + row)
