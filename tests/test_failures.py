"""Instance and availability-zone failures: re-routing, replacement, nothing lost."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import sim
from conftest import run_dict, sme
from sim.scenario import parse_scenario
from sim.simulate import simulate

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


@pytest.mark.parametrize("in_flight", ["retry", "fail"])
def test_az_outage_on_a_3_az_mme(in_flight):
    # longer requests than the scenario's, so that the lost instances surely have some in flight
    sc = sim.load_scenario(SCENARIOS / "mme_az_outage.yaml", [f"endpoints[0].failures.in_flight={in_flight}",
                                                              "models[0].service.mean=150ms"])
    res = sim.run(sc)
    r = res.requests
    # every request is accounted for: ok, failed with a reason, or in flight at the horizon
    assert set(r["status"].astype(str).unique()) <= {"ok", "instance_failure", "in_flight", "timeout"}
    lost = int((r["status"] == "instance_failure").sum())
    if in_flight == "retry":
        assert lost == 0
    else:
        assert lost > 0
        assert (r.loc[r["status"] == "instance_failure", "end_s"] == 20 * 60).all()
    tl = res.timeline.set_index("t_s")
    outage = 20 * 60  # `at` is simulated time from the start, warmup included
    # the two instances of zone 1 are gone, then replaced after the 4 min provisioning
    assert tl.loc[outage + 60, "instances"] == 4
    assert tl.loc[outage + 6 * 60, "instances"] == 6
    # the survivors load the lost models: a burst of cold starts, then none
    assert tl.loc[outage, "cold_starts"] > 0
    assert tl.loc[outage + 10 * 60:, "cold_starts"].sum() == 0
    assert tl.loc[outage - 10 * 60:outage - 60, "cold_starts"].sum() == 0
    # the retried requests wait for the reloads but still complete
    assert res.summary["overall"]["completed"] > 0.99 * res.summary["overall"]["requests"]


def test_sme_instance_failure_fails_its_requests_and_is_replaced():
    d = sme(rate=30, mean=0.1, instances=3, duration=1200, routing="least_outstanding_requests")
    d["endpoints"][0].update(provisioning="2m", failures={"events": [{"at": 300, "instance": 0}]})
    raw = simulate(parse_scenario(d))
    log = raw.logs[0]
    assert [f[0] for f in log.failures] == [300.0]
    fleet = np.array(log.fleet)
    at = fleet[fleet[:, 0] == 300.0]
    assert at[-1, 1] == 2          # in service right after the failure
    back = fleet[fleet[:, 0] > 300.0]
    # the replacement: asked for at 300 s, provisioned 120 s later plus its model load
    assert back[0, 1] == 3 and 420.0 <= back[0, 0] < 440.0
    c = raw.columns
    failed = c["status"] == 5
    assert failed.any() and (c["end"][failed] == 300.0).all()
    assert (c["instance"][failed] == 0).all()


def test_random_failures_follow_the_mtbf():
    d = sme(rate=0.2, mean=0.05, instances=10, duration=200 * 3600)
    d["endpoints"][0].update(provisioning="0s", failures={"mtbf": "20h"})
    raw = simulate(parse_scenario(d))
    n = len(raw.logs[0].failures)
    expect = 10 * 200 / 20       # instances x hours / MTBF
    assert abs(n - expect) < 4 * np.sqrt(expect)
