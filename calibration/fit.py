"""Robust linear fits for load times and service times.

All fits are linear in their coefficients, non-negative, and robust:
scipy.optimize.least_squares with loss="soft_l1" on LOG residuals
(log prediction - log sample: timing noise is multiplicative, it grows with
the time, and a sample 5x too slow weighs like one 5x too fast), started
from Theil-Sen (one regressor) or ordinary least squares (several).
The soft_l1 scale is 1.4826 x the MAD of the starting residuals, so samples
far outside the bulk (a neighbour's burst of CPU work, a truly cold first
read) weigh little.

Goodness: `r2` is the coefficient of determination of the fit against the
per-configuration MEDIAN times (the quantity the simulator draws around);
`r2_samples` is the same against every raw sample (lower when repeats are
noisy). Both are reported; `fits.*.r2` in the profile is the former.
"""
from __future__ import annotations

import numpy as np
from scipy import optimize, stats


def _r2(y, pred) -> float | None:
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    if y.size < 2:
        return None
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    ss_res = float(np.sum((y - pred) ** 2))
    if ss_tot <= 0:
        return 1.0 if ss_res <= 1e-30 else 0.0
    return 1.0 - ss_res / ss_tot


def robust_linear(X, y, *, intercept: bool = True) -> dict:
    """Fit y ~ b0 + X @ b (all coefficients >= 0). X: [n, k] (or [n]).
    Returns {"coef": [b0, b1, ...], "r2", "r2_samples", "n", "groups",
    "rel_resid_mad", "cost", "success"}."""
    X = np.asarray(X, float)
    if X.ndim == 1:
        X = X[:, None]
    y = np.asarray(y, float)
    ok = np.isfinite(y) & (y > 0) & np.all(np.isfinite(X), axis=1)
    X, y = X[ok], y[ok]
    n, k = X.shape
    A = np.hstack([np.ones((n, 1)), X]) if intercept else X
    p = A.shape[1]
    if n < p:
        raise ValueError(f"need at least {p} samples to fit {p} coefficients, got {n}")

    # starting point
    if k == 1 and intercept and len(np.unique(X[:, 0])) >= 2:
        slope, icept, _, _ = stats.theilslopes(y, X[:, 0])
        x0 = np.array([icept, slope])
    else:
        x0 = np.linalg.lstsq(A / y[:, None], np.ones(n), rcond=None)[0]
    lo = np.full(p, 1e-12)
    # a start on or above the bounds, however small the times (sub-ms loads)
    x0 = np.maximum(x0, np.maximum(lo, 1e-9 * float(np.median(y))))

    def resid(beta):
        return np.log(np.maximum(A @ beta, 1e-300)) - logy

    logy = np.log(y)

    r0 = resid(x0)
    scale = max(1.4826 * float(np.median(np.abs(r0 - np.median(r0)))), 0.01)
    res = optimize.least_squares(resid, x0, loss="soft_l1", f_scale=scale,
                                 bounds=(lo, np.full(p, np.inf)), method="trf")
    beta = res.x
    pred = A @ beta

    # per-configuration medians for r2
    keys = [tuple(row) for row in X]
    groups = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    med_y = np.array([np.median(y[idx]) for idx in groups.values()])
    med_pred = np.array([pred[idx[0]] for idx in groups.values()])
    rel = (pred - y) / y
    return {
        "coef": [float(b) for b in beta],
        "r2": _r2(med_y, med_pred),
        "r2_samples": _r2(y, pred),
        "n": int(n),
        "groups": len(groups),
        "rel_resid_mad": float(np.median(np.abs(rel - np.median(rel)))),
        "f_scale": scale,
        "success": bool(res.success),
    }


