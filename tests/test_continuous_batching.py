"""Continuous batching (sim.hosting.continuous) against a reference that runs one step at a time.

The simulator jumps over runs of decode steps in closed form and lets arrivals join at the next step
boundary; the reference below follows the same rules (DESIGN.md, "Language models") the plain way, one
step after another, with none of the engine's machinery. Both must give every request the same first
token and end, to float precision, whatever the load, the chunking and the preemptions.
"""
from __future__ import annotations

import math
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim
from sim.hosting.steps import StepTime
from sim.scenario import parse_scenario

from conftest import sme


def _scenario(cfg: SimpleNamespace, *, rate: float, tin, tout, duration: float = 60.0, seed: int = 0,
              instances: int = 1):
    d = sme(rate=rate, mean=0.01, duration=duration, instances=instances)
    d["seed"] = seed
    d["models"][0]["tokens"] = {"input": tin, "output": tout}
    d["endpoints"][0]["max_concurrency"] = 100_000   # every request goes to the engine's queue at once
    sc = parse_scenario(d, source="cb-test")
    object.__setattr__(sc.models[0], "llm", cfg)
    return sc


def _cfg(seqs=16, budget=512, block=16, blocks=4000, step=None) -> SimpleNamespace:
    return SimpleNamespace(max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=block, kv_blocks=blocks,
                           step=step or StepTime.linear(0.004, 2e-5, 1e-4, 1e-7))


