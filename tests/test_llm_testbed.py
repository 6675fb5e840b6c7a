"""The testbed's language-model server (a real continuous-batching loop on a KV-cached decoder) and
the fidelity case built on it (``llm_conversation``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from sim import fidelity as fid

ROOT = Path(__file__).resolve().parents[1]
CASE = fid.CASES["llm_conversation"]


def _batcher(max_num_seqs=4, max_num_batched_tokens=32, size=1_000_000):
    pytest.importorskip("torch")
    import torch

    from calibration import llama
    from calibration.testbed.llm import Batcher

    torch.set_num_threads(1)
    eng = llama.Engine(llama.build(llama.shape_for(size)))
    return Batcher(eng, max_num_seqs, max_num_batched_tokens)


def test_every_request_gets_its_tokens_first_token_after_arrival_batch_within_limits():
    b = _batcher(max_num_seqs=4, max_num_batched_tokens=32)
    rng = np.random.default_rng(1)
    sizes = [(int(rng.integers(1, 80)), int(rng.integers(1, 12))) for _ in range(20)] + [(70, 1), (5, 1)]
    done, k = [], 0
    while k < len(sizes) or b.busy:
        for _ in range(int(rng.integers(0, 3))):      # 0-2 arrivals between steps
            if k < len(sizes):
                b.add(k, b.clock(), *sizes[k])
                k += 1
        done += b.step()
    assert sorted(r.rid for r in done) == list(range(len(sizes)))
    for r in done:
        assert r.generated == r.output == max(1, sizes[r.rid][1])
        assert r.sent <= r.admitted <= r.first <= r.end
        if r.output == 1:
            assert r.first == r.end                     # the prefill's step emits it, and it retires
    log = b.take_log()
    n, p, m = (np.array(log[c]) for c in ("n", "p", "prefill_seqs"))
    assert (n + m <= 4).all() and (n + p <= 32).all() and (n + m >= 1).all()
    assert n.max() == 4                                  # the batch does fill up
    assert (np.array(log["end_s"]) >= np.array(log["begin_s"])).all()
    ends = sorted(log["end_s"])
    for r in done:                                       # tokens come out at the ends of steps
        assert r.first in ends and r.end in ends
    assert b.take_log()["n"] == []


def test_a_prompt_longer_than_the_budget_prefills_in_chunks_and_decodes_one_token_a_step():
    b = _batcher(max_num_seqs=4, max_num_batched_tokens=32)
    b.add(0, b.clock(), 100, 5)                          # alone: ceil(100 / 32) = 4 prefill steps
    done = []
    while b.busy:
        done += b.step()
    log = b.take_log()
    assert log["p"] == [32, 32, 32, 4, 0, 0, 0, 0] and log["n"] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert log["K"][4:] == [100, 101, 102, 103]           # each decode's context: the cache before it
    r = done[0]
    assert r.first == log["end_s"][3] and r.end == log["end_s"][-1] and r.generated == 5
    # decoding sequences take their token first; a waiting prompt gets what budget is left
    b.add(1, b.clock(), 3, 10)
    b.step()
    b.add(2, b.clock(), 40, 2)
    b.step()
    log = b.take_log()
    assert log["n"] == [0, 1] and log["p"] == [3, 31]


def test_the_plan_validates_and_refuses_bad_batching_settings():
    pytest.importorskip("torch")
    from calibration.testbed import plan

    p = plan.validate(fid.plan_of(CASE))
    assert p["mode"] == "continuous_batching" and p["max_num_seqs"] == 16 and p["reference_step_s"] > 0
    assert "reference_request_s" not in fid.plan_of(CASE)
    good = fid.plan_of(CASE)
    for change, msg in (({"max_num_batched_tokens": 8}, "below max_num_seqs"),
                        ({"max_num_seqs": 0}, "max_num_seqs: expected an integer >= 1"),
                        ({"instances": 2}, "one model on one instance"),
                        ({"reference_step_s": -1}, "reference_step_s: expected"),
                        ({"models": [{**good["models"][0], "family": "encoder"}]}, "llama for mode")):
        with pytest.raises(ValueError, match=msg):
            plan.validate(good | change)
    with pytest.raises(ValueError, match="only for mode continuous_batching"):
        plan.validate(fid.plan_of(fid.CASES["sme_warm"]) | {"max_num_seqs": 4})


def test_the_cases_arrivals_carry_the_traces_token_counts_scaled_down():
    a = fid.arrivals_of(CASE, quick=True)
    assert list(a.columns) == ["arrival_s", "model", "input_tokens", "output_tokens"]
    assert a.equals(fid.arrivals_of(CASE, quick=True)) and len(a) > 1000
    assert (a["input_tokens"] >= 1).all() and (a["output_tokens"] >= 1).all()
    # the trace's first requests, their token counts times the case's scale, in order
    import pandas as pd

    trace = pd.read_csv(CASE.traffic["path"]).iloc[:len(a)]
    for col, src in (("input_tokens", "ContextTokens"), ("output_tokens", "GeneratedTokens")):
        want = np.maximum(1, np.rint(trace[src].to_numpy() * CASE.token_scale)).astype(int)
        assert (a[col].to_numpy() == want).all()
    span = a["arrival_s"].max()
    assert 55 <= span <= 60 and 0.5 < len(a) / span / (5.5 * CASE.traffic["rate_scale"]) < 2


def _measured(n=40, seed=0) -> dict:
    """A continuous-batching testbed run's record, as calibration/testbed/llm.py writes it."""
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0, 10, n))
    n_in, n_out = rng.integers(10, 200, n), rng.integers(1, 40, n)
    first = arrival + 0.02 + n_in * 1e-4
    end = first + (n_out - 1) * 0.004
    shape = {"family": "llama", "layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2, "intermediate": 672,
             "vocab": 4096, "params": 5_000_000}
    return {"schema": "capsim.testbed/1", "metadata": {"device": "cpu"},
            "plan": {**fid.plan_of(CASE), "max_concurrency": 1, "instance_concurrency": 1, "max_concurrent_loads": 1,
                     "replicate_above": 8, "threads": 1},
            "probe": {"shape": shape, "dtype_bytes": 4,
                      "step": {"base": 2e-3, "per_prefill_token": 3e-5, "per_decode_seq": 2e-4, "per_kv_token": 1e-8,
                               "r2": 0.95, "rel_err": 0.05, "n": 500}},
            "requests": {"arrival_s": arrival.tolist(), "send_s": arrival.tolist(), "start_s": arrival.tolist(),
                         "first_token_s": first.tolist(), "end_s": end.tolist(), "input_tokens": n_in.tolist(),
                         "output_tokens": n_out.tolist(), "model": [0] * n, "instance": [0] * n,
                         "cold": [False] * n},
            "loads": [], "unloads": [], "unfinished": 0}


