"""``capsim report DIR``: one self-contained HTML page for a run or a comparison.

A run directory holds ``summary.json``, ``requests.parquet`` and
``timeline.csv`` (``capsim run``); a comparison directory holds
``compare.json`` and each plan's run under ``runs/<plan>/`` (``capsim
compare``). The page embeds its figures as base64 PNG (no file or network
reference: it can be mailed or attached as it is); the same PNGs are written
to ``DIR/plots/report_*.png``. A small inline script counts the figures the
browser decoded and shows it at the top of the page.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import math

import numpy as np
import pandas as pd

from ..api import atomic_write
from ..scenario.errors import ScenarioError
from . import plots
from .plots import MAX_LINES


@dataclass
class Figure:
    name: str           # file stem under plots/
    title: str
    caption: str
    png: bytes


# -- reading ---------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ScenarioError(f"cannot read {path.name} ({e})", source=str(path)) from None


def _read_run(d: Path) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    summary = _read_json(d / "summary.json")
    req = tl = None
    if (d / "requests.parquet").exists():
        cols = ["endpoint", "arrival_s", "latency_ms", "status", "cold", "ttft_ms", "tpot_ms"]
        req = pd.read_parquet(d / "requests.parquet")
        req = req[[c for c in cols + ["replication"] if c in req.columns]]
        if "replication" in req.columns:
            req = req[req["replication"] == 0]
    if (d / "timeline.csv").exists():
        tl = pd.read_csv(d / "timeline.csv")
        if "replication" in tl.columns:
            tl = tl[tl["replication"] == 0]
    return summary, req, tl


def _measured_ok(req: pd.DataFrame, summary: dict) -> pd.DataFrame:
    t0 = summary.get("warmup_seconds", 0.0)
    t1 = t0 + summary.get("simulated_seconds", np.inf)
    return req[(req["status"] == "ok") & (req["arrival_s"] >= t0) & (req["arrival_s"] < t1)]


# -- figures ---------------------------------------------------------------------------------------------------------
def _slo_text(slo: Any) -> str:
    if not isinstance(slo, dict) or not slo:
        return "none"
    return ", ".join(f"{k.removesuffix('_ms')} <= {v:g} ms" for k, v in slo.items())


def _run_slo(d: Path, summary: dict) -> dict | None:
    """The SLO of a run directory, as compare.json writes it (``{"p99_ms": ...}``).

    summary.json's ``slo`` (the targets the scenario set; empty: none). A summary.json written
    before it carried one: from the scenario, a ``scenario.yaml`` in the run directory, else,
    for a comparison's ``runs/<plan>/``, the plan's scenario file (``plans/<plan>.yaml``) or
    the comparison's ``slo``. None when nothing says."""
    if isinstance(summary.get("slo"), dict):
        return dict(summary["slo"]) or None
    import yaml

    from ..scenario.units import parse_duration

    candidates = [d / "scenario.yaml"]
    if d.parent.name == "runs":
        candidates.append(d.parent.parent / "plans" / f"{d.name}.yaml")
    for f in candidates:
        if f.is_file():
            try:
                slo = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("slo")
                if isinstance(slo, dict) and slo:
                    return {f"{k}_ms": parse_duration(v) * 1e3 for k, v in slo.items() if v is not None}
            except (OSError, ValueError, yaml.YAMLError):
                continue
    cmp = d.parent.parent / "compare.json"
    if d.parent.name == "runs" and cmp.is_file():
        slo = _read_json(cmp).get("slo")
        if isinstance(slo, dict) and slo:
            return slo
    return None


def _busiest(summary: dict, k: int = MAX_LINES) -> list[str]:
    eps = summary.get("endpoints", {})
    return plots.busiest({n: eps[n].get("requests") for n in eps}, k)


def _latency_figure(series: list, slo: float | None, title: str) -> Any:
    fig, axes = plots.new_figure((11, 4.2), 1, 2)
    plots.draw_latency(axes, series, slo)
    plots.outside_legend(fig, axes)
    fig.suptitle(title)
    return fig


