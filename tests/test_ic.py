"""Inference components: placement against bounds, exclusive GPUs and loads,
copy autoscaling, managed instance scaling, scale to zero, hybrid fleets, and
Salesforce's case (the cost ratio of ICs against single-model endpoints)."""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim
from sim.core.engine import IN_FLIGHT, NO_CAPACITY, OK, THROTTLED, TIMEOUT
from sim.hosting import placement
from sim.hosting.ic import PACKING
from sim.metrics import finalize_status, requests_frame, summarize, timeline
from sim.scenario import parse_scenario
from sim.scenario.schema import EndpointSpec
from sim.simulate import simulate

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"

# An 8-GPU type shaped like ml.p4d.24xlarge (8 x 40 GB, 96 vCPUs, 1152 GB), with a round price and slow,
# round load links: download 1 GB/s (8 Gbit/s), disk 2 GB/s, host->GPU 25 GB/s (no catalog GPU: the default).
T8 = {"name": "test.ic8", "gpus": 8, "gpu_memory_gb": 40, "vcpus": 96, "memory_gb": 1152, "price_per_hour": 8.0,
      "storage": "nvme", "storage_gb": 8000, "disk_read_gbs": 2.0, "network_gbps": 8.0}
T4 = {"name": "test.ic4", "gpus": 4, "gpu_memory_gb": 24, "vcpus": 48, "memory_gb": 192, "price_per_hour": 4.0,
      "storage": "nvme", "storage_gb": 1000, "disk_read_gbs": 2.0, "network_gbps": 16.0}
STAGES_10GB_T8 = 10 / 1.0 + 10 / 2.0 + 10 / 25.0   # download + disk read + host->GPU of a 10 GB artifact


class Run:
    """One simulated run, with the raw logs and the frames of the public API."""

    def __init__(self, d: dict):
        self.raw = simulate(parse_scenario(copy.deepcopy(d), source="test"))
        finalize_status(self.raw)
        self.summary = summarize(self.raw)
        self.requests = requests_frame(self.raw)
        self.timeline = timeline(self.raw)

    @property
    def log(self):
        return self.raw.logs[0]


def trace(tmp_path, name: str, times) -> dict:
    p = tmp_path / f"{name}.csv"
    pd.DataFrame({"arrival_s": np.asarray(times, dtype=float)}).to_csv(p, index=False)
    return {"process": "trace", "path": str(p), "format": "csv"}


def scenario(models: list[dict], components: list[dict], *, itype=T8, duration=3600.0, warmup=0.0, seed=1,
             **ep) -> dict:
    e = {"name": "ic", "mode": "ic", "instance_type": itype["name"], "components": components}
    e.update(ep)
    return {"name": "ic-test", "seed": seed, "duration": duration, "warmup": warmup, "instance_types": [itype],
            "models": models, "endpoints": [e]}


# -- placement -------------------------------------------------------------------------------
def test_placement_registry_matches_the_schema():
    assert set(placement.PLACEMENT) == set(get_args(EndpointSpec.model_fields["placement"].annotation))


def first_fit_decreasing(needs, cap):
    bins: list[list[float]] = []
    for k in placement.order(needs, list(range(len(needs))), cap):
        for f in bins:
            if placement.fits(f, needs[k]):
                break
        else:
            f = list(cap)
            bins.append(f)
        for d in range(3):
            f[d] -= needs[k][d]
    return len(bins)


P4D = (8, 1152.0, 96.0)
component_sets = st.lists(st.tuples(
    st.integers(1, 8),                                  # accelerators per copy
    st.floats(0.128, 700.0),                            # host memory GB per copy
    st.sampled_from([0.25, 1.0, 4.0, 8.0, 12.0, 24.0, 48.0]),  # vCPUs per copy
    st.integers(1, 5)),                                 # copies
    min_size=1, max_size=6)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(component_sets)
