"""Requests that share a device (``service.batching``): exact event logs, queueing theory and
invariants.

Theory: with exponential work, the number of requests on a device whose requests each progress at
1 / slowdown(k) is a birth-death chain (in state n the device completes work at rate
min(n, K) / slowdown(min(n, K)) / E[S]); with slowdown(k) = k (processor sharing) the mean sojourn is
E[S] / (1 - rho) whatever the distribution of the work, per class too. Tolerances are several standard
errors at the run lengths used (checked over other seeds when written).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TEST_TYPE, run_dict, sme
from sim.core.engine import IN_FLIGHT, OK, STATUS_NAMES, TIMEOUT
from sim.hosting.device import slowdown_table
from sim.scenario import ScenarioError, parse_scenario
from sim.simulate import simulate

GPU1 = {"name": "test.gpu1", "gpus": 1, "gpu_memory_gb": 80, "vcpus": 8, "memory_gb": 256, "price_per_hour": 1.0}


def _trace(tmp_path, arrivals):
    p = tmp_path / "arrivals.csv"
    p.write_text("arrival_s\n" + "".join(f"{a}\n" for a in arrivals))
    return str(p)


def _one(tmp_path, arrivals, *, mean=1.0, curve=None, max_concurrency=2):
    svc = {"dist": "deterministic", "mean": mean}
    if curve is not None:
        svc["batching"] = {"slowdown": curve}
    d = sme(mean=mean, dist="deterministic", max_concurrency=max_concurrency, duration=30.0,
            instance_type="test.gpu1", traffic={"process": "trace", "path": _trace(tmp_path, arrivals)},
            instance_types=[GPU1])
    d["models"][0]["service"] = svc
    return run_dict(d).requests


# -- exact event logs ------------------------------------------------------------------------------------------------
def test_exact_log_two_requests_share_then_one_queues(tmp_path):
    # 1 s of work each, slowdown(2) = 1.5, at most 2 in service.
    # A alone 0-0.5 (0.5 done); A and B at 1/1.5: A's 0.5 left takes 0.75, A ends 1.25 (B has 0.5 done).
    # C arrives at 0.6 and queues; at 1.25 C starts beside B: B's 0.5 takes 0.75 -> 2.0 (C: 0.5 done);
    # C alone from 2.0: 0.5 more -> 2.5.
    r = _one(tmp_path, [0.0, 0.5, 0.6], curve={1: 1.0, 2: 1.5})
    assert r["start_s"].tolist() == pytest.approx([0.0, 0.5, 1.25], abs=1e-9)
    assert r["end_s"].tolist() == pytest.approx([1.25, 2.0, 2.5], abs=1e-9)
    assert r["service_ms"].tolist() == pytest.approx([1000.0] * 3)   # the work, as alone


def test_exact_log_beyond_the_last_point_no_more_throughput(tmp_path):
    # Curve {2: 1.6}: slowdown(4) = 3.2 (proportional beyond the last point), slowdown(3) = 2.4.
    # Four requests at 0 of 1 s each, all in service: each ends at 3.2.
    r = _one(tmp_path, [0.0] * 4, curve={2: 1.6}, max_concurrency=4)
    assert r["end_s"].tolist() == pytest.approx([3.2] * 4, abs=1e-9)
    f = slowdown_table({2: 1.6})
    assert (f(1), f(2), f(3), f(4)) == pytest.approx((1.0, 1.6, 2.4, 3.2))
    g = slowdown_table({1: 1.0, 2: 1.3, 4: 2.0})
    assert g(3) == pytest.approx(1.65)


def test_without_batching_slots_run_at_full_speed(tmp_path):
    r = _one(tmp_path, [0.0, 0.5, 0.6])
    assert r["end_s"].tolist() == pytest.approx([1.0, 1.5, 2.0], abs=1e-9)


def test_device_metrics(tmp_path):
    # Busy 0-2.5 on one GPU of one instance over a 30 s horizon: GPUUtilization 2.5/30 of 100.
    res_d = sme(mean=1.0, dist="deterministic", max_concurrency=2, duration=30.0, instance_type="test.gpu1",
                traffic={"process": "trace", "path": _trace(tmp_path, [0.0, 0.5, 0.6])}, instance_types=[GPU1])
    res_d["models"][0]["service"]["batching"] = {"slowdown": {2: 1.5}}
    res = run_dict(res_d)
    e = res.summary["endpoints"]["e"]
    assert e["gpu_utilization"] == pytest.approx(100 * 2.5 / 30)
    # in service: A 1.25 + B 1.5 + C 1.25 = 4.0 request-seconds over 2.5 busy seconds
    assert e["batch_size_mean"] == pytest.approx(4.0 / 2.5)
    assert res.timeline["gpu_utilization"].iloc[0] == pytest.approx(100 * 2.5 / 30)


def _scaled_in_while_busy(mode: str = "sme", **model):
    """Three instances scaled in to one by a step policy while 30 s requests (a curve, up to 16 at once)
    still run on them; the run's result, after checking that instances drained while busy."""
    d = {"name": "g", "seed": 1, "duration": 300, "models": [{
        "name": "m", "size_gb": 1, "traffic": {"process": "poisson", "rate": 1},
        "service": {"dist": "deterministic", "mean": 30, "batching": {"slowdown": {1: 1, 8: 2}}}, **model}],
        "endpoints": [{"name": "e", "mode": mode, "instance_type": "ml.g5.xlarge", "max_concurrency": 16,
                       "instances": {"initial": 3, "min": 1, "max": 3}, "models": ["m"],
                       "autoscaling": {"metric": "invocations_per_instance", "policy": "step",
                                       "steps": [{"below": 100000, "change": -1}], "scale_out_cooldown": 60}}]}
    res = run_dict(d)
    fleet = np.array(simulate(parse_scenario(copy.deepcopy(d), source="test")).logs[0].fleet)
    assert (fleet[:, 3] > fleet[:, 1]).any()   # instances drained while busy
    return res


