"""``capsim bench``: simulated requests per wall second on standard scenarios.

The SME case is also written the idiomatic SimPy way (a process per request
holding a ``simpy.Resource``) and run on the same arrivals, service times and
routing draws, to measure what requests-as-data buys.
"""
from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from .core.rng import Streams
from .scenario import parse_scenario
from .simulate import simulate
from .workload.build import build_workload


def _collect() -> None:
    """A full pass of the cyclic collector before a timed run: a finished run's objects stay in reference
    cycles until the collector's next full pass, which would otherwise fall in (and be timed with) a later
    case."""
    gc.collect()


# Timed runs of each rate case: the fastest counts (as timeit's): on this shared 2-core machine one run of the
# SME case took 1.9 to 2.6 s from one bench to the next, and the continuous-batching share of its rate
# read 0.22, 0.26 and 0.31 on three benches of the same code within ten minutes.
REPEAT = 3


def _timed(fn, repeat: int):
    """``fn()`` run ``repeat`` times (at least once), each after a full collection: (wall seconds, CPU
    seconds, result) of the fastest by wall."""
    best = None
    for _ in range(max(1, repeat)):
        _collect()
        t0, c0 = time.perf_counter(), time.process_time()
        res = fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu, res)
        del res
    return best


def sme_scenario(requests: float = 1.0e6, instances: int = 10, load: float = 0.7,
                 batching: dict | None = None, max_concurrency: int = 1) -> dict:
    """A standard SME: ``instances`` single-copy instances, random routing, M/M/1 each at ``load``; with
    ``batching`` (a slowdown curve), ``max_concurrency`` requests share each GPU and ``load`` is of the
    most the curve serves."""
    mean_s = 0.05
    speedup = 1.0
    service: dict[str, Any] = {"dist": "exponential", "mean": mean_s}
    if batching is not None:
        from .hosting.device import slowdown_table

        service["batching"] = {"slowdown": batching}
        speedup = max_concurrency / slowdown_table(batching)(max_concurrency)
    rate = load * instances * speedup / mean_s
    return {
        "name": "bench-sme",
        "seed": 1,
        "duration": requests / rate,
        "models": [{"name": "m", "size_gb": 1, "service": service,
                    "traffic": {"process": "poisson", "rate": rate}}],
        "endpoints": [{"name": "sme", "mode": "sme", "instance_type": "ml.g5.xlarge", "instances": instances,
                       "routing": "random", "max_concurrency": max_concurrency, "models": ["m"]}],
    }


# The batching case's curve: about what a small model shows on one GPU (throughput x2 at 4 in service).
BENCH_CURVE = {1: 1.0, 2: 1.3, 4: 2.0}


def _simpy_processes(arrival: np.ndarray, service: np.ndarray, u: np.ndarray, instances: int,
                     horizon: float) -> int:
    """The same system, a SimPy process per request; returns the requests completed."""
    env = simpy.Environment()
    servers = [simpy.Resource(env, capacity=1) for _ in range(instances)]
    done = [0]

    def request(k: int):
        with servers[int(u[k] * instances)].request() as req:
            yield req
            yield env.timeout(service[k])
        done[0] += 1

    def source():
        last = 0.0
        for k in range(len(arrival)):
            yield env.timeout(arrival[k] - last)
            last = arrival[k]
            env.process(request(k))

    env.process(source())
    env.run(until=horizon)
    return done[0]


def bench_sme(requests: float = 1.0e6, baseline_requests: float = 2.0e5, repeat: int = REPEAT) -> dict[str, Any]:
    sc = parse_scenario(sme_scenario(requests), source="bench-sme")
    wall, cpu, raw = _timed(lambda: simulate(sc), repeat)
    n = len(raw.columns["arrival"])
    del raw

    # Baseline on a shorter horizon of the same stream (a process per request is slow).
    scb = parse_scenario(sme_scenario(baseline_requests), source="bench-sme-baseline")
    streams = Streams(scb.spec.seed)
    wl = build_workload(scb, streams)
    u = streams.get("routing").random((len(wl), 2))[:, 0]
    base_wall = _timed(lambda: _simpy_processes(wl.arrival, wl.service, u, scb.endpoints[0].instances.start,
                                                scb.horizon), repeat)[0]
    nb = len(wl.arrival)
    rps, brps = n / wall, nb / base_wall
    return {"requests": n, "wall_seconds": wall, "requests_per_s": rps, "cpu_seconds": cpu,
            "cpu_requests_per_s": n / cpu, "baseline_requests": nb,
            "baseline_wall_seconds": base_wall, "baseline_requests_per_s": brps,
            "speedup_vs_simpy_processes": rps / brps}