def fit_load(sizes_gb, times_s) -> dict:
    """time = a_s + size_gb / bandwidth_gbs. Returns the profile layout
    {"a_s", "bandwidth_gbs", "r2", "n"} plus diagnostics ("r2_samples", ...)."""
    r = robust_linear(np.asarray(sizes_gb, float), np.asarray(times_s, float))
    a, s = r["coef"]
    # a flat fit (no measurable size effect) would mean infinite bandwidth:
    # cap at 1e9 GB/s so that the profile stays finite JSON; r2 tells.
    bw = 1.0 / max(s, 1e-9)
    return {"a_s": a, "bandwidth_gbs": bw, "r2": r["r2"], "n": r["n"],
            "r2_samples": r["r2_samples"], "groups": r["groups"],
            "rel_resid_mad": r["rel_resid_mad"], "success": r["success"]}


def fit_service(X, y_ms, names) -> dict:
    """Service time (ms) = base_ms + sum(coef_i * X_i). names: the keys of the
    X columns (e.g. ["per_input_token_ms", "per_output_token_ms"])."""
    r = robust_linear(X, y_ms)
    out = {"base_ms": r["coef"][0]}
    for name, c in zip(names, r["coef"][1:]):
        out[name] = c
    out.update({"r2": r["r2"], "r2_samples": r["r2_samples"], "n": r["n"],
                "groups": r["groups"], "rel_resid_mad": r["rel_resid_mad"]})
    return out


SUSTAINED_MIN_SPAN_S = 0.5   # a sustained-load fit needs samples this far into busy periods
SUSTAINED_MIN_EFFECT = 0.03  # and a speed change at least this large, else there is none to model


def fit_sustained(busy_s, times_s) -> dict | None:
    """time = base * (factor + (1 - factor) * exp(-busy / time_constant)): how the service time of a
    request changes with how long its server had been busy without a break when it started
    (``busy``). Robust (soft_l1 on log residuals, as above). Returns {"factor", "time_constant_s",
    "base_s", "n", "rel_resid_mad"}, or None when the samples do not reach SUSTAINED_MIN_SPAN_S into
    busy periods or the change is under SUSTAINED_MIN_EFFECT."""
    b, y = np.asarray(busy_s, float), np.asarray(times_s, float)
    ok = np.isfinite(b) & np.isfinite(y) & (y > 0) & (b >= 0)
    b, y = b[ok], y[ok]
    long = b >= SUSTAINED_MIN_SPAN_S
    if long.sum() < 20 or (~long).sum() < 20:
        return None
    logy = np.log(y)

    def shape(x):
        f, tau = x[1], np.exp(x[2])
        return np.log(f + (1.0 - f) * np.exp(-b / tau))

    def resid(x):
        return x[0] + shape(x) - logy

    start = float(np.median(logy[b <= 0.05])) if (b <= 0.05).sum() >= 10 else float(np.median(logy[~long]))
    x0 = np.array([start, float(np.exp(np.median(logy[long]) - start)), np.log(0.3)])
    x0[1] = min(max(x0[1], 0.55), 1.9)
    r0 = resid(x0)
    scale = max(1.4826 * float(np.median(np.abs(r0 - np.median(r0)))), 0.01)
    # A time constant beyond the longest busy period seen (>= SUSTAINED_MIN_SPAN_S, above the start)
    # cannot be told from a slope: bounded there.
    top = np.log(float(b.max()))
    res = optimize.least_squares(resid, x0, loss="soft_l1", f_scale=scale, method="trf",
                                 bounds=([-np.inf, 0.5, np.log(1e-3)], [np.inf, 2.0, top]))
    base, f, tau = float(np.exp(res.x[0])), float(res.x[1]), float(np.exp(res.x[2]))
    if abs(1.0 - f) < SUSTAINED_MIN_EFFECT:
        return None
    rel = np.expm1(resid(res.x))
    return {"factor": f, "time_constant_s": tau, "base_s": base, "n": int(y.size),
            "rel_resid_mad": float(np.median(np.abs(rel - np.median(rel))))}


