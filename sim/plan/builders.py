"""Plan builders: one per hosting mode, one signature, used through :data:`BUILDERS`.

``BUILDERS[mode].build(loads, types, slo_s, groups)`` gives a :class:`Plan` (its endpoints as a
scenario's, sized by the capacity estimate of each model's execution model, :mod:`sim.plan.capacity`);
``BUILDERS[mode].grow(plan, missed)`` adds capacity to the parts of a plan that missed the SLO in a
simulation (:mod:`sim.plan.sizing` calls it). Model fit on an instance type: :mod:`sim.scenario.fit`.

- **sme**: each model on its own endpoint, on the type that serves its traffic at the lowest
  estimated cost (GPU types only, unless the model has ``accelerators: 0``); grows instances.
- **mme**: models with at most one accelerator share one multi-model endpoint on a single-GPU
  type sized to hold the working set with MME_SLACK headroom; multi-GPU models keep SMEs (a
  hybrid, noted); grows instances.
- **ic**: one inference-component endpoint, copies packed (binpack) on the GPU type (single- or
  multi-GPU: inference components run on both) where they need the fewest dollars; grows the copies
  that missed and packs them again.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

from ..api import Result
from ..catalog import InstanceType
from ..pricing import hourly
from ..scenario.fit import IC_MIN_MEMORY_GB, disk_problem, ic_accelerators, ic_problem, mme_problem, sme_copies
from ..scenario.schema import CacheSpec
from .capacity import MAX_UNITS, estimator_for, pooled
from .load import ModelLoad

MODES = ("sme", "mme", "ic")
MME_SLACK = 1.2              # memory headroom over the working set of a multi-model endpoint
ROUTING = "least_outstanding_requests"
# Accelerators that are not GPUs: models need a compiler (Neuron) to run there.
NON_GPU_ACCELERATORS = ("Inferentia2", "Inferentia", "Trainium")


def estimate(lm: ModelLoad, slots: int, slo_s: float | None, it: InstanceType | None = None) -> int:
    """Units of ``slots`` requests at once each (on instance type ``it``) that serve ``lm`` within
    ``slo_s``: the capacity estimate of its execution model (a language model's depends on the type:
    its KV cache and step time there)."""
    return estimator_for(lm).units(lm, slots, slo_s, lm.concurrency, it)


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


def gpu_types(types: Iterable[InstanceType]) -> list[InstanceType]:
    return [t for t in types if t.gpus > 0 and t.gpu not in NON_GPU_ACCELERATORS]


def literal(name: str) -> str:
    """A model name as an endpoint's ``models`` pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def sme_endpoint(lm: ModelLoad, it: InstanceType, n: int, name: str | None = None) -> dict:
    return {"name": name or lm.name, "mode": "sme", "instance_type": it.name, "instances": int(n),
            "routing": ROUTING, "max_concurrency": lm.concurrency, "models": [literal(lm.name)]}


def size_sme(lm: ModelLoad, types: Sequence[InstanceType], slo_s: float | None) -> tuple[InstanceType, int] | None:
    """The instance type and count that serve one model at the lowest estimated cost."""
    cands = types if lm.accelerators == 0 else gpu_types(types)
    best = None
    for it in cands:
        copies = sme_copies(lm, it)
        if not copies:
            continue
        n = estimate(lm, copies * lm.concurrency, slo_s, it)
        if n >= MAX_UNITS:   # a language model's copy does not run there (no room for its KV cache)
            continue
        key = (n * hourly(it), hourly(it), it.name)
        if best is None or key < best[0]:
            best = (key, it, n)
    return None if best is None else (best[1], best[2])


def _llm_why(lm: ModelLoad) -> str:
    """Why a language model may fit no type although its weights would: its engine there (sizing
    refuses a type where its KV cache has no room, or where no count meets the TTFT target)."""
    if getattr(lm, "llm", None) is None:
        return ""
    return (" (a language model's KV cache needs room beside its weights"
            + (", and its P99 prompt's prefill must fit the TTFT target" if lm.llm.ttft_s is not None else "")
            + ")")


def build_sme(loads: Sequence[ModelLoad], types: Sequence[InstanceType], slo_s: float | None,
              groups: Sequence[tuple[str, list[str]]] = ()) -> Plan:
    plan = Plan("sme", "sme")
    for lm in loads:
        got = size_sme(lm, types, slo_s)
        if got is None:
            plan.error = (f"model {lm.name!r} ({lm.memory_gb:g} GB, {lm.accelerators} accelerator(s)) fits no "
                          f"instance type of the catalog{_llm_why(lm)}")
            return plan
        plan.endpoints.append(sme_endpoint(lm, *got))
    plan.description = "one endpoint per model, on the instance type that serves it at the lowest estimated cost"
    return plan