def bench_batching(requests: float = 1.0e6, repeat: int = REPEAT) -> dict[str, Any]:
    """The SME case with 4 requests sharing each GPU (``service.batching``: processor sharing)."""
    sc = parse_scenario(sme_scenario(requests, batching=BENCH_CURVE, max_concurrency=4), source="bench-batching")
    wall, _, raw = _timed(lambda: simulate(sc), repeat)
    n = len(raw.columns["arrival"])
    return {"requests": n, "wall_seconds": wall, "requests_per_s": n / wall}


def llm_scenario(requests: float = 2.0e5, instances: int = 4, output: Any = None, rate: float | None = None,
                 step: Any = None) -> dict:
    """A language model (llama-2-7b's architecture) served with continuous batching on ``instances``
    single-GPU copies, given step coefficients (the roofline's order for an A10G), Poisson arrivals with
    lognormal prompts and outputs at about 60% of what max_num_seqs = 32 sustains. ``output``: the output
    tokens instead (a count or a distribution), ``rate``: the arrivals per second instead, ``step``: the
    step model instead."""
    rate = 2.0 * instances if rate is None else rate
    return {
        "name": "bench-llm",
        "seed": 1,
        "duration": requests / rate,
        "models": [{"name": "llm", "architecture": "llama-2-7b", "accelerators": 1,
                    "tokens": {"input": dict(LLM_INPUT),
                               "output": dict(LLM_OUTPUT) if output is None else output},
                    "service": {"continuous_batching": {
                        "max_num_seqs": 32, "max_num_batched_tokens": 2048,
                        "step": dict(LLM_STEP) if step is None else step}},
                    "traffic": {"process": "poisson", "rate": rate}}],
        "endpoints": [{"name": "llm", "mode": "sme", "instance_type": "ml.g5.2xlarge", "instances": instances,
                       "routing": "least_outstanding_requests", "models": ["llm"]}],
    }


LLM_INPUT = {"dist": "lognormal", "mean": 400, "cv": 1.0}
LLM_OUTPUT = {"dist": "lognormal", "mean": 150, "cv": 1.0}
LLM_STEP = {"base": "25ms", "per_prefill_token": "0.1ms", "per_decode_seq": "0.3ms", "per_kv_token": "0.02us"}


