"""One fleet, three hosting plans: SME, MME and IC, each sized to meet the SLO.

:func:`compare` takes a scenario's fleet (its models and their traffic) and its
SLO, builds one plan per hosting mode, sizes it, simulates every plan on the
same arrivals and reports them side by side. The scenario's own ``endpoints``
only lend each model its ``max_concurrency`` (1 where none serves it); the
plans replace them.

Sizing, per mode (an estimate, then checked by simulation):

- **SME**: each model on its own endpoint, on the instance type of the catalog
  that serves its traffic at the lowest estimated cost (for a lightly used
  model: the cheapest type that fits it); GPU types only, unless the model has
  ``accelerators: 0``. The instance count comes from a queueing estimate
  (Erlang C on ``copies x max_concurrency`` servers per instance at the
  model's busiest-window rate); an endpoint whose P99 misses the SLO in the
  simulation gets more instances, for a few rounds.
- **MME**: models with at most one accelerator share one multi-model endpoint
  on a single-GPU instance type (GPU MMEs run on single-GPU types); the count
  holds the working set (every model's GPU memory, host memory and artifact,
  times the copies its load needs, against ``memory_fraction`` of the GPU
  memory, host memory above ``host_reserve`` and the disk) with 20% slack, on
  the type where that costs least. Models that need more than one accelerator
  keep SME endpoints inside the MME plan (a hybrid, noted). An endpoint that
  misses the SLO gets more instances.
- **IC**: one ``mode: ic`` endpoint whose components each get the copies of
  the queueing estimate, packed (binpack) on the multi-GPU instance type where
  they need the fewest dollars; components that miss the SLO get more copies
  and the copies are packed again (on whichever type is then cheapest).

Every plan runs with the scenario's seed: capsim's random streams are keyed
by model group, so every plan sees the same arrivals, request sizes and
service times (common random numbers). Plans written by hand (a mapping name
-> list of endpoints, or name -> scenario file whose endpoints are taken) run
as they are, on the same fleet.
"""
from __future__ import annotations

import copy
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from ..api import Result, atomic_write, json_default, run
from ..catalog import InstanceType
from ..output import safe_name
from ..core.rng import Streams
from ..scenario import Scenario, ScenarioError, apply_overrides, load_scenario, parse_scenario, read_yaml
from ..scenario.errors import suggest
from ..scenario.schema import CacheSpec
from ..service import sample_tokens, service_times
from ..workload.build import build_workload, group_weights

MODES = ("sme", "mme", "ic")
ROUNDS = 4                   # simulations per plan at most (sizing rounds)
MME_SLACK = 1.2              # memory headroom over the working set of a multi-model endpoint
ROUTING = "least_outstanding_requests"
TAIL = 0.002                 # queueing estimate: P(wait > SLO - service P99) allowed
MAX_UTILISATION = 0.9        # queueing estimate: busy fraction of the servers at most
PEAK_WINDOW = 300.0          # seconds: the busiest window's rate sizes fixed fleets
# Accelerators that are not GPUs: models need a compiler (Neuron) to run there.
NON_GPU_ACCELERATORS = ("Inferentia2", "Inferentia", "Trainium")

Progress = Callable[[str], None]


# -- the fleet's load ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelLoad:
    """One model's traffic and service, as the sizing sees them."""

    index: int
    name: str
    rate: float            # mean requests per second over the measured horizon
    peak_rate: float       # requests per second in the busiest window (what a fixed fleet must serve)
    mean_s: float          # mean service time on one copy
    p99_s: float           # 99th percentile of the service time
    concurrency: int       # requests one copy serves at once
    memory_gb: float
    host_memory_gb: float
    size_gb: float
    accelerators: int


