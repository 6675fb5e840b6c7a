"""Autoscaled plans: beside a fixed plan sized for the peak, the same endpoints scaled with the traffic.

For a fleet whose traffic varies by design (a diurnal process, a trace, on/off bursts: a model whose
:attr:`~sim.plan.load.ModelLoad.trough_rate` is at most :data:`VARIES` of its peak), :func:`autoscaled`
turns a sized fixed SME or MME plan into ``<mode>-autoscaled``: each endpoint keeps its instance
type and gets

- ``max``: the fixed plan's count (sized for the busiest window, checked by simulation);
- ``min``: the count the capacity estimate of its models' execution model gives at the quietest
  window's rate (:mod:`sim.plan.capacity`, as the builders size the peak);
- target tracking on ``invocations_per_instance``: the requests per minute one instance carries at
  the peak in the fixed plan (the endpoint's peak rate over its count), times
  :data:`TARGET_SHARE`, headroom for the three-datapoint alarm and the provisioning delay.

It starts at ``max`` and scales in during the warmup. The plan is then simulated as the fixed one
is (:mod:`sim.plan.sizing`): its cost is the metrics' price of the simulated fleet log over the
horizon, and where it misses the SLO its builder's ``grow`` raises ``min`` and lowers the target
(:func:`sim.plan.builders.grow_endpoints`). Inference-component plans are not autoscaled here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import replace
from typing import Sequence

from ..catalog import InstanceType
from ..scenario.fit import sme_copies
from ..scenario.schema import CacheSpec
from .builders import Plan, estimate, mme_count
from .load import ModelLoad

VARIES = 0.67                # a trough at most this share of the peak: the traffic varies
TARGET_SHARE = 0.8           # the target: this share of an instance's rate at the peak
MIN_HORIZON = 1800.0         # seconds measured at least: shorter runs leave autoscaling no time to act
MODES = ("sme", "mme")       # fixed plans that get an autoscaled twin
METRIC = "invocations_per_instance"


def varies(loads: Sequence[ModelLoad]) -> bool:
    """Whether some model's traffic varies by design enough for autoscaling to save."""
    return any(lm.trough_rate is not None and lm.peak_rate > 0 and lm.trough_rate <= VARIES * lm.peak_rate
               for lm in loads)


def at_trough(lm: ModelLoad) -> ModelLoad:
    """The load as the quietest window sees it (what the estimators size: ``peak_rate``)."""
    return replace(lm, peak_rate=lm.trough_rate if lm.trough_rate is not None else lm.peak_rate)


def served(ep: dict, loads: Sequence[ModelLoad]) -> list[ModelLoad]:
    """The models an endpoint's patterns match."""
    pats = ep.get("models", [])
    return [lm for lm in loads if any(fnmatch.fnmatchcase(lm.name, p) for p in pats)]


def trough_count(ep: dict, mine: Sequence[ModelLoad], it: InstanceType, slo_s: float | None) -> int:
    """Instances of the endpoint's type that serve its models at their quietest window's rate."""
    low = [at_trough(lm) for lm in mine]
    if ep["mode"] == "mme":
        return mme_count(low, it, CacheSpec(), slo_s, int(ep.get("max_concurrency", 1)))
    lm = low[0]
    return estimate(lm, (sme_copies(lm, it) or 1) * lm.concurrency, slo_s, it)


def autoscaled(fixed: Plan, loads: Sequence[ModelLoad], catalog, slo_s: float | None) -> Plan | None:
    """The autoscaled twin of a sized fixed SME or MME plan (None: not one of those, or nothing moves)."""
    if fixed.mode not in MODES or not fixed.endpoints or fixed.result is None:
        return None
    plan = Plan(f"{fixed.mode}-autoscaled", fixed.mode)
    blocks = {}
    for ep in fixed.endpoints:
        ep = dict(ep)
        n = int(ep["instances"])
        mine = served(ep, loads)
        peak = sum(lm.peak_rate for lm in mine)
        if mine and peak > 0 and n > 1:
            it = catalog.instance(ep["instance_type"])
            lo = max(1, min(n, trough_count(ep, mine, it, slo_s)))
            target = round(60.0 * TARGET_SHARE * peak / n, 1)
            ep["instances"] = {"initial": n, "min": lo, "max": n}
            ep["autoscaling"] = {"metric": METRIC, "target": target}
            blocks[ep["name"]] = {"min": lo, "max": n, "metric": METRIC, "target": target}
        plan.endpoints.append(ep)
    if not any(b["min"] < b["max"] for b in blocks.values()):
        return None
    plan.description = (f"the {fixed.mode} plan's endpoints with target tracking on {METRIC}: at most the fixed "
                        "plan's count (the peak), at least the estimate at the quietest window's rate")
    plan.state.update(loads=fixed.state.get("loads", {}), autoscaling=blocks, fixed_plan=fixed.name)
    return plan


def autoscaled_plans(fixed: Sequence[Plan], loads: Sequence[ModelLoad], catalog, slo_s: float | None,
                     measured_s: float) -> list[Plan]:
    """Autoscaled twins of the fixed plans, where the traffic varies and the horizon lets scaling act."""
    if measured_s < MIN_HORIZON or not varies(loads):
        return []
    out = []
    for p in fixed:
        a = autoscaled(p, loads, catalog, slo_s)
        if a is not None:
            out.append(a)
    return out