def test_binpack_packs_no_worse_than_spread_ffd_or_the_optimum_plus_one(comps):
    needs = [(g, m, c) for g, m, c, n in comps for _ in range(n)]
    owners = [k for k, (_, _, _, n) in enumerate(comps) for _ in range(n)]
    packs = {s: placement.pack(needs, P4D, s, owners) for s in placement.PLACEMENT}
    for bins, left in packs.values():
        assert not left
        assert sorted(k for b in bins for k in b.items) == list(range(len(needs)))   # each copy once
        for b in bins:
            assert min(b.free[0], b.free[1] + 1e-9, b.free[2] + 1e-9) >= 0         # nothing over-reserved
    used = len(packs["binpack"][0])
    assert used <= len(packs["spread"][0])
    assert used <= first_fit_decreasing(needs, P4D)
    assert used >= placement.lower_bound(needs, P4D)
    if len(needs) <= 8:
        assert used <= placement.optimum(needs, P4D) + 1


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 6)), min_size=1, max_size=6))
def test_binpack_meets_the_lower_bound_when_gpus_are_all_that_count(comps):
    # Power-of-two GPU counts divide an 8-GPU instance: first-fit-decreasing is optimal there, and
    # the optimum is the GPU lower bound. With other counts binpack stays within one of the optimum.
    needs = [(g, 1.0, 1.0) for g, n in comps for _ in range(n)]
    used = len(placement.pack(needs, P4D, "binpack")[0])
    lb = placement.lower_bound(needs, P4D)
    if all(g in (1, 2, 4, 8) for g, _ in comps):
        assert used == lb
    if len(needs) <= 8:
        assert used <= placement.optimum(needs, P4D) + 1


def test_spread_balances_and_binpack_fills():
    needs = [(1, 10.0, 1.0)] * 4
    binpack, _ = placement.pack(needs, (4, 100.0, 10.0), "binpack", [0] * 4, bins=[(4, 100.0, 10.0)] * 2)
    spread, _ = placement.pack(needs, (4, 100.0, 10.0), "spread", [0] * 4, bins=[(4, 100.0, 10.0)] * 2)
    assert [len(b.items) for b in binpack] == [4, 0]
    assert [len(b.items) for b in spread] == [2, 2]


# -- invariants of a run, on random component sets --------------------------------------------
def check_invariants(run: Run) -> None:
    sc = run.raw.scenario
    ep = sc.endpoints[0]
    it = ep.instance_type
    comps = ep.components
    log = run.log
    horizon = sc.horizon
    recs = log.copy_records
    # No GPU is ever given to two copies at once.
    held: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for c in recs:
        for g in c.gpus:
            held.setdefault((c.instance, g), []).append((c.placed, c.released if c.released >= 0 else horizon))
    for spans in held.values():
        spans.sort()
        for (a0, a1), (b0, b1) in zip(spans, spans[1:]):
            assert b0 >= a1 - 1e-9
    # What copies reserve never exceeds the instance: GPUs, host memory, vCPUs, GPU memory.
    cap = (it.gpus, it.memory_gb, it.vcpus)
    for inst in {c.instance for c in recs}:
        events = []
        for c in (c for c in recs if c.instance == inst):
            comp = comps[c.comp]
            need = (comp.accelerators, comp.memory_gb, comp.cpus)
            events.append((c.placed, 1, need))
            if c.released >= 0:
                events.append((c.released, 0, need))   # releases first at equal times
        used = [0.0, 0.0, 0.0]
        for _, kind, need in sorted(events, key=lambda x: (x[0], x[1])):
            for d in range(3):
                used[d] += need[d] if kind else -need[d]
                assert used[d] <= cap[d] + 1e-6
    for gpu_mem, host, _, _ in log.peaks.values():
        assert gpu_mem <= it.total_gpu_memory_gb + 1e-9 and host <= it.memory_gb + 1e-9
    # A copy serves nothing before its load ends, nor after it is released.
    c = run.raw.columns
    started = np.flatnonzero(np.isfinite(c["start"]))
    by_place: dict[tuple[int, int], list] = {}
    for r in recs:
        by_place.setdefault((r.instance, r.model), []).append(r)
    for i in started:
        cands = by_place[(int(c["instance"][i]), int(c["model"][i]))]
        s = c["start"][i]
        assert any(0 <= r.ready <= s + 1e-9 and (r.released < 0 or s <= r.released + 1e-9) for r in cands)
    assert set(np.unique(c["status"])) <= {IN_FLIGHT, OK, TIMEOUT, THROTTLED, NO_CAPACITY}
    # Billing: from the request of an instance to its release, never less than those in service.
    fleet = np.array(log.fleet)
    assert (fleet[:, 2] >= fleet[:, 1]).all() and (fleet[:, 1] <= ep.instances.hi).all()
    blk = run.summary["endpoints"][ep.name]
    assert blk["cost_usd"] == pytest.approx(blk["instance_hours"] * it.price_per_hour)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({
    "comps": st.lists(st.tuples(st.integers(1, 4), st.floats(1.0, 300.0), st.sampled_from([1.0, 8.0, 24.0]),
                                st.integers(0, 2), st.sampled_from([0.003, 0.3, 1.0, 3.0])), min_size=1, max_size=4),
    "placement": st.sampled_from(["binpack", "spread"]),
    "policy": st.sampled_from(["idle_release", "consolidation"]),
    "routing": st.sampled_from(["random", "least_outstanding_requests", "round_robin", "power_of_two"]),
    "metric": st.sampled_from(["invocations_per_copy", "concurrent_requests_per_copy"]),
    "max_instances": st.integers(1, 4), "seed": st.integers(0, 10**6)}))
