"""PNG figures of a run: latency CDFs (with their tail), a per-minute timeline, TTFT and TPOT.

Every figure is made with matplotlib's object API (:class:`matplotlib.figure.Figure`): no pyplot, so
capsim never chooses, changes or reads the backend (a notebook's inline plots keep working), and a
figure lives only as long as its object. In Jupyter a figure shows as a PNG (``_repr_png_``).

Sized for fleets: a CDF is drawn from quantiles (evenly spread, then geometric in the tail down to
1/n), not from every request; per-minute counts are step lines, not bars; at most ``MAX_LINES``
endpoints are drawn one by one, the rest summed as "others".
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import pandas as pd

    from ..api import Result

MAX_LINES = 8           # series drawn one by one in a figure; the rest are summed
STYLES = ("-", "--", "-.", ":")   # line styles of successive series (plans often overlap)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CDF_POINTS = 1000       # quantiles per part of a CDF (the body, then the tail)
TAIL_GUIDES = (0.9, 0.99, 0.999)


class PlotFigure(Figure):
    """A matplotlib Figure that Jupyter shows as a PNG, made without pyplot."""

    def _repr_png_(self) -> bytes:
        return png(self, dpi=100)


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kw) -> tuple[PlotFigure, Any]:
    """A figure and its axes (``Figure.subplots``), laid out by matplotlib's constrained layout (room kept
    for a legend placed outside the axes)."""
    fig = PlotFigure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, **kw)


def png(fig: Figure, dpi: int = 96) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# -- latency distributions ---------------------------------------------------------------------------------------
def quantile_curve(v: np.ndarray, points: int = CDF_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(x, q)``: the q-quantiles of the finite values of ``v`` (numpy's linear interpolation, as the
    summary's percentiles), q spread evenly up to 0.9, then geometrically towards 1 - 1/n, with the
    median, P90, P99 and P99.9 among them; every point (``q = k/n``) when there are few."""
    v = np.sort(v[np.isfinite(v)])
    n = len(v)
    if n == 0:
        return v, v
    if n <= 2 * points:
        return v, np.arange(1, n + 1) / n
    tail = 1.0 - np.logspace(-1.0, -np.log10(n), points)
    q = np.unique(np.concatenate([np.linspace(0.0, 0.9, points), tail, [0.5, 0.9, 0.99, 0.999, 1.0]]))
    pos = q * (n - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo]), q


def draw_latency(axes, series: Iterable[tuple[str, np.ndarray, dict]], slo_ms: float | None,
                 unit: str = "latency (ms)") -> None:
    """On ``axes`` (two axes): the CDF (left) and the complementary CDF on a log scale (right: the
    fraction slower than x, where P99 is the line at 10^-2) of each ``(label, values, line style)``,
    with the SLO as a vertical line."""
    cdf, ccdf = axes
    ymin = 1.0
    positive = False   # a log axis needs a value > 0 (a step model without a term can make every TPOT 0)
    for label, v, kw in series:
        x, q = quantile_curve(np.asarray(v, dtype=float))
        if not len(x):
            continue
        positive = positive or bool((x > 0).any())
        line, = cdf.plot(x, q, label=label, **kw)
        keep = q < 1.0
        ccdf.plot(x[keep], 1.0 - q[keep], color=line.get_color(), **{k: w for k, w in kw.items() if k != "color"})
        if keep.any():
            ymin = min(ymin, float((1.0 - q[keep]).min()))
    for ax in axes:
        if slo_ms:
            ax.axvline(slo_ms, color="red", ls="--", lw=1, label=f"SLO {slo_ms:g} ms" if ax is cdf else None)
        if positive:
            ax.set_xscale("log")
            log_ticks(ax.xaxis)
        ax.set_xlabel(unit)
        ax.grid(True, which="both", alpha=0.3)
    cdf.axhline(0.99, color="grey", ls=":", lw=0.8)
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("CDF")
    ccdf.set_yscale("log")
    ccdf.set_ylim(max(min(ymin, 1e-3) * 0.5, 1e-7), 1.05)
    for g in TAIL_GUIDES:
        ccdf.axhline(1.0 - g, color="grey", ls=":", lw=0.8)
        ccdf.annotate(f"P{g * 100:g}", (1.0, 1.0 - g), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                      textcoords="offset points", ha="right", fontsize="x-small", color="grey")
    ccdf.set_ylabel("fraction slower than x")
    ccdf.set_title("tail (complementary CDF, log)")


