"""What every hosting mode shares: instances in service, routing and the logs
from which metrics are derived after the run."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .. import routing
from ..core.engine import Engine
from ..scenario.resolve import Endpoint
from .loading import LoadRecord


class Instance:
    """One instance of an endpoint. ``n`` counts its requests in flight (serving or queued)."""

    __slots__ = ("index", "slots", "busy", "queue", "n", "up_since", "down_at")

    def __init__(self, index: int, slots: int, up_since: float):
        self.index = index
        self.slots = slots
        self.busy = 0
        self.queue: deque[int] = deque()
        self.n = 0
        self.up_since = up_since
        self.down_at: float | None = None


@dataclass
class EndpointLog:
    """Changes of an endpoint's state, appended as they happen (rare events only).

    ``fleet``: ``(t, instances in service, instances billed)``;
    ``memory``: ``(t, loaded models, GPU GB used, host GB used, disk GB used)``,
    totals over the endpoint; ``capacity``: per instance ``(GPU, host, disk)`` GB;
    ``loads`` and ``unloads``: model loads and unloads ``(t, instance, model)``;
    ``peaks``: per instance the most each tier held (checked against ``capacity``).
    """

    capacity: tuple[float, float, float]
    fleet: list[tuple[float, int, int]] = field(default_factory=list)
    memory: list[tuple[float, int, float, float, float]] = field(default_factory=list)
    loads: list[LoadRecord] = field(default_factory=list)
    unloads: list[tuple[float, int, int]] = field(default_factory=list)
    # per instance, the most it ever held: [GPU GB, host GB, disk GB, loaded or loading models]
    peaks: dict[int, list[float]] = field(default_factory=dict)


class EndpointRuntime:
    """Base of the hosting runtimes. ``active`` lists the instances in service,
    in the order routing sees them."""

    def __init__(self, engine: Engine, ep: Endpoint, capacity: tuple[float, float, float]):
        self.engine = engine
        self.ep = ep
        self.requests = engine.requests
        self.instances: list[Instance] = []
        self.active: list[Instance] = []
        self.billed = 0
        self.route = routing.get(ep.routing)
        self.rr = 0
        self.log = EndpointLog(capacity)

    def _log_fleet(self) -> None:
        self.log.fleet.append((self.engine.env._now, len(self.active), self.billed))