def test_invariants_hold_on_random_component_sets(p):
    # Each model's traffic swings 8:1 over a 20-minute cycle: copies scale out and in, instances come
    # and go, consolidation repacks, idle components drop to zero copies and wake up.
    models, comps = [], []
    for k, (acc, mem, cpus, lo, rate) in enumerate(p["comps"]):
        models.append({"name": f"m{k}", "size_gb": 2.0, "memory_gb": 10.0 * acc, "init_time": 5,
                       "service": {"dist": "exponential", "mean": 0.5},
                       "traffic": {"process": "diurnal", "rate": rate, "peak_to_trough": 8, "period": "20m"}})
        target = 20.0 if p["metric"] == "invocations_per_copy" else 0.3
        comps.append({"model": f"m{k}", "accelerators": acc, "memory_gb": mem, "cpus": cpus,
                      "copies": {"initial": max(lo, 1), "min": lo, "max": 6},
                      "autoscaling": {"metric": p["metric"], "target": target, "scale_in_cooldown": "1m",
                                      "scale_out_cooldown": "1m"}})
    d = scenario(models, comps, duration=3600.0, seed=p["seed"], placement=p["placement"], routing=p["routing"],
                 scale_in_policy=p["policy"], scale_in_cooldown="2m", provisioning="60s", max_concurrency=2,
                 instances={"min": 0, "max": p["max_instances"]})
    try:
        run = Run(d)
    except sim.ScenarioError as e:    # initial copies that need more instances than max
        assert "need" in str(e) and "instances.max" in str(e)
        return
    check_invariants(run)


# -- Eight large models: one instance of ICs against eight SMEs ---------------------------------------
def eight_models(mode: str) -> dict:
    models = [{"name": "big-{i}", "count": 8, "size_gb": 30, "memory_gb": 30, "init_time": 30,
               "service": {"dist": "lognormal", "mean": 2.0, "cv": 0.5},
               "traffic": {"process": "poisson", "rate": 0.8}}]    # the group: 0.1/s per model, low traffic
    if mode == "ic":
        ep = {"name": "ic", "mode": "ic", "instance_type": "ml.p4d.24xlarge", "max_concurrency": 4,
              "routing": "least_outstanding_requests",
              "components": [{"model": "big-*", "accelerators": 1, "cpus": 8}]}
    else:
        ep = {"name": "sme", "mode": "sme", "instance_type": "ml.p4d.24xlarge", "instances": 1, "max_concurrency": 4,
              "routing": "least_outstanding_requests", "models": ["big-*"]}
    return {"name": f"eight-{mode}", "seed": 5, "duration": 6 * 3600, "warmup": 600, "models": models,
            "endpoints": [ep]}


