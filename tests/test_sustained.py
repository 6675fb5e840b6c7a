"""A service whose speed changes under sustained load: exact event logs in every mode, and its fit."""
from __future__ import annotations

import math

import numpy as np
import pytest

from calibration.fit import fit_sustained, fit_warmth, warmth
from conftest import run_dict, sme
from sim.scenario import ScenarioError, parse_scenario
from test_core import trace_scenario
from test_ic import T8, Run, scenario, trace
from test_mme import mme

SUSTAINED = {"factor": 0.5, "time_constant": "200ms"}
ARRIVALS = [0.0, 0.0, 0.0, 0.0, 10.0, 10.05]   # a backlog of four, then a busy period of two


def fifo(arrivals, service, factor, tau, start_at=None, rest=0.0):
    """One FIFO server, by hand: (start, end) per request, the service of each scaled by
    factor + (1 - factor) * w, where w is 1 at rest, decays as exp(-t / tau) while serving and,
    over a rest of g, comes back to 1 - (1 - w) * exp(-g / rest) (to 1 when rest is 0)."""
    out, free, w = [], -math.inf, 1.0
    for k, a in enumerate(arrivals):
        begin = max(a if start_at is None else max(a, start_at[k]), free)
        if begin > free:
            w = 1.0 - (1.0 - w) * math.exp(-(begin - free) / rest) if rest else 1.0
        end = begin + service * (factor + (1 - factor) * w)
        w *= math.exp(-(end - begin) / tau)
        out.append((begin, end))
        free = end
    return out


def check(r, expected):
    assert r["start_s"].tolist() == pytest.approx([s for s, _ in expected])
    assert r["end_s"].tolist() == pytest.approx([e for _, e in expected])
    assert r["service_ms"].tolist() == pytest.approx([1e3 * (e - s) for s, e in expected])


def test_sme_service_speeds_up_along_a_busy_period_and_resets_when_idle(tmp_path):
    d = trace_scenario(tmp_path, ARRIVALS, mean=0.1, duration=60)
    d["models"][0]["service"]["sustained"] = SUSTAINED
    r = run_dict(d).requests
    check(r, fifo(ARRIVALS, 0.1, 0.5, 0.2))
    assert r["service_ms"].iloc[4] == pytest.approx(100.0)   # the first after a pause: at rest again


def test_a_short_rest_keeps_part_of_the_speed_up(tmp_path):
    # rest_time_constant 100 ms: after the backlog of four (0.1 s each, sped up), a rest of 50 ms
    # gives back 1 - exp(-0.5) of the speed-up; ten seconds give it all back.
    arrivals = [0.0, 0.0, 0.0, 0.0]
    backlog = fifo(arrivals, 0.1, 0.5, 0.2)
    arrivals += [backlog[-1][1] + 0.05, 30.0]
    d = trace_scenario(tmp_path, arrivals, mean=0.1, duration=60)
    d["models"][0]["service"]["sustained"] = SUSTAINED | {"rest_time_constant": "100ms"}
    r = run_dict(d).requests.sort_values("arrival_s", kind="stable")
    expected = fifo(arrivals, 0.1, 0.5, 0.2, rest=0.1)
    check(r, expected)
    w_end = math.exp(-sum(e - s for s, e in backlog) / 0.2)
    assert r["service_ms"].iloc[4] == pytest.approx(100 * (0.5 + 0.5 * (1 - (1 - w_end) * math.exp(-0.5))))
    assert 100 * (0.5 + 0.5 * w_end) < r["service_ms"].iloc[4] < 100.0
    assert r["service_ms"].iloc[5] == pytest.approx(100.0, rel=1e-6)


def test_without_sustained_the_times_are_the_draws(tmp_path):
    r = run_dict(trace_scenario(tmp_path, ARRIVALS, mean=0.1, duration=60)).requests
    assert r["service_ms"].tolist() == pytest.approx([100.0] * len(ARRIVALS))


def test_mme_busy_period_is_the_instances_across_models_and_broken_by_loads(tmp_path):
    # Two models on one instance with one worker (instance_concurrency): requests and loads take
    # turns, and a busy period is a run of requests (of either model) with no load or idle time
    # between; the testbed's requests right after a load run as slow as after a rest. Here: m-000's
    # load, its two requests back to back; m-001 is asked for meanwhile, so its load runs next, and
    # its two requests begin a new busy period; then a pause, and m-000 again.
    times = [(0.0, "m-000"), (0.0, "m-000"), (0.16, "m-001"), (0.16, "m-001"), (10.0, "m-000"), (10.05, "m-000")]
    d = mme(2, mean=0.1, init=0.05, size=0.001, duration=60, warmup=0, instance_concurrency=1,
            traffic={"process": "trace", "path": _csv(tmp_path, times), "format": "csv"})
    d["models"][0]["service"]["sustained"] = SUSTAINED   # both models (one entry, count 2)
    run = Run(d)
    r = run.requests.sort_values("arrival_s", kind="stable")
    second = 100 * (0.5 + 0.5 * math.exp(-0.1 / 0.2))
    assert [x.model for x in run.log.loads] == [0, 1]
    assert [v for x in run.log.loads for v in (x.start, x.end)] == pytest.approx(
        [0.0, 0.05, 0.15 + second / 1e3, 0.2 + second / 1e3], abs=1e-3)   # and a 1 MB read
    assert r["service_ms"].tolist() == pytest.approx([100.0, second, 100.0, second, 100.0, second])


