"""Property tests of the core's invariants on random small scenarios (Hypothesis)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_dict, sme

STATUSES = {"ok", "timeout", "throttled", "no_capacity", "instance_failure", "in_flight"}

scenarios = st.fixed_dictionaries({
    "rate": st.floats(1.0, 80.0),
    "mean": st.floats(0.01, 0.5),
    "dist": st.sampled_from(["exponential", "deterministic", "lognormal", "gamma"]),
    "instances": st.integers(1, 6),
    "routing": st.sampled_from(["random", "round_robin", "least_outstanding_requests", "power_of_two"]),
    "max_concurrency": st.integers(1, 4),
    "accelerators": st.sampled_from([1, 2, 4, 8]),
    "timeout": st.sampled_from([0.5, 2.0, 60.0]),
    "queue_limit": st.sampled_from([None, 0, 3]),
    "process": st.sampled_from(["poisson", "gamma", "closed"]),
    "seed": st.integers(0, 2**31),
})


def build(p):
    cv = None if p["dist"] in ("exponential", "deterministic") else 1.5
    traffic = {"process": "poisson", "rate": p["rate"]}
    if p["process"] == "gamma":
        traffic = {"process": "gamma", "rate": p["rate"], "cv": 3.0}
    elif p["process"] == "closed":
        traffic = {"process": "closed", "users": 1 + int(p["rate"]) // 4, "think_time": 0.1}
    d = sme(mean=p["mean"], dist=p["dist"], cv=cv, instances=p["instances"], routing=p["routing"],
            max_concurrency=p["max_concurrency"], accelerators=p["accelerators"], duration=60.0, warmup=5.0,
            seed=p["seed"], traffic=traffic, instance_type="test.gpu8")
    d["endpoints"][0]["timeout"] = p["timeout"]
    if p["queue_limit"] is not None:
        d["endpoints"][0]["queue_limit"] = p["queue_limit"]
    return d


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios)
def test_invariants(p):
    res = run_dict(build(p))
    r = res.requests
    horizon = 65.0
    slots = (8 // p["accelerators"]) * p["max_concurrency"]

    # Every request ends ok, failed with a reason, or in flight at the horizon.
    assert set(r["status"].astype(str).unique()) <= STATUSES
    ok = r["status"] == "ok"
    inflight = r["status"] == "in_flight"
    assert r.loc[~inflight, "end_s"].notna().all() and r.loc[inflight, "end_s"].isna().all()
    assert (r.loc[~inflight, "end_s"] <= horizon + 1e-9).all()
    assert (r.loc[ok, "start_s"] >= r.loc[ok, "arrival_s"] - 1e-12).all()
    # a completed request took exactly its service time once started, within the timeout
    assert np.allclose(r.loc[ok, "end_s"] - r.loc[ok, "start_s"], r.loc[ok, "service_ms"] / 1e3)
    assert (r.loc[ok, "latency_ms"] <= p["timeout"] * 1e3 + 1e-6).all()
    assert np.allclose(r.loc[r["status"] == "timeout", "latency_ms"], p["timeout"] * 1e3)
    if p["queue_limit"] is None:
        assert not (r["status"] == "throttled").any()

    # Busy copies never exceed their concurrency: the server is busy from start
    # to start + service (also when the client has already timed out).
    started = r[r["start_s"].notna()]
    for _, g in started.groupby("instance"):
        s = g["start_s"].to_numpy()
        e = s + g["service_ms"].to_numpy() / 1e3 - 1e-9  # service_ms went through a x1e3 rounding
        t = np.concatenate([s, e])
        delta = np.concatenate([np.ones_like(s), -np.ones_like(e)])
        order = np.lexsort((delta, t))  # ends before starts at equal times
        assert np.cumsum(delta[order]).max() <= slots
        # FIFO: an instance starts its requests in arrival order
        a = g.sort_values("start_s", kind="stable")["arrival_s"].to_numpy()
        assert (np.diff(a) >= -1e-12).all()

    # Cost equals the integral of instances x price over the measured horizon.
    price = 8.0
    s = res.summary
    assert s["overall"]["cost_usd"] == pytest.approx(p["instances"] * price * 60.0 / 3600.0)
    assert res.timeline["cost_usd"].sum() == pytest.approx(p["instances"] * price * 65.0 / 3600.0)
    # Every measured request is accounted for.
    o = s["overall"]
    assert o["completed"] + o["failed"] + o["in_flight"] == o["requests"]