def test_eight_30gb_models_cost_8x_less_as_ics_on_one_p4d():
    ic, sme = Run(eight_models("ic")), Run(eight_models("sme"))
    a, b = ic.summary["overall"], sme.summary["overall"]
    assert len(sme.summary["endpoints"]) == 8 and len(ic.summary["endpoints"]) == 1
    assert ic.summary["endpoints"]["ic"]["instances_max"] == 1      # all eight copies on one instance
    assert b["cost_usd"] / a["cost_usd"] == pytest.approx(8.0, rel=1e-12)
    assert a["requests"] == b["requests"] > 10_000                    # the same arrivals (common random numbers)
    assert a["failed"] == b["failed"] == 0
    assert a["p99_ms"] == pytest.approx(b["p99_ms"], rel=0.05)
    blk = ic.log.summary_block(600, 6 * 3600 + 600)
    assert blk["gpus_reserved_mean"] == 8 and blk["gpus_stranded_mean"] == 0
    assert blk["gpu_memory_stranded_gb_mean"] == pytest.approx(8 * (40 - 30))
    print(f"\neight 30 GB models: SME/IC cost {b['cost_usd'] / a['cost_usd']:.2f}x; "
          f"P99 {b['p99_ms']:.0f} ms (SME) vs {a['p99_ms']:.0f} ms (IC)")


# -- scale to zero --------------------------------------------------------------------------------
def test_scale_to_zero_and_back(tmp_path):
    early = np.arange(60.0, 300.0, 20.0)
    late = np.arange(3640.0, 4800.0, 5.0)
    model = {"name": "m", "size_gb": 10, "memory_gb": 12, "init_time": 5,
             "service": {"dist": "deterministic", "mean": 0.5},
             "traffic": trace(tmp_path, "m", np.concatenate([early, [3630.0], late]))}
    comp = {"model": "m", "copies": {"initial": 1, "min": 0, "max": 2},
            "autoscaling": {"metric": "invocations_per_copy", "target": 5, "scale_in_cooldown": "5m"}}
    run = Run(scenario([model], [comp], duration=5400.0, instances={"min": 0, "max": 1},
                       provisioning="4m", scale_in_cooldown="10m"))
    log = run.log
    # Idle: 15 datapoints below 90% of the target, then zero copies; the instance goes 10 min later.
    down = [d for d in log.decisions if d[4] == 0]
    assert down and down[0][0] == pytest.approx(900.0)
    release = [e for e in log.instance_events if e[2] == "release"]
    assert release[0][0] == pytest.approx(900.0 + 600.0)
    # The next request fails as no_capacity; the alarm (1-min period) asks for a copy, the copy for an
    # instance (4 min), then it loads: download, disk read, host->GPU and init.
    wake = [d for d in log.decisions if d[2] == "scale_from_zero"]
    assert wake[0][0] == pytest.approx(3660.0) and wake[0][3:5] == (0, 1)
    assert [e for e in log.instance_events if e[0] > 2000] == [(3660.0, 1, "request"), (3900.0, 1, "up")]
    ready = 3900.0 + STAGES_10GB_T8 + 5.0
    woke = [c for c in log.copy_records if c.placed > 3000]
    assert woke[0].placed == 3900.0 and woke[0].ready == pytest.approx(ready)
    r = run.requests
    assert (r.loc[r["arrival_s"] < 3000, "status"] == "ok").all()
    gap = (r["arrival_s"] >= 3600) & (r["arrival_s"] < ready)
    assert gap.sum() > 30 and (r.loc[gap, "status"] == "no_capacity").all()
    assert (r.loc[r["arrival_s"] >= ready, "status"] == "ok").all()
    assert run.summary["overall"]["failed"] == gap.sum()
    # The timeline shows it: no copy and no instance, and no cost, while idle.
    tl = run.timeline.set_index("t_s")
    idle = tl.loc[1560:3599]
    assert (idle["instances"] == 0).all() and (idle["copies"] == 0).all() and (idle["cost_usd"] == 0).all()
    assert tl.loc[600, "copies"] == 1 and tl.loc[4200, "instances"] == 1
    assert tl.loc[4200, "copies"] == 2      # 12 requests a minute against a target of 5 per copy: max 2
    blk = run.summary["endpoints"]["ic"]
    assert blk["instance_hours"] == pytest.approx((1500.0 + 5400.0 - 3660.0) / 3600.0)