def warmth(begin_s, end_s, server, time_constant: float, rest_time_constant: float) -> np.ndarray:
    """Per request, its server's state ``w`` at its start (1 at rest): while a server serves requests
    ``w`` decays as exp(-t / time_constant); over a rest of ``g`` (no request in service: idle, or a
    load) it comes back to 1 - (1 - w) * exp(-g / rest_time_constant), to 1 when that is 0. The
    simulator's ``service.sustained`` (sim.hosting.device) walks the same recursion. Requests in any
    order; one server serves its requests one at a time."""
    b, e, s = np.asarray(begin_s, float), np.asarray(end_s, float), np.asarray(server)
    out = np.empty(b.size)
    for srv in np.unique(s):
        idx = np.flatnonzero(s == srv)
        idx = idx[np.argsort(b[idx], kind="stable")]
        w = 1.0
        decay = np.exp(-(e[idx] - b[idx]) / time_constant)
        gaps = b[idx] - np.r_[-np.inf, e[idx][:-1]]
        back = np.exp(-gaps / rest_time_constant) if rest_time_constant > 0 else np.zeros(idx.size)
        for k, j in enumerate(idx):
            if gaps[k] > 0:
                w = 1.0 - (1.0 - w) * back[k]
            out[j] = w
            w *= decay[k]
    return out


def fit_warmth(begin_s, end_s, server, times_s, fitted=None, group=None) -> dict | None:
    """time = base * (factor + (1 - factor) * w), ``w`` from :func:`warmth`: how a request's
    service time depends on how long its server had been serving and how long it had rested, from
    replayed requests (``begin``/``end``: each one's time on its server, ``server``: which;
    ``times``: its service time, end - begin). ``fitted`` (a mask) picks the requests whose times
    are fitted (one model's); every request moves its server's state. ``group`` (per request, e.g.
    which replay) gives each group a base of its own: a machine whose speed drifts between replays
    minutes apart shares the shape (factor and time constants) across them, not the level. Robust
    (soft_l1 on log residuals, as above), from three starting rest time constants. Returns
    {"factor", "time_constant_s", "rest_time_constant_s", "base_s" (the last group's), "n",
    "rel_resid_mad"}, or None when no busy period reaches SUSTAINED_MIN_SPAN_S, fewer than 20
    requests find their server at rest, or the change is under SUSTAINED_MIN_EFFECT."""
    b, e, y = np.asarray(begin_s, float), np.asarray(end_s, float), np.asarray(times_s, float)
    s = np.asarray(server)
    mask = np.ones(b.size, bool) if fitted is None else np.asarray(fitted, bool)
    _, g = np.unique(np.zeros(b.size) if group is None else np.asarray(group), return_inverse=True)
    w_rest = warmth(b, e, s, 0.2, 0.0)          # 1 at each rest: which requests began one
    busy_for = -0.2 * np.log(np.maximum(w_rest, 1e-300))
    if busy_for.max(initial=0.0) < SUSTAINED_MIN_SPAN_S or (mask & (w_rest == 1.0)).sum() < 20:
        return None
    ok = mask & np.isfinite(y) & (y > 0)
    logy, g = np.log(y[ok]), g[ok]
    n_g = int(g.max()) + 1

    def resid(x):
        w = warmth(b, e, s, np.exp(x[1]), np.exp(x[2]))[ok]
        return x[3:][g] + np.log(x[0] + (1.0 - x[0]) * w) - logy

    rest = w_rest[ok] == 1.0
    start = [float(np.median(logy[(g == k) & rest] if ((g == k) & rest).any() else logy[g == k]))
             for k in range(n_g)]
    long = busy_for[ok] >= SUSTAINED_MIN_SPAN_S
    f0 = float(np.exp(np.median(logy[long] - np.asarray(start)[g[long]]))) if long.any() else 1.0
    # A time constant beyond the longest busy period seen cannot be told from a slope: bounded there.
    # Nor a rest time constant beyond the longest spacing of requests seen.
    longest_rest = max((float(np.max(np.diff(np.sort(b[s == v])), initial=0.0)) for v in np.unique(s)),
                       default=0.0)
    lo = [0.5, np.log(1e-3), np.log(1e-4)] + [-np.inf] * n_g
    hi = [2.0, np.log(busy_for.max()), np.log(max(longest_rest, 2e-4))] + [np.inf] * n_g
    x0 = np.array([min(max(f0, 0.55), 1.9), np.log(0.3), np.log(0.05)] + start)
    r0 = resid(x0)
    scale = max(1.4826 * float(np.median(np.abs(r0 - np.median(r0)))), 0.01)
    best = None
    for rest0 in (0.005, 0.05, 0.5):
        x0[2] = min(np.log(rest0), hi[2])
        res = optimize.least_squares(resid, x0, loss="soft_l1", f_scale=scale, method="trf", bounds=(lo, hi))
        if best is None or res.cost < best.cost:
            best = res
    f = float(best.x[0])
    if abs(1.0 - f) < SUSTAINED_MIN_EFFECT:
        return None
    rel = np.expm1(resid(best.x))
    return {"factor": f, "time_constant_s": float(np.exp(best.x[1])),
            "rest_time_constant_s": float(np.exp(best.x[2])), "base_s": float(np.exp(best.x[-1])),
            "n": int(ok.sum()), "rel_resid_mad": float(np.median(np.abs(rel - np.median(rel))))}