def test_gpu_utilization_counts_draining_instances():
    """Three instances scaled in to one by a step policy while 30 s requests (a curve, up to 16 at once)
    still run on them: a draining instance's GPU stays busy out of service, so GPUUtilization averages
    over the instances holding their GPUs (in service or draining), never above 100 per GPU."""
    res = _scaled_in_while_busy()
    assert (res.timeline["gpu_utilization"] <= 100.0 + 1e-9).all()
    assert 90.0 < res.summary["endpoints"]["e"]["gpu_utilization"] <= 100.0 + 1e-9


@pytest.mark.parametrize("mode", ["sme", "mme"])
def test_memory_figures_count_draining_instances(mode):
    """The same scale-in, one model of 12 GB on each 24 GB GPU: a draining instance keeps its model
    loaded until its last request ends, so the memory figures average over the instances holding
    memory (in service or draining): GPU memory at 50% all along, one model loaded per instance, where
    an mme endpoint counted a draining instance's model against the instances in service (up to
    100%, two models an instance) and an sme endpoint dropped it before it was unloaded."""
    res = _scaled_in_while_busy(mode, memory_gb=12)
    tl = res.timeline
    loaded = tl["t_s"] >= 60   # (the first minute: the first loads)
    assert tl.loc[loaded, "gpu_memory_utilization"].to_numpy() == pytest.approx(0.5)
    assert (tl["LoadedModelCount"] <= 1.0 + 1e-9).all()
    cw = res.summary["endpoints"]["e"]["cloudwatch"]
    assert cw["GPUMemoryUtilization"] <= 50.0 + 1e-9
    if mode == "sme":
        assert cw["GPUMemoryUtilization"] == pytest.approx(50.0) and cw["LoadedModelCount"] == pytest.approx(1.0)
    else:
        assert cw["LoadedModelCount"] <= cw["LoadedModelCount_max"] == 1


# -- theory -------------------------------------------------------------------------------------------------------
def _chain_mean_sojourn(lam: float, mean: float, curve: dict, K: int, n_max: int = 4000) -> float:
    f = slowdown_table(curve)
    p = [1.0]
    for n in range(1, n_max):
        k = min(n, K)
        p.append(p[-1] * lam / (k / f(k) / mean))
    p = np.asarray(p) / sum(p)
    return float((np.arange(n_max) * p).sum() / lam)


