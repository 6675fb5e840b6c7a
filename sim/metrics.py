"""Results: the request table, per-minute timeline and summaries, with cost.

Everything here is post-processing of the columns a run produced (numpy and
pandas), so the event core never logs per event.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from typing import Any

import numpy as np

from .core.engine import IN_FLIGHT, OK, STATUS_NAMES, TIMEOUT
from .hosting.base import EndpointLog
from .simulate import RawRun
from . import pricing

MINUTE = 60.0
# Figures of a summary block that are averaged over replications (with a CI).
SUMMARY_KEYS = ("requests", "completed", "failed", "in_flight", "p50_ms", "p90_ms", "p99_ms", "mean_ms",
                "throughput_per_s", "cold_starts", "cache_hit_rate", "cost_usd", "cost_per_million_usd",
                "slo_attainment", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_mean_ms",
                "tpot_p90_ms", "tpot_p99_ms", "output_tokens_per_s")
ENDPOINT_KEYS = ("instance_hours", "instances_mean", "instances_max")
# summary.json warns of an endpoint where more than this share of the finished requests failed, or more
# than this share of its requests are still in flight at the horizon (a backlog that did not drain).
FAILED_SHARE_WARNING = 0.01
BACKLOG_SHARE_WARNING = 0.01
# What each failure status says about the endpoint, and what to do about it.
_FAILURE_CAUSES = {
    "timeout": "requests waited past the endpoint's timeout: more arrive than it serves (overloaded)",
    "throttled": "requests were refused beyond queue_limit: more arrive than it serves (overloaded)",
    "no_capacity": "requests found no instance or copy in service (scaled to zero, an outage, or capacity "
                   "still provisioning)",
    "instance_failure": "requests were lost with failed instances",
}


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


# Times of a run's requests (arrivals, starts, ends) come nearly in order: numpy's stable sort (timsort for
# floats) sorts them several times faster than its default (introsort), to the same values.


def _bin_counts(x, edges: np.ndarray) -> np.ndarray:
    """``np.histogram(x, bins=edges)[0]``, the same counts (bins closed on the left, the last one on both
    sides; NaN in none): numpy sorts ``x`` by blocks with its default sort for each call, this with one
    stable sort (a run's times come nearly in order)."""
    v = np.sort(np.asarray(x, dtype=float).ravel(), kind="stable")
    edges = np.asarray(edges, dtype=float)
    return np.diff(np.concatenate([v.searchsorted(edges[:-1], "left"), v.searchsorted(edges[-1:], "right")]))


def _is_sorted(x: np.ndarray) -> bool:
    """Whether ``x`` is in ascending order already (arrival times usually are): then it needs no sort."""
    return bool(np.all(x[1:] >= x[:-1]))


def rows_by_endpoint(endpoint_of_row: np.ndarray, n_endpoints: int) -> list[np.ndarray]:
    """Per endpoint, the indices of the rows whose endpoint it is, in ascending order (the rows a boolean
    filter ``endpoint_of_row == e`` selects, in the same order, so figures summed over them are the same
    to the last bit): one stable sort of the table instead of a pass over it per endpoint."""
    key = np.asarray(endpoint_of_row)
    if n_endpoints < 2 ** 15 and key.dtype != np.int16:
        key = key.astype(np.int16)   # a radix sort
    order = np.argsort(key, kind="stable")
    bounds = np.searchsorted(key[order], np.arange(n_endpoints + 1))
    return [order[bounds[e]:bounds[e + 1]] for e in range(n_endpoints)]


def _sorted_steps(times: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``times`` sorted (stably) and ``weights`` in their order: what :func:`_steps_integrals` integrates."""
    order = np.argsort(times, kind="stable")
    return times[order], weights[order]


def _steps_integrals(t: np.ndarray, w: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For times ``t`` sorted with weights ``w`` (:func:`_sorted_steps`): integrals over each bin of the
    sum of the weights, and of the number (:func:`_count_integral`), of the times <= t."""
    cw = np.concatenate([[0.0], np.cumsum(w)])
    cwt = np.concatenate([[0.0], np.cumsum(w * t)])
    k = np.searchsorted(t, edges, side="right")
    return np.diff(cw[k] * edges - cwt[k]), _count_integral(t, edges)


def _endpoint_rows(run: RawRun, memo: dict | None) -> list[np.ndarray]:
    """:func:`rows_by_endpoint` of the run's request table, kept in ``memo`` (the summary's and the
    timeline's, as :func:`sim.api.run` shares one) for the next call."""
    if memo is not None and "endpoint_rows" in memo:
        return memo["endpoint_rows"]
    rows = rows_by_endpoint(run.endpoint_of_model[run.columns["model"]], len(run.scenario.endpoints))
    if memo is not None:
        memo["endpoint_rows"] = rows
    return rows


def _busy_periods(run: RawRun, e: int, rows: np.ndarray | None) -> tuple[np.ndarray, ...] | None:
    """What :func:`device_series` integrates for endpoint ``e``, whatever the bins: its requests' start and
    end times of service, sorted (but a continuous-batching model's: its batch is its engine's running
    sequences, :func:`device_figures`), and the times (sorted) and GPUs of its devices' busy periods'
    starts and ends; None when none of its requests was served on a device."""
    c = run.columns
    if rows is None:
        rows = np.flatnonzero(run.endpoint_of_model[c["model"]] == e)
    sel = rows[np.isfinite(c["start"][rows]) & (c["device"][rows] >= 0)]
    start = c["start"][sel]
    served = c["served_end"][sel]
    end = np.minimum(np.where(np.isfinite(served), served, run.scenario.horizon), run.scenario.horizon)
    end = np.maximum(end, start)
    mme = run.scenario.endpoints[e].mode == "mme"
    # An mme instance's models share its GPUs, a language model's engine there too (a device of its own
    # on the same GPUs): the instance is busy while any of them serves, so its busy periods are the
    # instance's, not each device's (which would count its GPUs once per device)
    dev = c["instance" if mme else "device"][sel]
    if not len(dev):
        return None
    dev = dev.astype(np.int16) if dev.max() < 2 ** 15 else dev.astype(np.int64)   # 16 bits: a radix sort
    # Busy periods per device: a sweep over its starts (+1) and ends (-1), in time order (starts first on a
    # tie, so back-to-back requests make one period); a device's count returns to 0 at its last end.
    t = np.concatenate([start, end])
    d = np.concatenate([dev, dev])
    step = np.concatenate([np.ones(len(start), dtype=np.int8), np.full(len(end), -1, dtype=np.int8)])
    # By device, then time, then starts first: the starts come first in ``t``, and both sorts are stable
    # (the order of np.lexsort((-step, t, d))).
    order = np.argsort(t, kind="stable")
    order = order[np.argsort(d[order], kind="stable")]
    t, d, step = t[order], d[order], step[order]
    count = np.cumsum(step, dtype=np.int64)
    before = count - step
    up = (before == 0) & (step > 0)
    down = (count == 0) & (step < 0)
    if mme:
        gpus = np.full(int(d.max()) + 1, run.scenario.endpoints[e].instance_type.gpus)
    else:
        gpus = run.device_gpus if len(run.device_gpus) else np.zeros(int(d.max()) + 1)
    t_up, g_up = t[up], gpus[d[up]].astype(float)
    t_down, g_down = t[down], gpus[d[down]].astype(float)
    if run.logs[e].llm:   # (a preempted sequence waits out of its copy's batch: not in service)
        batched = np.array([getattr(m, "llm", None) is None for m in run.scenario.models])[c["model"][sel]]
        start, end = start[batched], end[batched]
    return (np.sort(start, kind="stable"), np.sort(end, kind="stable"), *_sorted_steps(t_up, g_up),
            *_sorted_steps(t_down, g_down))


def device_series(run: RawRun, e: int, edges: np.ndarray, rows: np.ndarray | None = None,
                  memo: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of ``edges``, for endpoint ``e``: the GPU-seconds its devices were busy (a device is busy
    while it has a request in service; it counts its GPUs; the devices of an mme instance, which share its
    GPUs, count as one), the request-seconds in service and the device-seconds busy. From the request
    table: each request served is in service on its device over [start, the end of its service) (the
    horizon while in flight). ``rows``: the endpoint's rows of the
    table in ascending order (:func:`rows_by_endpoint`), found here when not given; ``memo``: a dict that
    keeps each endpoint's sorted busy periods for the next call on the same run (:func:`summarize` and
    :func:`timeline` share one in :func:`sim.api.run`)."""
    key = ("busy_periods", e)
    if memo is not None and key in memo:
        periods = memo[key]
    else:
        periods = _busy_periods(run, e, rows)
        if memo is not None:
            memo[key] = periods
    if periods is None:
        zero = np.zeros(len(edges) - 1)
        return zero, zero.copy(), zero.copy()
    s_start, s_end, t_up, w_up, t_down, w_down = periods
    in_service = _count_integral(s_start, edges) - _count_integral(s_end, edges)
    gpu_up, n_up = _steps_integrals(t_up, w_up, edges)
    gpu_down, n_down = _steps_integrals(t_down, w_down, edges)
    # (differences of running sums: clipped at 0, where rounding would leave -1e-14 in an idle bin)
    return np.maximum(gpu_up - gpu_down, 0.0), np.maximum(in_service, 0.0), np.maximum(n_up - n_down, 0.0)


def _holding_s(log: EndpointLog, edges: np.ndarray) -> np.ndarray:
    """Per bin, the instance-seconds of the instances holding their devices: in service, or draining
    (out of service, their requests still running)."""
    return step_integral(np.array([x[0] for x in log.fleet]), [x[3] for x in log.fleet], edges)


def device_figures(run: RawRun, e: int, edges: np.ndarray, serving_s: np.ndarray,
                   rows: np.ndarray | None = None, memo: dict | None = None) -> dict[str, np.ndarray]:
    """Per bin: ``gpu_utilization`` (CloudWatch's GPUUtilization: the busy share of each GPU, summed over
    an instance's GPUs, 0-100 x GPUs, averaged over the instances that hold their GPUs: ``serving_s``,
    their instance-seconds, :func:`_holding_s`) and ``batch_size_mean`` (requests in service per busy
    device; a continuous-batching copy's: its running sequences); NaN where undefined. ``rows``, ``memo``:
    as :func:`device_series`."""
    busy_gpu, in_service, busy = device_series(run, e, edges, rows, memo)
    log = run.logs[e]
    if log.llm:   # a continuous-batching copy's batch: its running sequences (its engine's log)
        in_service = in_service + llm_series(log, edges)["running_seqs"] * np.diff(edges)
    gpus = run.scenario.endpoints[e].instance_type.gpus
    util = np.where(serving_s > 0, 100.0 * busy_gpu / np.where(serving_s > 0, serving_s, 1.0), np.nan)
    return {"gpu_utilization": util if gpus > 0 else np.full(len(util), np.nan),
            "batch_size_mean": np.where(busy > 0, in_service / np.where(busy > 0, busy, 1.0), np.nan)}


def llm_series(log: EndpointLog, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Per bin, for an endpoint's continuous-batching copies: ``running_seqs`` and ``waiting_seqs`` (time
    means, summed over its copies) and ``kv_cache_utilization`` (the share of their KV cache blocks in use,
    0-1, as vLLM's cache usage); NaN for an endpoint without any."""
    width = np.diff(edges)
    if not log.llm:
        nan = np.full(len(width), np.nan)
        return {"running_seqs": nan, "waiting_seqs": nan, "kv_cache_utilization": nan}
    rows = log.llm_rows()
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    t = rows[:, 0]
    level = np.cumsum(rows[:, 1:], axis=0)
    run, wait, used, cap = (step_integral(t, level[:, k], edges) for k in range(4))
    return {"running_seqs": run / width, "waiting_seqs": wait / width,
            "kv_cache_utilization": np.where(cap > 0, used / np.where(cap > 0, cap, 1.0), np.nan)}


def requests_frame(run: RawRun) -> pd.DataFrame:
    """One row per request, as requests.parquet (README, Outputs) plus service time, tokens and ``measured``:
    whether the request arrived in the measured horizon (after warmup, before the horizon), the rows
    summary.json's figures cover (its latency percentiles: the measured rows with status ``ok``)."""
    import pandas as pd

    c = run.columns
    sc = run.scenario
    model_names = pd.Categorical.from_codes(c["model"], categories=[m.name for m in sc.models])
    ep_codes = run.endpoint_of_model[c["model"]]
    ep_names = pd.Categorical.from_codes(ep_codes, categories=[e.name for e in sc.endpoints])
    latency = (c["end"] - c["arrival"]) * 1e3
    load_ms = c["load"] * 1e3
    # a request whose service began after its client gave up (a timeout: a continuous-batching copy
    # admits what its own queue holds) never started for that client, as one dropped from a queue
    start = np.where(c["start"] > c["end"], np.nan, c["start"])
    wait = (start - c["arrival"]) * 1e3 - load_ms
    ttft, tpot = token_times(c)
    # copy=False: a column per array, not copied into pandas' 2-D blocks (2 s for 8.7 million rows); the
    # frame shares the run's columns, which nothing changes after the run.
    return pd.DataFrame({
        "request_id": np.arange(len(c["arrival"]), dtype=np.int64),
        "model": model_names,
        "endpoint": ep_names,
        "instance": c["instance"],
        "arrival_s": c["arrival"],
        "start_s": start,
        "end_s": c["end"],
        "latency_ms": latency,
        "wait_ms": wait,
        "load_ms": load_ms,
        "cold": c["cold"],
        "status": pd.Categorical.from_codes(c["status"], categories=list(STATUS_NAMES)),
        "service_ms": c["service"] * 1e3,
        "input_tokens": c["input_tokens"],
        "output_tokens": c["output_tokens"],
        "ttft_ms": ttft,
        "tpot_ms": tpot,
        # the rows summary.json's figures cover: arrived after warmup, before the horizon
        "measured": (c["arrival"] >= sc.spec.warmup) & (c["arrival"] < sc.horizon),
    }, copy=False)


def token_times(c: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per request, ``ttft_ms`` (arrival to first token) and ``tpot_ms`` ((latency - ttft) / (output
    tokens - 1)), as its client saw them: NaN for requests of models without continuous batching, TTFT
    for a first token after the client gave up (a timeout), and TPOT for one output token or a request
    not served OK (a timed-out client's latency is its timeout, not its last token)."""
    first = c["first_token"]
    if not np.isfinite(first).any():   # no language model's request (the usual case): every figure is NaN
        return np.full(len(first), np.nan), np.full(len(first), np.nan)
    with np.errstate(invalid="ignore"):
        ttft = np.where(first > c["end"], np.nan, (first - c["arrival"]) * 1e3)   # (in flight: no end yet)
    out = c["output_tokens"].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(out > 1, (c["end"] - first) * 1e3 / (out - 1), np.nan)
    tpot[c["status"] != OK] = np.nan
    return ttft, tpot


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


def _memory_series(log: EndpointLog, edges: np.ndarray) -> dict[str, np.ndarray]:
    """Time integrals over each bin of loaded models and of each memory tier's use."""
    mem = np.array(log.memory, dtype=float).reshape(-1, 5)
    return {k: step_integral(mem[:, 0], mem[:, j], edges)
            for j, k in ((1, "loaded"), (2, "gpu"), (3, "host"), (4, "disk"))}


def _loads_frame(log: EndpointLog) -> pd.DataFrame:
    import pandas as pd

    recs = log.loads
    return pd.DataFrame({
        "instance": np.array([x.instance for x in recs], dtype=np.int64),
        "model": np.array([x.model for x in recs], dtype=np.int64),
        "queued": np.array([x.queued for x in recs], dtype=float),
        "start": np.array([x.start for x in recs], dtype=float),
        "end": np.array([x.end if x.end >= 0 else np.nan for x in recs], dtype=float),
        "download_s": np.array([x.download_s for x in recs], dtype=float),
        "downloaded": np.array([x.downloaded >= 0 and x.download_s > 0 for x in recs], dtype=bool),
    })


def thrashing(log: EndpointLog, window: float, loads: pd.DataFrame | None = None) -> np.ndarray:
    """For each load, whether the same model was unloaded from the same instance
    within ``window`` seconds before it (a reload the cache could not keep). ``loads``: the log's
    :func:`_loads_frame`, where the caller has it."""
    loads = _loads_frame(log) if loads is None else loads
    out = np.zeros(len(loads), dtype=bool)
    if not log.unloads or not len(loads):
        return out
    last: dict[tuple[int, int], list[float]] = {}
    for t, inst, m in log.unloads:
        last.setdefault((inst, m), []).append(t)
    for k, (inst, m, q) in enumerate(zip(loads["instance"], loads["model"], loads["queued"])):
        ts = last.get((int(inst), int(m)))
        if ts:
            # bisect on the list (the log's times, in order): np.searchsorted would copy the whole
            # list into an array for each load, quadratic in a thrashing cache's reloads
            j = bisect_right(ts, q) - 1
            out[k] = j >= 0 and q - ts[j] <= window
    return out


def _block(lat_ok: np.ndarray, status: np.ndarray, cold: np.ndarray, duration: float, cost: float,
           met: np.ndarray | None, loads: int, tok: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Any]:
    """One summary block. ``met``: per request, whether it attained the SLO (None: no SLO); ``tok``: the
    TTFT and TPOT (ms) and output tokens of its requests served OK (NaN where a model has none)."""
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
    cold_n = int(cold[ok | (status == TIMEOUT)].sum())
    return {
        "requests": n,
        "completed": done,
        "failed": failed,
        "in_flight": in_flight,
        "p50_ms": _f(p50), "p90_ms": _f(p90), "p99_ms": _f(p99), "mean_ms": _f(mean),
        "throughput_per_s": done / duration,
        "cold_starts": loads,
        "cold_requests": int(cold.sum()),
        "cache_hit_rate": (1.0 - cold_n / started) if started else None,
        "cost_usd": cost,
        "cost_per_million_usd": cost / done * 1e6 if done else None,
        "slo_attainment": (float(met.sum()) / finished if finished else None) if met is not None else None,
        **_token_block(*tok, duration),
    }


def _token_block(ttft: np.ndarray, tpot: np.ndarray, out: np.ndarray, duration: float) -> dict[str, Any]:
    """TTFT and TPOT figures of the requests served OK that have them (None where none has)."""
    t = ttft[np.isfinite(ttft)]
    p = tpot[np.isfinite(tpot)]
    ttft_q = np.percentile(t, [50, 90, 99]) if len(t) else (None, None, None)
    tpot_q = np.percentile(p, [90, 99]) if len(p) else (None, None)
    return {
        "ttft_mean_ms": _f(t.mean()) if len(t) else None,
        "ttft_p50_ms": _f(ttft_q[0]), "ttft_p90_ms": _f(ttft_q[1]), "ttft_p99_ms": _f(ttft_q[2]),
        "tpot_mean_ms": _f(p.mean()) if len(p) else None,
        "tpot_p90_ms": _f(tpot_q[0]), "tpot_p99_ms": _f(tpot_q[1]),
        "output_tokens_per_s": float(out[np.isfinite(ttft)].sum()) / duration if len(t) else None,
    }


def _f(x) -> float | None:
    return None if x is None else float(x)


def _nan_none(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _cloudwatch(run: RawRun, e: int, t0: float, t1: float, cold_wait: np.ndarray) -> dict[str, Any]:
    """The endpoint's CloudWatch-named figures over the measured horizon; ``cold_wait``: the model loading
    waits (s) of its measured requests that waited for one."""
    sc = run.scenario
    ep = sc.endpoints[e]
    log = run.logs[e]
    loads = _loads_frame(log)
    lw = loads[(loads["queued"] >= t0) & (loads["queued"] < t1)]
    done = lw.dropna(subset=["end"])
    edges = np.array([t0, t1])
    # per instance holding its memory: in service or draining (a draining instance keeps what it loaded
    # until its last request ends)
    holding_s = float(_holding_s(log, edges)[0])
    mem = _memory_series(log, edges)
    gcap, hcap, dcap = log.capacity
    window = ep.cache.thrash_window if ep.mode == "mme" else 600.0
    th = thrashing(log, window, loads)[((loads["queued"] >= t0) & (loads["queued"] < t1)).to_numpy()]
    pct = lambda used, cap: float(100.0 * used / (cap * holding_s)) if cap > 0 and holding_s > 0 else None  # noqa
    return {
        "ModelCacheHit": None,  # filled from cache_hit_rate by the caller
        "ModelLoadingWaitTime_ms": float(cold_wait.mean() * 1e3) if len(cold_wait) else None,
        "ModelDownloadingTime_ms": float(done.loc[done["downloaded"], "download_s"].mean() * 1e3)
        if done["downloaded"].any() else None,
        "ModelLoadingTime_ms": float((done["end"] - done["start"]).mean() * 1e3) if len(done) else None,
        "ModelUnloadingTime_count": int(sum(1 for t, _, _ in log.unloads if t0 <= t < t1)),
        "LoadedModelCount": float(mem["loaded"][0] / holding_s) if holding_s > 0 else None,
        "LoadedModelCount_max": max((int(p[3]) for p in log.peaks.values()), default=None),
        "GPUMemoryUtilization": pct(mem["gpu"][0], gcap),
        "MemoryUtilization": pct(mem["host"][0], hcap),
        "DiskUtilization": pct(mem["disk"][0], dcap),
        "thrashing_index": float(th.mean()) if len(th) else 0.0,
    }


def slo_block(sc) -> dict[str, float]:
    """summary.json's ``slo``: the latency targets the scenario sets, in ms (``{"p99_ms": 500.0}``);
    empty when it sets none."""
    s = sc.spec.slo
    if s is None:
        return {}
    return {f"{k}_ms": getattr(s, k) * 1e3 for k in ("p50", "p90", "p99", "mean", "ttft", "tpot")
            if getattr(s, k) is not None}


# Where an SLO target is read in a summary block: the latency targets against the figure of their name,
# TTFT and TPOT against their P99 (as the worked examples size language models).
SLO_FIGURES = {"p50_ms": "p50_ms", "p90_ms": "p90_ms", "p99_ms": "p99_ms", "mean_ms": "mean_ms",
               "ttft_ms": "ttft_p99_ms", "tpot_ms": "tpot_p99_ms"}
SLO_LABELS = {"p50_ms": "P50", "p90_ms": "P90", "p99_ms": "P99", "mean_ms": "mean latency",
               "ttft_p99_ms": "TTFT P99", "tpot_p99_ms": "TPOT P99"}
SLO_MAX_FAILED = 0.01      # without a P99 target, more than 1% of the finished requests failed misses the SLO


def slo_misses(block: dict[str, Any], slo_ms: dict[str, float]) -> dict[str, float]:
    """What a summary block (an endpoint's, a model's or the total) misses of the SLO targets ``slo_ms``
    (summary.json's ``slo``: ``{"p99_ms": 5000.0}``): the rule of ``capsim compare`` and of the planner.
    Every figure within its target (TTFT and TPOT at their P99; where the block has no such requests,
    not judged): each one above it, as ``{key: figure}`` (inf where no request completed); with a P99
    target an attainment of 99% (failed requests count as misses): ``slo_attainment`` below it; without
    one at most SLO_MAX_FAILED of the finished requests failed: ``failed``, their share, above it.
    Empty: nothing missed, no target or no request."""
    out: dict[str, float] = {}
    if not slo_ms or not block.get("requests"):
        return out
    for key, target in slo_ms.items():
        fig = SLO_FIGURES.get(key)
        v = block.get(fig) if fig else None
        if v is None:
            if key in ("ttft_ms", "tpot_ms"):
                continue
            out[key] = math.inf
        elif v > target + 1e-9:
            out[key] = float(v)
    finished = block["requests"] - (block.get("in_flight") or 0)
    att = block.get("slo_attainment")
    if "p99_ms" in slo_ms and att is not None:
        if att < 0.99 - 1e-9:
            out["slo_attainment"] = float(att)
    elif finished > 0 and (block.get("failed") or 0) > SLO_MAX_FAILED * finished:
        out["failed"] = block["failed"] / finished
    return out


def slo_verdict(block: dict[str, Any], slo_ms: dict[str, float]) -> tuple[bool | None, list[str]]:
    """Whether a summary block meets the SLO targets ``slo_ms`` (:func:`slo_misses`), and why not. None:
    no target, or no request."""
    if not slo_ms or not block.get("requests"):
        return None, []
    misses = []
    for key, v in slo_misses(block, slo_ms).items():
        if key == "slo_attainment":
            misses.append(f"attainment {v:.1%} < 99%")
        elif key == "failed":
            misses.append(f"{v:.1%} of the requests failed")
        else:
            fig = SLO_FIGURES.get(key)
            label = SLO_LABELS.get(fig, key)
            misses.append(f"no request completed, so no {label}" if math.isinf(v)
                          else f"{label} {v:,.1f} ms > {slo_ms[key]:,.0f} ms")
    return not misses, misses


def _attained(slo, ok: np.ndarray, lat: np.ndarray, ttft: np.ndarray, tpot: np.ndarray) -> np.ndarray | None:
    """Per request, whether it was served OK within the SLO: its latency within the latency target, and its
    TTFT and TPOT within theirs where it has them. None without an SLO."""
    if slo is None or (slo.latency_target is None and slo.ttft is None and slo.tpot is None):
        return None
    met = ok.copy()
    if slo.latency_target is not None:
        met &= lat <= slo.latency_target * 1e3
    with np.errstate(invalid="ignore"):
        if slo.ttft is not None:
            met &= ~(ttft > slo.ttft * 1e3)   # NaN (no first token: another model) passes
        if slo.tpot is not None:
            met &= ~(tpot > slo.tpot * 1e3)
    return met


def summarize(run: RawRun, memo: dict | None = None) -> dict[str, Any]:
    """summary.json's figures (README, Outputs) for one run, over the measured horizon. ``memo``: a dict
    shared with :func:`timeline` on the same run, which then finds each endpoint's sorted busy periods
    here (:func:`device_series`)."""
    sc = run.scenario
    c = run.columns
    t0, t1 = sc.spec.warmup, sc.horizon
    duration = t1 - t0
    win = (c["arrival"] >= t0) & (c["arrival"] < t1)
    status = c["status"][win]
    cold = c["cold"][win]
    lat = (c["end"][win] - c["arrival"][win]) * 1e3
    ok = status == OK
    ttft, tpot = (x[win] for x in token_times(c))
    out_tok = c["output_tokens"][win]
    met = _attained(sc.spec.slo, ok, lat, ttft, tpot)
    if np.isfinite(ttft).any():
        tok = lambda m: (ttft[m], tpot[m], out_tok[m])  # noqa: E731
    else:   # no request has a first token (no language model): every block's token figures are None
        none = np.zeros(0)
        tok = lambda m: (none, none, none)  # noqa: E731
    model = c["model"][win]
    service = c["service"][win]
    load_s = c["load"][win]
    # Each endpoint's rows of the table, and of its measured part (one sort, not a pass per endpoint).
    rows = _endpoint_rows(run, memo)
    pos = np.cumsum(win) - 1    # a row's position among the measured rows

    ep_cost, ep_extra = [], []
    model_loads = np.zeros(len(sc.models), dtype=np.int64)
    for ep, log in zip(sc.endpoints, run.logs):
        serving_s, billed_s, peak = _fleet_integrals(log.fleet, t0, t1)
        ep_cost.append(pricing.cost(ep.instance_type, billed_s))
        ep_extra.append({"instance_hours": billed_s / 3600.0, "instances_mean": serving_s / duration,
                         "instances_max": peak})
        for rec in log.loads:
            if t0 <= rec.queued < t1:
                model_loads[rec.model] += 1

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
        "slo": slo_block(sc),
        "overall": _block(lat[ok], status, cold, duration, float(sum(ep_cost)), met, int(model_loads.sum()), tok(ok)),
        "endpoints": {},
        "models": {},
        "warnings": list(sc.warnings),
    }
    for e, ep in enumerate(sc.endpoints):
        sel = pos[rows[e][win[rows[e]]]]   # its measured rows, ascending
        sel_ok = sel[ok[sel]]
        loads_e = int(sum(model_loads[m] for m in ep.models))
        blk = _block(lat[sel_ok], status[sel], cold[sel], duration, ep_cost[e], None if met is None else met[sel],
                     loads_e, tok(sel_ok))
        blk.update(ep_extra[e])
        edges = np.array([t0, t1])
        dev = device_figures(run, e, edges, _holding_s(run.logs[e], edges), rows[e], memo)
        blk.update({k: _nan_none(v[0]) for k, v in dev.items()})
        # continuous batching: its sequences, its cache, its preemptions; null where no engine ran (an mme
        # instance that never loaded its language model), so that every replication has the same keys
        if run.logs[e].llm or any(getattr(sc.models[m], "llm", None) is not None for m in ep.models):
            blk.update({k: _nan_none(v[0]) for k, v in llm_series(run.logs[e], np.array([t0, t1])).items()})
            blk["preemptions"] = int(sum(1 for t in run.logs[e].preempted if t0 <= t < t1))
        if hasattr(run.logs[e], "summary_block"):
            blk.update(run.logs[e].summary_block(t0, t1))
        cw = _cloudwatch(run, e, t0, t1, load_s[sel[cold[sel]]])
        cw["ModelCacheHit"] = blk["cache_hit_rate"]
        cw["GPUUtilization"] = blk["gpu_utilization"]
        blk["cloudwatch"] = cw
        blk["thrashing_index"] = cw["thrashing_index"]
        by_status = np.bincount(status[sel], minlength=len(STATUS_NAMES))
        blk["failed_by_status"] = {STATUS_NAMES[k]: int(by_status[k]) for k in range(TIMEOUT, len(STATUS_NAMES))}
        out["endpoints"][ep.name] = blk
        if ep.mode == "mme" and loads_e and cw["thrashing_index"] > ep.cache.thrash_warning:
            out["warnings"].append(
                f"endpoint {ep.name}: thrashing: {cw['thrashing_index']:.0%} of model loads reload a model "
                f"unloaded in the previous {ep.cache.thrash_window / 60:g} min; the working set does not fit "
                "the cache: use a larger instance type or more instances")
    order = np.argsort(model.astype(np.int16) if len(sc.models) < 2 ** 15 else model, kind="stable")   # radix
    bounds = np.searchsorted(model[order], np.arange(len(sc.models) + 1))
    for m, mod in enumerate(sc.models):
        idx = order[bounds[m]:bounds[m + 1]]
        ok_i = idx[ok[idx]]
        out["models"][mod.name] = _block(lat[ok_i], status[idx], cold[idx], duration, model_cost(m),
                                         None if met is None else met[idx], int(model_loads[m]), tok(ok_i))
    out["warnings"] += outcome_warnings(out)
    return out


def outcome_warnings(summary: dict[str, Any]) -> list[str]:
    """Warnings read from a summary's endpoint figures: an endpoint where more than
    FAILED_SHARE_WARNING of the finished requests failed (with the statuses and what they say), or
    where more than BACKLOG_SHARE_WARNING of the requests are still in flight at the horizon."""
    out = []
    for name, b in summary["endpoints"].items():
        n, failed, in_flight = b.get("requests") or 0, b.get("failed") or 0, b.get("in_flight") or 0
        finished = n - in_flight
        if finished > 0 and failed > FAILED_SHARE_WARNING * finished:
            by = {k: v for k, v in (b.get("failed_by_status") or {}).items() if v and not k.endswith("_ci95")}
            top = max(by, key=by.get) if by else None
            counts = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1]))
            cause = f": {_FAILURE_CAUSES[top]}" if top in _FAILURE_CAUSES else ""
            if top == "no_capacity" and "preemptions" in b:
                # a continuous-batching engine refuses a request longer than a copy's whole KV cache
                cause += (", or were longer (prompt and output tokens) than a copy's KV cache holds: give the "
                          "copies more memory or shorten the requests")
            fix = ("; add instances (or copies), a larger instance type or autoscaling"
                   if top in ("timeout", "throttled") else "")
            out.append(f"endpoint {name}: {failed / finished:.1%} of its finished requests failed "
                       f"({counts or f'{failed:,.0f}'}){cause}{fix}")
        if n > 0 and in_flight > BACKLOG_SHARE_WARNING * n:
            out.append(f"endpoint {name}: {in_flight:,.0f} requests ({in_flight / n:.1%}) were still in flight at "
                       "the end of the run and are not in its figures: a backlog (more arrive than it serves), or "
                       "requests too long for the run")
    return out


def timeline(run: RawRun, memo: dict | None = None) -> pd.DataFrame:
    """One row per minute and endpoint (README, Outputs: timeline.csv), with the
    CloudWatch-named metrics of multi-model endpoints. ``memo``: as :func:`summarize`'s (each endpoint's
    entry is dropped once used)."""
    import pandas as pd

    sc = run.scenario
    c = run.columns
    horizon = sc.horizon
    edges = np.arange(0.0, horizon, MINUTE)
    edges = np.append(edges, horizon)
    width = np.diff(edges)
    rows = _endpoint_rows(run, memo)
    if memo is not None:
        memo.pop("endpoint_rows", None)
    frames = []
    for e, (ep, log) in enumerate(zip(sc.endpoints, run.logs)):
        sel = rows[e]        # its rows, ascending: the same figures as a filter over the table, in one sort
        arr = c["arrival"][sel]
        end = c["end"][sel]
        st = c["status"][sel]
        served = sel[((st == OK) | (st == TIMEOUT)) & ~np.isnan(c["start"][sel])]
        t = np.array([x[0] for x in log.fleet])
        serving_s = step_integral(t, [x[1] for x in log.fleet], edges)
        serving = serving_s / width
        billed = step_integral(t, [x[2] for x in log.fleet], edges)
        in_flight = (_count_integral(arr if _is_sorted(arr) else np.sort(arr, kind="stable"), edges)
                     - _count_integral(np.sort(end[np.isfinite(end)], kind="stable"), edges)) / width
        inv = _bin_counts(arr, edges)
        starts = c["start"][served]
        cold = c["cold"][served]
        hits = _bin_counts(starts[~cold], edges)
        tot = _bin_counts(starts, edges)
        wait_sum = np.histogram(starts[cold], bins=edges, weights=c["load"][served][cold])[0]
        wait_n = _bin_counts(starts[cold], edges)
        mem = _memory_series(log, edges)
        holding_s = _holding_s(log, edges)   # the memory figures: per instance holding it (as _cloudwatch's)
        gcap, hcap, dcap = log.capacity
        loads = _loads_frame(log)
        done = loads.dropna(subset=["end"])
        n_loads = _bin_counts(loads["queued"], edges)
        load_sum = np.histogram(done["end"], bins=edges, weights=done["end"] - done["start"])[0]
        load_n = _bin_counts(done["end"], edges)
        dl = done[done["downloaded"]]
        dl_sum = np.histogram(dl["end"], bins=edges, weights=dl["download_s"])[0]
        dl_n = _bin_counts(dl["end"], edges)
        unloads = _bin_counts([u[0] for u in log.unloads], edges)
        failures = _bin_counts([f[0] for f in log.failures], edges)
        it = ep.instance_type

        def ratio(a, b, scale=1.0):
            return np.where(b > 0, scale * a / np.where(b > 0, b, 1), np.nan)

        cols = {
            "t_s": edges[:-1],
            "endpoint": ep.name,
            "instances": serving,
            "instances_pending": np.maximum(billed / width - serving, 0.0),
            "invocations": inv,
            "in_flight": in_flight,
            "loaded_models": mem["loaded"] / width,
            "gpu_memory_utilization": ratio(mem["gpu"], gcap * holding_s),
            "model_cache_hit": ratio(hits, tot),
            "cost_usd": pricing.cost(it, billed),
            "cold_starts": n_loads,
            "failures": failures,
            "failed_requests": _bin_counts(end[st > TIMEOUT], edges),
            "ModelCacheHit": ratio(hits, tot),
            "ModelLoadingWaitTime_ms": ratio(wait_sum, wait_n, 1e3),
            "ModelDownloadingTime_ms": ratio(dl_sum, dl_n, 1e3),
            "ModelLoadingTime_ms": ratio(load_sum, load_n, 1e3),
            "ModelUnloadingTime_count": unloads,
            "LoadedModelCount": ratio(mem["loaded"], holding_s),
            "GPUMemoryUtilization": ratio(mem["gpu"], gcap * holding_s, 100.0),
            "MemoryUtilization": ratio(mem["host"], hcap * holding_s, 100.0),
            "DiskUtilization": ratio(mem["disk"], dcap * holding_s, 100.0),
        }
        dev = device_figures(run, e, edges, holding_s, sel, memo)
        if memo is not None:
            memo.pop(("busy_periods", e), None)
        cols["gpu_utilization"] = cols["GPUUtilization"] = dev["gpu_utilization"]
        cols["batch_size_mean"] = dev["batch_size_mean"]
        cols.update(llm_series(log, edges))
        extra = getattr(log, "timeline_columns", None)   # inference components: copies and packing
        if extra is not None:
            cols.update(extra(edges))
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each figure over replications, and ``<key>_ci95``: the half-width
    of its 95% confidence interval (Student t), when there are several. A figure that some replications
    have as null (undefined there: a percentile of no request served OK) is the mean over those that
    have it, its interval theirs (null with fewer than two; a warning says so); a key some replication
    lacks altogether is null, its interval too."""
    if len(summaries) == 1:
        return summaries[0]
    from scipy import stats   # here: a run of one replication never loads scipy.stats (2 s on a busy machine)

    r = len(summaries)
    partial: set[int] = set()   # how many replications had a figure that others had as null
    tq = {n: float(stats.t.ppf(0.975, n - 1)) for n in range(2, r + 1)}   # Student t's quantile, by count

    def merge(blocks: list[dict]) -> dict:
        out: dict[str, Any] = {}
        # every key of any replication: a figure one of them lacks is null in the mean
        for k in dict.fromkeys(k for b in blocks for k in b):
            vals = [b.get(k) for b in blocks]
            if any(isinstance(v, dict) for v in vals):
                out[k] = merge([v if isinstance(v, dict) else {} for v in vals])
                continue
            numbers = [v for v in vals if isinstance(v, (int, float))]
            if any(k not in b for b in blocks) or len(numbers) + vals.count(None) < r:
                # a key some replication lacks, or not a number (a name): null, or the first's
                out[k] = None if any(v is None for v in vals) else vals[0]
                if numbers:
                    out[f"{k}_ci95"] = None
                continue
            if not numbers:   # null in every replication
                out[k] = out[f"{k}_ci95"] = None
                continue
            if len(numbers) < r:
                partial.add(len(numbers))
            a = np.asarray(numbers, dtype=float)
            out[k] = float(a.mean())
            n = len(a)
            out[f"{k}_ci95"] = float(tq[n] * a.std(ddof=1) / math.sqrt(n)) if n > 1 else None
        return out

    first = summaries[0]
    out = {k: first[k] for k in ("scenario", "seed", "simulated_seconds", "warmup_seconds")}
    out["replications"] = r
    out["wall_seconds"] = float(sum(s["wall_seconds"] for s in summaries))
    out["slo"] = dict(first["slo"])
    out["overall"] = merge([s["overall"] for s in summaries])
    out["endpoints"] = {n: merge([s["endpoints"][n] for s in summaries]) for n in first["endpoints"]}
    out["models"] = {n: merge([s["models"][n] for s in summaries]) for n in first["models"]}
    # The scenario's warnings (the same in every replication) and each replication's own, but the
    # figures' warnings once, from the mean figures (each replication's would differ in their numbers).
    own = {w for s in summaries for w in outcome_warnings(s)}
    kept = dict.fromkeys(w for s in summaries for w in s.get("warnings", []) if w not in own)
    out["warnings"] = list(kept) + outcome_warnings(out)
    if partial:
        out["warnings"].append(
            f"some figures are undefined in some replications (no request served OK there): their means "
            f"and intervals are over the {', '.join(str(n) for n in sorted(partial))} of {r} replications "
            f"that have them")
    return out