def test_ic_busy_period_is_the_copys(tmp_path):
    model = {"name": "m", "size_gb": 1, "service": {"dist": "deterministic", "mean": 0.1, "sustained": SUSTAINED},
             "traffic": trace(tmp_path, "m", ARRIVALS)}
    run = Run(scenario([model], [{"model": "m"}], itype=T8, duration=60.0, max_concurrency=1))
    r = run.requests.sort_values("arrival_s", kind="stable")
    ready = min(r["start_s"])
    check(r, fifo(ARRIVALS, 0.1, 0.5, 0.2, [ready] * len(ARRIVALS)))


def test_a_retried_request_is_scaled_from_its_draw(tmp_path):
    # Two instances; instance 0 fails at 0.3 s while serving its second request (started 0.2 s into
    # its busy period, scaled to 137 ms); retried on instance 1, idle by then, it takes its whole draw.
    d = trace_scenario(tmp_path, [0.0, 0.0, 0.0], mean=0.2, duration=60, instances=2,
                       routing="round_robin")
    d["models"][0]["service"]["sustained"] = SUSTAINED
    d["endpoints"][0]["failures"] = {"in_flight": "retry", "replace": False, "events": [{"at": 0.3, "instance": 0}]}
    r = run_dict(d).requests.sort_values("arrival_s", kind="stable")
    assert (r["status"] == "ok").all()
    retried = r[r["start_s"] >= 0.3]
    assert len(retried) == 1 and retried["instance"].iloc[0] == 1
    assert retried["service_ms"].iloc[0] == pytest.approx(200.0)


def test_sustained_errors_name_the_key(tmp_path):
    for bad, word in (({"factor": 0, "time_constant": "1s"}, "factor"), ({"factor": 0.8, "time_constant": 0}, "time_constant"),
                      ({"factor": 0.8}, "time_constant"),
                      ({"factor": 0.8, "time_constant": "1s", "rest_time_constant": -1}, "rest_time_constant")):
        d = sme(dist="deterministic", mean=0.1)
        d["models"][0]["service"]["sustained"] = bad
        with pytest.raises(ScenarioError) as e:
            parse_scenario(d, source="t.yaml")
        assert "sustained" in str(e.value) and word in str(e.value)


@pytest.mark.parametrize("factor,tau", [(0.8, 0.5), (1.25, 1.0), (0.9, 0.002)])
def test_fit_recovers_the_factor_and_time_constant(factor, tau):
    rng = np.random.default_rng(7)
    b = np.concatenate([np.zeros(150), rng.uniform(0, 0.05, 100), rng.uniform(0, 4.0, 400)])
    y = 0.014 * (factor + (1 - factor) * np.exp(-b / tau)) * rng.lognormal(-0.005, 0.1, b.size)
    f = fit_sustained(b, y)
    assert f is not None
    assert f["factor"] == pytest.approx(factor, rel=0.03)
    assert f["base_s"] == pytest.approx(0.014, rel=0.03)
    if tau > 0.01:
        assert f["time_constant_s"] == pytest.approx(tau, rel=0.35)
    else:
        assert f["time_constant_s"] < 0.01


def test_fit_finds_nothing_where_there_is_nothing():
    rng = np.random.default_rng(8)
    b = np.concatenate([np.zeros(150), rng.uniform(0, 4.0, 400)])
    assert fit_sustained(b, 0.014 * rng.lognormal(0, 0.1, b.size)) is None
    assert fit_sustained(np.zeros(200), 0.014 * rng.lognormal(0, 0.1, 200)) is None   # no long busy period


