"""Sizing language models (continuous batching) from their engine on each instance type: the KV cache
the type's GPUs leave beside the weights and its step time (sim.plan.capacity.ContinuousSizing)."""
from __future__ import annotations

from pathlib import Path

import pytest

import sim
from sim.plan.capacity import ESTIMATORS, MAX_UNITS
from sim.plan.load import fleet_load

LLM = Path(__file__).resolve().parents[1] / "scenarios" / "llm_code_7b.yaml"
OVS = ["duration=5m", "warmup=1m"]


@pytest.fixture(scope="module")
def llm():
    sc = sim.load_scenario(LLM, OVS)
    return sc, fleet_load(sc)[0]


def test_the_kv_cache_sets_a_copy_s_batch_and_throughput(llm):
    """15 GB of weights: a T4 (16 GB x 0.9) leaves no KV cache, so no copy runs there; an A10G (24 GB)
    holds about 11 sequences of the fleet's mean length (1,004 + 117 tokens), an L40S (48 GB) about 47,
    an H100 (80 GB) 96 (KV-limited below max_num_seqs 256); throughput per copy follows the batch."""
    sc, lm = llm
    cs = ESTIMATORS["continuous"]
    assert lm.execution == "continuous" and lm.llm.ttft_s == 1.0
    assert cs.copy_estimator(lm, sc.catalog.instance("ml.g4dn.xlarge")) is None
    assert cs.units(lm, 1, None, 1, sc.catalog.instance("ml.g4dn.xlarge")) == MAX_UNITS
    got = {}
    for t in ("ml.g5.xlarge", "ml.g6e.xlarge", "ml.p5.48xlarge"):
        e = cs.copy_estimator(lm, sc.catalog.instance(t))
        mean_len = lm.llm.mean_input + lm.llm.mean_output
        assert e.batch() == min(256, int(e.kv_tokens // mean_len))
        got[t] = (e.batch(), e.throughput())
    assert 9 <= got["ml.g5.xlarge"][0] <= 13 and 40 <= got["ml.g6e.xlarge"][0] <= 55
    assert got["ml.g5.xlarge"][1] < got["ml.g6e.xlarge"][1] < got["ml.p5.48xlarge"][1]


def test_compare_picks_the_type_whose_engine_costs_least_and_meets_ttft_and_tpot(llm):
    """The SME plan: the type of least estimated cost over the catalog's GPU types (ml.g6e.xlarge: an
    L40S's KV cache batches about 47 sequences), met in its first simulation (TTFT P99 <= 1 s,
    TPOT P99 <= 100 ms; the scenario's SLO)."""
    sc, lm = llm
    c = sim.compare(LLM, "sme", overrides=OVS)
    p = c.plans["sme"]
    (ep,) = p.endpoints
    cs = ESTIMATORS["continuous"]
    costs = {t.name: cs.units(lm, t.gpus, None, 1, t) * t.price_per_hour for t in sc.catalog.instance_types.values()
             if t.gpus > 0 and t.gpu not in ("Inferentia2", "Inferentia", "Trainium") and t.gpu_memory_gb * 0.9 > 15}
    assert ep["instance_type"] == min(costs, key=costs.get) == "ml.g6e.xlarge"
    b = c.summary["plans"]["sme"]
    assert b["slo_met"] and len(b["sizing"]) == 1
    assert b["ttft_p99_ms"] <= 1000 and b["tpot_p99_ms"] <= 100
    assert b["execution_models"] == {"continuous": 1}


def test_optimize_on_a_language_model_finds_the_brute_force_optimum_with_fewer_simulations():
    """llm_code_7b (TTFT <= 1 s, TPOT <= 100 ms) over ml.g5.xlarge and ml.g6e.xlarge, 1..8 instances, two
    replications: the brute force's cheapest point whose TTFT and TPOT P99 plus their 95% CI meet the
    targets with at most 0.1% failed is the optimizer's plan, found with fewer simulations."""
    from sim.catalog import load_catalog
    from sim.plan import optimize, sweep
    from sim.plan.executors import LocalExecutor

    types = ["ml.g5.xlarge", "ml.g6e.xlarge"]
    grid = {"endpoints[0].instance_type": types, "endpoints[0].instances": list(range(1, 9)),
            "duration": ["4m"], "warmup": ["1m"]}
    brute = sweep(LLM, grid, replications=2, executor=LocalExecutor(2))
    assert len(brute) == 16 and (brute["status"] == "ok").all()
    price = {t: load_catalog().instance(t).price_per_hour for t in types}
    ok = brute.copy()
    ok["feasible"] = ((ok["ttft_p99_ms"] + ok["ttft_p99_ms_ci95"] <= 1000.0)
                      & (ok["tpot_p99_ms"] + ok["tpot_p99_ms_ci95"] <= 100.0)
                      & (ok["failed"] / ok["requests"] <= 0.001))
    ok["cost"] = ok["endpoints[0].instances"] * ok["endpoints[0].instance_type"].map(price)
    best = ok[ok["feasible"]].sort_values("cost").iloc[0]
    assert 1 < best["endpoints[0].instances"] < 8          # inside the searched range

    res = optimize(LLM, instance_types=types, max_instances=8, replications=2, overrides=["duration=4m", "warmup=1m"])
    assert res.feasible
    assert res.best_plan["code"]["instance_type"] == best["endpoints[0].instance_type"]
    assert res.best_plan["code"]["instances"] == int(best["endpoints[0].instances"])
    assert res.cost_per_hour_usd == pytest.approx(best["cost"])
    assert res.n_simulations < len(brute)
    # The plans table gives the TTFT target's figure (its P99), as the brute force's.
    row = res.plans[res.plans["feasible"].astype(bool)].sort_values("cost_per_hour_usd").iloc[0]
    assert row["ttft_ms"] == pytest.approx(best["ttft_p99_ms"])
