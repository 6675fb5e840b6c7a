"""The simulator against closed-form queueing theory, over seeded runs.

Tolerances are stated per test; each is several standard errors of the
estimate at the run lengths used (checked over other seeds when written).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import run_dict, sme


def _ok(result, warmup):
    r = result.requests
    return r[(r["status"] == "ok") & (r["arrival_s"] >= warmup)]


def erlang_c(c: int, a: float) -> float:
    """Probability that an arrival waits in M/M/c with offered load a = lambda/mu."""
    s = sum(a**k / math.factorial(k) for k in range(c))
    top = a**c / math.factorial(c) * c / (c - a)
    return top / (s + top)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_mm1_per_instance_random_routing(rho):
    # 4 instances, random routing: each instance is M/M/1 with lambda = rate / 4 (Poisson splitting).
    mean, n = 0.05, 4
    rate = rho * n / mean
    res = run_dict(sme(rate=rate, mean=mean, instances=n, duration=20000 if rho < 0.7 else 40000, warmup=500))
    lat = _ok(res, 500)["latency_ms"].to_numpy() / 1e3
    mu, lam = 1 / mean, rate / n
    # Sojourn time in M/M/1 FIFO is exponential with rate mu - lambda.
    expect_mean = 1 / (mu - lam)
    expect_p99 = math.log(100) / (mu - lam)
    assert lat.mean() == pytest.approx(expect_mean, rel=0.04)
    assert np.percentile(lat, 99) == pytest.approx(expect_p99, rel=0.06)


@pytest.mark.parametrize("copies_gpus,max_conc,rho", [(4, 2, 0.85), (2, 1, 0.7)])
def test_mmc_erlang_c_mean_wait(copies_gpus, max_conc, rho):
    # One instance with `copies_gpus` single-GPU copies x max_concurrency slots: M/M/c.
    c = copies_gpus * max_conc
    mean = 0.1
    rate = rho * c / mean
    d = sme(rate=rate, mean=mean, instances=1, max_concurrency=max_conc, duration=40000, warmup=500)
    d["instance_types"] = [dict(d["instance_types"][0], name="test.c", gpus=copies_gpus)]
    d["endpoints"][0]["instance_type"] = "test.c"
    res = run_dict(d)
    ok = _ok(res, 500)
    wait = ok["wait_ms"].to_numpy() / 1e3
    a = rate * mean
    wq = erlang_c(c, a) / (c / mean - rate)
    assert wait.mean() == pytest.approx(wq, rel=0.07)
    # share of requests that waited at all: Erlang C itself
    assert (wait > 1e-12).mean() == pytest.approx(erlang_c(c, a), abs=0.015)


def mva_single_server(n_users: int, service: float, think: float) -> tuple[float, float]:
    """Exact mean value analysis of a closed loop: one FIFO exponential server plus think time."""
    q = 0.0
    for k in range(1, n_users + 1):
        r = service * (1 + q)
        x = k / (r + think)
        q = x * r
    return x, r


@pytest.mark.parametrize("users,think", [(5, 0.2), (12, 0.0)])
def test_closed_loop_throughput_and_littles_law(users, think):
    service = 0.05
    traffic = {"process": "closed", "users": users, "think_time": think}
    res = run_dict(sme(mean=service, traffic=traffic, duration=8000, warmup=200))
    ok = _ok(res, 200)
    x_expect, r_expect = mva_single_server(users, service, think)
    x = res.summary["overall"]["throughput_per_s"]
    r = ok["latency_ms"].mean() / 1e3
    assert x == pytest.approx(x_expect, rel=0.03)
    assert r == pytest.approx(r_expect, rel=0.04)
    # Little's law on the whole loop: N = X (R + Z).
    assert x * (r + think) == pytest.approx(users, rel=0.02)


def test_least_outstanding_beats_random_p99_at_70_percent():
    mean, n = 0.1, 8
    rate = 0.7 * n / mean
    p99 = {}
    for routing in ("random", "least_outstanding_requests", "power_of_two"):
        res = run_dict(sme(rate=rate, mean=mean, instances=n, routing=routing, duration=6000, warmup=300))
        p99[routing] = res.summary["overall"]["p99_ms"]
    # Random: M/M/1 per instance, P99 = ln(100) / (mu - lambda) = 1535 ms. LOR approaches
    # M/M/8 (join the shortest queue); power of two sits in between.
    assert p99["least_outstanding_requests"] < 0.6 * p99["random"]
    assert p99["least_outstanding_requests"] <= p99["power_of_two"] < p99["random"]


def test_round_robin_is_deterministic_split():
    res = run_dict(sme(rate=50, mean=0.01, instances=5, routing="round_robin", duration=100))
    counts = res.requests["instance"].value_counts()
    assert counts.max() - counts.min() <= 1


def test_empirical_service_mg1_pollaczek_khinchine():
    # dist: empirical draws the samples themselves: service 10 ms or 30 ms, equally likely
    # (E[S] = 20 ms, E[S^2] = 500 ms^2); at rho 0.5 one FIFO server waits lambda E[S^2] / (2 (1 - rho))
    # = 12.5 ms on average (Pollaczek-Khinchine). 3% is about four standard errors at this length.
    d = sme(rate=25.0, duration=4000, warmup=200)
    d["models"][0]["service"] = {"dist": "empirical", "samples": ["10ms", "30ms"]}
    ok = _ok(run_dict(d), 200)
    assert set(np.round(ok["service_ms"], 6)) == {10.0, 30.0}
    assert ok["wait_ms"].mean() == pytest.approx(12.5, rel=0.03)