def fleet_load(sc: Scenario, seed: int | None = None) -> list[ModelLoad]:
    """Each model's rate (from the arrivals a run would see: ``capsim trace``'s),
    busiest-window rate and service-time statistics."""
    seed = sc.spec.seed if seed is None else seed
    streams = Streams(seed)
    wl = build_workload(sc, streams)
    t0, t1 = sc.spec.warmup, sc.horizon
    dur = t1 - t0
    n = len(sc.models)
    win = (wl.arrival >= t0) & (wl.arrival < t1)
    counts = np.bincount(wl.model[win], minlength=n).astype(float)
    rate = counts / dur
    svc_mean = np.full(n, np.nan)
    svc_p99 = np.full(n, np.nan)
    order = np.argsort(wl.model, kind="stable")
    bounds = np.searchsorted(wl.model[order], np.arange(n + 1))
    for m in range(n):
        s = wl.service[order[bounds[m]:bounds[m + 1]]]
        if len(s) >= 50:
            svc_mean[m], svc_p99[m] = float(s.mean()), float(np.percentile(s, 99))
    peak = np.ones(len(sc.groups))
    width = min(PEAK_WINDOW, dur)
    edges = np.arange(t0, t1 + 1e-9, width)
    if len(edges) < 2 or edges[-1] < t1 - 1e-9:
        edges = np.append(edges, t1)
    grp_of = np.array([m.group for m in sc.models])
    arr_grp = grp_of[wl.model[win]] if len(wl.model) else np.empty(0, int)
    for g in sc.groups:
        tr = g.traffic
        if tr is None:
            continue
        if tr.process == "closed":
            # Closed loop: at most ``users`` requests in flight; without queueing each user
            # sends one request per (think time + service time).
            rng = streams.get("compare-estimate", g.name)
            spec = sc.spec.models[g.index]
            k = 4096
            tin = sample_tokens(rng, spec.tokens.input, k) if spec.tokens else None
            tout = sample_tokens(rng, spec.tokens.output, k) if spec.tokens else None
            s = service_times(rng, g.service, tin, tout, k)
            total = tr.users / (tr.think_time + float(s.mean()))
            for local, m in enumerate(g.models):
                rate[m] = total * group_weights(g)[local]
                svc_mean[m], svc_p99[m] = float(s.mean()), float(np.percentile(s, 99))
            continue
        t = wl.arrival[win][arr_grp == g.index]
        if len(t) == 0:
            continue
        per_bin = np.histogram(t, bins=edges)[0] / np.diff(edges)
        w = np.diff(edges)
        mean = len(t) / dur
        # The busiest window, less one Poisson standard deviation, so noise alone does not inflate it.
        k = int(np.argmax(per_bin))
        busiest = max(per_bin[k] - math.sqrt(per_bin[k] * w[k]) / w[k], mean)
        peak[g.index] = busiest / mean if mean > 0 else 1.0
    conc = served_concurrency(sc)
    out = []
    for m, mod in enumerate(sc.models):
        mean_s, p99_s = svc_mean[m], svc_p99[m]
        if not np.isfinite(mean_s):
            mean_s, p99_s = _spec_service(sc, mod.group)
        # A server that slows under sustained load (throttling) is sized at that speed; one that
        # speeds up is sized at rest and its spare capacity is left to the simulation.
        svc = sc.groups[mod.group].service
        sus = svc.sustained if svc is not None else None
        if sus is not None and sus.factor > 1:
            mean_s, p99_s = mean_s * sus.factor, p99_s * sus.factor
        out.append(ModelLoad(m, mod.name, float(rate[m]), float(rate[m] * peak[mod.group]), float(mean_s),
                             float(p99_s), conc.get(m, 1), mod.memory_gb, mod.host_memory_gb, mod.size_gb,
                             mod.accelerators))
    return out


def _spec_service(sc: Scenario, group: int) -> tuple[float, float]:
    """Mean and P99 of a group's service time, from draws of its service model."""
    g = sc.groups[group]
    spec = sc.spec.models[group]
    rng = Streams(sc.spec.seed).get("compare-estimate", g.name)
    k = 4096
    tin = sample_tokens(rng, spec.tokens.input, k) if spec.tokens else np.zeros(k, np.int64)
    tout = sample_tokens(rng, spec.tokens.output, k) if spec.tokens else np.zeros(k, np.int64)
    s = service_times(rng, g.service, tin, tout, k)
    return float(s.mean()), float(np.percentile(s, 99))


def served_concurrency(sc: Scenario) -> dict[int, int]:
    """Each model's ``max_concurrency`` on the endpoint that serves it in the scenario."""
    out: dict[int, int] = {}
    for ep in sc.endpoints:
        if ep.components:
            for c in ep.components:
                out[c.model] = c.max_concurrency
        else:
            for m in ep.models:
                out[m] = ep.max_concurrency
    return out


