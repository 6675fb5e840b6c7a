"""sim.pricing: one place prices an instance-hour and a fleet log; estimated and pre-cut prices are said to be."""
from __future__ import annotations

import pytest

import sim
from sim import pricing
from sim.catalog import load_catalog


def test_prices_and_estimates():
    cat = load_catalog()
    it = cat.instance("ml.g5.xlarge")
    assert pricing.hourly(it) == it.price_per_hour
    assert pricing.cost(it, 7200.0) == pytest.approx(2 * it.price_per_hour)
    assert pricing.fleet_hourly({"ml.g5.xlarge": 3, "ml.g4dn.xlarge": 2}, cat) == pytest.approx(
        3 * it.price_per_hour + 2 * cat.instance("ml.g4dn.xlarge").price_per_hour)
    assert pricing.is_estimate(cat.instance("ml.p5en.48xlarge"))
    assert not pricing.is_estimate(cat.instance("ml.p5.48xlarge"))
    assert pricing.price_warning([it, cat.instance("ml.g6e.xlarge")]) is None
    assert "ml.p5en.48xlarge is an estimate" in pricing.price_warning([cat.instance("ml.p5en.48xlarge"), it])
    # The P4 and P5 prices are listed ones from before the June 2025 cut, and a plan using them says so.
    for name in ("ml.p4d.24xlarge", "ml.p5.48xlarge"):
        assert pricing.is_pre_cut(cat.instance(name)) and not pricing.is_estimate(cat.instance(name))
        assert f"{name} is as listed before" in pricing.price_warning([cat.instance(name), it])
    assert not any(pricing.is_pre_cut(t) for t in cat.instance_types.values() if not t.name.startswith("ml.p"))
    # Every catalog price has a source and a date.
    for t in cat.instance_types.values():
        assert t.source and t.date, t.name


def test_a_plan_on_an_estimated_price_says_so(tmp_path):
    """A model only an H200 instance holds (700 GB on 8 GPUs): the SME plan runs on ml.p5en.48xlarge,
    whose price is an estimate, and its notes say so."""
    p = tmp_path / "s.yaml"
    p.write_text("""name: h200-only
seed: 1
duration: 2m
warmup: 30s
slo: {p99: 30s}
models:
  - name: giant
    size_gb: 700
    accelerators: 8
    service: {dist: lognormal, mean: 2s, cv: 0.3}
    traffic: {process: poisson, rate: 0.2/s}
endpoints:
  - {name: e, mode: sme, instance_type: ml.p5en.48xlarge, models: [giant]}
""")
    c = sim.compare(p, "sme")
    assert c.plans["sme"].endpoints[0]["instance_type"] == "ml.p5en.48xlarge"
    assert any("estimate" in n and "ml.p5en.48xlarge" in n for n in c.plans["sme"].notes), c.plans["sme"].notes
    assert any("estimate" in n for n in c.summary["plans"]["sme"]["notes"])