def reference(arrival, tin, tout, cfg) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """First token and end of each request on one device, one step at a time; and when each preemption
    happened."""
    n = len(arrival)
    first = np.full(n, np.nan)
    end = np.full(n, np.nan)
    bs, total = cfg.block_size, cfg.kv_blocks
    need = lambda tok: -(-tok // bs)  # noqa: E731
    # a sequence: [request, tokens its prefill computes, tokens cached, tokens left, blocks]
    waiting: deque = deque()
    prefill: list = []
    running: list = []
    free = total
    t = 0.0
    k = 0
    preemptions = []
    while k < n or waiting or prefill or running:
        if not (waiting or prefill or running):
            t = max(t, arrival[k])
        while k < n and arrival[k] <= t:
            if need(max(int(tin[k]), 1) + max(int(tout[k]), 1)) > total:
                end[k] = arrival[k]   # longer than the whole cache: refused at once
            else:
                waiting.append([k, max(int(tin[k]), 1), 0, max(int(tout[k]), 1), 0])
            k += 1
        # decode sequences' blocks for this step's token, preempting the most recently admitted
        while True:
            more = sum(1 for s in running if s[2] + 1 > s[4] * bs)
            if more <= free:
                break
            victims = prefill if prefill else running
            v = victims.pop()
            free += v[4]
            if victims is running:
                v[1] = v[2] + 1
            v[2], v[4] = 0, 0
            waiting.appendleft(v)
            preemptions.append(t)
        for s in running:
            if s[2] + 1 > s[4] * bs:
                s[4] += 1
                free -= 1
        budget = cfg.max_num_batched_tokens - len(running)
        chunks = []
        for s in list(prefill):
            if budget <= 0:
                break
            c = min(s[1] - s[2], budget)
            grow = need(s[2] + c) - s[4]
            if grow > free:
                c = min(max(0, (s[4] + free) * bs - s[2]), budget)
                grow = need(s[2] + c) - s[4]
                if c <= 0:
                    continue
            s[4] += max(grow, 0)
            free -= max(grow, 0)
            chunks.append((s, c))
            budget -= c
        while waiting and budget > 0 and len(running) + len(prefill) < cfg.max_num_seqs:
            s = waiting[0]
            c = min(s[1], budget)
            if need(c) > free:
                break
            waiting.popleft()
            s[4] = need(c)
            free -= s[4]
            prefill.append(s)
            chunks.append((s, c))
            budget -= c
        if not chunks and not running:
            if k < n:
                t = arrival[k]
                continue
            break
        kv = sum(s[2] for s in running) + sum(s[2] for s, _ in chunks)
        t += cfg.step.time(len(running), kv, sum(c for _, c in chunks))
        keep = []
        for s in running:
            s[2] += 1
            s[3] -= 1
            if s[3] <= 0:
                end[s[0]] = t
                free += s[4]
            else:
                keep.append(s)
        running = keep
        for s, c in chunks:
            s[2] += c
            if s[2] >= s[1]:
                prefill.remove(s)
                if math.isnan(first[s[0]]):
                    first[s[0]] = t
                s[3] -= 1
                if s[3] <= 0:
                    end[s[0]] = t
                    free += s[4]
                else:
                    running.append(s)
    return first, end, preemptions


def _against_reference(sc) -> tuple[object, int]:
    res = sim.run(sc, seed=1)
    r = res.requests.sort_values("request_id")
    cfg = sc.models[0].llm
    first, end, pre = reference(r["arrival_s"].to_numpy(), r["input_tokens"].to_numpy(),
                                r["output_tokens"].to_numpy(), cfg)
    done = r["status"].to_numpy() != "in_flight"
    got_first = r["arrival_s"].to_numpy() + r["ttft_ms"].to_numpy() / 1e3
    np.testing.assert_array_equal(done, end < sc.horizon)   # the same requests end within the horizon
    assert done.sum() > 0.5 * len(r)
    np.testing.assert_allclose(r["end_s"].to_numpy()[done], end[done], rtol=0, atol=1e-6)
    has_first = np.isfinite(got_first)
    assert has_first[r["status"].to_numpy() == "ok"].all()   # every request served got its first token
    np.testing.assert_allclose(got_first[has_first], first[has_first], rtol=0, atol=1e-6)
    return res, sum(1 for t in pre if t < sc.horizon)


@pytest.mark.parametrize("rate,seqs,budget,blocks", [
    (5.0, 16, 512, 4000),      # light load: mostly one sequence at a time
    (25.0, 16, 512, 4000),     # batches of several, decode runs cut by arrivals
    (18.0, 8, 256, 4000),      # max_num_seqs binds; long prompts prefill in chunks
    (8.0, 64, 2048, 200),      # the KV cache binds: preemptions and recomputes
])
def test_matches_the_step_by_step_reference(rate, seqs, budget, blocks):
    cfg = _cfg(seqs=seqs, budget=budget, blocks=blocks)
    sc = _scenario(cfg, rate=rate, tin={"dist": "lognormal", "mean": 300, "cv": 0.8},
                   tout={"dist": "lognormal", "mean": 80, "cv": 1.0}, duration=60.0)
    res, pre = _against_reference(sc)
    assert next(iter(res.summary["endpoints"].values()))["preemptions"] == pre
    if blocks < 1000:
        assert pre > 0


def test_one_request_alone_takes_its_steps_exactly():
    """Alone on the device: ceil(input / budget) prefill steps, then output - 1 decode steps over a context
    that grows by one token a step."""
    st_ = StepTime.linear(0.003, 1e-5, 2e-4, 5e-7)
    cfg = _cfg(budget=256, step=st_)
    sc = _scenario(cfg, rate=0.01, tin=1000, tout=50, duration=3000.0, seed=3)
    r = sim.run(sc, seed=1).requests
    r = r[r["status"] == "ok"]
    assert len(r) >= 5
    # prefill: chunks of 256, 256, 256, 232 over a growing cached prefix
    ttft = sum(st_.time(0, ctx, c) for ctx, c in [(0, 256), (256, 256), (512, 256), (768, 232)])
    tpot = sum(st_.time(1, 1000 + j, 0) for j in range(49)) / 49
    np.testing.assert_allclose(r["ttft_ms"], ttft * 1e3, rtol=1e-9)
    np.testing.assert_allclose(r["tpot_ms"], tpot * 1e3, rtol=1e-9)
    np.testing.assert_allclose(r["latency_ms"], (ttft + 49 * tpot) * 1e3, rtol=1e-9)


def test_roofline_shaped_steps_match_the_reference():
    """A step model of two terms (memory and compute, the larger sets the pace) crossing within runs."""
    st_ = StepTime(0.0005, ((0.006, 0.0, 2e-6, 0.0), (0.0, 4e-4, 0.0, 6e-5)))
    sc = _scenario(_cfg(seqs=32, budget=1024, step=st_), rate=10.0, tin={"dist": "lognormal", "mean": 200, "cv": 1.0},
                   tout={"dist": "lognormal", "mean": 150, "cv": 1.0}, duration=40.0, seed=5)
    _against_reference(sc)


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(seqs=st.integers(1, 24), budget=st.integers(16, 1024), block=st.sampled_from([1, 8, 16]),
       blocks=st.integers(60, 3000), rate=st.floats(1.0, 20.0), seed=st.integers(0, 10_000))
def test_property_every_request_ends_as_the_reference_says(seqs, budget, block, blocks, rate, seed):
    cfg = _cfg(seqs=seqs, budget=budget, block=block, blocks=blocks)
    sc = _scenario(cfg, rate=rate, tin={"dist": "lognormal", "mean": 60, "cv": 1.0},
                   tout={"dist": "lognormal", "mean": 30, "cv": 1.0}, duration=10.0, seed=seed)
    _against_reference(sc)


def test_the_engine_log_keeps_the_caps():
    """Running sequences never exceed max_num_seqs; KV blocks used never exceed the cache."""
    cfg = _cfg(seqs=6, budget=300, block=16, blocks=150)
    sc = _scenario(cfg, rate=30.0, tin={"dist": "lognormal", "mean": 300, "cv": 1.0},
                   tout={"dist": "lognormal", "mean": 60, "cv": 1.0}, duration=30.0)
    from sim.simulate import simulate

    run = simulate(sc, seed=1)
    rows = np.array(run.logs[0].llm, dtype=float)
    order = np.argsort(rows[:, 0], kind="stable")
    running, waiting, used, cap = np.cumsum(rows[order, 1:], axis=0).T
    assert running.max() <= 6 and running.min() >= 0 and waiting.min() >= 0
    assert used.max() <= 150 and used.min() >= 0 and (cap == 150).all()
    assert running.max() == 6   # the cap is reached at this load


# -- exact theory --------------------------------------------------------------------------------------
@pytest.mark.parametrize("load", [0.5, 0.8])
@pytest.mark.parametrize("tokens", ["fixed", "random"])
def test_one_sequence_at_a_time_is_an_m_g_1_queue(load, tokens):
    """max_num_seqs = 1 and prompts within one step's budget: each request is served alone in one
    prefill step and (output - 1) decode steps, a service time set by its tokens; Poisson arrivals make an
    M/G/1 queue, whose mean sojourn is E[S] + lambda E[S^2] / (2 (1 - rho)) (Pollaczek-Khinchine), with
    the moments of the requests' own service times. Within 3% over 4 seeded runs of ~20,000 requests."""
    st_ = StepTime.linear(0.002, 1e-5, 3e-4, 2e-6)
    if tokens == "fixed":
        spec_in, spec_out = 200, 40
        es_guess = st_.time(0, 0, 200) + st_.decode_time(1, 200, 39)
    else:
        spec_in = {"dist": "lognormal", "mean": 200, "cv": 0.5}
        spec_out = {"dist": "lognormal", "mean": 40, "cv": 0.8}
        es_guess = st_.time(0, 0, 200) + st_.decode_time(1, 200, 39)
    rate = load / es_guess
    got, theory = [], []
    for seed in range(4):
        sc = _scenario(_cfg(seqs=1, budget=4096, step=st_), rate=rate, tin=spec_in, tout=spec_out,
                       duration=20_000 / rate, seed=seed)
        r = sim.run(sc, seed=seed).requests
        tin = np.maximum(r["input_tokens"].to_numpy(), 1)
        tout = np.maximum(r["output_tokens"].to_numpy(), 1)
        s = np.array([st_.time(0, 0, int(a)) + st_.decode_time(1, int(a), int(b) - 1) for a, b in zip(tin, tout)])
        lam = len(r) / sc.horizon
        es, es2 = s.mean(), (s ** 2).mean()
        assert 0.8 * load < lam * es < 1.2 * load
        theory.append(es + lam * es2 / (2 * (1 - lam * es)))
        ok = r[r["status"] == "ok"]
        got.append(ok["latency_ms"].mean() / 1e3)
    assert np.mean(got) == pytest.approx(np.mean(theory), rel=0.03)


def test_a_longer_output_costs_no_more_events(monkeypatch):
    """Decode runs jump in closed form: the calendar entries of a run do not grow with the output."""
    from sim.hosting.continuous import ContinuousBatching

    calls = []
    real = ContinuousBatching._schedule
    monkeypatch.setattr(ContinuousBatching, "_schedule", lambda self, at: (calls.append(at), real(self, at)))
    counts = []
    for out in (20, 2000):
        calls.clear()
        r = sim.run(_scenario(_cfg(seqs=8), rate=0.05, tin=100, tout=out, duration=4000.0, seed=1), seed=1).requests
        assert (r["status"] == "ok").mean() > 0.9
        counts.append(len(calls) / len(r))
    assert counts[1] <= counts[0] * 1.5, counts   # about 2 a request (a prefill step, a decode run) either way


def test_bench_reports_the_language_model_figures():
    """`capsim bench --json` has the continuous-batching figures (a small scale: no timing is asserted)."""
    import json

    from click.testing import CliRunner

    from sim.cli import main

    r = CliRunner().invoke(main, ["bench", "--scale", "0.002", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    cb = doc["continuous_batching"]
    for k in ("requests_per_s", "output_tokens_per_s", "us_per_request_100_tokens", "us_per_request_2000_tokens"):
        assert cb[k] > 0, k
    assert doc["continuous_batching_day_s"] > 0
    for tokens in (100, 2000):
        c = doc["cases"][f"continuous_batching_{tokens}_tokens"]
        assert c["output_tokens"] == tokens and c["requests"] > 0 and c["completed"] > 0
    day = doc["cases"]["continuous_batching_day"]
    assert day["rate_per_s"] == 10.0 and day["requests"] > 0


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(terms=st.lists(st.tuples(*[st.sampled_from([0.0, 1e-7, 3e-6, 2e-4, 0.004, 0.03])] * 4), min_size=1, max_size=3),
       overhead=st.sampled_from([0.0, 0.0005]), n=st.integers(1, 300), k0=st.integers(0, 200_000),
       span=st.floats(0.0, 50.0), cap=st.integers(0, 3000))
def test_decode_steps_within_is_the_most_steps_that_fit(terms, overhead, n, k0, span, cap):
    """The closed-form searches (a one-term model's root; the fastest term's bound) give what a scan of
    decode_time gives."""
    if all(max(t) == 0.0 for t in terms) and overhead == 0.0:
        return
    stt = StepTime(overhead, tuple(terms))
    got = stt.decode_steps_within(n, float(k0), span, cap)
    want = 0
    while want < cap and stt.decode_time(n, float(k0), want + 1) <= span:
        want += 1
    assert got == want


def test_instance_failures_keep_the_engine_log_consistent(monkeypatch):
    """Instances that fail mid-step (also while the next step is already composed, at an arrival during a
    decode run): every request ends or fails once, and each device's log returns to nothing running,
    waiting or cached, never below."""
    from sim.bench import llm_scenario
    from sim.hosting.continuous import ContinuousBatching
    from sim.simulate import simulate

    ahead = []
    real = ContinuousBatching.stop
    monkeypatch.setattr(ContinuousBatching, "stop",
                        lambda self: (ahead.append(self._env._now < self._ahead), real(self)))
    # slow steps: an arrival finds a decode run often, and the step composed ahead starts long after it
    d = llm_scenario(2.0e4, rate=1.0, step={"base": "2s", "per_prefill_token": "0.1ms", "per_decode_seq": "1ms",
                                            "per_kv_token": "0.02us"}, output={"dist": "lognormal", "mean": 20, "cv": 1.0})
    d["duration"] = 3000.0
    d["endpoints"][0]["failures"] = {"mtbf": 30, "in_flight": "retry"}
    run = simulate(parse_scenario(d, source="cb-failures"), seed=3)
    assert len(ahead) > 20 and any(ahead)
    rows = np.array(run.logs[0].llm, dtype=float)
    level = np.cumsum(rows[np.argsort(rows[:, 0], kind="stable"), 1:], axis=0)
    assert level.min() >= 0
    status = run.columns["status"]
    assert (status != 0).mean() > 0.9
