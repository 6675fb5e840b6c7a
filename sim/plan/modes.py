"""The optimizer over hosting modes: per mode, compare's plan for the fleet, sized by the search."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
import yaml

from ..scenario import ScenarioError, apply_overrides
from .builders import BUILDERS, MODES, Plan, checked_types
from .frontier import OptimizeResult, pareto
from .load import fleet_load
from .search import EndpointSearch
from .sizing import Runner, cost_per_hour, few, size
from .slo import SLO, check_blocks


def parse_modes(modes: Iterable[str] | str) -> list[str]:
    from ..scenario.errors import suggest

    items = modes.split(",") if isinstance(modes, str) else list(modes)
    out = [m.strip() for m in items if m and m.strip()]
    for m in out:
        if m not in MODES:
            raise ScenarioError(f"unknown hosting mode {m!r}{suggest(m, MODES)}; expected a comma-separated "
                                f"subset of {','.join(MODES)}", source="--modes")
    if not out:
        raise ScenarioError(f"expected a comma-separated subset of {','.join(MODES)}", source="--modes")
    return list(dict.fromkeys(out))


def optimize_modes(path: Path, data: dict, sc0: Any, slo: dict[str, float], modes: list[str], *,
                   instance_types: Iterable[str] | None, max_instances: int, min_instances: int,
                   max_failed: float, replications: int, routing: Iterable[str] | None,
                   log: Callable[[str], None], rounds: int = 4, executor: Any = None,
                   knobs: bool = True) -> OptimizeResult:
    """The cheapest feasible plan over hosting modes, for the fleet (models and traffic) of ``data``.

    Per mode, the endpoints are those of ``capsim compare``'s plan builders (sim.plan.compare: one SME
    per model on its cheapest type; one MME on a single-GPU type, multi-GPU models on SMEs; one IC
    endpoint packed on a GPU type, single-GPU ones too), restricted to ``instance_types`` when given. Then:

    - **sme, mme**: the search of :func:`optimize` (type among ``instance_types`` or the builder's
      choice, count, routing among ``routing`` or the scenario's own endpoints' policies, as
      :func:`optimize` without modes searches) on every endpoint of the plan, with its per-copy
      concurrency knob where ``knobs`` and its models charge for concurrency (:mod:`sim.plan.knobs`);
    - **ic**: compare's sizing (copies from the queueing estimate, grown where the simulation of
      replication 0 misses the SLO, repacked on the cheapest type), then checked over ``replications``
      with the optimizer's rule (each model's CI upper end within the target); where that check fails
      the missing components get more copies, for at most ``rounds`` checks. Copies are only grown,
      never searched downward from the estimate, and managed instance scaling is not searched: the
      IC plan is a fixed fleet, so its cost is an upper bound on the cheapest IC plan.
    """
    loads = fleet_load(sc0)
    types = list(sc0.catalog.instance_types.values())
    if instance_types:
        wanted = checked_types(instance_types, sc0.catalog)
        types = [t for t in types if t.name in wanted]
    slo_s = SLO({m: v * 1e3 for m, v in slo.items()}).latency_s
    groups = [(g.name, [sc0.models[m].name for m in g.models]) for g in sc0.groups]
    # The routing policies searched: --routing, else those of the scenario's own endpoints, as optimize
    # without --modes searches (one fleet, one answer).
    routings = list(routing) if routing else \
        list(dict.fromkeys(es.routing for es in sc0.spec.endpoints if es.mode != "ic")) or None
    outcomes: dict[str, dict] = {}
    results: dict[str, OptimizeResult] = {}
    yamls: dict[str, str] = {}
    notes: list[str] = []
    for mode in modes:
        plan = BUILDERS[mode].build(loads, types, slo_s, groups)
        if plan.error:
            outcomes[mode] = {"status": "not built", "reason": plan.error}
            notes.append(f"{mode}: not built: {plan.error}")
            log(f"{mode}: not built: {plan.error}")
            continue
        mdata = copy.deepcopy(data)
        mdata["endpoints"] = copy.deepcopy(plan.endpoints)
        log(f"{mode}: {len(plan.endpoints)} endpoint(s) from compare's builder; searching")
        if mode == "ic":
            r = size_ic(path, mdata, sc0, plan, slo, max_failed, replications, rounds, log, executor)
        else:
            opt = EndpointSearch(path, mdata, [], slo, max_failed, replications,
                                 list(instance_types) if instance_types else None,
                                 routings, min_instances, max_instances, None, log,
                                 executor, knobs)
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


def size_ic(path: Path, mdata: dict, sc0: Any, plan: Plan, slo: dict[str, float], max_failed: float,
            replications: int, rounds: int, log: Callable[[str], None], executor: Any = None) -> OptimizeResult:
    """compare's sizing of an IC plan, then growth until each model's CI upper end meets the SLO."""
    cslo = SLO({m: v * 1e3 for m, v in slo.items()})
    runner = Runner(sc0, mdata, sc0.spec.seed, log, executor)
    plan.state.setdefault("loads", {lm.name: lm for lm in plan.state["ic_loads"]})
    size(plan, runner, cslo, rounds)
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
                     "cost_per_hour_usd": cost_per_hour(s), f"{m0}_ms": ov.get(f"{m0}_ms"),
                     f"{m0}_ms_ci95": ov.get(f"{m0}_ms_ci95"), "failed_share": failed, "feasible": ok})
        if ok or k == rounds - 1:
            break
        missed = [n for n, b in blocks.items() if not check_blocks([b], slo, max_failed)[0]]
        added = BUILDERS["ic"].grow(plan, missed)
        log(f"ic: the 95% CI misses the SLO for {few(missed)}; {added}")
    if not ok:
        notes.append(f"no IC plan met the SLO with confidence within {rounds} checks; the last one is shown")
    ep = plan.endpoints[0]
    best_plan = {ep["name"]: {"instance_type": ep["instance_type"], "instances": ep["instances"],
                              "routing": ep.get("routing"),
                              "copies": {c["model"]: c["copies"] for c in ep["components"]}}}
    final = copy.deepcopy(mdata)
    final["endpoints"] = copy.deepcopy(plan.endpoints)
    df = pd.DataFrame(rows)
    m0 = next(iter(slo))
    return OptimizeResult(
        scenario=sc0.name, slo={m: v * 1e3 for m, v in slo.items()}, max_failed=max_failed,
        replications=replications, best_plan=best_plan, best_overrides=[], best_summary=res.summary,
        best_yaml=yaml.safe_dump(final, sort_keys=False), feasible=ok,
        cost_per_hour_usd=cost_per_hour(res.summary), frontier=pareto(df, "cost_per_hour_usd", f"{m0}_ms"),
        plans=df, n_simulations=n_sim, notes=notes)