# -- queueing estimate -----------------------------------------------------------------------------------------------
def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/``servers`` queue offered ``load`` Erlangs."""
    if load <= 0:
        return 0.0
    if servers <= load:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):   # Erlang B by its stable recursion
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1.0 - b))


def units_needed(rate: float, mean_s: float, p99_s: float, slo_s: float | None, slots: int) -> int:
    """Units (instances, or copies) of ``slots`` servers each that serve ``rate`` requests
    per second of mean service ``mean_s`` with waits short enough for the SLO:
    offered load ``rate x mean_s / (units x slots)`` at most MAX_UTILISATION, and
    (M/M/c, pooled by least-outstanding-requests routing) the chance of waiting
    longer than ``slo - service P99`` at most TAIL."""
    if rate <= 0 or mean_s <= 0:
        return 1
    a = rate * mean_s
    mu = 1.0 / mean_s
    budget = max((slo_s - p99_s) if slo_s is not None else 10 * mean_s, 0.0)
    u = max(1, math.ceil(a / (slots * MAX_UTILISATION)))
    while u < 100_000:
        n = u * slots
        if n > a and erlang_c(n, a) * math.exp(-(n * mu - rate) * budget) <= TAIL:
            return u
        u += 1
    return u


# -- plans -----------------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """One hosting plan: its endpoints, its sizing log and its simulated result."""

    name: str
    mode: str                               # sme | mme | ic | custom
    endpoints: list[dict] = field(default_factory=list)
    instance_types: list[dict] = field(default_factory=list)   # a hand plan's additions to the catalog
    description: str = ""
    notes: list[str] = field(default_factory=list)
    sizing: list[dict] = field(default_factory=list)           # one row per simulation
    result: Result | None = None
    slo_met: bool | None = None
    error: str | None = None                # why the plan could not be built (then nothing ran)
    state: dict = field(default_factory=dict, repr=False)      # what the sizing grows (ic: loads and copies)

    @property
    def feasible(self) -> bool:
        return self.error is None


def _gpu_types(types: Iterable[InstanceType]) -> list[InstanceType]:
    return [t for t in types if t.gpus > 0 and t.gpu not in NON_GPU_ACCELERATORS]


def _fits_sme(lm: ModelLoad, it: InstanceType) -> int:
    """Copies of the model one instance of ``it`` holds as an SME (0: it does not fit)."""
    if it.gpus > 0 and lm.accelerators > 0:
        if lm.accelerators > it.gpus or lm.memory_gb > lm.accelerators * it.gpu_memory_gb + 1e-9:
            return 0
        copies = it.gpus // lm.accelerators
        host = copies * lm.host_memory_gb
    else:
        copies, host = 1, lm.memory_gb + lm.host_memory_gb
    return copies if host <= it.memory_gb + 1e-9 and lm.size_gb <= it.storage_gb + 1e-9 else 0


def _literal(name: str) -> str:
    """A model name as an endpoint's ``models`` pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _sme_endpoint(lm: ModelLoad, it: InstanceType, n: int, name: str | None = None) -> dict:
    return {"name": name or lm.name, "mode": "sme", "instance_type": it.name, "instances": int(n),
            "routing": ROUTING, "max_concurrency": lm.concurrency, "models": [_literal(lm.name)]}


def _size_sme(lm: ModelLoad, types: Sequence[InstanceType], slo_s: float | None) -> tuple[InstanceType, int] | None:
    """The instance type and count that serve one model at the lowest estimated cost."""
    cands = types if lm.accelerators == 0 else _gpu_types(types)
    best = None
    for it in cands:
        copies = _fits_sme(lm, it)
        if not copies:
            continue
        n = units_needed(lm.peak_rate, lm.mean_s, lm.p99_s, slo_s, copies * lm.concurrency)
        key = (n * it.price_per_hour, it.price_per_hour, it.name)
        if best is None or key < best[0]:
            best = (key, it, n)
    return None if best is None else (best[1], best[2])


def build_sme(loads: Sequence[ModelLoad], types: Sequence[InstanceType], slo_s: float | None) -> Plan:
    plan = Plan("sme", "sme")
    for lm in loads:
        got = _size_sme(lm, types, slo_s)
        if got is None:
            plan.error = (f"model {lm.name!r} ({lm.memory_gb:g} GB, {lm.accelerators} accelerator(s)) fits no "
                          "instance type of the catalog")
            return plan
        plan.endpoints.append(_sme_endpoint(lm, *got))
    plan.description = "one endpoint per model, on the instance type that serves it at the lowest estimated cost"
    return plan


def _mme_fits(lm: ModelLoad, it: InstanceType, cache: CacheSpec) -> bool:
    gpu, host = (lm.memory_gb, lm.host_memory_gb) if it.gpus > 0 else (0.0, lm.memory_gb + lm.host_memory_gb)
    return (gpu <= it.total_gpu_memory_gb * cache.memory_fraction + 1e-9
            and host <= it.memory_gb - cache.host_reserve + 1e-9 and lm.size_gb <= it.storage_gb + 1e-9)