STEP_TERMS = ("base", "per_prefill_token", "per_decode_seq", "per_kv_token")


def fit_step(X, y_s, *, robust: bool = False, weights=None) -> dict:
    """Step time (s) = base + per_prefill_token * p + per_decode_seq * n + per_kv_token * K, from rows
    ``X`` = [p, n, K] and times ``y_s``: non-negative least squares (scipy.optimize.nnls) on relative
    residuals (each row divided by its time: timing noise is multiplicative, and a long step must not
    drown the short ones), the columns scaled to a common range for the solver. A coefficient the data
    do not support comes out 0, never negative. ``weights`` (one per row, > 0): how much each row's
    squared relative residual counts (the testbed weighs each step by the sequences in it: a step's
    time is felt once by each of them). With ``robust``, rows whose log residual lies more
    than 4 x 1.4826 MAD (at least 25%) from the median are left out and the fit is made again: steps
    that a neighbour's burst of CPU work stretched.

    Returns the four coefficients (seconds), ``r2`` (coefficient of determination of the times),
    ``rel_err`` (mean |predicted - measured| / measured, under the weights), ``rel_err_max``, ``n`` (rows fitted) and
    ``dropped`` (rows left out)."""
    X = np.asarray(X, float).reshape(-1, 3)
    y = np.asarray(y_s, float)
    w = np.ones(y.size) if weights is None else np.asarray(weights, float)
    ok = (np.isfinite(y) & (y > 0) & np.all(np.isfinite(X), axis=1) & np.all(X >= 0, axis=1)
          & np.isfinite(w) & (w > 0))
    X, y, w = X[ok], y[ok], w[ok]
    if y.size < 4:
        raise ValueError(f"need at least 4 step times to fit 4 coefficients, got {y.size}")
    A = np.hstack([np.ones((y.size, 1)), X])
    scale = np.max(np.abs(A), axis=0)
    scale[scale == 0] = 1.0

    def solve(rows):
        sw = np.sqrt(w[rows])
        coef, _ = optimize.nnls(A[rows] / scale * (sw / y[rows])[:, None], sw)
        return coef / scale

    rows = np.ones(y.size, bool)
    coef = solve(rows)
    if robust:
        r = np.log(np.maximum(A @ coef, 1e-300) / y)
        dev = np.abs(r - np.median(r))
        keep = dev <= max(4 * 1.4826 * float(np.median(dev)), np.log(1.25))
        if keep.sum() >= 4 and not keep.all():
            rows = keep
            coef = solve(rows)
    pred = A[rows] @ coef
    rel = np.abs(pred - y[rows]) / y[rows]
    return {**dict(zip(STEP_TERMS, (float(c) for c in coef))), "r2": _r2(y[rows], pred),
            "rel_err": float(np.average(rel, weights=w[rows])), "rel_err_max": float(rel.max()), "n": int(rows.sum()),
            "dropped": int((~rows).sum())}
