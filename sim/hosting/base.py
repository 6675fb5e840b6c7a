"""What every hosting mode shares: instances in service, routing and the fleet log."""
from __future__ import annotations

from collections import deque

from .. import routing
from ..core.engine import Engine
from ..scenario.resolve import Endpoint


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


class EndpointRuntime:
    """Base of the hosting runtimes. Keeps ``active`` (instances in service, in
    the order routing sees them) and ``fleet_log``: ``(t, in_service, billed)``
    after every change, from which metrics derive instance counts and cost."""

    def __init__(self, engine: Engine, ep: Endpoint):
        self.engine = engine
        self.ep = ep
        self.requests = engine.requests
        self.instances: list[Instance] = []
        self.active: list[Instance] = []
        self.billed = 0
        self.route = routing.get(ep.routing)
        self.rr = 0
        self.fleet_log: list[tuple[float, int, int]] = []

    def _log_fleet(self) -> None:
        self.fleet_log.append((self.engine.env.now, len(self.active), self.billed))
