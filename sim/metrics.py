"""Results: the request table, per-minute timeline and summaries, with cost.

Everything here is post-processing of the columns a run produced (numpy and
pandas), so the event core never logs per event.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .core.engine import IN_FLIGHT, OK, STATUS_NAMES, TIMEOUT
from .simulate import RawRun

MINUTE = 60.0
# Figures of a summary block that are averaged over replications (with a CI).
SUMMARY_KEYS = ("requests", "completed", "failed", "in_flight", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                "throughput_per_s", "cold_starts", "cache_hit_rate", "cost_usd", "cost_per_million_usd",
                "slo_attainment")
ENDPOINT_KEYS = ("instance_hours", "instances_mean", "instances_max")


def finalize_status(run: RawRun) -> None:
    """Requests still queued at the horizon whose client had already given up are timeouts.

    Queued requests time out lazily (when their instance reaches them); at the
    horizon those past their deadline are settled here, as the client saw them.
    """
    c = run.columns
    timeout = np.array([ep.timeout for ep in run.scenario.endpoints])
    ep = run.endpoint_of_model[c["model"]]
    deadline = c["arrival"] + timeout[ep]
    late = (c["status"] == IN_FLIGHT) & (deadline <= run.scenario.horizon)
    c["status"][late] = TIMEOUT
    c["end"][late] = deadline[late]


def step_integral(times: np.ndarray, values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Integral over each ``[edges[k], edges[k+1])`` of the right-continuous step
    function equal to ``values[j]`` from ``times[j]`` on (0 before ``times[0]``)."""
    times = np.asarray(times, dtype=float)
    values = np.asarray(values, dtype=float)
    # cumulative integral at each breakpoint, then interpolate linearly between them
    seg = np.diff(np.append(times, np.inf))
    seg[-1] = 0.0
    cum = np.concatenate([[0.0], np.cumsum(values[:-1] * seg[:-1])]) if len(times) > 1 else np.zeros(1)

    def at(t: np.ndarray) -> np.ndarray:
        k = np.searchsorted(times, t, side="right") - 1
        out = np.zeros_like(t, dtype=float)
        ok = k >= 0
        out[ok] = cum[k[ok]] + values[k[ok]] * (t[ok] - times[k[ok]])
        return out

    F = at(np.asarray(edges, dtype=float))
    return np.diff(F)


