"""Progress of long runs: a bar on a terminal only, and no change to any result; capsim run --report."""
from __future__ import annotations

import io
from pathlib import Path

from click.testing import CliRunner

import sim
from sim import progress
from sim.cli import main

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def test_progress_changes_no_result():
    # mme_az_outage: an MME with a zone outage, its failures, retries and replacements, events at the
    # very ends of the slices (20 min) among them.
    sc = sim.load_scenario(SCENARIOS / "mme_az_outage.yaml", ["duration=25m"])
    ticks: list[float] = []
    with_bar = sim.run(sc, replications=2, progress_time=ticks.append)
    without = sim.run(sc, replications=2)
    assert with_bar.requests.equals(without.requests)
    assert with_bar.timeline.equals(without.timeline)
    assert len(ticks) == 200 and ticks == sorted(ticks) and ticks[-1] == 1.0 and ticks[99] == 0.5


def test_bar_draws_nothing_off_a_terminal(monkeypatch):
    err = io.StringIO()   # not a terminal: isatty() is False
    monkeypatch.setattr("sys.stderr", err)
    with progress.bar("simulating") as tick:
        for k in range(10):
            tick(k / 10)
    assert err.getvalue() == ""


def test_run_writes_the_report(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["run", str(SCENARIOS / "quickstart.yaml"), "--set", "duration=2m",
                                    "--set", "warmup=30s", "--out", str(out), "--report"])
    assert res.exit_code == 0, res.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "Timeline" in page and "Latency CDF" in page
    assert f"report written to {out / 'report.html'}" in res.stderr
    assert "\u2501" not in res.stderr   # no bar drawn: the runner's stderr is not a terminal
