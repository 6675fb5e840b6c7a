"""Placement of inference-component copies on instances, by the names of the YAML.

A copy reserves a vector of resources on one instance: whole accelerators
(GPUs), host memory (GB) and vCPUs. An instance offers a capacity vector of
the same three; what its copies have not reserved is its ``free`` vector.

A strategy is ``choose(candidates, need, comp, cap) -> candidate | None``:
``candidates`` are objects with ``free`` (a list ``[gpus, memory GB,
vCPUs]``), ``count`` (a dict: component -> copies it holds) and ``index``;
``need`` is the copy's vector, ``comp`` its component, ``cap`` an instance's
capacity vector. It answers the candidate where the copy goes, or ``None``
when it fits nowhere (the copy then waits for capacity).

- ``binpack`` (best fit): the instance the copy leaves fullest, GPUs first
  (the scarce, expensive resource), then the sum of the shares left of each
  resource; copies fill instances and the fleet stays small (SageMaker's
  BINPACK: "packs copies onto fewer instances").
- ``spread`` (worst fit): the instance holding the fewest copies of the same
  component, then the emptiest one (SageMaker's SPREAD: "distributes copies
  evenly across available instances for better resilience").

SageMaker does not publish its packing algorithm. :func:`pack` places a set
of copies at once, largest first (the "decreasing" of first-fit-decreasing):
``spread`` in one pass; ``binpack``, whose aim is the fewest instances, tries
a few classic vector-packing heuristics (best fit by GPUs or by total share,
the dot-product rule and first fit; copies ordered by total size or by each
resource) and keeps the smallest packing.
The runtime uses it for the initial deployment and to size the instances
that managed instance scaling adds; the tests compare it with lower bounds.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

EPS = 1e-9
Vec = Sequence[float]
Strategy = Callable[[Sequence[Any], Vec, int, Vec], Any]
PLACEMENT: dict[str, Strategy] = {}


def register(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        PLACEMENT[name] = fn
        return fn

    return deco


def fits(free: Vec, need: Vec) -> bool:
    return free[0] >= need[0] and free[1] + EPS >= need[1] and free[2] + EPS >= need[2]


def size(need: Vec, cap: Vec) -> float:
    """A copy's size: the sum of the shares of an instance it takes in each resource."""
    return sum(n / c for n, c in zip(need, cap) if c > 0)


def _left(free: Vec, need: Vec, cap: Vec) -> float:
    return sum((f - n) / c for f, n, c in zip(free, need, cap) if c > 0)


def _best(candidates, need, key):
    best, bk = None, None
    for c in candidates:
        if fits(c.free, need):
            k = key(c)
            if bk is None or k < bk:
                best, bk = c, k
    return best


@register("binpack")
def binpack(candidates, need, comp, cap):
    g = cap[0] if cap[0] > 0 else 1.0
    return _best(candidates, need, lambda c: ((c.free[0] - need[0]) / g, _left(c.free, need, cap), c.index))


@register("spread")
def spread(candidates, need, comp, cap):
    return _best(candidates, need, lambda c: (c.count.get(comp, 0), -_left(c.free, need, cap), c.index))


def _best_fit_sum(candidates, need, comp, cap):
    return _best(candidates, need, lambda c: (_left(c.free, need, cap), c.index))


def _aligned(candidates, need, comp, cap):
    """The instance whose free vector points most the way the copy's does (the dot-product heuristic)."""
    return _best(candidates, need, lambda c: (-sum(f * n / (k * k) for f, n, k in zip(c.free, need, cap) if k > 0),
                                              c.index))


def _first_fit(candidates, need, comp, cap):
    return _best(candidates, need, lambda c: c.index)


def get(name: str) -> Strategy:
    try:
        return PLACEMENT[name]
    except KeyError:
        raise KeyError(f"unknown placement strategy {name!r}; expected one of {', '.join(PLACEMENT)}") from None


