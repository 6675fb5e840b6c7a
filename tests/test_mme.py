"""Multi-model endpoints: the cache against Che's approximation, the load
pipeline stage by stage, eviction rules and the Forethought facts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.optimize import brentq

import sim
from conftest import run_dict
from sim.scenario import parse_scenario
from sim.simulate import simulate
from sim.workload.popularity import zipf_weights

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
FAST = {"name": "test.fast", "gpus": 1, "gpu_memory_gb": 10, "vcpus": 8, "memory_gb": 64, "price_per_hour": 1.0,
        "storage": "nvme", "storage_gb": 1000, "disk_read_gbs": 1.0e6, "network_gbps": 8.0e6}


def mme(n_models, *, capacity_models=None, zipf=1.0, rate=100.0, mean=0.001, dist="deterministic",
        duration=3000.0, warmup=300.0, size=0.001, memory=1.0, init=0.0, policy="lru", instances=1,
        itype=None, cache=None, traffic=None, seed=3, **ep):
    it = dict(itype or FAST)
    if capacity_models is not None:
        it["gpu_memory_gb"] = capacity_models * memory + 0.5 * memory
    c = {"policy": policy, "memory_fraction": 1.0, "max_concurrent_loads": 64, "host_reserve": 0}
    c.update(cache or {})
    e = {"name": "mme", "mode": "mme", "instance_type": it["name"], "instances": instances, "max_concurrency": 8,
         "models": ["m-*"], "cache": c}
    e.update(ep)
    return {
        "name": "mme-test", "seed": seed, "duration": duration, "warmup": warmup, "instance_types": [it],
        "models": [{"name": "m-{i:03d}", "count": n_models, "size_gb": size, "memory_gb": memory,
                    "init_time": init, "service": {"dist": dist, "mean": mean},
                    "traffic": traffic or {"process": "poisson", "rate": rate, "popularity": {"zipf": zipf}}}],
        "endpoints": [e],
    }


def che_hit_rate(n: int, k: int, s: float) -> float:
    """Che's approximation of the LRU hit rate for K of N items with Zipf(s) popularity."""
    p = zipf_weights(n, s)
    tc = brentq(lambda t: np.sum(1 - np.exp(-p * t)) - k, 1e-9, 1e9)
    return float(np.sum(p * (1 - np.exp(-p * tc))))


@pytest.mark.parametrize("n,k,s", [(50, 10, 0.8), (100, 20, 1.0), (200, 40, 1.2), (60, 30, 0.6)])
def test_lru_hit_rate_matches_che(n, k, s):
    res = run_dict(mme(n, capacity_models=k, zipf=s, rate=100.0, duration=1500))
    hit = res.summary["overall"]["cache_hit_rate"]
    assert res.summary["endpoints"]["mme"]["cloudwatch"]["LoadedModelCount_max"] == k
    assert hit == pytest.approx(che_hit_rate(n, k, s), abs=0.015)


def test_hit_rate_is_one_when_every_model_fits():
    res = run_dict(mme(30, capacity_models=40, zipf=1.0, rate=50.0, duration=1200, warmup=600))
    assert res.summary["overall"]["cache_hit_rate"] == 1.0
    assert res.summary["overall"]["cold_starts"] == 0


def test_lfu_beats_lru_on_a_static_zipf_and_gds_runs():
    hits = {}
    for policy in ("lru", "lfu", "gds"):
        res = run_dict(mme(100, capacity_models=10, zipf=0.9, rate=100.0, duration=450, policy=policy))
        hits[policy] = res.summary["overall"]["cache_hit_rate"]
    # LFU keeps the most popular models (the best static choice under independent requests).
    assert hits["lfu"] > hits["lru"] + 0.02
    assert 0.2 < hits["gds"] < 1.0


# -- the load pipeline --------------------------------------------------------------------
PIPE = {"name": "test.pipe", "gpus": 1, "gpu_memory_gb": 16, "vcpus": 8, "memory_gb": 64, "price_per_hour": 1.0,
        "gpu": "T4", "storage": "nvme", "storage_gb": 100, "disk_read_gbs": 2.0, "network_gbps": 80.0}


def trace(tmp_path, rows):
    p = tmp_path / "t.csv"
    pd.DataFrame(rows, columns=["arrival_s", "model"]).to_csv(p, index=False)
    return {"process": "trace", "path": str(p), "format": "csv"}


