"""The cheapest fixed fleet that meets the SLO with confidence.

A plan gives each optimised endpoint an instance type, an instance count and
a routing policy. A plan is feasible for an endpoint when, over N replications,
the upper end of each SLO figure's 95% confidence interval (``p99_ms +
p99_ms_ci95``) is within the target and no more than ``max_failed`` of its
requests failed. The search, per endpoint:

1. **Prune without simulating.** A type whose memory the model does not fit
   (the scenario loader raises ScenarioError) is skipped. From the scenario's
   own pre-generated workload (the exact arrivals and service times of
   replication 0) come the offered load ``sum(service) / horizon`` and, with
   ``copies x max_concurrency`` requests served at once per instance,
   utilisation < 1 gives a lower bound on the count (for a multi-model
   endpoint: per model, and over the models one instance holds at once). A
   type whose service times alone exceed the SLO (their own P99 above the
   P99 target) can meet it with no count. Candidates (type, routing) are
   taken cheapest lower bound first, and one whose lower bound costs as much
   as the best plan found so far is not simulated at all; the others are
   searched only below the best cost.
2. **Start from an Erlang-C estimate** of the waiting time (M/M/c, its wait
   scaled by (1 + cv^2) / 2 for the service times' spread; pooled over the
   fleet for least-outstanding, round-robin and power-of-two routing, per
   instance for random routing): the smallest count whose estimated P99
   (wait beyond the service time's own P99) meets the target.
3. **Gallop, then bisect** on the count from that guess: P99 does not grow
   with the instance count for a fixed type, so the feasible counts are an
   interval ``[n*, max]`` and n* takes a few simulations. Growing stops at
   ``max_instances``, and sooner when more instances no longer move what the
   plan misses: when, over two growth steps, no missed figure (an SLO
   figure's CI upper end, or the share of requests that did not fail)
   improved by more than ``STALL_FRACTION``, the SLO is missed for a reason
   capacity does not cure (service or load times, timeouts, failures) and
   the type is reported infeasible with both figures.

Several endpoints are optimised one at a time (coordinate descent), each
against its own SLO figures. That decomposition is exact here: endpoints
share no capacity and every random stream is keyed by name (common random
numbers), so one endpoint's plan does not change another's latencies, the
total cost is the sum of the endpoints' costs, and if every endpoint meets
``P99 <= target`` so does the whole fleet (at most 1% of each endpoint's
requests, hence of all requests, are slower). A final simulation of the
combined plan checks it; should endpoints interact (a closed-loop user
population spanning several endpoints), the pass repeats with the others
fixed at their new plans. A joint search over the product of the endpoints'
spaces would cost the product of their simulations for the same answer.

Autoscaling is not part of the search: plans are fixed fleets, and an
optimised endpoint's autoscaling policy is dropped (with a note).
Inference-component endpoints are left as they are.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import pandas as pd
import yaml

from ..api import atomic_write, atomic_write_frame, json_default
from ..scenario import ScenarioError, apply_overrides, parse_scenario, read_yaml
from ..scenario.schema import ROUTING_POLICIES
from .compare import erlang_c

SLO_METRICS = ("p50", "p90", "p99", "mean")
_QUANTILE = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
DEFAULT_REPLICATIONS = 5
# Growing a fleet stops when, over two growth steps, no figure the plan misses improved by more than
# this fraction (relative): more instances no longer move it.
STALL_FRACTION = 0.01


# -- inputs --------------------------------------------------------------------------------------------
def parse_slo(slo: Any, scenario_slo: Any = None, source: str = "--slo") -> dict[str, float]:
    """SLO targets in seconds by metric (``p50``, ``p90``, ``p99``, ``mean``).

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
    elif isinstance(slo, Mapping):
        items = list(slo.items())
    else:
        specs = [slo] if isinstance(slo, str) else list(slo)
        for spec in specs:
            for part in str(spec).split(","):
                part = part.strip()
                if not part:
                    continue
                if "=" not in part:
                    raise ScenarioError(f"expected metric=target such as p99=500ms, got {part!r}", source=source)
                k, v = part.split("=", 1)
                items.append((k.strip(), v.strip()))
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


# -- analytic bounds -----------------------------------------------------------------------------------
def wait_tail(c: int, lam: float, mean_s: float, t: float, cv: float = 1.0) -> float:
    """P(wait > t) in M/M/c with arrival rate ``lam`` and mean service ``mean_s``; for service times
    of coefficient of variation ``cv``, the wait scaled by (1 + cv^2) / 2 (Allen-Cunneen, M/G/c)."""
    a = lam * mean_s
    if a >= c:
        return 1.0
    scale = (1.0 + cv * cv) / 2.0
    return erlang_c(c, a) * math.exp(-(c / mean_s - lam) * max(t, 0.0) / max(scale, 1e-9))


def mean_wait(c: int, lam: float, mean_s: float, cv: float = 1.0) -> float:
    a = lam * mean_s
    if a >= c:
        return math.inf
    return erlang_c(c, a) / (c / mean_s - lam) * (1.0 + cv * cv) / 2.0


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
            v = b.get(f"{m}_ms")
            if v is None:
                upper[m] = math.inf
                ok = False
                continue
            u = v + (b.get(f"{m}_ms_ci95") or 0.0)
            upper[m] = max(upper[m], u)
            if u > target * 1e3 + 1e-9:
                ok = False
    return ok, upper, worst_failed