def _served(factor, tau, rest, rng, base=0.008):
    """One server's requests by the warmth recursion (fifo's), as the testbed's calibration sends
    them: Poisson at ~half load, 30 requests after rests of 5 ms to 1 s, then a burst above
    capacity; (begin, end) per request."""
    sends = np.cumsum(rng.exponential(0.016, 600))
    sends = np.r_[sends, sends[-1] + np.cumsum(base + np.exp(rng.uniform(np.log(0.005), 0.0, 30)))]
    sends = np.r_[sends, sends[-1] + 1.0 + np.cumsum(rng.exponential(0.006, 400))]
    begin, end, free, w = [], [], 0.0, 1.0
    for t in sends:
        b = max(t, free)
        if b > free:
            w = 1.0 - (1.0 - w) * np.exp(-(b - free) / rest)
        y = base * (factor + (1 - factor) * w) * rng.lognormal(0, 0.05)
        begin.append(b)
        end.append(b + y)
        w *= np.exp(-y / tau)
        free = b + y
    return np.array(begin), np.array(end)


@pytest.mark.parametrize("factor,tau,rest", [(0.8, 0.5, 0.02), (0.85, 1.0, 0.05), (1.2, 0.5, 0.1)])
def test_warmth_fit_recovers_the_busy_and_rest_time_constants(factor, tau, rest):
    b, e = _served(factor, tau, rest, np.random.default_rng(3))
    f = fit_warmth(b, e, np.zeros(b.size), e - b)
    assert f["factor"] == pytest.approx(factor, rel=0.02)
    assert f["base_s"] == pytest.approx(0.008, rel=0.02)
    # The time constants trade off a little against each other in samples this noisy (5%); the
    # times they predict are what count: along a busy period begun at rest, and after a rest
    # that follows a long one.
    def speed(fit_or_true, busy=None, rested=None):
        fac, t, r = fit_or_true
        w = np.exp(-busy / t) if busy is not None else 1.0 - np.exp(-rested / r)
        return fac + (1 - fac) * w

    fitted = (f["factor"], f["time_constant_s"], f["rest_time_constant_s"])
    for b_s in (0.1, 0.5, 1.0, 2.0):
        assert speed(fitted, busy=b_s) == pytest.approx(speed((factor, tau, rest), busy=b_s), rel=0.02)
    for g in (0.005, 0.02, 0.1, 0.5):
        assert speed(fitted, rested=g) == pytest.approx(speed((factor, tau, rest), rested=g), rel=0.03)
    # the recursion itself: 1 at rest, and within (0, 1]
    w = warmth(b, e, np.zeros(b.size), tau, rest)
    assert w[0] == 1.0 and np.all((w > 0) & (w <= 1))
    flat = fit_warmth(b, b + 0.008 * np.random.default_rng(4).lognormal(0, 0.05, b.size), np.zeros(b.size),
                      np.full(b.size, 0.008))
    assert flat is None


def test_warmth_fit_keeps_servers_apart_and_fits_the_masked_requests():
    rng = np.random.default_rng(5)
    b0, e0 = _served(0.8, 0.5, 0.02, rng)
    b1, e1 = _served(0.8, 0.5, 0.02, rng)          # a second server, over the same time
    b, e = np.r_[b0, b1], np.r_[e0, e1]
    server = np.r_[np.zeros(b0.size), np.ones(b1.size)]
    f = fit_warmth(b, e, server, e - b, fitted=server == 1)
    alone = fit_warmth(b1, e1, np.zeros(b1.size), e1 - b1)
    assert f["n"] == b1.size and f == pytest.approx(alone, rel=1e-4)
    assert f["factor"] == pytest.approx(0.8, rel=0.02)


def _runs(factor, tau, rng, contended=None):
    runs = []
    for _ in range(2):
        b = np.cumsum(np.full(200, 0.012))
        y = 0.014 * (factor + (1 - factor) * np.exp(-b / tau)) * rng.lognormal(0, 0.05, b.size)
        runs.append({"n": b.size, "span_s": float(b[-1]), "contended": False, "busy_s": list(b), "time_s": list(y)})
    if contended is not None:   # a run with a neighbour's burst: left out when clean ones exist
        runs.append({"n": 200, "span_s": 2.4, "contended": True, "busy_s": list(np.cumsum(np.full(200, 0.012))),
                     "time_s": list(np.full(200, contended))})
    return runs


def test_harness_fit_gives_the_profile_its_sustained_speed_and_rest_ratio():
    from calibration import inference

    rng = np.random.default_rng(9)
    # the repeated requests ran back to back too: their median is part-way to the sustained speed
    s = {"sustained": {"rest_s": 0.5, "runs": _runs(0.8, 0.3, rng, contended=0.05)},
         "repeat": {"median": 0.014 * 0.85}}
    f = inference._fit_sustained(s)
    assert f["factor"] == pytest.approx(0.8, rel=0.03)
    assert f["time_constant_s"] == pytest.approx(0.3, rel=0.35)
    assert f["rest_ratio"] == pytest.approx(1 / 0.85, rel=0.03)
    flat = {"sustained": {"rest_s": 0.5, "runs": _runs(1.0, 0.3, rng)}, "repeat": {"median": 0.014}}
    assert inference._fit_sustained(flat) is None
    assert inference._fit_sustained({"repeat": {"median": 0.014}}) is None   # an older profile's samples


