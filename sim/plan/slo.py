"""One SLO type for the planner: parse, check a simulated block (point estimates, or the upper ends
of the replications' confidence intervals), describe.

Metrics: ``p50``, ``p90``, ``p99``, ``mean`` (latency) and, for language models, ``ttft`` and
``tpot``, checked against the P99 of the time to first token and of the time per output token
(summary keys ``ttft_p99_ms``, ``tpot_p99_ms``); a block without language-model requests has
nothing to meet for those.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..metrics import slo_misses, slo_verdict
from ..scenario import Scenario, ScenarioError

LATENCY_METRICS = ("p50", "p90", "p99", "mean")
TOKEN_METRICS = ("ttft", "tpot")
SLO_METRICS = LATENCY_METRICS + TOKEN_METRICS
QUANTILE = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def summary_key(metric: str) -> str:
    """The summary figure (ms) a target is checked against."""
    return f"{metric}_p99_ms" if metric in TOKEN_METRICS else f"{metric}_ms"


@dataclass(frozen=True)
class SLO:
    """Targets in ms by metric."""

    targets_ms: dict[str, float]

    @classmethod
    def of(cls, sc: Scenario) -> "SLO":
        """The scenario's ``slo`` block (no targets when it has none)."""
        s = sc.spec.slo
        return cls({} if s is None else {k: getattr(s, k) * 1e3 for k in SLO_METRICS if getattr(s, k) is not None})

    @classmethod
    def parse(cls, value: Any, scenario_slo: Any = None, source: str = "--slo") -> "SLO":
        """``--slo``'s value (see :func:`parse_slo`); None: the scenario's ``slo`` block."""
        return cls({k: v * 1e3 for k, v in parse_slo(value, scenario_slo, source).items()})

    @property
    def targets_s(self) -> dict[str, float]:
        return {k: v / 1e3 for k, v in self.targets_ms.items()}

    @property
    def latency_s(self) -> float | None:
        """The latency target the sizing aims at: P99's, else the tightest latency target."""
        lat = {k: v for k, v in self.targets_ms.items() if k in LATENCY_METRICS}
        v = lat.get("p99", min(lat.values()) if lat else None)
        return None if v is None else v / 1e3

    @property
    def slo_ms(self) -> dict[str, float]:
        """The targets as summary.json's ``slo`` holds them (``{"p99_ms": 5000.0}``)."""
        return {f"{k}_ms": t for k, t in self.targets_ms.items()}

    def verdict(self, block: dict) -> bool | None:
        """:meth:`met`, or None where there is nothing to judge: no target, or no request in the block
        (:func:`sim.metrics.slo_verdict`)."""
        return slo_verdict(block, self.slo_ms)[0]

    def met(self, block: dict) -> bool:
        """Whether a summary block meets every target (point estimates); failed requests count as misses:
        it misses nothing (:meth:`missed`)."""
        return not self.missed(block)

    def missed(self, block: dict) -> dict[str, float]:
        """What a summary block misses of :meth:`met`, as figures where lower is better (for
        :func:`moved`): each target's figure (ms) above it, the SLO attainment below 0.99 (as
        ``-attainment``) and a failed share above 1% (as ``-ok share``)."""
        out: dict[str, float] = {}
        for key, v in slo_misses(block, self.slo_ms).items():
            if key == "slo_attainment":
                out[key] = -v
            elif key == "failed":
                out[key] = -(1.0 - v)
            else:
                out[key[:-3]] = v
        return out

    def check(self, blocks: list[dict], max_failed: float) -> tuple[bool, dict[str, float], float]:
        """The confidence rule of :func:`check_blocks`."""
        return check_blocks(blocks, self.targets_s, max_failed)

    def describe(self) -> str:
        return ", ".join(f"{k} <= {fmt_target(v)}" for k, v in self.targets_ms.items())


# Growing a plan stops when, over two growth steps, no figure it misses improved by more than this
# fraction (relative): more capacity no longer moves it (compare's sizing and optimize's search).
STALL_FRACTION = 0.01


def moved(before: Mapping[str, float], after: Mapping[str, float]) -> bool:
    """Whether some figure ``before`` missed (lower is better) got better by more than STALL_FRACTION
    in ``after``, or is met there (absent)."""
    for k, b in before.items():
        a = after.get(k)
        if a is None:                  # met now
            return True
        if math.isinf(b):
            if not math.isinf(a):
                return True
            continue
        if a < b - STALL_FRACTION * abs(b):
            return True
    return False