def _mme_count(loads: Sequence[ModelLoad], it: InstanceType, cache: CacheSpec, slo_s: float | None,
               conc: int) -> int:
    """Instances of ``it`` that hold every model's copies (of ``conc`` requests at once
    each) with MME_SLACK headroom."""
    copies = [units_needed(lm.peak_rate, lm.mean_s, lm.p99_s, slo_s, conc) for lm in loads]
    on_gpu = it.gpus > 0
    gpu = sum(c * lm.memory_gb for c, lm in zip(copies, loads)) if on_gpu else 0.0
    host = sum(c * (lm.host_memory_gb + (0.0 if on_gpu else lm.memory_gb)) for c, lm in zip(copies, loads))
    disk = sum(c * lm.size_gb for c, lm in zip(copies, loads))
    n = max(copies)
    for used, cap in ((gpu, it.total_gpu_memory_gb * cache.memory_fraction),
                      (host, it.memory_gb - cache.host_reserve), (disk, it.storage_gb)):
        if used > 0 and cap > 0:
            n = max(n, math.ceil(used * MME_SLACK / cap - 1e-9))
    return n


def _patterns(names: Sequence[str], all_names: Sequence[str], groups: Sequence[tuple[str, list[str]]]) -> list[str]:
    """Patterns that match exactly ``names`` among ``all_names``: a model group's glob
    (``embed-{i:03d}`` -> ``embed-*``) where it matches just that group, else each name."""
    import fnmatch

    want = set(names)
    out, done = [], set()
    for pattern, members in groups:
        glob = re.sub(r"\{[^}]*\}", "*", pattern)
        if len(members) > 1 and set(members) <= want and glob != pattern \
                and {n for n in all_names if fnmatch.fnmatchcase(n, glob)} == set(members):
            out.append(glob)
            done |= set(members)
    return out + [_literal(n) for n in names if n not in done]


def build_mme(loads: Sequence[ModelLoad], types: Sequence[InstanceType], slo_s: float | None,
              groups: Sequence[tuple[str, list[str]]] = ()) -> Plan:
    plan = Plan("mme", "mme")
    cache = CacheSpec()
    shared = [lm for lm in loads if lm.accelerators <= 1]
    alone = [lm for lm in loads if lm.accelerators > 1]
    if not shared:
        plan.error = ("every model needs more than one accelerator; GPU multi-model endpoints run on single-GPU "
                      "instance types")
        return plan
    if all(lm.accelerators == 0 for lm in shared):
        cands = [t for t in types if t.gpus <= 1 and t.gpu not in NON_GPU_ACCELERATORS]
    else:
        cands = [t for t in _gpu_types(types) if t.gpus == 1]
    conc = max(lm.concurrency for lm in shared)
    best = None
    for it in cands:
        if all(_mme_fits(lm, it, cache) for lm in shared):
            n = _mme_count(shared, it, cache, slo_s, conc)
            key = (n * it.price_per_hour, it.price_per_hour, it.name)
            if best is None or key < best[0]:
                best = (key, it, n)
    if best is None:
        big = max(shared, key=lambda lm: lm.memory_gb)
        most = max((t.total_gpu_memory_gb for t in cands), default=0.0)
        plan.error = (f"no single-GPU instance type holds model {big.name!r} ({big.memory_gb:g} GB) in "
                      f"{cache.memory_fraction:g} of its GPU memory (the largest has {most:g} GB); GPU "
                      "multi-model endpoints run on single-GPU instance types")
        return plan
    _, it, n = best
    plan.description = "one multi-model endpoint on the single-GPU type that holds the working set at the lowest cost"
    plan.endpoints.append({"name": "mme", "mode": "mme", "instance_type": it.name, "instances": int(n),
                           "routing": ROUTING, "max_concurrency": conc,
                           "models": _patterns([lm.name for lm in shared], [lm.name for lm in loads], groups)})
    if len({lm.concurrency for lm in shared}) > 1:
        plan.notes.append(f"an MME has one max_concurrency for all its models: {conc}, the largest of theirs")
    for lm in alone:
        got = _size_sme(lm, types, slo_s)
        if got is None:
            plan.error = f"model {lm.name!r} fits no instance type of the catalog"
            return plan
        plan.endpoints.append(_sme_endpoint(lm, *got, name=f"sme-{lm.name}"))
    if alone:
        plan.notes.append(f"{len(alone)} model(s) that need more than one GPU keep their own SME endpoint "
                          "(GPU MMEs run on single-GPU instance types)")
    return plan


