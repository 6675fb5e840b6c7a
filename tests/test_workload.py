"""Tests for sim.workload: arrival processes, popularity and trace readers.

All random tests use fixed seeds; tolerances are stated in each assert and
are several standard errors wide unless a tighter bound is the point.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from sim.workload import (
    FORMATS,
    TraceError,
    assign,
    cumulative_intensity,
    diurnal_arrivals,
    gamma_arrivals,
    mmpp_on_off_arrivals,
    poisson_arrivals,
    rate_function,
    read_trace,
    trace_arrivals,
    zipf_weights,
)

TRACES = Path(__file__).resolve().parents[1] / "scenarios" / "traces"
AZURE_CODE = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv"
AZURE_CONV = TRACES / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = TRACES / "mooncake_fast25" / "conversation_trace.jsonl"


def rng(seed: int = 12345) -> np.random.Generator:
    return np.random.default_rng(seed)


def cv_of_gaps(times: np.ndarray) -> float:
    g = np.diff(times)
    return float(g.std() / g.mean())


def assert_valid(times: np.ndarray, t_start: float, t_end: float) -> None:
    assert times.dtype == np.float64
    assert np.all(np.diff(times) >= 0), "times must be sorted"
    if times.size:
        assert times[0] >= t_start and times[-1] < t_end, "times must lie in [t_start, t_end)"


# --------------------------------------------------------------------------- #
# Poisson
# --------------------------------------------------------------------------- #
def test_poisson_count_and_cv():
    rate, T = 50.0, 20_000.0
    t = poisson_arrivals(rng(1), rate, T)
    assert_valid(t, 0.0, T)
    mean = rate * T
    # count ~ Poisson(rate*T): within 5 standard errors
    assert abs(t.size - mean) < 5 * math.sqrt(mean), (t.size, mean)
    # exponential gaps: CV 1 within 0.01 (SE of the sample CV is about 0.001 here)
    assert abs(cv_of_gaps(t) - 1.0) < 0.01


def test_poisson_window_and_edge_cases():
    t = poisson_arrivals(rng(2), 10.0, 150.0, t_start=100.0)
    assert_valid(t, 100.0, 150.0)
    assert abs(t.size - 500) < 5 * math.sqrt(500)
    assert poisson_arrivals(rng(), 0.0, 100.0).size == 0
    assert poisson_arrivals(rng(), 10.0, 5.0, t_start=5.0).size == 0
    with pytest.raises(ValueError):
        poisson_arrivals(rng(), -1.0, 10.0)
    with pytest.raises(ValueError):
        poisson_arrivals(rng(), 1.0, 10.0, t_start=20.0)


def test_same_seed_same_arrivals():
    a = poisson_arrivals(rng(7), 3.0, 1000.0)
    b = poisson_arrivals(rng(7), 3.0, 1000.0)
    np.testing.assert_array_equal(a, b)
    c = gamma_arrivals(rng(7), 3.0, 2.0, 1000.0)
    d = gamma_arrivals(rng(7), 3.0, 2.0, 1000.0)
    np.testing.assert_array_equal(c, d)


# --------------------------------------------------------------------------- #
# gamma renewal
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv_and_rate(cv):
    rate, T = 100.0, 10_000.0  # about 10^6 arrivals
    t = gamma_arrivals(rng(3), rate, cv, T)
    assert_valid(t, 0.0, T)
    measured = cv_of_gaps(t)
    assert abs(measured / cv - 1.0) < 0.05, f"CV {measured:.4f} not within 5% of {cv}"
    # long-run rate within 2% (count sd is about rate*T*cv^2 -> 0.4% for cv=4)
    assert abs(t.size / (rate * T) - 1.0) < 0.02


def test_gamma_cv1_is_poisson_like():
    t = gamma_arrivals(rng(4), 20.0, 1.0, 50_000.0)
    assert abs(cv_of_gaps(t) - 1.0) < 0.01


def test_gamma_stationary_start_gives_unbiased_counts():
    # Started in equilibrium, E[N(0, T)] = rate*T exactly even for short
    # windows; an ordinary start (first gap ~ gamma) over-counts for cv > 1
    # (renewal function m(t) ~ t/mu + (cv^2 - 1)/2).
    rate, cv, T, reps = 1.0, 4.0, 2.0, 20_000
    g = rng(5)
    counts = np.array([gamma_arrivals(g, rate, cv, T).size for _ in range(reps)])
    se = counts.std() / math.sqrt(reps)
    assert abs(counts.mean() - rate * T) < 5 * se, (counts.mean(), se)
    g = rng(6)
    counts0 = np.array([gamma_arrivals(g, rate, cv, T, stationary=False).size for _ in range(reps)])
    assert counts0.mean() > rate * T + 1.0  # ordinary start is clearly biased here


def test_gamma_edge_cases():
    assert gamma_arrivals(rng(), 0.0, 2.0, 100.0).size == 0
    with pytest.raises(ValueError):
        gamma_arrivals(rng(), 1.0, 0.0, 100.0)
    t = gamma_arrivals(rng(8), 5.0, 3.0, 300.0, t_start=200.0)
    assert_valid(t, 200.0, 300.0)


# --------------------------------------------------------------------------- #
# diurnal
# --------------------------------------------------------------------------- #
def test_diurnal_mean_rate_and_peak_to_trough():
    rate, period, p, n_periods = 10.0, 1000.0, 5.0, 100
    T = period * n_periods  # about 10^6 arrivals
    t = diurnal_arrivals(rng(9), rate, T, peak_to_trough=p, period=period)
    assert_valid(t, 0.0, T)
    # mean rate over whole periods within 2%
    assert abs(t.size / T / rate - 1.0) < 0.02
    # fold onto one period, 20 bins; t = 0 is the trough, period/2 the peak
    bins = 20
    counts = np.bincount(((t % period) / (period / bins)).astype(int), minlength=bins)
    a = (p - 1) / (p + 1)
    att = math.sin(math.pi / bins) / (math.pi / bins)  # bin-averaging of the cosine
    # bins are centred at ±half a bin from the extremes; use the exact bin means
    edges = np.arange(bins + 1) * (period / bins)
    bin_mean = np.diff(cumulative_intensity(edges, rate, peak_to_trough=p, period=period))
    expected_ratio = bin_mean.max() / bin_mean.min()
    assert expected_ratio == pytest.approx((1 + a * att * math.cos(math.pi / bins))
                                           / (1 - a * att * math.cos(math.pi / bins)), rel=1e-9)
    ratio = counts.max() / counts.min()
    assert abs(ratio / expected_ratio - 1.0) < 0.05, (ratio, expected_ratio)
    assert counts.argmin() in (0, bins - 1) and counts.argmax() in (bins // 2 - 1, bins // 2)
    # every bin matches its expected count within 5 standard errors
    expected = bin_mean * n_periods
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected))


def test_diurnal_rate_function_and_phase():
    r = rate_function([0.0, 43200.0, 86400.0], 2.0, peak_to_trough=4.0)
    np.testing.assert_allclose(r, [2.0 * (1 - 0.6), 2.0 * 1.6, 2.0 * 0.4])
    assert r[1] / r[0] == pytest.approx(4.0)
    # mean over one period equals rate
    assert cumulative_intensity(86400.0, 2.0, peak_to_trough=4.0) == pytest.approx(2.0 * 86400.0)
    # phase = period/2 moves the peak to t = 0
    r2 = rate_function([0.0, 43200.0], 2.0, peak_to_trough=4.0, phase=43200.0)
    assert r2[0] / r2[1] == pytest.approx(4.0)
    # peak_to_trough = 1 is homogeneous Poisson
    t = diurnal_arrivals(rng(10), 5.0, 10_000.0)
    assert abs(t.size - 50_000) < 5 * math.sqrt(50_000)


def test_diurnal_hourly_weights_shape():
    period, n_periods, rate = 2400.0, 200, 2.0
    w = np.arange(24, dtype=float)  # hour 0 has weight 0
    w[12] = 30.0
    T = period * n_periods
    t = diurnal_arrivals(rng(11), rate, T, period=period, hourly_weights=w)
    assert_valid(t, 0.0, T)
    assert abs(t.size / T / rate - 1.0) < 0.02  # mean rate preserved within 2%
    hours = np.bincount((t % period / (period / 24)).astype(int), minlength=24)
    expected = rate * w / w.mean() * (period / 24) * n_periods
    assert hours[0] == 0  # zero weight: no arrivals at all
    # each hour within 5 standard errors of rate * w_h / mean(w)
    assert np.all(np.abs(hours - expected) <= 5 * np.sqrt(expected) + 1e-9), (hours, expected)
    # the rate function is piecewise constant with the same shape
    mids = (np.arange(24) + 0.5) * period / 24
    np.testing.assert_allclose(rate_function(mids, rate, period=period, hourly_weights=w),
                               rate * w / w.mean())


def test_diurnal_hourly_weights_phase_and_partial_window():
    period = 24.0
    w = np.zeros(24)
    w[5] = 1.0  # all traffic in hour 5
    t = diurnal_arrivals(rng(12), 1.0, 240.0, t_start=3.5, period=period, hourly_weights=w, phase=2.0)
    assert_valid(t, 3.5, 240.0)
    # with phase 2, hour 5 of the profile is t + 2 in [5, 6) -> t mod 24 in [3, 4)
    assert np.all((t % period >= 3.0) & (t % period < 4.0))
    assert t.size > 0


def test_diurnal_validation():
    with pytest.raises(ValueError):
        diurnal_arrivals(rng(), 1.0, 10.0, hourly_weights=[1.0] * 23)
    with pytest.raises(ValueError):
        diurnal_arrivals(rng(), 1.0, 10.0, hourly_weights=[0.0] * 24)
    with pytest.raises(ValueError):
        diurnal_arrivals(rng(), 1.0, 10.0, peak_to_trough=0.5)
    with pytest.raises(ValueError):
        diurnal_arrivals(rng(), 1.0, 10.0, peak_to_trough=3.0, hourly_weights=[1.0] * 24)


# --------------------------------------------------------------------------- #
# MMPP
# --------------------------------------------------------------------------- #
def test_mmpp_long_run_rate_and_burstiness():
    rate_on, rate_off, mean_on, mean_off = 20.0, 1.0, 2.0, 8.0
    T = 500_000.0  # count sd is about 0.4% of the mean here
    t = mmpp_on_off_arrivals(rng(13), rate_on, rate_off, mean_on, mean_off, T)
    assert_valid(t, 0.0, T)
    expected = (rate_on * mean_on + rate_off * mean_off) / (mean_on + mean_off)
    assert abs(t.size / T / expected - 1.0) < 0.03  # long-run rate within 3%
    counts = np.bincount(t.astype(int), minlength=int(T))
    idc = counts.var() / counts.mean()
    assert idc > 5.0  # Poisson would give 1; on/off modulation makes it bursty
    assert cv_of_gaps(t) > 1.5


def test_mmpp_edge_cases():
    t = mmpp_on_off_arrivals(rng(14), 5.0, 5.0, 1.0, 1.0, 20_000.0, t_start=100.0)
    assert_valid(t, 100.0, 20_000.0)
    assert abs(cv_of_gaps(t) - 1.0) < 0.02  # equal rates: plain Poisson
    assert mmpp_on_off_arrivals(rng(), 0.0, 0.0, 1.0, 1.0, 100.0).size == 0
    with pytest.raises(ValueError):
        mmpp_on_off_arrivals(rng(), 1.0, 0.0, 0.0, 1.0, 100.0)


# --------------------------------------------------------------------------- #
# properties and speed
# --------------------------------------------------------------------------- #
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1),
       rate=st.floats(0.0, 50.0),
       t_start=st.floats(-1e4, 1e4),
       span=st.floats(0.0, 200.0),
       cv=st.floats(0.2, 6.0),
       p=st.floats(1.0, 20.0))
def test_all_processes_sorted_in_window(seed, rate, t_start, span, cv, p):
    t_end = t_start + span
    g = np.random.default_rng(seed)
    for times in (
        poisson_arrivals(g, rate, t_end, t_start),
        gamma_arrivals(g, rate, cv, t_end, t_start),
        diurnal_arrivals(g, rate, t_end, t_start, peak_to_trough=p, period=37.0, phase=3.0),
        diurnal_arrivals(g, rate, t_end, t_start, period=37.0, hourly_weights=np.arange(24) % 5),
        mmpp_on_off_arrivals(g, rate, rate / 10, cv, 2 * cv, t_end, t_start),
    ):
        assert_valid(times, t_start, t_end)


def test_million_arrivals_fast():
    # 10^6 arrivals each; the brief asks for "well under a second": allow 1 s
    cases = {
        "poisson": lambda g: poisson_arrivals(g, 1e4, 100.0),
        "gamma": lambda g: gamma_arrivals(g, 1e4, 3.0, 100.0),
        "diurnal": lambda g: diurnal_arrivals(g, 1e4, 100.0, peak_to_trough=5, period=20.0),
        "hourly": lambda g: diurnal_arrivals(g, 1e4, 100.0, period=20.0, hourly_weights=np.arange(1, 25)),
        "mmpp": lambda g: mmpp_on_off_arrivals(g, 1.8e4, 2e3, 0.5, 0.5, 100.0),
        "assign": lambda g: assign(g, 10**6, zipf_weights(1000, 1.0)),
    }
    from calibration.harness import Neighbours
    from conftest import too_noisy

    # pyperf-style: the best of up to 5 repeats (stopping once under the bound), with the other
    # processes' CPU measured meanwhile; a miss on a machine too noisy to time is an xfail
    slow = []
    neighbours = Neighbours()
    for name, fn in cases.items():
        times = []
        for _ in range(5):
            g = rng(15)
            t0 = time.perf_counter()
            out = fn(g)
            times.append(time.perf_counter() - t0)
            assert out.size > 900_000
            if times[-1] < 1.0:
                break
        if min(times) >= 1.0:
            slow.append(f"{name}: best {min(times):.2f}s of {len(times)} for {out.size} values "
                        f"(spread {(max(times) - min(times)) / min(times):.0%})")
    if slow and (why := too_noisy(neighbours)):
        pytest.xfail(f"{why}; {'; '.join(slow)}")
    assert not slow, slow


# --------------------------------------------------------------------------- #
# popularity
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("s", [0.0, 0.5, 1.0, 2.0])
def test_zipf_weights(s):
    w = zipf_weights(50, s)
    assert w.shape == (50,)
    assert abs(w.sum() - 1.0) < 1e-12
    assert w[0] / w[1] == pytest.approx(2.0 ** s, rel=1e-12)
    assert w[0] / w[9] == pytest.approx(10.0 ** s, rel=1e-12)
    assert np.all(np.diff(w) <= 0)
    if s == 0:
        np.testing.assert_allclose(w, 1 / 50)


def test_zipf_validation_and_extremes():
    assert zipf_weights(1, 3.0).tolist() == [1.0]
    w = zipf_weights(10_000, 50.0)  # huge exponent: no NaN, all mass on k=1
    assert np.isfinite(w).all() and w[0] == pytest.approx(1.0)
    for bad in [(0, 1.0), (5, -1.0), (2.5, 1.0)]:
        with pytest.raises(ValueError):
            zipf_weights(*bad)


def test_assign_frequencies():
    w = zipf_weights(10, 1.0)
    n = 10**6
    idx = assign(rng(16), n, w)
    assert idx.dtype == np.int32 and idx.shape == (n,)
    freq = np.bincount(idx, minlength=10)
    se = np.sqrt(n * w * (1 - w))
    assert np.all(np.abs(freq - n * w) < 5 * se), (freq, n * w)


def test_assign_unnormalised_and_zero_weights():
    idx = assign(rng(17), 200_000, [0.0, 3.0, 0.0, 1.0, 0.0])
    freq = np.bincount(idx, minlength=5)
    assert freq[0] == freq[2] == freq[4] == 0
    assert abs(freq[1] / 200_000 - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 200_000)
    assert assign(rng(), 0, [1.0, 2.0]).size == 0
    assert np.all(assign(rng(), 10, [5.0]) == 0)
    for bad in ([], [0.0, 0.0], [1.0, -1.0], [1.0, np.nan]):
        with pytest.raises(ValueError):
            assign(rng(), 10, bad)


# --------------------------------------------------------------------------- #
# shipped traces
# --------------------------------------------------------------------------- #
def _check_trace_frame(df: pd.DataFrame, n: int) -> None:
    assert len(df) == n
    assert list(df.columns[:3]) == ["arrival_s", "input_tokens", "output_tokens"]
    assert df["arrival_s"].dtype == np.float64
    assert np.issubdtype(df["input_tokens"].dtype, np.integer)
    assert np.issubdtype(df["output_tokens"].dtype, np.integer)
    assert df["arrival_s"].iloc[0] == 0.0
    assert df["arrival_s"].is_monotonic_increasing


def test_azure_traces_read():
    code = read_trace(AZURE_CODE, "azure_llm")
    conv = read_trace(AZURE_CONV, "azure_llm")
    _check_trace_frame(code, 8819)
    _check_trace_frame(conv, 19366)
    # first rows of the files: 4808/10 and 374/44 tokens
    assert (code["input_tokens"].iloc[0], code["output_tokens"].iloc[0]) == (4808, 10)
    assert (conv["input_tokens"].iloc[0], conv["output_tokens"].iloc[0]) == (374, 44)
    # second code request is 0.052 s after the first (18:17:04.0319600 - 18:17:03.9799600)
    assert code["arrival_s"].iloc[1] == pytest.approx(0.052, abs=1e-9)
    # both cover about an hour
    assert 3000 < code["arrival_s"].iloc[-1] < 3600 and 3000 < conv["arrival_s"].iloc[-1] < 3600
    cv_code, cv_conv = cv_of_gaps(code["arrival_s"].to_numpy()), cv_of_gaps(conv["arrival_s"].to_numpy())
    # measured: code about 13, conv about 1.1
    assert cv_code > 5 * cv_conv, (cv_code, cv_conv)
    assert 0.9 < cv_conv < 1.3


def test_mooncake_trace_reads():
    df = read_trace(MOONCAKE, "mooncake")
    _check_trace_frame(df, 12031)
    assert "model" not in df.columns
    # the trace README gives average input 12,035 and output 343 tokens
    assert round(df["input_tokens"].mean()) == 12035
    assert round(df["output_tokens"].mean()) == 343
    assert df["arrival_s"].iloc[-1] == pytest.approx(3536.999)


# --------------------------------------------------------------------------- #
# trace reader errors and the csv format
# --------------------------------------------------------------------------- #
def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_trace_basic(tmp_path):
    p = _write(tmp_path, "t.csv",
               "arrival_s,model,input_tokens,output_tokens,extra\n"
               "0.5,a,10,2,x\n"
               "0.25,b,20,4,y\n"
               "\n"
               "1.0,a,30,6,z\n")
    df = read_trace(p, "csv")
    assert df["arrival_s"].tolist() == [0.25, 0.5, 1.0]  # sorted silently; offset kept
    assert df["model"].tolist() == ["b", "a", "a"]
    assert df["input_tokens"].tolist() == [20, 10, 30]
    assert "extra" not in df.columns
    p2 = _write(tmp_path, "t2.csv", "arrival_s\n0\n1.5\n")
    df2 = read_trace(p2, "csv")
    assert df2["input_tokens"].tolist() == [0, 0] and df2["output_tokens"].tolist() == [0, 0]
    assert "model" not in df2.columns


def test_csv_trace_missing_a_token_column_takes_the_models_own(tmp_path):
    """A csv trace with one token column: the other side's counts are the model's ``tokens`` (here
    output 50, input 7), not 0 (a language model's request then ended at its first token). Both
    columns: the trace's; neither: the model's, as before."""
    from sim.scenario import parse_scenario
    from sim.workload.build import arrivals_frame

    def frame(text):
        _write(tmp_path, "t.csv", text)
        d = {"name": "t", "duration": 10, "models": [{
            "name": "m", "size_gb": 1, "tokens": {"input": 7, "output": 50},
            "service": {"base": "1ms", "per_input_token": "0.01ms", "per_output_token": "1ms"},
            "traffic": {"process": "trace", "path": "t.csv"}}],
            "endpoints": [{"name": "e", "instance_type": "ml.g5.xlarge", "models": ["m"]}]}
        return arrivals_frame(parse_scenario(d, source="t", base_dir=tmp_path))

    f = frame("arrival_s,input_tokens\n1,10\n2,20\n")
    assert f["input_tokens"].tolist() == [10, 20] and f["output_tokens"].tolist() == [50, 50]
    f = frame("arrival_s,output_tokens\n1,3\n2,4\n")
    assert f["input_tokens"].tolist() == [7, 7] and f["output_tokens"].tolist() == [3, 4]
    f = frame("arrival_s,input_tokens,output_tokens\n1,10,3\n")
    assert f["input_tokens"].tolist() == [10] and f["output_tokens"].tolist() == [3]
    f = frame("arrival_s\n1\n")
    assert f["input_tokens"].tolist() == [7] and f["output_tokens"].tolist() == [50]


def test_csv_trace_model_names_route_all_or_none(tmp_path):
    """A csv trace's model column: names that are all the scenario's route each row to its model; names
    none of which are spread by the group's popularity; some of each (a typo, a model left out) is an error
    naming the unknown ones and the traffic's key, not rows silently spread over the other models."""
    from sim.scenario import ScenarioError, parse_scenario
    from sim.workload.build import arrivals_frame

    def frame(text):
        _write(tmp_path, "t.csv", text)
        d = {"name": "t", "duration": 10, "models": [{
            "name": "a", "size_gb": 1, "count": 1, "service": {"mean": "10ms"},
            "traffic": {"process": "trace", "path": "t.csv"}}, {
            "name": "b", "size_gb": 1, "service": {"mean": "10ms"}}],
            "endpoints": [{"name": "e", "instance_type": "ml.g5.xlarge", "models": ["a", "b"]}]}
        return arrivals_frame(parse_scenario(d, source="t", base_dir=tmp_path))

    assert frame("arrival_s,model\n1,a\n2,a\n")["model"].tolist() == ["a", "a"]
    assert frame("arrival_s,model\n1,x\n2,y\n")["model"].tolist() == ["a", "a"]   # the group's one model
    with pytest.raises(ScenarioError) as e:
        frame("arrival_s,model\n1,a\n2,c\n")
    assert "'c', which no model of the scenario has" in str(e.value) and "models[0].traffic.path" in str(e.value)


def test_csv_missing_column_names_file_line_and_column(tmp_path):
    p = _write(tmp_path, "nocol.csv", "time,input_tokens\n0,1\n")
    with pytest.raises(TraceError) as e:
        read_trace(p, "csv")
    msg = str(e.value)
    assert "nocol.csv" in msg and "line 1" in msg and "arrival_s" in msg and "\n" not in msg


def test_csv_bad_number_names_line(tmp_path):
    # line 1 header, 2 ok, 3 blank, 4 ok, 5 bad
    p = _write(tmp_path, "bad.csv", "arrival_s,input_tokens\n0,1\n\n1,2\n2,lots\n")
    with pytest.raises(TraceError) as e:
        read_trace(p, "csv")
    msg = str(e.value)
    assert "bad.csv" in msg and "line 5" in msg and "input_tokens" in msg and "'lots'" in msg
    p = _write(tmp_path, "bad2.csv", "arrival_s\n0\nsoon\n")
    with pytest.raises(TraceError, match=r"bad2\.csv: line 3: column 'arrival_s': expected a number"):
        read_trace(p, "csv")
    p = _write(tmp_path, "frac.csv", "arrival_s,output_tokens\n0,1.5\n")
    with pytest.raises(TraceError, match=r"line 2.*whole number"):
        read_trace(p, "csv")


def test_csv_negative_time_is_error(tmp_path):
    p = _write(tmp_path, "neg.csv", "arrival_s\n0\n-1\n")
    with pytest.raises(TraceError, match=r"neg\.csv: line 3: 'arrival_s': expected a time >= 0"):
        read_trace(p, "csv")


def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "nope.csv", "csv")
    empty = _write(tmp_path, "empty.csv", "")
    for fmt in FORMATS:
        with pytest.raises(TraceError, match="empty"):
            read_trace(empty, fmt)
    header_only = _write(tmp_path, "h.csv", "arrival_s,model\n")
    with pytest.raises(TraceError, match="no requests"):
        read_trace(header_only, "csv")
    with pytest.raises(TraceError) as e:
        read_trace(header_only, "parquet")
    msg = str(e.value)
    assert "parquet" in msg and all(f in msg for f in FORMATS)
    assert issubclass(TraceError, ValueError)