def test_the_cases_scenario_is_the_design_schema_with_the_calibrations_step(tmp_path):
    m = _measured()
    sc = fid.scenario_of(m, tmp_path / "a.csv")
    model = sc["models"][0]
    assert model["architecture"] == {"params": 5_000_000, "layers": 4, "hidden": 256, "heads": 4, "kv_heads": 2,
                                     "intermediate": 672, "vocab": 4096, "dtype_bytes": 4}
    cb = model["service"]["continuous_batching"]
    assert cb["max_num_seqs"] == 16 and cb["max_num_batched_tokens"] == 256
    assert cb["step"] == {"base": 2e-3, "per_prefill_token": 3e-5, "per_decode_seq": 2e-4, "per_kv_token": 1e-8}
    assert model["traffic"] == {"process": "trace", "path": str(tmp_path / "a.csv"), "format": "csv"}
    assert model["size_gb"] == pytest.approx(0.02) and model["accelerators"] == 1
    itype = sc["instance_types"][0]
    assert itype["gpus"] == 1 and itype["gpu_memory_gb"] == 1.0
    assert sc["endpoints"][0]["models"] == ["m-00"]
    with pytest.raises(fid.FidelityError, match="takes its step time from the testbed"):
        fid.scenario_of(m, tmp_path / "a.csv", ROOT / "scenarios" / "profiles" / "cpu-quick.json")
    from sim.scenario import parse_scenario

    (tmp_path / "a.csv").write_text("arrival_s,model,input_tokens,output_tokens\n0.1,m-00,10,5\n")
    parsed = parse_scenario(sc, source="llm", base_dir=tmp_path)
    llm = parsed.models[0].llm
    assert llm is not None and llm.max_num_seqs == 16 and llm.max_num_batched_tokens == 256


