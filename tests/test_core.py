"""Exact event logs on tiny scenarios, determinism, and the result contract."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import sim
from conftest import run_dict, sme
from sim.scenario import parse_scenario


def trace_scenario(tmp_path, arrivals, *, mean=0.5, max_concurrency=1, **kw):
    p = tmp_path / "arrivals.csv"
    pd.DataFrame({"arrival_s": arrivals}).to_csv(p, index=False)
    d = sme(dist="deterministic", mean=mean, max_concurrency=max_concurrency,
            traffic={"process": "trace", "path": str(p), "format": "csv"}, **kw)
    return d


def test_exact_event_log_fifo_single_server(tmp_path):
    res = run_dict(trace_scenario(tmp_path, [0.0, 0.1, 0.2, 1.0], duration=10))
    r = res.requests
    assert r["start_s"].tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert r["end_s"].tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert r["wait_ms"].tolist() == pytest.approx([0.0, 400.0, 800.0, 500.0])
    assert (r["status"] == "ok").all()


def test_exact_event_log_two_slots(tmp_path):
    res = run_dict(trace_scenario(tmp_path, [0.0, 0.1, 0.2, 1.0], max_concurrency=2, duration=10))
    r = res.requests
    assert r["start_s"].tolist() == pytest.approx([0.0, 0.1, 0.5, 1.0])
    assert r["end_s"].tolist() == pytest.approx([0.5, 0.6, 1.0, 1.5])


def test_timeouts_served_late_and_dropped_from_queue(tmp_path):
    d = trace_scenario(tmp_path, [0.0, 1.0, 2.0], mean=40.0, duration=200)
    res = run_dict(d)
    r = res.requests
    assert r["status"].tolist() == ["ok", "timeout", "timeout"]
    # the client sees a timeout 60 s after it sent the request
    assert r["end_s"].tolist() == pytest.approx([40.0, 61.0, 62.0])
    assert r["start_s"].tolist()[:2] == pytest.approx([0.0, 40.0])
    assert np.isnan(r["start_s"].iloc[2])  # dropped from the queue, never served


def test_queue_limit_throttles(tmp_path):
    d = trace_scenario(tmp_path, [0.0, 0.1, 0.2, 0.3], mean=1.0, duration=10)
    d["endpoints"][0]["queue_limit"] = 1
    r = run_dict(d).requests
    assert r["status"].tolist() == ["ok", "ok", "throttled", "throttled"]


def test_in_flight_at_horizon(tmp_path):
    r = run_dict(trace_scenario(tmp_path, [0.0, 9.8], mean=1.0, duration=10)).requests
    assert r["status"].tolist() == ["ok", "in_flight"]
    assert np.isnan(r["end_s"].iloc[1])


def test_same_seed_same_results_other_seed_differs(tmp_path):
    d = sme(rate=30, mean=0.05, instances=3, routing="power_of_two", duration=600, warmup=60)
    a, b, c = run_dict(d), run_dict(d), run_dict(d, seed=2)
    sa, sb = dict(a.summary), dict(b.summary)
    sa.pop("wall_seconds"), sb.pop("wall_seconds")
    assert json.dumps(sa, sort_keys=True) == json.dumps(sb, sort_keys=True)
    pa, pb, pc = (x.save(tmp_path / n, plots=False) / "requests.parquet" for x, n in ((a, "a"), (b, "b"), (c, "c")))
    assert pa.read_bytes() == pb.read_bytes()
    assert not pd.read_parquet(pa).equals(pd.read_parquet(pc))


def test_common_random_numbers_across_plans():
    # Same fleet, different endpoints: identical arrivals, models and service times.
    a = run_dict(sme(rate=20, duration=300, instances=1))
    b = run_dict(sme(rate=20, duration=300, instances=4, routing="least_outstanding_requests"))
    for col in ("arrival_s", "service_ms", "model"):
        assert a.requests[col].equals(b.requests[col])


def test_replications_give_confidence_intervals():
    res = run_dict(sme(rate=20, duration=600, replications=4))
    o = res.summary["overall"]
    assert res.summary["replications"] == 4
    assert o["p99_ms_ci95"] > 0 and o["requests_ci95"] > 0
    assert set(res.requests["replication"].unique()) == {0, 1, 2, 3}
    # the mean over replications lies within the spread of the replications
    p99s = [s["overall"]["p99_ms"] for s in res.replication_summaries]
    assert min(p99s) <= o["p99_ms"] <= max(p99s)


def test_replications_without_requests_leave_the_others_figures():
    """Five replications of 10 s at 0.2 requests/s (seed 4): two serve no request. The latency figures are
    the means over the three that have them, each with its interval; a warning says so; every figure has
    its ``_ci95`` key (null where undefined: no language model here)."""
    d = sme(rate=0.2, duration=10, replications=5, seed=4)
    d["slo"] = {"p99": 1.0}
    res = run_dict(d)
    per = [s["overall"] for s in res.replication_summaries]
    served = [b for b in per if b["completed"]]
    assert 2 <= len(served) < 5
    o = res.summary["overall"]
    for k in ("p50_ms", "p99_ms", "mean_ms", "slo_attainment"):
        vals = [b[k] for b in served]
        assert o[k] == pytest.approx(sum(vals) / len(vals)) and f"{k}_ci95" in o
    assert o["completed"] == pytest.approx(sum(b["completed"] for b in per) / 5)
    assert o["ttft_p50_ms"] is None and "ttft_p50_ms_ci95" in o
    assert any(f"over the {len(served)} of 5 replications" in w for w in res.summary["warnings"])


def test_sme_with_several_models_expands_per_model():
    d = sme(rate=5, duration=120)
    d["models"][0].update(name="m-{i}", count=3, traffic={"process": "poisson", "rate": 9,
                                                          "popularity": {"zipf": 1.0}})
    d["endpoints"][0]["models"] = ["m-*"]
    sc = parse_scenario(d)
    assert [e.name for e in sc.endpoints] == ["e-m-0", "e-m-1", "e-m-2"]
    res = sim.run(sc)
    counts = res.requests["model"].value_counts()
    assert counts["m-0"] > counts["m-1"] > counts["m-2"]  # Zipf 1: 6:3:2
    assert set(res.summary["endpoints"]) == {"e-m-0", "e-m-1", "e-m-2"}
    # each endpoint bills its own instance
    assert res.summary["overall"]["cost_usd"] == pytest.approx(3 * 1.408 * 120 / 3600)


def test_outputs_follow_the_contract(tmp_path):
    res = run_dict(sme(rate=10, duration=300, warmup=60, slo={"p99": "300ms"}))
    out = res.save(tmp_path / "r")
    s = json.loads((out / "summary.json").read_text())
    for k in ("scenario", "seed", "simulated_seconds", "wall_seconds", "overall", "endpoints", "models"):
        assert k in s
    need = {"requests", "completed", "failed", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_per_s",
            "cold_starts", "cache_hit_rate", "cost_usd", "cost_per_million_usd", "slo_attainment"}
    assert need <= set(s["overall"]) and need <= set(s["models"]["m"])
    assert need | {"instance_hours", "instances_mean", "instances_max"} <= set(s["endpoints"]["e"])
    req = pd.read_parquet(out / "requests.parquet")
    assert {"request_id", "model", "endpoint", "instance", "arrival_s", "start_s", "end_s", "latency_ms",
            "wait_ms", "load_ms", "cold", "status"} <= set(req.columns)
    tl = pd.read_csv(out / "timeline.csv")
    assert {"t_s", "endpoint", "instances", "invocations", "in_flight", "loaded_models",
            "gpu_memory_utilization", "model_cache_hit", "cost_usd"} <= set(tl.columns)
    assert len(tl) == 6 and tl["invocations"].sum() == len(req)
    assert (out / "plots" / "timeline.png").stat().st_size > 1000
    # statistics cover the measured horizon only
    assert s["overall"]["requests"] == int((req["arrival_s"] >= 60).sum())
    assert 0.9 < s["overall"]["slo_attainment"] <= 1.0
