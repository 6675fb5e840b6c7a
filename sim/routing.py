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

from bisect import bisect_left, insort
from heapq import heappop, heappush
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
    """Fewest requests in flight; ties broken at random (the tie in list order at ``int(u1 * ties)``).

    On a :class:`LoadList` (a runtime's list of tracked candidates), the same choice from its
    buckets in O(log n); on a plain list, a scan."""
    if type(candidates) is LoadList:
        return candidates.least(u1)
    # one pass: the first with the fewest, and every one tied with it (in list order)
    rest = iter(candidates)   # (no copy of the list after its first)
    best = next(rest)
    fewest = best.n
    ties = None
    for c in rest:
        k = c.n
        if k < fewest:
            best = c
            fewest = k
            ties = None
        elif k == fewest:
            if ties is None:
                ties = [best, c]
            else:
                ties.append(c)
    return best if ties is None else ties[int(u1 * len(ties))]


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


# -- least outstanding requests at a fleet's scale ----------------------------------------------------------------
# A scan of every candidate per request costs O(n): 53 us a request at 1,000 instances. A LoadList keeps its
# members bucketed by in-flight count, each bucket in list order (ranks given as members are appended), and a
# heap of the counts: the fewest and its k-th tie come in O(log n), a count's change moves one member between two
# buckets. The members tell it their changes: their class is made by :func:`tracked` (``n`` a property).
# The choice is the scan's exactly (the same list order, the same tie drawn): results stay bit-identical.
class LoadList(list):
    """A list of candidates (only ``append`` and ``remove`` change it) that knows which have the fewest
    requests in flight. Its members are instances of a :func:`tracked` class."""

    __slots__ = ("_buckets", "_keys", "_in_heap", "_members", "_next")

    def __init__(self) -> None:
        super().__init__()
        self._buckets: dict[int, list[int]] = {}   # in-flight count -> ranks of the members with it, sorted
        self._keys: list[int] = []                 # heap of counts; each count with members is in it
        self._in_heap: set[int] = set()
        self._members: dict[int, Any] = {}          # rank -> member
        self._next = 0

    def append(self, x) -> None:
        super().append(x)
        r = self._next
        self._next = r + 1
        x._rank = r
        x._lidx = self
        self._members[r] = x
        self._add(x._n, r)

    def remove(self, x) -> None:
        super().remove(x)
        x._lidx = None
        del self._members[x._rank]
        b = self._buckets[x._n]
        del b[bisect_left(b, x._rank)]

    def extend(self, xs) -> None:
        for x in xs:
            self.append(x)

    def _unsupported(self, *a, **k):
        raise TypeError("a LoadList changes by append and remove only (its order is routing's)")

    insert = pop = clear = sort = reverse = __setitem__ = __delitem__ = __iadd__ = _unsupported  # type: ignore

    def _add(self, n: int, r: int) -> None:
        b = self._buckets.get(n)
        if b is None:
            b = self._buckets[n] = []
        if n not in self._in_heap:
            heappush(self._keys, n)
            self._in_heap.add(n)
        insort(b, r)

    def _move(self, x, old: int, new: int) -> None:
        # Once or twice per request: _add inlined.
        buckets = self._buckets
        b = buckets[old]
        r = x._rank
        del b[bisect_left(b, r)]
        b = buckets.get(new)
        if b is None:
            b = buckets[new] = []
        if new not in self._in_heap:
            heappush(self._keys, new)
            self._in_heap.add(new)
        insort(b, r)

    def least(self, u1: float):
        """The member with the fewest in flight; on a tie, the ``int(u1 * ties)``-th in list order."""
        keys, buckets = self._keys, self._buckets
        while True:
            b = buckets[keys[0]]
            if b:
                break
            self._in_heap.discard(heappop(keys))
        k = len(b)
        return self._members[b[int(u1 * k)] if k > 1 else b[0]]


_TRACKED: dict[type, type] = {}


def tracked(cls: type) -> type:
    """A subclass of ``cls`` (a class with ``n``, its requests in flight) whose ``n`` tells the
    :class:`LoadList` it is in of each change; outside one, it is a plain attribute's cost."""
    t = _TRACKED.get(cls)
    if t is None:
        def __init__(self, *a, **k):
            self._n = 0
            self._lidx = None
            cls.__init__(self, *a, **k)

        def get_n(self) -> int:
            return self._n

        def set_n(self, v: int) -> None:
            lst = self._lidx
            if lst is not None and v != self._n:
                lst._move(self, self._n, v)
            self._n = v

        t = _TRACKED[cls] = type(f"Tracked{cls.__name__}", (cls,), {
            "__slots__": ("_n", "_lidx", "_rank"), "__init__": __init__, "n": property(get_n, set_n),
            "__doc__": cls.__doc__, "__module__": cls.__module__})
    return t


# Below this many candidates at most, a scan costs less than keeping the buckets (same choices either way).
INDEX_FROM = 16


def load_indexed(name: str, stale: bool, most: int | None = None) -> bool:
    """Whether a runtime keeps its candidates in a :class:`LoadList` for policy ``name``: least outstanding
    requests on the exact counts (on a stale view, the counts it reads change only at a refresh), among up to
    ``most`` candidates (None: unknown) when that is at least :data:`INDEX_FROM`."""
    return name == "least_outstanding_requests" and not stale and (most is None or most >= INDEX_FROM)