# -- managed instance scaling ------------------------------------------------------------------------
def test_a_copy_that_does_not_fit_adds_an_instance(tmp_path):
    # 4-GPU instances, one component of 1-GPU copies: a surge asks for 6 copies; 2 do not fit.
    times = np.concatenate([np.arange(0.0, 600.0, 2.0), np.arange(600.0, 1800.0, 0.125)])
    model = {"name": "m", "size_gb": 10, "memory_gb": 12, "init_time": 5,
             "service": {"dist": "deterministic", "mean": 1.0}, "traffic": trace(tmp_path, "m", times)}
    comp = {"model": "m", "copies": {"initial": 4, "min": 4, "max": 6}, "cpus": 4,
            "autoscaling": {"metric": "concurrent_requests_per_copy", "target": 1.5}}
    itype = dict(T4, network_gbps=8.0)
    run = Run(scenario([model], [comp], itype=itype, duration=2400.0, max_concurrency=2,
                       instances={"min": 1, "max": 2}, provisioning="3m"))
    log = run.log
    out = [d for d in log.decisions if d[4] > d[3]]
    t_out = out[0][0]
    assert out[0][4] == 6 and 600 < t_out < 700
    requests = [e for e in log.instance_events if e[2] != "release"]
    assert requests[:2] == [(t_out, 1, "request"), (t_out + 180.0, 1, "up")]
    new = [c for c in log.copy_records if c.instance == 1]
    assert len(new) == 2 and all(c.placed == t_out + 180.0 for c in new)
    # the two copies load side by side: each stage's link is shared
    assert all(c.ready == pytest.approx(c.placed + 2 * STAGES_10GB_T8 + 5.0) for c in new)
    r = run.requests
    on_new = r[r["instance"] == 1]
    assert len(on_new) > 100 and on_new["start_s"].min() >= new[0].ready
    assert run.summary["endpoints"]["ic"]["instances_max"] == 2
    check_invariants(run)


def consolidation_scenario(tmp_path, policy: str) -> dict:
    # Instance 0: two 2-GPU copies of a; instance 1: two copies of b and one of c (1 GPU each).
    # When the load drops a and b go down to one copy each: a on instance 0, b and c on instance 1,
    # two GPUs free on each: only repacking frees an instance.
    models = [{"name": n, "size_gb": 4, "memory_gb": mem, "accelerators": acc, "init_time": 10,
               "service": {"dist": "deterministic", "mean": 0.5},
               "traffic": trace(tmp_path, n, np.arange(0.0, 1200.0, 2.0))}
              for n, mem, acc in (("a", 30, 2), ("b", 12, 1), ("c", 12, 1))]
    scale = {"metric": "invocations_per_copy", "target": 10}
    comps = [{"model": "a", "memory_gb": 40, "cpus": 8, "copies": {"initial": 2, "min": 1, "max": 2},
              "autoscaling": scale},
             {"model": "b", "memory_gb": 10, "cpus": 2, "copies": {"initial": 2, "min": 1, "max": 2},
              "autoscaling": scale},
             {"model": "c", "memory_gb": 10, "cpus": 2}]
    return scenario(models, comps, itype=T4, duration=4800.0, instances={"initial": 2, "min": 1, "max": 2},
                    scale_in_policy=policy, scale_in_cooldown="10m")


def test_consolidation_frees_an_instance_after_the_load_drops(tmp_path):
    idle = Run(consolidation_scenario(tmp_path, "idle_release"))
    cons = Run(consolidation_scenario(tmp_path, "consolidation"))
    for run in (idle, cons):
        ins = [d for d in run.log.decisions if d[4] < d[3]]
        assert [d[1] for d in ins] == [0, 1] and all(1200 < d[0] < 2400 for d in ins)   # after the load drops
        assert run.summary["overall"]["failed"] == 0
        check_invariants(run)
    assert idle.log.instance_events == [] and idle.summary["endpoints"]["ic"]["instance_hours"] == pytest.approx(
        2 * 4800 / 3600)
    released = [e for e in cons.log.instance_events if e[2] == "release"]
    assert len(released) == 1 and released[0][1] == 1
    moved = [c for c in cons.log.copy_records if c.moved]
    assert sorted(c.model for c in moved) == [1, 2] and all(c.instance == 0 for c in moved)
    # the originals serve until their replacements do; the instance goes when they have left
    assert released[0][0] == pytest.approx(max(c.ready for c in moved))
    assert cons.summary["endpoints"]["ic"]["cost_usd"] < idle.summary["endpoints"]["ic"]["cost_usd"]
    blk = cons.log.summary_block(0, 4800)
    assert blk["copies_moved"] == 2 and blk["instances_released"] == 1