def test_cold_start_is_the_sum_of_its_stages(tmp_path):
    d = mme(2, size=4.0, memory=4.0, init=3.0, itype=PIPE, mean=0.01, duration=100, warmup=0,
            cache={"s3_throughput": "500MB/s"}, traffic=trace(tmp_path, [(0.0, "m-000")]))
    res = run_dict(d)
    r = res.requests.iloc[0]
    download, read, h2d, init = 4.0 / 0.5, 4.0 / 2.0, 4.0 / 15.75, 3.0  # T4: PCIe gen3 x16
    assert r["load_ms"] == pytest.approx((download + read + h2d + init) * 1e3, rel=1e-9)
    assert r["latency_ms"] == pytest.approx(r["load_ms"] + 10.0, rel=1e-9)
    assert bool(r["cold"]) and r["status"] == "ok"
    cw = res.summary["endpoints"]["mme"]["cloudwatch"]
    assert cw["ModelDownloadingTime_ms"] == pytest.approx(download * 1e3)


def test_two_loads_at_once_share_the_bandwidth(tmp_path):
    base = dict(size=4.0, memory=4.0, init=0.0, itype=PIPE, mean=0.01, duration=100, warmup=0,
                cache={"s3_throughput": "500MB/s"})
    alone = run_dict(mme(2, **base, traffic=trace(tmp_path, [(0.0, "m-000")]))).requests
    both = run_dict(mme(2, **base, traffic=trace(tmp_path, [(0.0, "m-000"), (0.0, "m-001")]))).requests
    t1 = alone["load_ms"].iloc[0]
    # every stage is a shared link: two equal loads side by side each take twice as long
    assert both["load_ms"].tolist() == pytest.approx([2 * t1, 2 * t1], rel=1e-9)
    # with one load at a time the second waits for the first
    serial = run_dict(mme(2, **dict(base, cache={"s3_throughput": "500MB/s", "max_concurrent_loads": 1}),
                          traffic=trace(tmp_path, [(0.0, "m-000"), (0.0, "m-001")]))).requests
    assert serial["load_ms"].tolist() == pytest.approx([t1, 2 * t1], rel=1e-9)


def test_artifact_on_disk_skips_the_download(tmp_path):
    # Cache disabled (ModelCacheSetting Disabled): unload after every invocation, artifact stays on disk.
    d = mme(2, size=4.0, memory=4.0, init=1.0, itype=PIPE, mean=0.01, duration=100, warmup=0,
            cache={"s3_throughput": "500MB/s", "enabled": False},
            traffic=trace(tmp_path, [(0.0, "m-000"), (30.0, "m-000")]))
    r = run_dict(d).requests
    first, second = r["load_ms"].tolist()
    assert first == pytest.approx((8.0 + 2.0 + 4 / 15.75 + 1.0) * 1e3)
    assert second == pytest.approx((2.0 + 4 / 15.75 + 1.0) * 1e3)
    assert r["cold"].all()


def test_requests_during_a_load_wait_for_it(tmp_path):
    d = mme(1, size=1.0, memory=1.0, init=2.0, itype=PIPE, mean=0.01, duration=100, warmup=0,
            cache={"s3_throughput": "1GB/s"}, traffic=trace(tmp_path, [(0.0, "m-000"), (1.0, "m-000"), (10.0, "m-000")]))
    res = run_dict(d)
    r = res.requests
    ready = (1.0 + 0.5 + 1 / 15.75 + 2.0)
    assert r["start_s"].tolist()[:2] == pytest.approx([ready, ready])
    assert r["cold"].tolist() == [True, True, False]
    assert res.summary["overall"]["cold_starts"] == 1


def test_serving_models_are_never_evicted():
    # Long requests on a cache of 3 models, 12 models requested: loads must wait for idle models.
    d = mme(12, capacity_models=3, zipf=0.5, rate=20.0, mean=0.4, dist="exponential", duration=600, warmup=0,
            max_concurrency=2)
    raw = simulate(parse_scenario(d))
    c = raw.columns
    log = raw.logs[0]
    assert log.unloads
    for t, inst, m in log.unloads:
        busy = (c["model"] == m) & (c["instance"] == inst) & (c["start"] < t) & (c["start"] + c["service"] > t)
        assert not busy.any()


