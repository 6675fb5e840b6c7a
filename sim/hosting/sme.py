"""Single-model endpoints: each instance holds ``copies_per_instance`` copies of
one model; each copy serves up to ``max_concurrency`` requests at once, so an
instance is a FIFO queue in front of ``copies x max_concurrency`` servers. Each
copy runs on a device of its own (its GPUs): a request starts on the copy with
the fewest in service."""
from __future__ import annotations

from ..core.engine import NO_CAPACITY, OK, THROTTLED, Engine
from ..routing import tracked
from ..scenario.resolve import Endpoint, Model
from .base import EndpointRuntime, Instance
from .loading import Loader, LoadRecord, LoadSpeeds


class SMEEndpoint(EndpointRuntime):
    routes_active = True

    def __init__(self, engine: Engine, ep: Endpoint, models: tuple[Model, ...]):
        it = ep.instance_type
        super().__init__(engine, ep, (it.total_gpu_memory_gb, it.memory_gb, it.storage_gb), models)
        self.model = models[ep.models[0]]
        self.slots = ep.copies_per_instance * ep.max_concurrency
        self.queue_limit = ep.queue_limit
        m = self.model
        self._gpus = m.accelerators if it.gpus > 0 and m.accelerators > 0 else 0
        self._one_copy = ep.copies_per_instance == 1
        self.speeds = LoadSpeeds(it.network_gbps / 8.0, ep.disk_gbs or it.disk_read_gbs, ep.h2d_gbs, ep.load_overhead_s)
        self._start_fleet(ep.instances.start)
        self._log_memory()

    def _new_instance(self) -> Instance:
        cls = tracked(Instance) if self.load_indexed else Instance
        inst = cls(len(self.instances), self.slots, self.engine.env._now)
        inst.devices = [self.devices.new(self._done, self._gpus, inst, self.model.index) for _ in range(self.ep.copies_per_instance)]
        return inst

    def _prepare(self, inst: Instance) -> None:
        """A new instance downloads and loads its model's copies before it serves."""
        m = self.model
        rec = LoadRecord(inst.index, m.index, self.engine.env._now, self.engine.env._now)
        self.log.loads.append(rec)
        on_gpu = self.ep.instance_type.gpus > 0 and m.accelerators > 0

        def loaded() -> None:
            if inst.failed:   # it failed while loading: no load to count, nothing to activate
                self.log.loads.remove(rec)
                return
            self._activate(inst)

        Loader(self.engine, self.speeds).load(m.size_gb, False, m.init_time, rec, loaded, on_gpu)

    def _on_fleet_change(self) -> None:
        self._log_memory()

    def _copies_per_instance(self) -> int:
        return self.ep.copies_per_instance

    def _release(self, inst: Instance) -> None:
        self._log_memory()   # (a draining instance held its copies until now)

    def _log_memory(self) -> None:
        # the instances holding their copies: in service or draining (their requests still running)
        n, c, m = len(self.active) + self.draining, self.ep.copies_per_instance, self.model
        on_gpu = self.ep.instance_type.gpus > 0 and m.accelerators > 0
        self.log.memory.append((self.engine.env._now, n * c, n * c * m.memory_gb if on_gpu else 0.0,
                                n * c * (m.host_memory_gb + (0.0 if on_gpu else m.memory_gb)), n * m.size_gb))

    # The two functions below run once per request: keep them lean.
    def arrive(self, i: int) -> None:
        r = self.requests
        act = self.active
        self.invocations += 1
        if len(act) == 1:
            inst = act[0]
        elif act:
            inst = self.route(act, r.u1[i], r.u2[i], self)
        else:   # every instance failed or left: no capacity until a replacement serves
            self.engine.finish(i, NO_CAPACITY, self.engine.env._now)
            return
        r.instance[i] = inst.index
        if inst.busy < inst.slots:
            inst.busy += 1
            inst.n += 1
            now = self._env._now
            r.start[i] = now
            devs = inst.devices
            (devs[0] if self._one_copy else min(devs, key=_in_service)).start(i, now)
        elif self.queue_limit is not None and len(inst.queue) >= self.queue_limit:
            self.engine.finish(i, THROTTLED, self.engine.env._now)
        else:
            inst.queue.append(i)
            inst.n += 1

    def _done(self, i: int, dev) -> None:
        inst = dev.owner
        q = inst.queue
        now = self._env._now
        r = self.requests
        if q:
            if now - r.arrival[q[0]] < self.timeout:   # the next one still waits: _pop_live's usual case
                j = q.popleft()
                inst.n -= 1
                r.start[j] = now
                dev.start(j, now)
            else:
                j, dropped = self._pop_live(q, now)
                inst.n -= 1 + dropped
                if j >= 0:
                    r.start[j] = now
                    dev.start(j, now)
                else:
                    inst.busy -= 1
        else:
            inst.n -= 1
            inst.busy -= 1
        if now - r.arrival[i] <= self.timeout and not self.engine.closed_loop:   # _served's usual case
            r.status[i] = OK
            r.end[i] = now
        else:
            self._served(i, now)
        if inst.draining:
            self._maybe_release(inst)


def _in_service(dev) -> int:
    return dev.busy
