"""Autoscaling with CloudWatch alarm semantics, provisioning and draining."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import run_dict, sme
from sim.autoscaling import StepScaling, Step, TargetTracking, scheduled_bounds, ScheduledAction


def step_trace(tmp_path, phases, seed=0):
    """A Poisson trace with a piecewise-constant rate: phases = [(until_s, rate), ...]."""
    rng = np.random.default_rng(seed)
    times, t0 = [], 0.0
    for until, rate in phases:
        n = rng.poisson(rate * (until - t0))
        times.append(np.sort(rng.uniform(t0, until, n)))
        t0 = until
    p = tmp_path / "step.csv"
    pd.DataFrame({"arrival_s": np.concatenate(times)}).to_csv(p, index=False)
    return {"process": "trace", "path": str(p), "format": "csv"}


def scaled(tmp_path, phases, duration, **auto):
    d = sme(mean=0.05, duration=duration, traffic=step_trace(tmp_path, phases))
    e = d["endpoints"][0]
    e["instances"] = {"initial": 1, "min": 1, "max": 10}
    e["max_concurrency"] = 4
    e["provisioning"] = "60s"
    e["autoscaling"] = {"metric": "invocations_per_instance", "target": 600, **auto}
    return d


def test_target_tracking_on_a_load_step(tmp_path):
    # 10/s = 600 per instance-minute, the target, until t=1200; then 40/s; then 5/s from t=3000.
    d = scaled(tmp_path, [(1200, 9.0), (3000, 40.0), (6000, 5.0)], 6000)
    res = run_dict(d)
    from sim.simulate import simulate
    from sim.scenario import parse_scenario

    raw = simulate(parse_scenario(d))
    dec = raw.logs[0].scaling
    outs = [x for x in dec if x[1] == "out"]
    ins = [x for x in dec if x[1] == "in"]
    # Datapoints close at 1260, 1320, 1380: the third one above the target fires the alarm.
    assert outs[0][0] == 1380.0
    # desired = ceil(1 x metric / 600) with metric about 2400 per instance-minute
    assert outs[0][3] == int(np.ceil(outs[0][4] / 600))
    assert 4 <= outs[0][3] <= 5
    # no second scale-out while the new instances start (computed from instances in service)
    assert len(outs) == 1
    # scale-in only after 15 datapoints below 90% of the target: the datapoints of the
    # drop at 3000 close at 3060 ... 3900, and the 15th fires the scale-in to ceil(n x metric / target)
    after = [x for x in ins if x[0] > 3000]
    assert after[0][0] == 3000 + 15 * 60
    assert after[0][3] == max(1, int(np.ceil(after[0][2] * after[0][4] / 600)))
    assert all(x[4] < 0.9 * 600 for x in ins)
    assert all(b[0] - a[0] >= 300 for a, b in zip(ins, ins[1:]))
    # draining loses no request
    st = res.requests["status"].astype(str)
    assert set(st.unique()) <= {"ok", "in_flight"}
    fleet = np.array(raw.logs[0].fleet)
    assert fleet[:, 1].max() == outs[0][3] and fleet[-1, 1] == 1


def test_cooldowns_min_and_max(tmp_path):
    pol = TargetTracking(target=100, lo=2, hi=6, scale_out_cooldown=300, scale_in_cooldown=300)
    out = [pol.evaluate(60.0 * k, 1000.0, 2) for k in range(1, 4)]
    assert out == [None, None, 6]          # clamped to max
    assert pol.evaluate(240.0, 1000.0, 2, 6) is None   # nothing more than max
    pol2 = TargetTracking(target=100, lo=2, hi=20)
    for k in range(1, 3):
        assert pol2.evaluate(60.0 * k, 150.0, 2) is None
    assert pol2.evaluate(180.0, 150.0, 2) == 3
    # within the scale-out cooldown only a larger scale-out passes
    assert pol2.evaluate(240.0, 150.0, 2, 3) is None
    assert pol2.evaluate(300.0, 400.0, 2, 3) == 8
    # scale-in: 15 datapoints below 90 and outside both cooldowns
    pol3 = TargetTracking(target=100, lo=1, hi=20)
    res = [pol3.evaluate(60.0 * k, 50.0, 8) for k in range(1, 16)]
    assert res[:14] == [None] * 14 and res[14] == 4
    assert pol3.evaluate(960.0, 50.0, 4) is None       # scale-in cooldown
    assert pol3.evaluate(60.0 * 21, 10.0, 4) == 1      # never below min
    # a datapoint at 90-100% of the target resets the scale-in count
    pol4 = TargetTracking(target=100, lo=1, hi=20)
    seq = [50.0] * 14 + [95.0] + [50.0] * 14
    assert all(pol4.evaluate(60.0 * k, v, 8) is None for k, v in enumerate(seq, 1))


def test_step_and_scheduled_scaling():
    pol = StepScaling([Step(3, above=500), Step(1, above=200), Step(-1, below=50)], lo=1, hi=10, cooldown=120)
    assert pol.evaluate(60, 600, 2) == 5
    assert pol.evaluate(120, 600, 5) is None        # cooldown
    assert pol.evaluate(180, 300, 5) == 6
    assert pol.evaluate(300, 10, 6) == 5
    acts = [ScheduledAction(8 * 3600, min=4, max=10), ScheduledAction(20 * 3600, min=1, max=3)]
    assert scheduled_bounds(acts, 9 * 3600, 1, 10) == (4, 10)
    assert scheduled_bounds(acts, 86400 + 3 * 3600, 1, 10) == (1, 3)


def test_cost_accrues_from_request_to_release(tmp_path):
    d = scaled(tmp_path, [(600, 9.0), (2400, 40.0), (6000, 2.0)], 6000)
    res = run_dict(d)
    from sim.simulate import simulate
    from sim.scenario import parse_scenario

    raw = simulate(parse_scenario(d))
    fleet = raw.logs[0].fleet
    t = np.array([f[0] for f in fleet] + [6000.0])
    billed = np.array([f[2] for f in fleet])
    expect = float(np.sum(np.diff(t) * billed)) * 1.408 / 3600
    assert res.summary["overall"]["cost_usd"] == pytest.approx(expect)
    # instances billed while they start: billed exceeds in service during provisioning
    assert any(f[2] > f[1] for f in fleet)


def test_a_scheduled_action_keeps_min_at_most_max():
    """A scheduled action sets min, max or both and must leave min <= max, the bound it does not set
    taken from the endpoint's (or the component's) own: refused with the action's key path otherwise."""
    from sim.scenario import ScenarioError, parse_scenario

    def endpoint(schedule):
        d = sme(rate=5, duration=600)
        d["endpoints"][0].update(instances={"min": 1, "max": 3}, autoscaling={
            "metric": "invocations_per_instance", "target": 5000, "schedule": schedule})
        return d

    for schedule, key, words in (([{"at": "01:00", "min": 10}], "schedule[0].min",
                                  "min 10 is above the instances' max 3"),
                                 ([{"at": "01:00", "min": 4, "max": 2}], "schedule[0].min", "min 4 is above its max 2"),
                                 ([{"at": "01:00", "min": 2}, {"at": "02:00", "max": 0}], "schedule[1].max",
                                  "max 0 is below the instances' min 1"),
                                 ([{"at": "01:00"}], "schedule[0]", "sets min, max or both")):
        with pytest.raises(ScenarioError) as e:
            parse_scenario(endpoint(schedule), source="s.yaml")
        assert f"endpoints[0].autoscaling.{key}" in str(e.value) and words in str(e.value), str(e.value)
    sc = parse_scenario(endpoint([{"at": "01:00", "min": 5, "max": 6}, {"at": "02:00", "max": 2}]), source="s.yaml")
    assert len(sc.endpoints[0].spec.autoscaling.schedule) == 2