def test_azure_bad_timestamp_names_line(tmp_path):
    p = _write(tmp_path, "az.csv",
               "TIMESTAMP,ContextTokens,GeneratedTokens\n"
               "2023-11-16 18:17:03.9799600,10,1\n"
               "2023-11-16 18:17:05,12,2\n"
               "yesterday,10,1\n")
    with pytest.raises(TraceError, match=r"az\.csv: line 4: column 'TIMESTAMP'"):
        read_trace(p, "azure_llm")
    p = _write(tmp_path, "az2.csv",
               "TIMESTAMP,ContextTokens,GeneratedTokens\n"
               "2023-11-16 18:17:05,12,2\n"
               "2023-11-16 18:17:03.9799600,10,1\n")
    df = read_trace(p, "azure_llm")  # a time without fraction is fine; unsorted is sorted
    assert df["arrival_s"].tolist() == pytest.approx([0.0, 1.02004])
    assert df["input_tokens"].tolist() == [10, 12]
    p = _write(tmp_path, "az3.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:17:05,12\n")
    with pytest.raises(TraceError, match="GeneratedTokens"):
        read_trace(p, "azure_llm")


def test_mooncake_errors_name_line(tmp_path):
    good = '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n'
    p = _write(tmp_path, "m.jsonl", good + "\n" + '{"timestamp": 10, "input_length": 5}\n')
    with pytest.raises(TraceError, match=r"m\.jsonl: line 3: missing field 'output_length'"):
        read_trace(p, "mooncake")
    p = _write(tmp_path, "m2.jsonl", good + "{not json\n")
    with pytest.raises(TraceError, match=r"line 2: expected one JSON object"):
        read_trace(p, "mooncake")
    p = _write(tmp_path, "m3.jsonl", good + '{"timestamp": "x", "input_length": 5, "output_length": 1}\n')
    with pytest.raises(TraceError, match=r"line 2: field 'timestamp'"):
        read_trace(p, "mooncake")
    p = _write(tmp_path, "m4.jsonl",
               '{"timestamp": 2500, "input_length": 7, "output_length": 3, "model": "x"}\n'
               '{"timestamp": 500, "input_length": 5, "output_length": 1, "model": "y"}\n')
    df = read_trace(p, "mooncake")
    assert df["arrival_s"].tolist() == [0.5, 2.5] and df["model"].tolist() == ["y", "x"]


