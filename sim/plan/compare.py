"""One fleet, three hosting plans: SME, MME and IC, each sized to meet the SLO.

:func:`compare` takes a scenario's fleet (its models and their traffic) and its
SLO, builds one plan per hosting mode, sizes it, simulates every plan on the
same arrivals and reports them side by side. The scenario's own ``endpoints``
only lend each model its ``max_concurrency`` (1 where none serves it); the
plans replace them.

The concepts live in their own modules: the fleet's load (:mod:`sim.plan.load`), capacity
estimators per execution model (:mod:`sim.plan.capacity`), the SLO (:mod:`sim.plan.slo`), plan
builders (:mod:`sim.plan.builders`), the sizing runner (:mod:`sim.plan.sizing`) and model fit
(:mod:`sim.scenario.fit`); this module orchestrates them and writes the comparison.

Sizing, per mode (an estimate, then checked by simulation):

- **SME**: each model on its own endpoint, on the instance type of the catalog
  that serves its traffic at the lowest estimated cost (for a lightly used
  model: the cheapest type that fits it); GPU types only, unless the model has
  ``accelerators: 0``. The instance count comes from the capacity estimate of
  the model's execution model at its busiest-window rate (:mod:`sim.plan.capacity`:
  Erlang C on ``copies x max_concurrency`` slots per instance; the batching
  chain for a slowdown curve; a language model's engine on that type); an
  endpoint whose P99 misses the SLO in the simulation gets more instances, for
  a few rounds.
- **MME**: models with at most one accelerator share one multi-model endpoint
  on a single-GPU instance type (GPU MMEs run on single-GPU types); the count
  holds the working set (every model's GPU memory, host memory and artifact,
  times the copies its load needs, against ``memory_fraction`` of the GPU
  memory, host memory above ``host_reserve`` and the disk) with 20% slack, on
  the type where that costs least. Models that need more than one accelerator
  keep SME endpoints inside the MME plan (a hybrid, noted). An endpoint that
  misses the SLO gets more instances.
- **IC**: one ``mode: ic`` endpoint whose components each get the copies of
  the queueing estimate, packed (binpack) on the GPU instance type (single-GPU ones too) where
  they need the fewest dollars; components that miss the SLO get more copies
  and the copies are packed again (on whichever type is then cheapest).
- **autoscaled** (where the traffic varies by design, :mod:`sim.plan.autoscaled`): beside each
  sized fixed SME and MME plan, its endpoints with target tracking between the count at the
  quietest window's rate and the fixed count, simulated and sized in turn.

Every plan runs with the scenario's seed: capsim's random streams are keyed
by model group, so every plan sees the same arrivals, request sizes and
service times (common random numbers). Plans written by hand (a mapping name
-> list of endpoints, or name -> scenario file whose endpoints are taken) run
as they are, on the same fleet.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ..api import Result, atomic_write, json_default
from ..output import safe_name
from ..pricing import price_warning, fleet_hourly
from ..scenario import Scenario, ScenarioError, apply_overrides, load_scenario, parse_scenario, read_yaml
from ..scenario.errors import suggest
from .autoscaled import autoscaled_plans
from .builders import BUILDERS, MODES, Plan, build_ic, build_mme, build_sme, checked_types  # noqa: F401
from .capacity import erlang_c, units_needed  # noqa: F401  (public API)
from .load import ModelLoad, fleet_load, served_concurrency  # noqa: F401  (public API)
from .figures import device_figures, utilisation
from .parallel import planner_executor
from .sizing import Progress, Runner, cost_per_hour, fleet, few, instances, judge, size, size_all  # noqa: F401
from .slo import SLO, parse_slo

ROUNDS = 4                   # simulations per plan at most (sizing rounds)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def read_plans(path: str | Path) -> list[Plan]:
    """Plans from a YAML mapping: name -> list of endpoints, or name -> a scenario file
    (relative to this file) whose ``endpoints`` (and ``instance_types``) are taken."""
    path = Path(path)
    data = read_yaml(path)
    plans = []
    for name, v in data.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ScenarioError(f"plan name {name!r}: expected letters, digits, '-', '_' or '.' (it names files)",
                                source=str(path))
        p = Plan(name, "custom")
        if isinstance(v, str):
            f = (path.parent / v)
            other = read_yaml(f)
            if "endpoints" not in other:
                raise ScenarioError("expected a scenario file with endpoints", source=str(f), path="endpoints")
            p.endpoints = other["endpoints"]
            p.instance_types = other.get("instance_types", []) or []
            p.notes.append(f"endpoints of {v}")
        elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
            p.endpoints = v
        else:
            raise ScenarioError("expected a list of endpoints (as a scenario's endpoints) or the path of a scenario "
                                f"file, got {type(v).__name__}", source=str(path), path=name)
        plans.append(p)
    if not plans:
        raise ScenarioError("no plans; expected a mapping name -> list of endpoints or scenario file",
                            source=str(path))
    return plans


def parse_plan_option(value: str | Sequence[str] | None) -> list[str] | Path:
    """``--plans``: ``sme,mme,ic`` (a subset, in any order) or the path of a plans YAML file."""
    if value is None:
        return list(MODES)
    if isinstance(value, (list, tuple)):
        value = ",".join(value)
    v = str(value).strip()
    if v.endswith((".yaml", ".yml")) or os.path.sep in v or Path(v).is_file():
        return Path(v)
    names = [x.strip() for x in v.split(",") if x.strip()]
    for x in names:
        if x not in MODES:
            raise ScenarioError(f"unknown plan {x!r}{suggest(x, MODES)}; expected a comma-separated subset of "
                                f"{','.join(MODES)} or a plans YAML file", source="--plans")
    if not names:
        raise ScenarioError(f"expected a comma-separated subset of {','.join(MODES)} or a plans YAML file",
                            source="--plans")
    return list(dict.fromkeys(names))


@dataclass
class Comparison:
    """Plans of one fleet, simulated on the same arrivals."""

    scenario: Scenario
    seed: int
    slo: SLO
    loads: list[ModelLoad]
    plans: dict[str, Plan]
    data: dict                    # the scenario's YAML (with overrides), from which each plan's file is made
    wall_seconds: float = 0.0

    @property
    def best(self) -> str | None:
        """The cheapest plan that meets the SLO (None if none does)."""
        ok = [(cost_per_hour(p.result.summary), n) for n, p in self.plans.items() if p.result is not None and p.slo_met]
        return min(ok)[1] if ok else None

    def plan_block(self, plan: Plan) -> dict[str, Any]:
        """compare.json's block of a plan: the overall figures (M) plus cost per hour,
        packing and utilisation figures and each endpoint's block."""
        s = plan.result.summary
        out = dict(s["overall"])
        out["cost_per_hour_usd"] = cost_per_hour(s)
        out["mode"] = plan.mode
        out["slo_met"] = plan.slo_met
        out["instances"] = fleet(plan.result)
        out.update(utilisation(plan.result))
        out.update(device_figures(plan.result))
        out["description"] = plan.description
        out["notes"] = list(plan.notes)
        out["sizing"] = list(plan.sizing)
        out["scenario_file"] = f"plans/{plan_file_name(plan.name)}"
        out["run_dir"] = f"runs/{safe_name(plan.name, 'plan')}"
        out["endpoints"] = s["endpoints"]
        out["warnings"] = s.get("warnings", [])
        if "autoscaling" in plan.state:   # an autoscaled plan: per endpoint min, max, metric, target
            out["autoscaling"] = plan.state["autoscaling"]
            out["fixed_plan"] = plan.state["fixed_plan"]
        return out

    @property
    def summary(self) -> dict[str, Any]:
        """compare.json: ``{"plans": {name: M + cost_per_hour_usd + ...}, ...}``."""
        plans = {n: self.plan_block(p) for n, p in self.plans.items() if p.result is not None}
        skipped = {n: p.error for n, p in self.plans.items() if p.result is None}
        first = next((p.result.summary for p in self.plans.values() if p.result is not None), None)
        return {
            "scenario": self.scenario.name,
            "seed": self.seed,
            "simulated_seconds": first["simulated_seconds"] if first else self.scenario.spec.duration,
            "warmup_seconds": self.scenario.spec.warmup,
            "wall_seconds": self.wall_seconds,
            "slo": self.slo.targets_ms and {f"{k}_ms": v for k, v in self.slo.targets_ms.items()},
            "best": self.best,
            "fleet": {"models": len(self.loads), "rate_per_s": float(sum(lm.rate for lm in self.loads)),
                      "peak_rate_per_s": float(sum(lm.peak_rate for lm in self.loads))},
            "plans": plans,
            "skipped": skipped,
        }

    def table(self) -> pd.DataFrame:
        """One row per plan, the figures to compare side by side."""
        rows = []
        for n, p in self.plans.items():
            if p.result is None:
                rows.append({"plan": n, "mode": p.mode, "note": p.error})
                continue
            b = self.plan_block(p)
            rows.append({"plan": n, "mode": p.mode,
                         "instances": ", ".join(f"{k} x {v}" for k, v in b["instances"].items()),
                         **{k: b.get(k) for k in TABLE_KEYS}, "note": "; ".join(p.notes)})
        return pd.DataFrame(rows).set_index("plan")

    def save(self, out: str | Path | None = None, *, plots: bool = False) -> Path:
        """Write compare.json, plans/<plan>.yaml (scenarios to edit and re-run) and
        runs/<plan>/ (each plan's summary.json, requests.parquet, timeline.csv), as a unit
        (:func:`sim.output.publish`): no plan of an earlier comparison survives beside these."""
        import json

        import yaml

        from ..output import default_dir, publish, safe_name

        out = Path(out) if out is not None else default_dir(self.scenario.name, "compare")
        runner = Runner(self.scenario, self.data, self.seed, lambda _: None)

        def write(d: Path) -> None:
            (d / "plans").mkdir()
            for n, p in self.plans.items():
                if p.result is None:
                    continue
                fname = plan_file_name(n)
                data = relocate(runner.scenario_data(p), self.scenario, out / "plans")
                notes = ([p.description] if p.description else []) + list(p.notes)
                head = [f"capsim compare: plan {n!r} ({p.mode}) for {self.scenario.name!r}, "
                        f"SLO {self.slo.describe() or 'none'}.", *notes,
                        f"Cost {cost_per_hour(p.result.summary):,.2f} USD/h; SLO met: {p.slo_met}. "
                        f"Edit and re-run: capsim run {out / 'plans' / fname}"]
                atomic_write(d / "plans" / fname, yaml_comment(head)
                             + yaml.safe_dump(data, sort_keys=False, width=110, allow_unicode=True))
                p.result.save(d / "runs" / safe_name(n, "plan"), plots=plots)
            atomic_write(d / "compare.json", json.dumps(self.summary, indent=2, allow_nan=False,
                                                        default=json_default) + "\n")

        return publish(out, write, "compare")