# -- the result ----------------------------------------------------------------------------------------
@dataclass
class OptimizeResult:
    """The cheapest feasible plan found, and everything simulated on the way."""

    scenario: str
    slo: dict[str, float]                 # target in ms by metric
    max_failed: float
    replications: int
    best_plan: dict[str, dict]            # endpoint -> {instance_type, instances, routing}
    best_overrides: list[str]             # key.path=value, as --set reads them
    best_summary: dict | None             # summary of the best plan's simulation (overall, endpoints)
    best_yaml: str                        # the scenario with the best plan applied
    feasible: bool                        # every optimised endpoint meets the SLO with confidence
    cost_per_hour_usd: float              # the optimised endpoints' fleet, per hour
    frontier: pd.DataFrame                # Pareto frontier of cost per hour against P99 (all simulated plans)
    plans: pd.DataFrame                   # every simulated plan
    n_simulations: int                    # plans simulated (each with `replications` runs)
    candidates: list[dict] = field(default_factory=list)   # per endpoint, type and routing: bounds, outcome
    notes: list[str] = field(default_factory=list)
    mode: str | None = None               # with ``modes``: the hosting mode of the best plan
    modes: dict[str, dict] = field(default_factory=dict)   # with ``modes``: each mode's outcome

    def to_dict(self) -> dict[str, Any]:
        best = None
        if self.best_summary is not None:
            best = {"overall": self.best_summary.get("overall"), "endpoints": self.best_summary.get("endpoints")}
        return {
            "scenario": self.scenario, "slo_ms": self.slo, "max_failed": self.max_failed,
            "replications": self.replications, "feasible": self.feasible,
            "best_plan": self.best_plan, "best_overrides": self.best_overrides,
            "cost_per_hour_usd": self.cost_per_hour_usd, "n_simulations": self.n_simulations,
            "n_runs": self.n_simulations * self.replications, "best_summary": best,
            "candidates": self.candidates, "notes": self.notes,
            **({"mode": self.mode, "modes": self.modes} if self.modes else {}),
        }

    def save(self, out: str | Path) -> Path:
        """Write optimize.json, best.yaml, plans.csv, frontier.csv and frontier.png to ``out``."""
        from ..output import publish

        def write(d: Path) -> None:
            atomic_write(d / "optimize.json", json.dumps(self.to_dict(), indent=2, default=json_default) + "\n")
            atomic_write(d / "best.yaml", self.best_yaml)
            atomic_write_frame(self.plans, d / "plans.csv")
            atomic_write_frame(self.frontier, d / "frontier.csv")
            plot_frontier(self, d / "frontier.png")

        return publish(Path(out), write, "optimize")