# --------------------------------------------------------------------------- #
# trace replay
# --------------------------------------------------------------------------- #
def test_rate_scale_halves_span():
    df = read_trace(AZURE_CONV, "azure_llm")
    span = df["arrival_s"].iloc[-1]
    t1, r1 = trace_arrivals(df, t_end=1e9)
    t2, r2 = trace_arrivals(df, t_end=1e9, rate_scale=2.0)
    assert t1.size == t2.size == len(df)
    assert t1[-1] == pytest.approx(span)
    assert t2[-1] == pytest.approx(span / 2)
    np.testing.assert_array_equal(r1, np.arange(len(df)))
    t3, _ = trace_arrivals(df, t_end=1e9, time_scale=3.0, rate_scale=1.5, t_start=100.0)
    assert t3[0] == 100.0 and t3[-1] == pytest.approx(100.0 + 2 * span)


def test_trace_arrivals_cut_at_t_end():
    df = read_trace(AZURE_CODE, "azure_llm")
    t, rows = trace_arrivals(df, t_end=1000.0, t_start=0.0)
    expected = int((df["arrival_s"] < 1000.0).sum())
    assert t.size == rows.size == expected
    assert t[-1] < 1000.0
    np.testing.assert_array_equal(t, df["arrival_s"].to_numpy()[rows])


