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
# Three types that each hold the model (20 GB on a 24 GB A10G or L4), at different prices.
TYPES = ["ml.g5.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge"]
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
    assert len(brute) == 30 and (brute["status"] == "ok").all()
    ok = brute.copy()
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
    assert res.n_simulations <= 10          # a third of the brute force's 30 points, or fewer
    # The same plan, the same seeds: the same figures as the brute force's point.
    assert res.best_summary["overall"]["p99_ms"] == pytest.approx(best["p99_ms"], rel=1e-12)
    # Every plan optimize simulated agrees with the brute force on feasibility.
    for _, row in res.plans.iterrows():
        b = ok[(ok["endpoints[0].instance_type"] == row["chat.instance_type"])
               & (ok["endpoints[0].instances"] == row["chat.instances"])].iloc[0]
        assert bool(row["feasible"]) == bool(b["feasible"])
    # Every type was a candidate (each holds the model); the dearer ones were searched only below the
    # best plan's cost, or not at all.
    status = {c["instance_type"]: c["status"] for c in res.candidates}
    assert set(status) == set(TYPES) and "skipped" not in status.values()

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
            else:   # not simulated: then it lies below the utilisation bound, which the search starts from
                cand = [c for c in res.candidates if c["endpoint"] == name and c["status"] == "feasible"
                        and c["instance_type"] == p["instance_type"] and c["routing"] == p["routing"]]
                assert len(cand) == 1 and cand[0]["n_lower"] == n, cand
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
    assert any("no plan meets the SLO" in n and n.endswith("the plan shown has the lowest P99 simulated")
               for n in res.notes)
    # A target the service time alone misses is pruned without simulating.
    res = optimize(DEMO, instance_types=["ml.g6.xlarge"], slo="p99=100ms", replications=2)
    assert not res.feasible and res.n_simulations <= 1
    assert res.candidates[0]["status"] == "pruned" and "service time alone" in res.candidates[0]["reason"]
    assert math.isfinite(res.cost_per_hour_usd)


def test_a_type_the_model_does_not_fit_is_skipped_without_simulating():
    # A T4 (16 GB) cannot hold the model (20 GB): skipped by the loader's check, never simulated.
    res = optimize(DEMO, instance_types=["ml.g4dn.xlarge", "ml.g6.xlarge"], max_instances=10, slo="p99=600ms",
                   replications=2)
    skipped = [c for c in res.candidates if c["instance_type"] == "ml.g4dn.xlarge"]
    assert len(skipped) == 1 and skipped[0]["status"] == "skipped" and "GPU memory" in skipped[0]["reason"]
    assert set(res.plans["chat.instance_type"]) == {"ml.g6.xlarge"}
    assert res.feasible and res.best_plan["chat"]["instance_type"] == "ml.g6.xlarge"
    # None weighed fits: an error naming why, not the scenario's own plan on a type not asked for
    with pytest.raises(ScenarioError, match=r"endpoints\[0\]\.instance_type: no instance type weighed "
                                            r"\(ml\.g4dn\.xlarge\) can serve endpoint chat: model 'chat' needs 20 GB"):
        optimize(DEMO, instance_types=["ml.g4dn.xlarge"], max_instances=10, slo="p99=600ms", replications=2)