def test_the_measured_figures_hold_ttft_tpot_and_e2e(tmp_path):
    m = _measured()
    f = fid.measured_figures(m)
    r = m["requests"]
    ttft = 1e3 * (np.array(r["first_token_s"]) - np.array(r["send_s"]))
    out = np.array(r["output_tokens"])
    tpot = 1e3 * (np.array(r["end_s"]) - np.array(r["first_token_s"]))[out > 1] / (out[out > 1] - 1)
    assert f["ttft_p50_ms"] == pytest.approx(np.percentile(ttft, 50))
    assert f["ttft_p99_ms"] == pytest.approx(np.percentile(ttft, 99))
    assert f["tpot_p50_ms"] == pytest.approx(4.0) and f["tpot_p99_ms"] == pytest.approx(4.0)
    e = fid.errors(f | {"ttft_p50_ms": 1.1 * f["ttft_p50_ms"]}, f)
    assert e["ttft_p50_err"] == pytest.approx(0.1) and e["tpot_p99_err"] == 0.0
    w = fid.within(e, fid.QUICK_TOLERANCE)
    assert w["ttft_p50"] and w["tpot_p99"] and not fid.within(e, fid.FULL_TOLERANCE)["ttft_p50"]
    assert "ttft_p50_ms" not in fid.measured_figures(_other_measured())
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(m))
    assert fid.read_measured(path)["plan"]["mode"] == "continuous_batching"
    bad = json.loads(json.dumps(m))
    bad["probe"]["step"]["per_kv_token"] = -1.0
    path.write_text(json.dumps(bad))
    with pytest.raises(fid.FidelityError, match="probe.step"):
        fid.read_measured(path)
    bad = json.loads(json.dumps(m))
    del bad["requests"]["first_token_s"]
    path.write_text(json.dumps(bad))
    with pytest.raises(fid.FidelityError, match="first_token_s"):
        fid.read_measured(path)


def _other_measured() -> dict:
    case = fid.CASES["sme_warm"]
    return {"plan": fid.plan_of(case) | {"timeout_s": 60.0},
            "requests": {"send_s": [0.0, 1.0], "end_s": [0.01, 1.01], "cold": [False, False]}, "loads": []}


def _steps_replay(rng, k: int, level) -> dict:
    """A replay record of ``k`` steps of random composition taking 2 ms + 30 us per prefill token + 200 us
    per decoding sequence + 10 ns per context token, times ``level`` (a number, or a function of ``k``
    giving one factor a step)."""
    n = rng.integers(1, 16, k)
    K = n * rng.integers(20, 300, k)
    p = np.where(rng.random(k) < 0.3, rng.integers(1, 256, k), 0)
    dt = (2e-3 + 3e-5 * p + 2e-4 * n + 1e-8 * K) * (level(k) if callable(level) else level)
    b = np.r_[0.0, np.cumsum(dt)[:-1]]
    return {"steps": {"begin_s": b.tolist(), "end_s": (b + dt).tolist(), "n": n.tolist(), "K": K.tolist(),
                      "p": p.tolist(), "prefill_seqs": (p > 0).astype(int).tolist(), "waited_s": [0.0] * k}}


def test_the_step_rows_count_the_whole_iteration_but_not_the_idle_wait():
    pytest.importorskip("torch")
    from calibration.testbed.llm import fit_steps, level_gap, step_rows

    steps = {"begin_s": [0.0, 0.010, 0.050], "end_s": [0.009, 0.019, 0.058], "n": [1, 2, 1], "K": [10, 21, 5],
             "p": [0, 0, 8], "prefill_seqs": [0, 0, 1], "waited_s": [0.0, 0.0, 0.030]}
    X, y, seqs = step_rows(steps)
    assert X.tolist() == [[0, 1, 10], [0, 2, 21], [8, 1, 5]] and seqs.tolist() == [1, 2, 2]
    assert y == pytest.approx([0.010, 0.010, 0.008])      # to the next begin; less the wait; the last to its end
    # the fit over replays: each replay's level against it, and the drift between the first and the last
    rng = np.random.default_rng(0)
    f = fit_steps([_steps_replay(rng, 300, 1.0), _steps_replay(rng, 300, 1.1)])
    assert f["level_drift"] == pytest.approx(0.1, abs=0.02) and f["r2"] > 0.9
    # and a measured replay's level against theirs: 1.3 over their mean 1.05
    assert level_gap(f, _steps_replay(rng, 300, 1.3)["steps"]) == pytest.approx(1.3 / 1.05 - 1, abs=0.02)
    assert level_gap(f, dict.fromkeys(("begin_s", "end_s", "n", "K", "p", "prefill_seqs", "waited_s"), [])) is None
    assert f["per_decode_seq"] == pytest.approx(2.1e-4, rel=0.1)


