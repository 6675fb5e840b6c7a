"""The Python API: load a scenario, run it, get DataFrames and write results."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd

from .metrics import combine, finalize_status, requests_frame, summarize, timeline
from .scenario import Scenario, load_scenario
from .simulate import simulate


@dataclass
class Result:
    """A finished run: ``summary`` (summary.json as a dict), ``requests`` (one row
    per request) and ``timeline`` (one row per minute and endpoint) DataFrames.
    With replications, the frames carry a ``replication`` column and
    ``replication_summaries`` holds each one's summary."""

    scenario: Scenario
    summary: dict[str, Any]
    requests: pd.DataFrame
    timeline: pd.DataFrame
    replication_summaries: list[dict[str, Any]] = field(default_factory=list)

    def save(self, out: str | Path | None = None, *, plots: bool = True) -> Path:
        """Write summary.json, requests.parquet, timeline.csv and plots/ to ``out``
        (default ``results/<scenario name>/``); returns the directory."""
        out = Path(out) if out is not None else Path("results") / self.scenario.name
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "summary.json", json.dumps(self.summary, indent=2, allow_nan=False,
                                                       default=_json_default) + "\n")
        self.requests.to_parquet(out / "requests.parquet", index=False)
        self.timeline.to_csv(out / "timeline.csv", index=False)
        if plots:
            from .report.plots import save_run_plots

            save_run_plots(self, out / "plots")
        return out


def _json_default(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(scenario: Scenario | str | Path, *, seed: int | None = None, replications: int | None = None,
        overrides: Iterable[str] = (), progress: Callable[[int, int], None] | None = None) -> Result:
    """Simulate ``scenario`` (a loaded Scenario or a YAML path).

    ``replications`` (default: the scenario's) independent runs share the seed
    and differ by their replication index; the summary then gives each figure's
    mean and ``<key>_ci95``. ``progress(done, total)`` is called after each.
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, overrides)
    reps = replications or scenario.spec.replications
    seed = scenario.spec.seed if seed is None else seed
    summaries, reqs, tls = [], [], []
    for r in range(reps):
        raw = simulate(scenario, seed=seed, replication=r)
        finalize_status(raw)
        summaries.append(summarize(raw))
        req, tl = requests_frame(raw), timeline(raw)
        if reps > 1:
            req.insert(0, "replication", r)
            tl.insert(0, "replication", r)
        reqs.append(req)
        tls.append(tl)
        del raw
        if progress:
            progress(r + 1, reps)
    requests = reqs[0] if reps == 1 else pd.concat(reqs, ignore_index=True)
    tline = tls[0] if reps == 1 else pd.concat(tls, ignore_index=True)
    return Result(scenario, combine(summaries), requests, tline, summaries)
