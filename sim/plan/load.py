"""The fleet's load as the planner sees it: each model's traffic, service times and execution model."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..core.rng import Streams
from ..scenario import Scenario, ScenarioError
from ..service import sample_tokens, service_times
from ..workload.build import build_workload, group_weights

PEAK_WINDOW = 300.0          # seconds: the busiest window's rate sizes fixed fleets
# Processes whose rate moves over the horizon by design: autoscaled plans are weighed for them.
VARYING_PROCESSES = ("diurnal", "trace", "mmpp")


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
    execution: str = "slots"             # the copy's execution model: slots | batching | continuous
    slowdown: tuple = ()                 # batching: the capacity function's points ((k, slowdown(k)), ...)
    llm: "LLMSizing | None" = None       # continuous batching: its engine on each instance type
    # requests per second in the quietest window, for traffic that varies by design (a diurnal
    # process, a trace, on/off bursts); None: a steady process (its quiet windows are noise)
    trough_rate: float | None = None


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
    trough: dict[int, float] = {}          # group -> the quietest window's rate over the mean
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
            llm = sc.models[g.models[0]].llm if g.models else None
            if llm is not None and tin is not None and tout is not None:
                # A language model's request takes at least its time alone on its engine (its prompt's
                # prefill, then a step for each further token): a bound on the latency, so the users'
                # rate is one the loop cannot exceed.
                s = np.array([alone_seconds(llm, int(i), int(o)) for i, o in zip(tin[:256], tout[:256])])
            else:
                s = service_times(rng, g.service, tin, tout, k)
            cycle = tr.think_time + float(s.mean())
            if cycle <= 0:
                raise ScenarioError(f"models[{g.index}] ({g.name}): a closed loop with no think time and no "
                                    "service time sends without bound; give traffic.think_time or a service "
                                    "time", source=sc.source)
            total = tr.users / cycle
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
        if tr.process in VARYING_PROCESSES and mean > 0:
            # The quietest window, plus one Poisson standard deviation (noise alone does not deflate it).
            q = int(np.argmin(per_bin))
            trough[g.index] = min(per_bin[q] + math.sqrt(max(per_bin[q] * w[q], 1.0)) / w[q], mean) / mean
    conc = served_concurrency(sc)
    tokens = np.zeros((n, 3))
    for m in range(n):
        s = (wl.model == m) & win
        if s.any():
            tokens[m] = (float(wl.input_tokens[s].mean()), float(wl.output_tokens[s].mean()),
                         float(np.percentile(wl.input_tokens[s], 99)))
    out = []
    for m, mod in enumerate(sc.models):
        mean_s, p99_s = svc_mean[m], svc_p99[m]
        if not np.isfinite(mean_s):
            mean_s, p99_s = spec_service(sc, mod.group)
        # A server that slows under sustained load (throttling) is sized at that speed; one that
        # speeds up is sized at rest and its spare capacity is left to the simulation.
        svc = sc.groups[mod.group].service
        sus = svc.sustained if svc is not None else None
        if sus is not None and sus.factor > 1:
            mean_s, p99_s = mean_s * sus.factor, p99_s * sus.factor
        execution, slowdown = execution_model(sc, mod.group)
        llm = None
        if execution == "continuous":
            spec = sc.spec.slo
            llm = LLMSizing(mod, sc.catalog, sc.base_dir, sc.source, *tokens[m, :2],
                            spec.ttft if spec is not None else None, float(tokens[m, 2]),
                            tpot_s=spec.tpot if spec is not None else None)
        out.append(ModelLoad(m, mod.name, float(rate[m]), float(rate[m] * peak[mod.group]), float(mean_s),
                             float(p99_s), conc.get(m, 1), mod.memory_gb, mod.host_memory_gb, mod.size_gb,
                             mod.accelerators, execution, slowdown, llm,
                             trough_rate=(float(rate[m] * trough[mod.group]) if mod.group in trough else None)))
    return out


def alone_seconds(llm: Any, input_tokens: int, output_tokens: int) -> float:
    """Seconds of a language model's request alone on its engine (``Model.llm``): its prompt's
    prefill in steps of ``max_num_batched_tokens``, then one decode step per further output token."""
    t, p, budget = 0.0, max(int(input_tokens), 1), max(1, int(llm.max_num_batched_tokens))
    done = 0
    while done < p:
        chunk = min(budget, p - done)
        t += llm.step.time(0, done, chunk)
        done += chunk
    return t + llm.step.decode_time(1, p, max(int(output_tokens) - 1, 0))


def spec_service(sc: Scenario, group: int) -> tuple[float, float]:
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


@dataclass(frozen=True, eq=False)
class LLMSizing:
    """A language model's continuous-batching engine as the planner weighs it on an instance type: the
    KV cache that type's GPUs leave beside the weights and its step model (the scenario loader's own
    resolution, sim.scenario.resolve.continuous_batching_on), with the fleet's mean token counts, its
    prompts' P99 and TTFT and TPOT targets."""

    model: Any
    catalog: Any
    base_dir: Any
    source: str
    mean_input: float
    mean_output: float
    ttft_s: float | None = None
    p99_input: float | None = None      # the prompts' 99th percentile (tokens): its prefill counts against TTFT
    tpot_s: float | None = None         # the TPOT target: it caps the batch a copy may run
    max_num_seqs: int | None = None     # the batch weighed instead of the model's own (optimize's knob)

    def engine(self, it: Any, accelerators: int | None = None) -> Any:
        """The resolved engine (sim.scenario.resolve.ContinuousBatching) of a copy on ``it``, or None
        where no copy runs there (no room for the KV cache, heads that the GPUs cannot share)."""
        from ..scenario import ScenarioError
        from ..scenario.resolve import continuous_batching_on

        acc = self.model.accelerators if accelerators is None else accelerators
        try:
            eng = continuous_batching_on(self.model, it, acc, self.catalog, self.base_dir, self.source, [])
        except ScenarioError:
            return None
        if self.max_num_seqs is not None:
            # The batch alone: a mixture-of-experts roofline's weights read per step keep the model's own
            # max_num_seqs (an estimate; the simulation resolves the engine with the value given).
            eng = replace(eng, max_num_seqs=int(self.max_num_seqs))
        return eng


def execution_model(sc: Scenario, group: int) -> tuple[str, tuple]:
    """A group's execution model (``slots``, ``batching``, ``continuous``) and, for batching, its
    slowdown points."""
    svc = sc.groups[group].service
    if svc is None:
        return "slots", ()
    if getattr(svc, "continuous_batching", None) is not None:
        return "continuous", ()
    b = getattr(svc, "batching", None)
    if b is not None and b.slowdown:
        return "batching", tuple(sorted((int(k), float(v)) for k, v in b.slowdown.items()))
    return "slots", ()
