"""capsim in a notebook: the matplotlib backend stays the user's, figures show as PNG, the summary as a
tidy DataFrame, and the request rows the summary covers are marked (``measured``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import sim
from sim.report import plots

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


def _python(code: str) -> str:
    """Run ``code`` in a fresh interpreter (no MPLBACKEND: as a notebook kernel before it picks one)."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_import_sim_loads_neither_pandas_nor_scipy_nor_matplotlib():
    out = json.loads(_python("import sys, json, sim; print(json.dumps(sorted(m for m in "
                             "('pandas', 'scipy', 'scipy.stats', 'matplotlib', 'pyarrow') if m in sys.modules)))"))
    assert out == []
    # scipy.stats serves the replications' confidence intervals only: a run of one replication does without
    code = ("import sys, sim; sim.run(sim.load_scenario(%r, ['duration=1m', 'warmup=0']));"
            "print('scipy.stats' in sys.modules)" % str(SCENARIOS / "quickstart.yaml"))
    assert _python(code).strip() == "False"


@pytest.mark.parametrize("chosen", ["pdf", None], ids=["backend-chosen", "no-backend-yet"])
def test_backend_unchanged_by_import_run_save_and_report(chosen, tmp_path):
    # A notebook has its backend (inline); any backend a user chose stays chosen, and one not chosen yet is
    # still not chosen (so that Jupyter's default applies) after import, run, save with plots, the report and
    # optimize's frontier.
    code = f"""
import sys, matplotlib
chosen = {chosen!r}
if chosen:
    matplotlib.use(chosen)
before = matplotlib.rcParams._get_backend_or_none()
import sim
from sim.report.html import write_report
res = sim.run(sim.load_scenario({str(SCENARIOS / 'quickstart.yaml')!r}, ["duration=2m", "warmup=30s"]))
out = res.save({str(tmp_path / 'run')!r})
write_report(out)
fig = sim.report.plots.latency_cdf(res)
names = {{p.name for p in (out / "plots").glob("*.png")}}
assert {{"latency_cdf.png", "timeline.png", "report_latency_cdf.png", "report_timeline.png"}} <= names, names
from sim.plan import optimize
opt = optimize({str(SCENARIOS / 'optimize_demo.yaml')!r}, instance_types=["ml.g6.xlarge"], max_instances=4,
               slo="p99=600ms", replications=1)
assert (opt.save({str(tmp_path / 'opt')!r}) / "frontier.png").stat().st_size > 0
print(repr(before), repr(matplotlib.rcParams._get_backend_or_none()), "matplotlib.pyplot" in sys.modules)
"""
    before, after, pyplot = _python(code).split()
    assert before == after == repr(chosen)
    assert pyplot == "False"


@pytest.fixture(scope="module")
def quickstart():
    return sim.run(sim.load_scenario(SCENARIOS / "quickstart.yaml", ["duration=5m", "warmup=1m"]))


def test_measured_rows_give_the_summary_p99(quickstart):
    res = quickstart
    req = res.requests
    warm, horizon = res.scenario.spec.warmup, res.scenario.horizon
    assert (req["measured"] == ((req["arrival_s"] >= warm) & (req["arrival_s"] < horizon))).all()
    assert 0 < req["measured"].sum() < len(req)   # the warmup's rows are not measured
    ok = req[req["measured"] & (req["status"] == "ok")]
    # the same numbers (numpy's and pandas' linear interpolation of the same values): equal to 1e-12
    assert ok["latency_ms"].quantile(0.99) == pytest.approx(res.summary["overall"]["p99_ms"], rel=1e-12)
    for level, col in (("endpoints", "endpoint"), ("models", "model")):
        for name, block in res.summary[level].items():
            lat = ok.loc[ok[col] == name, "latency_ms"]
            assert lat.quantile(0.99) == pytest.approx(block["p99_ms"], rel=1e-12), (level, name)
            assert lat.quantile(0.5) == pytest.approx(block["p50_ms"], rel=1e-12), (level, name)
            assert len(lat) == block["completed"]
    # every row of the unmeasured warmup would have moved the figure: the filter matters
    allrows = req[req["status"] == "ok"]["latency_ms"].quantile(0.99)
    assert allrows != pytest.approx(res.summary["overall"]["p99_ms"], rel=1e-6)


def test_table_is_the_summary_one_row_per_endpoint_and_model(quickstart):
    res = quickstart
    t = res.table()
    eps, models = res.summary["endpoints"], res.summary["models"]
    assert len(t) == len(eps) + len(models)
    assert list(t["level"]) == ["endpoint"] * len(eps) + ["model"] * len(models)
    for _, row in t.iterrows():
        block = (eps if row["level"] == "endpoint" else models)[row["name"]]
        for k in ("requests", "completed", "p99_ms", "cost_usd", "slo_attainment"):
            assert row[k] == pytest.approx(block[k]), (row["name"], k)
    # each model row names its endpoint; CloudWatch's figures are flattened
    served = {m.name: res.scenario.endpoints[e].name for e, ep in enumerate(res.scenario.endpoints)
              for m in (res.scenario.models[i] for i in ep.models)}
    assert dict(zip(t.loc[t["level"] == "model", "name"], t.loc[t["level"] == "model", "endpoint"])) == served
    assert "cloudwatch.ModelCacheHit" in t.columns


def test_table_with_replications_has_the_intervals():
    res = sim.run(sim.load_scenario(SCENARIOS / "quickstart.yaml", ["duration=1m", "warmup=0"]), replications=2)
    t = res.table()
    assert {"p99_ms", "p99_ms_ci95", "cost_usd_ci95"} <= set(t.columns)


def test_figures_show_in_jupyter_as_png(quickstart):
    for make in (plots.latency_cdf, plots.timeline_figure):
        fig = make(quickstart)
        assert isinstance(fig, plots.PlotFigure)
        assert fig._repr_png_().startswith(b"\x89PNG")


def test_latency_figures_show_the_slo_and_the_tail(quickstart):
    slo = quickstart.summary["slo"]["p99_ms"]   # quickstart: slo p99 5 s
    cdf, tail = plots.latency_cdf(quickstart).axes
    assert tail.get_yscale() == "log" and tail.get_xscale() == "log"
    for ax in (cdf, tail):
        assert any(list(line.get_xdata()) == [slo, slo] for line in ax.lines), "no SLO line"
    # the tail reaches below 1%: P99 is readable on it
    assert min(min(line.get_ydata()) for line in tail.lines if len(line.get_ydata()) > 2) < 0.01
    # the P99 by minute panel of the timeline carries the SLO as a horizontal line
    tl = plots.timeline_figure(quickstart)
    p99 = [ax for ax in tl.axes if ax.get_ylabel().startswith("P99")]
    assert len(p99) == 1 and any(list(line.get_ydata()) == [slo, slo] for line in p99[0].lines)
