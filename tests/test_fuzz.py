"""Random-scenario fuzz over the whole schema (Hypothesis).

Valid scenarios (the shipped scenarios/*.yaml and the tests' dict scenarios) are mutated toward edge
values: 0, negative, huge, inf, nan, empty, wrong types, long strings, a key dropped. Every outcome is
either a clean error (a ScenarioError: one line naming the file) or, when the scenario is small enough to
run here, a run whose invariants hold: no negative or NaN latency, and completed + failed + in_flight
== requests. Derandomized with a bounded number of examples, so CI is stable and the file stays under a
minute.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import sim
from conftest import sme
from sim.scenario import ScenarioError, parse_scenario
from sim.scenario.loader import read_yaml

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "scenarios"


def _shipped() -> list[tuple[str, dict]]:
    out = []
    for p in sorted(SCENARIOS.glob("*.yaml")):
        try:
            data = read_yaml(p)
            parse_scenario(copy.deepcopy(data), source=str(p), base_dir=SCENARIOS)
        except ScenarioError:
            continue   # not a scenario (salesforce_plans.yaml holds plans)
        out.append((p.name, data))
    return out


def _dicts() -> list[tuple[str, dict]]:
    mme = sme(duration=60)
    mme["endpoints"][0].update(mode="mme", models=["m-*"])
    mme["models"][0].update(name="m-{i}", count=3, traffic={"process": "poisson", "rate": 5,
                                                            "popularity": {"zipf": 1.0}})
    tok = sme(duration=60)
    tok["models"][0]["service"] = {"base": "5ms", "per_input_token": "0.01ms", "per_output_token": "1ms",
                                   "cv": 0.2, "batching": {"slowdown": {2: 1.4, 4: 2.2}}}
    tok["models"][0]["tokens"] = {"input": {"dist": "lognormal", "mean": 100, "cv": 0.5}, "output": 20}
    scaled = sme(duration=120, instances={"initial": 1, "min": 1, "max": 3})
    scaled["endpoints"][0]["autoscaling"] = {"metric": "invocations_per_instance", "target": 30, "period": "10s"}
    scaled["endpoints"][0]["failures"] = {"mtbf": "1m", "events": [{"at": "30s", "instance": 0}]}
    return [("sme", sme(duration=60)), ("gamma", sme(duration=60, traffic={"process": "gamma", "rate": 5, "cv": 2})),
            ("closed", sme(duration=60, traffic={"process": "closed", "users": 3, "think_time": "100ms"})),
            ("mme", mme), ("tokens", tok), ("scaled", scaled)]


SEEDS = _shipped() + _dicts()

EDGES = [0, -1, -1e300, 1e300, 2 ** 63, 10 ** 400, 1e-300, math.inf, -math.inf, math.nan, "", [], {}, None, True,
         "x" * 5000, "1e-300s", "-5/s", ".inf", "{i.x}", [0], {"a": 1}, 0.5, 1, 3, "1ms", "0s", "9" * 400,
         "ml.g5.xlarge", "gamma", "mme",
         # edges a scenario may well hold: the runs that follow check the invariants
         0.001, 2, 10, 100, 1e4, "5ms", "2m", "100/s", "0.1GB"]
DROP = object()


def _paths(node, prefix=()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(d, path):
    for k in path:
        d = d[k]
    return d


def _mutate(data: dict, picks: list[tuple[int, object]]) -> dict:
    d = copy.deepcopy(data)
    for where, value in picks:
        paths = _paths(d)
        if not isinstance(value, (dict, list)) and value is not DROP:   # a scalar replaces a scalar
            leaves = [p for p in paths if not isinstance(_get(d, p), (dict, list))]
            paths = leaves or paths
        if not paths:
            break
        path = paths[where % len(paths)]
        node = d
        for k in path[:-1]:
            node = node[k]
        if value is DROP:
            del node[path[-1]]
        else:
            node[path[-1]] = copy.deepcopy(value)
    return d


def _small(sc) -> bool:
    """Whether the scenario runs in well under a second here: a short horizon and few requests."""
    if sc.horizon > 1800:
        return False
    for g in sc.groups:
        tr = g.traffic
        if tr is None:
            continue
        if tr.process == "trace":
            return False
        if tr.process == "closed":
            if tr.users > 20:
                return False
            continue
        peak = max(tr.rate or 0.0, tr.rate_off or 0.0) * (tr.peak_to_trough if tr.process == "diurnal" else 1)
        if peak * sc.horizon > 3000:
            return False
    return sum(ep.instances.hi for ep in sc.endpoints) <= 20 and len(sc.models) <= 50


def _shorten(data: dict) -> dict:
    """The seed with a short horizon, so that most mutants can run."""
    d = copy.deepcopy(data)
    d["duration"], d["warmup"], d["replications"] = 120, 0, 1
    return d


mutations = st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(EDGES + [DROP])), min_size=1, max_size=2)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, len(SEEDS) - 1), picks=mutations)
def test_mutated_scenarios_fail_cleanly_or_run_with_invariants(seed, picks):
    name, data = SEEDS[seed]
    source = f"fuzz/{name}"
    d = _mutate(_shorten(data), picks)
    try:
        sc = parse_scenario(d, source=source, base_dir=SCENARIOS)
        from sim.workload.build import check_traces

        check_traces(sc)
    except ScenarioError as e:
        text = str(e)
        event("refused")
        assert text.startswith(source + ": ") and "\n" not in text and len(text) < 4000, text
        return
    if not _small(sc):
        event("valid, too large to run here")
        return
    event("ran")
    try:
        res = sim.run(sc, seed=1)
    except ScenarioError as e:   # a problem only a run finds is still one clean paragraph
        assert str(e).startswith(source + ": ") and "\n" not in str(e), str(e)
        return
    s = res.summary["overall"]
    adds_up = lambda m: m["completed"] + m["failed"] + m["in_flight"] == pytest.approx(m["requests"], abs=0.03)
    assert adds_up(s), s   # with replications, means rounded to 2 decimals
    r = res.requests
    for ep, e in res.summary["endpoints"].items():
        assert adds_up(e), (ep, e)
    assert len(r) >= s["requests"]   # the frame holds the warmup's requests too
    done = r["status"] != "in_flight"
    lat = r.loc[done & (r["status"] == "ok"), "latency_ms"].to_numpy(dtype=float)
    assert np.isfinite(lat).all() and (lat >= 0).all(), lat[~(np.isfinite(lat) & (lat >= 0))][:5]
    svc = r.loc[r["status"] == "ok", "service_ms"].to_numpy(dtype=float)
    assert np.isfinite(svc).all() and (svc >= 0).all()
    for k in ("p50_ms", "p99_ms", "mean_ms"):
        assert s[k] is None or not np.isfinite(s[k]) and s["completed"] == 0 or s[k] >= 0, (k, s[k])
