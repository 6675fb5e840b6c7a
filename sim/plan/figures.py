"""A plan's figures beyond the summary's M: GPU busy time, memory and stranded GPUs
(:func:`utilisation`), and the device figures of its models' execution models (:func:`device_figures`)."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..api import Result
from .load import execution_model


def utilisation(res: Result) -> dict[str, float | None]:
    """GPU figures of a run over the measured horizon, over the GPUs of the instances in service:

    ``gpu_busy_fraction``: service seconds x the copy's accelerators / its max_concurrency (an
    estimate from the requests alone, kept in compare.json; the tables show the devices' measured
    ``gpu_utilization`` of :func:`device_figures`, which counts a batch once however many requests
    share it);
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


def device_figures(res: Result) -> dict[str, Any]:
    """``execution_models``: models per execution model (``slots``, ``batching``, ``continuous``);
    ``gpu_utilization``: the busy share of the GPUs in service (CloudWatch's GPUUtilization over 100 x
    GPUs, averaged by GPU-time over the endpoints); ``batch_size_mean``: requests in service on a busy
    device, averaged over the endpoints by their requests (replication 0's figures with replications)."""
    sc = res.scenario
    s = (res.replication_summaries or [res.summary])[0]
    kinds: dict[str, int] = {}
    for g in sc.groups:
        kind = execution_model(sc, g.index)[0]
        kinds[kind] = kinds.get(kind, 0) + len(g.models)
    util_w = util = batch_w = batch = 0.0
    for ep in sc.endpoints:
        b = s["endpoints"].get(ep.name, {})
        gpus = ep.instance_type.gpus * (b.get("instances_mean") or 0.0)
        if b.get("gpu_utilization") is not None and gpus > 0:
            util += b["gpu_utilization"] / (100.0 * ep.instance_type.gpus) * gpus
            util_w += gpus
        if b.get("batch_size_mean") is not None and b.get("requests"):
            batch += b["batch_size_mean"] * b["requests"]
            batch_w += b["requests"]
    return {"execution_models": kinds, "gpu_utilization": util / util_w if util_w > 0 else None,
            "batch_size_mean": batch / batch_w if batch_w > 0 else None}
