"""Least outstanding requests at a fleet's scale: sim.routing.LoadList chooses exactly as the scan does.

Two layers: the data structure against the scan under random appends, removals, count changes and
draws (Hypothesis, derandomized); and whole simulations (SME autoscaled with failures and a queue
limit, IC with many copies autoscaled) giving identical request tables with the index forced on and
forced off."""
from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import sme
from sim import routing
from sim.metrics import finalize_status, requests_frame
from sim.scenario import parse_scenario
from sim.simulate import simulate


class Cand:
    __slots__ = ("n", "name")

    def __init__(self, name: int):
        self.n = 0
        self.name = name


ops = st.lists(st.tuples(st.sampled_from(["add", "remove", "inc", "dec", "drop", "choose"]),
                         st.integers(0, 10_000), st.floats(0.0, 1.0, exclude_max=True)),
               min_size=1, max_size=300)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ops)
def test_load_list_chooses_as_the_scan(seq):
    T = routing.tracked(Cand)
    indexed = routing.LoadList()
    plain: list = []
    made = 0
    for op, k, u in seq:
        if op == "add" or not plain:
            x = T(made)
            made += 1
            x.n = k % 4          # a count before it joins (an instance that was draining does not come back)
            indexed.append(x)
            plain.append(x)
        elif op == "remove":
            x = plain[k % len(plain)]
            indexed.remove(x)
            plain.remove(x)
            x.n += 1             # changes outside the list are not the list's business
        elif op == "inc":
            plain[k % len(plain)].n += 1 + k % 3
        elif op == "dec":
            x = plain[k % len(plain)]
            x.n -= min(x.n, 1 + k % 3)
        elif op == "drop":       # requests that gave up, dropped at once: several at a time
            x = plain[k % len(plain)]
            x.n = 0
        else:
            assert indexed.least(u) is routing.least_outstanding(plain, u, 0.0, None)
            assert routing.least_outstanding(indexed, u, 0.0, None) is routing.least_outstanding(plain, u, 0.0,
                                                                                                  None)
        assert list(indexed) == plain


def test_load_list_refuses_changes_that_would_reorder_it():
    lst = routing.LoadList()
    lst.append(routing.tracked(Cand)(0))
    with pytest.raises(TypeError, match="append and remove only"):
        lst.insert(0, routing.tracked(Cand)(1))


def _requests(d: dict, index_from: int, monkeypatch) -> tuple:
    """The request table of ``d`` with the index from ``index_from`` candidates, and how many choices it made."""
    monkeypatch.setattr(routing, "INDEX_FROM", index_from)
    calls = [0]
    least = routing.LoadList.least

    def counted(self, u1):
        calls[0] += 1
        return least(self, u1)

    monkeypatch.setattr(routing.LoadList, "least", counted)
    raw = simulate(parse_scenario(copy.deepcopy(d), source="test"))
    finalize_status(raw)
    monkeypatch.setattr(routing.LoadList, "least", least)
    return requests_frame(raw), calls[0]


def _sme_fleet() -> dict:
    # 40 to 60 instances under target tracking, two slots each, a queue limit, random failures: every path
    # that changes an instance's count (start, queue, drop, failure, drain) and the fleet (scale out and in).
    d = sme(rate=600.0, mean=0.1, instances={"initial": 40, "min": 40, "max": 60}, max_concurrency=2,
            duration=900.0, warmup=60.0, seed=7, routing="least_outstanding_requests",
            traffic={"process": "diurnal", "rate": 600.0, "peak_to_trough": 3.0, "period": "10m"})
    d["endpoints"][0].update(provisioning="30s", queue_limit=3, timeout="2s",
                             autoscaling={"metric": "invocations_per_instance", "target": 700,
                                          "scale_in_cooldown": "1m", "scale_out_cooldown": "30s"},
                             failures={"mtbf": "2h", "in_flight": "retry"})
    return d


def _ic_fleet() -> dict:
    # One component with up to 40 copies of one GPU each, autoscaled, on 8-GPU instances.
    t8 = {"name": "test.ic8", "gpus": 8, "gpu_memory_gb": 40, "vcpus": 96, "memory_gb": 1152,
          "price_per_hour": 8.0, "storage": "nvme", "storage_gb": 8000, "disk_read_gbs": 2.0, "network_gbps": 8.0}
    comp = {"model": "m", "accelerators": 1, "copies": {"initial": 24, "min": 16, "max": 40},
            "autoscaling": {"metric": "concurrent_requests_per_copy", "target": 0.8}}
    return {"name": "ic-lor", "seed": 3, "duration": 900.0, "warmup": 60.0, "instance_types": [t8],
            "models": [{"name": "m", "size_gb": 1, "service": {"dist": "lognormal", "mean": 0.2, "cv": 1.5},
                        "traffic": {"process": "poisson", "rate": 90.0}}],
            "endpoints": [{"name": "ic", "mode": "ic", "instance_type": "test.ic8", "components": [comp],
                           "routing": "least_outstanding_requests", "max_concurrency": 1,
                           "instances": {"min": 3, "max": 6}}]}


@pytest.mark.parametrize("make", [_sme_fleet, _ic_fleet], ids=["sme", "ic"])
def test_simulation_is_identical_with_and_without_the_index(make, monkeypatch):
    d = make()
    on, indexed = _requests(d, 1, monkeypatch)
    off, scanned = _requests(d, 10**9, monkeypatch)
    assert len(on) > 10_000
    assert indexed > 0.9 * len(on) and scanned == 0   # the index chose in one run, the scan in the other
    assert on.equals(off)
    statuses = set(on["status"].astype(str))
    assert "ok" in statuses
    if make is _sme_fleet:   # the fleet changed and the paths that drop requests ran
        assert on["instance"].nunique() > 40 and statuses & {"throttled", "timeout"}