def plan_file_name(name: str) -> str:
    """A plan's file under plans/: its name made safe as a file name (never a path)."""
    from ..output import safe_name

    return safe_name(name, "plan") + ".yaml"


def yaml_comment(lines: Iterable[str]) -> str:
    """Lines as YAML comments: every line break inside a line (a name holding a newline) starts a new
    comment line, so that no text can turn into keys of the file."""
    out = []
    for line in lines:
        for part in str(line).splitlines() or [""]:
            out.append("# " + "".join(ch if ch.isprintable() else " " for ch in part) + "\n")
    return "".join(out)


TABLE_KEYS = ("cost_per_hour_usd", "cost_per_million_usd", "p50_ms", "p99_ms", "ttft_p99_ms", "tpot_p99_ms",
              "slo_attainment", "slo_met", "requests", "failed", "cold_starts", "cache_hit_rate", "gpu_busy_fraction",
              "gpu_utilization", "batch_size_mean", "gpu_memory_utilization", "gpu_stranded_fraction")


def relocate(d: dict, sc: Scenario, where: Path) -> dict:
    """Paths of the scenario (traces, profiles) made relative to the plan file's folder."""
    def fix(p: str) -> str:
        full = (sc.base_dir / p).resolve()
        try:
            return os.path.relpath(full, where.resolve())
        except ValueError:
            return str(full)

    if isinstance(d.get("profile"), str):
        d["profile"] = fix(d["profile"])
    for m in d.get("models", []):
        if not isinstance(m, dict):
            continue
        tr = m.get("traffic")
        if isinstance(tr, dict) and isinstance(tr.get("path"), str):
            tr["path"] = fix(tr["path"])
        svc = m.get("service")
        if isinstance(svc, dict) and isinstance(svc.get("profile"), str):
            svc["profile"] = fix(svc["profile"])
    return d


