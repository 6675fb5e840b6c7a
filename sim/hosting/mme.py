"""Multi-model endpoints: models loaded on demand into a per-instance cache.

Each instance has three memory tiers: GPU memory (``cache.memory_fraction`` of
it may hold models), host memory (each loaded model's ``host_memory_gb`` above
``cache.host_reserve``) and the instance volume (artifacts stay on disk after
an unload until the disk needs room). A request goes to an instance where its
model is loaded or loading (the routing policy chooses among those); if none
has it, to an instance chosen by the policy among all, which loads it. When
every instance holding a model has ``replicate_above`` requests in flight, the
next request loads it on one more instance (``replicate_above`` counts the
model's own requests in flight there, and only where it is loaded). Loads need room in every tier;
idle models are evicted by the cache policy (lru, lfu, gds) to make it.
With ``instance_concurrency`` an instance has that many workers, which run
its requests and its loads alike (a CPU-bound model server's worker processes:
vCPUs bound CPU-bound models, and a worker that loads a model serves nothing
meanwhile); a free worker takes the longest-waiting job, a request whose model
has a free concurrency slot or the next pending load.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from ..core.engine import NO_CAPACITY, OK, THROTTLED, TIMEOUT, Engine
from ..scenario.resolve import Endpoint, Model
from .base import EndpointRuntime, Instance
from .loading import Loader, LoadRecord, LoadSpeeds


class Slot:
    """A model on an instance: loading or loaded, with its own queue and concurrency."""

    __slots__ = ("model", "inst", "loaded", "busy", "queue", "waiting", "last_used", "uses", "h", "record")

    def __init__(self, model: int, inst: "MMEInstance", now: float):
        self.model = model
        self.inst = inst
        self.loaded = False
        self.busy = 0
        self.queue: deque[int] = deque()     # requests waiting for a free concurrency slot
        self.waiting: list[int] = []         # requests waiting for the load to finish
        self.last_used = now
        self.uses = 0
        self.h = 0.0                         # GreedyDual-Size priority
        self.record: LoadRecord | None = None

    @property
    def idle(self) -> bool:
        return self.loaded and self.busy == 0 and not self.queue


class MMEInstance(Instance):
    __slots__ = ("models", "gpu_used", "host_used", "disk", "disk_used", "loading", "loaded", "pending",
                 "loader", "gds_floor", "serving")

    def __init__(self, index: int, now: float, loader: Loader):
        super().__init__(index, 0, now)
        self.models: dict[int, Slot] = {}
        self.gpu_used = 0.0
        self.host_used = 0.0
        self.disk: OrderedDict[int, float] = OrderedDict()   # artifacts on disk, least recently used first
        self.disk_used = 0.0
        self.loading = 0
        self.loaded = 0
        self.pending: deque[Slot] = deque()   # loads waiting for a load slot or memory
        self.loader = loader
        self.gds_floor = 0.0
        self.serving = 0                      # busy workers (instance_concurrency): requests and loads


def _victim_lru(slots):
    return min(slots, key=lambda s: s.last_used)


def _victim_lfu(slots):
    return min(slots, key=lambda s: (s.uses, s.last_used))


def _victim_gds(slots):
    return min(slots, key=lambda s: (s.h, s.last_used))


EVICTION = {"lru": _victim_lru, "lfu": _victim_lfu, "gds": _victim_gds}


class MMEEndpoint(EndpointRuntime):
    def __init__(self, engine: Engine, ep: Endpoint, models: tuple[Model, ...]):
        it = ep.instance_type
        cache = ep.cache
        self.cache = cache
        self.on_gpu = it.gpus > 0
        gpu_cap = it.total_gpu_memory_gb * cache.memory_fraction if self.on_gpu else 0.0
        host_cap = max(it.memory_gb - cache.host_reserve, 0.0)
        disk_cap = cache.disk if cache.disk is not None else it.storage_gb
        super().__init__(engine, ep, (it.total_gpu_memory_gb, it.memory_gb, disk_cap), models)
        self.gpu_cap, self.host_cap, self.disk_cap = gpu_cap, host_cap, disk_cap
        self.models = models
        self.max_conc = ep.max_concurrency
        # No limit unless set: the uncapped path is the plain per-model one.
        self.inst_cap = ep.spec.instance_concurrency
        self.queue_limit = ep.queue_limit
        self.rep_above = cache.replicate_above
        self._gds = cache.policy == "gds"   # read once per request below
        self.max_loads = cache.max_concurrent_loads
        self.victim = EVICTION[cache.policy]
        self.speeds = LoadSpeeds(
            download_gbs=cache.s3_throughput or it.network_gbps / 8.0,
            disk_gbs=ep.disk_gbs or it.disk_read_gbs,
            h2d_gbs=ep.h2d_gbs,
            init_s=ep.load_overhead_s,
        )
        self.holders: list[list[MMEInstance]] = [[] for _ in models]
        self._totals = [0, 0.0, 0.0, 0.0]   # over the endpoint: loaded models, GPU, host, disk GB
        self.gpu_total = it.total_gpu_memory_gb
        probe = Loader(engine, self.speeds)
        self._gds = [probe.cold_start_estimate(mod.size_gb, False, mod.init_time, self.on_gpu)
                     / max(mod.memory_gb if self.on_gpu else mod.memory_gb + mod.host_memory_gb, 1e-9)
                     for mod in models]
        self._gpus = it.gpus if self.on_gpu else 0
        self._llm_devices: dict[tuple[int, int], object] = {}   # (instance, model) -> continuous-batching copy
        self._start_fleet(ep.instances.start)
        self._log_memory()

    # -- fleet ------------------------------------------------------------------
    def _new_instance(self) -> MMEInstance:
        inst = MMEInstance(len(self.instances), self.engine.env._now, Loader(self.engine, self.speeds))
        # One device: the instance's GPU(s), or its CPUs, shared by every model loaded there.
        inst.devices = [self.devices.new(self._done, self._gpus, inst)]
        return inst

    def _leave_service(self, inst: MMEInstance) -> None:
        # No new request may find its models there: routing reads the holders.
        for m in inst.models:
            if inst in self.holders[m]:
                self.holders[m].remove(inst)
        super()._leave_service(inst)

    def _release(self, inst: MMEInstance) -> None:
        for slot in list(inst.models.values()):
            if slot.loaded:
                self._unload(inst, slot, logged=not inst.failed)
            elif slot.record is not None and slot.record.start >= 0:   # a load under way dies with it
                gpu, host = self._need(slot.model)
                inst.gpu_used -= gpu
                inst.host_used -= host
                self._totals[1] -= gpu
                self._totals[2] -= host
                inst.loading -= 1
        inst.models.clear()
        inst.pending.clear()
        self._totals[3] -= inst.disk_used
        inst.disk.clear()
        inst.disk_used = 0.0
        self._log_memory()

    def metric(self, name: str, period: float) -> float:
        if name == "gpu_memory_utilization":
            n = max(len(self.active), 1)
            return 100.0 * sum(i.gpu_used for i in self.active) / (n * self.gpu_total or 1.0)
        return super().metric(name, period)

    def _log_memory(self) -> None:
        t = self._totals
        self.log.memory.append((self.engine.env._now, t[0], t[1], t[2], t[3]))

    # -- footprint of a model in each tier ------------------------------------------
    def _need(self, m: int) -> tuple[float, float]:
        mod = self.models[m]
        if self.on_gpu:
            return mod.memory_gb, mod.host_memory_gb
        return 0.0, mod.memory_gb + mod.host_memory_gb

    def cold_start_estimate(self, m: int, on_disk: bool = False) -> float:
        """A load of model ``m`` alone on an instance: the sum of its stages."""
        mod = self.models[m]
        return Loader(self.engine, self.speeds).cold_start_estimate(mod.size_gb, on_disk, mod.init_time,
                                                                    self.on_gpu)

    # -- requests (hot path) --------------------------------------------------------
    def arrive(self, i: int) -> None:
        r = self.requests
        m = r.model[i]
        hold = self.holders[m]
        now = self.engine.env._now
        self.invocations += 1
        if hold:
            inst = hold[0] if len(hold) == 1 else self.route(hold, r.u1[i], r.u2[i], self)
            slot = inst.models[m]
            rep = self.rep_above
            # Hot: every copy of the model is loaded and has `rep` of its requests in flight.
            if (slot.busy + len(slot.queue) >= rep and len(hold) < len(self.active)
                    and all(self._pressure(h.models[m]) >= rep for h in hold)):
                others = [x for x in self.active if m not in x.models]
                inst = others[0] if len(others) == 1 else self.route(others, r.u2[i], r.u1[i], self)
                slot = self._request_load(inst, m)
        else:
            act = self.active
            if not act:   # every instance failed or left: no capacity until a replacement serves
                self.engine.finish(i, NO_CAPACITY, now)
                return
            inst = act[0] if len(act) == 1 else self.route(act, r.u1[i], r.u2[i], self)
            slot = self._request_load(inst, m)
        r.instance[i] = inst.index
        slot.last_used = now
        slot.uses += 1
        if slot.loaded:
            if self._gds:
                slot.h = inst.gds_floor + self._gds_cost(m)
            if self.inst_cap is not None:
                if self.queue_limit is not None and len(slot.queue) >= self.queue_limit:
                    self.engine.finish(i, THROTTLED, now)
                    return
                inst.n += 1
                slot.queue.append(i)
                self._dispatch(inst)
            elif slot.busy < self.max_conc:
                inst.n += 1
                si = slot.inst   # _start inlined: once per request
                slot.busy += 1
                si.serving += 1
                r.start[i] = now
                sm = slot.model
                (si.devices[0] if sm not in self.devices.llm else self._device(si, sm)).start(i, now)
            elif self.queue_limit is not None and len(slot.queue) >= self.queue_limit:
                self.engine.finish(i, THROTTLED, now)
            else:
                inst.n += 1
                slot.queue.append(i)
        else:
            inst.n += 1
            r.cold[i] = True
            slot.waiting.append(i)

    @staticmethod
    def _pressure(slot: Slot) -> int:
        return slot.busy + len(slot.queue) if slot.loaded else -1

    def _start(self, i: int, slot: Slot, now: float) -> None:
        inst = slot.inst
        slot.busy += 1
        inst.serving += 1
        self.requests.start[i] = now
        m = slot.model
        (inst.devices[0] if m not in self.devices.llm else self._device(inst, m)).start(i, now)

    def _device(self, inst: MMEInstance, m: int):
        """Where a request of model ``m`` runs on ``inst``: the instance's shared device, or for a
        continuous-batching model its own copy (its steps and KV cache on the instance's GPUs), made at
        its first request there."""
        if m not in self.devices.llm:
            return inst.devices[0]
        dev = self._llm_devices.get((inst.index, m))
        if dev is None:
            dev = self._llm_devices[(inst.index, m)] = self.devices.new(self._done, self._gpus, inst, m)
            inst.devices.append(dev)   # an instance failure stops it too
        return dev

    def _done(self, i: int, dev) -> None:
        r = self.requests
        inst = dev.owner
        slot = inst.models[r.model[i]]
        now = self._env._now
        q = slot.queue
        if self.inst_cap is None:
            j, dropped = self._pop_live(q, now) if q else (-1, 0)
            inst.n -= 1 + dropped
            if j >= 0:
                r.start[j] = now
                dev.start(j, now)
            else:
                slot.busy -= 1
                inst.serving -= 1
        else:
            inst.n -= 1
            slot.busy -= 1
            inst.serving -= 1
        if now - r.arrival[i] <= self.timeout and not self.engine.closed_loop:   # _served's usual case
            r.status[i] = OK
            r.end[i] = now
        else:
            self._served(i, now)
        if slot.busy == 0 and not q:
            if not self.cache.enabled:
                self._unload(inst, slot)
                self._log_memory()
                self._pump(inst)
            elif inst.pending:
                self._pump(inst)
        if self.inst_cap is not None:
            self._dispatch(inst)
        if inst.draining:
            self._maybe_release(inst)

    def _dispatch(self, inst: MMEInstance) -> None:
        """Capped instance: while a worker is free, start the longest-waiting job: a queued
        request whose model has a free concurrency slot, or the next pending load (waiting
        since its first request) when a load slot and room for it are free."""
        r = self.requests
        now = self.engine.env._now
        started = False
        while inst.serving < self.inst_cap:
            ready = [s for s in inst.models.values() if s.loaded and s.queue and s.busy < self.max_conc]
            slot = min(ready, key=lambda s: r.arrival[s.queue[0]]) if ready else None
            load = inst.pending[0] if inst.pending and inst.loading < self.max_loads else None
            if load is not None and (slot is None or load.record.queued <= r.arrival[slot.queue[0]]):
                if self._make_room(inst, load.model):
                    inst.pending.popleft()
                    inst.serving += 1
                    self._begin_load(inst, load)
                    started = True
                    continue
            if slot is None:
                break
            j, dropped = self._pop_live(slot.queue, now)
            inst.n -= dropped
            if j >= 0:
                self._start(j, slot, now)
        if started:
            self._log_memory()

    # -- loading and eviction --------------------------------------------------------
    def _gds_cost(self, m: int) -> float:
        """GreedyDual-Size's cost / size: the time a reload costs per GB it occupies."""
        return self._gds[m]

    def _request_load(self, inst: MMEInstance, m: int) -> Slot:
        now = self.engine.env._now
        slot = Slot(m, inst, now)
        slot.record = LoadRecord(inst.index, m, now)
        inst.models[m] = slot
        self.holders[m].append(inst)
        inst.pending.append(slot)
        self._pump(inst)
        return slot

    def _pump(self, inst: MMEInstance) -> None:
        """Start pending loads while a load slot and room in every tier are free (FIFO)."""
        if self.inst_cap is not None:
            self._dispatch(inst)
            return
        changed = False
        while inst.pending and inst.loading < self.max_loads:
            slot = inst.pending[0]
            if not self._make_room(inst, slot.model):
                break
            inst.pending.popleft()
            self._begin_load(inst, slot)
            changed = True
        if changed:
            self._log_memory()

    def _make_room(self, inst: MMEInstance, m: int) -> bool:
        gpu, host = self._need(m)
        size = self.models[m].size_gb
        while inst.gpu_used + gpu > self.gpu_cap + 1e-9 or inst.host_used + host > self.host_cap + 1e-9:
            idle = [s for s in inst.models.values() if s.idle]
            if not idle:
                return False
            self._unload(inst, self.victim(idle))
        if m not in inst.disk:
            while inst.disk_used + size > self.disk_cap + 1e-9:
                # The disk deletes its least recently used artifact not in memory.
                gone = next((k for k in inst.disk if k not in inst.models), None)
                if gone is None:
                    return False
                freed = inst.disk.pop(gone)
                inst.disk_used -= freed
                self._totals[3] -= freed
        return True

    def _begin_load(self, inst: MMEInstance, slot: Slot) -> None:
        m = slot.model
        mod = self.models[m]
        gpu, host = self._need(m)
        inst.gpu_used += gpu
        inst.host_used += host
        t = self._totals
        t[1] += gpu
        t[2] += host
        on_disk = m in inst.disk
        if on_disk:
            inst.disk.move_to_end(m)
        else:
            inst.disk[m] = mod.size_gb
            inst.disk_used += mod.size_gb
            t[3] += mod.size_gb
        inst.loading += 1
        peak = self.log.peaks.setdefault(inst.index, [0.0, 0.0, 0.0, 0])
        in_memory = inst.loading + inst.loaded
        for k, v in enumerate((inst.gpu_used, inst.host_used, inst.disk_used, in_memory)):
            peak[k] = max(peak[k], v)
        rec = slot.record
        rec.start = self.engine.env._now
        self.log.loads.append(rec)
        # a load onto the instance's CPUs inits on the cores its requests use: a job of their device
        inst.loader.load(mod.size_gb, on_disk, mod.init_time, rec, lambda: self._loaded(inst, slot), self.on_gpu,
                         init_on=None if self.on_gpu else inst.devices[0], model=m)

    def _loaded(self, inst: MMEInstance, slot: Slot) -> None:
        if inst.failed:
            return
        now = self.engine.env._now
        inst.loading -= 1
        slot.loaded = True
        self._totals[0] += 1
        inst.loaded += 1
        if self.cache.policy == "gds":
            slot.h = inst.gds_floor + self._gds_cost(slot.model)
        r = self.requests
        timeout = self.timeout
        for j in slot.waiting:
            r.load[j] = now - r.arrival[j]
            if now - r.arrival[j] >= timeout:
                inst.n -= 1
                self.engine.finish(j, TIMEOUT, r.arrival[j] + timeout)
            elif self.inst_cap is None and slot.busy < self.max_conc:
                self._start(j, slot, now)
            else:
                slot.queue.append(j)
        slot.waiting = []
        if self.inst_cap is not None:
            inst.serving -= 1   # the load's worker
        self._log_memory()
        if inst.draining:
            self._maybe_release(inst)
        if slot.busy == 0 and not slot.queue and not self.cache.enabled:
            self._unload(inst, slot)
            self._log_memory()
        self._pump(inst)

    def _unload(self, inst: MMEInstance, slot: Slot, logged: bool = True) -> None:
        m = slot.model
        gpu, host = self._need(m)
        inst.gpu_used -= gpu
        inst.host_used -= host
        t = self._totals
        t[0] -= 1
        inst.loaded -= 1
        t[1] -= gpu
        t[2] -= host
        del inst.models[m]
        if inst in self.holders[m]:
            self.holders[m].remove(inst)
        if self.cache.policy == "gds":
            inst.gds_floor = max(inst.gds_floor, slot.h)
        if logged:
            self.log.unloads.append((self.engine.env._now, inst.index, m))
