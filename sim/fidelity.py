"""Sim-to-real fidelity: the simulator against a real serving testbed on the same plan and arrivals.

For each case of a built-in suite, capsim writes the testbed's plan (PLAN.json)
and the case's exact arrivals (as ``capsim trace`` does), runs the testbed
(``python -m calibration testbed``: real processes, real safetensors files,
real torch inference, loads on demand and LRU eviction, a router), which
first probes each model's cold start and request time on this machine. Then
the simulator runs the same plan on the same arrivals, its service times and
load times taken from that probe (never from the measured run), and the two
request tables are summarised the same way. The error of each figure is
``(simulated - measured) / measured``; the hit rate's in percentage points.

A language-model case (``llm_conversation``) serves a llama-like decoder with a real
continuous-batching loop (calibration/testbed/llm.py); the simulator runs it as the README's language
model, its step time fitted on the testbed's calibration replays, and the comparison adds TTFT and
TPOT.

The simulator never imports torch: the testbed runs as a subprocess, and
``fidelity_of(measured.json)`` compares a testbed run made elsewhere (a GPU box).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .scenario import parse_scenario
from .workload.build import arrivals_frame

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "scenarios" / "traces"
PLAN_SCHEMA = "capsim.testbed-plan/1"
FIGURES = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s", "cold_starts", "hit_rate")
# A language model's (a continuous-batching plan): time to first token and time per output token, beside
# the end-to-end figures above.
LLM_FIGURES = ("ttft_p50_ms", "ttft_p99_ms", "ttft_mean_ms", "tpot_p50_ms", "tpot_p99_ms", "tpot_mean_ms")
SIM_REPLICATIONS = 5   # the simulator's figures: the mean over this many service draws
# Tolerances of the acceptance checks (relative, and points for the hit rate).
QUICK_TOLERANCE = {"p50": 0.15, "p99": 0.15, "cold_starts": 0.15, "hit_rate_pp": 3.0}
FULL_TOLERANCE = {"p50": 0.05, "p99": 0.10, "cold_starts": 0.05, "hit_rate_pp": 2.0}
Log = Callable[[str], None]
# A testbed run measures its machine's noise (measured.json's ``noise``): the cores other processes
# used during the measured replay, how far the speed moved between the calibration replay before it
# and the one after, and how far the measured replay's speed was from theirs. Above any bound the
# run measured the neighbours, or the machine's wandering speed, as much as the serving system (a
# load average of 4 on this 2-core machine took the quick suite's P99 errors past 50%): a case
# outside its tolerance on such runs is judged "too noisy", not "outside".
NOISY_NEIGHBOUR_SHARE = 0.25    # of the machine's cores
NOISY_DRIFT = 0.10              # relative change of the request time's median between the calibrations,
                                # or between them and the measured replay (``level_gap``)
# Known gaps: a case's figures that the README's "Limits that still hold" lists as not yet modelled,
# each with a bound above the worst error recorded for it on the mean of a suite's runs
# (docs/fidelity-history.md). A case whose only misses are these, each within its bound, is judged a
# "known gap", not "outside"; any other miss, or a known gap past its bound (a regression, not the
# known limit), is still "outside".
_SHARED_TAIL = ("CPU workers sharing cores: the simulated P99 is short of the measured on most runs, by up to a "
                "half, and long on some (README, Limits that still hold)")
_SHARED_MEDIAN = ("the shared-device cases' median follows the machine's speed during the measured replay against its "
                  "calibrations' (README, Limits that still hold)")
_LLM_OFF = ("the language model's simulated latency follows this machine's speed during the measured replay against "
            "its calibrations' (about -2.7 times that gap at P50), and a 60 s replay's tail is one draw of its slow "
            "stretches (README, Limits that still hold)")
KNOWN_GAPS: dict[str, dict[str, tuple[float, str]]] = {
    # worst on a mean: P50 +12.1% and -12.0%, P99 -35.4% and +28.3% (sme_concurrent) and -58.5% (mme_shared, its
    # whole replay, the first second's loads in it: -35.2% from 1 s on)
    "sme_concurrent": {"p50": (0.25, _SHARED_MEDIAN), "p99": (0.60, _SHARED_TAIL)},
    "mme_shared": {"p50": (0.25, _SHARED_MEDIAN), "p99": (0.75, _SHARED_TAIL)},
    # worst on a mean: P50 -18.8%, P99 -38.0%, TTFT P50 +14.6% (and -14.0%), TTFT P99 -59.3%,
    # TPOT P50 -21.0%, TPOT P99 -20.8%
    "llm_conversation": {"p50": (0.25, _LLM_OFF), "p99": (0.55, _LLM_OFF), "ttft_p50": (0.25, _LLM_OFF),
                         "ttft_p99": (0.75, _LLM_OFF), "tpot_p50": (0.30, _LLM_OFF), "tpot_p99": (0.30, _LLM_OFF)},
}
# A replay's start: its first second, longer while the loads begun in it last. An MME case's first
# requests wait for its models' first loads, and on the testbed those loads share the cores with the
# requests in service (their service runs 1.6-2.9x its steady median meanwhile); the 1% slowest
# requests of a 60 s replay can all fall there. ``settled`` reports the P99 from then on beside the
# whole replay's (the verdict stays the whole replay's).
SETTLE_S = 1.0


@dataclass(frozen=True)
class Case:
    """A fidelity case: a testbed plan, its models and a traffic process (scenario schema v1)."""

    name: str
    what: str
    plan: dict[str, Any]                 # PLAN.json less the models
    models: list[dict[str, Any]]         # testbed models: name, family, params, seq_len, memory_gb
    traffic: dict[str, Any]              # the group's traffic, as in a scenario file
    seconds: tuple[float, float]         # replayed span: quick, full
    popularity: Any = "uniform"
    token_scale: float | None = None     # a language model's: the trace's token counts times this


def is_llm(plan: dict[str, Any]) -> bool:
    """A plan that serves a language model with continuous batching (calibration/testbed/llm.py)."""
    return plan.get("mode") == "continuous_batching"


def _models(n: int, params: str, memory_gb: float, seq_len: int = 64) -> list[dict[str, Any]]:
    return [{"name": f"m-{k:02d}", "family": "encoder", "params": params, "seq_len": seq_len,
             "memory_gb": memory_gb} for k in range(n)]


# The request time the cases' rates were set for (this development machine on 2026-12-01, where
# sme_warm's 36/s is 45% load). The testbed stretches the arrivals' times by its own request time
# over it (capsim.testbed-plan/1's reference_request_s), so a case keeps its load, and what it
# checks, on a machine faster or slower than that one: this one's request median has ranged over
# 7.7-22 ms from one day to the next.
REFERENCE_REQUEST_S = 0.0125
# And the cold start they were written for (this machine's loads take 4.8-5.5 request times): an
# mme case's stretch counts its expected misses' loads too, so that it keeps its load where loads
# and requests speed up unalike (on a GPU a request of these small models is over ten times faster,
# a load from disk not).
REFERENCE_LOAD_S = 0.061
# And the language-model case's reference step (8 sequences decoding at 64 tokens of context, on its
# 5M decoder, one thread), on this machine on 2026-12-06: its arrivals stretch by the testbed's own
# over it, as the others' by their request time.
REFERENCE_STEP_S = 0.0055

# Sized for a 2-core machine. The testbed's instances share one host, which
# real instances do not: two instances serving at once there slow each other
# down (about +20% per request here, memory bandwidth and caches), a contention
# the simulator rightly does not model. So each case has one instance (one torch
# thread, one worker: requests and loads take turns), and the router and load
# generator have the other core.
CASES: dict[str, Case] = {c.name: c for c in (
    Case("sme_warm", "one warm model, Poisson arrivals at ~45% load: queueing only",
         {"mode": "sme", "instances": 1, "memory_budget_gb": 0.2, "routing": "least_outstanding_requests"},
         _models(1, "8M", 0.1), {"process": "poisson", "rate": "36/s"}, (60.0, 240.0)),
    Case("mme_thrash", "one instance caching 3 of 8 models (Zipf 0.8): the working set does not fit",
         {"mode": "mme", "instances": 1, "memory_budget_gb": 0.3, "routing": "random"},
         _models(8, "8M", 0.1), {"process": "poisson", "rate": "12/s"}, (60.0, 240.0),
         popularity={"zipf": 0.8}),
    Case("azure_code_burst", "the Azure LLM code trace (inter-arrival CV ~13) at a third of its span, one warm model",
         {"mode": "sme", "instances": 1, "memory_budget_gb": 0.2, "routing": "least_outstanding_requests"},
         _models(1, "8M", 0.1),
         {"process": "trace", "path": str(TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"),
          "format": "azure_llm", "rate_scale": 3.0}, (60.0, 240.0)),
    # Requests sharing a device: the instance's workers are threads of one process whose torch
    # calls run at once on the cores; the testbed's calibration measures how much slower each runs
    # with k in service (``probe.concurrency``) and the simulator runs the device as processor
    # sharing with that curve (service.batching).
    Case("sme_concurrent", "one warm model serving up to 4 requests at once (4 workers share the cores), "
         "Poisson at ~70% of one worker's capacity: requests overlap",
         {"mode": "sme", "instances": 1, "memory_budget_gb": 0.2, "routing": "least_outstanding_requests",
          "max_concurrency": 4, "instance_concurrency": 4},
         _models(1, "8M", 0.1), {"process": "poisson", "rate": "56/s"}, (60.0, 240.0)),
    Case("mme_shared", "one instance holding 4 models, serving up to 4 requests at once over them (2 per model): "
         "several models busy at once on one device",
         {"mode": "mme", "instances": 1, "memory_budget_gb": 0.4, "routing": "random",
          "max_concurrency": 2, "instance_concurrency": 4},
         _models(4, "8M", 0.1), {"process": "poisson", "rate": "56/s"}, (60.0, 240.0)),
    # A language model served with continuous batching (calibration/testbed/llm.py): one serving loop
    # steps a KV-cached 5M llama-like decoder over up to 16 sequences and 256 tokens a step (chunked
    # prefill), on the conversation trace's arrivals and token counts, both scaled down so that this
    # CPU serves it at a moderate load: at 4x the trace's rate the simulator, with this machine's fit,
    # puts the median TPOT at 1.5x that of a request alone and the TTFT's P99 near 100 ms; at 6x
    # the queue builds (TTFT P99 8x).
    # The simulator's step time: the coefficients fitted on the testbed's calibration replays.
    Case("llm_conversation", "the Azure LLM conversation trace (token counts x1/8, rate x4) served by a "
         "continuous-batching loop on a 5M llama-like decoder: TTFT, TPOT and end to end",
         {"mode": "continuous_batching", "instances": 1, "memory_budget_gb": 1.0, "max_num_seqs": 16,
          "max_num_batched_tokens": 256, "timeout_s": 120.0},
         [{"name": "m-00", "family": "llama", "params": "5M", "memory_gb": 0.02}],
         {"process": "trace", "path": str(TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"),
          "format": "azure_llm", "rate_scale": 4.0}, (60.0, 240.0), token_scale=0.125),
)}


# -- the plan and the arrivals -------------------------------------------------------------------------------------
def plan_of(case: Case) -> dict[str, Any]:
    """PLAN.json for the testbed (capsim.testbed-plan/1)."""
    if is_llm(case.plan):
        return {"schema": PLAN_SCHEMA, "name": case.name, "reference_step_s": REFERENCE_STEP_S, **case.plan,
                "models": case.models}
    return {"schema": PLAN_SCHEMA, "name": case.name, "reference_request_s": REFERENCE_REQUEST_S,
            "reference_load_s": REFERENCE_LOAD_S, **case.plan,
            "models": case.models}


def _arrival_scenario(case: Case, seconds: float, seed: int) -> dict[str, Any]:
    """A scenario whose workload is the case's arrivals (its service is a placeholder: arrivals do not
    depend on it, each subsystem has its own random stream)."""
    return {"name": case.name, "seed": seed, "duration": seconds, "warmup": 0,
            "instance_types": [_instance_type(case.plan)],
            "models": [{"name": "m-{i:02d}", "count": len(case.models), "size_gb": 0.1,
                        "accelerators": 0, "service": {"dist": "deterministic", "mean": 0.01},
                        "traffic": {**case.traffic, "popularity": case.popularity}}],
            "endpoints": [{"name": case.name, "mode": "mme", "instance_type": "testbed.cpu",
                           "models": ["m-*"], "cache": {"host_reserve": 0}}]}


def arrivals_of(case: Case, quick: bool = True, seed: int = 0) -> pd.DataFrame:
    """The case's exact arrivals (arrival_s, model), as ``capsim trace`` writes them; a language
    model's with its requests' token counts (``input_tokens``, ``output_tokens``: the trace's times
    the case's ``token_scale``, rounded, at least 1)."""
    sc = parse_scenario(_arrival_scenario(case, case.seconds[0 if quick else 1], seed), source=case.name)
    df = arrivals_frame(sc)
    if case.token_scale is None:
        return df[["arrival_s", "model"]]
    out = df[["arrival_s", "model"]].copy()
    for col in ("input_tokens", "output_tokens"):
        out[col] = np.maximum(1, np.rint(df[col].to_numpy(dtype=float) * case.token_scale)).astype(np.int64)
    return out


# -- the simulator's side -----------------------------------------------------------------------------------------
def _instance_type(plan: dict[str, Any]) -> dict[str, Any]:
    # The testbed's instance: host memory is the model cache (no GPU tier on a CPU plan); artifacts are
    # on local disk from the start (a download and a disk read as good as free: the probe's cold start
    # time holds the whole load, file to warm module).
    return {"name": "testbed.cpu", "gpus": 0, "vcpus": max(os.cpu_count() or 1, 1),
            "memory_gb": plan["memory_budget_gb"], "price_per_hour": 1.0, "storage": "nvme",
            "storage_gb": 1000, "disk_read_gbs": 1e6, "network_gbps": 1e6}   # the schema's ceilings


def _path_s(prof: dict, path: str, gb: float, where: str) -> float:
    fit = (prof["fits"].get("load") or {}).get(path)
    if not fit:
        raise FidelityError(f"{where}: the profile has no fits.load.{path}, which the testbed's loads take")
    return float(fit["a_s"]) + gb / float(fit["bandwidth_gbs"])


def profile_model(prof: dict, path: Path, m: dict[str, Any], p: dict[str, Any], device: str) -> dict[str, Any]:
    """A testbed model's service and cold start as a calibration profile predicts them: the
    calibrated service of its family and size at its request's tokens, and a load as the testbed
    makes one: the module built and its state dict loaded (``build_module``: safetensors'
    ``load_file`` maps the file, in the page cache, and the copy happens there), on a GPU copied
    there (``host_to_gpu_pageable``), then one warm-up request."""
    where = str(path)
    tokens = {"input": int(m.get("seq_len", 64)),
              "output": 0 if m["family"] == "encoder" else int(m.get("output_tokens", 8))}
    from .catalog import load_catalog
    from .profile import ProfileError, service_model

    try:
        svc, _ = service_model(prof, m["family"], m["params"], catalog=load_catalog(), target_gpu=None, where=where)
    except ProfileError as e:
        raise FidelityError(str(e)) from None
    warm_up_s = 1e-3 * svc.rest_ratio * (svc.base_ms + svc.per_input_token_ms * tokens["input"]
                                         + svc.per_output_token_ms * tokens["output"])
    load = _path_s(prof, "build_module", p["param_gb"], where) + warm_up_s
    if device.startswith("cuda"):
        load += _path_s(prof, "host_to_gpu_pageable", p["param_gb"], where)
    return {"service": {"profile": str(Path(path).resolve()), "family": m["family"], "params": m["params"]},
            "tokens": tokens, "init_time": load}


def read_profile(path: Path) -> dict[str, Any]:
    """A calibration profile, or FidelityError naming the file."""
    from .profile import ProfileError, load_profile

    try:
        return load_profile(path)
    except (OSError, ProfileError, ValueError) as e:
        raise FidelityError(f"{path}: cannot use it as a calibration profile: {e}") from None


def concurrency_of(plan: dict[str, Any]) -> int:
    """The most requests an instance of a testbed plan has in service at once."""
    return min(plan.get("instance_concurrency", 1), plan.get("max_concurrency", 1) * len(plan["models"]))


def slowdown_of(measured: dict[str, Any]) -> dict[int, float] | None:
    """The slowdown with concurrency a testbed run's calibration measured (``probe.concurrency``), as
    ``service.batching.slowdown``, for a plan whose instances serve more than one request at once;
    None otherwise (and for a run recorded before the testbed measured it: its requests then run at
    full speed in company, as before)."""
    if concurrency_of(measured["plan"]) <= 1:
        return None
    c = (measured["probe"].get("concurrency") or {}).get("slowdown")
    if not c:
        return None
    return {int(k): (1.0 if int(k) == 1 else float(v)) for k, v in sorted(c.items(), key=lambda kv: int(kv[0]))}


LLM_ENDPOINT_CONCURRENCY = 100_000


def llm_scenario_of(measured: dict[str, Any], arrivals_csv: Path) -> dict[str, Any]:
    """The simulator's scenario of a continuous-batching testbed run (README, "Language models"):
    the served decoder's ``architecture`` as a mapping of its numbers, its requests' ``tokens`` from
    the arrivals (their ``input_tokens`` and ``output_tokens`` columns), and
    ``service.continuous_batching`` with the server's ``max_num_seqs`` and
    ``max_num_batched_tokens`` and, as ``step``, the coefficients fitted on the steps of the testbed's
    calibration replays (``probe.step``), never on the measured replay's. The instance: this machine
    as one device whose memory is the plan's budget, ample for the weights and every sequence's KV
    cache (the server never preempts)."""
    plan, probe = measured["plan"], measured["probe"]
    shape, step = probe["shape"], probe["step"]
    span = max(measured["requests"]["arrival_s"], default=0.0)
    dtype_bytes = int(probe["dtype_bytes"])
    arch = {"params": int(shape["params"]), **{k: int(shape[k]) for k in ("layers", "hidden", "heads", "kv_heads",
                                                                          "intermediate", "vocab")},
            "dtype_bytes": dtype_bytes}
    m = plan["models"][0]
    model = {"name": m["name"], "size_gb": shape["params"] * dtype_bytes / 1e9, "accelerators": 1,
             "architecture": arch,
             "service": {"continuous_batching": {
                 "max_num_seqs": plan["max_num_seqs"], "max_num_batched_tokens": plan["max_num_batched_tokens"],
                 "step": {k: float(step[k]) for k in ("base", "per_prefill_token", "per_decode_seq",
                                                      "per_kv_token")}}},
             "traffic": {"process": "trace", "path": str(arrivals_csv), "format": "csv"}}
    itype = {**_instance_type(plan), "gpus": 1, "gpu_memory_gb": plan["memory_budget_gb"],
             "memory_gb": max(plan["memory_budget_gb"], 1.0)}
    # every request goes to the engine's own queue at once, as the server's loop takes them all (its
    # admission is max_num_seqs and the token budget, not the endpoint's concurrency)
    ep = {"name": plan["name"], "mode": "sme", "instance_type": "testbed.cpu", "instances": 1,
          "max_concurrency": LLM_ENDPOINT_CONCURRENCY, "timeout": plan["timeout_s"], "models": [m["name"]]}
    return {"name": plan["name"], "seed": 0, "duration": span + plan["timeout_s"] + 60.0, "warmup": 0,
            "instance_types": [itype], "models": [model], "endpoints": [ep]}


def scenario_of(measured: dict[str, Any], arrivals_csv: Path, profile: Path | None = None) -> dict[str, Any]:
    """The simulator's scenario of a testbed run: its plan, its arrivals, and the service and load
    times of its calibration replays, or of a calibration ``profile`` (``capsim calibrate``'s). Where
    the plan's instances serve several requests at once, the models' service takes the slowdown with
    concurrency the calibration measured (``slowdown_of``) as ``service.batching``: an instance is
    one device, shared by every request in service there, whatever its model."""
    plan = measured["plan"]
    if is_llm(plan):
        if profile is not None:
            raise FidelityError(f"{profile}: a language-model case takes its step time from the testbed's own "
                                "calibration replays; --profile applies to the other cases")
        return llm_scenario_of(measured, arrivals_csv)
    probe = measured["probe"]["models"]
    span = max(measured["requests"]["arrival_s"], default=0.0)
    prof = None if profile is None else read_profile(profile)
    device = (measured.get("metadata") or {}).get("device") or "cpu"
    if prof is not None and (prof["metadata"].get("device") or "cpu") != device.split(":")[0]:
        raise FidelityError(f"{profile}: measured on {prof['metadata'].get('device')}, but the testbed ran on "
                            f"{device}: calibrate where the testbed runs")
    curve = slowdown_of(measured)
    models = []
    for m in plan["models"]:
        p = probe[m["name"]]
        if prof is not None:
            pm = profile_model(prof, profile, m, p, device)
            models.append({"name": m["name"], "size_gb": m["memory_gb"], "memory_gb": m["memory_gb"],
                           "host_memory_gb": 0, "accelerators": 0, "init_time": pm["init_time"],
                           "service": pm["service"], "tokens": pm["tokens"],
                           "traffic": {"process": "trace", "path": str(arrivals_csv), "format": "csv"}})
            continue
        svc = np.asarray(p["service_s"], dtype=float)
        service: dict[str, Any] = {"dist": "empirical"}
        sus = p.get("sustained")
        if sus:
            # The calibration's times, each divided by its sustained-load factor: the draws at rest.
            # (A run from before the rest time constant has only each sample's busy time.)
            f, tau, rest = sus["factor"], sus["time_constant_s"], sus.get("rest_time_constant_s")
            w = np.asarray(p["service_warmth"] if rest is not None else
                           np.exp(-np.asarray(p["service_busy_s"], dtype=float) / tau), dtype=float)
            svc = svc / (f + (1.0 - f) * w)
            service["sustained"] = {"factor": f, "time_constant": tau, "rest_time_constant": rest}
        # The measured times themselves, with each calibration replay's level (its median) counting
        # alike: one replay runs before the measured one and one after, so the machine's drift
        # between them cancels whatever their sizes; the shape (a tail heavier than a lognormal's
        # here) is their times about their medians.
        _, rep = np.unique(p.get("service_replay") or np.zeros(svc.size), return_inverse=True)
        med = np.array([np.median(svc[rep == k]) for k in range(rep.max() + 1)])
        service["samples"] = (svc / med[rep] * med.mean()).tolist()
        if curve is not None:
            service["batching"] = {"slowdown": curve}
        # A load's time: alone, where the simulator slows it by the requests beside it (a curve; a run
        # from before load_alone_s has the loads as measured)
        loads = p.get("load_alone_s") if curve is not None else None
        models.append({"name": m["name"], "size_gb": m["memory_gb"], "memory_gb": m["memory_gb"],
                       "host_memory_gb": 0, "accelerators": 0, "init_time": float(np.median(loads or p["load_s"])),
                       "service": service,
                       "traffic": {"process": "trace", "path": str(arrivals_csv), "format": "csv"}})
    # One group per model: the trace's model column sends each request to its model.
    ep: dict[str, Any] = {"name": plan["name"], "mode": plan["mode"], "instance_type": "testbed.cpu",
                          "instances": plan["instances"], "routing": plan["routing"],
                          "max_concurrency": plan["max_concurrency"], "timeout": plan["timeout_s"],
                          "models": [m["name"] for m in plan["models"]]}
    if plan["mode"] == "mme":
        ep["instance_concurrency"] = plan["instance_concurrency"]
        ep["cache"] = {"policy": "lru", "host_reserve": 0, "disk": 1000, "s3_throughput": 1e6,
                       "max_concurrent_loads": plan["max_concurrent_loads"],
                       "replicate_above": plan["replicate_above"]}
    elif len(plan["models"]) > 1 or plan["instance_concurrency"] < plan["max_concurrency"]:
        raise ValueError("an sme testbed plan maps onto the simulator with one model and "
                         "instance_concurrency >= max_concurrency")
    return {"name": plan["name"], "seed": 0, "duration": span + plan["timeout_s"] + 60.0, "warmup": 0,
            "instance_types": [_instance_type(plan)], "models": models, "endpoints": [ep]}


def simulate_measured(measured: dict[str, Any], seed: int = 0, replications: int = 1, profile: Path | None = None):
    """The simulator's Result for a testbed run: same plan, same arrivals, the calibration's times
    (the testbed's own, or a ``profile``'s)."""
    from .api import run

    names = [m["name"] for m in measured["plan"]["models"]]
    req = measured["requests"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "arrivals.csv"
        cols = {"arrival_s": req["arrival_s"], "model": [names[m] for m in req["model"]]}
        if is_llm(measured["plan"]):
            cols.update(input_tokens=req["input_tokens"], output_tokens=req["output_tokens"])
        pd.DataFrame(cols).to_csv(path, index=False)
        sc = parse_scenario(scenario_of(measured, path, profile), source=f"fidelity:{measured['plan']['name']}",
                            base_dir=Path(tmp))
        return run(sc, seed=seed, replications=replications)


# -- figures and errors -------------------------------------------------------------------------------------------
def figures(latency_ms: np.ndarray, ok: np.ndarray, cold: np.ndarray, arrival_s: np.ndarray, end_s: np.ndarray,
            loads: int) -> dict[str, float]:
    """The compared figures of one side, computed alike for both."""
    lat = latency_ms[ok]
    span = float(np.nanmax(end_s[ok]) - np.min(arrival_s)) if ok.any() else float("nan")
    q = np.percentile(lat, [50, 90, 99]) if lat.size else [float("nan")] * 3
    return {"requests": int(len(latency_ms)), "completed": int(ok.sum()),
            "p50_ms": float(q[0]), "p90_ms": float(q[1]), "p99_ms": float(q[2]),
            "mean_ms": float(lat.mean()) if lat.size else float("nan"),
            "throughput_per_s": float(ok.sum() / span) if span > 0 else float("nan"),
            "cold_starts": int(loads), "hit_rate": float(1.0 - cold[ok].mean()) if ok.any() else float("nan")}


def token_figures(ttft_ms: np.ndarray, tpot_ms: np.ndarray, ok: np.ndarray) -> dict[str, float]:
    """A language model's figures, computed alike for both sides: TTFT over the completed requests,
    TPOT over those with more than one output token (the others have none)."""
    out = {}
    for name, v in (("ttft", ttft_ms), ("tpot", tpot_ms)):
        x = np.asarray(v, dtype=float)[ok]
        x = x[np.isfinite(x)]
        q = np.percentile(x, [50, 99]) if x.size else [float("nan")] * 2
        out.update({f"{name}_p50_ms": float(q[0]), f"{name}_p99_ms": float(q[1]),
                    f"{name}_mean_ms": float(x.mean()) if x.size else float("nan")})
    return out


def _column(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _measured_latency(measured: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A testbed run's latency (ms, send to end), which requests completed within the timeout, their
    send and end times."""
    r = measured["requests"]
    end = _column(r["end_s"])
    send = np.asarray(r["send_s"], dtype=float)
    return 1e3 * (end - send), np.isfinite(end) & (end - send <= measured["plan"]["timeout_s"]), send, end


def measured_figures(measured: dict[str, Any]) -> dict[str, float]:
    r = measured["requests"]
    lat, ok, send, end = _measured_latency(measured)
    cold = np.array([bool(c) for c in r["cold"]])
    out = figures(lat, ok, cold, send, end, len(measured["loads"]))
    if is_llm(measured["plan"]):
        # TTFT: arrival (the send) to the end of the step that completed the prompt; TPOT: the rest
        # of the latency over the output tokens after the first (the README's definitions, Language models)
        first = _column(r["first_token_s"])
        n_out = _column(r["output_tokens"])
        with np.errstate(invalid="ignore", divide="ignore"):
            tpot = np.where(n_out > 1, 1e3 * (end - first) / (n_out - 1), np.nan)
        out.update(token_figures(1e3 * (first - send), tpot, ok))
    return out


def simulated_figures(requests: pd.DataFrame, loads: int, llm: bool = False) -> dict[str, float]:
    ok = (requests["status"] == "ok").to_numpy()
    out = figures(requests["latency_ms"].to_numpy(dtype=float), ok, requests["cold"].to_numpy(dtype=bool),
                  requests["arrival_s"].to_numpy(dtype=float), requests["end_s"].to_numpy(dtype=float),
                  loads)
    if llm:
        out.update(token_figures(requests["ttft_ms"].to_numpy(dtype=float, na_value=np.nan),
                                 requests["tpot_ms"].to_numpy(dtype=float, na_value=np.nan), ok))
    return out


def settled_from(measured: dict[str, Any]) -> float:
    """When a testbed run has settled (``SETTLE_S``): after its first second, and after every load
    begun in that second has ended."""
    return max([SETTLE_S, *(ld["end_s"] for ld in measured.get("loads") or [] if ld["start_s"] < SETTLE_S)])


def p99_from(latency_ms: np.ndarray, ok: np.ndarray, arrival_s: np.ndarray, from_s: float) -> float:
    """The P99 of the completed requests that arrived at ``from_s`` or later (NaN: none did)."""
    lat = latency_ms[ok & (arrival_s >= from_s)]
    return float(np.percentile(lat, 99)) if lat.size else float("nan")


def _settled(measured_p99: float, simulated_p99: float, from_s: float) -> dict[str, float]:
    return {"from_s": from_s, "measured_p99_ms": measured_p99, "simulated_p99_ms": simulated_p99,
            "p99_err": (simulated_p99 - measured_p99) / measured_p99 if measured_p99 else float("nan")}


def errors(sim: dict[str, float], real: dict[str, float]) -> dict[str, float]:
    out = {}
    for k in FIGURES + tuple(f for f in LLM_FIGURES if f in real and f in sim):
        key = k.replace("_ms", "").replace("_per_s", "")
        if k == "hit_rate":
            out["hit_rate_err_pp"] = 100.0 * (sim[k] - real[k])
        elif real[k]:
            out[f"{key}_err"] = (sim[k] - real[k]) / real[k]
        else:
            out[f"{key}_err"] = 0.0 if sim[k] == real[k] else float("inf")
    return out


def noise_of(measured: dict[str, Any]) -> dict[str, Any]:
    """A testbed run's noise (its ``noise`` record) with the verdict: ``noisy`` and why (None for a
    run recorded before the testbed measured it: not noisy, as far as anyone can tell)."""
    n = measured.get("noise") or {}
    cores, cpus, drift = n.get("neighbour_cores"), n.get("cpus") or os.cpu_count() or 1, n.get("level_drift")
    why = []
    if cores is not None and cores > NOISY_NEIGHBOUR_SHARE * cpus:
        why.append(f"other processes used {cores:.2f} of {cpus} cores during the measured replay")
    if drift is not None and abs(drift) > NOISY_DRIFT:
        why.append(f"the request time moved by {drift:+.0%} between the calibration replays")
    gap = n.get("level_gap")
    if gap is not None and abs(gap) > NOISY_DRIFT:
        why.append(f"the measured replay ran {gap:+.0%} off its calibration replays' speed")
    return {"neighbour_cores": cores, "cpus": cpus, "level_drift": drift, "level_gap": gap,
            "loadavg": n.get("loadavg"), "noisy": bool(why), "why": "; ".join(why) or None}


def known_gaps(case: str | None, row: dict[str, Any]) -> dict[str, str] | None:
    """The figures a case misses (``row["within"]``) with why, when every one is a known gap of the
    case within its bound (``KNOWN_GAPS``); None when any miss is not."""
    gaps = KNOWN_GAPS.get(case or "", {})
    missed = [k for k, ok in row["within"].items() if not ok]
    if not all(k in gaps and abs(row[f"{k}_err"]) <= gaps[k][0] for k in missed):
        return None
    return {k: gaps[k][1] for k in missed}


def verdict(row: dict[str, Any], case: str | None = None) -> str:
    """``within`` (the tolerances hold), ``known gap`` (only the case's known gaps miss, each within its
    bound: ``known_gaps``), ``too noisy`` (they do not, and a run was made on a machine too noisy to
    measure: ``noise_of``) or ``outside``."""
    if all(row["within"].values()):
        return "within"
    if known_gaps(case, row):
        return "known gap"
    if any((r.get("noise") or {}).get("noisy") for r in row["runs"]):
        return "too noisy"
    return "outside"


def compare_case(measured: dict[str, Any], seed: int = 0, replications: int = SIM_REPLICATIONS,
                 profile: Path | None = None) -> dict[str, Any]:
    """One case's entry of fidelity.json: both sides' figures and the errors. The simulated figures
    are the mean over ``replications`` runs on the same arrivals (service times drawn anew): the
    simulator's prediction, less the noise of one draw. With ``profile``, the simulator's service
    and load times are a calibration profile's."""
    llm = is_llm(measured["plan"])
    if llm:     # a language model's step time comes from its testbed's calibration replays, always
        profile = None
    res = simulate_measured(measured, seed, replications, profile)
    if replications == 1:
        sims = [simulated_figures(res.requests, int(res.summary["overall"]["cold_starts"]), llm)]
    else:
        sims = [simulated_figures(req, int(res.replication_summaries[r]["overall"]["cold_starts"]), llm)
                for r, req in res.requests.groupby("replication")]
    sim = {k: float(np.mean([s[k] for s in sims])) for k in sims[0]}
    real = measured_figures(measured)
    t0 = settled_from(measured)
    lat, ok, send, _ = _measured_latency(measured)
    real_settled = p99_from(lat, ok, send, t0)
    reqs = res.requests.groupby("replication") if replications > 1 else [(0, res.requests)]
    sim_settled = float(np.mean([p99_from(q["latency_ms"].to_numpy(dtype=float), (q["status"] == "ok").to_numpy(),
                                          q["arrival_s"].to_numpy(dtype=float), t0) for _, q in reqs]))
    return {**errors(sim, real), "measured": real, "simulated": sim,
            "settled": _settled(real_settled, sim_settled, t0),
            "send_lag_ms": measured.get("send_lag_ms"), "unfinished": measured.get("unfinished", 0),
            "noise": noise_of(measured), "slowdown": slowdown_of(measured) if profile is None else None}


def within(row: dict[str, Any], tolerance: dict[str, float]) -> dict[str, bool]:
    """Which of a case's errors are inside the tolerances (relative; points for the hit rate); a
    language model's TTFT and TPOT P50 and P99 too, under the P50 and P99 tolerances."""
    out = {"p50": abs(row["p50_err"]) <= tolerance["p50"], "p99": abs(row["p99_err"]) <= tolerance["p99"],
           "cold_starts": abs(row["cold_starts_err"]) <= tolerance["cold_starts"],
           "hit_rate": abs(row["hit_rate_err_pp"]) <= tolerance["hit_rate_pp"]}
    for name in ("ttft", "tpot"):
        for q in ("p50", "p99"):
            key = f"{name}_{q}_err"
            if key in row:
                out[f"{name}_{q}"] = bool(abs(row[key]) <= tolerance[q])
    return out


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One case's entry from one or more testbed runs of it (``compare_case`` rows): the errors of the
    simulations' mean figures against the measured runs' mean, each run kept under ``runs``, and, from
    two runs on, the measured figures' spread ((max - min) / mean): the real system's own repeatability
    on the same plan and arrivals, the floor under any simulator's error."""
    def mean(side: str) -> dict[str, float]:
        return {k: float(np.mean([r[side][k] for r in runs])) for k in runs[0][side]}

    real, sim = mean("measured"), mean("simulated")
    spread = None
    if len(runs) > 1:
        spread = {k: float((max(r["measured"][k] for r in runs) - min(r["measured"][k] for r in runs)) / real[k])
                  if real[k] else 0.0 for k in FIGURES + tuple(f for f in LLM_FIGURES if f in real)}
    out = {**errors(sim, real), "measured": real, "simulated": sim, "measured_spread": spread,
           "unfinished": max(r["unfinished"] for r in runs), "runs": runs}
    if all("settled" in r for r in runs):
        out["settled"] = _settled(*(float(np.mean([r["settled"][k] for r in runs]))
                                    for k in ("measured_p99_ms", "simulated_p99_ms", "from_s")))
    return out


# -- the suite ----------------------------------------------------------------------------------------------------
class FidelityError(RuntimeError):
    """The testbed could not run (no torch, a failed case): the message says what to do."""


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, path)


def run_testbed(plan_path: Path, arrivals_path: Path, out: Path, device: str = "cpu") -> dict[str, Any]:
    """``python -m calibration testbed`` in a subprocess (the simulator never imports torch)."""
    cmd = [sys.executable, "-m", "calibration", "testbed", str(arrivals_path), "--plan", str(plan_path),
           "--device", device, "--out", str(out)]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("safetensors") is None:
        raise FidelityError("the testbed needs torch and safetensors: pip install 'capsim[calibrate]', or run "
                            "the testbed where they are and pass its measured.json to capsim fidelity")
    rc = subprocess.call(cmd, stdin=subprocess.DEVNULL)
    if rc != 0 or not out.exists():
        raise FidelityError(f"the testbed failed (exit {rc}): {' '.join(cmd)}")
    return json.loads(out.read_text())


def run_suite(cases: list[str] | None = None, *, quick: bool = True, device: str = "cpu",
              out: Path = Path("results/fidelity"), seed: int = 0, attempts: int = 3, runs: int = 1,
              profile: Path | None = None, prepare: bool = False, log: Log = lambda m: None) -> dict[str, Any]:
    """Run each case on the testbed and in the simulator; write ``out/fidelity.json`` after each case
    (an interrupted suite keeps the cases it finished) and return it. A case outside the tolerances
    (its known gaps within their bounds aside) is run again, ``attempts`` times at most; each case is
    run at least ``runs`` times (two or more give the real system's own spread). With ``profile``, the
    simulator takes its service and load times from that calibration profile instead of the testbed's
    calibration replays. With
    ``prepare``, only write each case's plan.json and arrivals.csv (for a testbed run elsewhere,
    compared later by :func:`from_measured`) and return {"cases": {name: its folder}}."""
    names = list(CASES) if not cases else cases
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise FidelityError(f"unknown fidelity case(s) {', '.join(unknown)}: expected some of {', '.join(CASES)}")
    out.mkdir(parents=True, exist_ok=True)
    if profile is not None:
        read_profile(profile)     # a bad profile fails now, not after the first testbed run
    result: dict[str, Any] = {"schema": "capsim.fidelity/1", "quick": quick, "device": device,
                              "tolerance": QUICK_TOLERANCE if quick else FULL_TOLERANCE,
                              "calibration": _calibration_of(profile), "cases": {}}
    for k, name in enumerate(names, 1):
        case = CASES[name]
        d = out / name
        d.mkdir(exist_ok=True)
        _write_json(d / "plan.json", plan_of(case))
        arrivals_of(case, quick, seed).to_csv(d / "arrivals.csv", index=False)
        if prepare:
            result["cases"][name] = str(d)
            continue
        log(f"[{k}/{len(names)}] {name}: {case.what}")
        t0 = time.perf_counter()
        done: list[dict[str, Any]] = []
        most = max(attempts, runs)
        for attempt in range(1, most + 1):
            path = d / ("measured.json" if attempt == 1 else f"measured-{attempt}.json")
            done.append(compare_case(run_testbed(d / "plan.json", d / "arrivals.csv", path, device), seed,
                                     profile=profile))
            row = pooled(done)
            row["within"] = within(row, result["tolerance"])
            if attempt >= runs and (verdict(row, name) in ("within", "known gap") or attempt == most):
                break
            if attempt < runs:
                continue
            # One run of a real system on a shared machine is one draw of its speed (+-10-20%
            # over tens of seconds here): a case that misses is run again, and the errors are
            # those of the mean over all its runs, the bad ones included.
            log(f"{name}: outside the tolerance ({', '.join(f for f, ok in row['within'].items() if not ok)}); "
                "running it again")
        row.update(what=case.what, attempts=attempt, wall_seconds=time.perf_counter() - t0,
                   verdict=verdict(row, name), known_gaps=known_gaps(name, row) or {})
        if row["verdict"] == "too noisy":
            log(f"{name}: outside the tolerance on a machine too noisy to measure: "
                + "; ".join(r["noise"]["why"] for r in row["runs"] if r["noise"]["noisy"]))
        result["cases"][name] = row
        _write_json(out / "fidelity.json", result)
    if prepare:
        return {"cases": result["cases"]}
    return result


def _calibration_of(profile: Path | None) -> str:
    if profile is None:
        return "the testbed's calibration replays"
    meta = read_profile(profile)["metadata"]
    return f"profile {profile} ({meta.get('device_name') or meta.get('device')}, {meta.get('date')})"


def read_measured(p: Path) -> dict[str, Any]:
    """A testbed run (measured.json), checked for the keys and types the comparison reads;
    FidelityError naming the file and the key otherwise."""
    try:
        measured = json.loads(Path(p).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise FidelityError(f"{p}: cannot read a testbed run: {e}") from None
    if not isinstance(measured, dict) or measured.get("schema") != "capsim.testbed/1":
        raise FidelityError(f"{p}: schema: expected 'capsim.testbed/1' (python -m calibration testbed's output)")
    shape = (("plan", dict), ("probe", dict), ("requests", dict), ("loads", list))
    for key, kind in shape:
        if not isinstance(measured.get(key), kind):
            raise FidelityError(f"{p}: {key}: expected a {'mapping' if kind is dict else 'list'}, got "
                                f"{type(measured.get(key)).__name__}")
    plan = measured["plan"]
    if not isinstance(plan.get("name"), str) or not isinstance(plan.get("models"), list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in plan["models"]):
        raise FidelityError(f"{p}: plan: expected a name and a list of models, each with a name")
    t = plan.get("timeout_s")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not np.isfinite(t) or t <= 0:
        raise FidelityError(f"{p}: plan.timeout_s: expected a finite number of seconds > 0, got {t!r}")
    req = measured["requests"]
    cols = ("arrival_s", "send_s", "end_s", "model", "cold")
    if not all(isinstance(req.get(c), list) for c in cols) or len({len(req[c]) for c in cols}) != 1:
        raise FidelityError(f"{p}: requests: expected lists {', '.join(cols)} of one length")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) and x >= 0
               for x in req["arrival_s"]):
        raise FidelityError(f"{p}: requests.arrival_s: expected finite times >= 0")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < len(plan["models"]) for x in req["model"]):
        raise FidelityError(f"{p}: requests.model: expected indexes of plan.models")
    if is_llm(plan):
        more = ("first_token_s", "input_tokens", "output_tokens")
        if not all(isinstance(req.get(c), list) and len(req[c]) == len(req["arrival_s"]) for c in more):
            raise FidelityError(f"{p}: requests: a continuous-batching run needs lists {', '.join(more)} as long "
                                "as arrival_s")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                   for c in ("input_tokens", "output_tokens") for x in req[c]):
            raise FidelityError(f"{p}: requests.input_tokens/output_tokens: expected whole numbers >= 1")
        probe, terms = measured["probe"], ("base", "per_prefill_token", "per_decode_seq", "per_kv_token")
        step = probe.get("step")
        if not isinstance(step, dict) or not all(
                isinstance(step.get(k), (int, float)) and not isinstance(step.get(k), bool)
                and np.isfinite(step[k]) and step[k] >= 0 for k in terms):
            raise FidelityError(f"{p}: probe.step: expected the fitted {', '.join(terms)} (finite, >= 0)")
        if not isinstance(probe.get("shape"), dict) or not isinstance(probe.get("dtype_bytes"), int):
            raise FidelityError(f"{p}: probe.shape and probe.dtype_bytes: expected the served decoder's numbers")
    return measured


def from_measured(paths: list[Path], seed: int = 0, profile: Path | None = None) -> dict[str, Any]:
    """fidelity.json for testbed runs made elsewhere (``measured.json`` files); several runs of one
    plan are pooled into one case. With ``profile``, as in :func:`run_suite`."""
    by_case: dict[str, list[dict[str, Any]]] = {}
    for p in paths:
        measured = read_measured(Path(p))
        try:
            row = compare_case(measured, seed, profile=profile)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise FidelityError(f"{p}: not a testbed run the simulator can read ({type(e).__name__}: "
                                f"{' '.join(str(e).split())[:200]}); expected python -m calibration testbed's "
                                "measured.json") from None
        by_case.setdefault(measured["plan"]["name"], []).append(row)
    return {"schema": "capsim.fidelity/1", "calibration": _calibration_of(profile),
            "cases": {name: pooled(runs) for name, runs in by_case.items()}}