def test_data_cache_skips_the_download_of_an_artifact_already_on_the_instance(tmp_path):
    times = [30.0, 2000.0]
    loads = {}
    for cache in (True, False):
        model = {"name": "m", "size_gb": 10, "memory_gb": 12, "init_time": 5,
                 "service": {"dist": "deterministic", "mean": 0.5}, "traffic": trace(tmp_path, "m", times)}
        comp = {"model": "m", "copies": {"initial": 0, "min": 0, "max": 1},
                "autoscaling": {"metric": "invocations_per_copy", "target": 5, "scale_in_cooldown": "1m"}}
        run = Run(scenario([model], [comp], duration=3600.0, instances=1, data_cache=cache))
        loads[cache] = [v for x in run.log.loads for v in (x.end - x.start, x.download_s)]
        assert (run.requests["status"] == "no_capacity").all()   # a request wakes a copy, it does not wait
    assert loads[True] == pytest.approx([STAGES_10GB_T8 + 5, 10.0, STAGES_10GB_T8 - 10 + 5, 0.0])
    assert loads[False] == pytest.approx([STAGES_10GB_T8 + 5, 10.0] * 2)


def test_timeout_and_throttling_per_copy(tmp_path):
    model = {"name": "m", "size_gb": 1, "service": {"dist": "deterministic", "mean": 2.0},
             "traffic": trace(tmp_path, "m", [0.0, 0.0, 0.0, 0.5])}
    # One copy, one slot, two places in its queue, a 3 s timeout: the second request starts at 2 s and
    # ends too late, the third is dropped when its turn comes, the fourth finds the queue full.
    run = Run(scenario([model], [{"model": "m"}], duration=60.0, max_concurrency=1, queue_limit=2, timeout=3.0))
    r = run.requests
    assert r["status"].tolist() == ["ok", "timeout", "timeout", "throttled"]
    assert r["latency_ms"].tolist() == pytest.approx([2000.0, 3000.0, 3000.0, 0.0])
    assert run.summary["overall"]["failed"] == 3


def test_routing_is_per_copy(tmp_path):
    # Two copies, least outstanding requests: simultaneous requests alternate between them.
    model = {"name": "m", "size_gb": 1, "service": {"dist": "deterministic", "mean": 1.0},
             "traffic": trace(tmp_path, "m", [0.0] * 4)}
    run = Run(scenario([model], [{"model": "m", "accelerators": 1, "copies": 2}], duration=60.0,
                       routing="least_outstanding_requests", max_concurrency=1, itype=T4, placement="spread",
                       instances=2))
    r = run.requests
    assert sorted(r["instance"].tolist()) == [0, 0, 1, 1]
    assert sorted(r["latency_ms"].tolist()) == pytest.approx([1000.0, 1000.0, 2000.0, 2000.0])


# -- hybrid fleets ------------------------------------------------------------------------------------
def test_hybrid_fleet_reports_each_endpoint_and_the_total():
    models = [
        {"name": "steady", "size_gb": 14, "service": {"mean": "200ms"}, "traffic": {"process": "poisson", "rate": 5}},
        {"name": "tail-{i}", "count": 6, "size_gb": 1, "service": {"mean": "50ms"},
         "traffic": {"process": "poisson", "rate": 3, "popularity": {"zipf": 1.0}}},
        {"name": "big-{i}", "count": 3, "size_gb": 25, "memory_gb": 30, "service": {"mean": "2s"},
         "traffic": {"process": "poisson", "rate": "6/min"}},
    ]
    d = {"name": "hybrid", "seed": 2, "duration": 3600, "warmup": 300, "models": models, "endpoints": [
        {"name": "steady", "mode": "sme", "instance_type": "ml.g5.xlarge", "instances": 1, "max_concurrency": 4,
         "models": ["steady"]},
        {"name": "tail", "mode": "mme", "instance_type": "ml.g5.xlarge", "instances": 1, "max_concurrency": 4,
         "models": ["tail-*"]},
        {"name": "big", "mode": "ic", "instance_type": "ml.p4d.24xlarge", "max_concurrency": 2,
         "components": [{"model": "big-*", "cpus": 4}]}]}
    run = Run(d)
    eps = run.summary["endpoints"]
    assert set(eps) == {"steady", "tail", "big"}
    assert all(e["requests"] > 0 and e["failed"] == 0 for e in eps.values())
    assert run.summary["overall"]["cost_usd"] == pytest.approx(sum(e["cost_usd"] for e in eps.values()))
    assert eps["big"]["instances_max"] == 1
    assert eps["big"]["cost_usd"] == pytest.approx(37.688)
    assert set(run.timeline["endpoint"]) == {"steady", "tail", "big"}