@pytest.mark.parametrize("curve,K", [({1: 1.0, 2: 1.3, 4: 2.0, 8: 3.6}, 8), ({2: 1.8}, 4), ({1: 1.0, 4: 1.5}, 4)])
@pytest.mark.parametrize("load", [0.5, 0.9])
def test_birth_death_chain(curve, K, load):
    mean = 0.05
    f = slowdown_table(curve)
    lam = load * K / f(K) / mean            # load: of the device's most throughput
    duration = 150_000 / lam if load < 0.8 else 600_000 / lam
    d = sme(rate=lam, mean=mean, max_concurrency=K, duration=duration, warmup=200 * mean, seed=11,
            instance_type="test.gpu1", instance_types=[GPU1])
    d["models"][0]["service"]["batching"] = {"slowdown": curve}
    r = run_dict(d).requests
    lat = r[(r["status"] == "ok") & (r["arrival_s"] >= 200 * mean)]["latency_ms"].to_numpy() / 1e3
    assert lat.mean() == pytest.approx(_chain_mean_sojourn(lam, mean, curve, K), rel=0.03)


@pytest.mark.parametrize("dist,cv", [("deterministic", None), ("lognormal", 2.0)])
def test_processor_sharing_is_insensitive(dist, cv):
    mean, rho = 0.05, 0.7
    d = sme(rate=rho / mean, mean=mean, dist=dist, cv=cv, max_concurrency=10_000, duration=20_000, warmup=50,
            seed=5, instance_type="test.gpu1", instance_types=[GPU1])
    d["models"][0]["service"]["batching"] = {"slowdown": {1: 1.0}}   # slowdown(k) = k
    r = run_dict(d).requests
    lat = r[(r["status"] == "ok") & (r["arrival_s"] >= 50)]["latency_ms"].to_numpy() / 1e3
    assert lat.mean() == pytest.approx(mean / (1 - rho), rel=0.03)


def test_multi_class_processor_sharing_on_one_mme_gpu():
    # Three models on one MME GPU, means 20/50/120 ms, equal rates: total rho 0.75, slowdown(k) = k.
    means = [0.02, 0.05, 0.12]
    rho = 0.75
    lam = rho / sum(means)                  # per model
    d = {"name": "mc", "seed": 9, "duration": 30_000, "warmup": 60, "instance_types": [GPU1],
         "models": [{"name": f"m{k}", "size_gb": 0.1, "memory_gb": 1,
                     "service": {"dist": "exponential", "mean": m, "batching": {"slowdown": {1: 1.0}}},
                     "traffic": {"process": "poisson", "rate": lam}} for k, m in enumerate(means)],
         "endpoints": [{"name": "e", "mode": "mme", "instance_type": "test.gpu1", "instances": 1,
                        "max_concurrency": 10_000, "models": ["m*"]}]}
    r = run_dict(d).requests
    ok = r[(r["status"] == "ok") & (r["arrival_s"] >= 60)]
    for k, m in enumerate(means):
        lat = ok[ok["model"] == f"m{k}"]["latency_ms"].to_numpy() / 1e3
        assert lat.mean() == pytest.approx(m / (1 - rho), rel=0.05), f"m{k}"


# (one clock; one per curve; the load on b's own curve, slower beside a request than a's)
@pytest.mark.parametrize("b_curve,b_load_end", [({1: 1.0, 2: 1.5}, 2.75), ({1: 1.0, 2: 1.5, 3: 2.0}, 2.75),
                                                ({1: 1.0, 2: 2.0}, 2.875)])