def test_a_replays_level_weighs_each_step_by_its_sequences_and_calibrations_grow_with_the_replay():
    """The level the latencies feel: a step's time counts once per sequence in it, so one-sequence steps
    50% slower than the fit, beside as many exact 8-sequence steps, raise the level by their share of
    the sequences' time (about 4%), where the steps' median ratio would say 1.5 (51 of 101 steps)."""
    pytest.importorskip("torch")
    from calibration.testbed import llm

    coef = {"base": 1e-3, "per_prefill_token": 0.0, "per_decode_seq": 1e-4, "per_kv_token": 0.0}
    n = [1, 8] * 50 + [1]
    dt = [(1e-3 + 1e-4 * k) * (1.5 if k == 1 else 1.0) for k in n]
    b = np.r_[0.0, np.cumsum(dt)[:-1]]
    steps = {"begin_s": b.tolist(), "end_s": (b + dt).tolist(), "n": n, "K": [0] * len(n), "p": [0] * len(n),
             "prefill_seqs": [0] * len(n), "waited_s": [0.0] * len(n)}
    t1, t8 = 1.1e-3, 1.8e-3
    assert llm.step_level(coef, steps) == pytest.approx((51 * 1.5 * t1 + 50 * 8 * t8) / (51 * t1 + 50 * 8 * t8))
    # each calibration replay: CALIBRATION_S, or a share of a longer measured replay
    assert llm.calibration_span([(0.0, 5, 5), (60.0, 5, 5)]) == llm.CALIBRATION_S
    assert llm.calibration_span([(0.0, 5, 5), (240.0, 5, 5)]) == pytest.approx(llm.CALIBRATION_SHARE * 240.0)
    assert llm.calibration_span([]) == llm.CALIBRATION_S


def test_the_step_fit_carries_the_mean_step_time_of_skewed_steps():
    """A loop whose steps are mostly typical and sometimes slow (1 in 10 takes 1.6 times as long: a mean
    of 1.06 times the typical): the simulator's steps take their predicted time exactly, so the fit
    must carry the mean (the time the loop's work takes), not the typical step that a fit of relative
    residuals finds."""
    pytest.importorskip("torch")
    from calibration import fit
    from calibration.testbed.llm import fit_steps, step_rows

    rng = np.random.default_rng(3)
    recs = [_steps_replay(rng, 2000, lambda k: np.where(rng.random(k) < 0.1, 1.6, 1.0)) for _ in range(2)]
    f = fit_steps(recs)
    assert f["mean_scale"] > 1.03
    for term, true in (("base", 2e-3), ("per_prefill_token", 3e-5), ("per_decode_seq", 2e-4)):
        assert f[term] == pytest.approx(1.06 * true, rel=0.04), term
    typical = fit.fit_step(*[np.concatenate(c) for c in zip(*[step_rows(r["steps"])[:2] for r in recs])],
                           robust=True)
    assert typical["per_decode_seq"] == pytest.approx(2e-4, rel=0.04)   # the fit alone: the typical step


def test_a_short_replay_through_the_serving_process(tmp_path):
    """The whole testbed on a tiny decoder: probe, two calibration replays, the measured one."""
    pytest.importorskip("torch")
    from calibration.testbed import run_testbed

    plan = fid.plan_of(CASE) | {"models": [{"name": "m-00", "family": "llama", "params": "1M", "memory_gb": 0.01}],
                                "reference_step_s": None}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rng = np.random.default_rng(2)
    t = np.sort(rng.uniform(0, 3, 30))
    rows = ["arrival_s,model,input_tokens,output_tokens"] + [
        f"{x:.4f},m-00,{int(rng.integers(5, 300))},{int(rng.integers(1, 20))}" for x in t]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    import calibration.testbed.llm as llm
    old = llm.CALIBRATION_S
    llm.CALIBRATION_S = 3.0
    try:
        res = run_testbed(str(tmp_path / "a.csv"), str(tmp_path / "plan.json"), str(tmp_path / "m.json"),
                          log=lambda m: None)
    finally:
        llm.CALIBRATION_S = old
    assert res["unfinished"] == 0 and res["time_scale"] == 1.0
    r = res["requests"]
    assert r["generated"] == r["output_tokens"]
    for s, f, e in zip(r["send_s"], r["first_token_s"], r["end_s"]):
        assert s <= f <= e
    steps = res["steps"]
    assert max(a + b for a, b in zip(steps["n"], steps["prefill_seqs"])) <= 16
    step = res["probe"]["step"]
    assert all(step[k] >= 0 for k in ("base", "per_prefill_token", "per_decode_seq", "per_kv_token"))
    assert step["n"] > 20 and math.isfinite(step["r2"])
    m = fid.read_measured(tmp_path / "m.json")
    assert fid.measured_figures(m)["ttft_p50_ms"] > 0
