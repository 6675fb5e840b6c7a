"""Scenario-level checks: a Forethought autocomplete day under autoscaling, and
real-trace replay (Azure LLM 2023) through an autoscaled endpoint."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sim
from sim.workload.traces import read_trace

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


def test_forethought_autocomplete_day_follows_the_load():
    path = SCENARIOS / "forethought_autocomplete_day.yaml"
    auto = sim.run(sim.load_scenario(path))
    tl = auto.timeline
    hourly = tl.groupby(tl["t_s"] // 3600).agg(inv=("invocations", "sum"), inst=("instances", "mean"))
    # instances follow the load over the day...
    assert np.corrcoef(hourly["inv"], hourly["inst"])[0, 1] > 0.8
    # ...with the scaling lag: no scale-out before 3 datapoints above the target
    # plus the provisioning delay after the morning ramp passes 225 per instance-minute
    per_inst = tl["invocations"] / tl["instances"]
    first_above = tl.loc[(per_inst > 225) & (tl["t_s"] > 3600), "t_s"].min()
    first_up = tl.loc[(tl["instances"] > tl["instances"].iloc[0]) & (tl["t_s"] > 3600), "t_s"].min()
    assert first_up >= first_above + 3 * 60
    peak = int(auto.summary["endpoints"]["autocomplete"]["instances_max"])
    fixed = sim.run(sim.load_scenario(path, [f"endpoints[0].instances={peak}", "endpoints[0].autoscaling=null"]))
    a, f = auto.summary["overall"], fixed.summary["overall"]
    saved = 1 - a["cost_usd"] / f["cost_usd"]
    assert saved > 0.15
    assert a["failed"] == 0 and f["failed"] == 0
    print(f"\nautocomplete day: autoscaled ${a['cost_usd']:.2f} P99 {a['p99_ms']:.0f} ms; fixed x{peak} "
          f"${f['cost_usd']:.2f} P99 {f['p99_ms']:.0f} ms; saved {saved:.0%}, "
          f"P99 +{a['p99_ms'] - f['p99_ms']:.0f} ms")


def _trace_scenario(name: str, rate: float) -> dict:
    path = SCENARIOS / "traces" / "azure_llm_2023" / f"AzureLLMInferenceTrace_{name}.csv"
    df = read_trace(path, "azure_llm")
    mean_rate = len(df) / df["arrival_s"].iloc[-1]
    return {
        "name": f"azure-{name}", "seed": 4, "duration": "50m", "warmup": "5m",
        "models": [{"name": "llm", "size_gb": 14, "memory_gb": 16, "init_time": "20s",
                    "service": {"dist": "lognormal", "mean": "1.5s", "cv": 0.5},
                    "traffic": {"process": "trace", "path": str(path), "format": "azure_llm",
                                "rate_scale": rate / mean_rate, "loop": True}}],
        "endpoints": [{"name": "llm", "mode": "sme", "instance_type": "ml.g5.xlarge",
                       "instances": {"initial": 4, "min": 2, "max": 12}, "max_concurrency": 2, "models": ["llm"],
                       "routing": "least_outstanding_requests", "provisioning": "3m",
                       "autoscaling": {"metric": "invocations_per_instance", "target": 60}}],
    }


def test_bursty_trace_is_worse_than_near_poisson_at_equal_load():
    from sim.scenario import parse_scenario

    out = {}
    for name in ("code", "conv"):
        res = sim.run(parse_scenario(_trace_scenario(name, rate=4.0), source=name))
        o = res.summary["overall"]
        out[name] = o
        assert o["throughput_per_s"] == pytest.approx(4.0, rel=0.25)
    code, conv = out["code"], out["conv"]
    assert code["p99_ms"] > 1.5 * conv["p99_ms"] or code["failed"] > conv["failed"] + 10
    print(f"\nAzure code (bursty): P99 {code['p99_ms']:.0f} ms, timeouts {code['failed']}; "
          f"conversation: P99 {conv['p99_ms']:.0f} ms, timeouts {conv['failed']}")