def compare(scenario: Scenario | str | Path, plans: Sequence[str] | str | Path | None = None, *,
            overrides: Iterable[str] = (), seed: int | None = None, rounds: int = ROUNDS,
            out: str | Path | None = None, progress: Progress | None = None, force: bool = False,
            workers: int | None = None, scheduler: Any = None, slo: Any = None,
            instance_types: Iterable[str] | None = None) -> Comparison:
    """Build, size and simulate one plan per hosting mode (``plans``: a subset of
    ``("sme", "mme", "ic")``, or a plans YAML file of hand-written plans) for the
    fleet and SLO of ``scenario``; with ``out``, also write the comparison there
    (:meth:`Comparison.save`). ``progress(message)`` reports each step. Before any simulation the
    size is estimated (:mod:`sim.volume`: each plan keeps its result, so the requests of every plan,
    and of the one being simulated, at once); one that would not fit in the memory available is
    refused with the estimate unless ``force``. ``workers`` (local processes) or ``scheduler`` (a Dask
    scheduler's address) run the simulations of a sizing round, and the replications, in parallel
    (:mod:`sim.plan.parallel`): the same results as one after the other. ``slo`` (as ``optimize``'s:
    ``"p99=500ms"``, a list or a mapping) replaces the scenario's ``slo`` block; ``instance_types``
    restricts the types the plan builders weigh (hand-written plans keep theirs).

        >>> cmp = sim.compare("scenarios/compare_small_models.yaml")   # doctest: +SKIP
        >>> cmp.table()[["cost_per_hour_usd", "p99_ms", "slo_met"]]     # doctest: +SKIP
    """
    say = progress or (lambda _: None)
    t_start = time.perf_counter()
    if isinstance(scenario, Scenario):
        sc = scenario
        data = sc.spec.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
        data.setdefault("name", sc.name)
        data.setdefault("duration", sc.spec.duration)
    else:
        sc = load_scenario(scenario, overrides)
        data = apply_overrides(read_yaml(scenario), overrides, source=f"{scenario} (--set)")
    if slo is not None:   # --slo replaces the scenario's slo block (the simulations' attainment too)
        data = dict(data, slo=parse_slo(slo, None))
        sc = parse_scenario(data, source=sc.source, base_dir=sc.base_dir)
    seed = sc.spec.seed if seed is None else seed
    slo = SLO.of(sc)
    which = parse_plan_option(plans) if not isinstance(plans, Path) else plans
    if isinstance(which, list) and not slo.targets_ms:
        raise ScenarioError("compare sizes plans to meet the scenario's SLO, and it has none: add for example "
                            "slo: {p99: 1s} (or --set slo.p99=1s)", source=sc.source, path="slo")
    built: dict[str, Plan] = {}
    if isinstance(which, Path):   # read first: a mistake there fails before any work
        for p in read_plans(which):
            p.state["source"] = f"{which} (plan {p.name})"
            built[p.name] = p
    if not force:
        from ..volume import check

        plans_n = len(built) if isinstance(which, Path) else len(which)
        check(sc, replications=sc.spec.replications, copies=plans_n + 1)   # each plan's result, and one more
    say(f"{sc.name}: estimating each model's traffic ({len(sc.models)} models, seed {seed})")
    loads = fleet_load(sc, seed)
    executor = planner_executor(workers, scheduler)
    runner = Runner(sc, data, seed, say, executor)
    types = list(sc.catalog.instance_types.values())
    if instance_types:
        types = [sc.catalog.instance(t) for t in checked_types(instance_types, sc.catalog)]
    groups = [(g.name, [sc.models[m].name for m in g.models]) for g in sc.groups]
    if not isinstance(which, Path):
        for mode in which:
            built[mode] = BUILDERS[mode].build(loads, types, slo.latency_s, groups)
    by_unit = {**{lm.name: lm for lm in loads}, **{f"sme-{lm.name}": lm for lm in loads}}
    reps = sc.spec.replications
    custom, auto = [], []
    for name, p in built.items():
        p.state.setdefault("loads", by_unit)
        if p.error:
            say(f"{name}: not built: {p.error}")
        elif p.mode == "custom":
            say(f"{name}: simulating ({len(p.endpoints)} endpoint(s)"
                + (f", {reps} replications)" if reps > 1 else ")"))
            custom.append(p)
        else:
            fleet = instances(p.endpoints)
            say(f"{name}: {len(p.endpoints)} endpoint(s), estimate {few([f'{v} x {k}' for k, v in fleet.items()])}"
                f" (${fleet_hourly(fleet, sc.catalog):,.2f}/h); simulating")
            auto.append(p)
    # Plans are independent: each round simulates them together (on the executor, when there is one).
    try:
        size_all(auto, runner, slo, rounds)
        # Traffic that varies: each sized fixed plan's autoscaled twin, sized (simulated) in turn.
        twins = autoscaled_plans(auto, loads, sc.catalog, slo.latency_s, sc.horizon - sc.spec.warmup)
        if twins:
            say(f"{few([p.name for p in twins])}: the traffic varies; simulating autoscaled plans")
            size_all(twins, runner, slo, rounds)
            built = {k: v for n, p in built.items()
                     for k, v in [(n, p)] + [(a.name, a) for a in twins if a.state["fixed_plan"] == n]}
            auto += twins
        if reps > 1 and auto:
            # The sizing ran replication 0 only; the figures reported (and so the verdict and the
            # best plan) are those of all the replications.
            say(f"{few([p.name for p in auto])}: {reps} replications of the final sizing")
        final = custom + (auto if reps > 1 else [])
        for p, res in zip(final, runner.simulate_many(final, replications=reps)):
            p.result = res
            judge(p, slo, reps)
    finally:
        if executor is not None:
            executor.close()
    for p in built.values():
        warn = price_warning(ep.instance_type for ep in p.result.scenario.endpoints) if p.result else None
        if warn:
            p.notes.append(warn)
    cmp = Comparison(sc, seed, slo, loads, built, data)
    cmp.wall_seconds = time.perf_counter() - t_start
    if out is not None:
        cmp.save(out)
    return cmp