def test_a_load_on_an_mme_instances_cpus_shares_them(tmp_path, b_curve, b_load_end):
    # Two models on one MME instance, 1 s of work a request, a's slowdown(2) = 1.5, each load's init 1 s
    # alone. a: loads 0-1 alone, its request starts at 1. b arrives at 1.5 and starts loading. On the
    # instance's CPUs the load's init is one more job on the cores the request uses: a's request has
    # 0.5 s done at 1.5 and the rest at 1/1.5 (a's curve at k = 2), ending at 2.25; the load does
    # 0.75 / b's slowdown(2) by then and the rest alone: 2.75 with b's slowdown(2) = 1.5, 2.875 with
    # 2.0. b's request starts there alone, 1 s. On a GPU a load does not share the device: a's request
    # ends at 2.0, b's load at 2.5.
    trace = tmp_path / "arrivals.csv"
    trace.write_text("arrival_s,model\n0.0,a\n1.5,b\n")
    ends = {}
    for kind, gpus in (("cpu", 0), ("gpu", 1)):
        it = {"name": f"test.{kind}", "gpus": gpus, "gpu_memory_gb": 80 * gpus, "vcpus": 8, "memory_gb": 256,
              "price_per_hour": 1.0, "storage": "nvme", "storage_gb": 1000, "disk_read_gbs": 1e6,
              "network_gbps": 8e6}
        d = {"name": "load-share", "seed": 1, "duration": 30.0, "warmup": 0, "instance_types": [it],
             "models": [{"name": n, "size_gb": 1e-9, "memory_gb": 1.0, "init_time": 1.0, "accelerators": 0 if
                         kind == "cpu" else 1,
                         "service": {"dist": "deterministic", "mean": 1.0,
                                     "batching": {"slowdown": {1: 1.0, 2: 1.5} if n == "a" else b_curve}},
                         "traffic": {"process": "trace", "path": str(trace), "format": "csv"}} for n in "ab"],
             "endpoints": [{"name": "e", "mode": "mme", "instance_type": it["name"], "instances": 1,
                            "max_concurrency": 4, "models": ["a", "b"],
                            "cache": {"host_reserve": 0, "s3_throughput": 1e6}}]}
        r = run_dict(d).requests.sort_values("arrival_s")
        ends[kind] = (r["start_s"].tolist(), r["end_s"].tolist())
    assert ends["cpu"][0] == pytest.approx([1.0, b_load_end], abs=1e-6)
    assert ends["cpu"][1] == pytest.approx([2.25, b_load_end + 1.0], abs=1e-6)
    assert ends["gpu"][0] == pytest.approx([1.0, 2.5], abs=1e-6)
    assert ends["gpu"][1] == pytest.approx([2.0, 3.5], abs=1e-6)


# -- no-op default ---------------------------------------------------------------------------------------------
def test_batching_changes_the_run_only_where_set():
    base = sme(rate=30, mean=0.05, max_concurrency=4, duration=600, instance_type="test.gpu1", instance_types=[GPU1])
    a = run_dict(base).requests
    b = run_dict(base).requests
    assert a["end_s"].equals(b["end_s"])
    shared = copy.deepcopy(base)
    shared["models"][0]["service"]["batching"] = {"slowdown": {1: 1.0, 4: 3.0}}
    c = run_dict(shared).requests
    assert c["arrival_s"].equals(a["arrival_s"]) and c["service_ms"].equals(a["service_ms"])   # same draws
    assert c["latency_ms"].mean() > a["latency_ms"].mean()


# -- invariants (Hypothesis) ---------------------------------------------------------------------------------------
def _check_device_work(cols: dict, f, horizon: float, cap: int, jobs: dict | None = None) -> None:
    """Walk each device's requests in time order: the work each completed request receives, its time in
    service integrated at 1 / slowdown(k), is its service time; k never exceeds the device's cap (its
    requests). ``jobs``: per device, (start, end, work) of the jobs that are no request there (a load's
    init on an MME instance's CPUs): they count in k and each receives its work too."""
    start, end, dev, svc = cols["start"], cols["served_end"], cols["device"], cols["service"]
    done = np.isin(cols["status"], (OK, TIMEOUT)) & np.isfinite(start) & np.isfinite(end)
    for d in np.unique(dev[dev >= 0]):
        mine = np.flatnonzero((dev == d) & np.isfinite(start))
        js = np.asarray((jobs or {}).get(int(d), []), dtype=float).reshape(-1, 3)
        t = np.concatenate([start[mine], js[:, 0], np.where(np.isfinite(end[mine]), end[mine], horizon), js[:, 1]])
        n = len(mine) + len(js)
        step = np.concatenate([np.ones(n), -np.ones(n)])
        req = np.concatenate([np.ones(len(mine)), np.zeros(len(js))] * 2)
        order = np.lexsort((step, t))      # ends first on a tie
        ts, k = t[order], np.cumsum(step[order])
        assert np.cumsum((step * req)[order]).max() <= cap
        for a, b, w in js[np.isfinite(js[:, 2])]:   # (one still in service at the horizon: nan)
            assert work_of(ts, k, f, a, b) == pytest.approx(w, rel=1e-6, abs=1e-9)
        for j in mine[done[mine]]:
            assert work_of(ts, k, f, start[j], end[j]) == pytest.approx(svc[j], rel=1e-6, abs=1e-9)


