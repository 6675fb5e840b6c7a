"""The sizing runner: simulate a plan, grow what missed the SLO, judge the result.

:class:`Runner` simulates a plan on the fleet's scenario and seed; :func:`size` simulates it and,
while it misses the SLO, asks its builder (:data:`sim.plan.builders.BUILDERS`) to grow the parts
that missed, for at most ``rounds`` simulations; :func:`judge` gives a plan's verdict from its
final result (all replications).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

from ..api import Result
from ..scenario import Scenario
from .builders import BUILDERS, Plan
from .executors import Executor
from .load import ModelLoad
from .parallel import Job, run_jobs
from .slo import SLO, STALL_FRACTION, moved

Progress = Callable[[str], None]


class Runner:
    """Simulates plans of one fleet: the scenario's data with a plan's endpoints, with the fleet's seed."""

    def __init__(self, sc: Scenario, data: dict, seed: int, progress: Progress, executor: Executor | None = None):
        self.sc, self.data, self.seed, self.progress = sc, data, seed, progress
        self.executor = executor

    def scenario_data(self, plan: Plan) -> dict:
        d = copy.deepcopy(self.data)
        d["name"] = f"{self.sc.name}-{plan.name}"
        d["endpoints"] = copy.deepcopy(plan.endpoints)
        if plan.instance_types:
            own = {t["name"] for t in plan.instance_types if isinstance(t, dict) and "name" in t}
            d["instance_types"] = [t for t in d.get("instance_types", []) if t.get("name") not in own] \
                + copy.deepcopy(plan.instance_types)
        return d

    def job(self, plan: Plan, replications: int) -> Job:
        source = plan.state.get("source", f"{self.sc.source} (plan {plan.name})")
        return Job(self.scenario_data(plan), source, self.sc.base_dir, self.seed, replications)

    def simulate(self, plan: Plan, replications: int = 1) -> Result:
        t = time.perf_counter()
        res = run_jobs([self.job(plan, replications)], self.executor)[0]   # sized before the first plan
        self.report(plan, res, time.perf_counter() - t)
        return res

    def simulate_many(self, plans: list[Plan], replications: int = 1) -> list[Result]:
        """Each plan simulated (``replications`` each): on the executor at once, or one after the other."""
        if self.executor is None or self.executor.workers <= 1 or len(plans) * replications <= 1:
            return [self.simulate(p, replications) for p in plans]
        t = time.perf_counter()
        out = run_jobs([self.job(p, replications) for p in plans], self.executor)
        for p, res in zip(plans, out):
            self.report(p, res, time.perf_counter() - t)
        return out

    def report(self, plan: Plan, res: Result, seconds: float) -> None:
        o = res.summary["overall"]
        self.progress(f"{plan.name}: ${cost_per_hour(res.summary):,.2f}/h, P99 {fmt_ms(o['p99_ms'])}, "
                      f"{o['failed']} failed ({seconds:.1f} s)")


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def cost_per_hour(summary: dict) -> float:
    """A run's cost per hour, from its summary (the metrics priced its fleet log, sim.pricing)."""
    return summary["overall"]["cost_usd"] / summary["simulated_seconds"] * 3600.0


def size(plan: Plan, runner: Runner, slo: SLO, rounds: int) -> None:
    """Simulate the plan; while its overall figures miss the SLO, grow what missed it
    (endpoints' instances, or components' copies), for at most ``rounds`` simulations."""
    size_all([plan], runner, slo, rounds)


def size_all(plans: list[Plan], runner: Runner, slo: SLO, rounds: int) -> None:
    """:func:`size` for several plans, round by round: each round simulates the plans still growing
    together (on the runner's executor), and each plan's rounds are those it would have alone."""
    active = list(plans)
    for r in range(rounds):
        if not active:
            break
        results = runner.simulate_many(active)
        active = [p for p, res in zip(active, results) if after_round(p, res, runner, slo, r, rounds)]
    for plan in plans:
        if plan.slo_met is False:
            plan.notes.append(f"misses the SLO after {len(plan.sizing)} simulation(s); the last sizing is kept")


