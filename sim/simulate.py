"""One simulated run of a resolved scenario: workload in, raw columns out."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import autoscaling
from .core.engine import OK, Engine, Requests
from .core.rng import Streams
from .hosting.base import EndpointLog, EndpointRuntime
from .hosting.ic import ICEndpoint
from .hosting.mme import MMEEndpoint
from .hosting.sme import SMEEndpoint
from .scenario.resolve import Scenario
from .service import service_times
from .workload.build import ClosedSource, Workload, build_workload

# Hosting runtimes by the ``mode`` names of the YAML.
HOSTING: dict[str, type[EndpointRuntime]] = {"sme": SMEEndpoint, "mme": MMEEndpoint, "ic": ICEndpoint}


@dataclass
class RawRun:
    """What one replication produced, before any statistics."""

    scenario: Scenario
    seed: int
    replication: int
    columns: dict[str, np.ndarray]
    endpoint_of_model: np.ndarray
    logs: list[EndpointLog]
    wall_seconds: float
    device_gpus: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))   # GPUs per device


# A closed-loop user whose request is refused at once (throttled, no capacity) waits at least this
# long before its next one, as a client backs off: with no think time it would otherwise send again
# at the same instant, forever, and the simulated clock would never move.
REFUSED_BACKOFF_S = 0.1


def _start_closed_loop(engine: Engine, source: ClosedSource, rng: np.random.Generator, horizon: float) -> None:
    """Each user sends a request, waits for its answer, thinks, and sends the next (none at or after
    ``horizon``)."""
    r = engine.requests

    def send(at: float) -> None:
        m, svc, tin, tout = source.draw()
        u = rng.random(2)
        i = r.append(at, m, svc, tin, tout, float(u[0]), float(u[1]))
        engine.on_finish[i] = answered
        engine.inject(i)

    def answered(i: int) -> None:
        at = max(r.end[i], engine.env._now) + source.think_time
        if r.status[i] != OK and r.end[i] <= r.arrival[i]:
            at = max(at, r.end[i] + REFUSED_BACKOFF_S)
        if at < horizon:
            send(at)

    engine.closed_loop = True
    for _ in range(source.users):
        send(0.0)


def _prewarm(engine: Engine, scenario: Scenario, rt: EndpointRuntime, streams: Streams):
    """Invoke every model of the endpoint at each interval (keeps them loaded, as Forethought did)."""
    rng = streams.get("prewarm", rt.ep.name)
    r = engine.requests
    interval = rt.ep.spec.prewarm
    while True:
        for m in rt.ep.models:
            spec = scenario.models[m].service
            tin = tout = np.zeros(1, dtype=np.int64)
            svc = float(service_times(rng, spec, tin, tout, 1)[0])
            u = rng.random(2)
            # (a language model's ping: one prompt token and one output token, what its engine serves and records)
            tok = 1 if scenario.models[m].llm is not None else 0
            i = r.append(engine.env.now, m, svc, tok, tok, float(u[0]), float(u[1]))
            engine.inject(i)
        yield engine.env.timeout(interval)


def _autoscale(engine: Engine, rt: EndpointRuntime):
    """The endpoint's instance autoscaling: its policy, evaluated each period."""
    spec = rt.ep.spec.autoscaling
    lo, hi = rt.ep.instances.lo, rt.ep.instances.hi
    policy = autoscaling.policy_from_spec(spec, lo, hi)
    period = spec.period or autoscaling.METRIC_PERIODS[spec.metric]
    bounds = None
    if spec.schedule:
        actions = [autoscaling.ScheduledAction(a.at_seconds, a.min, a.max) for a in spec.schedule]
        bounds = lambda t: autoscaling.scheduled_bounds(actions, t, lo, hi)  # noqa: E731

    def set_capacity(n: int) -> None:
        d = policy.decisions[-1] if policy.decisions else None
        if d is not None and d.t == engine.env.now:
            rt.log.scaling.append((d.t, d.kind, d.old, d.new, d.metric))
        rt.scale_to(n)

    return autoscaling.drive(engine.env, period, policy, lambda p: rt.metric(spec.metric, p),
                             lambda: rt.capacity, set_capacity, bounds, lambda: len(rt.active))


def _inject_failures(engine: Engine, rt: EndpointRuntime, rng: np.random.Generator) -> None:
    """Scheduled failures (an instance, or a zone's outage) and random ones (MTBF per instance)."""
    spec = rt.ep.spec.failures
    for ev in spec.events:
        if ev.zone is not None:
            engine.at(ev.at, lambda call, ev=ev: rt.fail_zone(ev.zone, ev.duration))
        else:
            def fail_one(call, k=ev.instance):
                if k < len(rt.active):
                    rt.fail(rt.active[k])
            engine.at(ev.at, fail_one)
    if spec.mtbf:
        def random_failures():
            # Each instance in service fails at rate 1/MTBF: the fleet at len(active)/MTBF.
            while True:
                n = len(rt.active)
                yield engine.env.timeout(rng.exponential(spec.mtbf / max(n, 1)))
                if rt.active:
                    rt.fail(rt.active[int(rng.random() * len(rt.active))])
        engine.env.process(random_failures())


def simulate(scenario: Scenario, *, seed: int | None = None, replication: int = 0,
             workload: Workload | None = None, progress: Callable[[float], None] | None = None) -> RawRun:
    """Simulate ``scenario`` once, up to its horizon (warmup + duration); ``progress(fraction)`` is called
    every 1% of the simulated horizon (the results are the same with it or without)."""
    seed = scenario.spec.seed if seed is None else seed
    streams = Streams(seed, replication)
    t0 = time.perf_counter()
    wl = workload if workload is not None else build_workload(scenario, streams)
    route_u = streams.get("routing").random((len(wl), 2))
    engine = Engine(Requests(wl.arrival, wl.model, wl.service, wl.input_tokens, wl.output_tokens, route_u))
    runtimes = [HOSTING[ep.mode](engine, ep, scenario.models) for ep in scenario.endpoints]
    arrive = [None] * len(scenario.models)
    for rt in runtimes:
        for m in rt.ep.models:
            arrive[m] = rt.arrive
    engine.arrive_of_model = arrive
    closed_rng = streams.get("routing", "closed")
    for source in wl.closed:
        _start_closed_loop(engine, source, closed_rng, scenario.horizon)
    for rt in runtimes:
        rt.provision_rng = streams.get("provisioning", rt.ep.name)
        if rt.ep.spec.prewarm:
            engine.env.process(_prewarm(engine, scenario, rt, streams))
        if rt.ep.spec.autoscaling is not None and rt.ep.mode in ("sme", "mme"):
            engine.env.process(_autoscale(engine, rt))
        if rt.ep.mode == "ic":
            rt.start()   # copy autoscaling, scale from zero, managed instance scaling
        if rt.ep.spec.failures is not None:
            _inject_failures(engine, rt, streams.get("failures", rt.ep.name))
    engine.run(scenario.horizon, progress)
    wall = time.perf_counter() - t0
    return RawRun(scenario, seed, replication, engine.requests.to_arrays(),
                  np.asarray(scenario.model_endpoint(), dtype=np.int32), [rt.log for rt in runtimes], wall,
                  np.asarray(engine.device_gpus, dtype=np.int32))