def _ic_candidates(loads: Sequence[ModelLoad], types: Sequence[InstanceType]) -> list[InstanceType]:
    """Instance types on which every model's copy fits as a component: multi-GPU types
    (CPU types too when no model needs an accelerator)."""
    cands = [t for t in _gpu_types(types) if t.gpus >= 2]
    if all(lm.accelerators == 0 for lm in loads):
        cands += [t for t in types if t.gpus == 0]
    out = []
    for it in cands:
        ok = True
        for lm in loads:
            acc = max(lm.accelerators, 1) if it.gpus > 0 else 0
            if it.gpus > 0 and (acc > it.gpus or lm.memory_gb > acc * it.gpu_memory_gb + 1e-9):
                ok = False
            if max(lm.memory_gb, 0.128) > it.memory_gb + 1e-9 or lm.size_gb > it.storage_gb + 1e-9:
                ok = False
        if ok:
            out.append(it)
    return out


def _ic_pack(loads: Sequence[ModelLoad], copies: Sequence[int], it: InstanceType) -> int:
    from ..hosting.placement import pack

    needs, comps = [], []
    for k, (lm, c) in enumerate(zip(loads, copies)):
        acc = max(lm.accelerators, 1) if it.gpus > 0 else 0
        needs += [(acc, max(lm.memory_gb, 0.128), 1.0)] * c
        comps += [k] * c
    bins, left = pack(needs, (it.gpus, it.memory_gb, float(it.vcpus)), "binpack", comps)
    return len(bins) if not left else 10**9


def _ic_choose(loads, copies, cands) -> tuple[InstanceType, int]:
    best = None
    for it in cands:
        n = _ic_pack(loads, copies, it)
        key = (n * it.price_per_hour, it.price_per_hour, it.name)
        if best is None or key < best[0]:
            best = (key, it, n)
    return best[1], best[2]


def _ic_endpoint(loads, copies, it: InstanceType, n: int) -> dict:
    comps = []
    for lm, c in zip(loads, copies):
        comp = {"model": _literal(lm.name), "copies": int(c), "max_concurrency": lm.concurrency}
        acc = max(lm.accelerators, 1) if it.gpus > 0 else 0
        if acc != lm.accelerators:
            comp["accelerators"] = acc
        comps.append(comp)
    return {"name": "ic", "mode": "ic", "instance_type": it.name, "instances": int(n), "placement": "binpack",
            "routing": ROUTING, "components": comps}


def build_ic(loads: Sequence[ModelLoad], types: Sequence[InstanceType], slo_s: float | None) -> Plan:
    plan = Plan("ic", "ic")
    cands = _ic_candidates(loads, types)
    if not cands:
        plan.error = "no multi-GPU instance type of the catalog holds a copy of every model"
        return plan
    copies = [units_needed(lm.peak_rate, lm.mean_s, lm.p99_s, slo_s, lm.concurrency) for lm in loads]
    it, n = _ic_choose(loads, copies, cands)
    plan.endpoints.append(_ic_endpoint(loads, copies, it, n))
    plan.state.update(ic_loads=list(loads), copies=copies, types=cands)
    plan.description = ("one inference-component endpoint, copies packed (binpack) on the multi-GPU type where "
                        "they cost least")
    return plan


# -- running and growing ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SLO:
    targets_ms: dict[str, float]           # p50/p90/p99/mean -> ms

    @classmethod
    def of(cls, sc: Scenario) -> "SLO":
        s = sc.spec.slo
        t = {} if s is None else {k: getattr(s, k) * 1e3 for k in ("p50", "p90", "p99", "mean")
                                  if getattr(s, k) is not None}
        return cls(t)

    @property
    def latency_s(self) -> float | None:
        v = self.targets_ms.get("p99", min(self.targets_ms.values()) if self.targets_ms else None)
        return None if v is None else v / 1e3

    def met(self, block: dict) -> bool:
        """Whether a summary block meets every target; failed requests count as misses."""
        if block.get("requests", 0) == 0:
            return True
        for k, target in self.targets_ms.items():
            v = block.get(f"{k}_ms")
            if v is None or v > target + 1e-9:
                return False
        finished = block["requests"] - block.get("in_flight", 0)
        if "p99" in self.targets_ms and block.get("slo_attainment") is not None:
            return block["slo_attainment"] >= 0.99 - 1e-9
        return finished <= 0 or block.get("failed", 0) <= 0.01 * finished

    def describe(self) -> str:
        return ", ".join(f"{k} <= {_ms(v)}" for k, v in self.targets_ms.items())