def _scatter_apart(ax, points: list[tuple[str, float, float, dict]], label=str, detail=None) -> None:
    """Points ``(name, x, y, style)`` that all stay visible: those that coincide (the same x and y to 0.5%:
    plans with identical latencies and cost) are drawn side by side, a few points apart around the true
    position, each with its marker and legend entry (``label(name)``), under one label naming them all
    ("a = b: $10.00/h, same P99"); ``detail(name)``: what the label adds to a name."""
    from matplotlib.transforms import offset_copy

    groups: dict[tuple, list] = {}
    for p in points:
        key = (round(math.log(max(p[1], 1e-12)) / 0.005), round(math.log(max(p[2], 1e-12)) / 0.005))
        groups.setdefault(key, []).append(p)
    fig = ax.figure
    for members in groups.values():
        k = len(members)
        for j, (name, x, y, style) in enumerate(members):
            dx = (j - (k - 1) / 2) * 11.0
            ax.scatter([x], [y], transform=offset_copy(ax.transData, fig=fig, x=dx, y=0, units="points"),
                       zorder=3, label=label(name), **style)
        extra = detail(members[0][0]) if detail else None
        text = " = ".join(m[0] for m in members)
        if k > 1:
            text += f": {extra}, same P99" if extra else ": same cost and P99"
        elif extra:
            text += f": {extra}"
        ax.annotate(text, (members[0][1], members[0][2]), fontsize="small", xytext=(6 + 5.5 * (k - 1), 6),
                    textcoords="offset points")


def run_figures(summary: dict, req: pd.DataFrame | None, tl: pd.DataFrame | None,
                slo_block: dict | None = None) -> list[Figure]:
    figs = []
    name = summary.get("scenario", "run")
    slo = plots.slo_ms(slo_block)
    top = _busiest(summary)
    eps = summary.get("endpoints", {})
    if req is not None and len(req):
        ok = _measured_ok(req, summary)
        series = [("all requests", ok["latency_ms"].to_numpy(), {"color": "black", "lw": 2})]
        if len(eps) > 1:
            for k, ep in enumerate(top):
                series.append((ep, ok.loc[ok["endpoint"] == ep, "latency_ms"].to_numpy(),
                               {"lw": 1, "ls": plots.STYLES[k % len(plots.STYLES)]}))
        fig = _latency_figure(series, slo, f"{name}: latency of completed requests, measured horizon")
        figs.append(Figure("report_latency_cdf", "Latency CDF",
                           "Completed requests after warmup: the CDF (left) and its tail (right: the fraction "
                           "of requests slower than each latency, on a log scale, where P99 is the line at 1%); "
                           f"one line per endpoint (the busiest {MAX_LINES} when there are more); red: the SLO.",
                           plots.png(fig)))
    if tl is not None and len(tl):
        failures = tl.loc[tl["failures"] > 0, "t_s"].to_numpy() if "failures" in tl.columns else ()
        fig = plots.run_timeline(tl, req, {n: eps[n].get("requests") for n in eps}, summary.get("warmup_seconds", 0.0),
                                 f"{name}: timeline", slo, failures)
        figs.append(Figure("report_timeline", "Timeline",
                           "Per simulated minute: invocations, requests in flight (queue depth: queued and "
                           "serving), instances in service, GPU utilisation (CloudWatch's: 100 per busy GPU), "
                           "P99 latency by arrival minute against the SLO, loaded models, GPU memory "
                           "utilisation, cache hit rate, cold starts and failed requests, each where the run "
                           "has it (shaded: warmup).", plots.png(fig)))
    if req is not None and "ttft_ms" in req and np.isfinite(req["ttft_ms"].to_numpy(dtype=float)).any():
        figs.append(_token_figure(_measured_ok(req, summary), top, name, slo_block or {}))
    if eps:
        fig, ax = plots.new_figure((9, 4.5))
        dur_h = summary.get("simulated_seconds", 3600.0) / 3600.0
        pts = [(ep, b["cost_usd"] / dur_h, b["p99_ms"], {"s": 30, "marker": plots.MARKERS[k % len(plots.MARKERS)],
                                                           "color": f"C{k % 10}"})
               for k, (ep, b) in enumerate((e, b) for e, b in eps.items() if e in top and b.get("p99_ms") is not None)]
        rest = [(b["cost_usd"] / dur_h, b["p99_ms"]) for ep, b in eps.items()
                if ep not in top and b.get("p99_ms") is not None]
        if rest:
            ax.scatter(*zip(*rest), s=12, color="grey", label=f"{len(rest)} other endpoints")
        _scatter_apart(ax, pts)
        if slo:
            ax.axhline(slo, color="red", ls="--", lw=1, label=f"SLO {slo:g} ms")
        ax.set_xlabel("cost (USD per hour)")
        ax.set_ylabel("P99 latency (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{name}: cost against P99, per endpoint")
        ax.grid(True, which="both", alpha=0.3)
        plots.outside_legend(fig, ax)
        figs.append(Figure("report_cost_p99", "Cost against P99",
                           "Each endpoint's cost per hour and P99 latency over the measured horizon (endpoints "
                           "with the same figures drawn side by side).", plots.png(fig)))
    return figs