def _count_integral(sorted_times: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Integral over each bin of N(t) = number of ``sorted_times`` <= t."""
    prefix = np.concatenate([[0.0], np.cumsum(sorted_times)])
    k = np.searchsorted(sorted_times, edges, side="right")
    F = k * edges - prefix[k]
    return np.diff(F)


def requests_frame(run: RawRun) -> pd.DataFrame:
    """One row per request, as requests.parquet (DESIGN.md) plus service time and tokens."""
    c = run.columns
    sc = run.scenario
    model_names = pd.Categorical.from_codes(c["model"], categories=[m.name for m in sc.models])
    ep_codes = run.endpoint_of_model[c["model"]]
    ep_names = pd.Categorical.from_codes(ep_codes, categories=[e.name for e in sc.endpoints])
    latency = (c["end"] - c["arrival"]) * 1e3
    load_ms = c["load"] * 1e3
    wait = (c["start"] - c["arrival"]) * 1e3 - load_ms
    return pd.DataFrame({
        "request_id": np.arange(len(c["arrival"]), dtype=np.int64),
        "model": model_names,
        "endpoint": ep_names,
        "instance": c["instance"],
        "arrival_s": c["arrival"],
        "start_s": c["start"],
        "end_s": c["end"],
        "latency_ms": latency,
        "wait_ms": wait,
        "load_ms": load_ms,
        "cold": c["cold"],
        "status": pd.Categorical.from_codes(c["status"], categories=list(STATUS_NAMES)),
        "service_ms": c["service"] * 1e3,
        "input_tokens": c["input_tokens"],
        "output_tokens": c["output_tokens"],
    })


def _fleet_integrals(log: list[tuple[float, int, int]], t0: float, t1: float) -> tuple[float, float, int]:
    """(instance-seconds in service, instance-seconds billed, max in service) over [t0, t1)."""
    t = np.array([x[0] for x in log])
    serving = np.array([x[1] for x in log], dtype=float)
    billed = np.array([x[2] for x in log], dtype=float)
    edges = np.array([t0, t1])
    k0 = max(np.searchsorted(t, t0, side="right") - 1, 0)
    k1 = np.searchsorted(t, t1, side="left")
    peak = int(serving[k0:max(k1, k0 + 1)].max())
    return float(step_integral(t, serving, edges)[0]), float(step_integral(t, billed, edges)[0]), peak


def _block(lat_ok: np.ndarray, status: np.ndarray, cold: np.ndarray, duration: float, cost: float,
           slo: float | None) -> dict[str, Any]:
    n = int(len(status))
    ok = status == OK
    done = int(ok.sum())
    in_flight = int((status == IN_FLIGHT).sum())
    failed = n - done - in_flight
    finished = n - in_flight
    if done:
        p50, p90, p99 = np.percentile(lat_ok, [50, 90, 99])
        mean = float(lat_ok.mean())
    else:
        p50 = p90 = p99 = mean = None
    started = int((ok | (status == TIMEOUT)).sum())
    cold_n = int(cold.sum())
    return {
        "requests": n,
        "completed": done,
        "failed": failed,
        "in_flight": in_flight,
        "p50_ms": _f(p50), "p90_ms": _f(p90), "p99_ms": _f(p99), "mean_ms": _f(mean),
        "throughput_per_s": done / duration,
        "cold_starts": cold_n,
        "cache_hit_rate": (1.0 - cold_n / started) if started else None,
        "cost_usd": cost,
        "cost_per_million_usd": cost / done * 1e6 if done else None,
        "slo_attainment": (float((lat_ok <= slo * 1e3).sum()) / finished if finished else None)
        if slo is not None else None,
    }


def _f(x) -> float | None:
    return None if x is None else float(x)


def summarize(run: RawRun) -> dict[str, Any]:
    """summary.json's figures (DESIGN.md) for one run, over the measured horizon."""
    sc = run.scenario
    c = run.columns
    t0, t1 = sc.spec.warmup, sc.horizon
    duration = t1 - t0
    slo = sc.spec.slo.latency_target if sc.spec.slo else None
    win = (c["arrival"] >= t0) & (c["arrival"] < t1)
    status = c["status"][win]
    cold = c["cold"][win]
    lat = (c["end"][win] - c["arrival"][win]) * 1e3
    ok = status == OK
    model = c["model"][win]
    ep_of = run.endpoint_of_model[model]
    service = c["service"][win]

    ep_cost, ep_extra = [], []
    for ep, log in zip(sc.endpoints, run.fleet_logs):
        serving_s, billed_s, peak = _fleet_integrals(log, t0, t1)
        ep_cost.append(billed_s * ep.instance_type.price_per_hour / 3600.0)
        ep_extra.append({"instance_hours": billed_s / 3600.0, "instances_mean": serving_s / duration,
                         "instances_max": peak})

    # A model's cost is its endpoint's cost shared by busy time (service seconds).
    busy = np.bincount(model, weights=service, minlength=len(sc.models))
    ep_busy = np.bincount(run.endpoint_of_model, weights=busy, minlength=len(sc.endpoints))
    n_models = np.bincount(run.endpoint_of_model, minlength=len(sc.endpoints))

    def model_cost(m: int) -> float:
        e = run.endpoint_of_model[m]
        if e < 0:
            return 0.0
        share = busy[m] / ep_busy[e] if ep_busy[e] > 0 else 1.0 / n_models[e]
        return ep_cost[e] * share

    out = {
        "scenario": sc.name,
        "seed": run.seed,
        "simulated_seconds": duration,
        "warmup_seconds": t0,
        "wall_seconds": run.wall_seconds,
        "overall": _block(lat[ok], status, cold, duration, float(sum(ep_cost)), slo),
        "endpoints": {},
        "models": {},
    }
    for e, ep in enumerate(sc.endpoints):
        sel = ep_of == e
        blk = _block(lat[sel & ok], status[sel], cold[sel], duration, ep_cost[e], slo)
        blk.update(ep_extra[e])
        out["endpoints"][ep.name] = blk
    order = np.argsort(model, kind="stable")
    bounds = np.searchsorted(model[order], np.arange(len(sc.models) + 1))
    for m, mod in enumerate(sc.models):
        idx = order[bounds[m]:bounds[m + 1]]
        out["models"][mod.name] = _block(lat[idx][ok[idx]], status[idx], cold[idx], duration, model_cost(m), slo)
    return out


def timeline(run: RawRun, runtimes_loaded: list | None = None) -> pd.DataFrame:
    """One row per minute and endpoint (DESIGN.md's timeline.csv)."""
    sc = run.scenario
    c = run.columns
    horizon = sc.horizon
    edges = np.arange(0.0, horizon + MINUTE, MINUTE)
    edges[-1] = min(edges[-1], horizon) if edges[-1] > horizon else edges[-1]
    if edges[-1] < horizon:
        edges = np.append(edges, horizon)
    width = np.diff(edges)
    ep_of = run.endpoint_of_model[c["model"]]
    frames = []
    for e, (ep, log) in enumerate(zip(sc.endpoints, run.fleet_logs)):
        sel = ep_of == e
        arr = c["arrival"][sel]
        end = np.where(np.isnan(c["end"][sel]), np.inf, c["end"][sel])
        served = sel & ((c["status"] == OK) | (c["status"] == TIMEOUT)) & ~np.isnan(c["start"])
        t = np.array([x[0] for x in log])
        serving = step_integral(t, [x[1] for x in log], edges) / width
        billed = step_integral(t, [x[2] for x in log], edges)
        in_flight = (_count_integral(np.sort(arr), edges) - _count_integral(np.sort(end[np.isfinite(end)]), edges)) / width
        inv = np.histogram(arr, bins=edges)[0]
        starts = c["start"][served]
        hits = np.histogram(starts[~c["cold"][served]], bins=edges)[0]
        tot = np.histogram(starts, bins=edges)[0]
        it = ep.instance_type
        per_inst_mem = ep.copies_per_instance * max(sc.models[m].memory_gb for m in ep.models)
        gpu_total = it.total_gpu_memory_gb if it.gpus else it.memory_gb
        frames.append(pd.DataFrame({
            "t_s": edges[:-1],
            "endpoint": ep.name,
            "instances": serving,
            "invocations": inv,
            "in_flight": in_flight,
            "loaded_models": serving * ep.copies_per_instance,
            "gpu_memory_utilization": np.where(serving > 0, per_inst_mem / gpu_total, 0.0),
            "model_cache_hit": np.where(tot > 0, hits / np.maximum(tot, 1), np.nan),
            "cost_usd": billed * it.price_per_hour / 3600.0,
        }))
    return pd.concat(frames, ignore_index=True)


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each figure over replications, and ``<key>_ci95``: the half-width
    of its 95% confidence interval (Student t), when there are several."""
    if len(summaries) == 1:
        return summaries[0]
    r = len(summaries)
    tq = float(stats.t.ppf(0.975, r - 1))

    def merge(blocks: list[dict]) -> dict:
        out: dict[str, Any] = {}
        for k in blocks[0]:
            vals = [b[k] for b in blocks]
            if any(v is None for v in vals) or not all(isinstance(v, (int, float)) for v in vals):
                out[k] = None if any(v is None for v in vals) else vals[0]
                continue
            a = np.asarray(vals, dtype=float)
            out[k] = float(a.mean())
            out[f"{k}_ci95"] = float(tq * a.std(ddof=1) / math.sqrt(r))
        return out

    first = summaries[0]
    out = {k: first[k] for k in ("scenario", "seed", "simulated_seconds", "warmup_seconds")}
    out["replications"] = r
    out["wall_seconds"] = float(sum(s["wall_seconds"] for s in summaries))
    out["overall"] = merge([s["overall"] for s in summaries])
    out["endpoints"] = {n: merge([s["endpoints"][n] for s in summaries]) for n in first["endpoints"]}
    out["models"] = {n: merge([s["models"][n] for s in summaries]) for n in first["models"]}
    return out
