"""optimize's per-copy concurrency knobs (sim.plan.knobs): max_concurrency of a model with a batching
curve, max_num_seqs of a language model. On a small fleet of each, the search with the knob finds a
plan no more expensive than without it, and the brute force's optimum over the extended space (every
type, count and knob value the search weighs), with fewer simulations. Seeds: the scenarios'
(batching_fleet 5, llm_code_7b 11); two replications a plan; feasibility as optimize judges it (each
SLO figure's P99 plus its 95% CI half-width within the target, at most 0.1% failed)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

import sim
from sim.plan.knobs import endpoint_knob, promising, values
from sim.plan.load import execution_model

HERE = Path(__file__).resolve().parent
BATCHING = HERE / "data" / "batching_fleet.yaml"
LLM = HERE.parent / "scenarios" / "llm_code_7b.yaml"
DEMO = HERE.parent / "scenarios" / "optimize_demo.yaml"
LLM_OVS = ["duration=3m", "warmup=1m"]
REPS = 2


def brute_force(path, space: dict[str, list[int]], key: str, counts: list[int], overrides=()) -> pd.DataFrame:
    """Every (type, count, knob value) of ``space`` (type -> values) simulated with REPS replications."""
    from sim.plan import sweep
    from sim.plan.executors import LocalExecutor

    frames = []
    for t, vals in space.items():
        grid = {"endpoints[0].instance_type": [t], "endpoints[0].instances": counts, key: vals}
        frames.append(sweep(path, grid, replications=REPS, executor=LocalExecutor(2), overrides=list(overrides)))
    df = pd.concat(frames, ignore_index=True)
    assert (df["status"] == "ok").all()
    from sim.catalog import load_catalog

    price = {t: load_catalog().instance(t).price_per_hour for t in space}
    df["cost"] = df["endpoints[0].instances"] * df["endpoints[0].instance_type"].map(price)
    return df


_BRUTE: dict[tuple, pd.DataFrame] = {}


def brute_force_shared(path, space: dict[str, list[int]], key: str, counts: list[int]) -> pd.DataFrame:
    """:func:`brute_force`, run once per grid: the batching fleet's two SLO targets weigh the same grid (a
    sweep's figures do not depend on the target), so the second reads the first's table (a copy)."""
    k = (str(path), tuple((t, tuple(v)) for t, v in space.items()), key, tuple(counts))
    if k not in _BRUTE:
        _BRUTE[k] = brute_force(path, space, key, counts)
    return _BRUTE[k].copy()


def knob_space(res, e: str) -> dict[str, list[int]]:
    """The knob values the search weighed per instance type (its candidates, pruned or not)."""
    out: dict[str, set] = {}
    for c in res.candidates:
        if c["endpoint"] == e and "value" in c:
            out.setdefault(c["instance_type"], set()).add(c["value"])
    return {t: sorted(v) for t, v in out.items()}


def test_the_values_weighed_and_the_promising_ones():
    assert values(1, 8) == [1, 2, 4, 8]
    assert values(256, 47) == [1, 2, 4, 8, 16, 32, 47, 256]
    assert values(3, 4) == [1, 2, 3, 4]
    # The scenario's own value (None) always; the two cheapest finite estimates (ties: the larger value).
    est = {None: 9.0, 1: 7.0, 2: 4.0, 4: 4.0, 8: float("inf")}
    assert promising(est) == {None, 4, 2}
    assert promising({None: 1.0, 2: float("inf")}) == {None}


def test_a_knob_only_where_the_execution_model_charges_for_concurrency():
    for path, ovs, want in ((BATCHING, [], ("max_concurrency", 1, 8)), (LLM, LLM_OVS, ("max_num_seqs", 256, 0)),
                            (DEMO, [], None)):
        sc = sim.load_scenario(path, ovs)
        ex = {g.index: execution_model(sc, g.index)[0] for g in sc.groups}
        kn, why = endpoint_knob(sc, 0, ex)
        assert why is None
        if want is None:        # slots without a curve: more concurrency is free, never searched
            assert kn is None
        else:
            assert (kn.kind, kn.own, kn.curve_k) == want
    # A scenario without batching or language models: the plans and the table have no knob.
    res = sim.plan.optimize(DEMO, instance_types=["ml.g6.xlarge"], max_instances=6, replications=REPS,
                            overrides=["duration=3m"])
    assert set(res.best_plan["chat"]) == {"instance_type", "instances", "routing"}
    assert not any(c.endswith(("max_concurrency", "max_num_seqs")) for c in res.plans.columns)


@pytest.mark.parametrize("target_ms", [800, 400])
def test_batching_fleet_the_knob_search_finds_the_brute_force_optimum(tmp_path, target_ms):
    """One batched model (slowdown 1, 1.2, 1.6, 2.8 at 1, 2, 4, 8 in service), 40/s, served one request at a
    time per copy in the scenario. P99 <= 800 ms: without the knob the cheapest plan is 5 x ml.g6.xlarge;
    with it, 2 x ml.g6.xlarge at max_concurrency 8 (2.86 requests per service time per device), in one
    simulation. P99 <= 400 ms (8 in service stretch a request 2.8 times): 6 x ml.g6.xlarge without, 3 at
    max_concurrency 4 with, in 5 simulations (measured at this commit). Each the brute force's optimum over
    2 types x 8 counts x max_concurrency 1, 2, 4, 8."""
    from sim.plan import optimize

    kw = dict(instance_types=["ml.g5.xlarge", "ml.g6.xlarge"], max_instances=8, replications=REPS,
              slo=f"p99={target_ms}ms")
    without = optimize(BATCHING, knobs=False, **kw)
    res = optimize(BATCHING, out=tmp_path / "opt", **kw)
    assert without.feasible and res.feasible
    assert res.cost_per_hour_usd <= without.cost_per_hour_usd + 1e-9
    assert "max_concurrency" not in without.best_plan["vision"]

    space = knob_space(res, "vision")
    assert space == {"ml.g5.xlarge": [1, 2, 4, 8], "ml.g6.xlarge": [1, 2, 4, 8]}
    brute = brute_force_shared(BATCHING, space, "endpoints[0].max_concurrency", list(range(1, 9)))
    brute["feasible"] = ((brute["p99_ms"] + brute["p99_ms_ci95"] <= target_ms)
                         & (brute["failed"] / brute["requests"] <= 0.001))
    best = brute[brute["feasible"]].sort_values("cost").iloc[0]
    assert res.cost_per_hour_usd == pytest.approx(best["cost"], rel=1e-9)
    p = res.best_plan["vision"]
    mine = brute[(brute["endpoints[0].instance_type"] == p["instance_type"])
                 & (brute["endpoints[0].instances"] == p["instances"])
                 & (brute["endpoints[0].max_concurrency"] == p["max_concurrency"])]
    assert len(mine) == 1 and bool(mine["feasible"].iloc[0])
    assert res.cost_per_hour_usd < without.cost_per_hour_usd          # here the knob pays
    assert res.n_simulations < len(brute) == 64

    # The chosen value is in optimize.json, plans.csv and best.yaml (which runs the plan again).
    out = tmp_path / "opt"
    import json

    assert json.loads((out / "optimize.json").read_text())["best_plan"]["vision"]["max_concurrency"] == \
        p["max_concurrency"]
    assert "vision.max_concurrency" in pd.read_csv(out / "plans.csv").columns
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    assert best_yaml["endpoints"][0]["max_concurrency"] == p["max_concurrency"]


def test_language_model_the_knob_search_finds_the_brute_force_optimum():
    """llm_code_7b (TTFT <= 1 s, TPOT <= 100 ms) over ml.g5.xlarge and ml.g6e.xlarge, 1..6 instances,
    max_num_seqs the scenario's 256 or a power of two up to what a copy's KV cache holds at the fleet's
    mean sequence length (about 11 on an A10G, 47 on an L40S) and that cap: the optimizer's plan is as
    cheap as the brute force's cheapest feasible point and no dearer than without the knob, with fewer
    simulations."""
    from sim.plan import optimize

    kw = dict(instance_types=["ml.g5.xlarge", "ml.g6e.xlarge"], max_instances=6, replications=REPS,
              overrides=LLM_OVS)
    without = optimize(LLM, knobs=False, **kw)
    res = optimize(LLM, **kw)
    assert res.cost_per_hour_usd <= without.cost_per_hour_usd + 1e-9
    space = knob_space(res, "code")
    assert set(space) == {"ml.g5.xlarge", "ml.g6e.xlarge"}
    for t, vals in space.items():
        top = max(v for v in vals if v != 256)
        assert vals == values(256, top), t
    assert 9 <= max(v for v in space["ml.g5.xlarge"] if v != 256) <= 13
    assert 40 <= max(v for v in space["ml.g6e.xlarge"] if v != 256) <= 55
    brute = brute_force(LLM, space, "models[0].service.continuous_batching.max_num_seqs", list(range(1, 7)),
                        LLM_OVS)
    brute["feasible"] = ((brute["ttft_p99_ms"] + brute["ttft_p99_ms_ci95"] <= 1000.0)
                         & (brute["tpot_p99_ms"] + brute["tpot_p99_ms_ci95"] <= 100.0)
                         & (brute["failed"] / brute["requests"] <= 0.001))
    ok = brute[brute["feasible"]]
    assert len(ok) and res.feasible
    assert res.cost_per_hour_usd == pytest.approx(ok["cost"].min(), rel=1e-9)
    p = res.best_plan["code"]
    mine = brute[(brute["endpoints[0].instance_type"] == p["instance_type"])
                 & (brute["endpoints[0].instances"] == p["instances"])
                 & (brute["models[0].service.continuous_batching.max_num_seqs"] == p["max_num_seqs"])]
    assert len(mine) == 1 and bool(mine["feasible"].iloc[0])
    assert res.n_simulations < len(brute)


def test_the_printed_table_gives_the_knob_and_no_knobs_keeps_the_scenario_s(tmp_path):
    from click.testing import CliRunner

    from sim.cli import main

    args = ["optimize", str(BATCHING), "--instance-types", "ml.g6.xlarge", "--max-instances", "8",
            "--replications", "2"]
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    assert "per copy" in r.output and "max_concurrency 8" in r.output
    r = CliRunner().invoke(main, args + ["--no-knobs", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "per copy" not in r.output
    assert yaml.safe_load((tmp_path / "b" / "best.yaml").read_text())["endpoints"][0]["max_concurrency"] == 1


def test_a_knob_s_overrides_set_what_the_simulation_reads():
    """max_num_seqs is the model's (its ``models`` entry); the endpoint's max_concurrency, left unset,
    follows it; max_concurrency is the endpoint's."""
    sc = sim.load_scenario(LLM, LLM_OVS)
    ex = {g.index: execution_model(sc, g.index)[0] for g in sc.groups}
    kn, _ = endpoint_knob(sc, 0, ex)
    assert kn.overrides(None) == []
    sc32 = sim.load_scenario(LLM, LLM_OVS + kn.overrides(32))
    assert sc32.groups[0].service.continuous_batching.max_num_seqs == 32
    assert sc32.endpoints[0].max_concurrency == 32
    sc = sim.load_scenario(BATCHING)
    kn, _ = endpoint_knob(sc, 0, {g.index: execution_model(sc, g.index)[0] for g in sc.groups})
    assert sim.load_scenario(BATCHING, kn.overrides(4)).endpoints[0].max_concurrency == 4
