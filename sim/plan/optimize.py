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
2. **Start from the capacity estimate of the models' execution model.** For
   models without batching, an Erlang-C estimate of the waiting time (M/M/c,
   its wait scaled by (1 + cv^2) / 2 for the service times' spread; pooled
   over the fleet for least-outstanding, round-robin and power-of-two
   routing, per instance for random routing): the smallest count whose
   estimated P99 (wait beyond the service time's own P99) meets the target.
   For batching (a capacity function) and continuous batching (a language
   model's engine on the type: its KV-limited batch and step model), the
   estimator compare sizes with (:func:`sim.plan.capacity.instances_needed`)
   at the busiest window's rate, against the P99 and TTFT targets.
3. **Knobs** (:mod:`sim.plan.knobs`): where an endpoint's models charge for concurrency (a batching
   slowdown curve; a language model's continuous batching), its per-copy knob (``max_concurrency``;
   ``max_num_seqs``) is searched too: the candidates are powers of two up to a cap (the curve's last
   point; what the KV cache holds on the type), the cap and the scenario's value; the estimator's
   count for each ranks them, and only the two cheapest estimates and the scenario's own value are
   simulated (cheapest estimate first), each as a (type, routing) candidate of its own.
4. **Gallop, then bisect** on the count from that guess: P99 does not grow
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

The search lives in :mod:`sim.plan.search`, the hosting modes in :mod:`sim.plan.modes`, the
result in :mod:`sim.plan.frontier`, the SLO in :mod:`sim.plan.slo`; this module orchestrates.

Autoscaling is not part of the search: plans are fixed fleets, and an
optimised endpoint's autoscaling policy is dropped (with a note).
Inference-component endpoints are left as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from ..pricing import price_warning
from ..scenario import ScenarioError, apply_overrides, parse_scenario, read_yaml
from .capacity import erlang_c  # noqa: F401  (public API)
from .frontier import OptimizeResult, pareto, plot_frontier  # noqa: F401  (public API)
from .modes import optimize_modes, parse_modes
from .parallel import planner_executor
from .search import STALL_FRACTION, Choice, EndpointSearch  # noqa: F401  (public API)
from .slo import SLO_METRICS, check_blocks, parse_slo, unit_hints  # noqa: F401  (public API)

DEFAULT_REPLICATIONS = 5


def price_note(res: OptimizeResult, sc: Any) -> None:
    """A note where the best plan's cost rests on an estimated price (sim.pricing)."""
    types = []
    for p in res.best_plan.values():
        try:
            types.append(sc.catalog.instance(p["instance_type"]))
        except KeyError:
            continue
    warn = price_warning(types)
    if warn:
        res.notes.append(warn)


def optimize(scenario_path: str | Path, *, instance_types: Iterable[str] | None = None,
             max_instances: int = 10, min_instances: int = 1, slo: Any = None, max_failed: float = 0.001,
             replications: int | None = None, routing: Iterable[str] | None = None,
             endpoints: Iterable[str] | None = None, overrides: Iterable[str] = (),
             modes: Iterable[str] | str | None = None,
             out: str | Path | None = None, log: Callable[[str], None] | None = None,
             force: bool = False, workers: int | None = None, scheduler: Any = None,
             knobs: bool = True) -> OptimizeResult:
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
    not fit in the memory available is refused with the estimate unless ``force``. ``workers`` (local
    processes) or ``scheduler`` (a Dask scheduler's address) run each plan's replications in parallel
    (:mod:`sim.plan.parallel`): the same results as one after the other. ``knobs``: also search each
    endpoint's per-copy concurrency knob where it changes the cost (:mod:`sim.plan.knobs`:
    ``max_concurrency`` of batching models, ``max_num_seqs`` of language models); False keeps the
    scenario's values.
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
        which = parse_modes(modes)
    executor = planner_executor(workers, scheduler)
    try:
        if modes:
            res = optimize_modes(path, data, sc0, targets, which, instance_types=instance_types,
                                 max_instances=max_instances, min_instances=min_instances, max_failed=max_failed,
                                 replications=reps, routing=routing, log=log or (lambda m: None), executor=executor,
                                 knobs=knobs)
        else:
            opt = EndpointSearch(path, data, [], targets, max_failed, reps,
                                 list(instance_types) if instance_types else None, list(routing) if routing else None,
                                 min_instances, max_instances, list(endpoints) if endpoints else None,
                                 log or (lambda m: None), executor, knobs)
            if reps == 1:
                opt.notes.append("one replication per plan: no confidence interval, the SLO is checked on the "
                                 "estimate")
            res = opt.run()
    finally:
        if executor is not None:
            executor.close()
    res.notes += unit_hints(slo)
    if modes:
        price_note(res, sc0)
        if out is not None:
            res.save(out)
        return res
    price_note(res, sc0)
    # best.yaml: the original file with the --set overrides and the plan applied.
    res.best_overrides = overrides + res.best_overrides
    res.best_yaml = yaml.safe_dump(apply_overrides(read_yaml(path), res.best_overrides,
                                                   source=f"{path} (plan)"), sort_keys=False)
    if out is not None:
        res.save(out)
    return res


__all__ = ["optimize", "optimize_modes", "OptimizeResult", "parse_slo", "check_blocks", "erlang_c", "pareto"]