def mme_count(loads: Sequence[ModelLoad], it: InstanceType, cache: CacheSpec, slo_s: float | None,
               conc: int) -> int:
    """Instances of ``it`` that hold every model's copies (of ``conc`` requests at once
    each) with MME_SLACK headroom, and whose GPUs serve the batching models' pooled traffic
    (:func:`pooled`: every model of an instance shares its one GPU's time)."""
    copies = [estimate(lm, conc, slo_s, it) for lm in loads]
    on_gpu = it.gpus > 0
    gpu = sum(c * lm.memory_gb for c, lm in zip(copies, loads)) if on_gpu else 0.0
    host = sum(c * (lm.host_memory_gb + (0.0 if on_gpu else lm.memory_gb)) for c, lm in zip(copies, loads))
    disk = sum(c * lm.size_gb for c, lm in zip(copies, loads))
    n = max(copies)
    pool = pooled(loads, conc) if on_gpu else None
    if pool is not None:
        n = max(n, estimate(pool, conc, slo_s, it))
    for used, cap in ((gpu, it.total_gpu_memory_gb * cache.memory_fraction),
                      (host, it.memory_gb - cache.host_reserve), (disk, it.storage_gb)):
        if used > 0 and cap > 0:
            n = max(n, math.ceil(used * MME_SLACK / cap - 1e-9))
    return n


def patterns(names: Sequence[str], all_names: Sequence[str], groups: Sequence[tuple[str, list[str]]]) -> list[str]:
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
    return out + [literal(n) for n in names if n not in done]


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
        cands = [t for t in gpu_types(types) if t.gpus == 1]
    conc = max(lm.concurrency for lm in shared)
    best = None
    held = None   # a type that holds every model, where no count serves them (a language model's TTFT target)
    for it in cands:
        if all(mme_problem(lm, it, cache) is None for lm in shared):
            n = mme_count(shared, it, cache, slo_s, conc)
            if n >= MAX_UNITS:
                held = held or it
                continue
            key = (n * hourly(it), hourly(it), it.name)
            if best is None or key < best[0]:
                best = (key, it, n)
    if best is None and held is not None:
        slow = next((lm for lm in shared if mme_count([lm], held, cache, slo_s, conc) >= MAX_UNITS), shared[0])
        plan.error = (f"no single-GPU instance type serves the models: {held.name}, for one, holds them all, but no "
                      f"count of it serves {slow.name!r} within the targets{_llm_why(slow)}")
        return plan
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
                           "models": patterns([lm.name for lm in shared], [lm.name for lm in loads], groups)})
    if len({lm.concurrency for lm in shared}) > 1:
        plan.notes.append(f"an MME has one max_concurrency for all its models: {conc}, the largest of theirs")
    for lm in alone:
        got = size_sme(lm, types, slo_s)
        if got is None:
            plan.error = f"model {lm.name!r} fits no instance type of the catalog{_llm_why(lm)}"
            return plan
        plan.endpoints.append(sme_endpoint(lm, *got, name=f"sme-{lm.name}"))
    if alone:
        plan.notes.append(f"{len(alone)} model(s) that need more than one GPU keep their own SME endpoint "
                          "(GPU MMEs run on single-GPU instance types)")
    return plan


def ic_candidates(loads: Sequence[ModelLoad], types: Sequence[InstanceType]) -> list[InstanceType]:
    """Instance types on which every model's copy fits as a component: GPU types, single-GPU ones
    included (inference components run on them), and CPU types too when no model needs an accelerator."""
    cands = gpu_types(types)
    if all(lm.accelerators == 0 for lm in loads):
        cands += [t for t in types if t.gpus == 0]
    return [it for it in cands
            if all(ic_problem(lm, it, ic_accelerators(lm, it)) is None and disk_problem(lm, it) is None
                   for lm in loads)]


def ic_pack(loads: Sequence[ModelLoad], copies: Sequence[int], it: InstanceType) -> int:
    from ..hosting.placement import pack

    needs, comps = [], []
    for k, (lm, c) in enumerate(zip(loads, copies)):
        acc = ic_accelerators(lm, it)
        needs += [(acc, max(lm.memory_gb, IC_MIN_MEMORY_GB), 1.0)] * c
        comps += [k] * c
    bins, left = pack(needs, (it.gpus, it.memory_gb, float(it.vcpus)), "binpack", comps)
    return len(bins) if not left else 10**9


def ic_choose(loads: Sequence[ModelLoad], copies: Sequence[int], cands: Sequence[InstanceType]
              ) -> tuple[InstanceType, int]:
    best = None
    for it in cands:
        n = ic_pack(loads, copies, it)
        key = (n * hourly(it), hourly(it), it.name)
        if best is None or key < best[0]:
            best = (key, it, n)
    return best[1], best[2]


def ic_endpoint(loads: Sequence[ModelLoad], copies: Sequence[int], it: InstanceType, n: int) -> dict:
    comps = []
    for lm, c in zip(loads, copies):
        comp = {"model": literal(lm.name), "copies": int(c), "max_concurrency": lm.concurrency}
        acc = ic_accelerators(lm, it)
        if acc != lm.accelerators:
            comp["accelerators"] = acc
        comps.append(comp)
    return {"name": "ic", "mode": "ic", "instance_type": it.name, "instances": int(n), "placement": "binpack",
            "routing": ROUTING, "components": comps}


