"""Routing policies across an endpoint's instances, by the names used in YAML.

A policy is ``choose(candidates, u1, u2, state) -> instance``: ``candidates``
is a non-empty list of instances with an ``n`` attribute (requests in flight),
``u1`` and ``u2`` are the request's pre-drawn uniforms in [0, 1) (routing's own
random stream), ``state`` is the endpoint (round robin keeps its counter there).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

Router = Callable[[Sequence[Any], float, float, Any], Any]
ROUTERS: dict[str, Router] = {}


def register(name: str) -> Callable[[Router], Router]:
    def deco(fn: Router) -> Router:
        ROUTERS[name] = fn
        return fn

    return deco


@register("random")
def random_choice(candidates, u1, u2, state):
    """Uniformly at random (SageMaker's default)."""
    return candidates[int(u1 * len(candidates))]


@register("round_robin")
def round_robin(candidates, u1, u2, state):
    k = state.rr
    state.rr = k + 1
    return candidates[k % len(candidates)]


@register("least_outstanding_requests")
def least_outstanding(candidates, u1, u2, state):
    """Fewest requests in flight; ties broken at random."""
    best = min(c.n for c in candidates)
    ties = [c for c in candidates if c.n == best]
    return ties[int(u1 * len(ties))] if len(ties) > 1 else ties[0]


@register("power_of_two")
def power_of_two(candidates, u1, u2, state):
    """Two distinct instances at random; the one with fewer in flight (the first on a tie)."""
    k = len(candidates)
    if k == 1:
        return candidates[0]
    a = int(u1 * k)
    b = int(u2 * (k - 1))
    if b >= a:
        b += 1
    ca, cb = candidates[a], candidates[b]
    return cb if cb.n < ca.n else ca


def get(name: str) -> Router:
    try:
        return ROUTERS[name]
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; expected one of {', '.join(ROUTERS)}") from None