settings_mme = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@settings_mme
@given(st.fixed_dictionaries({
    "n": st.integers(2, 30), "sizes": st.sampled_from([(0.5, 1.0, 0.5), (2.0, 3.0, 1.0), (0.3, 0.6, 2.7)]),
    "gpu": st.floats(3.5, 12.0), "host": st.floats(6.0, 40.0), "disk": st.floats(3.5, 50.0),
    "instances": st.integers(1, 3), "policy": st.sampled_from(["lru", "lfu", "gds"]),
    "enabled": st.booleans(), "rate": st.floats(1.0, 60.0), "zipf": st.floats(0.0, 1.5),
    "loads": st.integers(1, 4), "seed": st.integers(0, 10**6)}))
def test_memory_never_exceeds_any_tier(p):
    size, mem, host = p["sizes"]
    it = dict(PIPE, name="test.prop", gpu_memory_gb=p["gpu"], memory_gb=p["host"] + 1.0)
    d = mme(p["n"], size=size, memory=mem, itype=it, instances=p["instances"], policy=p["policy"], rate=p["rate"],
            zipf=p["zipf"], mean=0.05, dist="exponential", duration=300, warmup=0, seed=p["seed"],
            cache={"enabled": p["enabled"], "disk": p["disk"], "max_concurrent_loads": p["loads"],
                   "host_reserve": 1.0, "s3_throughput": "2GB/s"})
    d["models"][0]["host_memory_gb"] = host
    if host > p["host"] or size > p["disk"] or mem > p["gpu"]:
        with pytest.raises(sim.ScenarioError):
            parse_scenario(d)
        return
    raw = simulate(parse_scenario(d))
    log = raw.logs[0]
    for gpu_used, host_used, disk_used, _ in log.peaks.values():
        assert gpu_used <= p["gpu"] + 1e-9
        assert host_used <= p["host"] + 1e-9
        assert disk_used <= p["disk"] + 1e-9
    mem_log = np.array(log.memory)
    assert (mem_log[:, 2] <= p["gpu"] * p["instances"] + 1e-9).all()
    st_ = raw.columns["status"]
    assert set(np.unique(st_)) <= {0, 1, 2}  # in flight, ok or timed out: nothing is lost


# -- Forethought ------------------------------------------------------------------------
def test_forethought_embeddings_12_models_per_g4dn_xlarge():
    res = sim.run(sim.load_scenario(SCENARIOS / "forethought_embeddings.yaml", ["duration=10m", "warmup=2m"]))
    cw = res.summary["endpoints"]["embeddings"]["cloudwatch"]
    assert cw["LoadedModelCount_max"] == 12
    print(f"\nembeddings per ml.g4dn.xlarge: simulated {cw['LoadedModelCount_max']}, reported 12")


@pytest.mark.parametrize("itype,expect", [("ml.g4dn.xlarge", 4), ("ml.g4dn.2xlarge", 10)])
def test_forethought_autocomplete_models_per_instance(itype, expect):
    sc = sim.load_scenario(SCENARIOS / "forethought_autocomplete.yaml",
                           [f"endpoints[0].instance_type={itype}", "duration=10m", "warmup=2m"])
    cw = sim.run(sc).summary["endpoints"]["autocomplete"]["cloudwatch"]
    assert cw["LoadedModelCount_max"] == expect
    print(f"\nautocomplete models per {itype}: simulated {cw['LoadedModelCount_max']}, reported {expect}")


def test_forethought_cold_start_and_warm_latency(tmp_path):
    # One model on a fresh instance: the first request pays the whole pipeline.
    path = tmp_path / "t.csv"
    pd.DataFrame({"arrival_s": [0.0] + list(np.arange(30.0, 90.0, 0.5)),
                  "model": "autocomplete-000"}).to_csv(path, index=False)
    sc = sim.load_scenario(SCENARIOS / "forethought_autocomplete.yaml",
                           ["duration=2m", "warmup=0", f"models[0].traffic={{process: trace, path: {path}, format: csv}}"])
    r = sim.run(sc).requests
    cold = r.iloc[0]["latency_ms"] / 1e3
    warm = r.iloc[1:]["latency_ms"] / 1e3
    assert cold == pytest.approx(12.7, rel=0.05)
    assert 0.025 <= warm.quantile(0.05) and warm.quantile(0.95) <= 0.14
    print(f"\ncold start: simulated {cold:.2f} s (reported 12.7 s); warm median {warm.median() * 1e3:.0f} ms "
          f"(reported 30-130 ms)")


