"""compare and optimize on two local worker processes give the serial results (sim.plan.parallel)."""
from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

import sim
from sim.cli import main
from sim.plan import optimize

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "scenarios" / "compare_small_models.yaml"
DEMO = ROOT / "scenarios" / "optimize_demo.yaml"
KEYS = ("cost_per_hour_usd", "p50_ms", "p99_ms", "p99_ms_ci95", "requests", "failed", "slo_attainment", "slo_met",
        "instances", "sizing")


def _plans(c):
    s = c.summary
    return {n: ({k: b.get(k) for k in KEYS}, c.plans[n].endpoints) for n, b in s["plans"].items()}


def test_compare_with_two_workers_is_the_serial_compare():
    # A sizing that grows (a 300 ms SLO at 400/s) and replications: rounds and the final runs on the pool.
    ovs = ["models[0].traffic.rate=120/s", "slo.p99=300ms", "duration=2m", "warmup=1m", "replications=2"]
    serial = sim.compare(SMALL, ["sme", "mme", "ic"], overrides=ovs)
    two = sim.compare(SMALL, ["sme", "mme", "ic"], overrides=ovs, workers=2)
    assert _plans(two) == _plans(serial)
    assert two.best == serial.best
    for n, p in serial.plans.items():
        assert p.result.requests.equals(two.plans[n].result.requests), n


def test_optimize_with_two_workers_is_the_serial_optimize():
    kw = dict(instance_types=["ml.g5.xlarge", "ml.g6.xlarge"], max_instances=8, slo="p99=600ms", replications=2)
    serial = optimize(DEMO, **kw)
    two = optimize(DEMO, workers=2, **kw)
    assert two.best_plan == serial.best_plan and two.cost_per_hour_usd == serial.cost_per_hour_usd
    assert two.n_simulations == serial.n_simulations
    cols = [c for c in serial.plans.columns if c != "wall_seconds"]
    assert two.plans[cols].equals(serial.plans[cols])
    assert two.best_summary["overall"]["p99_ms"] == serial.best_summary["overall"]["p99_ms"]


def test_modes_with_two_workers_and_the_cli_option(tmp_path):
    kw = dict(modes="sme,ic", max_instances=6, replications=2)
    serial = optimize(DEMO, **kw)
    two = optimize(DEMO, workers=2, **kw)
    assert (two.mode, two.best_plan, two.cost_per_hour_usd) == (serial.mode, serial.best_plan,
                                                                serial.cost_per_hour_usd)
    r = CliRunner().invoke(main, ["compare", str(SMALL), "--plans", "sme,mme", "--workers", "2", "--json",
                                  "--set", "duration=2m", "--out", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    ref = sim.compare(SMALL, ["sme", "mme"], overrides=["duration=2m"]).summary
    for n in ("sme", "mme"):
        assert got["plans"][n]["cost_per_hour_usd"] == ref["plans"][n]["cost_per_hour_usd"]
        assert got["plans"][n]["p99_ms"] == ref["plans"][n]["p99_ms"]


# -- compare takes --slo and --instance-types as optimize does; optimize and --modes search the same routing --
def test_compare_slo_and_instance_types(tmp_path):
    c = sim.compare(SMALL, ["sme", "mme", "ic"], overrides=["duration=2m"], slo="p99=200ms",
                    instance_types=["ml.g5.xlarge", "ml.g6.xlarge"])
    assert c.slo.targets_ms == {"p99": 200.0} and c.summary["slo"] == {"p99_ms": 200.0}
    assert c.scenario.spec.slo.p99 == 0.2          # the simulations' attainment counts against it too
    used = {ep["instance_type"] for p in c.plans.values() for ep in p.endpoints}
    assert used and used <= {"ml.g5.xlarge", "ml.g6.xlarge"}
    # no multi-GPU type among those: the IC plan packs its copies on a single-GPU one
    assert "ic" in c.summary["plans"] and c.plans["ic"].endpoints[0]["instance_type"] in used
    r = CliRunner().invoke(main, ["compare", str(SMALL), "--plans", "mme", "--slo", "p99=200ms", "--instance-types",
                                  "ml.g9.nope", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "ml.g9.nope" in r.output and "Traceback" not in r.output


def test_optimize_and_modes_agree_on_a_single_endpoint_fleet():
    """optimize_demo: one SME endpoint with random routing. Over the same types, optimize and
    optimize --modes sme search the same routing (the endpoint's) and find the same plan."""
    kw = dict(instance_types=["ml.g5.xlarge", "ml.g6.xlarge"], max_instances=8, slo="p99=600ms", replications=2)
    plain = optimize(DEMO, **kw)
    modes = optimize(DEMO, modes="sme", **kw)
    assert modes.mode == "sme" and plain.feasible and modes.feasible
    assert modes.best_plan == plain.best_plan
    assert modes.cost_per_hour_usd == plain.cost_per_hour_usd