def _harness_runs(factor, tau, rest, rng, base=0.004, thin=3):
    """Two sustained-load runs as calibration.inference.sustained records them (back to back for
    2 s, the samples kept every ``thin``-th, then 12 requests after rests of 5 ms to 0.5 s), timed
    by the warmth recursion."""
    runs = []
    for _ in range(2):
        busy, times, now, w = [], [], 0.0, 1.0
        while now < 2.0:
            y = base * (factor + (1 - factor) * w) * rng.lognormal(0, 0.03)
            busy.append(now)
            times.append(y)
            w *= math.exp(-y / tau)
            now += y
        after, after_times = [], []
        for g in np.exp(rng.uniform(np.log(0.005), np.log(0.5), 12)):
            w = 1.0 - (1.0 - w) * math.exp(-g / rest)
            y = base * (factor + (1 - factor) * w) * rng.lognormal(0, 0.03)
            after.append(float(g))
            after_times.append(y)
            w *= math.exp(-y / tau)
        runs.append({"n": len(times), "span_s": now, "contended": False, "busy_s": busy[::thin],
                     "time_s": times[::thin], "after_s": after, "after_time_s": after_times})
    return runs


def test_harness_fit_with_rests_gives_the_profile_its_rest_time_constant():
    from calibration import inference

    factor, tau, rest = 0.75, 0.2, 0.05
    s = {"sustained": {"rest_s": 0.5, "runs": _harness_runs(factor, tau, rest, np.random.default_rng(11))},
         "repeat": {"median": 0.004 * 0.8}}
    f = inference._fit_sustained(s)
    assert f["factor"] == pytest.approx(factor, rel=0.03)
    assert f["rest_ratio"] == pytest.approx(1 / 0.8, rel=0.03)
    # the speed it predicts along a busy period begun at rest, and after a rest that ends one
    for b_s in (0.05, 0.2, 0.5, 1.0):
        assert (f["factor"] + (1 - f["factor"]) * math.exp(-b_s / f["time_constant_s"])
                == pytest.approx(factor + (1 - factor) * math.exp(-b_s / tau), rel=0.03))
    for g in (0.01, 0.05, 0.2):
        assert (f["factor"] + (1 - f["factor"]) * (1 - math.exp(-g / f["rest_time_constant_s"]))
                == pytest.approx(factor + (1 - factor) * (1 - math.exp(-g / rest)), rel=0.05))
    # a profile's runs from before the rest samples: the busy-time fit, without a rest constant
    old = [{k: v for k, v in r.items() if not k.startswith("after")} for r in s["sustained"]["runs"]]
    f_old = inference._fit_sustained({"sustained": {"runs": old}, "repeat": s["repeat"]})
    assert "rest_time_constant_s" not in f_old and f_old["factor"] == pytest.approx(factor, rel=0.05)


def test_harness_times_requests_back_to_back_after_a_rest():
    torch = pytest.importorskip("torch")
    from calibration import inference, models

    shape = models.shape_for("encoder", models.parse_size("0.3M"))
    model = models.build(shape, device="cpu", dtype=torch.float32)
    r = inference.sustained(model, "encoder", "cpu", 16, 0, runs=2, rest_s=0.05, span_s=0.2, rests=4,
                            rests_s=(0.005, 0.02))
    assert r["rest_s"] == 0.05 and len(r["runs"]) == 2
    for run in r["runs"]:
        b, t = np.array(run["busy_s"]), np.array(run["time_s"])
        assert b[0] == 0 and run["n"] == b.size == t.size and run["span_s"] >= 0.2
        # back to back: each request begins where the one before ended
        assert np.allclose(b[1:], b[:-1] + t[:-1], atol=1e-4)
        # then one at a time after rests of at least the drawn 5-20 ms
        assert len(run["after_s"]) == len(run["after_time_s"]) == 4
        assert min(run["after_s"]) >= 0.005 and max(run["after_s"]) < 0.1 and min(run["after_time_s"]) > 0
    begin, end, server, times = inference.sequences(r["runs"])
    assert begin.size == end.size == server.size == times.size == sum(x["n"] + 4 for x in r["runs"])
    assert np.all(end > begin) and np.all(np.diff(begin[server == 0]) > 0)


def _csv(tmp_path, times) -> str:
    import pandas as pd

    p = tmp_path / "arrivals.csv"
    pd.DataFrame({"arrival_s": [t for t, _ in times], "model": [m for _, m in times]}).to_csv(p, index=False)
    return str(p)