def test_hosting_modes_are_searched_and_the_cheapest_feasible_wins(tmp_path):
    res = optimize(DEMO, modes="sme,mme,ic", replications=2, max_instances=8, out=tmp_path / "o")
    assert list(res.modes) == ["sme", "mme", "ic"]
    feasible = {m: o["cost_per_hour_usd"] for m, o in res.modes.items() if o.get("feasible")}
    assert feasible and res.feasible
    assert res.mode == min(feasible, key=feasible.get)
    assert res.cost_per_hour_usd == pytest.approx(feasible[res.mode])
    assert set(res.plans["mode"]) == set(res.modes)
    assert res.n_simulations == sum(o["n_simulations"] for o in res.modes.values())
    # The IC plan comes from compare's builder: copies per component, on a GPU type (single-GPU types
    # included: inference components run on them).
    ic = res.modes["ic"]["best_plan"]["ic"]
    assert ic["copies"]["chat"] >= 1 and load_catalog().instance(ic["instance_type"]).gpus >= 1
    # best.yaml is a scenario of the winning mode; it loads, and the figures are within the SLO's CI rule.
    best = sim.load_scenario(tmp_path / "o" / "best.yaml")
    assert {ep.mode for ep in best.endpoints} == {res.mode}
    ov = res.best_summary["overall"]
    assert ov["p99_ms"] + ov["p99_ms_ci95"] <= SLO_MS
    doc = json.loads((tmp_path / "o" / "optimize.json").read_text())
    assert doc["mode"] == res.mode and set(doc["modes"]) == {"sme", "mme", "ic"}


def test_modes_on_large_one_gpu_models_pick_inference_components():
    # compare's large fleet: no single-GPU type holds a copy (no MME), SMEs hold an 8-GPU instance each.
    large = ROOT / "scenarios" / "compare_large_models.yaml"
    # 30 minutes and 5 replications: at 0.2 requests/s a model's P99 over 10 minutes is nearly its
    # slowest request, and its 95% CI over 2 replications (t = 12.7) is too wide to pass the rule.
    res = optimize(large, modes=["sme", "mme", "ic"], replications=5, max_instances=2, overrides=["duration=30m"])
    assert res.modes["mme"]["status"] == "not built" and "single-GPU" in res.modes["mme"]["reason"]
    assert res.modes["sme"]["feasible"] and res.modes["ic"]["feasible"]
    assert res.mode == "ic"
    # exactly 4x: the IC plan needs 2 instances under the scenario's slowdown curve (1, 8x, with full-speed
    # slots); a relative tolerance for the float product
    assert res.modes["sme"]["cost_per_hour_usd"] >= 4 * res.modes["ic"]["cost_per_hour_usd"] * (1 - 1e-9)


def test_bad_modes_are_one_paragraph(tmp_path):
    r = CliRunner().invoke(main, ["optimize", str(DEMO), "--modes", "sme,icc", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    out = r.output.strip()
    assert out.startswith("error: ") and "unknown hosting mode 'icc' (did you mean ic?)" in out and "\n" not in out


def test_a_bare_slo_target_far_beyond_seconds_gets_a_note():
    from sim.plan.slo import unit_hints

    assert unit_hints("p99=2000") == ["--slo slo.p99: 2000 is 33.3 minutes for a latency target (a bare number is "
                                      "in seconds); did you mean 2000ms?"]
    assert unit_hints("p99=2000ms,p50=2s") == unit_hints(None) == []
    res = optimize(DEMO, instance_types=["ml.g6.xlarge"], max_instances=2, slo="p99=2000", replications=1)
    assert any(n.startswith("--slo slo.p99: 2000 is") for n in res.notes)


def test_a_closed_loop_language_model_is_sized(tmp_path):
    """A closed loop of 4 users on a continuous-batching 7B model: its knob (max_num_seqs) has no capacity
    estimate to weigh (no arrival rate), and the search sorted its candidates on that estimate (KeyError)."""
    d = {"name": "closed", "seed": 1, "duration": 60, "models": [{
        "name": "c", "architecture": "mistral-7b", "tokens": {"input": 200, "output": 50},
        "service": {"continuous_batching": {}}, "traffic": {"process": "closed", "users": 4, "think_time": 1}}],
        "endpoints": [{"name": "c", "mode": "sme", "instance_type": "ml.g6e.xlarge", "instances": 1,
                       "models": ["c"]}], "slo": {"p99": 30}}
    path = tmp_path / "closed.yaml"
    path.write_text(yaml.safe_dump(d))
    res = optimize(path, max_instances=3, replications=2)
    assert res.feasible and res.best_plan["c"]["instance_type"] == "ml.g6e.xlarge"