def test_thrashing_hit_rate_falls_unloads_rise_and_warns():
    fits = run_dict(mme(10, capacity_models=12, zipf=0.0, rate=50, duration=1200, warmup=300))
    thrash = run_dict(mme(40, capacity_models=12, zipf=0.0, rate=50, duration=1200, warmup=300))
    a = fits.summary["endpoints"]["mme"]
    b = thrash.summary["endpoints"]["mme"]
    assert a["cache_hit_rate"] == 1.0 and b["cache_hit_rate"] < 0.4
    assert a["cloudwatch"]["ModelUnloadingTime_count"] == 0 < b["cloudwatch"]["ModelUnloadingTime_count"]
    assert b["thrashing_index"] > 0.9
    assert not [w for w in fits.summary["warnings"] if "thrashing" in w]
    assert any("thrashing" in w for w in thrash.summary["warnings"])
    tl = thrash.timeline
    assert tl["ModelUnloadingTime_count"].iloc[6:].min() > 0


def test_prewarming_keeps_every_model_loaded():
    # Rare traffic on 8 models that all fit: with hourly pre-warming no user request is cold after the first hour.
    d = mme(8, capacity_models=10, zipf=0.0, rate=0.002, duration=6 * 3600, warmup=3600, size=1.0, memory=1.0,
            itype=PIPE, init=5.0, prewarm="1h")
    res = run_dict(d)
    r = res.requests
    late = r[r["arrival_s"] >= 3600]
    assert len(late) > 8 * 5  # the pings and the users' requests
    assert not late["cold"].any()


def test_a_language_models_ping_is_a_one_token_request():
    """A pre-warming ping of a language model is served as one prompt token and one output token, and
    recorded so (not as 0 and 0 beside a TTFT): its row says what the engine served."""
    d = {"name": "p", "seed": 1, "duration": 300, "models": [{
        "name": "m0", "architecture": "mistral-7b", "tokens": {"input": 200, "output": 50},
        "service": {"continuous_batching": {}}, "traffic": {"process": "poisson", "rate": 0.2}}],
        "endpoints": [{"name": "ep", "mode": "mme", "instance_type": "ml.g6e.xlarge", "instances": 1,
                       "prewarm": "1m", "models": ["m0"]}]}
    r = run_dict(d).requests
    pings = r[r["input_tokens"] < 200]
    assert len(pings) == 5 and (pings["arrival_s"] % 60 == 0).all()
    assert (pings["input_tokens"] == 1).all() and (pings["output_tokens"] == 1).all()
    assert (pings["ttft_ms"] == pings["latency_ms"]).all() and pings["tpot_ms"].isna().all()


def test_instance_concurrency_workers_serve_and_load_oldest_first(tmp_path):
    """One worker runs requests and loads alike, the longest-waiting job first (exact times)."""
    trace = tmp_path / "t.csv"
    trace.write_text("arrival_s,model\n0.0,m-000\n0.5,m-001\n1.0,m-000\n")
    d = mme(2, init=2.0, mean=1.0, duration=20.0, warmup=0.0, instance_concurrency=1,
            traffic={"process": "trace", "path": str(trace)})
    d["models"][0]["traffic"].pop("popularity", None)
    res = sim.run(parse_scenario(d, source="t", base_dir=tmp_path))
    r = res.requests.sort_values("arrival_s")
    # m-000 loads 0-2 and serves its first request 2-3; m-001's load (asked at 0.5) is older
    # than m-000's second request (1.0): it loads 3-5, serves 5-6; then m-000's second 6-7.
    assert r["end_s"].round(3).tolist() == [3.0, 6.0, 7.0]      # (+ microseconds of transfer)
    assert r["cold"].tolist() == [True, True, True]              # the third came during the load
    # no cap: loads and requests run side by side (two loads at once, default max_concurrent_loads)
    d2 = mme(2, init=2.0, mean=1.0, duration=20.0, warmup=0.0, traffic={"process": "trace", "path": str(trace)})
    d2["models"][0]["traffic"].pop("popularity", None)
    r2 = sim.run(parse_scenario(d2, source="t", base_dir=tmp_path)).requests.sort_values("arrival_s")
    assert r2["end_s"].round(3).tolist() == [3.0, 3.5, 3.0]


def test_instance_concurrency_is_for_mme_only():
    d = mme(2)
    d["endpoints"][0].update(mode="sme", models=["m-000"], instance_concurrency=1)
    d["endpoints"][0].pop("cache")
    with pytest.raises(sim.ScenarioError, match="instance_concurrency applies to mode 'mme'"):
        parse_scenario(d, source="t")