def llm_capacity(cfg, mean_input: float, mean_output: float) -> float:
    """About the requests per second one copy (``cfg``: its ``Model.llm``) sustains with prompts and
    outputs of these mean lengths: as many sequences decode as max_num_seqs and the KV cache hold (each
    the blocks of its prompt and output), each step at their mean context, and each request's prefill on
    top. An estimate, to set comparable loads: the simulation itself has no such formula."""
    per_seq = -(-int(mean_input + mean_output) // cfg.block_size)
    n = max(1, min(cfg.max_num_seqs, cfg.kv_blocks // per_seq))
    st = cfg.step
    decode = st.time(n, n * (mean_input + mean_output / 2.0), 0)
    prefill = st.time(0, 0, int(mean_input)) - st.time(0, 0, 0)
    return 1.0 / (max(mean_output - 1.0, 0.0) * decode / n + prefill)


def llm_output_scenario(output_tokens: int, requests: float = 5.0e4, instances: int = 4) -> dict:
    """:func:`llm_scenario` with every output ``output_tokens`` long, at the utilisation of the standard
    case (its arrival rate over :func:`llm_capacity` with its mean lengths): the longer the outputs, the
    fewer the requests per simulated second, for about the same load on the copies."""
    base = parse_scenario(llm_scenario(1.0e3, instances), source="bench-llm")
    cfg = base.models[0].llm
    mean_in = float(LLM_INPUT["mean"])
    load = 2.0 / llm_capacity(cfg, mean_in, float(LLM_OUTPUT["mean"]))   # per copy: 2 requests/s
    rate = load * instances * llm_capacity(cfg, mean_in, float(output_tokens))
    d = llm_scenario(requests, instances, output=int(output_tokens), rate=rate)
    d["name"] = f"bench-llm-{output_tokens}"
    return d


def day_scenario(rate: float = 10.0, instances: int = 4, seconds: float = 86400.0,
                 instance_type: str = "ml.g6e.xlarge") -> dict:
    """One simulated day (``seconds``) of a 7B language model (llama-2-7b's architecture, the roofline
    step of the instance's one GPU, vLLM's defaults otherwise) at ``rate`` requests per second on
    ``instances`` copies, prompts and outputs as :func:`llm_scenario`'s. On an ml.g6e.xlarge (L40S, 48 GB)
    that is about a quarter of what the copies sustain; an ml.g5.2xlarge (A10G, 24 GB: a KV cache of
    about 15,000 tokens) sustains about 2.7 such requests per second a copy, so 10 per second on 4 would
    be all but overloaded, its queue and preemptions growing all day."""
    d = llm_scenario(rate * seconds, instances, rate=rate)
    d["name"] = "bench-llm-day"
    d["models"][0]["service"] = {"continuous_batching": {"step": "roofline"}}
    d["endpoints"][0]["instance_type"] = instance_type
    return d


def _run_llm(d: dict, source: str, repeat: int = REPEAT) -> dict[str, Any]:
    sc = parse_scenario(d, source=source)
    wall, cpu, raw = _timed(lambda: simulate(sc), repeat)
    n = len(raw.columns["arrival"])
    tokens = int(raw.columns["output_tokens"].sum())
    ok = int((raw.columns["status"] == 1).sum())
    return {"requests": n, "completed": ok, "simulated_seconds": sc.horizon, "wall_seconds": wall,
            "requests_per_s": n / wall, "output_tokens_per_s": tokens / wall, "us_per_request": 1e6 * wall / n,
            "cpu_seconds": cpu, "cpu_requests_per_s": n / cpu, "cpu_us_per_request": 1e6 * cpu / n}


def bench_continuous_batching(requests: float = 2.0e5) -> dict[str, Any]:
    """The language-model case: continuous batching with a KV cache (:func:`llm_scenario`)."""
    return _run_llm(llm_scenario(requests), "bench-continuous-batching")


def bench_output_length(output_tokens: int, requests: float = 5.0e4) -> dict[str, Any]:
    """The language-model case with outputs of ``output_tokens`` (:func:`llm_output_scenario`): the wall
    time per request must not grow with the output (no event per token)."""
    d = llm_output_scenario(output_tokens, requests)
    out = _run_llm(d, f"bench-llm-{output_tokens}")
    out["output_tokens"] = int(output_tokens)
    out["rate_per_s"] = d["models"][0]["traffic"]["rate"]
    return out


def bench_day(rate: float = 10.0, instances: int = 4, seconds: float = 86400.0) -> dict[str, Any]:
    """One simulated day of :func:`day_scenario`: its wall seconds."""
    out = _run_llm(day_scenario(rate, instances, seconds), "bench-llm-day", repeat=1)
    out["rate_per_s"] = rate
    return out


def mme_scenario(requests: float = 1.0e6, instances: int = 4) -> dict:
    """A standard MME: 200 models with Zipf(1.0) popularity on ml.g5.xlarge instances
    that each cache about 20 of them, so a few percent of requests are cold."""
    mean_s = 0.02
    rate = 0.5 * instances * 4 / mean_s
    return {
        "name": "bench-mme",
        "seed": 1,
        "duration": requests / rate,
        "models": [{"name": "m-{i:03d}", "count": 200, "size_gb": 1.0, "init_time": 1.0,
                    "service": {"dist": "lognormal", "mean": mean_s, "cv": 1.0},
                    "traffic": {"process": "poisson", "rate": rate, "popularity": {"zipf": 1.0}}}],
        "endpoints": [{"name": "mme", "mode": "mme", "instance_type": "ml.g5.xlarge", "instances": instances,
                       "routing": "least_outstanding_requests", "max_concurrency": 4, "models": ["m-*"],
                       "cache": {"memory_fraction": 0.9}}],
    }


def bench_mme(requests: float = 1.0e6, repeat: int = REPEAT) -> dict[str, Any]:
    sc = parse_scenario(mme_scenario(requests), source="bench-mme")
    wall, _, raw = _timed(lambda: simulate(sc), repeat)
    n = len(raw.columns["arrival"])
    cold = float(raw.columns["cold"].mean())
    return {"requests": n, "wall_seconds": wall, "requests_per_s": n / wall, "cold_fraction": cold,
            "loads": len(raw.logs[0].loads)}


def bench_routing(routing: str, instances: int, requests: float = 1.0e5) -> dict[str, Any]:
    """The SME case on ``instances`` instances at load 0.7 routed by ``routing``: wall microseconds per
    simulated request (the whole simulation: arrivals, routing, service, completions)."""
    d = sme_scenario(requests, instances=instances)
    d["endpoints"][0]["routing"] = routing
    sc = parse_scenario(d, source=f"bench-routing-{routing}-{instances}")
    _collect()
    t0 = time.perf_counter()
    raw = simulate(sc)
    wall = time.perf_counter() - t0
    n = len(raw.columns["arrival"])
    return {"routing": routing, "instances": instances, "requests": n, "wall_seconds": wall,
            "us_per_request": wall / n * 1e6}


ROUTING_FLEETS = (1, 100, 1000)


def bench_routing_lor(requests: float = 1.0e5) -> dict[str, Any]:
    """Least outstanding requests against random routing at 1, 100 and 1,000 instances: microseconds per
    request of each (``lor_us_per_request``, ``random_us_per_request``: {instances: us})."""
    out: dict[str, Any] = {"lor_us_per_request": {}, "random_us_per_request": {}}
    for n in ROUTING_FLEETS:
        for key, policy in (("lor", "least_outstanding_requests"), ("random", "random")):
            out[f"{key}_us_per_request"][n] = bench_routing(policy, n, requests)["us_per_request"]
    return out


def bench_sweep(points: int = 16, scale: float = 1.0, workers: int | None = None) -> dict[str, Any]:
    """A ``points``-point sweep (each point an SME of about 2 x 10^5 requests x ``scale``), serial in
    this process against a local process pool of ``workers`` (default: one per core); the fastest of
    two alternating runs of each counts, so a burst of other load on the machine weighs less. The
    pool pays its start (forking, importing capsim in each worker) inside the timing."""
    from .plan.sweep import bench_parallel

    r = bench_parallel(points=points, workers=workers, duration=1800.0 * scale, repeat=2)
    return {**r, "sweep_serial_s": r["serial_seconds"], "sweep_parallel_s": r["parallel_seconds"],
            "sweep_speedup": r["speedup"]}


# A day of a 100-model fleet (SME, MME and IC endpoints, autoscaled; about 8.6 million requests).
FLEET_SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "fleet_100_models_day.yaml"


def bench_fleet(share: float = 1 / 24, plots: bool = True) -> dict[str, Any]:
    """``capsim run`` of :data:`FLEET_SCENARIO`, its whole day (63 endpoints, 1,470 minutes of timeline)
    with every model's traffic scaled by ``share`` (1/24: about 360,000 requests), phase by phase:
    wall seconds of the simulation, the summary, the request table, the timeline and the save (summary.json,
    requests.parquet, timeline.csv and, with ``plots``, plots/), and their total."""
    import tempfile

    import yaml

    from .api import Result
    from .metrics import finalize_status, requests_frame, summarize, timeline
    from .scenario.units import parse_rate

    d = yaml.safe_load(FLEET_SCENARIO.read_text())
    for m in d["models"]:
        m["traffic"]["rate"] = parse_rate(m["traffic"]["rate"]) * share
    sc = parse_scenario(d, source=str(FLEET_SCENARIO))
    out: dict[str, Any] = {"share": share, "endpoints": len(sc.endpoints), "models": len(sc.models)}
    t = time.perf_counter()
    raw = simulate(sc)
    out["simulate_s"] = time.perf_counter() - t
    out["requests"] = int(len(raw.columns["arrival"]))
    t = time.perf_counter()
    finalize_status(raw)
    memo: dict = {}     # as sim.api.run
    summary = summarize(raw, memo)
    out["summary_s"] = time.perf_counter() - t
    t = time.perf_counter()
    requests = requests_frame(raw)
    out["requests_frame_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tl = timeline(raw, memo)
    out["timeline_s"] = time.perf_counter() - t
    del raw
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        Result(sc, summary, requests, tl, [summary]).save(Path(tmp) / "run", plots=plots)
        out["save_s"] = time.perf_counter() - t
    out["total_s"] = sum(out[k] for k in ("simulate_s", "summary_s", "requests_frame_s", "timeline_s", "save_s"))
    return out


def run_bench(cases: tuple[str, ...] = ("sme", "mme", "batching", "continuous_batching", "continuous_batching_day"),
              scale: float = 1.0) -> dict[str, Any]:
    """All benchmark cases (``"sweep"``: :func:`bench_sweep`); the SME case's figures are also at
    the top level, the batching cases' as ``batching: {requests_per_s}`` and ``continuous_batching:
    {requests_per_s, output_tokens_per_s, cpu_requests_per_s, share_of_sme_rate, cpu_share_of_sme_rate,
    us_per_request_100_tokens, us_per_request_2000_tokens}`` (the shares: its rate over the SME case's, by
    wall time and by the process's CPU time, which other work on the machine disturbs less; the last two:
    :func:`bench_output_length`), the simulated day of :func:`day_scenario` as
    ``continuous_batching_day_s`` (its wall seconds; a ``scale`` below 1 simulates that share of the day), the
    fleet's (``"fleet"``: :func:`bench_fleet` at 1/24 of its traffic x ``scale``) as ``fleet_run_s``, and the
    sweep's as ``sweep_serial_s``, ``sweep_parallel_s``, ``sweep_speedup``. Each rate case (SME, MME,
    batching, continuous batching, its output lengths) is timed ``REPEAT`` times and its fastest run
    counts (``timed_runs``); the simulated day once."""
    out: dict[str, Any] = {"cases": {}, "timed_runs": REPEAT}
    if "sme" in cases:
        sme = bench_sme(1.0e6 * scale, 2.0e5 * scale)
        out["cases"]["sme"] = sme
        for k in ("requests_per_s", "cpu_requests_per_s", "baseline_requests_per_s", "speedup_vs_simpy_processes"):
            out[k] = sme[k]
    if "mme" in cases:
        out["cases"]["mme"] = bench_mme(1.0e6 * scale)
        out["mme_requests_per_s"] = out["cases"]["mme"]["requests_per_s"]
    if "batching" in cases:
        b = out["cases"]["batching"] = bench_batching(1.0e6 * scale)
        out["batching"] = {"requests_per_s": b["requests_per_s"]}
    if "continuous_batching" in cases:
        b = out["cases"]["continuous_batching"] = bench_continuous_batching(2.0e5 * scale)
        cb = out["continuous_batching"] = {"requests_per_s": b["requests_per_s"],
                                           "output_tokens_per_s": b["output_tokens_per_s"],
                                           "cpu_requests_per_s": b["cpu_requests_per_s"]}
        if "sme" in cases:   # its rate against the SME path's, by wall and by CPU time (the latter steadier
            # on a machine that other work loads)
            cb["share_of_sme_rate"] = b["requests_per_s"] / out["requests_per_s"]
            cb["cpu_share_of_sme_rate"] = b["cpu_requests_per_s"] / out["cpu_requests_per_s"]
        for tokens in (100, 2000):
            c = out["cases"][f"continuous_batching_{tokens}_tokens"] = bench_output_length(tokens, 5.0e4 * scale)
            cb[f"us_per_request_{tokens}_tokens"] = c["us_per_request"]
    if "continuous_batching_day" in cases:
        d = out["cases"]["continuous_batching_day"] = bench_day(10.0, 4, 86400.0 * min(scale, 1.0))
        out["continuous_batching_day_s"] = d["wall_seconds"]
    if "routing_lor" in cases:
        lor = out["cases"]["routing_lor"] = bench_routing_lor(1.0e5 * scale)
        out["routing_lor"] = {"us_per_request": lor["lor_us_per_request"],
                              "random_us_per_request": lor["random_us_per_request"]}
    if "fleet" in cases:
        f = out["cases"]["fleet"] = bench_fleet(min(scale, 1.0) / 24)
        out["fleet_run_s"] = f["total_s"]
    if "sweep" in cases:
        sw = bench_sweep(scale=scale)
        out["cases"]["sweep"] = sw
        for k in ("sweep_serial_s", "sweep_parallel_s", "sweep_speedup"):
            out[k] = sw[k]
    return out
