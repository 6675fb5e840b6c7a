"""Arrival processes as pure, vectorised numpy functions.

Every generator takes a ``numpy.random.Generator`` explicitly and keeps no
state of its own, so a run is reproducible from its seed alone. Each returns
a sorted float64 array of arrival times (seconds) in ``[t_start, t_end)``.
Rates are per second.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "poisson_arrivals",
    "gamma_arrivals",
    "diurnal_arrivals",
    "mmpp_on_off_arrivals",
    "rate_function",
    "cumulative_intensity",
]

_EMPTY = np.empty(0, dtype=np.float64)


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_finite_nonneg(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_window(t_start: float, t_end: float) -> tuple[float, float]:
    t_start, t_end = float(t_start), float(t_end)
    if not (math.isfinite(t_start) and math.isfinite(t_end)):
        raise ValueError(f"t_start and t_end must be finite, got {t_start!r}, {t_end!r}")
    if t_end < t_start:
        raise ValueError(f"t_end ({t_end}) must be >= t_start ({t_start})")
    return t_start, t_end


def _clip_window(times: np.ndarray, t_start: float, t_end: float) -> np.ndarray:
    """Drop values outside [t_start, t_end) caused by floating-point rounding."""
    if times.size and (times[0] < t_start or times[-1] >= t_end):
        times = times[(times >= t_start) & (times < t_end)]
    return times


# --------------------------------------------------------------------------- #
# homogeneous Poisson
# --------------------------------------------------------------------------- #
def poisson_arrivals(rng: np.random.Generator, rate: float, t_end: float,
                     t_start: float = 0.0) -> np.ndarray:
    """Homogeneous Poisson process with ``rate`` arrivals per second.

    Uses the order-statistics property: given N ~ Poisson(rate * T), the
    arrival times are N sorted uniforms on the window.
    """
    rate = _check_finite_nonneg("rate", rate)
    t_start, t_end = _check_window(t_start, t_end)
    span = t_end - t_start
    if rate == 0.0 or span == 0.0:
        return _EMPTY.copy()
    n = rng.poisson(rate * span)
    times = rng.random(n)
    times.sort()
    times *= span
    times += t_start
    return _clip_window(times, t_start, t_end)


# --------------------------------------------------------------------------- #
# gamma renewal process
# --------------------------------------------------------------------------- #
def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, t_end: float,
                   t_start: float = 0.0, *, stationary: bool = True) -> np.ndarray:
    """Renewal process with gamma inter-arrival times.

    Inter-arrival times have mean ``1/rate`` and coefficient of variation
    ``cv`` (gamma shape ``1/cv**2``, scale ``cv**2/rate``); ``cv=1`` is Poisson,
    ``cv>1`` is bursty, ``cv<1`` is more regular.

    With ``stationary=True`` (default) the process is started in equilibrium:
    the first arrival after ``t_start`` is the forward recurrence time, drawn
    as ``U * L`` where ``L`` is the length-biased interval ``Gamma(shape+1,
    scale)`` and ``U`` is uniform. The count over any window then has mean
    exactly ``rate * T``. With ``stationary=False`` the first gap is an
    ordinary inter-arrival time measured from ``t_start``.
    """
    rate = _check_finite_nonneg("rate", rate)
    cv = _check_positive("cv", cv)
    t_start, t_end = _check_window(t_start, t_end)
    span = t_end - t_start
    if rate == 0.0 or span == 0.0:
        return _EMPTY.copy()
    shape = 1.0 / (cv * cv)
    scale = (cv * cv) / rate

    if stationary:
        first = rng.random() * rng.gamma(shape + 1.0, scale)
    else:
        first = rng.gamma(shape, scale)
    if first >= span:
        return _EMPTY.copy()

    # Draw inter-arrival times in blocks sized to cover the window with high
    # probability; extend in the rare case they do not.
    expected = rate * (span - first)
    chunk = int(expected + 6.0 * math.sqrt(expected * cv * cv + 1.0) + 16)
    pieces = []
    pos = first
    while True:
        gaps = rng.gamma(shape, scale, size=chunk)
        offs = np.cumsum(gaps)
        offs += pos
        pieces.append(offs)
        pos = offs[-1]
        if pos >= span:
            break
        chunk = max(16, int(rate * (span - pos) * 1.5) + 16)
    rel = np.concatenate([np.array([first])] + pieces)
    n = np.searchsorted(rel, span, side="left")
    times = rel[:n]
    times += t_start
    return _clip_window(times, t_start, t_end)


# --------------------------------------------------------------------------- #
# diurnal (non-homogeneous Poisson)
# --------------------------------------------------------------------------- #
def _diurnal_params(rate: float, peak_to_trough: float, period: float,
                    hourly_weights: Sequence[float] | None) -> tuple[float, float, np.ndarray | None]:
    rate = _check_finite_nonneg("rate", rate)
    period = _check_positive("period", period)
    p = float(peak_to_trough)
    if math.isnan(p) or p < 1.0:
        raise ValueError(f"peak_to_trough must be >= 1 (max rate / min rate), got {peak_to_trough!r}")
    weights = None
    if hourly_weights is not None:
        if p != 1.0:
            raise ValueError("give either peak_to_trough or hourly_weights, not both")
        weights = np.asarray(hourly_weights, dtype=np.float64).ravel()
        if weights.size != 24:
            raise ValueError(f"hourly_weights must have 24 values (one per hour), got {weights.size}")
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise ValueError("hourly_weights must be finite and >= 0")
        total = weights.sum()
        if total <= 0:
            raise ValueError("hourly_weights must not all be zero")
        weights = weights * (weights.size / total)  # mean 1 over a period
    return rate, period, weights


def _amplitude(peak_to_trough: float) -> float:
    p = float(peak_to_trough)
    if math.isinf(p):
        return 1.0
    return (p - 1.0) / (p + 1.0)


def rate_function(t, rate: float, *, peak_to_trough: float = 1.0, period: float = 86400.0,
                  phase: float = 0.0, hourly_weights: Sequence[float] | None = None) -> np.ndarray:
    """Intensity (arrivals per second) of :func:`diurnal_arrivals` at time(s) ``t``.

    Sinusoid: ``rate * (1 + a*sin(2*pi*(t+phase)/period - pi/2))`` with
    ``a = (p-1)/(p+1)``, so ``t + phase = 0`` is the trough and
    ``t + phase = period/2`` the peak. With ``hourly_weights``: piecewise
    constant over each ``period/24`` slot, scaled so the mean is ``rate``.
    """
    rate, period, weights = _diurnal_params(rate, peak_to_trough, period, hourly_weights)
    t = np.asarray(t, dtype=np.float64)
    if weights is None:
        a = _amplitude(peak_to_trough)
        return rate * (1.0 - a * np.cos(2.0 * np.pi * (t + phase) / period))
    slot = np.floor(np.mod(t + phase, period) / (period / weights.size)).astype(np.int64)
    slot = np.clip(slot, 0, weights.size - 1)
    return rate * weights[slot]


def cumulative_intensity(t, rate: float, *, peak_to_trough: float = 1.0, period: float = 86400.0,
                         phase: float = 0.0, hourly_weights: Sequence[float] | None = None) -> np.ndarray:
    """Expected number of arrivals of :func:`diurnal_arrivals` in ``[0, t)``."""
    rate, period, weights = _diurnal_params(rate, peak_to_trough, period, hourly_weights)
    t = np.asarray(t, dtype=np.float64)
    if weights is None:
        a = _amplitude(peak_to_trough)
        w = 2.0 * np.pi / period
        return rate * (t - a / w * (np.sin(w * (t + phase)) - np.sin(w * phase)))
    return _pw_cumulative(t + phase, rate, period, weights) - _pw_cumulative(
        np.asarray(phase, dtype=np.float64), rate, period, weights)


def _pw_cumulative(x: np.ndarray, rate: float, period: float, weights: np.ndarray) -> np.ndarray:
    """Integral of the piecewise-constant intensity over [0, x) (x in shifted time)."""
    k = weights.size
    slot_len = period / k
    cum = np.concatenate([[0.0], np.cumsum(weights)]) * slot_len * rate  # per period
    n_per = np.floor(x / period)
    r = x - n_per * period
    slot = np.clip(np.floor(r / slot_len).astype(np.int64), 0, k - 1)
    within = r - slot * slot_len
    return n_per * cum[-1] + cum[slot] + within * rate * weights[slot]


def diurnal_arrivals(rng: np.random.Generator, rate: float, t_end: float, t_start: float = 0.0, *,
                     peak_to_trough: float = 1.0, period: float = 86400.0, phase: float = 0.0,
                     hourly_weights: Sequence[float] | None = None) -> np.ndarray:
    """Non-homogeneous Poisson process with a daily (periodic) rate profile.

    The intensity is :func:`rate_function`; its mean over a whole period is
    ``rate``. The sinusoid is sampled by thinning a Poisson process at the
    peak rate; hourly weights by inverting the piecewise-linear cumulative
    intensity (both exact and vectorised).
    """
    rate, period, weights = _diurnal_params(rate, peak_to_trough, period, hourly_weights)
    t_start, t_end = _check_window(t_start, t_end)
    if rate == 0.0 or t_end == t_start:
        return _EMPTY.copy()

    if weights is None:
        a = _amplitude(peak_to_trough)
        if a == 0.0:
            return poisson_arrivals(rng, rate, t_end, t_start)
        lam_max = rate * (1.0 + a)
        cand = poisson_arrivals(rng, lam_max, t_end, t_start)
        accept_p = (1.0 - a * np.cos(2.0 * np.pi * (cand + phase) / period)) / (1.0 + a)
        return cand[rng.random(cand.size) < accept_p]

    # Piecewise constant: breakpoints of the slots (in shifted time x = t + phase).
    k = weights.size
    slot_len = period / k
    x0, x1 = t_start + phase, t_end + phase
    first_slot = math.floor(x0 / slot_len)
    last_slot = math.ceil(x1 / slot_len)
    edges = np.arange(first_slot, last_slot + 1, dtype=np.float64) * slot_len
    edges[0], edges[-1] = x0, x1
    slot_idx = np.mod(np.arange(first_slot, last_slot, dtype=np.int64), k)
    seg_rate = rate * weights[slot_idx]
    seg_mass = seg_rate * np.diff(edges)
    cum = np.concatenate([[0.0], np.cumsum(seg_mass)])
    total = cum[-1]
    if total <= 0.0:
        return _EMPTY.copy()
    n = rng.poisson(total)
    u = rng.random(n)
    u.sort()
    u *= total
    seg = np.searchsorted(cum, u, side="right") - 1
    seg = np.clip(seg, 0, seg_rate.size - 1)
    # segments with zero rate have zero mass, so side="right" never selects them
    times = edges[seg] + (u - cum[seg]) / seg_rate[seg] - phase
    times = np.maximum.accumulate(times) if times.size else times  # guard rounding
    return _clip_window(times, t_start, t_end)


# --------------------------------------------------------------------------- #
# Markov-modulated on/off Poisson
# --------------------------------------------------------------------------- #
def mmpp_on_off_arrivals(rng: np.random.Generator, rate_on: float, rate_off: float,
                         mean_on: float, mean_off: float, t_end: float,
                         t_start: float = 0.0) -> np.ndarray:
    """Two-state Markov-modulated Poisson process (bursts).

    The modulating chain alternates between an *on* state (Poisson at
    ``rate_on``) and an *off* state (``rate_off``) with exponential sojourns
    of mean ``mean_on`` and ``mean_off`` seconds. It starts in its stationary
    distribution, so the long-run rate is
    ``(rate_on*mean_on + rate_off*mean_off) / (mean_on + mean_off)`` from the
    first second.
    """
    rate_on = _check_finite_nonneg("rate_on", rate_on)
    rate_off = _check_finite_nonneg("rate_off", rate_off)
    mean_on = _check_positive("mean_on", mean_on)
    mean_off = _check_positive("mean_off", mean_off)
    t_start, t_end = _check_window(t_start, t_end)
    span = t_end - t_start
    if span == 0.0 or (rate_on == 0.0 and rate_off == 0.0):
        return _EMPTY.copy()

    start_on = rng.random() < mean_on / (mean_on + mean_off)
    cycle = mean_on + mean_off
    # number of sojourns needed, with margin; extend if not enough
    n_soj = int(2.0 * span / cycle + 8.0 * math.sqrt(2.0 * span / cycle + 1.0) + 8)
    ends = []
    pos = 0.0
    parity = 0  # index offset of the next sojourn in the alternating sequence
    while True:
        idx = np.arange(parity, parity + n_soj)
        is_on = (idx % 2 == 0) if start_on else (idx % 2 == 1)
        means = np.where(is_on, mean_on, mean_off)
        d = rng.exponential(1.0, size=n_soj) * means
        e = np.cumsum(d)
        e += pos
        ends.append(e)
        pos = e[-1]
        parity += n_soj
        if pos >= span:
            break
        n_soj = int(2.0 * (span - pos) / cycle) + 16
    ends = np.concatenate(ends)
    m = int(np.searchsorted(ends, span, side="left")) + 1  # sojourns touching the window
    ends = ends[:m]
    ends[-1] = span
    starts = np.concatenate([[0.0], ends[:-1]])
    seg_on = (np.arange(m) % 2 == 0) if start_on else (np.arange(m) % 2 == 1)
    seg_rate = np.where(seg_on, rate_on, rate_off)
    lengths = ends - starts
    counts = rng.poisson(seg_rate * lengths)
    total = int(counts.sum())
    if total == 0:
        return _EMPTY.copy()
    times = np.repeat(starts, counts) + rng.random(total) * np.repeat(lengths, counts)
    times.sort()
    times += t_start
    return _clip_window(times, t_start, t_end)
