"""Capacity estimators per execution model (sim.plan.capacity) and the one fit check (sim.scenario.fit)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from sim.catalog import load_catalog
from sim.hosting.steps import StepTime
from sim.plan.capacity import (ESTIMATORS, BatchingEstimator, ContinuousEstimator, SlotsEstimator, batching_wait,
                               erlang_c, estimator_for, pool_rate, units_needed)
from sim.scenario import ScenarioError, parse_scenario
from sim.scenario.fit import mme_problem, sme_copies, sme_fit
from sim.scenario.schema import CacheSpec


@dataclass(frozen=True)
class Load:
    peak_rate: float
    mean_s: float
    p99_s: float
    concurrency: int = 1
    execution: str = "slots"
    slowdown: tuple = ()
    name: str = "m"


GRID = [(r, m, c, slo) for r in (0.5, 5.0, 40.0, 200.0) for m in (0.02, 0.3) for c in (1, 4)
        for slo in (None, 1.0, 3.0)]


@pytest.mark.parametrize("rate,mean,conc,slo", GRID)
def test_the_batching_chain_without_a_curve_is_erlang_c(rate, mean, conc, slo):
    """Every request at full speed (slowdown 1): the chain is M/M/c, the same count as Erlang C."""
    lm = Load(rate, mean, 3 * mean, conc)
    assert BatchingEstimator().units(lm, conc, slo, conc) == SlotsEstimator().units(lm, conc, slo, conc) \
        == units_needed(rate, mean, 3 * mean, slo, conc)


def test_the_chain_s_wait_probability_is_erlang_c_without_a_curve():
    for n, a in ((1, 0.5), (4, 3.0), (10, 8.5)):
        p, _ = batching_wait(a, 1.0, n, 1, lambda k: 1.0, 0.0)
        assert p == pytest.approx(erlang_c(n, a), rel=1e-9)


def test_a_batching_curve_lowers_a_device_s_capacity():
    """slowdown {1: 1, 5: 2.4}: five requests at once complete 5 / 2.4 = 2.08 per mean service time, not 5;
    the estimate needs about 5 / 2.08 times the units of full-speed slots, and never fewer."""
    curve = ((1, 1.0), (5, 2.4))
    from sim.hosting.device import slowdown_table

    f = slowdown_table(dict(curve))
    assert pool_rate(5, 1, 5, f) == pytest.approx(5 / 2.4)
    assert pool_rate(6, 2, 5, f) == pytest.approx(2 * 3 / f(3))
    for rate in (5.0, 50.0, 400.0):
        flat = Load(rate, 0.05, 0.12, 5)
        curved = Load(rate, 0.05, 0.12, 5, "batching", curve)
        n0 = SlotsEstimator().units(flat, 5, 1.0, 5)
        n1 = BatchingEstimator().units(curved, 5, 1.0, 5)
        assert n1 >= n0
        # The load alone: rate x mean / (5 / 2.4) devices at most 90% busy.
        assert n1 >= math.ceil(rate * 0.05 / (5 / 2.4) / 0.9)
        if rate >= 50:
            assert n1 / n0 == pytest.approx(2.4, rel=0.25)
    assert estimator_for(Load(1, 1, 1, execution="batching")) is ESTIMATORS["batching"]
    assert estimator_for(Load(1, 1, 1)) is ESTIMATORS["slots"]


def test_continuous_batching_saturation_throughput_from_the_step_model():
    """A one-term step model: base 4 ms, 0.05 ms per decode sequence, 0.1 us per KV token, 0.03 ms per
    prefill token. With B = 64 sequences of 600 + 250 tokens: a step decodes 64 tokens over
    64 x (600 + 125) KV tokens and prefills 64 x 600 / 250 prompt tokens; a request needs 250 steps."""
    step = StepTime.linear(4e-3, 0.03e-3, 0.05e-3, 0.1e-6)
    est = ContinuousEstimator(step, 64, 600.0, 250.0)
    t = 4e-3 + 0.05e-3 * 64 + 0.1e-6 * 64 * 725 + 0.03e-3 * 64 * 600 / 250
    assert est.step_seconds() == pytest.approx(t)
    assert est.throughput() == pytest.approx(64 / (250 * t))
    # The KV cache caps the batch: 20,000 tokens hold 23 sequences of 850.
    assert ContinuousEstimator(step, 64, 600.0, 250.0, kv_tokens=20_000).batch() == 23
    # Copies: the load over 90% of the throughput at least; more for a tight TTFT budget.
    lm = Load(3 * est.throughput(), 0.0, 0.0)
    assert est.units(lm) == math.ceil(3 / 0.9)
    assert est.units(lm, ttft_s=0.01) >= est.units(lm)


def test_fit_checks_are_one_place_for_the_resolver_and_the_planner():
    """Every catalog type against a few models: the resolver's error where sme_fit has a problem, and the
    planner's copies zero exactly where a copy, its host memory or its artifact does not fit."""
    cat = load_catalog()

    @dataclass(frozen=True)
    class M:
        name: str
        memory_gb: float
        host_memory_gb: float
        size_gb: float
        accelerators: int

    models = [M("small", 2.0, 1.0, 2.0, 1), M("mid", 20.0, 4.0, 20.0, 1), M("big", 60.0, 8.0, 60.0, 4),
              M("cpu", 3.0, 1.0, 3.0, 0), M("huge", 300.0, 600.0, 300.0, 8)]
    for it in cat.instance_types.values():
        for m in models:
            f = sme_fit(m, it)
            n = sme_copies(m, it)
            if f.problem is not None and f.copies == 0:
                assert n == 0
            if n > 0:
                assert f.problem is None and n == f.copies
            spec = {"name": "t", "duration": "1m", "models": [{"name": m.name, "size_gb": m.size_gb,
                    "memory_gb": m.memory_gb, "host_memory_gb": m.host_memory_gb, "accelerators": m.accelerators,
                    "service": {"dist": "deterministic", "mean": "10ms"}, "traffic": {"process": "poisson", "rate": 1}}],
                    "endpoints": [{"name": "e", "mode": "sme", "instance_type": it.name, "models": [m.name]}]}
            try:
                parse_scenario(spec)
                raised = None
            except ScenarioError as e:
                raised = str(e)
            if f.problem is not None:
                assert raised is not None and f.problem in raised, (it.name, m.name, raised)
            else:
                assert raised is None, (it.name, m.name, raised)
            mp = mme_problem(m, it, CacheSpec())
            assert (mp is None) == (m.size_gb <= it.storage_gb + 1e-9 and (
                (m.memory_gb <= it.total_gpu_memory_gb * 0.9 + 1e-9 and m.host_memory_gb <= it.memory_gb - 2 + 1e-9)
                if it.gpus > 0 else m.memory_gb + m.host_memory_gb <= it.memory_gb - 2 + 1e-9))
