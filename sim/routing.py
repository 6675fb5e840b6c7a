"""Routing policies across an endpoint's instances, by the names used in YAML.

A policy is ``choose(candidates, u1, u2, state) -> instance``: ``candidates``
is a non-empty list of instances with an ``n`` attribute (requests in flight),
``u1`` and ``u2`` are the request's pre-drawn uniforms in [0, 1) (routing's own
random stream), ``state`` is the endpoint (round robin keeps its counter there).

A stale view (``routing_refresh`` on an endpoint): the load-aware policies then
read ``seen``, each candidate's in-flight count as of the last refresh, instead
of ``n``. The runtime copies ``n`` into ``seen`` every period (:func:`refresh`);
in between, the router does not see the requests it sends itself, as a fleet of
many router hosts reading a shared load table, each sending a small share of
the traffic: every request until the next refresh goes where the counts
*looked* lowest (the herd effect of old load information; Mitzenmacher, "How
useful is old information?", IEEE TPDS 11(1), 2000). ``random`` and
``round_robin`` read no counts and are the same either way.
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


# The load-aware policies on a stale view: the same choices, reading ``seen`` for ``n``.
STALE: dict[str, Router] = {}


def _stale(name: str) -> Callable[[Router], Router]:
    def deco(fn: Router) -> Router:
        STALE[name] = fn
        return fn

    return deco


@_stale("least_outstanding_requests")
def least_outstanding_seen(candidates, u1, u2, state):
    """Fewest requests in flight as last seen; ties broken at random."""
    best = min(c.seen for c in candidates)
    ties = [c for c in candidates if c.seen == best]
    return ties[int(u1 * len(ties))] if len(ties) > 1 else ties[0]


@_stale("power_of_two")
def power_of_two_seen(candidates, u1, u2, state):
    """Two distinct instances at random; the one with fewer in flight as last seen (the first on a tie)."""
    k = len(candidates)
    if k == 1:
        return candidates[0]
    a = int(u1 * k)
    b = int(u2 * (k - 1))
    if b >= a:
        b += 1
    ca, cb = candidates[a], candidates[b]
    return cb if cb.seen < ca.seen else ca


def reads_load(name: str) -> bool:
    """Whether policy ``name`` reads in-flight counts (so that a stale view changes it)."""
    return name in STALE


def refresh(candidates) -> None:
    """The router's view catches up: each candidate's ``seen`` becomes its ``n``."""
    for c in candidates:
        c.seen = c.n


def get(name: str, stale: bool = False) -> Router:
    """Policy ``name``; with ``stale``, its variant on the last refreshed view of the counts."""
    try:
        return STALE.get(name, ROUTERS[name]) if stale else ROUTERS[name]
    except KeyError:
        raise KeyError(f"unknown routing policy {name!r}; expected one of {', '.join(ROUTERS)}") from None