def build_ic(loads: Sequence[ModelLoad], types: Sequence[InstanceType], slo_s: float | None,
             groups: Sequence[tuple[str, list[str]]] = ()) -> Plan:
    plan = Plan("ic", "ic")
    cands = ic_candidates(loads, types)
    if not cands:
        plan.error = "no GPU instance type of the catalog holds a copy of every model"
        return plan
    if any(lm.execution == "continuous" for lm in loads):
        # A language model's copies depend on the type (its KV cache and step time there); a type where
        # one does not run (no room for its KV cache) is no candidate, for the growth either.
        cands = [t for t in cands if all(lm.llm is None or lm.llm.engine(t) is not None for lm in loads)]
        best = None
        est = {t.name: [estimate(lm, lm.concurrency, slo_s, t) for lm in loads] for t in cands}
        # Nor is a type where no count meets the TTFT target (the P99 prompt's prefill alone misses it).
        cands = [t for t in cands if max(est[t.name], default=0) < MAX_UNITS]
        for t in cands:
            cp = est[t.name]
            k = ic_pack(loads, cp, t)
            key = (k * hourly(t), hourly(t), t.name)
            if best is None or key < best[0]:
                best = (key, t, k, cp)
        if best is None:
            plan.error = ("no GPU instance type of the catalog runs a copy of every model within the TTFT target "
                          "(a language model's KV cache needs room beside its weights, and its P99 prompt's "
                          "prefill must fit the target)")
            return plan
        _, it, n, copies = best
    else:
        copies = [estimate(lm, lm.concurrency, slo_s) for lm in loads]
        it, n = ic_choose(loads, copies, cands)
    plan.endpoints.append(ic_endpoint(loads, copies, it, n))
    plan.state.update(ic_loads=list(loads), copies=copies, types=cands)
    plan.description = ("one inference-component endpoint, copies packed (binpack) on the GPU type where they "
                        "cost least")
    return plan



def checked_types(names: Iterable[str], catalog: Any) -> list[str]:
    """``--instance-types``: names of the catalog (a ScenarioError naming the unknown one)."""
    from ..scenario import ScenarioError

    out = []
    for t in names:
        try:
            catalog.instance(t)
        except KeyError as err:
            raise ScenarioError(str(err.args[0]) if err.args else f"unknown instance type {t!r}",
                                source="--instance-types") from None
        out.append(t)
    return out


def grow(n: int) -> int:
    """The next size to try after ``n`` missed: a quarter more, at least one more."""
    return max(n + 1, math.ceil(n * 1.25))


def grow_endpoints(plan: Plan, missed: list[str]) -> str:
    """More instances for the endpoints named; an autoscaled one (instances ``{initial, min, max}``)
    gets a larger ``min`` and a lower target (it scales out sooner), within its ``max``."""
    what = "more instances"
    for ep in plan.endpoints:
        if ep["name"] not in missed:
            continue
        n = ep["instances"]
        if isinstance(n, dict):
            n["min"] = min(grow(n["min"]), n["max"])
            ep["autoscaling"]["target"] = round(ep["autoscaling"]["target"] * 0.8, 1)
            block = plan.state.get("autoscaling", {}).get(ep["name"])
            if block is not None:
                block.update(min=n["min"], target=ep["autoscaling"]["target"])
            what = "a larger min and a lower target"
        else:
            ep["instances"] = grow(n)
    return what


def grow_ic(plan: Plan, missed: list[str]) -> str:
    copies = plan.state["copies"]
    for k, lm in enumerate(plan.state["ic_loads"]):
        if lm.name in missed:
            copies[k] = grow(copies[k])
    it, n = ic_choose(plan.state["ic_loads"], copies, plan.state["types"])
    plan.endpoints[0] = ic_endpoint(plan.state["ic_loads"], copies, it, n)
    return f"more copies ({n} x {it.name})"


def endpoint_units(plan: Plan, summary: dict) -> list[tuple[str, dict]]:
    return [(ep["name"], summary["endpoints"][ep["name"]]) for ep in plan.endpoints]


def ic_units(plan: Plan, summary: dict) -> list[tuple[str, dict]]:
    return [(lm.name, summary["models"][lm.name]) for lm in plan.state["ic_loads"]]


@dataclass(frozen=True)
class Builder:
    """A hosting mode's plan builder: ``build(loads, types, slo_s, groups)``; ``units(plan, summary)``:
    the parts that can grow with their summary blocks; ``grow(plan, missed)``: more capacity for the
    parts named (returns what was added, for the log)."""

    mode: str
    build: Callable[..., Plan]
    units: Callable[[Plan, dict], list[tuple[str, dict]]]
    grow: Callable[[Plan, list[str]], str]


BUILDERS: dict[str, Builder] = {
    "sme": Builder("sme", build_sme, endpoint_units, grow_endpoints),
    "mme": Builder("mme", build_mme, endpoint_units, grow_endpoints),
    "ic": Builder("ic", build_ic, ic_units, grow_ic),
}
