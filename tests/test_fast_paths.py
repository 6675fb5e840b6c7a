"""The fast paths of a fleet's scale give what the plain ones give, to the bit: the run's loop (arrivals
merged from the table) against SimPy's own loop with the arrivals on its heap, the per-minute counts
against np.histogram, the P99 per minute against a full sort, the token figures without a language
model. Deterministic (fixed seeds); every comparison is exact."""
from __future__ import annotations

from heapq import heappush

import numpy as np
import pandas as pd
import pytest
from simpy.core import NORMAL

import sim.simulate as simulate_mod
from conftest import sme
from sim.core.engine import Call, Engine
from sim.metrics import _bin_counts, token_times
from sim.report.plots import p99_per_minute
from sim.scenario import parse_scenario


class HeapEngine(Engine):
    """The engine as it ran before: each open-loop arrival an entry on SimPy's heap (one cursor entry
    rescheduled at each), run by SimPy's ``Environment.run`` (in slices with ``progress``)."""

    def run(self, horizon, progress=None, steps=100):
        self.horizon = horizon
        r, env = self.requests, self.env
        self._call = Call([self._heap_arrival])
        if r.n_open:
            heappush(env._queue, (r.arrival[0], NORMAL, next(env._eid), self._call))
        if progress is None:
            env.run(until=horizon)
            return
        for k in range(1, steps + 1):
            t = horizon if k == steps else horizon * k / steps
            if t > env.now:
                env.run(until=t)
            progress(k / steps)

    def _heap_arrival(self, call):
        r, env = self.requests, self.env
        i = self._cursor
        self.arrive_of_model[r.model[i]](i)
        i += 1
        self._cursor = i
        if i < r.n_open:
            call.callbacks = [self._heap_arrival]
            heappush(env._queue, (r.arrival[i], NORMAL, next(env._eid), call))


def tied_scenario(tmp_path, routing="least_outstanding_requests"):
    """Arrivals on whole seconds (several at once) and services of whole seconds: arrivals tie with
    completions and with the autoscaler's evaluations, and least outstanding requests routes by the
    counts left by whichever came first."""
    rng = np.random.default_rng(3)
    times = np.sort(rng.integers(0, 1800, 6000)).astype(float)
    p = tmp_path / "arrivals.csv"
    pd.DataFrame({"arrival_s": times}).to_csv(p, index=False)
    d = sme(dist="deterministic", mean=1.0, max_concurrency=1, instances={"initial": 2, "min": 1, "max": 5},
            routing=routing, duration=1800, traffic={"process": "trace", "path": str(p), "format": "csv"})
    d["endpoints"][0]["timeout"] = 20
    d["endpoints"][0]["autoscaling"] = {"metric": "invocations_per_instance", "target": 60,
                                        "scale_out_cooldown": 60, "scale_in_cooldown": 60}
    return parse_scenario(d, source="test")


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype.kind == "f":
            assert np.array_equal(x.view(np.int64), y.view(np.int64)), k
        else:
            assert np.array_equal(x, y), k


@pytest.mark.parametrize("progress", [False, True])
def test_run_loop_orders_events_as_simpys_heap(tmp_path, monkeypatch, progress):
    sc = tied_scenario(tmp_path)
    tick = (lambda f: None) if progress else None
    fast = simulate_mod.simulate(sc, progress=tick)
    monkeypatch.setattr(simulate_mod, "Engine", HeapEngine)
    ref = simulate_mod.simulate(sc, progress=tick)
    _same(fast.columns, ref.columns)
    assert [lg.fleet for lg in fast.logs] == [lg.fleet for lg in ref.logs]
    assert [lg.scaling for lg in fast.logs] == [lg.scaling for lg in ref.logs]
    # The ties matter here: a loop that let every arrival go before a completion at the same time
    # would route differently (checked when this test was written).
    assert len(np.unique(fast.columns["instance"])) > 1


def test_bin_counts_are_numpys_histogram():
    rng = np.random.default_rng(7)
    edges = np.append(np.arange(0.0, 600.0, 60.0), 590.5)   # a last bin shorter, as at a horizon
    x = np.concatenate([rng.uniform(-10, 620, 5000), edges, [np.nan, np.inf, -np.inf], np.full(7, 590.5)])
    for v in (x, rng.permutation(x), np.sort(x), np.empty(0), [], [120.0, 590.5]):
        got, want = _bin_counts(v, edges), np.histogram(v, bins=edges)[0]
        assert got.dtype == want.dtype and np.array_equal(got, want)


def test_p99_per_minute_is_a_full_sorts():
    rng = np.random.default_rng(11)
    n = 50_000
    arrival = np.sort(rng.uniform(0, 1800, n))
    lat = rng.lognormal(3, 1, n)
    lat[::97] = lat[3]                          # ties among the latencies
    group = rng.integers(0, 4, n)
    for q in (0.5, 0.99, 1.0):
        g, m, v = p99_per_minute(arrival, lat, group, q)
        # reference: every group sorted (the lexsort the function used before)
        minute = (arrival // 60.0).astype(np.int64)
        key = group * (int(minute.max()) + 1) + minute
        order = np.lexsort((lat, key))
        k, s = key[order], lat[order]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        counts = np.diff(np.r_[starts, len(k)])
        pos = starts + q * (counts - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, starts + counts - 1)
        want = s[lo] + (pos - lo) * (s[hi] - s[lo])
        assert np.array_equal(v, want)
        assert np.array_equal(g, group[order[starts]]) and np.array_equal(m, minute[order[starts]])


def test_token_times_without_a_language_model_are_the_formulas():
    n = 1000
    rng = np.random.default_rng(5)
    c = {"first_token": np.full(n, np.nan), "arrival": rng.uniform(0, 100, n),
         "served_end": rng.uniform(100, 200, n), "output_tokens": rng.integers(0, 5, n),
         "status": rng.integers(0, 6, n).astype(np.int8)}
    ttft, tpot = token_times(c)
    want_ttft = (c["first_token"] - c["arrival"]) * 1e3
    out = c["output_tokens"].astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        want_tpot = np.where(out > 1, (c["served_end"] - c["first_token"]) * 1e3 / (out - 1), np.nan)
    assert np.array_equal(ttft.view(np.int64), want_ttft.view(np.int64))
    assert np.array_equal(tpot.view(np.int64), want_tpot.view(np.int64))