def work_of(ts: np.ndarray, k: np.ndarray, f, a: float, b: float) -> float:
    """The work a job in service from ``a`` to ``b`` receives: k (of all jobs) is constant on [ts[s],
    ts[s + 1]), where each job does (length) / slowdown(k) of work."""
    rate = np.array([1.0 / f(int(round(x))) if x > 0 else 0.0 for x in k[:-1]])
    cum = np.concatenate([[0.0], np.cumsum(np.diff(ts) * rate)])

    def at(x):
        j = np.clip(np.searchsorted(ts, x, side="right") - 1, 0, len(ts) - 2)
        return cum[j] + (x - ts[j]) * rate[j]

    return at(b) - at(a)


params = st.fixed_dictionaries({
    "mode": st.sampled_from(["sme", "mme", "ic"]),
    "load": st.floats(0.2, 1.5),
    "max_concurrency": st.integers(1, 6),
    "points": st.lists(st.tuples(st.integers(2, 8), st.floats(1.0, 6.0)), min_size=1, max_size=3),
    "dist": st.sampled_from(["exponential", "deterministic", "lognormal"]),
    "models": st.integers(1, 3),
    "seed": st.integers(0, 2**31),
})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(params)
def test_each_request_receives_its_work_and_devices_hold_their_cap(p):
    curve = {1: 1.0, **{k: f for k, f in p["points"]}}
    mean = 0.1
    cv = 1.0 if p["dist"] == "lognormal" else None
    svc = {"dist": p["dist"], "mean": mean, "batching": {"slowdown": curve}}
    if cv is not None:
        svc["cv"] = cv
    n = p["models"]
    rate = p["load"] * 10.0
    models = [{"name": f"m{k}", "size_gb": 0.1, "memory_gb": 1, "service": svc,
               "traffic": {"process": "poisson", "rate": rate / n}} for k in range(n)]
    ep = {"name": "e", "mode": p["mode"], "instance_type": "test.gpu8", "instances": 2,
          "max_concurrency": p["max_concurrency"], "timeout": 5.0}
    if p["mode"] == "ic":
        ep["instances"] = 1
        ep["components"] = [{"model": f"m{k}", "accelerators": 1, "copies": 1} for k in range(n)]
    else:
        ep["models"] = ["m*"] if p["mode"] == "mme" else ["m0"]
        if p["mode"] == "sme":
            models = models[:1]
    d = {"name": "prop", "seed": p["seed"], "duration": 60.0, "warmup": 0, "instance_types": [TEST_TYPE],
         "models": models, "endpoints": [ep]}
    sc = parse_scenario(d, source="test")
    run = simulate(sc)
    c = run.columns
    # the most its hosts may start on one device: an MME instance's GPU takes every model's
    cap = p["max_concurrency"] * (len(models) if p["mode"] == "mme" else 1)
    _check_device_work(c, slowdown_table(curve), sc.horizon, cap)
    assert set(np.unique(c["status"]).tolist()) <= set(range(len(STATUS_NAMES)))
    # every request that ended has an end at or after its arrival; those in flight have none
    ended = c["status"] != IN_FLIGHT
    assert np.all(c["end"][ended] >= c["arrival"][ended] - 1e-9)
    assert np.all(np.isnan(c["end"][~ended]))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(st.fixed_dictionaries({
    "load": st.floats(0.2, 1.2),
    "max_concurrency": st.integers(1, 4),
    "points": st.lists(st.tuples(st.integers(2, 8), st.floats(1.0, 6.0)), min_size=1, max_size=3),
    "models": st.integers(2, 6),
    "init": st.floats(0.01, 0.5),
    "seed": st.integers(0, 2**31),
}))
def test_loads_on_an_mme_instances_cpus_receive_their_work_beside_its_requests(p):
    # An MME instance on CPUs whose memory holds two models: loads come and go while requests are in
    # service, each load's init counting in k on the instance's device (the transfers before it take
    # ~1e-18 s: the artifact is 1e-9 GB on links of 1e6+ GB/s).
    curve = {1: 1.0, **{k: f for k, f in p["points"]}}
    n = p["models"]
    cpu = {"name": "test.cpu", "gpus": 0, "vcpus": 8, "memory_gb": 2.0, "price_per_hour": 1.0, "storage": "nvme",
           "storage_gb": 1000, "disk_read_gbs": 1e6, "network_gbps": 8e6}
    models = [{"name": f"m{k}", "size_gb": 1e-9, "memory_gb": 1.0, "init_time": p["init"], "accelerators": 0,
               "service": {"dist": "exponential", "mean": 0.1, "batching": {"slowdown": curve}},
               "traffic": {"process": "poisson", "rate": p["load"] * 10.0 / n}} for k in range(n)]
    d = {"name": "prop-loads", "seed": p["seed"], "duration": 60.0, "warmup": 0, "instance_types": [cpu],
         "models": models,
         "endpoints": [{"name": "e", "mode": "mme", "instance_type": "test.cpu", "instances": 1,
                        "max_concurrency": p["max_concurrency"], "timeout": 5.0, "models": ["m*"],
                        "cache": {"host_reserve": 0, "s3_throughput": 1e6}}]}
    sc = parse_scenario(d, source="test")
    run = simulate(sc)
    c = run.columns
    loads = run.logs[0].loads
    assert len(loads) > 1
    dev = {int(i): int(v) for i, v in zip(c["instance"], c["device"]) if v >= 0}
    jobs: dict[int, list] = {}
    for rec in loads:   # (a load still in service at the horizon counts in k; its work is not checked)
        done = rec.end >= 0
        jobs.setdefault(dev[rec.instance], []).append(
            (rec.start, rec.end if done else sc.horizon, p["init"] if done else np.nan))
    _check_device_work(c, slowdown_table(curve), sc.horizon, p["max_concurrency"] * n, jobs)