def fmt_target(v: float) -> str:
    """A target in ms, as a duration to read."""
    return f"{v / 1e3:g}s" if v >= 1000 else f"{v:g}ms"


def given_items(slo: Any, source: str = "--slo") -> list[tuple[str, Any]]:
    """The (metric, target as written) pairs of ``--slo``'s value: ``"p99=500ms,p50=100ms"``, a list of
    those, or a mapping."""
    if isinstance(slo, Mapping):
        return list(slo.items())
    items = []
    for spec in [slo] if isinstance(slo, str) else list(slo):
        for part in str(spec).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" not in part:
                raise ScenarioError(f"expected metric=target such as p99=500ms, got {part!r}", source=source)
            k, v = part.split("=", 1)
            items.append((k.strip(), v.strip()))
    return items


def unit_hints(slo: Any) -> list[str]:
    """Warnings for ``--slo`` targets written as bare numbers far beyond seconds (``p99=2000``: did you
    mean 2000ms?), as the scenario's own ``slo`` block gets (sim.scenario.units.bare_number_warnings)."""
    from ..scenario.units import bare_number_warnings

    if slo is None or (not isinstance(slo, Mapping) and not slo):
        return []
    return [f"--slo {w}" for w in bare_number_warnings({"slo": dict(given_items(slo))})]


def parse_slo(slo: Any, scenario_slo: Any = None, source: str = "--slo") -> dict[str, float]:
    """SLO targets in seconds by metric (``p50``, ``p90``, ``p99``, ``mean``, ``ttft``, ``tpot``).

    ``slo``: ``"p99=500ms"``, ``"p99=500ms,p50=100ms"``, a list of those, or a
    mapping ``{"p99": "500ms"}``; None: the scenario's ``slo`` block.
    """
    from ..scenario.units import parse_duration

    items: list[tuple[str, Any]] = []
    if slo is None or (not isinstance(slo, Mapping) and not slo):
        if scenario_slo is not None:
            items = [(m, getattr(scenario_slo, m)) for m in SLO_METRICS if getattr(scenario_slo, m) is not None]
        if not items:
            raise ScenarioError("no SLO to meet: give --slo p99=500ms or add slo: {p99: 500ms} to the scenario",
                                source=source)
    else:
        items = given_items(slo, source)
    out: dict[str, float] = {}
    for k, v in items:
        if k not in SLO_METRICS:
            from ..scenario.errors import suggest

            raise ScenarioError(f"unknown SLO metric {k!r}{suggest(k, SLO_METRICS)}; expected one of "
                                f"{', '.join(SLO_METRICS)}", source=source)
        try:
            secs = parse_duration(v)
        except ValueError as e:
            raise ScenarioError(str(e), source=source, path=k) from None
        if secs <= 0:
            raise ScenarioError(f"the target must be > 0, got {v!r}", source=source, path=k)
        out[k] = secs
    return out


def check_blocks(blocks: list[dict], slo: Mapping[str, float], max_failed: float
                 ) -> tuple[bool, dict[str, float], float]:
    """(feasible, upper end of each SLO figure's CI in ms (worst block), failed share (worst block)) of
    summary blocks against ``slo`` (seconds by metric): every block's ``<m>_ms + <m>_ms_ci95`` within
    its target and at most ``max_failed`` of its requests failed."""
    ok = True
    upper = {m: 0.0 for m in slo}
    worst_failed = 0.0
    for b in blocks:
        n = b.get("requests") or 0
        if n <= 0:
            continue
        share = (b.get("failed") or 0.0) / n
        worst_failed = max(worst_failed, share)
        if share > max_failed + 1e-12:
            ok = False
        for m, target in slo.items():
            key = summary_key(m)
            v = b.get(key)
            if v is None:
                if m in TOKEN_METRICS:   # no language-model request in this block: nothing to meet
                    continue
                upper[m] = math.inf
                ok = False
                continue
            u = v + (b.get(f"{key}_ci95") or 0.0)
            upper[m] = max(upper[m], u)
            if u > target * 1e3 + 1e-9:
                ok = False
    return ok, upper, worst_failed
