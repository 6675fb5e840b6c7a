"""One simulated run of a resolved scenario: workload in, raw columns out."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .core.engine import Engine, Requests
from .core.rng import Streams
from .hosting.base import EndpointRuntime
from .hosting.sme import SMEEndpoint
from .scenario.resolve import Scenario
from .workload.build import ClosedSource, Workload, build_workload

# Hosting runtimes by the ``mode`` names of the YAML.
HOSTING: dict[str, type[EndpointRuntime]] = {"sme": SMEEndpoint}


@dataclass
class RawRun:
    """What one replication produced, before any statistics."""

    scenario: Scenario
    seed: int
    replication: int
    columns: dict[str, np.ndarray]
    endpoint_of_model: np.ndarray
    fleet_logs: list[list[tuple[float, int, int]]]
    wall_seconds: float


def _start_closed_loop(engine: Engine, source: ClosedSource, rng: np.random.Generator) -> None:
    """Each user sends a request, waits for its answer, thinks, and sends the next."""
    r = engine.requests

    def send(at: float) -> None:
        m, svc, tin, tout = source.draw()
        u = rng.random(2)
        i = r.append(at, m, svc, tin, tout, float(u[0]), float(u[1]))
        engine.on_finish[i] = answered
        engine.inject(i)

    def answered(i: int) -> None:
        send(max(r.end[i], engine.env._now) + source.think_time)

    engine.closed_loop = True
    for _ in range(source.users):
        send(0.0)


def simulate(scenario: Scenario, *, seed: int | None = None, replication: int = 0,
             workload: Workload | None = None) -> RawRun:
    """Simulate ``scenario`` once, up to its horizon (warmup + duration)."""
    seed = scenario.spec.seed if seed is None else seed
    streams = Streams(seed, replication)
    t0 = time.perf_counter()
    wl = workload if workload is not None else build_workload(scenario, streams)
    route_u = streams.get("routing").random((len(wl), 2))
    engine = Engine(Requests(wl.arrival, wl.model, wl.service, wl.input_tokens, wl.output_tokens, route_u))
    runtimes = [HOSTING[ep.mode](engine, ep) for ep in scenario.endpoints]
    arrive = [None] * len(scenario.models)
    for rt in runtimes:
        for m in rt.ep.models:
            arrive[m] = rt.arrive
    engine.arrive_of_model = arrive
    closed_rng = streams.get("routing", "closed")
    for source in wl.closed:
        _start_closed_loop(engine, source, closed_rng)
    engine.run(scenario.horizon)
    wall = time.perf_counter() - t0
    return RawRun(scenario, seed, replication, engine.requests.to_arrays(),
                  np.asarray(scenario.model_endpoint(), dtype=np.int32), [rt.fleet_log for rt in runtimes], wall)
