"""The per-copy concurrency knobs that the optimizer searches beside type, count and routing.

A knob is searched on an endpoint only where its models' execution model charges for concurrency,
so that a value changes the cost:

- ``max_concurrency`` (the endpoint's requests in service per copy) where every model it serves is
  ``batching``: a slowdown curve of its own, or a calibrated service that takes its profile's. More
  requests on a device raise its throughput ``k / slowdown(k)`` and stretch each request's time:
  a trade that the count and the SLO settle. The candidates stop at the curve's last point (beyond
  it the throughput no longer grows; only the waits move onto the device). Without a curve (the
  ``slots`` execution model) concurrency is free, an artefact the loader warns about: never searched;
- ``max_num_seqs`` (a continuous-batching language model's batch) where every model the endpoint
  serves runs continuous batching and no other endpoint serves them (the knob is the model's, so it
  would move the other endpoint's plan too). A longer batch raises a copy's throughput and its step
  time (TPOT), and beyond what the KV cache holds at the fleet's mean sequence length it preempts
  and recomputes: the candidates stop at that many sequences on the instance type (and at
  ``max_num_batched_tokens`` and an explicit ``max_concurrency``).

Candidates are the powers of two up to the cap, the cap itself and the scenario's own value
(:func:`values`); the search (:mod:`sim.plan.search`) asks the execution model's capacity
estimator (:mod:`sim.plan.capacity`) for each one's count and simulates only the promising ones
(:func:`promising`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

KINDS = ("max_concurrency", "max_num_seqs")


@dataclass(frozen=True)
class Knob:
    """The knob searched on endpoint ``endpoint`` (its index in the scenario's ``endpoints``)."""

    kind: str                      # max_concurrency | max_num_seqs
    endpoint: int
    own: int                       # the scenario's value (max_num_seqs: the largest of its models')
    groups: tuple[int, ...] = ()   # max_num_seqs: the ``models`` entries it sets
    curve_k: int = 0               # max_concurrency: the largest point of the models' slowdown curves
    explicit_concurrency: int | None = None   # max_num_seqs: the endpoint's max_concurrency, where set

    def overrides(self, value: int | None) -> list[str]:
        """``--set`` strings that give the knob ``value`` (None: the scenario's own, nothing to set)."""
        if value is None:
            return []
        if self.kind == "max_concurrency":
            return [f"endpoints[{self.endpoint}].max_concurrency={int(value)}"]
        return [f"models[{g}].service.continuous_batching.max_num_seqs={int(value)}" for g in self.groups]

    def shown(self, value: int | None) -> int:
        return self.own if value is None else int(value)


def endpoint_knob(sc: Any, e: int, execution: dict[int, str]) -> tuple[Knob | None, str | None]:
    """The knob of endpoint ``e`` of scenario ``sc`` (a resolved :class:`~sim.scenario.Scenario`), or
    None with the reason it is not searched (None where the reason needs no note: no model of the
    endpoint charges for concurrency). ``execution``: each model group's execution model
    (:func:`sim.plan.load.execution_model`)."""
    es = sc.spec.endpoints[e]
    rts = [rt for rt in sc.endpoints if rt.spec_index == e]
    groups = sorted({sc.models[m].group for rt in rts for m in rt.models})
    kinds = {execution.get(g, "slots") for g in groups}
    if not groups or kinds == {"slots"}:
        return None, None
    if kinds == {"batching"}:
        from .load import execution_model

        curve_k = max(max(k for k, _ in execution_model(sc, g)[1]) for g in groups)
        return Knob("max_concurrency", e, es.max_concurrency, curve_k=curve_k), None
    if kinds == {"continuous"}:
        others = {sc.models[m].group for rt in sc.endpoints if rt.spec_index != e for m in rt.models}
        others |= {sc.models[c.model].group for rt in sc.endpoints if rt.spec_index != e for c in rt.components}
        shared = [sc.groups[g].name for g in groups if g in others]
        if shared:
            return None, (f"endpoint {es.name}: max_num_seqs is not searched: another endpoint serves "
                          f"{', '.join(shared)} too")
        own = max(sc.groups[g].service.continuous_batching.max_num_seqs for g in groups)
        explicit = es.max_concurrency if "max_concurrency" in es.model_fields_set else None
        return Knob("max_num_seqs", e, own, tuple(groups), explicit_concurrency=explicit), None
    return None, (f"endpoint {es.name}: its models' execution models differ ({', '.join(sorted(kinds))}): no "
                  "concurrency knob is searched")


def cap(knob: Knob, loads: Iterable[Any], it: Any) -> int:
    """The largest value worth searching on instance type ``it`` (``loads``: the endpoint's
    :class:`~sim.plan.load.ModelLoad`): the curve's last point (max_concurrency); what the KV cache
    of a copy on ``it`` holds at the fleet's mean sequence length, at most max_num_batched_tokens
    and an explicit max_concurrency (max_num_seqs). 0: no copy runs on ``it``."""
    if knob.kind == "max_concurrency":
        return max(1, knob.curve_k)
    from .capacity import ContinuousSizing

    best = 0
    for lm in loads:
        est = ContinuousSizing().copy_estimator(lm, it)
        if est is None:
            continue
        c = min(est.kv_batch(), est.max_batched_tokens or est.kv_batch())
        if knob.explicit_concurrency is not None:
            c = min(c, knob.explicit_concurrency)
        best = max(best, c)
    return best


def values(own: int, top: int) -> list[int]:
    """The knob values to weigh: powers of two up to ``top``, ``top`` itself and ``own`` (the
    scenario's), ascending. ``own`` is kept apart by the search (it is the plan without the knob)."""
    out = {1 << i for i in range(top.bit_length()) if (1 << i) <= top} | {top, own} if top >= 1 else {own}
    return sorted(v for v in out if v >= 1)


def promising(estimates: dict[int | None, float], keep: int = 2) -> set[int | None]:
    """The knob values to simulate, of ``estimates`` (value -> the capacity estimate's cost per hour,
    ``inf`` where the estimate finds no count within the search's range; None: the scenario's own
    value, always kept, so that the search never does worse than without the knob): the ``keep``
    cheapest finite estimates (ties: the larger value first, the batch that wastes less of the device)."""
    ranked = sorted((v for v in estimates if v is not None and math.isfinite(estimates[v])),
                    key=lambda v: (estimates[v], -v))
    return set(ranked[:keep]) | {None}