def log_ticks(axis) -> None:
    """Plain labels at 1, 2 and 5 of each decade on a log axis (10, 20, 50, 100, ...), no minor labels: a
    narrow range (TPOT from 11 to 22 ms) is labelled without the overlapping "2 x 10^1" of the default."""
    from matplotlib import ticker

    axis.set_major_locator(ticker.LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.10g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def outside_legend(fig: Figure, axes, title: str | None = None) -> None:
    """One legend for the figure, right of the axes: it hides no point. Duplicate labels are shown once."""
    seen: dict[str, Any] = {}
    for ax in np.atleast_1d(axes).ravel():
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize="small", title=title)


def slo_ms(slo: Any) -> float | None:
    """The latency target drawn on the figures, from an SLO block ``{"p99_ms": 500.0, ...}`` (summary.json's
    and compare.json's ``slo``): the P99 target, else the first one given."""
    if isinstance(slo, dict):
        for k in ("p99_ms", "p90_ms", "p50_ms", "mean_ms"):
            if slo.get(k) is not None:
                return float(slo[k])
    return None


# -- per minute --------------------------------------------------------------------------------------------------
def p99_per_minute(arrival_s: np.ndarray, latency_ms: np.ndarray, group: np.ndarray | None = None,
                   q: float = 0.99) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(group, minute, quantile)`` of the latencies by arrival minute (and ``group``, integer codes),
    with numpy's linear interpolation. The rows are grouped by one stable sort of their (small integer)
    keys, a radix sort; each group's two order statistics around the quantile are then found by a partial
    sort (``np.partition``): the same values as sorting every group, at a fraction of the cost on millions
    of rows."""
    minute = (np.asarray(arrival_s, dtype=float) // 60.0).astype(np.int64)
    lat = np.asarray(latency_ms, dtype=float)
    g = np.zeros(len(lat), dtype=np.int64) if group is None else np.asarray(group, dtype=np.int64)
    if not len(lat):
        return g, minute, lat
    key = g * (int(minute.max()) + 1) + minute
    order = np.argsort(key.astype(np.int16) if 0 <= key.min() and key.max() < 2 ** 15 else key, kind="stable")
    k = key[order]
    v = lat[order]
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    counts = np.diff(np.r_[starts, len(k)])
    pos = starts + q * (counts - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, starts + counts - 1)
    v_lo, v_hi = np.empty(len(starts)), np.empty(len(starts))
    for j, (s, e, a, b) in enumerate(zip(starts.tolist(), (starts + counts).tolist(), lo.tolist(), hi.tolist())):
        part = np.partition(v[s:e], (a - s, b - s) if b != a else a - s)
        v_lo[j], v_hi[j] = part[a - s], part[b - s]
    val = v_lo + (pos - lo) * (v_hi - v_lo)
    first = order[starts]
    return g[first], minute[first], val


# Per-minute panels of a timeline: column, axis label, how the endpoints' values combine ("sum", or the
# column that weights a ratio).
PANELS = (("invocations", "invocations / min", "sum"),
          ("in_flight", "requests in flight\n(queued + serving)", "sum"),
          ("instances", "instances in service", "sum"),
          ("gpu_utilization", "GPU utilisation (%)\n100 per busy GPU", "instances"),
          ("p99_ms", "P99 latency (ms)\nby arrival minute", None),
          ("loaded_models", "loaded models (copies)", "sum"),
          ("gpu_memory_utilization", "GPU memory utilisation", "instances"),
          ("model_cache_hit", "cache hit rate", "invocations"),
          ("cold_starts", "cold starts / min", "sum"),
          ("failed_requests", "failed requests / min", "sum"))


def sum_endpoints(tl: "pd.DataFrame") -> "pd.DataFrame":
    """Endpoints of one run summed per minute: counts added, ratios weighted (GPU busy share and memory
    by instances, hit rate by invocations)."""
    import pandas as pd

    t_s = tl["t_s"].to_numpy()
    counts = [c for c, _, w in PANELS if w == "sum" and c in tl.columns]
    out = tl.groupby("t_s", sort=True)[counts].sum()
    for col, _, w in PANELS:
        if w in (None, "sum") or col not in tl.columns or w not in tl.columns:
            continue
        v = tl[col].to_numpy(dtype=float)
        wt = tl[w].to_numpy(dtype=float)
        ok = np.isfinite(v) & (wt > 0)
        num = pd.Series(np.where(ok, v * wt, 0.0)).groupby(t_s).sum()
        den = pd.Series(np.where(ok, wt, 0.0)).groupby(t_s).sum()
        out[col] = (num / den.where(den > 0)).reindex(out.index).to_numpy()
    return out.reset_index()


def timeline_panels(series: dict[str, "pd.DataFrame"], p99: dict[str, tuple[np.ndarray, np.ndarray]],
                    warmup: float, title: str, slo: float | None = None,
                    failures: Iterable[float] = ()) -> PlotFigure:
    """One panel per figure of :data:`PANELS` that has data, one step line per entry of ``series`` (an
    endpoint or a plan: its timeline rows) and of ``p99`` (its ``(minute, P99 ms)``); the SLO on the P99
    panel, the warmup shaded, instance failures (simulated seconds) as red lines."""
    panels = [p for p in PANELS if (p[0] == "p99_ms" and any(len(m) for m, _ in p99.values()))
              or any(p[0] in g.columns and np.isfinite(g[p[0]].to_numpy(dtype=float)).any()
                     and (p[0] not in ("cold_starts", "failed_requests", "loaded_models")
                          or (g[p[0]].to_numpy(dtype=float) > 0).any()) for g in series.values())]
    fig, axes = new_figure((10, 1.7 * len(panels) + 1.2), len(panels), 1, sharex=True, squeeze=False)
    axes = axes[:, 0]
    for k, (label, g) in enumerate(series.items()):
        style = {"ls": STYLES[k % len(STYLES)], "lw": 1.3, "color": f"C{k % 10}"}
        m = g["t_s"].to_numpy() / 60.0
        for ax, (col, _, _) in zip(axes, panels):
            if col == "p99_ms":
                pm, pv = p99.get(label, ((), ()))
                if len(pm):
                    _steps(ax, np.asarray(pm, dtype=float), np.asarray(pv, dtype=float), str(label), style)
            elif col in g.columns and len(m):
                _steps(ax, m, g[col].to_numpy(dtype=float), str(label), style)
    fail = np.asarray(sorted(failures), dtype=float) / 60.0
    for ax, (col, ylabel, w) in zip(axes, panels):
        ax.set_ylabel(ylabel, fontsize="small")
        ax.grid(True, alpha=0.3)
        if col == "p99_ms":
            ax.set_yscale("log")
            log_ticks(ax.yaxis)
            if slo:
                ax.axhline(slo, color="red", ls="--", lw=1, label=f"SLO {slo:g} ms")
        elif col in ("gpu_memory_utilization", "model_cache_hit"):
            ax.set_ylim(-0.02, 1.05)
        else:   # from zero, so that a few percent of noise does not look like a swing
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.0) * 1.08)
        if warmup > 0:
            ax.axvspan(0, warmup / 60.0, color="grey", alpha=0.15, lw=0)
        if len(fail):
            ax.vlines(fail, 0, 1, transform=ax.get_xaxis_transform(), color="red", alpha=0.5, lw=1)
    axes[-1].set_xlabel("simulated minutes (shaded: warmup" + ("; red lines: instance failures)" if len(fail) else ")"))
    outside_legend(fig, axes)
    fig.suptitle(title)
    return fig


def _steps(ax, minute: np.ndarray, v: np.ndarray, label: str, style: dict) -> None:
    """Per-minute values as one step line (a Line2D: cheap to lay out, unlike a patch per bar or a StepPatch),
    each minute drawn to its end; a missing minute (no request in it) is a gap."""
    if not len(minute):
        return
    end = minute[-1] + 1.0
    full = np.arange(minute[0], end + 1.0)
    idx = np.searchsorted(minute, full[:-1])
    y = np.full(len(full), np.nan)
    hit = (idx < len(minute)) & (minute[np.minimum(idx, len(minute) - 1)] == full[:-1])
    y[:-1][hit] = v[idx[hit]]
    y[-1] = y[-2]
    ax.plot(full, y, drawstyle="steps-post", label=label, **style)


def busiest(counts: dict[str, float], k: int = MAX_LINES) -> list[str]:
    return sorted(counts, key=lambda n: -(counts[n] or 0))[:k]


def split_series(series: dict[str, Any], keep: list[str], combine) -> dict[str, Any]:
    """``series`` with those not in ``keep`` combined into one entry (when more than :data:`MAX_LINES`)."""
    if len(series) <= MAX_LINES:
        return series
    rest = [n for n in series if n not in keep]
    return {**{n: series[n] for n in series if n in keep}, f"{len(rest)} others (total)": combine(rest)}


# -- a Result's figures (plots/) ---------------------------------------------------------------------------------
def _first_replication(df: "pd.DataFrame") -> "pd.DataFrame":
    return df[df["replication"] == 0] if "replication" in df.columns else df


def _measured_ok(req: "pd.DataFrame", warmup: float, horizon: float,
                 columns: list[str] | None = None) -> "pd.DataFrame":
    """The completed requests of the measured horizon; ``columns``: only those (a fleet's table has
    millions of rows: taking two columns is a fraction of taking all)."""
    a = req["arrival_s"].to_numpy()
    keep = (req["status"] == "ok").to_numpy() & (a >= warmup) & (a < horizon)
    return (req if columns is None else req[columns])[keep]


def latency_cdf(result: "Result") -> PlotFigure:
    """Latency of the completed requests over the measured horizon: the CDF and its tail (complementary
    CDF, log), all requests and the busiest endpoints, with the SLO."""
    req = _first_replication(result.requests)
    spec = result.scenario.spec
    ok = _measured_ok(req, spec.warmup, result.scenario.horizon, ["latency_ms", "endpoint"])
    fig, axes = new_figure((11, 4.2), 1, 2)
    series = [("all requests", ok["latency_ms"].to_numpy(), {"color": "black", "lw": 2})]
    eps = result.summary.get("endpoints", {})
    if len(eps) > 1:
        lat, code = ok["latency_ms"].to_numpy(), ok["endpoint"].cat.codes.to_numpy()
        cats = list(ok["endpoint"].cat.categories)
        for k, ep in enumerate(busiest({n: b.get("requests") for n, b in eps.items()})):
            series.append((ep, lat[code == cats.index(ep)], {"lw": 1, "ls": STYLES[k % len(STYLES)]}))
    draw_latency(axes, series, slo_ms(result.summary.get("slo")))
    outside_legend(fig, axes)
    more = f" (the busiest {MAX_LINES} of {len(eps)} endpoints)" if len(eps) > MAX_LINES else ""
    fig.suptitle(f"{result.scenario.name}: latency of completed requests, measured horizon{more}")
    return fig


def run_timeline(tl: "pd.DataFrame", req: "pd.DataFrame | None", counts: dict[str, float], warmup: float,
                 title: str, slo: float | None, failures: Iterable[float] = ()) -> PlotFigure:
    """A run's timeline: the busiest endpoints one by one, the others summed; P99 per arrival minute of the
    completed requests."""
    import pandas as pd

    series = {str(ep): g for ep, g in tl.groupby("endpoint", sort=False, observed=True)}
    keep = busiest(counts)
    series = split_series(series, keep, lambda rest: sum_endpoints(pd.concat([series[n] for n in rest])))
    p99: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if req is not None and len(req):
        ok = req[["arrival_s", "latency_ms", "endpoint"]][(req["status"] == "ok").to_numpy()]
        names = [str(c) for c in ok["endpoint"].cat.categories] if hasattr(ok["endpoint"], "cat") else None
        if names is None:
            names = sorted(ok["endpoint"].astype(str).unique())
            code = pd.Categorical(ok["endpoint"].astype(str), categories=names).codes
        else:
            code = ok["endpoint"].cat.codes.to_numpy()
        others = next((k for k in series if k.endswith(" others (total)")), None) if len(series) < len(names) \
            else None
        label_of = [n if n in series else others for n in names]
        labels = [x for x in dict.fromkeys(label_of) if x is not None]
        index = np.array([labels.index(x) if x is not None else -1 for x in label_of], dtype=np.int64)
        group = index[code]
        keep_rows = group >= 0
        ok, group = ok[keep_rows], group[keep_rows]
        g, m, v = p99_per_minute(ok["arrival_s"].to_numpy(), ok["latency_ms"].to_numpy(), group)
        for k, lab in enumerate(labels):
            sel = g == k
            p99[lab] = (m[sel], v[sel])
    return timeline_panels(series, p99, warmup, title, slo, failures)


def timeline_figure(result: "Result") -> PlotFigure:
    """One figure to read at a glance, per minute: load, requests in flight, instances, GPU busy share, P99
    (with the SLO), loaded models, cache hits, cold starts and failed requests, per endpoint (the busiest
    ones; the others summed)."""
    tl = _first_replication(result.timeline)
    req = _first_replication(result.requests)
    eps = result.summary.get("endpoints", {})
    failures = tl.loc[tl["failures"] > 0, "t_s"].to_numpy() if "failures" in tl.columns else ()
    return run_timeline(tl, req, {n: b.get("requests") for n, b in eps.items()}, result.scenario.spec.warmup,
                        f"{result.scenario.name}: timeline", slo_ms(result.summary.get("slo")), failures)


def token_figure(result: "Result") -> PlotFigure:
    """TTFT and TPOT of the language models' completed requests (measured horizon): each CDF and its tail,
    with their SLOs."""
    req = _first_replication(result.requests)
    ok = _measured_ok(req, result.scenario.spec.warmup, result.scenario.horizon, ["ttft_ms", "tpot_ms", "endpoint"])
    ok = ok[ok["ttft_ms"].notna()]
    slo = result.summary.get("slo") or {}
    fig, axes = new_figure((11, 7.5), 2, 2)
    for row, (col, label) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"))):
        series = [("all", ok[col].to_numpy(dtype=float), {"color": "black", "lw": 2})]
        if ok["endpoint"].nunique() > 1:
            for k, (ep, grp) in enumerate(ok.groupby("endpoint", observed=True)):
                if k < MAX_LINES:
                    series.append((str(ep), grp[col].to_numpy(dtype=float), {"lw": 1, "ls": STYLES[k % 4]}))
        draw_latency(row, series, slo.get(col), unit=f"{label} (ms)")
        row[0].set_title(f"{label}: CDF")
        row[1].set_title(f"{label}: tail (complementary CDF, log)")
    outside_legend(fig, axes)
    fig.suptitle(f"{result.scenario.name}: time to first token and time per output token")
    return fig


def save_run_plots(result: "Result", out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    makers = [("latency_cdf.png", latency_cdf), ("timeline.png", timeline_figure)]
    if "ttft_ms" in result.requests and result.requests["ttft_ms"].notna().any():
        makers.append(("ttft_tpot.png", token_figure))
    for name, make in makers:
        p = out / name
        make(result).savefig(p, dpi=110)
        paths.append(p)
    return paths