def _token_figure(ok: pd.DataFrame, top: list[str], name: str, slo: dict) -> Figure:
    """TTFT and TPOT of the language models' requests (continuous batching): CDFs and tails, with their SLOs."""
    fig, axes = plots.new_figure((11, 7.5), 2, 2)
    ok = ok[np.isfinite(ok["ttft_ms"].to_numpy(dtype=float))]
    for row, (col, label) in zip(axes, (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"))):
        series = [("all", ok[col].to_numpy(dtype=float), {"color": "black", "lw": 2})]
        if ok["endpoint"].nunique() > 1:
            for k, ep in enumerate(top):
                series.append((ep, ok.loc[ok["endpoint"] == ep, col].to_numpy(dtype=float),
                               {"lw": 1, "ls": plots.STYLES[k % len(plots.STYLES)]}))
        plots.draw_latency(row, series, slo.get(col), unit=f"{label} (ms)")
        row[0].set_title(f"{label}: CDF")
        row[1].set_title(f"{label}: tail (complementary CDF, log)")
    plots.outside_legend(fig, axes)
    fig.suptitle(f"{name}: time to first token and time per output token")
    return Figure("report_ttft_tpot", "TTFT and TPOT",
                  "Language models served with continuous batching: time to first token (arrival to the end of "
                  "the step that completes the prompt) and time per output token after it, completed requests "
                  "after warmup; right: the tails on a log scale.", plots.png(fig))


def compare_figures(cmp: dict, runs: dict[str, tuple[dict, pd.DataFrame | None, pd.DataFrame | None]]) -> list[Figure]:
    figs = []
    name = cmp.get("scenario", "comparison")
    slo = plots.slo_ms(cmp.get("slo"))
    plans = cmp.get("plans", {})
    with_req = {p: r for p, r in runs.items() if r[1] is not None and len(r[1])}
    if with_req:
        # Plans often share their fast path: distinct dashes and colours keep overlapping lines apart.
        series = [(p, _measured_ok(req, summary)["latency_ms"].to_numpy(),
                   {"lw": 1.8, "ls": plots.STYLES[k % len(plots.STYLES)], "color": f"C{k % 10}"})
                  for k, (p, (summary, req, _)) in enumerate(with_req.items())]
        fig = _latency_figure(series, slo, f"{name}: latency per plan (same arrivals)")
        figs.append(Figure("report_latency_cdf", "Latency CDF per plan",
                           "Completed requests after warmup, every plan on the same arrivals: the CDF (left) "
                           "and its tail on a log scale (right, where P99 is the line at 1%); red: the SLO.",
                           plots.png(fig)))
    if plans:
        fig, ax = plots.new_figure((9, 4.5))
        pts = []
        for k, (p, b) in enumerate(plans.items()):
            if b.get("p99_ms") is None:
                continue
            col = f"C{k % 10}"
            style = {"s": 90, "marker": plots.MARKERS[k % len(plots.MARKERS)], "color": col}
            if b.get("slo_met") is False:   # hollow: misses the SLO
                style = {"s": 90, "marker": style["marker"], "facecolors": "none", "edgecolors": col,
                         "linewidths": 1.8}
            pts.append((p, b["cost_per_hour_usd"], b["p99_ms"], style))

        def label(p: str) -> str:
            met = plans[p].get("slo_met")
            return f"{p} ({'meets' if met else 'misses'} the SLO)" if met is not None else p

        _scatter_apart(ax, pts, label, lambda p: f"${plans[p]['cost_per_hour_usd']:,.2f}/h")
        if slo:
            ax.axhline(slo, color="red", ls="--", lw=1, label=f"SLO {slo:g} ms")
        # From zero on both axes, with room on the right for the labels and above the SLO line.
        if pts:
            top = max([y for _, _, y, _ in pts] + ([slo] if slo else []))
            ax.set_ylim(0, top * 1.15)
            ax.set_xlim(0, max(x for _, x, _, _ in pts) * 1.3 or 1.0)
        ax.set_xlabel("cost (USD per hour)")
        ax.set_ylabel("P99 latency (ms)")
        ax.set_title(f"{name}: cost against P99 per plan")
        ax.grid(True, alpha=0.3)
        plots.outside_legend(fig, ax)
        figs.append(Figure("report_cost_p99", "Cost against P99 per plan",
                           "Lower left is better; filled markers meet the SLO, hollow ones miss it. Plans with the "
                           "same cost and P99 are drawn side by side and labelled together.", plots.png(fig)))
    with_tl = {p: plots.sum_endpoints(r[2]) for p, r in runs.items() if r[2] is not None and len(r[2])}
    if with_tl:
        p99 = {}
        for p in with_tl:
            req = runs[p][1]
            if req is not None and len(req):
                ok = req[req["status"] == "ok"]
                _, m, v = plots.p99_per_minute(ok["arrival_s"].to_numpy(), ok["latency_ms"].to_numpy())
                p99[p] = (m, v)
        warm = cmp.get("warmup_seconds", 0.0)
        figs.append(Figure("report_timeline", "Timelines per plan",
                           "Per simulated minute, each plan's endpoints together: invocations, requests in flight "
                           "(queue depth), instances, GPU utilisation (weighted by instances), P99 latency by "
                           "arrival minute against the SLO, loaded models, GPU memory utilisation (weighted by "
                           "instances), cache hit rate (weighted by invocations), cold starts and failed requests.",
                           plots.png(plots.timeline_panels(with_tl, p99, warm, f"{name}: timelines per plan",
                                                           slo))))
    return figs


# -- tables ----------------------------------------------------------------------------------------------------------
_ROWS = (("cost per hour (USD)", "cost_per_hour_usd", 2), ("cost (USD)", "cost_usd", 2),
         ("cost per 1M requests (USD)", "cost_per_million_usd", 2), ("requests", "requests", 0),
         ("completed", "completed", 0), ("failed", "failed", 0), ("P50 latency (ms)", "p50_ms", 1),
         ("P90 latency (ms)", "p90_ms", 1), ("P99 latency (ms)", "p99_ms", 1), ("mean latency (ms)", "mean_ms", 1),
         ("TTFT P50 (ms)", "ttft_p50_ms", 1), ("TTFT P99 (ms)", "ttft_p99_ms", 1),
         ("TPOT P90 (ms)", "tpot_p90_ms", 2), ("TPOT P99 (ms)", "tpot_p99_ms", 2),
         ("output tokens/s", "output_tokens_per_s", 0), ("running sequences (mean)", "running_seqs", 2),
         ("KV cache utilisation", "kv_cache_utilization", 3), ("preemptions", "preemptions", 0),
         ("SLO attainment", "slo_attainment", 4), ("SLO met", "slo_met", None), ("throughput (req/s)",
         "throughput_per_s", 2), ("cold starts", "cold_starts", 0), ("cache hit rate", "cache_hit_rate", 4),
         ("instances (mean)", "instances_mean", 2), ("instances (max)", "instances_max", 0),
         ("GPU utilisation", "gpu_utilization_fraction", 3),
         ("batch size (mean, busy device)", "batch_size_mean", 2),
         ("GPU memory utilisation", "gpu_memory_utilization", 3),
         ("GPUs stranded (fraction)", "gpu_stranded_fraction", 3), ("copies (mean)", "copies_mean", 2))


def _cell(v: Any, digits: int | None) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "-"
    if isinstance(v, dict):
        return html.escape(", ".join(f"{k} x {n}" for k, n in v.items()))
    if isinstance(v, bool) or digits is None:
        return "yes" if v is True else "no" if v is False else html.escape(str(v))
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def _table(columns: list[tuple[str, dict]], extra_rows: tuple = ()) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n, _ in columns)
    rows = []
    for label, key, digits in tuple(extra_rows) + _ROWS:
        vals = [b.get(key) for _, b in columns]
        if all(v is None for v in vals):
            continue
        rows.append(f"<tr><th>{html.escape(label)}</th>" + "".join(f"<td>{_cell(v, digits)}</td>" for v in vals)
                    + "</tr>")
    return f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# -- the page --------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em} .status{font-size:.85em;color:#555}
table{border-collapse:collapse;font-size:.85em;margin:.8em 0} th,td{border:1px solid #ddd;padding:.25em .6em}
td{text-align:right;font-variant-numeric:tabular-nums} thead th{background:#f3f3f3} tbody th{text-align:left;
font-weight:normal;background:#fafafa} figure{margin:1.2em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.9em} .best{font-weight:bold} ul.notes{font-size:.9em;color:#444}
"""

# Counts the figures the browser decoded; shown at the top (and read by the tests through the DOM).
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.figure'), n = 0;
  imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) { n++; } });
  var s = document.getElementById('figure-status');
  s.textContent = 'figures rendered: ' + n + '/' + imgs.length;
  s.setAttribute('data-rendered', String(n));
});
"""


def _page(title: str, meta: str, body: str, figs: list[Figure]) -> str:
    fig_html = "".join(
        f'<figure id="{html.escape(f.name)}"><h2>{html.escape(f.title)}</h2>'
        f'<img class="figure" alt="{html.escape(f.title)}" src="data:image/png;base64,'
        f'{base64.b64encode(f.png).decode("ascii")}"><figcaption>{html.escape(f.caption)}</figcaption></figure>'
        for f in figs)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class=\"meta\">{meta}</p>"
            f"<p class=\"status\" id=\"figure-status\" data-rendered=\"0\">figures rendered: 0/{len(figs)} "
            f"(the page counts them once loaded)</p>{body}{fig_html}<script>{_SCRIPT}</script></body></html>\n")


def _notes(items: list[str]) -> str:
    return "<ul class=\"notes\">" + "".join(f"<li>{html.escape(x)}</li>" for x in items) + "</ul>" if items else ""


def _run_page(d: Path) -> tuple[str, list[Figure]]:
    summary, req, tl = _read_run(d)
    slo = _run_slo(d, summary)
    figs = run_figures(summary, req, tl, slo)
    eps = summary.get("endpoints", {})
    shown = _busiest(summary, 12)
    cols = [(n, eps[n]) for n in eps if n in shown] + [("total", summary.get("overall", {}))]
    dur = summary.get("simulated_seconds", 0.0)
    meta = (f"run directory {html.escape(str(d))}; {dur / 60:g} simulated minutes after "
            f"{summary.get('warmup_seconds', 0.0) / 60:g} min warmup; seed {summary.get('seed')}; "
            f"SLO {html.escape(_slo_text(slo))}")
    body = "<h2>Summary</h2>"
    if len(eps) > len(shown):
        body += f"<p class=\"meta\">The {len(shown)} busiest of {len(eps)} endpoints, and the total.</p>"
    body += _table(cols) + _notes(summary.get("warnings", []))
    return _page(f"capsim run: {summary.get('scenario', d.name)}", meta, body, figs), figs


def _compare_page(d: Path) -> tuple[str, list[Figure]]:
    cmp = _read_json(d / "compare.json")
    plans = cmp.get("plans", {})
    runs = {}
    missing = []
    for p, b in plans.items():
        rd = d / b.get("run_dir", f"runs/{p}")
        if (rd / "summary.json").exists():
            runs[p] = _read_run(rd)
        else:
            missing.append(f"plan {p}: no run directory at {rd} (figures left out)")
    figs = compare_figures(cmp, runs)
    meta = (f"comparison directory {html.escape(str(d))}; SLO {html.escape(_slo_text(cmp.get('slo')))}; "
            f"{cmp.get('simulated_seconds', 0) / 60:g} simulated minutes after "
            f"{cmp.get('warmup_seconds', 0) / 60:g} min warmup; seed {cmp.get('seed')}; same arrivals for every plan")
    best = cmp.get("best")
    body = "<h2>Plans side by side</h2>"
    body += (f"<p class=\"best\">Cheapest plan that meets the SLO: {html.escape(best)}</p>" if best
             else "<p class=\"best\">No plan meets the SLO.</p>")
    shown = [(p, {**b, "gpu_utilization_fraction": b.get("gpu_utilization")}) for p, b in plans.items()]
    body += _table(shown, (("instances", "instances", None), ("mode", "mode", None),
                           ("execution models", "execution_models", None)))
    notes = [f"{p}: {n}" for p, b in plans.items() for n in ([b["description"]] if b.get("description") else [])
             + b.get("notes", [])]
    notes += [f"{p}: not built: {why}" for p, why in (cmp.get("skipped") or {}).items()]
    notes += [f"{p}: {w}" for p, b in plans.items() for w in b.get("warnings", [])]
    body += _notes(notes + missing)
    files = "".join(f"<li>{html.escape(p)}: {html.escape(b.get('scenario_file', ''))} (scenario to edit and re-run), "
                    f"{html.escape(b.get('run_dir', ''))}/</li>" for p, b in plans.items())
    body += f"<p class=\"meta\">Files in this directory:</p><ul class=\"notes\">{files}</ul>"
    return _page(f"capsim compare: {cmp.get('scenario', d.name)}", meta, body, figs), figs


def write_report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html`` (default ``DIR/report.html``) and ``DIR/plots/report_*.png``
    for a run or comparison directory; returns the HTML file's path."""
    d = Path(directory)
    if not d.is_dir():
        raise ScenarioError("not a directory; expected a run directory (summary.json, requests.parquet, "
                            "timeline.csv) or a comparison directory (compare.json)", source=str(directory))
    if (d / "compare.json").exists():
        page, figs = _compare_page(d)
    elif (d / "summary.json").exists():
        page, figs = _run_page(d)
    else:
        raise ScenarioError("neither compare.json nor summary.json here; expected the directory `capsim run` or "
                            "`capsim compare` wrote", source=str(directory))
    plots = d / "plots"
    plots.mkdir(exist_ok=True)
    for f in figs:   # atomically: a reader (a browser, a CI artifact upload) never sees half a file
        atomic_write(plots / f"{f.name}.png", f.png)
    path = Path(out) if out is not None else d / "report.html"
    atomic_write(path, page.replace("</body>", f"<p class=\"meta\">Written by capsim on "
                                    f"{_dt.datetime.now().isoformat(timespec='seconds')}.</p></body>"))
    return path