class Bin:
    """An instance as :func:`pack` sees it: its free vector, copies per component, copies placed."""

    __slots__ = ("index", "free", "count", "items")

    def __init__(self, index: int, free: Vec):
        self.index = index
        self.free = list(free)
        self.count: dict[int, int] = {}
        self.items: list[int] = []

    def put(self, k: int, need: Vec, comp: int) -> None:
        for d in range(3):
            self.free[d] -= need[d]
        self.count[comp] = self.count.get(comp, 0) + 1
        self.items.append(k)


def order(needs: Sequence[Vec], comps: Sequence[int], cap: Vec, dim: int | None = None) -> list[int]:
    """Copies largest first (by total size, or by resource ``dim``; ties: component, then position)."""
    if dim is None:
        return sorted(range(len(needs)), key=lambda k: (-size(needs[k], cap), comps[k], k))
    return sorted(range(len(needs)), key=lambda k: (-needs[k][dim] / cap[dim], -size(needs[k], cap), comps[k], k))


def _pass(needs, comps, cap, idx, choose, bins, max_bins):
    out = [Bin(k, free) for k, free in enumerate(bins)]
    left = []
    for k in idx:
        need = needs[k]
        b = choose(out, need, comps[k], cap)
        if b is None and fits(cap, need) and (max_bins is None or len(out) < max_bins):
            b = Bin(len(out), cap)
            out.append(b)
        if b is None:
            left.append(k)
        else:
            b.put(k, need, comps[k])
    return out, left


def pack(needs: Sequence[Vec], cap: Vec, strategy: str = "binpack", comps: Sequence[int] | None = None,
         bins: Sequence[Vec] = (), max_bins: int | None = None) -> tuple[list[Bin], list[int]]:
    """Place copies of resource vectors ``needs`` (of components ``comps``) largest first.

    ``bins`` are the free vectors of instances already there; a copy that fits
    none of the open bins opens a new, empty one of capacity ``cap`` (up to
    ``max_bins`` bins in all). Returns the bins (``Bin.items``: the indices of
    ``needs`` each holds) and the copies left unplaced.
    """
    comps = list(comps) if comps is not None else list(range(len(needs)))
    if strategy != "binpack":
        return _pass(needs, comps, cap, order(needs, comps, cap), get(strategy), bins, max_bins)
    best = None
    dims = [None] + [d for d in range(3) if cap[d] > 0]
    for dim in dims:
        idx = order(needs, comps, cap, dim)
        for choose in (binpack, _best_fit_sum, _aligned, _first_fit):
            out, left = _pass(needs, comps, cap, idx, choose, bins, max_bins)
            key = (len(left), len(out))
            if best is None or key < best[0]:
                best = (key, out, left)
    return best[1], best[2]


def lower_bound(needs: Sequence[Vec], cap: Vec) -> int:
    """No packing uses fewer instances: the largest total demand of one resource over its capacity."""
    if not needs:
        return 0
    return max(math.ceil(sum(n[d] for n in needs) / cap[d] - EPS) for d in range(3) if cap[d] > 0)


def optimum(needs: Sequence[Vec], cap: Vec, limit: int = 10) -> int:
    """The fewest instances that hold ``needs`` (exhaustive search: small sets only)."""
    n = len(needs)
    if n == 0:
        return 0
    if n > limit:
        raise ValueError(f"optimum() searches exhaustively: at most {limit} copies")
    idx = order(needs, list(range(n)), cap)
    best = [len(pack(needs, cap, "binpack")[0])]

    def go(k: int, frees: list[list[float]]) -> None:
        if k == n:
            best[0] = len(frees)
            return
        need = needs[idx[k]]
        seen = set()
        for f in frees:
            key = tuple(round(x, 9) for x in f)
            if key in seen or not fits(f, need):
                continue
            seen.add(key)
            for d in range(3):
                f[d] -= need[d]
            go(k + 1, frees)
            for d in range(3):
                f[d] += need[d]
        if len(frees) + 1 < best[0]:
            frees.append([c - x for c, x in zip(cap, need)])
            go(k + 1, frees)
            frees.pop()

    go(0, [])
    return best[0]
