"""capsim report: a self-contained HTML page for a run or a comparison directory."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

import sim
from sim.cli import main
from sim.report import html as html_report
from sim.report import plots
from sim.report.html import write_report
from sim.scenario import ScenarioError

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    sc = sim.load_scenario(SCENARIOS / "compare_small_models.yaml", ["duration=3m", "warmup=1m"])
    sim.run(sc).save(out, plots=False)
    return out


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    sim.compare(SCENARIOS / "compare_large_models.yaml", ["sme", "mme", "ic"], out=out)
    return out


def _check_page(d: Path) -> str:
    page = (d / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # Self-contained: every src is an embedded data URI, and nothing links out.
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"\bhref\s*=", page)
    assert not re.search(r"@import|url\(", page)
    # One <img> per figure, and the same figures as PNG files in plots/.
    imgs = re.findall(r"<img\b", page)
    pngs = sorted((d / "plots").glob("report_*.png"))
    figures = re.findall(r"<figure\b", page)
    assert len(imgs) == len(figures) == len(pngs) >= 3
    return page


def test_report_of_a_run(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = _check_page(run_dir)
    assert "Latency CDF" in page and "Timeline" in page and "P99 latency (ms)" in page


def test_report_of_a_comparison(compare_dir):
    res = CliRunner().invoke(main, ["report", str(compare_dir)])
    assert res.exit_code == 0, res.output
    page = _check_page(compare_dir)
    for text in ("Latency CDF per plan", "Cost against P99 per plan", "Timelines per plan",
                 "Cheapest plan that meets the SLO: ic", "plans/ic.yaml", "mme: not built"):
        assert text in page, text


def test_run_report_takes_the_slo_from_the_scenario(compare_dir, run_dir, tmp_path):
    # A plan's run directory: its summary.json carries the plan's SLO.
    page = write_report(compare_dir / "runs" / "ic").read_text(encoding="utf-8")
    assert "SLO p99 &lt;= 15000 ms" in page
    # A summary.json written before it carried the SLO: none, unless the scenario sits beside it.
    d = tmp_path / "run"
    d.mkdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    del summary["slo"]
    (d / "summary.json").write_text(json.dumps(summary))
    for f in ("requests.parquet", "timeline.csv"):
        (d / f).write_bytes((run_dir / f).read_bytes())
    assert "SLO none" in write_report(d).read_text(encoding="utf-8")
    (d / "scenario.yaml").write_text((SCENARIOS / "compare_small_models.yaml").read_text())
    assert "SLO p99 &lt;= 1000 ms" in write_report(d).read_text(encoding="utf-8")
    # Written atomically: no temporary file is left beside the page or the figures.
    assert not [f for f in d.rglob("*") if f.name.endswith(".tmp")]


def test_summary_carries_the_slo_and_the_run_report_draws_it(run_dir, monkeypatch):
    # summary.json's "slo": the targets the scenario sets, in ms (compare_small_models: slo {p99: 1s}).
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["slo"] == {"p99_ms": 1000.0}
    # No scenario file beside the run: the report takes the SLO from summary.json and draws it.
    assert not (run_dir / "scenario.yaml").exists()
    drawn = []
    real = plots.draw_latency
    monkeypatch.setattr(plots, "draw_latency", lambda axes, series, slo, **kw: (drawn.append(slo),
                                                                                 real(axes, series, slo, **kw)))
    assert "SLO p99 &lt;= 1000 ms" in write_report(run_dir).read_text(encoding="utf-8")
    assert drawn == [1000.0]
    # Only the targets set; none set: an empty block and "SLO none".
    sc = sim.load_scenario(SCENARIOS / "compare_small_models.yaml",
                           ["duration=1m", "warmup=0", "slo.p99=null", "slo.p50=200ms", "slo.mean=100ms"])
    assert sim.run(sc).summary["slo"] == {"p50_ms": 200.0, "mean_ms": 100.0}
    sc = sim.load_scenario(SCENARIOS / "quickstart.yaml", ["duration=1m", "warmup=0", "slo=null"])
    res = sim.run(sc, replications=2)
    assert res.summary["slo"] == {} and res.replication_summaries[0]["slo"] == {}


def test_report_errors(tmp_path):
    with pytest.raises(ScenarioError, match="neither compare.json nor summary.json"):
        write_report(tmp_path)
    res = CliRunner().invoke(main, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a directory" in res.stderr


def _chromium() -> str | None:
    for name in CHROMIUM:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(_chromium() is None, reason="no headless browser: none of chromium, chromium-browser, "
                                                "google-chrome is on PATH (apt-get install chromium)")
def test_report_renders_its_figures_in_chromium(compare_dir, tmp_path):
    write_report(compare_dir)
    n = len(re.findall(r"<img\b", (compare_dir / "report.html").read_text()))
    url = (compare_dir / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}"]
    # The page's script counts the images the browser decoded (complete, with a width).
    dom = subprocess.run([_chromium(), *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert f"figures rendered: {n}/{n}" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *flags, f"--screenshot={shot}", "--window-size=1200,2000", url],
                   capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    import matplotlib.image as mpimg

    px = mpimg.imread(shot)
    assert px.std() > 0.05   # not a blank page


def test_plans_with_the_same_cost_and_p99_are_told_apart(monkeypatch):
    # sme and mme: the same cost and P99 (as plans of one fleet often are); both markers visible, side by side,
    # one label naming both; ic alone, hollow (it misses the SLO).
    cmp = {"scenario": "same", "slo": {"p99_ms": 500.0}, "plans": {
        "sme": {"p99_ms": 300.0, "cost_per_hour_usd": 10.0, "slo_met": True},
        "mme": {"p99_ms": 300.0, "cost_per_hour_usd": 10.0, "slo_met": True},
        "ic": {"p99_ms": 700.0, "cost_per_hour_usd": 4.0, "slo_met": False}}}
    made = []
    real = plots.png
    monkeypatch.setattr(plots, "png", lambda fig, dpi=96: (made.append(fig), real(fig, dpi))[1])
    html_report.compare_figures(cmp, {})
    ax = made[0].axes[0]
    where = {c.get_label().split()[0]: c.get_offset_transform().transform(c.get_offsets()[0]) for c in ax.collections}
    assert set(where) == {"sme", "mme", "ic"}
    dx, dy = where["mme"] - where["sme"]
    assert dx >= 5 and abs(dy) < 1e-6                 # apart on screen, at the same height
    texts = [t.get_text() for t in ax.texts]
    assert "sme = mme: $10.00/h, same P99" in texts and "ic: $4.00/h" in texts
    assert made[0].legends and not ax.get_legend()   # the legend sits outside the axes: it hides no point


def test_latency_figure_of_values_all_zero_warns_of_nothing():
    """A step model without a decode term makes every TPOT 0 ms: the latency figure keeps a linear axis
    for it (a log axis has nothing to show, and matplotlib warned "Data has no positive values" on the
    user's stderr); with a value > 0 the axes stay logarithmic."""
    import warnings

    import numpy as np
    from matplotlib.figure import Figure

    for values, scale in ((np.zeros(50), "linear"), (np.array([0.0, 1.0, 10.0]), "log")):
        axes = Figure().subplots(1, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            plots.draw_latency(axes, [("tpot", values, {})], None)
        assert [ax.get_xscale() for ax in axes] == [scale, scale]
