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


# -- continuous batching (a language model's copy running vLLM-style steps) ------------------------------
LLM_TYPE = {"name": "test.gpu1", "gpus": 1, "gpu_memory_gb": 80, "vcpus": 8, "memory_gb": 64, "price_per_hour": 1.0}


def _tokens(draw_const, mean, cv):
    return int(mean) if draw_const else {"dist": "lognormal", "mean": mean, "cv": cv}


llm_scenarios = st.fixed_dictionaries({
    "seqs": st.integers(1, 24),
    "extra_budget": st.integers(0, 1000),
    "block": st.sampled_from([1, 8, 16, 32]),
    "kv_gb": st.floats(0.05, 1.5),
    "tin": st.tuples(st.booleans(), st.floats(1, 400), st.floats(0.2, 1.5)),
    "tout": st.tuples(st.booleans(), st.floats(1, 200), st.floats(0.2, 1.5)),
    "base_only": st.booleans(),
    "coef": st.tuples(st.floats(0.5, 10.0), st.floats(0.0, 0.05), st.floats(0.0, 0.5), st.floats(0.0, 2.0)),
    "closed": st.booleans(),
    "rate": st.floats(0.5, 30.0),
    "seed": st.integers(0, 2**31),
})


def build_llm(p):
    base, ppt, pds, pkv = p["coef"]
    if p["base_only"]:
        ppt = pds = pkv = 0.0
    traffic = {"process": "poisson", "rate": p["rate"]}
    if p["closed"]:
        traffic = {"process": "closed", "users": 1 + int(p["rate"]), "think_time": p["rate"] / 30.0}
    d = sme(duration=30.0, seed=p["seed"], traffic=traffic, instance_type=LLM_TYPE["name"])
    d["instance_types"] = [LLM_TYPE]
    m = d["models"][0]
    del m["size_gb"]
    m["architecture"] = "llama-2-7b"
    m["tokens"] = {"input": _tokens(*p["tin"]), "output": _tokens(*p["tout"])}
    m["service"] = {"continuous_batching": {
        "max_num_seqs": p["seqs"], "max_num_batched_tokens": p["seqs"] + p["extra_budget"], "block_size": p["block"],
        "kv_cache_gb": p["kv_gb"],
        "step": {"base": f"{base}ms", "per_prefill_token": f"{ppt}ms", "per_decode_seq": f"{pds}ms",
                 "per_kv_token": f"{pkv}us"}}}
    del d["endpoints"][0]["max_concurrency"]
    return d, (base, ppt, pds, pkv * 1e-3)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(llm_scenarios)
def test_continuous_batching_invariants(p):
    """Random max_num_seqs, token budget, block size, KV cache, token counts (fixed or lognormal), step
    coefficients and traffic (open or closed loop): the engine keeps its caps after every change (its log:
    running sequences <= max_num_seqs on the one copy, KV blocks used <= the cache); every request ends
    with a status; exactly those handed to the copy whose tokens exceed the whole cache are refused
    (no_capacity); a request served OK gets its first token after at least ceil(prompt / budget) prefill
    steps and then at least its (output - 1) decode steps over its own growing context. With the base
    alone (every step takes it), exactly: first token and end lie whole steps after admission, and with no
    preemption the request takes exactly (output - 1) steps after its first token (to 1e-6 of a step)."""
    from hypothesis import assume

    from sim.scenario import ScenarioError, parse_scenario
    from sim.simulate import simulate

    d, (base, ppt, pds, pkv) = build_llm(p)
    try:
        sc = parse_scenario(d, source="prop")
    except ScenarioError as e:   # fixed tokens longer than the whole cache are refused up front
        assert "needs more than the copy's KV cache" in str(e)
        assume(False)
    llm = sc.models[0].llm
    run = simulate(sc)
    rows = run.logs[0].llm_rows()
    running, waiting, used, cap = np.cumsum(rows[np.argsort(rows[:, 0], kind="stable"), 1:], axis=0).T
    assert running.min() >= 0 and running.max() <= p["seqs"] and waiting.min() >= 0
    assert (cap == llm.kv_blocks).all() and used.min() >= 0 and used.max() <= llm.kv_blocks

    res = run_dict(d)
    r = res.requests
    o = res.summary["overall"]
    assert res.summary["endpoints"]["e"]["preemptions"] == len(run.logs[0].preempted)   # the same run
    assert o["completed"] + o["failed"] + o["in_flight"] == o["requests"] == len(r)
    status = r["status"].astype(str).to_numpy()
    assert set(status) <= {"ok", "no_capacity", "in_flight"}
    tin = np.maximum(r["input_tokens"].to_numpy(), 1)
    tout = np.maximum(r["output_tokens"].to_numpy(), 1)
    too_long = -(-(tin + tout) // p["block"]) > llm.kv_blocks
    handed = r["start_s"].notna().to_numpy() | (status == "no_capacity")
    np.testing.assert_array_equal((status == "no_capacity")[handed | (status != "in_flight")],
                                  too_long[handed | (status != "in_flight")])
    ok = status == "ok"
    start = r["start_s"].to_numpy()[ok]
    first = (r["arrival_s"] + r["ttft_ms"] / 1e3).to_numpy()[ok]
    end = r["end_s"].to_numpy()[ok]
    tin, tout = tin[ok], tout[ok]
    assert np.isfinite(first).all() and (first >= start - 1e-9).all() and (end >= first - 1e-9).all()
    budget = p["seqs"] + p["extra_budget"]
    assert (first - start >= -(-tin // budget) * base * 1e-3 + tin * ppt * 1e-3 - 1e-9).all()
    j = tout - 1
    assert (end - first >= (j * (base + pds) + pkv * (j * tin + j * (j - 1) / 2)) * 1e-3 - 1e-9).all()
    if p["base_only"]:
        steps_to_first = (first - start) / (base * 1e-3)
        steps_after = (end - first) / (base * 1e-3)
        np.testing.assert_allclose(steps_to_first, np.round(steps_to_first), atol=1e-6)
        np.testing.assert_allclose(steps_after, np.round(steps_after), atol=1e-6)
        if not run.logs[0].preempted:
            np.testing.assert_allclose(steps_after, j, atol=1e-6)
