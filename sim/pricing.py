"""Prices: one place that prices an instance-hour (the planner's sizing) and a fleet's log (metrics).

Prices are the catalog's ``price_per_hour`` (SageMaker real-time inference, on demand, us-east-1,
USD; ``sim/catalog/instances.yaml`` gives each its source and date) or a scenario's own
``instance_types``. A price the catalog marks as an estimate (its ``source`` starts with
``ESTIMATE``) or as listed before AWS's June 2025 P4/P5 price cut (``PRE-CUT``) is one a user
should check: :func:`price_warning` says so where a plan uses it.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

SECONDS_PER_HOUR = 3600.0


def hourly(it: Any) -> float:
    """USD per instance-hour of an instance type."""
    return float(it.price_per_hour)


def cost(it: Any, instance_seconds: Any) -> Any:
    """USD of ``instance_seconds`` billed on ``it`` (a number or a numpy array)."""
    return instance_seconds * it.price_per_hour / SECONDS_PER_HOUR


def fleet_hourly(counts: Mapping[str, float], catalog: Any) -> float:
    """USD per hour of a fleet given as instance type name -> instances."""
    return float(sum(hourly(catalog.instance(t)) * n for t, n in counts.items()))


def is_estimate(it: Any) -> bool:
    """Whether the type's price is an estimate rather than a listed price."""
    return str(getattr(it, "source", "") or "").lstrip().upper().startswith("ESTIMATE")


def is_pre_cut(it: Any) -> bool:
    """Whether the type's price is one listed before AWS's June 2025 P4/P5 price cut."""
    return str(getattr(it, "source", "") or "").lstrip().upper().startswith("PRE-CUT")


def price_warning(types: Iterable[Any]) -> str | None:
    """A sentence naming the types whose price is an estimate or from before the June 2025 P4/P5
    price cut (None: no such type)."""
    types = list(types)
    est = sorted({it.name for it in types if is_estimate(it)})
    old = sorted({it.name for it in types if is_pre_cut(it)})
    said = []
    if est:
        said.append(f"the price of {', '.join(est)} is an estimate, not a listed SageMaker price")
    if old:
        said.append(f"the price of {', '.join(old)} is as listed before AWS's June 2025 P4/P5 price cut "
                    "(EC2 on demand up to 45% lower); the cost may be lower now")
    if not said:
        return None
    return ("; ".join(said) + " (see the source in capsim catalog); check https://aws.amazon.com/sagemaker/pricing/ "
            "before relying on the cost")