# -- scenario errors ----------------------------------------------------------------------------------
def _bad(**changes) -> dict:
    d = scenario([{"name": "m", "size_gb": 30, "service": {"mean": 1.0}, "traffic": {"process": "poisson", "rate": 1}}],
                 [{"model": "m"}])
    ep = d["endpoints"][0]
    for k, v in changes.items():
        if k.startswith("c_"):
            ep["components"][0][k[2:]] = v
        else:
            ep[k] = v
    return d


@pytest.mark.parametrize("changes,path,fragments", [
    ({"c_accelerators": 0}, "endpoints[0].components[0].accelerators", ["needs at least 1 accelerator"]),
    ({"c_accelerators": 9}, "endpoints[0].components[0].accelerators", ["asks for 9 accelerators", "has 8"]),
    ({"c_memory_gb": "64MB"}, "endpoints[0].components[0].memory_gb", ["at least 128MB"]),
    ({"c_memory_gb": 2000}, "endpoints[0].components[0].memory_gb", ["reserves 2000 GB", "has 1152 GB"]),
    ({"c_cpus": 200}, "endpoints[0].components[0].cpus", ["200 vCPUs", "has 96"]),
    ({"c_cpus": 0.1}, "endpoints[0].components[0].cpus", ["greater than or equal to 0.25"]),
    ({"c_model": "n"}, "endpoints[0].components[0].model", ["no model matches 'n'"]),
    ({"c_autoscaling": {"metric": "invocations_per_instance", "target": 5}, "c_copies": {"min": 1, "max": 3}},
     "endpoints[0].components[0].autoscaling.metric", ["does not apply to an inference component"]),
    ({"c_autoscaling": {"metric": "invocations_per_copy", "target": 5}}, "endpoints[0].components[0].copies",
     ["autoscaling needs room to scale"]),
    ({"c_copies": 9}, "endpoints[0].instances", ["initial copies need 2 instances", "instances.max is 1"]),
    ({"models": ["m"]}, "endpoints[0].models", ["list them as components[].model"]),
    ({"components": []}, "endpoints[0].components", ["needs at least one component"]),
])
def test_ic_errors_name_the_key(changes, path, fragments):
    with pytest.raises(sim.ScenarioError) as err:
        parse_scenario(_bad(**changes), source="s.yaml")
    msg = str(err.value)
    assert f"s.yaml: {path}" in msg
    for f in fragments:
        assert f in msg


def test_a_model_too_large_for_its_accelerators_and_ic_keys_elsewhere():
    d = _bad()
    d["models"][0]["memory_gb"] = 50
    with pytest.raises(sim.ScenarioError, match=r"components\[0\]\.accelerators.*needs 50 GB of GPU memory"):
        parse_scenario(d)
    d["endpoints"][0]["components"][0]["accelerators"] = 2
    parse_scenario(d)
    d = _bad()
    d["endpoints"][0] = {"name": "s", "mode": "sme", "instance_type": "test.ic8", "models": ["m"],
                         "scale_in_policy": "consolidation"}
    with pytest.raises(sim.ScenarioError, match=r"endpoints\[0\]\.scale_in_policy: .*mode 'ic' endpoints only"):
        parse_scenario(d)


