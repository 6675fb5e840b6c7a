"""Sim-to-real fidelity: the testbed's plan and arrivals, the simulator's side of
a testbed run, and the quick suite on this machine against its tolerances."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sim import fidelity as fid

ROOT = Path(__file__).resolve().parents[1]
# The quick suite takes about 7 minutes on a quiet 2-core machine; a case outside its tolerance is
# run up to 3 times.
FIDELITY_TIMEOUT_S = 2400


def test_plans_are_valid_testbed_plans():
    pytest.importorskip("torch")
    from calibration.testbed import plan

    for case in fid.CASES.values():
        p = plan.validate(fid.plan_of(case))
        assert p["instances"] >= 1 and len(p["models"]) == len(case.models)
    bad = fid.plan_of(fid.CASES["mme_thrash"]) | {"routing": "fastest"}
    with pytest.raises(ValueError, match="routing: expected one of"):
        plan.validate(bad)
    bad = fid.plan_of(fid.CASES["mme_thrash"]) | {"memory_budget_gb": 0.05}
    with pytest.raises(ValueError, match=r"models\[0\].memory_gb"):
        plan.validate(bad)
    for ref in (0, -1.0, "12ms", True):
        with pytest.raises(ValueError, match="reference_request_s: expected a number of seconds > 0 or null"):
            plan.validate(fid.plan_of(fid.CASES["sme_warm"]) | {"reference_request_s": ref})
    assert plan.validate(fid.plan_of(fid.CASES["sme_warm"]) | {"reference_request_s": None,
                                                              "reference_load_s": None})["reference_request_s"] is None
    with pytest.raises(ValueError, match="reference_load_s: needs reference_request_s"):
        plan.validate(fid.plan_of(fid.CASES["sme_warm"]) | {"reference_request_s": None})
    with pytest.raises(ValueError, match="reference_load_s: expected a number of seconds > 0 or null"):
        plan.validate(fid.plan_of(fid.CASES["sme_warm"]) | {"reference_load_s": "60ms"})


def test_arrivals_stretch_by_this_machines_request_time_over_the_plans_reference():
    """A case keeps its load on a slower or faster machine: the arrivals' times are multiplied by
    the request time there (each model's probed median, weighted by its arrivals) over the plan's
    reference; without a reference they are replayed as written."""
    pytest.importorskip("torch")
    from calibration.testbed import replay

    p = {"reference_request_s": 0.010, "models": [{"name": "a"}, {"name": "b"}]}
    probed = {"a": {"service": {"median": 0.020}}, "b": {"service": {"median": 0.005}}}
    arrivals = [(0.1, 0), (0.2, 0), (0.3, 0), (0.4, 1)]          # 3 of a, 1 of b
    assert replay.time_scale(p, probed, arrivals) == pytest.approx((3 * 0.020 + 0.005) / 4 / 0.010)
    assert replay.time_scale(p | {"reference_request_s": None}, probed, arrivals) == 1.0
    assert replay.time_scale(p, probed, []) == 1.0
    # an mme plan with a reference cold start: the expected misses' loads count beside the requests
    mme = p | {"mode": "mme", "memory_budget_gb": 1.0, "reference_load_s": 0.050,
               "models": [{"name": n, "memory_gb": 0.6} for n in "ab"]}             # one fits: half miss
    probed = {k: v | {"load": {"median": 0.2}} for k, v in probed.items()}
    assert replay.miss_share(mme) == 0.5 and replay.miss_share(mme | {"mode": "sme"}) == 0.0
    assert replay.time_scale(mme, probed, arrivals) == pytest.approx(
        ((3 * 0.020 + 0.005) / 4 + 0.5 * 0.2) / (0.010 + 0.5 * 0.050))
    assert replay.time_scale(mme | {"reference_load_s": None}, probed, arrivals) == pytest.approx(
        (3 * 0.020 + 0.005) / 4 / 0.010)


def test_arrivals_are_the_cases_trace_and_reach_the_simulator_unchanged():
    case = fid.CASES["mme_thrash"]
    a = fid.arrivals_of(case, quick=True)
    b = fid.arrivals_of(case, quick=True)
    assert a.equals(b) and len(a) > 300                      # deterministic
    assert a["model"].nunique() == len(case.models)
    counts = a["model"].value_counts()
    assert counts["m-00"] > 2 * counts["m-07"]               # Zipf-skewed
    names = [m["name"] for m in case.models]
    probe = {n: {"service_s": [0.010, 0.012], "load_s": [0.05, 0.06, 0.07]} for n in names}
    measured = {"plan": fid.plan_of(case) | {"max_concurrency": 1, "instance_concurrency": 1,
                                             "max_concurrent_loads": 1, "replicate_above": 8, "timeout_s": 60.0},
                "probe": {"models": probe},
                "requests": {"arrival_s": a["arrival_s"].tolist(), "model": [names.index(m) for m in a["model"]]}}
    res = fid.simulate_measured(measured)
    req = res.requests.sort_values("arrival_s")
    assert np.array_equal(req["arrival_s"].to_numpy(), a["arrival_s"].to_numpy())
    assert req["model"].tolist() == a["model"].tolist()
    sc = fid.scenario_of(measured, Path("a.csv"))
    assert sc["models"][0]["init_time"] == pytest.approx(0.06)       # the probe's median cold start
    assert sc["models"][0]["service"]["samples"] == pytest.approx([0.010, 0.012])   # the times themselves
    assert sc["endpoints"][0]["instance_concurrency"] == 1
    assert "sustained" not in sc["models"][0]["service"]


def test_a_sustained_load_fit_reaches_the_simulator_with_the_draws_at_rest():
    case = fid.CASES["sme_warm"]
    name = case.models[0]["name"]
    probe = {"service_s": [0.010, 0.008, 0.012], "service_busy_s": [0.0, 1.0, 0.0], "load_s": [0.05],
             "sustained": {"factor": 0.8, "time_constant_s": 0.5}}
    measured = {"plan": fid.plan_of(case) | {"max_concurrency": 1, "instance_concurrency": 1, "timeout_s": 60.0},
                "probe": {"models": {name: probe}}, "requests": {"arrival_s": [0.0]}}
    svc = fid.scenario_of(measured, Path("a.csv"))["models"][0]["service"]
    assert svc["sustained"] == {"factor": 0.8, "time_constant": 0.5, "rest_time_constant": None}
    assert svc["samples"] == pytest.approx([0.010, 0.008 / (0.8 + 0.2 * np.exp(-2.0)), 0.012])
    # With a rest time constant, each sample's state under the fit (its warmth) divides it.
    probe["sustained"]["rest_time_constant_s"] = 0.02
    probe["service_warmth"] = [1.0, 0.5, 0.25]
    svc = fid.scenario_of(measured, Path("a.csv"))["models"][0]["service"]
    assert svc["sustained"] == {"factor": 0.8, "time_constant": 0.5, "rest_time_constant": 0.02}
    assert svc["samples"] == pytest.approx([0.010, 0.008 / 0.9, 0.012 / 0.85])


def test_each_calibration_replays_level_counts_alike():
    """One replay before the measured one, one after: the draws keep each replay's times about its
    median, at the mean of the two medians, whatever the replays' sizes (the drift cancels)."""
    case = fid.CASES["sme_warm"]
    name = case.models[0]["name"]
    before, after = [0.010, 0.011, 0.012], [0.013, 0.0143, 0.0156] * 3     # the machine 30% slower after
    probe = {"service_s": before + after, "service_replay": [0] * 3 + [1] * 9, "load_s": [0.05]}
    measured = {"plan": fid.plan_of(case) | {"max_concurrency": 1, "instance_concurrency": 1, "timeout_s": 60.0},
                "probe": {"models": {name: probe}}, "requests": {"arrival_s": [0.0]}}
    samples = np.array(fid.scenario_of(measured, Path("a.csv"))["models"][0]["service"]["samples"])
    level = (0.011 + 0.0143) / 2
    assert np.median(samples) == pytest.approx(level)
    assert samples[:3] == pytest.approx(np.array(before) / 0.011 * level)
    assert samples[3:] == pytest.approx(np.array(after) / 0.0143 * level)


def test_errors_are_relative_and_the_hit_rate_in_points():
    real = {"p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 40.0, "mean_ms": 12.0, "throughput_per_s": 5.0,
            "cold_starts": 100, "hit_rate": 0.5}
    sim = real | {"p50_ms": 11.0, "cold_starts": 90, "hit_rate": 0.52}
    e = fid.errors(sim, real)
    assert e["p50_err"] == pytest.approx(0.1) and e["cold_starts_err"] == pytest.approx(-0.1)
    assert e["hit_rate_err_pp"] == pytest.approx(2.0) and e["p99_err"] == 0.0
    assert fid.within(e, fid.QUICK_TOLERANCE) == {"p50": True, "p99": True, "cold_starts": True, "hit_rate": True}
    assert not fid.within(e, fid.FULL_TOLERANCE)["p50"]


def test_runs_of_a_case_pool_into_the_errors_of_their_means():
    def run(real, sim):
        return {**fid.errors(sim, real), "measured": real, "simulated": sim, "unfinished": 0}

    base = {"requests": 100, "completed": 100, "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 40.0, "mean_ms": 12.0,
            "throughput_per_s": 5.0, "cold_starts": 10, "hit_rate": 0.9}
    a = run(base | {"p99_ms": 30.0}, base | {"p99_ms": 45.0, "hit_rate": 0.92})
    b = run(base | {"p99_ms": 50.0}, base | {"p99_ms": 35.0, "hit_rate": 0.88})
    one = fid.pooled([a])
    assert one["p99_err"] == pytest.approx(0.5) and one["measured_spread"] is None
    both = fid.pooled([a, b])
    assert both["p99_err"] == pytest.approx(0.0) and both["hit_rate_err_pp"] == pytest.approx(0.0)
    assert both["measured"]["p99_ms"] == 40.0 and both["runs"] == [a, b]
    assert both["measured_spread"]["p99_ms"] == pytest.approx(0.5) and both["measured_spread"]["p50_ms"] == 0.0


@pytest.mark.fidelity
def test_quick_suite_is_within_its_tolerances(tmp_path):
    """`capsim fidelity --quick` on this machine (make fidelity-quick, not make test): every case's
    P50, P99 and cold starts within 15%, the hit rate within 3 points. Latency percentiles over a
    minute of this shared 2-core machine move by 10-20% with its speed, so a case that misses is
    measured again, three attempts at most (run_suite), and the errors are those of the mean over
    its runs; every run's counts must hold, and every run is printed. Each testbed run measures its
    machine's noise (the cores other processes took, the drift between its calibrations): a case
    that misses on runs too noisy to measure, or a suite that overruns on a busy machine, is an
    xfail with the noise in its message, not a failure; so is a case that misses only on its known
    gaps (fid.KNOWN_GAPS: limits the README states), each within its bound."""
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    from calibration.harness import Neighbours

    out = tmp_path / "fid"
    neighbours = Neighbours()
    try:
        r = subprocess.run([sys.executable, "-m", "sim.cli", "fidelity", "--quick", "--json", "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=FIDELITY_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        cores, cpus = neighbours.cores(), __import__("os").cpu_count() or 1
        if cores is not None and cores > fid.NOISY_NEIGHBOUR_SHARE * cpus:
            pytest.xfail(f"too noisy to measure: the quick suite overran {FIDELITY_TIMEOUT_S} s while other "
                         f"processes used {cores:.2f} of {cpus} cores")
        raise
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert json.loads((out / "fidelity.json").read_text()) == res
    assert set(res["cases"]) == set(fid.CASES)
    print(f"\n{'case':<18}{'P50':>8}{'P99':>8}{'cold':>8}{'hit pp':>8}  attempts  verdict")
    for name, row in res["cases"].items():
        tokens = "".join(f"  {k} {row[k]:+.1%}" for k in ("ttft_p50_err", "ttft_p99_err", "tpot_p50_err",
                                                         "tpot_p99_err") if k in row)
        print(f"{name:<18}{row['p50_err']:>+8.1%}{row['p99_err']:>+8.1%}{row['cold_starts_err']:>+8.1%}"
              f"{row['hit_rate_err_pp']:>+8.1f}  {row['attempts']}  {row['verdict']}{tokens}")
    noisy, gaps = {}, {}
    for name, row in res["cases"].items():
        assert len(row["runs"]) == row["attempts"]
        for e in row["runs"]:
            n = e["noise"]
            print(f"{name:<18}{e['p50_err']:>+8.1%}{e['p99_err']:>+8.1%}{e['cold_starts_err']:>+8.1%}"
                  f"{e['hit_rate_err_pp']:>+8.1f}  (one run; neighbours {n['neighbour_cores'] or 0:.2f} cores, "
                  f"drift {n['level_drift'] or 0:+.1%}, gap {n.get('level_gap') or 0:+.1%})")
            counts_hold = (abs(e["cold_starts_err"]) <= fid.QUICK_TOLERANCE["cold_starts"]
                           and abs(e["hit_rate_err_pp"]) <= fid.QUICK_TOLERANCE["hit_rate_pp"])
            if not counts_hold and n["noisy"]:
                noisy[name] = n["why"]
                continue
            assert counts_hold, (name, e["cold_starts_err"], e["hit_rate_err_pp"])
    for name, row in res["cases"].items():
        assert row["unfinished"] == 0
        assert row["measured"]["completed"] == row["simulated"]["completed"] == row["measured"]["requests"]
        if row["verdict"] == "too noisy":
            noisy[name] = "; ".join(e["noise"]["why"] for e in row["runs"] if e["noise"]["noisy"])
            continue
        if row["verdict"] == "known gap":
            assert row["known_gaps"] == fid.known_gaps(name, row)
            gaps[name] = ", ".join(f"{k} {row[k + '_err']:+.1%}" for k in row["known_gaps"])
            continue
        assert row["verdict"] == "within", (name, {k: v for k, v in row.items() if k.endswith(("err", "pp"))})
    thrash = res["cases"]["mme_thrash"]
    assert thrash["measured"]["cold_starts"] > 100 and thrash["measured"]["hit_rate"] < 0.8
    assert res["cases"]["sme_warm"]["measured"]["cold_starts"] == 0
    for name in ("sme_concurrent", "mme_shared"):     # the measured curve reached the simulator
        slow = {int(k): v for k, v in (res["cases"][name]["runs"][0]["slowdown"] or {}).items()}
        assert slow and slow[1] == 1.0 and max(slow) > 1 and slow[max(slow)] > 1.0
    for name in ("sme_warm", "mme_thrash", "azure_code_burst", "llm_conversation"):
        assert res["cases"][name]["runs"][0]["slowdown"] is None
    llm = res["cases"]["llm_conversation"]       # TTFT and TPOT compared, and within (or too noisy) above
    assert {"ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"} <= set(llm["within"])
    assert llm["measured"]["ttft_p50_ms"] > 0 and llm["measured"]["tpot_p50_ms"] > 0
    why = []
    if noisy:
        why.append("too noisy to measure: " + " | ".join(f"{k}: {v}" for k, v in noisy.items()))
    if gaps:
        why.append("known gaps (README, Limits that still hold), each within its bound: "
                   + " | ".join(f"{k}: {v}" for k, v in gaps.items()))
    if why:
        pytest.xfail("; ".join(why))


def test_occupancy_counts_the_worker_time_between_jobs():
    pytest.importorskip("torch")
    from calibration.testbed.replay import occupancy

    # one worker: request 0 sent at 0.0 starts 0.001, ends 0.011; request 1 was queued (sent 0.005)
    # and starts 0.0113 after the reply; a load runs 0.030-0.080; request 2 (sent 0.025) waits for it
    req = {"instance": [0, 0, 0, 1], "send_s": [0.0, 0.005, 0.025, 0.0],
           "start_s": [0.001, 0.0113, 0.0802, 0.0], "end_s": [0.011, 0.0213, 0.0902, None]}
    loads = [{"instance": 0, "start_s": 0.030, "end_s": 0.080}]
    busy = [None] * 4
    occ = occupancy(req, loads, 2, busy)
    assert occ[0] == pytest.approx(0.011)      # from its send: the idle worker's pick-up counts
    assert occ[1] == pytest.approx(0.0103)     # from the previous job's end: the reply counts
    assert occ[2] == pytest.approx(0.0102)     # from the load's end
    assert occ[3] is None                      # unfinished
    # How long the worker had been serving requests: 0 for one that found it idle or followed a load.
    assert busy[0] == 0.0 and busy[1] == pytest.approx(0.011) and busy[2] == 0.0
    assert busy[3] is None


def _replay_rec(times_s, gaps_s):
    """A calibration replay's records, one instance, one worker, one model: each request sent
    ``gap`` after the previous one ended (0: queued behind it) and served in its time."""
    req = {k: [] for k in ("model", "instance", "send_s", "start_s", "end_s")}
    t = 0.0
    for y, gap in zip(times_s, gaps_s):
        t += gap
        for k, v in (("model", 0), ("instance", 0), ("send_s", t), ("start_s", t), ("end_s", t + y)):
            req[k].append(v)
        t += y
    return {"requests": req, "loads": []}


def test_the_sustained_fit_gives_each_replay_its_own_level():
    pytest.importorskip("torch")
    from calibration.testbed.replay import _calibrated

    plan = {"mode": "sme", "instances": 1, "instance_concurrency": 1, "models": [{"name": "m", "memory_gb": 0.1}]}
    probed = {"m": {"service_s": [0.02] * 5, "load_s": [0.1] * 5}}
    rng = np.random.default_rng(0)

    def times(n, ms):
        return list(ms * 1e-3 * np.exp(rng.normal(0, 0.02, n)))

    # The machine ran 20% slower during the first replay; within each the speed does not change.
    first = _replay_rec(times(60, 24.0), [0.5] * 60)
    last = _replay_rec(times(30, 20.0) + times(100, 20.0), [0.5] * 31 + [0.0] * 99)
    p = _calibrated(plan, probed, [first, last])["m"]
    assert p["sustained"] is None and len(p["service_s"]) == 190 == len(p["service_busy_s"])
    assert max(p["service_busy_s"]) > 1.5 and p["service_replay"] == [0] * 60 + [1] * 130
    # Where the burst does speed up (20 -> 16 ms within about 0.2 s), the fit finds it.
    sped = [y * (0.8 + 0.2 * np.exp(-k * 0.02 / 0.2)) for k, y in enumerate(times(100, 20.0))]
    p = _calibrated(plan, probed, [first, _replay_rec(times(30, 20.0) + sped, [0.5] * 31 + [0.0] * 99)])["m"]
    assert p["sustained"]["factor"] == pytest.approx(0.8, abs=0.03)
    assert p["sustained"]["time_constant_s"] == pytest.approx(0.2, rel=0.4)


def test_the_testbed_refuses_a_device_it_cannot_use_and_an_instance_that_dies(tmp_path):
    pytest.importorskip("torch")
    import multiprocessing as mp
    import time

    from calibration.testbed import replay

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(fid.plan_of(fid.CASES["sme_warm"])))
    (tmp_path / "a.csv").write_text("arrival_s,model\n0.1,m-00\n")
    bad = "cuda:99" if __import__("torch").cuda.is_available() else "cuda"
    for device, word in ((bad, "cuda"), ("gpu", "expected cpu, cuda or cuda:N")):
        r = subprocess.run([sys.executable, "-m", "calibration", "testbed", str(tmp_path / "a.csv"), "--plan",
                            str(plan), "--device", device, "--out", str(tmp_path / "m.json")],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and word in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "m.json").exists()
    # an instance whose process dies before it is ready: an error at once, not a 600 s wait
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=sys.exit, args=(3,))
    p.start()
    t = time.monotonic()
    with pytest.raises(RuntimeError, match=r"instance 0's process exited \(code 3\)"):
        replay._ready(0, parent, p)
    assert time.monotonic() - t < 30


def test_a_calibration_profile_can_stand_in_for_the_testbeds_calibration(tmp_path):
    """--profile: the simulator's service is the profile's calibrated one at the request's tokens,
    and its cold start the profile's load paths as the testbed loads (module built from the mapped
    file, a warm-up request); a profile without one of those paths is refused by name."""
    shipped = ROOT / "scenarios" / "profiles" / "cpu-quick.json"
    prof = json.loads(shipped.read_text())
    case = fid.CASES["mme_thrash"]
    names = [m["name"] for m in case.models]
    probe = {n: {"service_s": [0.010], "load_s": [0.05], "file_gb": 0.032, "param_gb": 0.032} for n in names}
    measured = {"plan": fid.plan_of(case) | {"max_concurrency": 1, "instance_concurrency": 1,
                                             "max_concurrent_loads": 1, "replicate_above": 8, "timeout_s": 60.0},
                "metadata": {"device": "cpu"}, "probe": {"models": probe},
                "requests": {"arrival_s": [0.0, 0.5], "model": [0, 1]}}
    sc = fid.scenario_of(measured, Path("a.csv"), shipped)
    m = sc["models"][0]
    assert m["service"] == {"profile": str(shipped.resolve()), "family": "encoder", "params": "8M"}
    assert m["tokens"] == {"input": 64, "output": 0}
    fits = prof["fits"]
    enc = fits["inference"]["encoder"]["5M"]               # 8M is scaled from the nearest size measured
    ratio = 8e6 / enc["params"]
    warm_up = 1e-3 * ratio * (enc["base_ms"] + 64 * enc["per_token_ms"])
    load = fits["load"]["build_module"]["a_s"] + 0.032 / fits["load"]["build_module"]["bandwidth_gbs"]
    assert m["init_time"] == pytest.approx(load + warm_up)
    r = fid.simulate_measured(measured, profile=shipped).requests
    assert (r["status"] == "ok").all() and r["cold"].all() and len(r) == 2     # two models, both cold
    assert (r["latency_ms"] > 1e3 * m["init_time"]).all()
    del prof["fits"]["load"]["build_module"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(prof))
    with pytest.raises(fid.FidelityError, match="no fits.load.build_module"):
        fid.scenario_of(measured, Path("a.csv"), bad)
    with pytest.raises(fid.FidelityError, match="but the testbed ran on cuda"):
        fid.scenario_of(measured | {"metadata": {"device": "cuda"}}, Path("a.csv"), shipped)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(fid.FidelityError, match="cannot use it as a calibration profile"):
        fid.scenario_of(measured, Path("a.csv"), tmp_path / "x.json")


def test_prepare_writes_the_plans_and_arrivals_for_a_testbed_elsewhere(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run([sys.executable, "-m", "sim.cli", "fidelity", "--prepare", "--quick", "--device", "cuda",
                        "--cases", "sme_warm,mme_thrash", "--out", str(out), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res["cases"]) == {"sme_warm", "mme_thrash"}
    for name in res["cases"]:
        d = out / name
        assert json.loads((d / "plan.json").read_text()) == fid.plan_of(fid.CASES[name])
        assert (d / "arrivals.csv").read_text() == fid.arrivals_of(fid.CASES[name], quick=True).to_csv(index=False)
        assert not (d / "measured.json").exists()
        assert (f"python -m calibration testbed {d}/arrivals.csv --plan {d}/plan.json --device cuda "
                f"--out {d}/measured.json") in r.stderr
    assert not (out / "fidelity.json").exists()


# -- requests sharing a device: the slowdown with concurrency --------------------------------------------------------
def _ps_groups(curve, work_s, sizes, gap_s=0.05, models=None):
    """A calibration replay's records where groups of ``sizes[i]`` requests of ``work_s`` each are
    sent at once and share one instance as processor sharing with ``curve``: all of a group end
    together, after work * slowdown(k)."""
    from calibration.testbed.replay import slowdown_fn

    f = slowdown_fn(curve)
    req = {k: [] for k in ("model", "instance", "send_s", "start_s", "end_s")}
    t = 0.0
    for g, k in enumerate(sizes):
        span = float(work_s * f(k))
        for j in range(k):
            for c, v in (("model", 0 if models is None else models[(g + j) % len(models)]), ("instance", 0),
                         ("send_s", t), ("start_s", t), ("end_s", t + span)):
                req[c].append(v)
        t += span + gap_s
    return {"requests": req, "loads": []}


def test_the_slowdown_curve_is_the_median_time_with_k_in_service_over_the_time_alone():
    pytest.importorskip("torch")
    from calibration.testbed import replay

    plan = {"mode": "sme", "instances": 1, "instance_concurrency": 3, "max_concurrency": 3,
            "models": [{"name": "m", "memory_gb": 0.1}]}
    curve = {1: 1.0, 2: 1.4, 3: 2.1}
    sizes = [1, 2, 3] * 8
    # the machine 20% slower in the second replay: each replay is measured against its own time alone
    recs = [_ps_groups(curve, 0.010, sizes), _ps_groups(curve, 0.012, sizes)]
    c = replay.slowdown_curve(plan, recs)
    assert c["levels"] == 3 and c["slowdown"] == pytest.approx({"1": 1.0, "2": 1.4, "3": 2.1})
    assert c["n"] == {"1": 16, "2": 32, "3": 48}
    assert [r["slowdown"] for r in c["replays"]] == [pytest.approx(c["slowdown"])] * 2
    assert c["spread"]["3"] == pytest.approx(0.0, abs=1e-9)
    # a level with too few requests is left out; a plan of one request at a time has no curve
    assert set(replay.slowdown_curve(plan, [_ps_groups(curve, 0.01, [1] * 6 + [2] * 2 + [3] * 3)])["slowdown"]) \
        == {"1", "3"}
    assert replay.slowdown_curve(plan | {"instance_concurrency": 1}, recs) is None
    assert replay.concurrency(plan | {"max_concurrency": 1}) == 1
    # the calibrated service times are the times alone: the processor sharing undone
    probed = {"m": {"service_s": [0.01], "load_s": [0.05]}}
    p = replay._calibrated(plan, probed, recs, c)["m"]
    assert p["service_s"] == pytest.approx([0.010] * 48 + [0.012] * 48)
    assert "sustained" not in p
    assert p["load_alone_s"] == [0.05]   # no load in the replays: the probe's
    # a load beside the first group of 2 (both in service 0.014 s at slowdown(3) = 2.1 with it): its
    # time alone is its alone part and its shared part over 2.1, as the requests' are
    two = 0.010 + 0.05   # when the first group of 2 starts (after the first alone and a gap of 0.05)
    loaded = [dict(recs[0], loads=[{"instance": 0, "model": 0, "start_s": two - 0.02, "end_s": two + 0.014}]),
              recs[1]]
    p = replay._calibrated(plan, probed, loaded, c)["m"]
    assert p["load_alone_s"] == pytest.approx([0.02 + 0.014 / 2.1, 0.05])
    assert p["load_s"] == pytest.approx([0.034, 0.05])
    assert "load_alone_s" not in replay._calibrated(plan, probed, recs, None)["m"]   # no curve


def test_alone_times_integrate_the_speed_under_the_curve():
    pytest.importorskip("torch")
    from calibration.testbed.replay import alone_times, mean_in_service, slowdown_fn

    f = slowdown_fn({1: 1.0, 2: 1.5})
    # a alone on [0, 1), with b on [1, 2) (rate 2/3 each), alone again on [2, 2.5)
    start, end = np.array([0.0, 1.0]), np.array([2.5, 2.0])
    assert alone_times(start, end, f) == pytest.approx([1.0 + 1 / 1.5 + 0.5, 1 / 1.5])
    assert mean_in_service(start, end) == pytest.approx([3.5 / 2.5, 2.0])
    assert f(4) == pytest.approx(3.0)          # proportional beyond the last point, as the simulator


def test_calibration_groups_only_where_an_instance_serves_several_at_once():
    pytest.importorskip("torch")
    from calibration.testbed import replay

    plan = {"mode": "sme", "instances": 1, "instance_concurrency": 1, "max_concurrency": 1,
            "models": [{"name": "m", "memory_gb": 0.1}]}
    probed = {"m": {"service": {"mean": 0.01}, "load": {"mean": 0.05}}}
    one = replay.calibration_arrivals(plan, probed, 100, 1)
    assert one == replay.calibration_arrivals(plan, probed, 100, 1, groups=False)    # unchanged at 1
    four = plan | {"instance_concurrency": 4, "max_concurrency": 4}
    a = replay.calibration_arrivals(four, probed, 100, 1, burst=False)
    plain = replay.calibration_arrivals(four, probed, 100, 1, burst=False, groups=False)
    assert a[:len(plain)] == plain
    t, counts = np.unique([x[0] for x in a[len(plain):]], return_counts=True)
    assert sorted(np.bincount(counts)[1:]) == [replay.GROUP_ROUNDS] * 4       # each size 1..4, every round
    # the Poisson part's rate: half of one worker's capacity, and with concurrency CALIBRATION_BUSY_SHARED
    long = [replay.calibration_arrivals(p, probed, 10, 1, burst=False, groups=False, seconds=50.0)
            for p in (plan, four)]
    for part, busy in zip(long, (replay.CALIBRATION_BUSY, replay.CALIBRATION_BUSY_SHARED)):
        n = busy / 0.01 * 50
        assert abs(len(part) - n) < 4 * n ** 0.5                              # Poisson count, 4 sd


def test_calibration_spans_its_share_of_the_measured_replay():
    pytest.importorskip("torch")
    from calibration.testbed import replay

    plan = {"mode": "sme", "instances": 1, "instance_concurrency": 1, "max_concurrency": 1,
            "models": [{"name": "m", "memory_gb": 0.1}]}
    probed = {"m": {"service": {"mean": 0.01}, "load": {"mean": 0.05}}}   # 50 requests/s, half busy
    short = replay.calibration_arrivals(plan, probed, 100, 1, burst=False)
    assert len(short) == 100 and short[-1][0] < 3.0                        # n requests: about 2 s
    assert replay.calibration_arrivals(plan, probed, 100, 1, burst=False, seconds=1.0) == short
    long = replay.calibration_arrivals(plan, probed, 100, 1, burst=False, seconds=30.0)
    assert long[:100] == short                                              # the same draws, and on
    assert 29.0 < long[-1][0] <= 30.0
    assert abs(len(long) - 50 * 30) < 4 * (50 * 30) ** 0.5                  # Poisson count, 4 sd
    assert replay.calibration_arrivals(plan, probed, 10_000, 1, burst=False, seconds=30.0)[-1][0] <= 30.0


def _measured(case, probe, concurrency=None, noise=None):
    names = [m["name"] for m in case.models]
    plan = {"max_concurrency": 1, "instance_concurrency": 1, "max_concurrent_loads": 1, "replicate_above": 8,
            "timeout_s": 60.0} | fid.plan_of(case)
    return {"plan": plan, "probe": {"models": {n: dict(probe) for n in names}, "concurrency": concurrency},
            "requests": {"arrival_s": [0.0, 0.001, 0.002, 0.003], "model": [0, 0, 0, 0]}, "noise": noise}


def test_a_case_with_concurrency_gets_its_measured_curve_and_the_others_none():
    probe = {"service_s": [0.010, 0.012], "load_s": [0.05]}
    curve = {"levels": 4, "slowdown": {"1": 1.0, "2": 1.2, "4": 2.5}}
    for name in ("sme_concurrent", "mme_shared"):
        case = fid.CASES[name]
        assert fid.concurrency_of(fid.plan_of(case)) == 4
        m = _measured(case, probe, curve)
        sc = fid.scenario_of(m, Path("a.csv"))
        assert all(x["service"]["batching"] == {"slowdown": {1: 1.0, 2: 1.2, 4: 2.5}} for x in sc["models"])
        res = fid.simulate_measured(m)
        assert (res.requests["status"] == "ok").all()
        # four requests a millisecond apart on one device: they share it, the last ends after 2.5x alone
        assert res.requests["latency_ms"].max() > 20.0
        assert fid.scenario_of(_measured(case, probe), Path("a.csv"))["models"][0]["service"].get("batching") is None
        # a load's time: alone where the simulator shares the device with it (a run from before
        # load_alone_s: as measured), as measured without a curve
        alone = probe | {"load_s": [0.05, 0.09, 0.2], "load_alone_s": [0.04, 0.05, 0.06]}
        assert fid.scenario_of(_measured(case, alone, curve), Path("a.csv"))["models"][0]["init_time"] == 0.05
        assert fid.scenario_of(_measured(case, alone), Path("a.csv"))["models"][0]["init_time"] == 0.09
        assert sc["models"][0]["init_time"] == 0.05
    for name in ("sme_warm", "mme_thrash", "azure_code_burst"):     # one request at a time: as before
        case = fid.CASES[name]
        assert fid.concurrency_of(fid.plan_of(case)) == 1
        sc = fid.scenario_of(_measured(case, probe, curve), Path("a.csv"))
        assert all("batching" not in x["service"] for x in sc["models"])


def test_a_run_on_a_noisy_machine_is_judged_too_noisy_not_outside():
    quiet = {"neighbour_cores": 0.1, "cpus": 2, "level_drift": 0.03, "loadavg": [0.5, 0.5, 0.5]}
    assert not fid.noise_of({"noise": quiet})["noisy"] and fid.noise_of({})["noisy"] is False
    busy = fid.noise_of({"noise": quiet | {"neighbour_cores": 1.4}})
    assert busy["noisy"] and "1.40 of 2 cores" in busy["why"]
    drift = fid.noise_of({"noise": quiet | {"level_drift": -0.15}})
    assert drift["noisy"] and "-15%" in drift["why"]
    gap = fid.noise_of({"noise": quiet | {"level_gap": 0.21}})       # the measured replay's own speed
    assert gap["noisy"] and "+21%" in gap["why"] and not fid.noise_of({"noise": quiet | {"level_gap": 0.08}})["noisy"]
    row = {"within": {"p50": True, "p99": False}, "runs": [{"noise": fid.noise_of({"noise": quiet})}]}
    assert fid.verdict(row) == "outside"
    row["runs"].append({"noise": busy})
    assert fid.verdict(row) == "too noisy"
    assert fid.verdict(row | {"within": {"p50": True, "p99": True}}) == "within"


def test_a_case_missing_only_its_known_gaps_within_their_bounds_is_a_known_gap():
    bound, why = fid.KNOWN_GAPS["sme_concurrent"]["p99"]
    quiet = {"noise": fid.noise_of({})}
    row = {"within": {"p50": True, "p99": False, "cold_starts": True, "hit_rate": True},
           "p50_err": 0.05, "p99_err": -0.29, "runs": [quiet]}
    assert fid.verdict(row, "sme_concurrent") == "known gap"
    assert fid.known_gaps("sme_concurrent", row) == {"p99": why}
    assert fid.verdict(row) == "outside" and fid.verdict(row, "sme_warm") == "outside"   # not a gap of theirs
    assert fid.known_gaps("sme_warm", row) is None
    past = row | {"p99_err": -(bound + 0.01)}                      # past its bound: a regression
    assert fid.verdict(past, "sme_concurrent") == "outside" and fid.known_gaps("sme_concurrent", past) is None
    other = row | {"within": row["within"] | {"cold_starts": False}, "cold_starts_err": 0.2}
    assert fid.verdict(other, "sme_concurrent") == "outside"     # a miss that is no known gap
    assert fid.verdict(row | {"within": dict.fromkeys(row["within"], True)}, "sme_concurrent") == "within"
    for case, gaps in fid.KNOWN_GAPS.items():                      # each gap names a figure the case reports
        assert case in fid.CASES
        assert all(0 < b < 1 and "README" in w for b, w in gaps.values())
        assert set(gaps) <= {"p50", "p99", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"}


def test_the_level_gap_is_the_measured_replays_request_time_over_its_calibrations():
    pytest.importorskip("torch")
    from calibration.testbed.replay import level_drift, level_gap

    def rec(times, unfinished=0):
        s = np.arange(len(times) + unfinished, dtype=float)
        return {"requests": {"start_s": s.tolist(),
                             "end_s": [a + t for a, t in zip(s, times)] + [None] * unfinished}}

    cals = [rec([0.010] * 5 + [0.5] * 3), rec([0.012] * 5 + [0.5] * 3)]    # Poisson parts: the first 5 of each
    assert level_drift(cals, [5, 5]) == pytest.approx(0.2)
    assert level_gap(rec([0.0143] * 9, unfinished=2), cals, [5, 5]) == pytest.approx(0.0143 / 0.011 - 1)
    assert level_gap(rec([], unfinished=3), cals, [5, 5]) is None
    assert level_gap(rec([0.011]), [rec([], 2), cals[1]], [2, 5]) is None


def test_with_a_curve_the_level_compares_times_alone():
    """Where requests share the cores, the level is the requests' time alone under the calibration's
    curve: a measured replay whose requests overlap more, on a machine as fast, has no gap."""
    pytest.importorskip("torch")
    from calibration.testbed.replay import level_gap, slowdown_fn

    def rec(pairs):   # requests on instance 0: (start, end)
        return {"requests": {"instance": [0] * len(pairs), "start_s": [a for a, _ in pairs],
                             "end_s": [b for _, b in pairs]}, "loads": []}

    alone = [(k, k + 0.01) for k in range(6)]                           # 10 ms each, one at a time
    # pairs that share the cores throughout: 20 ms each in service, 10 ms alone under slowdown(2) = 2
    shared = [(k, k + 0.02) for k in range(4) for _ in range(2)]
    curve = slowdown_fn({"1": 1.0, "2": 2.0})
    assert level_gap(rec(shared), [rec(alone), rec(alone)], [6, 6]) == pytest.approx(1.0)
    assert level_gap(rec(shared), [rec(alone), rec(alone)], [6, 6], curve) == pytest.approx(0.0, abs=1e-9)
    # a load counts in k as a request does (it shares the cores); a machine 10% slower reads +10%
    slow = rec([(k, k + 0.022) for k in range(4)])
    slow["loads"] = [{"instance": 0, "start_s": k, "end_s": k + 0.022, "model": 0} for k in range(4)]
    assert level_gap(slow, [rec(alone), rec(alone)], [6, 6], curve) == pytest.approx(0.1)


def test_neighbours_measure_other_processes_cpu_not_ours():
    pytest.importorskip("torch")
    from calibration.harness import Neighbours

    n = Neighbours()
    t = __import__("time").process_time()
    while __import__("time").process_time() - t < 0.3:      # our own work does not count
        pass
    cores = n.cores()
    assert cores is None or 0.0 <= cores <= (__import__("os").cpu_count() or 1)


def test_the_settled_p99_starts_after_the_first_second_and_the_loads_begun_in_it():
    # loads begun in the first second push the start out to their end; a later load does not
    loads = [{"start_s": 0.1, "end_s": 0.4}, {"start_s": 0.9, "end_s": 1.3}, {"start_s": 5.0, "end_s": 9.0}]
    assert fid.settled_from({"loads": loads}) == 1.3
    assert fid.settled_from({"loads": []}) == fid.SETTLE_S
    # 100 requests from 1 s on at 1..100 ms, and slow ones before: only the later count
    arrival = np.r_[np.full(50, 0.5), 1.0 + np.arange(100) / 100]
    lat = np.r_[np.full(50, 500.0), np.arange(1.0, 101.0)]
    ok = np.ones(lat.size, dtype=bool)
    assert fid.p99_from(lat, ok, arrival, 1.0) == pytest.approx(np.percentile(np.arange(1.0, 101.0), 99))
    ok[-1] = False          # a failed request does not count
    assert fid.p99_from(lat, ok, arrival, 1.0) == pytest.approx(np.percentile(np.arange(1.0, 100.0), 99))
    assert np.isnan(fid.p99_from(lat, ok, arrival, 10.0))


def test_runs_pool_their_settled_p99():
    base = {"requests": 100, "completed": 100, "p50_ms": 10.0, "p90_ms": 20.0, "p99_ms": 40.0, "mean_ms": 12.0,
            "throughput_per_s": 5.0, "cold_starts": 4, "hit_rate": 1.0}
    runs = [{**fid.errors(base, base), "measured": base, "simulated": base, "unfinished": 0,
             "settled": {"from_s": t0, "measured_p99_ms": m, "simulated_p99_ms": s, "p99_err": s / m - 1}}
            for t0, m, s in ((1.0, 30.0, 27.0), (1.2, 50.0, 45.0))]
    st = fid.pooled(runs)["settled"]
    assert st["measured_p99_ms"] == 40.0 and st["simulated_p99_ms"] == 36.0
    assert st["p99_err"] == pytest.approx(-0.1) and st["from_s"] == pytest.approx(1.1)
