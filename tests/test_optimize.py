"""capsim optimize: the cheapest feasible plan, against a brute-force sweep, with fewer simulations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

import sim
from sim.catalog import load_catalog
from sim.cli import main
from sim.plan import optimize, sweep
from sim.plan.executors import LocalExecutor
from sim.plan.optimize import erlang_c, pareto, parse_slo
from sim.scenario import ScenarioError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "scenarios" / "optimize_demo.yaml"
TYPES = ["ml.g5.xlarge", "ml.g4dn.xlarge", "ml.g6.xlarge"]
SLO_MS = 600.0
MAX_FAILED = 0.001
REPS = 3


def test_erlang_c_and_slo_parsing():
    assert erlang_c(1, 0.5) == pytest.approx(0.5)          # M/M/1: P(wait) = utilisation
    assert erlang_c(2, 1.0) == pytest.approx(1 / 3)
    assert erlang_c(3, 3.0) == 1.0
    assert parse_slo("p99=500ms,p50=100ms") == {"p99": 0.5, "p50": 0.1}
    assert parse_slo(["p99=2s"]) == {"p99": 2.0}
    for bad in ("p98=1s", "p99", "p99=fast"):
        with pytest.raises(ScenarioError) as e:
            parse_slo(bad)
        assert "--slo" in str(e.value)
    with pytest.raises(ScenarioError, match="no SLO"):
        parse_slo(None, None)


def test_pareto_keeps_the_non_dominated_plans():
    df = pd.DataFrame({"cost": [1, 2, 2, 3, 4], "p99": [900, 500, 400, 450, 300]})
    assert pareto(df, "cost", "p99")[["cost", "p99"]].values.tolist() == [[1, 900], [2, 400], [4, 300]]


def test_optimize_matches_brute_force_with_fewer_simulations(tmp_path):
    cat = load_catalog()
    price = {t: cat.instance(t).price_per_hour for t in TYPES}
    # Brute force: every type x 1..10 instances, same replications (and so the same seeds) as optimize.
    grid = {"endpoints[0].instance_type": TYPES, "endpoints[0].instances": list(range(1, 11))}
    brute = sweep(DEMO, grid, replications=REPS, executor=LocalExecutor(2))
    assert len(brute) == 30
    # A T4 (16 GB) cannot hold the model (20 GB): those points fail in the loader.
    assert (brute.loc[brute["endpoints[0].instance_type"] == "ml.g4dn.xlarge", "status"] == "error").all()
    ok = brute[brute["status"] == "ok"].copy()
    ok["feasible"] = ((ok["p99_ms"] + ok["p99_ms_ci95"] <= SLO_MS)
                      & (ok["failed"] / ok["requests"] <= MAX_FAILED))
    ok["cost"] = ok["endpoints[0].instances"] * ok["endpoints[0].instance_type"].map(price)
    best = ok[ok["feasible"]].sort_values("cost").iloc[0]
    assert 1 < best["endpoints[0].instances"] < 10    # the optimum lies inside the searched range

    res = optimize(DEMO, instance_types=TYPES, max_instances=10, slo="p99=600ms", max_failed=MAX_FAILED,
                   replications=REPS, out=tmp_path / "opt")
    assert res.feasible
    assert res.best_plan == {"chat": {"instance_type": best["endpoints[0].instance_type"],
                                      "instances": int(best["endpoints[0].instances"]), "routing": "random"}}
    assert res.cost_per_hour_usd == pytest.approx(best["cost"])
    assert res.n_simulations < 30
    assert res.n_simulations < int((brute["status"] == "ok").sum())
    # The same plan, the same seeds: the same figures as the brute force's point.
    assert res.best_summary["overall"]["p99_ms"] == pytest.approx(best["p99_ms"], rel=1e-12)
    # Every plan optimize simulated agrees with the brute force on feasibility.
    for _, row in res.plans.iterrows():
        b = ok[(ok["endpoints[0].instance_type"] == row["chat.instance_type"])
               & (ok["endpoints[0].instances"] == row["chat.instances"])].iloc[0]
        assert bool(row["feasible"]) == bool(b["feasible"])
    skipped = [c for c in res.candidates if c["instance_type"] == "ml.g4dn.xlarge"]
    assert skipped and skipped[0]["status"] == "skipped" and "GPU memory" in skipped[0]["reason"]

    out = tmp_path / "opt"
    for f in ("optimize.json", "best.yaml", "plans.csv", "frontier.csv", "frontier.png"):
        assert (out / f).exists(), f
    assert (out / "frontier.png").stat().st_size > 1000
    doc = json.loads((out / "optimize.json").read_text())
    assert doc["n_simulations"] == res.n_simulations and doc["feasible"] is True
    # best.yaml is the original scenario with the plan applied, and it loads.
    best_yaml = yaml.safe_load((out / "best.yaml").read_text())
    assert best_yaml["endpoints"][0]["instance_type"] == res.best_plan["chat"]["instance_type"]
    assert best_yaml["endpoints"][0]["instances"] == res.best_plan["chat"]["instances"]
    assert best_yaml["models"] == yaml.safe_load(DEMO.read_text())["models"]
    sim.load_scenario(out / "best.yaml")
    fr = pd.read_csv(out / "frontier.csv")
    assert fr["cost_per_hour_usd"].is_monotonic_increasing and fr["p99_ms"].is_monotonic_decreasing
    assert len(pd.read_csv(out / "plans.csv")) == res.n_simulations


def test_several_endpoints_and_routing_choices(tmp_path):
    d = {
        "name": "two", "seed": 3, "duration": 300, "warmup": 30,
        "models": [
            {"name": "a", "size_gb": 2, "service": {"dist": "lognormal", "mean": 0.05, "cv": 0.5},
             "traffic": {"process": "poisson", "rate": 40}},
            {"name": "emb-{i}", "count": 3, "size_gb": 1, "service": {"dist": "exponential", "mean": 0.02},
             "traffic": {"process": "poisson", "rate": 60}},
        ],
        "endpoints": [
            {"name": "a", "mode": "sme", "instance_type": "ml.g5.xlarge", "instances": 6, "routing": "random",
             "models": ["a"]},
            {"name": "emb", "mode": "mme", "instance_type": "ml.g5.xlarge", "instances": 3, "models": ["emb-*"]},
        ],
        "slo": {"p99": "400ms"},
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    res = optimize(path, routing=["random", "least_outstanding_requests"], replications=2, max_instances=8)
    assert res.feasible
    assert set(res.best_plan) == {"a", "emb"}
    s = res.best_summary
    for name in ("a", "emb"):
        blk = s["endpoints"][name]
        assert blk["p99_ms"] + blk["p99_ms_ci95"] <= 400
    # Each endpoint's count is the smallest feasible for its type and routing: one fewer misses (or is 0).
    plans = res.plans
    for name, p in res.best_plan.items():
        n = p["instances"]
        if n > 1:
            fewer = plans[(plans[f"{name}.instance_type"] == p["instance_type"])
                          & (plans[f"{name}.routing"] == p["routing"]) & (plans[f"{name}.instances"] == n - 1)]
            if len(fewer):
                assert not fewer[f"{name}.feasible"].any()
            else:   # not simulated: pruned by the utilisation bound or by cost
                assert any(c["endpoint"] == name for c in res.candidates)
    # The plan through the CLI, as JSON.
    r = CliRunner().invoke(main, ["optimize", str(path), "--routing", "random,least_outstanding_requests",
                                  "--replications", "2", "--max-instances", "8", "--json",
                                  "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["best_plan"] == res.best_plan and doc["n_simulations"] == res.n_simulations


def test_cli_errors_are_one_paragraph(tmp_path):
    for args, needle in ((["--instance-types", "ml.g9.xlarge"], "ml.g9.xlarge"),
                         (["--slo", "p99"], "--slo"), (["--routing", "fastest"], "fastest"),
                         (["--endpoint", "nope"], "nope")):
        r = CliRunner().invoke(main, ["optimize", str(DEMO), "--out", str(tmp_path / "o"), *args])
        assert r.exit_code == 2, r.output
        out = r.output.strip()
        assert out.startswith("error: ") and needle in out and "\n" not in out


def test_no_feasible_plan_is_reported(tmp_path):
    res = optimize(DEMO, instance_types=["ml.g6.xlarge"], max_instances=4, slo="p99=600ms", replications=2)
    assert not res.feasible
    assert any("no plan meets the SLO" in n for n in res.notes)
    # A target the service time alone misses is pruned without simulating.
    res = optimize(DEMO, instance_types=["ml.g6.xlarge"], slo="p99=100ms", replications=2)
    assert not res.feasible and res.n_simulations <= 1
    assert res.candidates[0]["status"] == "pruned" and "service time alone" in res.candidates[0]["reason"]
    assert math.isfinite(res.cost_per_hour_usd)