def plot_frontier(res: OptimizeResult, path: Path) -> None:
    """Cost per hour against P99 of every simulated plan; the Pareto frontier, the SLO and the best plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = next(iter(res.slo))
    col = f"{metric}_ms"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    df = res.plans.dropna(subset=[col]) if len(res.plans) else res.plans
    if len(df):
        ok = df["feasible"].astype(bool)
        err = df.get(f"{col}_ci95", pd.Series(0.0, index=df.index)).fillna(0.0)
        ax.errorbar(df.loc[~ok, "cost_per_hour_usd"], df.loc[~ok, col], yerr=err[~ok], fmt="o", color="0.6",
                    label="simulated, misses the SLO", capsize=2)
        ax.errorbar(df.loc[ok, "cost_per_hour_usd"], df.loc[ok, col], yerr=err[ok], fmt="o", color="tab:green",
                    label="simulated, meets the SLO", capsize=2)
    if len(res.frontier):
        ax.step(res.frontier["cost_per_hour_usd"], res.frontier[col], where="post", color="tab:blue",
                label="Pareto frontier")
    ax.axhline(res.slo[metric], color="tab:red", ls="--", label=f"SLO {metric} {res.slo[metric]:g} ms")
    if res.feasible and res.best_summary is not None:
        v = (res.best_summary.get("overall") or {}).get(col)
        if v is not None:
            ax.plot([res.cost_per_hour_usd], [v], marker="*", ms=16, color="gold", mec="k", ls="",
                    label="best plan")
    if len(df) and (df[col] > 0).all() and df[col].max() / max(df[col].min(), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("fleet cost (USD per hour)")
    ax.set_ylabel(f"{metric} latency (ms), 95% CI")
    ax.set_title(f"{res.scenario}: {res.n_simulations} plans simulated x {res.replications} replications")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto(df: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """The rows no other row beats on both ``cost`` and ``value`` (lower is better), by cost."""
    d = df.dropna(subset=[value]).sort_values([cost, value], kind="stable")
    keep, best = [], math.inf
    for idx, v in zip(d.index, d[value]):
        if v < best:
            keep.append(idx)
            best = v
    return d.loc[keep].reset_index(drop=True)


# -- the search ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    instance_type: str
    instances: int
    routing: str


class _Optimizer:
    def __init__(self, path: Path, data: dict, base_overrides: list[str], slo: dict[str, float],
                 max_failed: float, replications: int, types: list[str] | None, routings: list[str] | None,
                 min_instances: int, max_instances: int, endpoints: list[str] | None,
                 log: Callable[[str], None]):
        self.path, self.data, self.base_overrides = path, data, base_overrides
        self.source = str(path)
        self.base_dir = path.resolve().parent
        self.slo, self.max_failed, self.reps = slo, max_failed, replications
        self.min_n, self.max_n = min_instances, max_instances
        self.log = log
        self.notes: list[str] = []
        self.cache: dict[tuple, dict] = {}
        self.rows: list[dict] = []
        self.candidates: list[dict] = []
        self.n_sim = 0
        self._workloads: dict[tuple, Any] = {}
        self.stalled: dict[tuple, str] = {}     # (endpoint, type, routing) -> why growing stopped early

        base = self._load([])
        self.base = base
        specs = base.spec.endpoints
        names = [es.name for es in specs]
        if endpoints:
            for n in endpoints:
                if n not in names:
                    from ..scenario.errors import suggest

                    raise ScenarioError(f"no endpoint named {n!r}{suggest(n, names)}; expected one of "
                                        f"{', '.join(names)}", source="--endpoint")
        self.targets: list[int] = []
        for e, es in enumerate(specs):
            if endpoints and es.name not in endpoints:
                continue
            if es.mode == "ic":
                self.notes.append(f"endpoint {es.name}: inference components are not optimised (kept as is)")
                continue
            self.targets.append(e)
        if not self.targets:
            raise ScenarioError("no endpoint to optimise (only sme and mme endpoints are sized)", source=self.source)
        for e in self.targets:
            if specs[e].autoscaling is not None:
                self.notes.append(f"endpoint {specs[e].name}: plans are fixed fleets; its autoscaling policy is "
                                  "dropped in every plan")
        self.types = {e: list(types) if types else [specs[e].instance_type] for e in self.targets}
        self.routings = {e: list(routings) if routings else [specs[e].routing] for e in self.targets}
        self.rt_names = {e: [rt.name for rt in base.endpoints if rt.spec_index == e] for e in self.targets}
        if types:
            for t in types:
                try:
                    base.catalog.instance(t)
                except KeyError as err:
                    raise ScenarioError(str(err.args[0]) if err.args else f"unknown instance type {t!r}",
                                        source="--instance-types") from None
        if routings:
            for r in routings:
                if r not in ROUTING_POLICIES:
                    from ..scenario.errors import suggest

                    raise ScenarioError(f"unknown routing policy {r!r}{suggest(r, ROUTING_POLICIES)}; expected one "
                                        f"of {', '.join(ROUTING_POLICIES)}", source="--routing")
        self.state = {e: Choice(specs[e].instance_type, max(specs[e].instances.start, 1), specs[e].routing)
                      for e in self.targets}

    # -- plans ------------------------------------------------------------------
    def _load(self, overrides: list[str]):
        from ..scenario.loader import _check_trace_files

        data = apply_overrides(self.data, overrides, source=f"{self.source} (plan)")
        sc = parse_scenario(data, source=self.source, base_dir=self.base_dir)
        _check_trace_files(sc)
        return sc

    def overrides(self, state: Mapping[int, Choice]) -> list[str]:
        out = []
        for e in self.targets:
            c = state[e]
            out += [f"endpoints[{e}].instance_type={json.dumps(c.instance_type)}",
                    f"endpoints[{e}].instances={c.instances}"]
            if c.routing != self.base.spec.endpoints[e].routing:
                out.append(f"endpoints[{e}].routing={json.dumps(c.routing)}")
            if self.base.spec.endpoints[e].autoscaling is not None:
                out.append(f"endpoints[{e}].autoscaling=null")
        return out

    def price(self, t: str) -> float:
        return float(self.base.catalog.instance(t).price_per_hour)

    def ep_cost(self, e: int, c: Choice) -> float:
        return c.instances * self.price(c.instance_type) * len(self.rt_names[e])

    def cost(self, state: Mapping[int, Choice]) -> float:
        return float(sum(self.ep_cost(e, state[e]) for e in self.targets))

    def check(self, blocks: list[dict]) -> tuple[bool, dict[str, float], float]:
        return check_blocks(blocks, self.slo, self.max_failed)

    def evaluate(self, state: Mapping[int, Choice], searching: str = "") -> dict:
        """Simulate a plan (once: results are cached); its row of the plans table, or ``error``."""
        from ..api import run

        ovs = self.overrides(state)
        key = tuple(ovs)
        if key in self.cache:
            return self.cache[key]
        try:
            sc = self._load(self.base_overrides + ovs)
        except ScenarioError as e:
            rec = {"error": str(e)}
            self.cache[key] = rec
            return rec
        res = run(sc, replications=self.reps, force=True)   # sized once, before the search
        self.n_sim += 1
        s = res.summary
        row: dict[str, Any] = {"simulation": self.n_sim, "searching": searching}
        for e in self.targets:
            name = self.base.spec.endpoints[e].name
            c = state[e]
            row[f"{name}.instance_type"] = c.instance_type
            row[f"{name}.instances"] = c.instances
            row[f"{name}.routing"] = c.routing
        row["cost_per_hour_usd"] = self.cost(state)
        ov = s["overall"]
        row["cost_usd"] = ov.get("cost_usd")
        for m in self.slo:
            row[f"{m}_ms"] = ov.get(f"{m}_ms")
            row[f"{m}_ms_ci95"] = ov.get(f"{m}_ms_ci95", 0.0 if self.reps == 1 else None)
        row["failed_share"] = (ov.get("failed") or 0.0) / ov["requests"] if ov.get("requests") else 0.0
        ep_ok = {}
        for e in self.targets:
            name = self.base.spec.endpoints[e].name
            ok, upper, failed = self.check([s["endpoints"][n] for n in self.rt_names[e]])
            ep_ok[e] = ok
            for m in self.slo:
                row[f"{name}.{m}_upper_ms"] = upper[m]
            row[f"{name}.failed_share"] = failed
            row[f"{name}.feasible"] = ok
        overall_ok, upper, _ = self.check([ov])
        row["overall_feasible"] = overall_ok
        row["feasible"] = all(ep_ok.values())
        rec = {"row": row, "ep_ok": ep_ok, "summary": s, "upper": {
            e: row[f"{self.base.spec.endpoints[e].name}.{next(iter(self.slo))}_upper_ms"] for e in self.targets}}
        self.cache[key] = rec
        self.rows.append(row)
        m0 = next(iter(self.slo))
        desc = ", ".join(f"{self.base.spec.endpoints[e].name}: {state[e].instances} x {state[e].instance_type}"
                         f" {state[e].routing}" for e in self.targets)
        p, ci = row.get(f"{m0}_ms"), row.get(f"{m0}_ms_ci95") or 0.0
        self.log(f"simulation {self.n_sim}: {desc}: {m0} {'-' if p is None else f'{p:,.0f}'} ± {ci:,.0f} ms, "
                 f"${row['cost_per_hour_usd']:.2f}/h -> {'meets' if row['feasible'] else 'misses'} the SLO")
        return rec

    # -- bounds -----------------------------------------------------------------
    def _workload(self, sc, e: int, t: str):
        from ..core.rng import Streams
        from ..workload.build import build_workload

        key = (e, t)   # a calibrated service depends on the GPU of the endpoint that serves it
        if key not in self._workloads:
            self._workloads[key] = build_workload(sc, Streams(sc.spec.seed, 0))
        return self._workloads[key]

    def bounds(self, e: int, t: str, r: str) -> dict:
        """Prune (type, routing) for endpoint ``e`` before simulating: memory fit, service time alone,
        utilisation < 1 (the lowest count) and the Erlang-C guess."""
        probe = dict(self.state)
        probe[e] = Choice(t, max(self.min_n, 1), r)
        info: dict[str, Any] = {"endpoint": self.base.spec.endpoints[e].name, "instance_type": t, "routing": r}
        try:
            sc = self._load(self.base_overrides + self.overrides(probe))
        except ScenarioError as err:
            info.update(status="skipped", reason=str(err))
            return info
        wl = self._workload(sc, e, t)
        horizon = sc.horizon
        rts = [rt for rt in sc.endpoints if rt.spec_index == e]
        n_lo = max(self.min_n, 1)
        guess = n_lo
        reasons = []
        for rt in rts:
            sel = np.isin(wl.model, np.asarray(rt.models))
            svc = wl.service[sel]
            if not len(svc):
                continue
            rate = len(svc) / horizon
            mean_s = float(svc.mean())
            load = float(svc.sum()) / horizon
            # Requests one instance serves at once.
            if rt.mode == "mme":
                mem = sorted(sc.models[m].memory_gb if rt.instance_type.gpus > 0 else
                             sc.models[m].memory_gb + sc.models[m].host_memory_gb for m in rt.models)
                cache = rt.cache
                room = (rt.instance_type.total_gpu_memory_gb * cache.memory_fraction if rt.instance_type.gpus > 0
                        else rt.instance_type.memory_gb - cache.host_reserve)
                k = int(np.searchsorted(np.cumsum(mem), room + 1e-9, side="right"))
                cap = max(1, k) * rt.max_concurrency
                per_model = max((float(wl.service[wl.model == m].sum()) / horizon for m in rt.models), default=0.0)
                n_lo = max(n_lo, math.floor(per_model / rt.max_concurrency) + 1)
            else:
                cap = rt.copies_per_instance * rt.max_concurrency
            n_lo = max(n_lo, math.floor(load / cap) + 1)
            # Service time alone against each target.
            for m, target in self.slo.items():
                s_q = float(np.quantile(svc, _QUANTILE[m])) if m in _QUANTILE else mean_s
                if s_q > target:
                    reasons.append(f"{rt.name}: the service time alone has {m} {s_q * 1e3:,.0f} ms > "
                                   f"{target * 1e3:,.0f} ms")
            guess = max(guess, self._erlang_guess(rate, mean_s, cap, r, svc, n_lo))
        if reasons:
            info.update(status="pruned", reason="; ".join(reasons))
            return info
        info.update(status="candidate", n_lower=n_lo, guess=max(guess, n_lo),
                    lower_cost_per_hour=self.ep_cost(e, Choice(t, n_lo, r)))
        return info

    def _erlang_guess(self, rate: float, mean_s: float, cap: int, routing: str, svc: np.ndarray, n_lo: int) -> int:
        cv = float(svc.std() / mean_s) if mean_s > 0 and len(svc) > 1 else 1.0
        for n in range(n_lo, self.max_n + 1):
            fine = True
            for m, target in self.slo.items():
                if routing == "random":   # n independent queues, each with rate / n
                    c, lam = cap, rate / n
                else:                     # one pooled queue
                    c, lam = n * cap, rate
                if m in _QUANTILE:
                    q = _QUANTILE[m]
                    slack = target - float(np.quantile(svc, q))
                    fine &= wait_tail(c, lam, mean_s, slack, cv) <= 1.0 - q
                else:
                    fine &= mean_wait(c, lam, mean_s, cv) <= target - mean_s
            if fine:
                return n
        return self.max_n

    # -- per endpoint ---------------------------------------------------------------
    def _feasible(self, e: int, c: Choice, searching: str) -> bool | None:
        st = dict(self.state)
        st[e] = c
        rec = self.evaluate(st, searching)
        if "error" in rec:
            return None
        return rec["ep_ok"][e]

    def _missed(self, e: int, c: Choice) -> dict[str, float] | None:
        """What the simulated plan with ``c`` on endpoint ``e`` misses, as figures where lower is better:
        each SLO figure's CI upper end (ms) above its target, and the share of requests that failed
        above ``max_failed`` (as ``-ok share``, so that a relative change reads the same for a share
        near 1). None where the plan was not simulated (an error)."""
        st = dict(self.state)
        st[e] = c
        rec = self.cache.get(tuple(self.overrides(st)))
        if rec is None or "row" not in rec:
            return None
        row = rec["row"]
        name = self.base.spec.endpoints[e].name
        out = {}
        for m, target in self.slo.items():
            u = row.get(f"{name}.{m}_upper_ms")
            if u is None or u > target * 1e3 + 1e-9:
                out[m] = math.inf if u is None else float(u)
        failed = row.get(f"{name}.failed_share") or 0.0
        if failed > self.max_failed + 1e-12:
            out["failed"] = -(1.0 - failed)
        return out

    @staticmethod
    def _moved(before: dict[str, float], after: dict[str, float]) -> bool:
        """Whether some figure ``before`` missed got better by more than STALL_FRACTION in ``after``."""
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

    def _stall_reason(self, before: tuple[int, dict], after: tuple[int, dict]) -> str:
        (n0, m0), (n1, m1) = before, after

        def show(k: str, v: float) -> str:
            if k == "failed":
                return f"{1.0 + v:.2%} failed"
            return f"{k} {'-' if math.isinf(v) else f'{v:,.0f}'} ms"

        figs = ", ".join(f"{show(k, m0[k])} at {n0} and {show(k, m1[k])} at {n1} instances" for k in m0 if k in m1)
        return (f"more instances no longer move what it misses ({figs}: no better by more than "
                f"{STALL_FRACTION:.0%} over two growth steps); the SLO is missed for a reason capacity does not "
                "cure (service or load times, timeouts, failures)")

    def _smallest(self, e: int, t: str, r: str, lo: int, hi: int, guess: int, label: str) -> int | None:
        """The smallest feasible count in [lo, hi] (feasibility is monotone in the count), or None
        (then ``self.stalled[(e, t, r)]`` says why, where growing stopped short of ``hi``)."""
        f = lambda n: bool(self._feasible(e, Choice(t, n, r), label))  # noqa: E731
        g = min(max(guess, lo), hi)
        no, yes = lo - 1, None       # largest count known infeasible, smallest known feasible
        if f(g):
            yes = g
            step = 1
            while True:               # gallop down
                n = max(g - step, no + 1)
                if n >= yes:
                    break
                if f(n):
                    yes = n
                    step *= 2
                else:
                    no = n
                    break
        else:
            no = g
            step = 1
            trail = [(g, self._missed(e, Choice(t, g, r)))]   # what each count tried misses
            while no < hi:             # gallop up, while more instances move what it misses
                n = min(g + step, hi)
                if f(n):
                    yes = n
                    break
                no = n
                step *= 2
                trail.append((n, self._missed(e, Choice(t, n, r))))
                (n0, m0), (n1, m1) = trail[-3] if len(trail) >= 3 else (None, None), trail[-1]
                if m0 and m1 is not None and not self._moved(m0, m1) and no < hi:
                    self.stalled[(e, t, r)] = self._stall_reason((n0, m0), (n1, m1))
                    return None
            if yes is None:
                return None
        while yes - no > 1:            # bisect
            mid = (yes + no) // 2
            if f(mid):
                yes = mid
            else:
                no = mid
        return yes

    def search_endpoint(self, e: int) -> tuple[Choice, bool]:
        name = self.base.spec.endpoints[e].name
        cands = []
        for t in self.types[e]:
            for r in self.routings[e]:
                info = self.bounds(e, t, r)
                self.candidates.append(info)
                if info["status"] == "candidate":
                    cands.append(info)
                else:
                    self.log(f"{name}: {t} {r} {info['status']}: {info['reason']}")
        cands.sort(key=lambda i: i["lower_cost_per_hour"])   # stable: the given order breaks ties
        best: tuple[float, Choice] | None = None
        for info in cands:
            t, r = info["instance_type"], info["routing"]
            unit = self.ep_cost(e, Choice(t, 1, r))
            lo, hi = info["n_lower"], self.max_n
            if best is not None:
                if info["lower_cost_per_hour"] >= best[0] - 1e-9:
                    info.update(status="pruned", reason=f"its lowest count ({lo}) costs ${info['lower_cost_per_hour']:.2f}/h, "
                                f"no less than the best plan found (${best[0]:.2f}/h)")
                    continue
                hi = min(hi, math.ceil((best[0] - 1e-9) / unit) - 1)
            if lo > hi:
                info.update(status="pruned", reason=f"needs at least {lo} instances (utilisation < 1), more than "
                            f"{'--max-instances' if best is None else 'a plan cheaper than the best'} allows")
                continue
            n = self._smallest(e, t, r, lo, hi, info["guess"], f"{name}:{t}:{r}")
            info["found"] = n
            if n is None:
                stalled = self.stalled.get((e, t, r))
                if stalled:
                    info.update(status="infeasible", reason=f"no count in [{lo}, {hi}] tried meets the SLO: "
                                f"{stalled}")
                    self.notes.append(f"endpoint {name}: {t} {r}: stopped growing the fleet: {stalled}")
                    self.log(f"{name}: {t} {r}: stopped growing: {stalled}")
                else:
                    info.update(status="infeasible", reason=f"no count in [{lo}, {hi}] meets the SLO")
                continue
            info.update(status="feasible")
            c = Choice(t, n, r)
            best = (self.ep_cost(e, c), c)
        if best is not None:
            return best[1], True
        # Nothing meets the SLO: keep the simulated plan of this endpoint with the lowest P99.
        evaluated = [(rec["upper"][e], self.ep_cost(e, st[e]), st[e]) for st, rec in self._states_for(e)]
        if evaluated:
            evaluated.sort(key=lambda x: (x[0], x[1]))
            return evaluated[0][2], False
        return self.state[e], False

    def _states_for(self, e: int):
        """(state, record) of every simulated plan that matches the current state outside endpoint ``e``."""
        for key, rec in self.cache.items():
            if "row" not in rec:
                continue
            row = rec["row"]
            st = {}
            match = True
            for j in self.targets:
                nm = self.base.spec.endpoints[j].name
                c = Choice(row[f"{nm}.instance_type"], row[f"{nm}.instances"], row[f"{nm}.routing"])
                if j != e and c != self.state[j]:
                    match = False
                st[j] = c
            if match:
                yield st, rec

    def run(self, max_passes: int = 3) -> OptimizeResult:
        feasible = {e: False for e in self.targets}
        final = None
        for _ in range(max_passes):
            changed = False
            for e in self.targets:
                c, ok = self.search_endpoint(e)
                feasible[e] = ok
                if c != self.state[e]:
                    self.state[e] = c
                    changed = True
            final = self.evaluate(self.state, "combined plan")
            if "error" in final or all(final["ep_ok"].values()) or not changed:
                break
            self.notes.append("the combined plan missed the SLO on an endpoint: another pass with the others fixed")
        ok = final is not None and "error" not in final and all(final["ep_ok"].values())
        ovs = self.overrides(self.state)
        plans = pd.DataFrame(self.rows)
        m0 = next(iter(self.slo))
        frontier = pareto(plans, "cost_per_hour_usd", f"{m0}_ms") if len(plans) else plans
        best_plan = {self.base.spec.endpoints[e].name: {"instance_type": self.state[e].instance_type,
                                                        "instances": self.state[e].instances,
                                                        "routing": self.state[e].routing} for e in self.targets}
        for e in self.targets:
            if not feasible[e]:
                sooner = (" (growing stopped sooner where more instances no longer helped)"
                          if any(k[0] == e for k in self.stalled) else "")
                self.notes.append(f"endpoint {self.base.spec.endpoints[e].name}: no plan meets the SLO within "
                                  f"{self.max_n} instances (--max-instances) of {', '.join(self.types[e])}{sooner}; "
                                  "the plan shown has the lowest P99 simulated")
        return OptimizeResult(
            scenario=self.base.name, slo={m: v * 1e3 for m, v in self.slo.items()}, max_failed=self.max_failed,
            replications=self.reps, best_plan=best_plan, best_overrides=ovs,
            best_summary=None if final is None or "error" in final else final["summary"], best_yaml="",
            feasible=ok, cost_per_hour_usd=self.cost(self.state), frontier=frontier, plans=plans,
            n_simulations=self.n_sim, candidates=self.candidates, notes=self.notes)


def optimize(scenario_path: str | Path, *, instance_types: Iterable[str] | None = None,
             max_instances: int = 10, min_instances: int = 1, slo: Any = None, max_failed: float = 0.001,
             replications: int | None = None, routing: Iterable[str] | None = None,
             endpoints: Iterable[str] | None = None, overrides: Iterable[str] = (),
             modes: Iterable[str] | str | None = None,
             out: str | Path | None = None, log: Callable[[str], None] | None = None,
             force: bool = False) -> OptimizeResult:
    """The cheapest plan (instance type, count and routing per endpoint) whose SLO figures' 95% CI upper
    ends meet ``slo`` (default: the scenario's ``slo``) with at most ``max_failed`` of requests failed.

    ``modes`` (``"sme,mme,ic"`` or a subset): search hosting modes too. The scenario's endpoints are
    then replaced, per mode, by the plan ``capsim compare`` builds for its fleet (see
    :func:`optimize_modes`), and the cheapest feasible mode wins.

    ``instance_types``: the types to consider (default: each endpoint's own); ``routing``: the routing
    policies (default: each endpoint's own); ``endpoints``: the endpoints to size (default: every sme and
    mme endpoint); ``replications`` per plan (default: the scenario's when more than 1, else 5);
    ``overrides``: ``--set`` strings applied first. ``out``: write optimize.json, best.yaml, plans.csv,
    frontier.csv and frontier.png there. See the module docstring for the search. Before any
    simulation a plan's size is estimated (:mod:`sim.volume`, with ``replications``): one that would
    not fit in the memory available is refused with the estimate unless ``force``.
    """
    path = Path(scenario_path)
    data = read_yaml(path)
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(data, overrides, source=f"{path} (--set)")
    if max_instances < 1 or min_instances < 1 or min_instances > max_instances:
        raise ScenarioError(f"expected 1 <= --min-instances ({min_instances}) <= --max-instances ({max_instances})",
                            source="--max-instances")
    if not 0 <= max_failed < 1:
        raise ScenarioError(f"expected a share in [0, 1), got {max_failed!r}", source="--max-failed")
    sc0 = parse_scenario(data, source=str(path), base_dir=path.resolve().parent)
    targets = parse_slo(slo, sc0.spec.slo)
    reps = replications or (sc0.spec.replications if sc0.spec.replications > 1 else DEFAULT_REPLICATIONS)
    if not force:
        from ..volume import check

        check(sc0, replications=reps)
    if modes:
        if endpoints:
            raise ScenarioError("--endpoint and --modes do not go together: with --modes the plans replace "
                                "every endpoint", source="--endpoint")
        res = optimize_modes(path, data, sc0, targets, _parse_modes(modes), instance_types=instance_types,
                             max_instances=max_instances, min_instances=min_instances, max_failed=max_failed,
                             replications=reps, routing=routing, log=log or (lambda m: None))
        if out is not None:
            res.save(out)
        return res
    opt = _Optimizer(path, data, [], targets, max_failed, reps,
                     list(instance_types) if instance_types else None, list(routing) if routing else None,
                     min_instances, max_instances, list(endpoints) if endpoints else None, log or (lambda m: None))
    if reps == 1:
        opt.notes.append("one replication per plan: no confidence interval, the SLO is checked on the estimate")
    res = opt.run()
    # best.yaml: the original file with the --set overrides and the plan applied.
    res.best_overrides = overrides + res.best_overrides
    res.best_yaml = yaml.safe_dump(apply_overrides(read_yaml(path), res.best_overrides,
                                                   source=f"{path} (plan)"), sort_keys=False)
    if out is not None:
        res.save(out)
    return res


# -- hosting modes ---------------------------------------------------------------------------------
def _parse_modes(modes: Iterable[str] | str) -> list[str]:
    from ..scenario.errors import suggest
    from .compare import MODES

    items = modes.split(",") if isinstance(modes, str) else list(modes)
    out = [m.strip() for m in items if m and m.strip()]
    for m in out:
        if m not in MODES:
            raise ScenarioError(f"unknown hosting mode {m!r}{suggest(m, MODES)}; expected a comma-separated "
                                f"subset of {','.join(MODES)}", source="--modes")
    if not out:
        raise ScenarioError(f"expected a comma-separated subset of {','.join(MODES)}", source="--modes")
    return list(dict.fromkeys(out))


def optimize_modes(path: Path, data: dict, sc0, slo: dict[str, float], modes: list[str], *,
                   instance_types: Iterable[str] | None, max_instances: int, min_instances: int,
                   max_failed: float, replications: int, routing: Iterable[str] | None,
                   log: Callable[[str], None], rounds: int = 4) -> OptimizeResult:
    """The cheapest feasible plan over hosting modes, for the fleet (models and traffic) of ``data``.

    Per mode, the endpoints are those of ``capsim compare``'s plan builders (sim.plan.compare: one SME
    per model on its cheapest type; one MME on a single-GPU type, multi-GPU models on SMEs; one IC
    endpoint packed on a multi-GPU type), restricted to ``instance_types`` when given. Then:

    - **sme, mme**: the search of :func:`optimize` (type among ``instance_types`` or the builder's
      choice, count, routing) on every endpoint of the plan;
    - **ic**: compare's sizing (copies from the queueing estimate, grown where the simulation of
      replication 0 misses the SLO, repacked on the cheapest type), then checked over ``replications``
      with the optimizer's rule (each model's CI upper end within the target); where that check fails
      the missing components get more copies, for at most ``rounds`` checks. Copies are only grown,
      never searched downward from the estimate, and managed instance scaling is not searched: the
      IC plan is a fixed fleet, so its cost is an upper bound on the cheapest IC plan.
    """
    import copy

    from . import compare as cmp

    loads = cmp.fleet_load(sc0)
    types = list(sc0.catalog.instance_types.values())
    if instance_types:
        wanted = list(instance_types)
        for t in wanted:
            try:
                sc0.catalog.instance(t)
            except KeyError as err:
                raise ScenarioError(str(err.args[0]) if err.args else f"unknown instance type {t!r}",
                                    source="--instance-types") from None
        types = [t for t in types if t.name in wanted]
    slo_s = slo.get("p99", min(slo.values()))
    groups = [(g.name, [sc0.models[m].name for m in g.models]) for g in sc0.groups]
    outcomes: dict[str, dict] = {}
    results: dict[str, OptimizeResult] = {}
    yamls: dict[str, str] = {}
    notes: list[str] = []
    for mode in modes:
        plan = (cmp.build_mme(loads, types, slo_s, groups) if mode == "mme"
                else cmp.BUILDERS[mode](loads, types, slo_s))
        if plan.error:
            outcomes[mode] = {"status": "not built", "reason": plan.error}
            notes.append(f"{mode}: not built: {plan.error}")
            log(f"{mode}: not built: {plan.error}")
            continue
        mdata = copy.deepcopy(data)
        mdata["endpoints"] = copy.deepcopy(plan.endpoints)
        log(f"{mode}: {len(plan.endpoints)} endpoint(s) from compare's builder; searching")
        if mode == "ic":
            r = _size_ic(path, mdata, sc0, plan, slo, max_failed, replications, rounds, log)
        else:
            opt = _Optimizer(path, mdata, [], slo, max_failed, replications,
                             list(instance_types) if instance_types else None, list(routing) if routing else None,
                             min_instances, max_instances, None, log)
            r = opt.run()
            r.best_yaml = yaml.safe_dump(apply_overrides(mdata, r.best_overrides, source=f"{path} (plan)"),
                                         sort_keys=False)
        r.plans.insert(0, "mode", mode)
        results[mode] = r
        yamls[mode] = r.best_yaml
        outcomes[mode] = {"status": "feasible" if r.feasible else "infeasible", "feasible": r.feasible,
                          "cost_per_hour_usd": r.cost_per_hour_usd, "best_plan": r.best_plan,
                          "n_simulations": r.n_simulations, "notes": list(r.notes)}
        notes += [f"{mode}: {n}" for n in r.notes]
        log(f"{mode}: {'feasible' if r.feasible else 'no feasible plan'}, ${r.cost_per_hour_usd:,.2f}/h "
            f"({r.n_simulations} plans simulated)")
    ok = [(r.cost_per_hour_usd, m) for m, r in results.items() if r.feasible]
    if ok:
        best_mode = min(ok)[1]
    elif results:   # none meets the SLO: show the mode whose plan came closest (lowest P99 upper end)
        m0 = next(iter(slo))

        def upper(r):
            ov = (r.best_summary or {}).get("overall") or {}
            v = ov.get(f"{m0}_ms")
            return math.inf if v is None else v + (ov.get(f"{m0}_ms_ci95") or 0.0)

        best_mode = min(results, key=lambda m: (upper(results[m]), results[m].cost_per_hour_usd))
        notes.append(f"no hosting mode meets the SLO; the plan shown ({best_mode}) came closest")
    else:
        raise ScenarioError("no hosting mode could be built for this fleet: "
                            + "; ".join(f"{m}: {o['reason']}" for m, o in outcomes.items()), source=str(path))
    best = results[best_mode]
    plans = pd.concat([r.plans for r in results.values()], ignore_index=True)
    m0 = next(iter(slo))
    frontier = pareto(plans, "cost_per_hour_usd", f"{m0}_ms") if len(plans) else plans
    return OptimizeResult(
        scenario=sc0.name, slo={m: v * 1e3 for m, v in slo.items()}, max_failed=max_failed,
        replications=replications, best_plan=best.best_plan, best_overrides=[], best_summary=best.best_summary,
        best_yaml=yamls[best_mode], feasible=best.feasible, cost_per_hour_usd=best.cost_per_hour_usd,
        frontier=frontier, plans=plans, n_simulations=sum(r.n_simulations for r in results.values()),
        candidates=[{**c, "mode": m} for m, r in results.items() for c in r.candidates], notes=notes,
        mode=best_mode, modes=outcomes)


def _size_ic(path: Path, mdata: dict, sc0, plan, slo: dict[str, float], max_failed: float, replications: int,
             rounds: int, log: Callable[[str], None]) -> OptimizeResult:
    """compare's sizing of an IC plan, then growth until each model's CI upper end meets the SLO."""
    from . import compare as cmp

    cslo = cmp.SLO({m: v * 1e3 for m, v in slo.items()})
    runner = cmp._Runner(sc0, mdata, sc0.spec.seed, log)
    plan.state.setdefault("loads", {lm.name: lm for lm in plan.state["ic_loads"]})
    cmp._size(plan, runner, cslo, rounds)
    rows, n_sim = [], len(plan.sizing)
    notes = [f"sized as capsim compare does ({len(plan.sizing)} simulation(s) of replication 0)"]
    res = None
    ok = False
    for k in range(rounds):
        res = runner.simulate(plan, replications=replications)
        n_sim += 1
        s = res.summary
        blocks = {lm.name: s["models"][lm.name] for lm in plan.state["ic_loads"]}
        ok, upper, failed = check_blocks(list(blocks.values()), slo, max_failed)
        ep = plan.endpoints[0]
        m0 = next(iter(slo))
        ov = s["overall"]
        rows.append({"simulation": n_sim, "searching": "ic copies", "ic.instance_type": ep["instance_type"],
                     "ic.instances": ep["instances"], "ic.copies": sum(c["copies"] for c in ep["components"]),
                     "cost_per_hour_usd": cmp.cost_per_hour(s), f"{m0}_ms": ov.get(f"{m0}_ms"),
                     f"{m0}_ms_ci95": ov.get(f"{m0}_ms_ci95"), "failed_share": failed, "feasible": ok})
        if ok or k == rounds - 1:
            break
        missed = [n for n, b in blocks.items() if not check_blocks([b], slo, max_failed)[0]]
        copies = plan.state["copies"]
        for i, lm in enumerate(plan.state["ic_loads"]):
            if lm.name in missed:
                copies[i] = cmp._grow(copies[i])
        it, n = cmp._ic_choose(plan.state["ic_loads"], copies, plan.state["types"])
        plan.endpoints[0] = cmp._ic_endpoint(plan.state["ic_loads"], copies, it, n)
        log(f"ic: the 95% CI misses the SLO for {cmp._few(missed)}; more copies ({n} x {it.name})")
    if not ok:
        notes.append(f"no IC plan met the SLO with confidence within {rounds} checks; the last one is shown")
    ep = plan.endpoints[0]
    best_plan = {ep["name"]: {"instance_type": ep["instance_type"], "instances": ep["instances"],
                              "routing": ep.get("routing"),
                              "copies": {c["model"]: c["copies"] for c in ep["components"]}}}
    import copy as _copy

    final = _copy.deepcopy(mdata)
    final["endpoints"] = _copy.deepcopy(plan.endpoints)
    df = pd.DataFrame(rows)
    m0 = next(iter(slo))
    return OptimizeResult(
        scenario=sc0.name, slo={m: v * 1e3 for m, v in slo.items()}, max_failed=max_failed,
        replications=replications, best_plan=best_plan, best_overrides=[], best_summary=res.summary,
        best_yaml=yaml.safe_dump(final, sort_keys=False), feasible=ok,
        cost_per_hour_usd=cmp.cost_per_hour(res.summary), frontier=pareto(df, "cost_per_hour_usd", f"{m0}_ms"),
        plans=df, n_simulations=n_sim, notes=notes)


__all__ = ["optimize", "optimize_modes", "OptimizeResult", "parse_slo", "check_blocks", "erlang_c", "pareto"]
