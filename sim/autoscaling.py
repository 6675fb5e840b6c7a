"""Autoscaling with Application Auto Scaling / CloudWatch semantics.

The policies here are pure state machines: each period the owner (an
endpoint, or an inference component's copies) hands in the period's metric
datapoint and its current capacity; the policy answers with a new desired
capacity or ``None``. A SimPy process per scaled thing drives them (see
:func:`drive`), so the hot path of requests never sees autoscaling.

Target tracking, as AWS documents it:
- the scale-out alarm fires after ``out_datapoints`` (3) consecutive
  datapoints above the target; the scale-in alarm after ``in_datapoints`` (15)
  consecutive datapoints below ``in_ratio`` (90%) of it;
- the new desired capacity is ``ceil(current * metric / target)``, clamped to
  [min, max];
- no scale-out within ``scale_out_cooldown`` of the last scale-out unless it
  asks for more than that one did; no scale-in within ``scale_in_cooldown`` of
  the last scale-in, nor within ``scale_out_cooldown`` of a scale-out; a
  scale-out during a scale-in cooldown is allowed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

# Metric names of the YAML and the aggregation period (s) CloudWatch gives them.
METRIC_PERIODS = {
    "invocations_per_instance": 60.0,        # SageMakerVariantInvocationsPerInstance
    "concurrent_requests_per_model": 10.0,   # high resolution
    "gpu_memory_utilization": 60.0,          # MMEs (percent)
    "cpu_utilization": 60.0,                 # percent of serving slots busy
    "invocations_per_copy": 60.0,            # inference components
    "concurrent_requests_per_copy": 10.0,    # inference components, high resolution
}


@dataclass
class Decision:
    t: float
    kind: str          # "out" or "in"
    old: int
    new: int
    metric: float


@dataclass
class TargetTracking:
    target: float
    lo: int
    hi: int
    scale_out_cooldown: float = 300.0
    scale_in_cooldown: float = 300.0
    out_datapoints: int = 3
    in_datapoints: int = 15
    in_ratio: float = 0.9
    _above: int = 0
    _below: int = 0
    _last_out: float = -math.inf
    _last_out_to: int = 0
    _last_in: float = -math.inf
    decisions: list[Decision] = field(default_factory=list)

    def desired_for(self, current: int, value: float) -> int:
        want = math.ceil(current * value / self.target - 1e-9) if current > 0 else (1 if value > 0 else 0)
        return max(self.lo, min(self.hi, want))

    def evaluate(self, t: float, value: float, current: int, capacity: int | None = None) -> int | None:
        """Feed one datapoint (the metric over the period ending at ``t``).

        ``current`` is the capacity the metric is measured over (instances or
        copies in service); ``capacity`` the desired capacity already asked for
        (in service plus on the way; default ``current``). The new desired
        capacity is computed from the first and compared with the second, so
        instances still starting are not asked for twice.
        """
        capacity = current if capacity is None else capacity
        self._above = self._above + 1 if value > self.target else 0
        self._below = self._below + 1 if value < self.in_ratio * self.target else 0
        if capacity < self.lo or capacity > self.hi:   # e.g. a scheduled change of min/max
            new = max(self.lo, min(self.hi, capacity))
            self.decisions.append(Decision(t, "out" if new > capacity else "in", capacity, new, value))
            return new
        if self._above >= self.out_datapoints:
            new = self.desired_for(current, value)
            in_cooldown = t - self._last_out < self.scale_out_cooldown
            if new > capacity and (not in_cooldown or new > self._last_out_to):
                self._last_out, self._last_out_to = t, new
                self.decisions.append(Decision(t, "out", capacity, new, value))
                return new
        elif self._below >= self.in_datapoints:
            new = self.desired_for(current, value)
            if (new < capacity and t - self._last_in >= self.scale_in_cooldown
                    and t - self._last_out >= self.scale_out_cooldown):
                self._last_in = t
                self.decisions.append(Decision(t, "in", capacity, new, value))
                return new
        return None


@dataclass
class Step:
    """An alarm threshold and its adjustment: when the metric is above
    ``above`` (or below ``below``), change the capacity by ``change``."""

    change: int
    above: float | None = None
    below: float | None = None


@dataclass
class StepScaling:
    steps: Sequence[Step]
    lo: int
    hi: int
    cooldown: float = 300.0
    datapoints: int = 1
    _counts: list[int] = field(default_factory=list)
    _last: float = -math.inf
    decisions: list[Decision] = field(default_factory=list)

    def evaluate(self, t: float, value: float, current: int, capacity: int | None = None) -> int | None:
        current = current if capacity is None else capacity
        if not self._counts:
            self._counts = [0] * len(self.steps)
        for k, s in enumerate(self.steps):
            hit = (s.above is not None and value > s.above) or (s.below is not None and value < s.below)
            self._counts[k] = self._counts[k] + 1 if hit else 0
        if current < self.lo or current > self.hi:
            return max(self.lo, min(self.hi, current))
        if t - self._last < self.cooldown:
            return None
        # The first step whose alarm holds wins (list the largest adjustments first).
        for k, s in enumerate(self.steps):
            if self._counts[k] >= self.datapoints:
                new = max(self.lo, min(self.hi, current + s.change))
                if new != current:
                    self._last = t
                    self.decisions.append(Decision(t, "out" if new > current else "in", current, new, value))
                    return new
                return None
        return None


@dataclass
class ScheduledAction:
    """From ``at`` seconds into each day (simulated time modulo ``period``), min and max become these."""

    at: float
    min: int | None = None
    max: int | None = None
    period: float = 86400.0


def scheduled_bounds(actions: Sequence[ScheduledAction], t: float, lo: int, hi: int) -> tuple[int, int]:
    """The min and max in force at time ``t``: the latest action of the day so far (or of the day before)."""
    if not actions:
        return lo, hi
    period = actions[0].period
    tod = t % period
    ordered = sorted(actions, key=lambda a: a.at)
    past = [a for a in ordered if a.at <= tod] or [ordered[-1]]
    a = past[-1]
    return (a.min if a.min is not None else lo), (a.max if a.max is not None else hi)


def drive(env, period: float, policy, metric: Callable[[float], float], capacity: Callable[[], int],
          set_capacity: Callable[[int], None], bounds: Callable[[float], tuple[int, int]] | None = None,
          in_service: Callable[[], int] | None = None):
    """A SimPy process: every ``period``, evaluate ``policy`` on the metric of the
    period just ended and apply its decision. ``capacity()`` is the desired
    capacity, ``in_service()`` (default: the same) what the metric is measured over."""
    while True:
        yield env.timeout(period)
        t = env.now
        if bounds is not None:
            policy.lo, policy.hi = bounds(t)
        cap = capacity()
        cur = in_service() if in_service is not None else cap
        new = policy.evaluate(t, metric(period), cur, cap)
        if new is not None and new != cap:
            set_capacity(new)


def policy_from_spec(spec, lo: int, hi: int):
    """The policy object for an ``autoscaling`` block of a scenario."""
    if spec.policy == "step":
        return StepScaling([Step(x.change, x.above, x.below) for x in spec.steps], lo, hi,
                           cooldown=spec.scale_out_cooldown, datapoints=spec.datapoints)
    return TargetTracking(spec.target, lo, hi, spec.scale_out_cooldown, spec.scale_in_cooldown,
                          spec.scale_out_datapoints, spec.scale_in_datapoints, spec.scale_in_ratio)