# -- errors and warnings ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("curve,msg", [
    ({}, "at least one level"),
    ({0: 1.0}, "must be >= 1"),
    ({"2.5": 1.5}, "whole number"),
    ({2.5: 1.5}, "whole number"),
    ({2: 0.0}, "factor > 0"),
    ({2: -1.0}, "factor > 0"),
    ({2: float("inf")}, "finite number"),
    ({1: 2.0}, "1 by definition"),
    ({1: 1.0, 2: 1.5, "2": 1.7}, "level 2 is given twice"),
])
def test_bad_curves_name_the_key(curve, msg):
    d = sme(instance_type="test.gpu1", instance_types=[GPU1])
    d["models"][0]["service"]["batching"] = {"slowdown": curve}
    with pytest.raises(ScenarioError, match=msg) as e:
        parse_scenario(d, source="s.yaml")
    assert "models[0].service.batching.slowdown" in str(e.value)


def test_odd_curves_and_full_speed_gpus_warn():
    d = sme(instance_type="test.gpu1", instance_types=[GPU1], max_concurrency=4)
    sc = parse_scenario(copy.deepcopy(d), source="s.yaml")
    assert any("each run at full speed" in w and "endpoints[0]" in w for w in sc.warnings)
    d["models"][0]["service"]["batching"] = {"slowdown": {2: 1.5, 4: 4.0}}
    sc = parse_scenario(copy.deepcopy(d), source="s.yaml")
    assert not any("full speed" in w for w in sc.warnings)
    assert any("throughput k / slowdown(k) falls at k = 4" in w for w in sc.warnings)
    d["models"][0]["service"]["batching"] = {"slowdown": {2: 0.9}}
    sc = parse_scenario(d, source="s.yaml")
    assert any("faster in company" in w for w in sc.warnings)
    # one request at a time, or CPU workers: no warning
    one = sme(instance_type="test.gpu1", instance_types=[GPU1], max_concurrency=1)
    assert not any("full speed" in w for w in parse_scenario(one, source="s.yaml").warnings)
    cpu = sme(max_concurrency=4, accelerators=0)
    assert not any("full speed" in w for w in parse_scenario(cpu, source="s.yaml").warnings)


def test_run_and_validate_print_the_full_speed_warning(tmp_path):
    import yaml
    from click.testing import CliRunner

    from sim.cli import main

    d = sme(instance_type="test.gpu1", instance_types=[GPU1], max_concurrency=4, duration=60.0)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    for args in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "o"), "--no-plots"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert "each run at full speed" in res.output
    import json
    assert any("full speed" in w for w in json.loads((tmp_path / "o" / "summary.json").read_text())["warnings"])