def after_round(plan: Plan, res: Result, runner: Runner, slo: SLO, r: int, rounds: int) -> bool:
    """Log round ``r``'s result; grow what missed the SLO. Whether the plan needs another round."""
    limit = slo.latency_s
    loads: dict[str, ModelLoad] = plan.state["loads"]
    plan.result = res
    s = res.summary
    ok = slo.verdict(s["overall"])
    plan.sizing.append({"round": r + 1, "cost_per_hour_usd": cost_per_hour(s), "p99_ms": s["overall"]["p99_ms"],
                        "slo_attainment": s["overall"]["slo_attainment"], "slo_met": ok,
                        "instances": instances(plan.endpoints)})
    plan.slo_met = ok
    if ok is not False or r == rounds - 1:
        return False
    # What can grow: an endpoint or a component, unless its service time alone misses the SLO.
    builder = BUILDERS[plan.mode]
    units = builder.units(plan, s)
    hopeless = {n for n, _ in units if n in loads and limit is not None and loads[n].p99_s >= limit}
    growable = [(n, b) for n, b in units if n not in hopeless]
    if not growable:
        plan.notes.append("the service times alone miss the SLO: more capacity cannot meet it")
        return False
    missed = [n for n, b in growable if not slo.met(b)]
    if not missed:   # the total misses although each part meets it: grow the part that fares worst
        missed = [min(growable, key=lambda x: (x[1].get("slo_attainment") or 0.0))[0]]
    # Stop where, over two growth steps, more capacity moved nothing the plan misses (the rule
    # optimize's search uses): the SLO is missed for a reason capacity does not cure.
    trail = plan.state.setdefault("missed_trail", [])
    trail.append((sum(instances(plan.endpoints).values()), slo.missed(s["overall"])))
    if len(trail) >= 3 and trail[-3][1] and not moved(trail[-3][1], trail[-1][1]):
        (n0, m0), (n1, m1) = trail[-3], trail[-1]
        figs = ", ".join(f"{k} {show_missed(k, m0[k])} at {n0} and {show_missed(k, m1[k])} at {n1} instances"
                         for k in m0 if k in m1)
        plan.notes.append(f"stopped growing: more capacity no longer moves what it misses ({figs}: no better by "
                          f"more than {STALL_FRACTION:.0%} over two growth steps); the SLO is missed for a reason "
                          "capacity does not cure")
        runner.progress(f"{plan.name}: stopped growing (more capacity no longer moves what it misses)")
        return False
    added = builder.grow(plan, missed)
    runner.progress(f"{plan.name}: SLO missed; {added} for {few(missed)}")
    return True


def judge(plan: Plan, slo: SLO, replications: int) -> None:
    """The plan's verdict from its (final) result, logged as a row of its sizing."""
    s = plan.result.summary
    ok = slo.verdict(s["overall"])
    plan.sizing.append({"round": len(plan.sizing) + 1, "replications": replications,
                        "cost_per_hour_usd": cost_per_hour(s), "p99_ms": s["overall"]["p99_ms"],
                        "slo_attainment": s["overall"]["slo_attainment"], "slo_met": ok,
                        "instances": instances(plan.endpoints)})
    if replications > 1 and plan.slo_met is not None and ok != plan.slo_met:
        plan.notes.append(f"over {replications} replications the plan {'meets' if ok else 'misses'} the SLO "
                          f"(replication 0 alone: {'met' if plan.slo_met else 'missed'} it)")
    plan.slo_met = ok


def show_missed(k: str, v: float) -> str:
    """A figure of :meth:`SLO.missed`, to read."""
    if k == "slo_attainment":
        return f"{-v:.2%}"
    if k == "failed":
        return f"{1.0 + v:.2%} failed"
    return "-" if v == float("inf") else f"{v:,.0f} ms"


def few(names: list[str], k: int = 4) -> str:
    """The first ``k`` names, and how many more."""
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def fleet(res: Result) -> dict[str, float]:
    """Instances in service by type over the measured horizon, as simulated (the mean, where
    autoscaling or managed instance scaling moved it; replication 0's figures with replications)."""
    s = (res.replication_summaries or [res.summary])[0]
    out: dict[str, float] = {}
    for ep in res.scenario.endpoints:
        out[ep.instance_type.name] = out.get(ep.instance_type.name, 0.0) + s["endpoints"][ep.name]["instances_mean"]
    return {k: (int(round(v)) if abs(v - round(v)) < 1e-9 else round(v, 2)) for k, v in out.items()}


def instances(endpoints: list[dict]) -> dict[str, int]:
    """Instances by type of endpoints as a scenario's (the initial count of an autoscaled one)."""
    out: dict[str, int] = {}
    for ep in endpoints:
        n = ep.get("instances", 1)
        if isinstance(n, dict):
            n = n.get("initial", n.get("min", 1))
        out[ep["instance_type"]] = out.get(ep["instance_type"], 0) + int(n)
    return out