# -- Salesforce ---------------------------------------------------------------------------------------
def test_salesforce_inference_components_against_single_model_endpoints():
    ic_file, sme_file = SCENARIOS / "salesforce_ic.yaml", SCENARIOS / "salesforce_sme.yaml"
    # The same fleet and traffic in both files.
    assert yaml.safe_load(ic_file.read_text())["models"] == yaml.safe_load(sme_file.read_text())["models"]
    ic, sme = Run(_loaded(ic_file)), Run(_loaded(sme_file))
    a, b = ic.summary["overall"], sme.summary["overall"]
    ratio = b["cost_usd"] / a["cost_usd"]
    ic_ep = ic.summary["endpoints"]["codegen-ic"]
    # As SMEs each of the 8 models holds a whole ml.p4d.24xlarge; as ICs each copy holds one of its 8
    # GPUs: the ratio is 8 / mean instances. With full-speed slots (before the scenarios' slowdown
    # curves) 8 copies filled one instance at night (8x then) and the noon peak added a second: 4.61x.
    # With the curve (the Forethought post's T4 figure, transferred) the medium models' autoscaling target is 98/min
    # per copy instead of 150 (salesforce_ic.yaml derives it); the night's 1.6 requests/s of
    # codegen-inline (96/min) stay above the scale-in alarm's 90% of 98, so it keeps 2 copies: 9 GPUs,
    # a second instance nearly all day, 4.02x.
    assert len(sme.summary["endpoints"]) == 8
    assert ratio == pytest.approx(8 / ic_ep["instance_hours"] * 24, rel=1e-9)
    assert 4.0 <= ratio <= 8.0
    assert ratio == pytest.approx(4.02, abs=0.1)
    assert ic_ep["instances_max"] == 2
    tl = ic.timeline.set_index("t_s")
    # night (1 with full-speed slots); minute means, two of which read 2 - 1e-5 here
    assert (tl.loc[3600:3 * 3600 - 1, "instances"].round(3) == 2).all()
    assert (tl.loc[11 * 3600:13 * 3600 - 1, "instances"] == 2).all()  # noon
    # Packing: the endpoint never holds a GPU no copy could use (at night 7 of 16 GPUs are free for
    # copies to come: stranded, 0 with full-speed slots).
    assert (tl["gpus_fragmented"] == 0).all()
    # Nothing failed. The P99 is no longer as good as the dedicated endpoints': an IC copy serves ~2.5
    # requests at once where an SME spreads them over 8 GPUs, and under the slowdown curve requests in
    # company run slower (with full-speed slots the two P99s were within 2%: 3,563 vs 3,518 ms). IC P99
    # 1.75x the SMEs' (6,299 vs 3,597 ms), codegen-inline 1.9x, texteval 2.4x; tolerance 15%.
    assert a["requests"] == b["requests"] and a["failed"] == b["failed"] == 0
    assert a["p99_ms"] / b["p99_ms"] == pytest.approx(1.75, rel=0.15)
    for m, x in (("codegen-inline", 1.92), ("texteval", 2.40)):
        assert ic.summary["models"][m]["p99_ms"] / sme.summary["models"][m]["p99_ms"] == pytest.approx(x, rel=0.15)
    print(f"\nSalesforce, one day: SME ${b['cost_usd']:,.0f} vs IC ${a['cost_usd']:,.0f}: {ratio:.2f}x cheaper "
          f"(reported: up to 8x); P99 {b['p99_ms']:.0f} ms (SME) vs {a['p99_ms']:.0f} ms (IC); IC instances "
          f"mean {ic_ep['instances_mean']:.2f}, max {ic_ep['instances_max']}; GPUs stranded "
          f"{ic.log.summary_block(1800, 24 * 3600 + 1800)['gpu_stranded_fraction']:.0%}")


def _loaded(path: Path) -> dict:
    """The scenario file as a dict, traces resolved as the loader would."""
    return yaml.safe_load(path.read_text())


def test_a_component_with_at_most_zero_copies_never_gets_one(tmp_path):
    model = {"name": "m", "size_gb": 10, "memory_gb": 12, "service": {"dist": "deterministic", "mean": 0.5},
             "traffic": trace(tmp_path, "m", np.arange(10.0, 600.0, 5.0))}
    comp = {"model": "m", "copies": {"initial": 0, "min": 0, "max": 0}}
    run = Run(scenario([model], [comp], duration=900.0, instances={"min": 0, "max": 1}, provisioning="1m"))
    assert (run.requests["status"] == "no_capacity").all()
    assert not run.log.decisions                     # no scale-from-zero alarm takes it above its max
