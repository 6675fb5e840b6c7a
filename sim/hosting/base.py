"""What every hosting mode shares: instances in service, routing and the logs
from which metrics are derived after the run."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import routing
from ..core.engine import OK, TIMEOUT, Engine
from ..scenario.resolve import Endpoint
from .device import DeviceSet
from .loading import LoadRecord


class Instance:
    """One instance of an endpoint. ``n`` counts its requests in flight (serving or
    queued); ``seen`` is ``n`` as the router last saw it (only with ``routing_refresh``);
    ``draining`` is set when it leaves service and waits for them to end; ``devices``: where its
    requests run (:mod:`sim.hosting.device`)."""

    __slots__ = ("index", "slots", "busy", "queue", "n", "seen", "up_since", "draining", "failed", "zone",
                 "devices")

    def __init__(self, index: int, slots: int, up_since: float):
        self.index = index
        self.slots = slots
        self.busy = 0
        self.queue: deque[int] = deque()
        self.n = 0
        self.seen = 0
        self.up_since = up_since
        self.draining = False
        self.failed = False
        self.zone = 0
        self.devices: list = []


@dataclass
class EndpointLog:
    """Changes of an endpoint's state, appended as they happen (rare events only).

    ``fleet``: ``(t, instances in service, instances billed, instances holding their devices)`` (the last:
    in service or draining, whose requests in service still run);
    ``memory``: ``(t, loaded models, GPU GB used, host GB used, disk GB used)``,
    totals over the endpoint; ``capacity``: per instance ``(GPU, host, disk)`` GB;
    ``loads`` and ``unloads``: model loads and unloads ``(t, instance, model)``;
    ``peaks``: per instance the most each tier held (checked against ``capacity``).
    """

    capacity: tuple[float, float, float]
    fleet: list[tuple[float, int, int, int]] = field(default_factory=list)
    memory: list[tuple[float, int, float, float, float]] = field(default_factory=list)
    loads: list[LoadRecord] = field(default_factory=list)
    unloads: list[tuple[float, int, int]] = field(default_factory=list)
    # per instance, the most it ever held: [GPU GB, host GB, disk GB, loaded or loading models]
    peaks: dict[int, list[float]] = field(default_factory=dict)
    # autoscaling decisions: (t, "out" | "in", old capacity, new capacity, metric value)
    scaling: list[tuple[float, str, int, int, float]] = field(default_factory=list)
    # instance failures: (t, instance, zone)
    failures: list[tuple[float, int, int]] = field(default_factory=list)
    # continuous batching: changes (t, running sequences, waiting sequences, KV blocks used, KV blocks), as
    # deltas over the endpoint's devices, a row five numbers of one flat list (:meth:`llm_rows`: the rows as
    # an array); and when a sequence was preempted
    llm: list[float] = field(default_factory=list)
    preempted: list[float] = field(default_factory=list)

    def llm_rows(self) -> np.ndarray:
        """The continuous-batching log as rows (t, running, waiting, blocks used, blocks) of deltas, in the
        order they were written (not in time order: a reader sorts them stably by time). A change taken
        back has its row's deltas zeroed where it stands, so the levels (the deltas' running sums in time
        order) are what the log means, not its rows one by one."""
        return np.fromiter(self.llm, dtype=float, count=len(self.llm)).reshape(-1, 5)


class EndpointRuntime:
    """Base of the hosting runtimes: the fleet of instances and its changes.

    ``active`` lists the instances in service, in the order routing sees them.
    An instance asked for is billed at once, serves after its provisioning
    delay and whatever the mode must do before (:meth:`_prepare`); one taken
    out of service drains: it gets no new request and leaves (and stops being
    billed) when its last request ends. Subclasses implement ``_new_instance``
    and call :meth:`_maybe_release` when an instance's in-flight count drops.
    """

    routes_active = False   # whether requests are routed among ``active`` (SME): then it may be a LoadList

    def __init__(self, engine: Engine, ep: Endpoint, capacity: tuple[float, float, float], models: tuple = ()):
        self.engine = engine
        self._env = engine.env
        self.ep = ep
        self.requests = engine.requests
        self.instances: list[Instance] = []
        self.active: list[Instance] = []
        self.billed = 0
        self.draining = 0   # instances out of service whose requests still run (Instance.draining)
        self.pending = 0          # asked for, not yet up
        self.preparing: list[Instance] = []   # up, getting ready to serve (an sme instance loading its model)
        self._cancelled = 0       # pending ones a scale-in gave up before they came
        self.invocations = 0      # requests routed, for the autoscaling metrics
        self._inv_mark = 0
        # routing_refresh: the load-aware policies read a snapshot of the in-flight counts,
        # refreshed at that period (see sim.routing); unset, they read the exact counts.
        refresh = ep.spec.routing_refresh
        stale = refresh is not None and routing.reads_load(ep.routing)
        self.route = routing.get(ep.routing, stale)
        # Least outstanding requests at a fleet's scale: the candidates in a LoadList, which finds the fewest
        # in flight in O(log n) (the same choice as a scan); the runtimes that route among ``active`` opt in.
        self.load_indexed = self.routes_active and routing.load_indexed(ep.routing, stale, ep.instances.hi)
        if self.load_indexed:
            self.active = routing.LoadList()
        if stale:
            engine.env.process(self._refresh_view(refresh))
        self.rr = 0
        self.log = EndpointLog(capacity)
        self.timeout = ep.timeout
        self.provision_rng = None  # set by the simulation: the provisioning stream
        # where requests run: the execution model its models call for (sim.hosting.device)
        self.devices = DeviceSet(engine, models, ep.models, self.log)
        self.zones_down: set[int] = set()
        # Instances in service or getting ready, per zone: kept as they come and go, so that placing
        # an instance costs O(zones), not a scan of the fleet (set-up stays linear in instances).
        self._in_zone = [0] * max(ep.spec.zones, 1)
        self._retried: set[int] = set()

    def _refresh_view(self, period: float):
        """The router's view of the in-flight counts, refreshed every ``period`` from time 0."""
        timeout = self.engine.env.timeout
        while True:
            routing.refresh(self._routed())
            yield timeout(period)

    def _routed(self):
        """What routing chooses among: the instances in service (IC: its components' copies)."""
        return self.active

    def _log_fleet(self) -> None:
        n = len(self.active)
        self.log.fleet.append((self.engine.env._now, n, self.billed, n + self.draining))

    # -- the request path shared by the modes (hot: keep lean) ---------------------------
    def _pop_live(self, q: deque, now: float) -> tuple[int, int]:
        """The next queued request whose client still waits (-1 if none), and how many
        had given up meanwhile: the server drops those, finished as timeouts."""
        arrival = self.requests.arrival
        timeout = self.timeout
        dropped = 0
        while q:
            j = q.popleft()
            if now - arrival[j] < timeout:
                return j, dropped
            dropped += 1
            self.engine.finish(j, TIMEOUT, arrival[j] + timeout)
        return -1, dropped

    def _served(self, i: int, now: float) -> None:
        """Request ``i``'s service ended at ``now``: ok, or a timeout if its client gave up first."""
        r = self.requests
        a = r.arrival[i]
        if now - a <= self.timeout:
            engine = self.engine
            if engine.closed_loop:
                engine.finish(i, OK, now)
            else:   # Engine.finish inlined: once per request
                r.status[i] = OK
                r.end[i] = now
        else:
            r.served_late[i] = now   # served to the end for a client gone since arrival + timeout
            self.engine.finish(i, TIMEOUT, a + self.timeout)

    # -- the fleet --------------------------------------------------------------------
    def _new_instance(self) -> Instance:  # pragma: no cover - abstract
        raise NotImplementedError

    def _start_fleet(self, n: int) -> None:
        """The initial instances: in service from time 0, models ready."""
        for _ in range(n):
            inst = self._new_instance()
            inst.zone = self._pick_zone()
            self._in_zone[inst.zone] += 1
            self.instances.append(inst)
            self.active.append(inst)
            self.billed += 1
        self._log_fleet()

    def _pick_zone(self) -> int:
        """The availability zone with the fewest instances in service or getting ready, among those up."""
        zones = [z for z in range(self.ep.spec.zones) if z not in self.zones_down] or [0]
        count = self._in_zone
        return min(zones, key=lambda z: (count[z], z))

    @property
    def capacity(self) -> int:
        """Desired capacity: instances in service plus those on their way."""
        return len(self.active) + len(self.preparing) + self.pending - self._cancelled

    def scale_to(self, n: int) -> None:
        cur = self.capacity
        if n > cur:
            for _ in range(n - cur):
                if self._cancelled:
                    self._cancelled -= 1
                else:
                    self._provision()
        elif n < cur:
            drop = cur - n
            take_back = min(drop, self.pending - self._cancelled)
            self._cancelled += take_back
            drop -= take_back
            # Scale in the instances with the fewest requests in flight (newest on a tie).
            for inst in sorted(self.active, key=lambda x: (x.n, -x.index))[:drop]:
                self._drain(inst)
        self._log_fleet()

    def _provision(self) -> None:
        self.pending += 1
        self.billed += 1
        p = self.ep.spec.provisioning
        from ..service import sample

        delay = float(sample(self.provision_rng, p.dist, p.mean, p.cv, 1)[0]) if p.mean > 0 else 0.0
        self.engine.at(delay, self._provisioned)

    def _provisioned(self, call) -> None:
        self.pending -= 1
        if self._cancelled:
            self._cancelled -= 1
            self.billed -= 1
            self._log_fleet()
            return
        inst = self._new_instance()
        inst.zone = self._pick_zone()
        self._in_zone[inst.zone] += 1
        self.instances.append(inst)
        self.preparing.append(inst)
        self._prepare(inst)

    def _prepare(self, inst: Instance) -> None:
        """Make a new instance ready to serve, then :meth:`_activate` it (default: at once)."""
        self._activate(inst)

    def _activate(self, inst: Instance) -> None:
        if inst.failed:
            return   # it failed while getting ready
        self.preparing.remove(inst)
        self.active.append(inst)
        self._log_fleet()
        self._on_fleet_change()

    def _leave_service(self, inst: Instance) -> None:
        """Take ``inst`` out of routing (subclasses also forget what it holds)."""
        self.active.remove(inst)
        self._in_zone[inst.zone] -= 1

    def _drain(self, inst: Instance) -> None:
        self._leave_service(inst)
        inst.draining = True
        self.draining += 1
        self._on_fleet_change()
        self._maybe_release(inst)

    def _maybe_release(self, inst: Instance) -> None:
        if inst.draining and inst.n == 0:
            inst.draining = False
            self.draining -= 1
            self.billed -= 1
            self._release(inst)
            self._log_fleet()

    def _release(self, inst: Instance) -> None:
        """Free what the instance held (subclasses)."""

    def _on_fleet_change(self) -> None:
        """Called when instances enter or leave service (subclasses log memory)."""

    # -- failures -------------------------------------------------------------------------
    def fail(self, inst: Instance, was_active: bool | None = None) -> None:
        """``inst`` fails: it stops at once (and stops being billed); its requests fail,
        or are retried once on the others; the endpoint asks for a replacement."""
        if inst.failed:
            return
        from ..core.engine import INSTANCE_FAILURE, TIMEOUT

        engine = self.engine
        now = engine.env._now
        if was_active is None:
            was_active = inst in self.active
            if was_active:
                self._leave_service(inst)
        preparing = inst in self.preparing
        if preparing:
            self.preparing.remove(inst)
            self._in_zone[inst.zone] -= 1
        inst.failed = True
        if inst.draining:
            inst.draining = False
            self.draining -= 1
        for d in inst.devices:
            d.stop()
        self.billed -= 1
        self.log.failures.append((now, inst.index, inst.zone))
        victims = self._requests_on(inst)
        self._release(inst)
        self._log_fleet()
        self._on_fleet_change()
        spec = self.ep.spec.failures
        r = self.requests
        timeout = self.ep.timeout
        for i in victims:
            if now - r.arrival[i] >= timeout:
                engine.finish(i, TIMEOUT, r.arrival[i] + timeout)
            elif spec is not None and spec.in_flight == "retry" and i not in self._retried and self.active:
                self._retried.add(i)
                r.start[i] = float("nan")
                r.cold[i] = False
                r.load[i] = 0.0
                if r.first_token is not None:   # the retry generates its answer again, first token too
                    r.first_token[i] = float("nan")
                self.arrive(i)
            else:
                engine.finish(i, INSTANCE_FAILURE, now)
        if (was_active or preparing) and (spec is None or spec.replace):
            self._provision()
            self._log_fleet()

    def fail_zone(self, zone: int, duration: float | None) -> None:
        """An availability-zone outage: every instance there fails, in service or getting ready; none
        is placed there until it ends."""
        self.zones_down.add(zone)
        lost = [i for i in self.active if i.zone == zone]
        starting = [i for i in self.preparing if i.zone == zone]
        for inst in lost:   # all out of routing first: no retry may land on a dying instance
            self._leave_service(inst)
        for inst in lost:
            self.fail(inst, was_active=True)
        for inst in starting:
            self.fail(inst, was_active=False)
        if duration:
            self.engine.at(duration, lambda call: self.zones_down.discard(zone))

    def _requests_on(self, inst: Instance) -> list[int]:
        """Requests in flight on ``inst`` (serving, queued or waiting for a load): a scan of
        the request table, done only when an instance fails."""
        import numpy as np

        from ..core.engine import IN_FLIGHT

        r = self.requests
        on = np.flatnonzero((np.asarray(r.instance) == inst.index) & (np.asarray(r.status) == IN_FLIGHT))
        mine = set(self.ep.models)
        model = r.model
        return [int(i) for i in on if model[i] in mine]

    # -- autoscaling metrics --------------------------------------------------------------
    def metric(self, name: str, period: float) -> float:
        """The value of an autoscaling metric over the period just ended."""
        n = max(len(self.active), 1)
        if name == "invocations_per_instance":
            count = self.invocations - self._inv_mark
            self._inv_mark = self.invocations
            return count / n * (60.0 / period)
        if name == "concurrent_requests_per_model":
            return sum(i.n for i in self.active) / (n * self._copies_per_instance())
        if name == "cpu_utilization":
            slots = sum(i.slots for i in self.active) or 1
            return 100.0 * sum(i.busy for i in self.active) / slots
        raise ValueError(f"metric {name!r} does not apply to a {self.ep.mode} endpoint")

    def _copies_per_instance(self) -> int:
        return 1
