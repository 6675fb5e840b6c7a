"""The optimizer's search over the endpoints of a scenario (instance type, count, routing, and where
it changes the cost a per-copy concurrency knob: :mod:`sim.plan.knobs`).

See :mod:`sim.plan.optimize` for the method.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from ..metrics import SLO_LABELS
from ..pricing import hourly
from ..scenario import ScenarioError, apply_overrides, parse_scenario
from ..scenario.schema import ROUTING_POLICIES
from .capacity import MAX_UNITS, instances_needed, mean_wait, wait_tail
from .frontier import OptimizeResult, pareto
from .knobs import Knob, endpoint_knob, promising, values
from .knobs import cap as knob_cap
from .load import execution_model, fleet_load
from .parallel import run_one
from .slo import LATENCY_METRICS, QUANTILE, STALL_FRACTION, check_blocks, moved, summary_key

@dataclass(frozen=True)
class Choice:
    instance_type: str
    instances: int
    routing: str
    knob: int | None = None     # the endpoint's knob (sim.plan.knobs) where searched; None: the scenario's


class EndpointSearch:
    """The search of :func:`sim.plan.optimize.optimize` (see its module docstring) over the sme and
    mme endpoints of one scenario: per endpoint, type and routing candidates pruned by bounds, an
    execution model's capacity guess, gallop and bisect on the count; endpoints one at a time (coordinate descent)."""

    def __init__(self, path: Path, data: dict, base_overrides: list[str], slo: dict[str, float],
                 max_failed: float, replications: int, types: list[str] | None, routings: list[str] | None,
                 min_instances: int, max_instances: int, endpoints: list[str] | None,
                 log: Callable[[str], None], executor: Any = None, knobs: bool = True):
        self.path, self.data, self.base_overrides = path, data, base_overrides
        self.source = str(path)
        self.base_dir = path.resolve().parent
        self.slo, self.max_failed, self.reps = slo, max_failed, replications
        self.latency_slo = {m: v for m, v in slo.items() if m in LATENCY_METRICS}
        self.min_n, self.max_n = min_instances, max_instances
        self.log = log
        self.executor = executor           # runs a plan's replications in parallel (sim.plan.parallel)
        self.notes: list[str] = []
        self.cache: dict[tuple, dict] = {}
        self.rows: list[dict] = []
        self.candidates: list[dict] = []
        self.n_sim = 0
        self._workloads: dict[tuple, Any] = {}
        self._loads: dict[tuple, dict] = {}
        self.stalled: dict[tuple, str] = {}     # (endpoint, type, routing, knob) -> why growing stopped early

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
        # The per-copy concurrency knob of each endpoint whose models charge for concurrency.
        self.knobs: dict[int, Knob] = {}
        if knobs:
            execution = {g.index: execution_model(base, g.index)[0] for g in base.groups}
            for e in self.targets:
                kn, why = endpoint_knob(base, e, execution)
                if kn is not None:
                    self.knobs[e] = kn
                elif why:
                    self.notes.append(why)

    # -- plans ------------------------------------------------------------------
    def _load(self, overrides: list[str]):
        return self._load_data(overrides)[0]

    def _load_data(self, overrides: list[str]) -> tuple[Any, dict]:
        from ..scenario.loader import check_trace_files

        data = apply_overrides(self.data, overrides, source=f"{self.source} (plan)")
        sc = parse_scenario(data, source=self.source, base_dir=self.base_dir)
        check_trace_files(sc)
        return sc, data

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
            if c.knob is not None and e in self.knobs:
                out += self.knobs[e].overrides(c.knob)
        return out

    def price(self, t: str) -> float:
        return hourly(self.base.catalog.instance(t))

    def ep_cost(self, e: int, c: Choice) -> float:
        return c.instances * self.price(c.instance_type) * len(self.rt_names[e])

    def cost(self, state: Mapping[int, Choice]) -> float:
        return float(sum(self.ep_cost(e, state[e]) for e in self.targets))

    def check(self, blocks: list[dict]) -> tuple[bool, dict[str, float], float]:
        return check_blocks(blocks, self.slo, self.max_failed)

    def evaluate(self, state: Mapping[int, Choice], searching: str = "") -> dict:
        """Simulate a plan (once: results are cached); its row of the plans table, or ``error``."""
        ovs = self.overrides(state)
        key = tuple(ovs)
        if key in self.cache:
            return self.cache[key]
        try:
            _, data = self._load_data(self.base_overrides + ovs)
        except ScenarioError as e:
            rec = {"error": str(e)}
            self.cache[key] = rec
            return rec
        # Sized once, before the search; the replications on the executor where there is one.
        s = run_one(data, self.source, self.base_dir, self.reps, self.executor, frames=False)
        self.n_sim += 1
        row: dict[str, Any] = {"simulation": self.n_sim, "searching": searching}
        for e in self.targets:
            name = self.base.spec.endpoints[e].name
            c = state[e]
            row[f"{name}.instance_type"] = c.instance_type
            row[f"{name}.instances"] = c.instances
            row[f"{name}.routing"] = c.routing
            if e in self.knobs:
                row[f"{name}.{self.knobs[e].kind}"] = self.knobs[e].shown(c.knob)
        row["cost_per_hour_usd"] = self.cost(state)
        ov = s["overall"]
        row["cost_usd"] = ov.get("cost_usd")
        for m in self.slo:
            figure = summary_key(m)   # ttft and tpot: their P99
            row[f"{m}_ms"] = ov.get(figure)
            row[f"{m}_ms_ci95"] = ov.get(f"{figure}_ci95", 0.0 if self.reps == 1 else None)
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
        desc = ", ".join(f"{self.base.spec.endpoints[e].name}: {state[e].instances} x {state[e].instance_type}"
                         f" {state[e].routing}{self._knob_text(e, state[e])}" for e in self.targets)
        figs = ", ".join(f"{m} {'-' if row.get(f'{m}_ms') is None else format(row[f'{m}_ms'], ',.0f')} ± "
                         f"{row.get(f'{m}_ms_ci95') or 0.0:,.0f} ms" for m in self.slo)
        self.log(f"simulation {self.n_sim}: {desc}: {figs}, "
                 f"${row['cost_per_hour_usd']:.2f}/h -> {'meets' if row['feasible'] else 'misses'} the SLO")
        return rec

    def _knob_text(self, e: int, c: Choice) -> str:
        kn = self.knobs.get(e)
        return "" if kn is None else f" {kn.kind} {kn.shown(c.knob)}"

    # -- bounds -----------------------------------------------------------------
    def _workload(self, sc, e: int, t: str):
        from ..core.rng import Streams
        from ..workload.build import build_workload

        key = (e, t)   # a calibrated service depends on the GPU of the endpoint that serves it
        if key not in self._workloads:
            self._workloads[key] = build_workload(sc, Streams(sc.spec.seed, 0))
        return self._workloads[key]

    def _fleet_loads(self, sc, e: int, t: str) -> dict:
        """Each model's load as compare sizes it (sim.plan.load.fleet_load), by model index."""
        key = (e, t)
        if key not in self._loads:
            self._loads[key] = {lm.index: lm for lm in fleet_load(sc)}
        return self._loads[key]

    def bounds(self, e: int, t: str, r: str, knob: int | None = None) -> dict:
        """Prune (type, routing) for endpoint ``e`` before simulating: memory fit, service time alone,
        utilisation < 1 (the lowest count) and the guess (Erlang C, or the execution model's estimate).
        ``knob``: the value of the endpoint's knob (sim.plan.knobs) weighed, None for the scenario's own;
        where the endpoint has a knob, ``estimate`` is the execution model's count (not capped at
        --max-instances) and ``knob_cap`` the largest value worth weighing on ``t``."""
        probe = dict(self.state)
        probe[e] = Choice(t, max(self.min_n, 1), r)
        kn = self.knobs.get(e)
        info: dict[str, Any] = {"endpoint": self.base.spec.endpoints[e].name, "instance_type": t, "routing": r}
        if kn is not None:
            info.update(knob=kn.kind, knob_value=knob, value=kn.shown(knob))
        try:
            sc = self._load(self.base_overrides + self.overrides(probe))
        except ScenarioError as err:
            info.update(status="skipped", reason=str(err), problem=err.message)
            return info
        wl = self._workload(sc, e, t)
        horizon = sc.horizon
        rts = [rt for rt in sc.endpoints if rt.spec_index == e]
        n_lo = max(self.min_n, 1)
        guess = n_lo
        estimate = 0
        reasons = []
        all_lms = []
        for rt in rts:
            conc = rt.max_concurrency
            if knob is not None and kn.kind == "max_concurrency":
                conc = int(knob)
            elif knob is not None:        # max_num_seqs: the engine's batch, and the copy's concurrency with it
                conc = int(knob) if kn.explicit_concurrency is None else min(int(knob), kn.explicit_concurrency)
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
                cap = max(1, k) * conc
                per_model = max((float(wl.service[wl.model == m].sum()) / horizon for m in rt.models), default=0.0)
                n_lo = max(n_lo, math.floor(per_model / conc) + 1)
            else:
                cap = rt.copies_per_instance * conc
            lms = [lm for m, lm in self._fleet_loads(sc, e, t).items() if m in set(rt.models)]
            if knob is not None and kn.kind == "max_num_seqs":
                lms = [replace(lm, llm=replace(lm.llm, max_num_seqs=int(knob))) if lm.llm is not None else lm
                       for lm in lms]
            all_lms += lms
            if knob is not None and kn.kind == "max_concurrency" and rt.mode == "sme" and lms:
                # A device of a batching model completes at most max_{j <= conc} j / slowdown(j) requests
                # per mean service time: the utilisation bound of this value.
                n_lo = max(n_lo, math.floor(load / (rt.copies_per_instance * device_erlangs(lms[0].slowdown,
                                                                                            conc))) + 1)
            n_lo = max(n_lo, math.floor(load / cap) + 1)
            # Service time alone against each latency target (TTFT and TPOT are checked by simulation).
            for m, target in self.latency_slo.items():
                s_q = float(np.quantile(svc, QUANTILE[m])) if m in QUANTILE else mean_s
                if s_q > target:
                    reasons.append(f"{rt.name}: the service time alone has {m} {s_q * 1e3:,.0f} ms > "
                                   f"{target * 1e3:,.0f} ms")
            if any(lm.execution != "slots" for lm in lms):
                # Batching or continuous batching: the execution model's estimate (as compare's).
                k = cap // conc if rt.mode == "mme" else 1
                g = instances_needed(lms, rt.instance_type, rt.copies_per_instance, conc,
                                     self.slo.get("p99"), k, self.slo.get("ttft"), self.slo.get("tpot"))
                guess = max(guess, min(g, self.max_n))
                estimate = max(estimate, g)
            else:
                guess = max(guess, self._erlang_guess(rate, mean_s, cap, r, svc, n_lo))
        if reasons:
            info.update(status="pruned", reason="; ".join(reasons))
            return info
        info.update(status="candidate", n_lower=n_lo, guess=max(guess, n_lo),
                    lower_cost_per_hour=self.ep_cost(e, Choice(t, n_lo, r)))
        if kn is not None:
            info["estimate"] = max(estimate, n_lo) if estimate < MAX_UNITS else None
            if knob is None and rts:
                info["knob_cap"] = knob_cap(kn, all_lms, rts[0].instance_type)
        return info

    def knob_bounds(self, e: int, t: str, r: str) -> list[dict]:
        """:meth:`bounds` of (type, routing) at the scenario's knob value and at each value of
        :func:`sim.plan.knobs.values` up to the cap on ``t``; the values whose capacity estimate is not
        among the cheapest (:func:`sim.plan.knobs.promising`) are pruned without simulating."""
        kn = self.knobs[e]
        own = self.bounds(e, t, r)
        if own["status"] != "candidate" or not own.get("knob_cap"):
            return [own]     # the type does not fit, or its service times alone miss: whatever the value
        infos = [own] + [self.bounds(e, t, r, v) for v in values(kn.own, own["knob_cap"]) if v != kn.own]
        unit = self.ep_cost(e, Choice(t, 1, r))
        est = {}
        for i in infos:
            n = i.get("estimate") if i["status"] == "candidate" else None
            i["estimated_cost_per_hour"] = None if n is None or n > self.max_n else n * unit
            cost = i["estimated_cost_per_hour"]
            est[i["knob_value"]] = math.inf if cost is None else cost
        keep = promising(est)
        best = min((v for v in est if v is not None), key=lambda v: (est[v], -v), default=None)
        for i in infos:
            if i["status"] == "candidate" and i["knob_value"] not in keep:
                what = ("no count within --max-instances" if i["estimated_cost_per_hour"] is None else
                        f"{i['estimate']} instances (${i['estimated_cost_per_hour']:.2f}/h)")
                than = (f"against ${est[best]:.2f}/h at {best}: not among the cheapest estimates"
                        if math.isfinite(est[best]) else "as at every value weighed: the scenario's own is simulated")
                i.update(status="pruned", reason=f"the capacity estimate at {kn.kind} {i['value']} is {what}, {than}")
        return infos

    def _erlang_guess(self, rate: float, mean_s: float, cap: int, routing: str, svc: np.ndarray, n_lo: int) -> int:
        cv = float(svc.std() / mean_s) if mean_s > 0 and len(svc) > 1 else 1.0
        for n in range(n_lo, self.max_n + 1):
            fine = True
            for m, target in self.latency_slo.items():
                if routing == "random":   # n independent queues, each with rate / n
                    c, lam = cap, rate / n
                else:                     # one pooled queue
                    c, lam = n * cap, rate
                if m in QUANTILE:
                    q = QUANTILE[m]
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
        """Whether some figure ``before`` missed got better by more than STALL_FRACTION in ``after``
        (:func:`sim.plan.slo.moved`: the rule compare's sizing shares)."""
        return moved(before, after)

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

    def _smallest(self, e: int, t: str, r: str, lo: int, hi: int, guess: int, label: str,
                  knob: int | None = None) -> int | None:
        """The smallest feasible count in [lo, hi] (feasibility is monotone in the count), or None
        (then ``self.stalled[(e, t, r, knob)]`` says why, where growing stopped short of ``hi``)."""
        f = lambda n: bool(self._feasible(e, Choice(t, n, r, knob), label))  # noqa: E731
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
            trail = [(g, self._missed(e, Choice(t, g, r, knob)))]   # what each count tried misses
            while no < hi:             # gallop up, while more instances move what it misses
                n = min(g + step, hi)
                if f(n):
                    yes = n
                    break
                no = n
                step *= 2
                trail.append((n, self._missed(e, Choice(t, n, r, knob))))
                (n0, m0), (n1, m1) = trail[-3] if len(trail) >= 3 else (None, None), trail[-1]
                if m0 and m1 is not None and not self._moved(m0, m1) and no < hi:
                    self.stalled[(e, t, r, knob)] = self._stall_reason((n0, m0), (n1, m1))
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
        kn = self.knobs.get(e)
        for t in self.types[e]:
            for r in self.routings[e]:
                for info in (self.knob_bounds(e, t, r) if kn is not None else [self.bounds(e, t, r)]):
                    self.candidates.append(info)
                    if info["status"] == "candidate":
                        cands.append(info)
                    else:
                        at = "" if kn is None else f" {kn.kind} {info.get('value')}"
                        self.log(f"{name}: {t} {r}{at} {info['status']}: {info['reason']}")
        mine = [i for i in self.candidates if i["endpoint"] == name]
        if mine and all(i["status"] == "skipped" for i in mine):
            reasons = dict.fromkeys(i.get("problem", i["reason"]) for i in mine)
            raise ScenarioError(f"no instance type weighed ({', '.join(self.types[e])}) can serve endpoint {name}: "
                                + "; ".join(list(reasons)[:3]), source=self.source,
                                path=f"endpoints[{e}].instance_type")
        if kn is None:
            cands.sort(key=lambda i: i["lower_cost_per_hour"])   # stable: the given order breaks ties
        else:   # the cheapest estimate first, so that the others are searched below its cost
            # (a type whose knob was not weighed, knob_bounds' first return, has no estimate)
            cands.sort(key=lambda i: (math.inf if i.get("estimated_cost_per_hour") is None else
                                      i["estimated_cost_per_hour"], i["lower_cost_per_hour"]))
        best: tuple[float, Choice] | None = None
        for info in cands:
            t, r, v = info["instance_type"], info["routing"], info.get("knob_value")
            unit = self.ep_cost(e, Choice(t, 1, r))
            lo, hi = info["n_lower"], self.max_n
            if best is not None:
                if info["lower_cost_per_hour"] >= best[0] - 1e-9:
                    info.update(status="pruned",
                                reason=f"its lowest count ({lo}) costs ${info['lower_cost_per_hour']:.2f}/h, "
                                f"no less than the best plan found (${best[0]:.2f}/h)")
                    continue
                hi = min(hi, math.ceil((best[0] - 1e-9) / unit) - 1)
            if lo > hi:
                info.update(status="pruned", reason=f"needs at least {lo} instances (utilisation < 1), more than "
                            f"{'--max-instances' if best is None else 'a plan cheaper than the best'} allows")
                continue
            label = f"{name}:{t}:{r}" + ("" if kn is None else f":{kn.kind}={kn.shown(v)}")
            n = self._smallest(e, t, r, lo, hi, info["guess"], label, v)
            info["found"] = n
            if n is None:
                stalled = self.stalled.get((e, t, r, v))
                if stalled:
                    info.update(status="infeasible", reason=f"no count in [{lo}, {hi}] tried meets the SLO: "
                                f"{stalled}")
                    at = "" if kn is None else f" {kn.kind} {kn.shown(v)}"
                    self.notes.append(f"endpoint {name}: {t} {r}{at}: stopped growing the fleet: {stalled}")
                    self.log(f"{name}: {t} {r}{at}: stopped growing: {stalled}")
                else:
                    info.update(status="infeasible", reason=f"no count in [{lo}, {hi}] meets the SLO")
                continue
            info.update(status="feasible")
            c = Choice(t, n, r, v)
            best = (self.ep_cost(e, c), c)
        if best is not None:
            return best[1], True
        # Nothing meets the SLO: keep the simulated plan of this endpoint with the lowest figure of the first
        # target (its upper end).
        evaluated = [(rec["upper"][e], self.ep_cost(e, st[e]), st[e]) for st, rec in self._states_for(e)
                     if st[e].instance_type in self.types[e]]   # (not the scenario's own type, if not weighed)
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
                kn = self.knobs.get(j)
                v = None if kn is None else row.get(f"{nm}.{kn.kind}")
                c = Choice(row[f"{nm}.instance_type"], row[f"{nm}.instances"], row[f"{nm}.routing"],
                           None if v is None or v == kn.own else int(v))
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
        for e, kn in self.knobs.items():   # the knob's value, where searched
            best_plan[self.base.spec.endpoints[e].name][kn.kind] = kn.shown(self.state[e].knob)
        first = SLO_LABELS.get(summary_key(m0), m0)   # what an infeasible endpoint's plan is chosen by
        for e in self.targets:
            if not feasible[e]:
                sooner = (" (growing stopped sooner where more instances no longer helped)"
                          if any(k[0] == e for k in self.stalled) else "")
                self.notes.append(f"endpoint {self.base.spec.endpoints[e].name}: no plan meets the SLO within "
                                  f"{self.max_n} instances (--max-instances) of {', '.join(self.types[e])}{sooner}; "
                                  f"the plan shown has the lowest {first} simulated")
        return OptimizeResult(
            scenario=self.base.name, slo={m: v * 1e3 for m, v in self.slo.items()}, max_failed=self.max_failed,
            replications=self.reps, best_plan=best_plan, best_overrides=ovs,
            best_summary=None if final is None or "error" in final else final["summary"], best_yaml="",
            feasible=ok, cost_per_hour_usd=self.cost(self.state), frontier=frontier, plans=plans,
            n_simulations=self.n_sim, candidates=self.candidates, notes=self.notes)


def device_erlangs(slowdown: tuple, conc: int) -> float:
    """Requests per mean service time that one device of a batching model completes at most with up to
    ``conc`` requests in service (``slowdown``: the curve's points)."""
    from ..hosting.device import slowdown_table

    f = slowdown_table(dict(slowdown)) if slowdown else (lambda k: 1.0)
    return max(j / f(j) for j in range(1, max(1, conc) + 1))