def test_loop_fills_horizon():
    df = read_trace(AZURE_CONV, "azure_llm")
    a = df["arrival_s"].to_numpy()
    span, n = a[-1], len(a)
    period = span + span / (n - 1)
    horizon = 5.5 * period
    t, rows = trace_arrivals(df, t_end=horizon, loop=True)
    assert_valid(t, 0.0, horizon)
    # five full copies and about half of the sixth (the rate drifts within the trace)
    assert 5 * n < t.size < 6 * n
    assert horizon - t[-1] < 1.0  # the last arrival is close to the horizon
    # the sixth copy starts at 5 * period and replays row 0
    k = 5 * n
    assert t[k] == pytest.approx(5 * period) and rows[k] == 0
    # seam gap equals the mean gap
    assert t[n] - t[n - 1] == pytest.approx(span / (n - 1))
    np.testing.assert_array_equal(rows[:n], np.arange(n))
    # rows index into df
    np.testing.assert_allclose(t[n:2 * n] - period, a[rows[n:2 * n]])


def test_loop_with_offset_and_scale():
    df = pd.DataFrame({"arrival_s": [2.0, 3.0, 5.0], "input_tokens": [1, 2, 3], "output_tokens": [0, 0, 0]})
    # span 3, mean gap 1.5 -> period 4.5 trace seconds; rate_scale 2 -> 2.25 s
    t, rows = trace_arrivals(df, t_end=10.0, loop=True, rate_scale=2.0, t_start=1.0)
    np.testing.assert_allclose(t, [2.0, 2.5, 3.5, 4.25, 4.75, 5.75, 6.5, 7.0, 8.0, 8.75, 9.25])
    assert rows.tolist() == [0, 1, 2] * 3 + [0, 1]
    with pytest.raises(ValueError):
        trace_arrivals(df.iloc[:1], t_end=10.0, loop=True)
    with pytest.raises(ValueError):
        trace_arrivals(df, t_end=10.0, rate_scale=0.0)
    t, rows = trace_arrivals(df.iloc[:0], t_end=10.0, loop=True)
    assert t.size == rows.size == 0