def _ms(v: float) -> str:
    return f"{v / 1e3:g}s" if v >= 1000 else f"{v:g}ms"


class _Runner:
    def __init__(self, sc: Scenario, data: dict, seed: int, progress: Progress):
        self.sc, self.data, self.seed, self.progress = sc, data, seed, progress

    def scenario_data(self, plan: Plan) -> dict:
        d = copy.deepcopy(self.data)
        d["name"] = f"{self.sc.name}-{plan.name}"
        d["endpoints"] = copy.deepcopy(plan.endpoints)
        if plan.instance_types:
            own = {t["name"] for t in plan.instance_types if isinstance(t, dict) and "name" in t}
            d["instance_types"] = [t for t in d.get("instance_types", []) if t.get("name") not in own] \
                + copy.deepcopy(plan.instance_types)
        return d

    def simulate(self, plan: Plan, replications: int = 1) -> Result:
        source = plan.state.get("source", f"{self.sc.source} (plan {plan.name})")
        sc = parse_scenario(self.scenario_data(plan), source=source, base_dir=self.sc.base_dir)
        t = time.perf_counter()
        res = run(sc, seed=self.seed, replications=replications, force=True)   # sized before the first plan
        o = res.summary["overall"]
        cph = cost_per_hour(res.summary)
        self.progress(f"{plan.name}: ${cph:,.2f}/h, P99 {_fmt_ms(o['p99_ms'])}, "
                      f"{o['failed']} failed ({time.perf_counter() - t:.1f} s)")
        return res


def _fmt_ms(v) -> str:
    return "-" if v is None else f"{v:,.0f} ms"


def cost_per_hour(summary: dict) -> float:
    return summary["overall"]["cost_usd"] / summary["simulated_seconds"] * 3600.0


def _grow(n: int) -> int:
    return max(n + 1, math.ceil(n * 1.25))


def _size(plan: Plan, runner: _Runner, slo: SLO, rounds: int) -> None:
    """Simulate the plan; while its overall figures miss the SLO, grow what missed it
    (endpoints' instances, or components' copies), for at most ``rounds`` simulations."""
    limit = slo.latency_s
    loads: dict[str, ModelLoad] = plan.state["loads"]
    for r in range(rounds):
        res = runner.simulate(plan)
        plan.result = res
        s = res.summary
        ok = slo.met(s["overall"]) if slo.targets_ms else None
        plan.sizing.append({"round": r + 1, "cost_per_hour_usd": cost_per_hour(s), "p99_ms": s["overall"]["p99_ms"],
                            "slo_attainment": s["overall"]["slo_attainment"], "slo_met": ok,
                            "instances": _instances(plan.endpoints)})
        plan.slo_met = ok
        if ok is not False or r == rounds - 1:
            break
        # What can grow: an endpoint or a component, unless its service time alone misses the SLO.
        if plan.mode == "ic":
            units = [(lm.name, s["models"][lm.name]) for lm in plan.state["ic_loads"]]
        else:
            units = [(ep["name"], s["endpoints"][ep["name"]]) for ep in plan.endpoints]
        hopeless = {n for n, _ in units if n in loads and limit is not None and loads[n].p99_s >= limit}
        growable = [(n, b) for n, b in units if n not in hopeless]
        if not growable:
            plan.notes.append("the service times alone miss the SLO: more capacity cannot meet it")
            break
        missed = [n for n, b in growable if not slo.met(b)]
        if not missed:   # the total misses although each part meets it: grow the part that fares worst
            missed = [min(growable, key=lambda x: (x[1].get("slo_attainment") or 0.0))[0]]
        if plan.mode == "ic":
            copies = plan.state["copies"]
            for k, lm in enumerate(plan.state["ic_loads"]):
                if lm.name in missed:
                    copies[k] = _grow(copies[k])
            it, n = _ic_choose(plan.state["ic_loads"], copies, plan.state["types"])
            plan.endpoints[0] = _ic_endpoint(plan.state["ic_loads"], copies, it, n)
            runner.progress(f"{plan.name}: SLO missed; more copies of {_few(missed)} ({n} x {it.name})")
        else:
            for ep in plan.endpoints:
                if ep["name"] in missed:
                    ep["instances"] = _grow(ep["instances"])
            runner.progress(f"{plan.name}: SLO missed; more instances for {_few(missed)}")
    if plan.slo_met is False:
        plan.notes.append(f"misses the SLO after {len(plan.sizing)} simulation(s); the last sizing is kept")


