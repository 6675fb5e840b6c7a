"""compare's autoscaled plans: on a fleet whose traffic varies by design, beside each fixed plan
sized for the peak, the same endpoints with target tracking between the trough's count and the
peak's, costed from the simulated fleet log (seeded: tests/data/diurnal_fleet.yaml, seed 7)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

import sim
from sim.plan.autoscaled import TARGET_SHARE, varies
from sim.plan.load import fleet_load
from sim.scenario import load_scenario

DIURNAL = Path(__file__).resolve().parent / "data" / "diurnal_fleet.yaml"
TYPES = ["ml.g5.xlarge", "ml.g6.xlarge"]


@pytest.fixture(scope="module")
def diurnal(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    return sim.compare(DIURNAL, plans="sme,mme", instance_types=TYPES, out=out), out


def test_the_trough_and_peak_of_a_diurnal_fleet():
    """Mean 30/s, peak to trough 6: the sinusoid's trough is 30 x (1 - 5/7) = 8.6/s, its peak 51.4/s;
    5-minute windows (less or plus one Poisson SD) see them within 15%."""
    (lm,) = fleet_load(load_scenario(DIURNAL))
    assert lm.trough_rate == pytest.approx(30 * 2 / 7, rel=0.15)
    assert lm.peak_rate == pytest.approx(30 * 12 / 7, rel=0.15)
    assert varies([lm])
    steady = fleet_load(load_scenario(DIURNAL, ["models[0].traffic.process=poisson"]))
    assert steady[0].trough_rate is None and not varies(steady)


def test_compare_proposes_an_autoscaled_plan_cheaper_than_the_fixed_one_with_the_slo_met(diurnal):
    cmp, out = diurnal
    fixed, auto = cmp.plans["sme"], cmp.plans["sme-autoscaled"]
    assert fixed.slo_met and auto.slo_met
    s = cmp.summary["plans"]
    # The fleet log prices the autoscaled fleet over the horizon: at least 10% cheaper here.
    assert s["sme-autoscaled"]["cost_per_hour_usd"] < 0.9 * s["sme"]["cost_per_hour_usd"]
    assert cmp.best == "sme-autoscaled"
    # the MME plan gets its twin too, cheaper and meeting the SLO; the plans come in that order
    assert list(cmp.plans) == ["sme", "sme-autoscaled", "mme", "mme-autoscaled"]
    assert cmp.plans["mme-autoscaled"].slo_met
    assert s["mme-autoscaled"]["cost_per_hour_usd"] < 0.9 * s["mme"]["cost_per_hour_usd"]
    ep = auto.endpoints[0]
    n = fixed.endpoints[0]["instances"]
    assert ep["instance_type"] == fixed.endpoints[0]["instance_type"]
    assert ep["instances"]["max"] == n and 1 <= ep["instances"]["min"] < n
    assert ep["autoscaling"]["metric"] == "invocations_per_instance"
    lm = cmp.loads[0]
    assert ep["autoscaling"]["target"] <= 60 * TARGET_SHARE * lm.peak_rate / n + 0.1
    # both in the table, compare.json and the plan files
    assert {"sme", "sme-autoscaled"} <= set(cmp.table().index)
    js = json.loads((out / "compare.json").read_text())
    blk = js["plans"]["sme-autoscaled"]
    assert blk["fixed_plan"] == "sme" and blk["autoscaling"]["chat"]["max"] == n
    assert "autoscaling" not in js["plans"]["sme"]
    plan = yaml.safe_load((out / "plans" / "sme-autoscaled.yaml").read_text())
    assert plan["endpoints"][0]["autoscaling"]["target"] == ep["autoscaling"]["target"]
    # the mean fleet lies between min and max
    mean = sum(blk["instances"].values())
    assert ep["instances"]["min"] < mean < n


def test_steady_or_short_traffic_gets_no_autoscaled_plan():
    short = sim.compare(DIURNAL, plans="sme", instance_types=TYPES, overrides=["duration=20m"])
    assert list(short.plans) == ["sme"]


def test_an_autoscaled_plan_that_misses_grows_its_min_and_lowers_its_target():
    from sim.plan.builders import Plan, grow_endpoints

    p = Plan("sme-autoscaled", "sme", endpoints=[{"name": "a", "instances": {"initial": 6, "min": 2, "max": 6},
                                                  "autoscaling": {"metric": "invocations_per_instance",
                                                                  "target": 400.0}}])
    p.state["autoscaling"] = {"a": {"min": 2, "max": 6, "target": 400.0}}
    grow_endpoints(p, ["a"])
    assert p.endpoints[0]["instances"]["min"] == 3 and math.isclose(p.endpoints[0]["autoscaling"]["target"], 320.0)
    assert p.state["autoscaling"]["a"]["min"] == 3


def test_the_report_and_the_printed_table_show_both_plans(diurnal, tmp_path, monkeypatch):
    import contextlib
    import io

    from sim.cli import print_comparison
    from sim.report.html import write_report

    cmp, out = diurnal
    page = write_report(out, tmp_path / "r.html").read_text()
    assert "sme-autoscaled" in page and "sme" in page
    monkeypatch.setenv("COLUMNS", "200")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_comparison(cmp.summary)
    text = buf.getvalue()
    assert "sme-autoscaled" in text