def _judge(plan: Plan, slo: SLO, replications: int) -> None:
    """The plan's verdict from its (final) result, logged as a row of its sizing."""
    s = plan.result.summary
    ok = slo.met(s["overall"]) if slo.targets_ms else None
    plan.sizing.append({"round": len(plan.sizing) + 1, "replications": replications,
                        "cost_per_hour_usd": cost_per_hour(s), "p99_ms": s["overall"]["p99_ms"],
                        "slo_attainment": s["overall"]["slo_attainment"], "slo_met": ok,
                        "instances": _instances(plan.endpoints)})
    if replications > 1 and plan.slo_met is not None and ok != plan.slo_met:
        plan.notes.append(f"over {replications} replications the plan {'meets' if ok else 'misses'} the SLO "
                          f"(replication 0 alone: {'met' if plan.slo_met else 'missed'} it)")
    plan.slo_met = ok


def _few(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _fleet(res: Result) -> dict[str, float]:
    """Instances in service by type over the measured horizon, as simulated (the mean, where
    autoscaling or managed instance scaling moved it; replication 0's figures with replications)."""
    s = (res.replication_summaries or [res.summary])[0]
    out: dict[str, float] = {}
    for ep in res.scenario.endpoints:
        out[ep.instance_type.name] = out.get(ep.instance_type.name, 0.0) + s["endpoints"][ep.name]["instances_mean"]
    return {k: (int(round(v)) if abs(v - round(v)) < 1e-9 else round(v, 2)) for k, v in out.items()}


def _instances(endpoints: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ep in endpoints:
        n = ep.get("instances", 1)
        if isinstance(n, dict):
            n = n.get("initial", n.get("min", 1))
        out[ep["instance_type"]] = out.get(ep["instance_type"], 0) + int(n)
    return out


# -- hand-written plans ----------------------------------------------------------------------------------------------
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


# -- the comparison --------------------------------------------------------------------------------------------------
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
        out["instances"] = _fleet(plan.result)
        out.update(utilisation(plan.result))
        out["description"] = plan.description
        out["notes"] = list(plan.notes)
        out["sizing"] = list(plan.sizing)
        out["scenario_file"] = f"plans/{plan_file_name(plan.name)}"
        out["run_dir"] = f"runs/{safe_name(plan.name, 'plan')}"
        out["endpoints"] = s["endpoints"]
        out["warnings"] = s.get("warnings", [])
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
        runner = _Runner(self.scenario, self.data, self.seed, lambda _: None)

        def write(d: Path) -> None:
            (d / "plans").mkdir()
            for n, p in self.plans.items():
                if p.result is None:
                    continue
                fname = plan_file_name(n)
                data = _relocate(runner.scenario_data(p), self.scenario, out / "plans")
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


TABLE_KEYS = ("cost_per_hour_usd", "cost_per_million_usd", "p50_ms", "p99_ms", "slo_attainment", "slo_met",
              "requests", "failed", "cold_starts", "cache_hit_rate", "gpu_busy_fraction", "gpu_memory_utilization",
              "gpu_stranded_fraction")


def utilisation(res: Result) -> dict[str, float | None]:
    """GPU figures of a run over the measured horizon, over the GPUs of the instances in service:

    ``gpu_busy_fraction``: service seconds x the copy's accelerators / its max_concurrency
    (a copy's GPUs are busy while it serves; concurrent requests share them);
    ``gpu_memory_utilization``: share of GPU memory holding models (CloudWatch's
    GPUMemoryUtilization, averaged); ``gpu_stranded_fraction``: share of GPUs no
    copy reserves (inference components) or no copy can use (an SME whose model's
    accelerators do not divide the instance's GPUs)."""
    sc = res.scenario
    s = res.summary
    dur = s["simulated_seconds"]
    acc = np.zeros(len(sc.models))
    conc = np.ones(len(sc.models))
    gpu_s = mem_w = mem_used = stranded = 0.0
    for ep in sc.endpoints:
        it = ep.instance_type
        b = s["endpoints"][ep.name]
        g_s = b["instances_mean"] * dur * it.gpus
        gpu_s += g_s
        util = b.get("cloudwatch", {}).get("GPUMemoryUtilization")
        if util is not None and g_s > 0:
            mem_w += g_s
            mem_used += g_s * util / 100.0
        if ep.components:
            for c in ep.components:
                acc[c.model], conc[c.model] = c.accelerators, c.max_concurrency
            if b.get("gpu_stranded_fraction") is not None:
                stranded += g_s * b["gpu_stranded_fraction"]
        else:
            for m in ep.models:
                a = sc.models[m].accelerators if it.gpus > 0 else 0
                acc[m], conc[m] = (1 if ep.mode == "mme" and it.gpus > 0 else a), ep.max_concurrency
            if ep.mode == "sme" and it.gpus > 0 and g_s > 0:
                used = ep.copies_per_instance * max(sc.models[ep.models[0]].accelerators, 1)
                stranded += g_s * max(it.gpus - used, 0) / it.gpus
    req = res.requests
    if "replication" in req.columns:
        req = req[req["replication"] == 0]
    warm = sc.spec.warmup
    sel = (req["status"] == "ok").to_numpy() & (req["arrival_s"] >= warm).to_numpy() \
        & (req["arrival_s"] < sc.horizon).to_numpy()
    codes = req["model"].cat.codes.to_numpy()[sel]
    busy = float((req["service_ms"].to_numpy()[sel] / 1e3 * acc[codes] / conc[codes]).sum())
    return {"gpu_busy_fraction": busy / gpu_s if gpu_s > 0 else None,
            "gpu_memory_utilization": mem_used / mem_w if mem_w > 0 else None,
            "gpu_stranded_fraction": stranded / gpu_s if gpu_s > 0 else None,
            "gpus_mean": gpu_s / dur if dur > 0 else None}


def _relocate(d: dict, sc: Scenario, where: Path) -> dict:
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


BUILDERS = {"sme": build_sme, "mme": build_mme, "ic": build_ic}


def compare(scenario: Scenario | str | Path, plans: Sequence[str] | str | Path | None = None, *,
            overrides: Iterable[str] = (), seed: int | None = None, rounds: int = ROUNDS,
            out: str | Path | None = None, progress: Progress | None = None, force: bool = False) -> Comparison:
    """Build, size and simulate one plan per hosting mode (``plans``: a subset of
    ``("sme", "mme", "ic")``, or a plans YAML file of hand-written plans) for the
    fleet and SLO of ``scenario``; with ``out``, also write the comparison there
    (:meth:`Comparison.save`). ``progress(message)`` reports each step. Before any simulation the
    size is estimated (:mod:`sim.volume`: each plan keeps its result, so the requests of every plan,
    and of the one being simulated, at once); one that would not fit in the memory available is
    refused with the estimate unless ``force``.

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
    runner = _Runner(sc, data, seed, say)
    types = list(sc.catalog.instance_types.values())
    groups = [(g.name, [sc.models[m].name for m in g.models]) for g in sc.groups]
    if not isinstance(which, Path):
        for mode in which:
            built[mode] = (build_mme(loads, types, slo.latency_s, groups) if mode == "mme"
                           else BUILDERS[mode](loads, types, slo.latency_s))
    by_unit = {**{lm.name: lm for lm in loads}, **{f"sme-{lm.name}": lm for lm in loads}}
    for name, p in built.items():
        p.state.setdefault("loads", by_unit)
        if p.error:
            say(f"{name}: not built: {p.error}")
            continue
        reps = sc.spec.replications
        if p.mode == "custom":
            say(f"{name}: simulating ({len(p.endpoints)} endpoint(s)"
                + (f", {reps} replications)" if reps > 1 else ")"))
            p.result = runner.simulate(p, replications=reps)
            _judge(p, slo, reps)
        else:
            fleet = _instances(p.endpoints)
            est = sum(sc.catalog.instance(t).price_per_hour * n for t, n in fleet.items())
            say(f"{name}: {len(p.endpoints)} endpoint(s), estimate {_few([f'{v} x {k}' for k, v in fleet.items()])}"
                f" (${est:,.2f}/h); simulating")
            _size(p, runner, slo, rounds)
            if reps > 1:
                # The sizing ran replication 0 only; the figures reported (and so the verdict and the
                # best plan) are those of all the replications.
                say(f"{name}: {reps} replications of the final sizing")
                p.result = runner.simulate(p, replications=reps)
                _judge(p, slo, reps)
    cmp = Comparison(sc, seed, slo, loads, built, data)
    cmp.wall_seconds = time.perf_counter() - t_start
    if out is not None:
        cmp.save(out)
    return cmp
