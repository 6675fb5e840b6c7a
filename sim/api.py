"""The Python API: load a scenario, run it, get DataFrames and write results."""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .metrics import combine, finalize_status, requests_frame, summarize, timeline
from .scenario import Scenario, load_scenario
from .simulate import simulate


@dataclass
class Result:
    """A finished run: ``summary`` (summary.json as a dict; :meth:`table`: the same as a DataFrame, one row
    per endpoint and per model), ``requests`` (one row per request; ``measured`` marks the rows the summary
    covers) and ``timeline`` (one row per minute and endpoint) DataFrames.
    With replications, the frames carry a ``replication`` column and
    ``replication_summaries`` holds each one's summary."""

    scenario: Scenario
    summary: dict[str, Any]
    requests: pd.DataFrame
    timeline: pd.DataFrame
    replication_summaries: list[dict[str, Any]] = field(default_factory=list)

    def save(self, out: str | Path | None = None, *, plots: bool = True) -> Path:
        """Write summary.json, requests.parquet, timeline.csv and plots/ to ``out``
        (default ``results/<scenario name>/``, the name made safe as a folder name); returns the
        directory. The set is written beside ``out`` and put in place as a unit
        (:func:`sim.output.publish`): a reader finds the old set or the new one, and no file of the old
        set survives (no old plots/ after a save without plots). :class:`sim.output.OutputError` when it
        cannot be written (a full disk, a read-only folder, ``out`` a file)."""
        from .output import default_dir, publish

        out = Path(out) if out is not None else default_dir(self.scenario.name)

        def write(d: Path) -> None:
            from concurrent.futures import ThreadPoolExecutor

            atomic_write(d / "summary.json", json.dumps(self.summary, indent=2, allow_nan=False,
                                                        default=json_default) + "\n")
            # requests.parquet on a second thread while timeline.csv and plots/ are made: pyarrow encodes
            # and compresses without holding the GIL, so a second core writes it meanwhile (the same files).
            with ThreadPoolExecutor(1) as pool:
                parquet = pool.submit(atomic_write_frame, self.requests, d / "requests.parquet")
                atomic_write_frame(self.timeline, d / "timeline.csv")
                if plots:
                    from .report.plots import save_run_plots

                    save_run_plots(self, d / "plots")
                parquet.result()

        return publish(out, write, "run")

    def table(self) -> "pd.DataFrame":
        """The summary as a tidy DataFrame: one row per endpoint and per model (``level``: "endpoint" or
        "model"; ``name``; ``endpoint``: the endpoint, or the one serving the model), the summary's keys as
        columns (``p99_ms``, ``cost_usd``, ``slo_attainment``, ..., and ``<key>_ci95`` with replications;
        CloudWatch's figures as ``cloudwatch.<name>``). The overall block stays in ``summary["overall"]``:
        summing a column over the rows would count every request twice."""
        import pandas as pd

        served_by = {m.name: self.scenario.endpoints[e].name if e >= 0 else None
                     for m, e in zip(self.scenario.models, _endpoint_of_model(self.scenario))}
        rows = []
        levels = (("endpoint", self.summary.get("endpoints", {})), ("model", self.summary.get("models", {})))
        for level, blocks in levels:
            for name, b in blocks.items():
                row: dict[str, Any] = {"level": level, "name": name,
                                       "endpoint": name if level == "endpoint" else served_by.get(name)}
                for k, v in b.items():
                    if isinstance(v, dict):
                        row.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, dict)})
                    else:
                        row[k] = v
                rows.append(row)
        return pd.DataFrame(rows)


def _endpoint_of_model(scenario: Scenario) -> list[int]:
    """Per model of ``scenario``, the index of the endpoint serving it (-1: none)."""
    out = [-1] * len(scenario.models)
    for e, ep in enumerate(scenario.endpoints):
        for m in ep.models:
            out[m] = e
    return out


def json_default(x: Any) -> Any:
    """``json.dumps(..., default=json_default)``: numpy scalars as Python numbers, numpy arrays as
    lists, paths as strings; anything else is an error (a figure of the wrong type is a bug)."""
    if hasattr(x, "item") and getattr(x, "ndim", 0) == 0:
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a
    part: a temporary file in the same folder, flushed to disk, then ``os.replace``."""
    from .output import file_mode, temporary_prefix

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())   # mkstemp makes 0600: the file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_frame(df: pd.DataFrame, path: str | Path) -> None:
    """A DataFrame as parquet (``.parquet``) or CSV (anything else: ``to_csv(index=False)``'s text, written
    by :func:`sim.output.csv_text`), written as :func:`atomic_write`."""
    from .output import csv_text, file_mode, temporary_prefix

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
        os.close(fd)
        if path.suffix == ".parquet":
            # Dictionary encoding where it pays (names, statuses, counts, flags), not on the float columns
            # (times, latencies: millions of distinct values, where parquet tries a dictionary and gives it
            # up): the same table, written in two thirds of the time and a little smaller.
            import pandas as pd

            coded = [str(c) for c in df.columns if not pd.api.types.is_float_dtype(df[c].dtype)]
            df.to_parquet(tmp, index=False, use_dictionary=coded)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(csv_text(df))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(scenario: Scenario | str | Path, *, seed: int | None = None, replications: int | None = None,
        overrides: Iterable[str] = (), progress: Callable[[int, int], None] | None = None,
        force: bool = False, progress_time: Callable[[float], None] | None = None) -> Result:
    """Simulate ``scenario`` (a loaded Scenario or a YAML path).

    ``replications`` (default: the scenario's) independent runs share the seed
    and differ by their replication index; the summary then gives each figure's
    mean and ``<key>_ci95``. ``progress(done, total)`` is called after each; ``progress_time(fraction)``
    every 1% of each one's simulated horizon, with the share of the whole run done (for a progress bar;
    the results are the same with it or without).

    Before any simulation the run's size is estimated (:mod:`sim.volume`): a run whose requests
    would need more memory than the machine has available is refused with a ScenarioError that
    gives the estimate, the key that drives it and what would fit; ``force=True`` tries anyway.
    """
    if not isinstance(scenario, Scenario):
        scenario = load_scenario(scenario, overrides)
    reps = replications or scenario.spec.replications
    if not force:
        from .volume import check

        check(scenario, replications=reps)
    seed = scenario.spec.seed if seed is None else seed
    outs = []
    for r in range(reps):
        tick = None if progress_time is None else (lambda f, r=r: progress_time((r + f) / reps))
        outs.append(run_replication(scenario, seed, r, reps, progress=tick))
        if progress:
            progress(r + 1, reps)
    return assemble(scenario, outs)


def run_replication(scenario: Scenario, seed: int, r: int, reps: int, frames: bool = True,
                    progress: Callable[[float], None] | None = None
                    ) -> tuple[dict, pd.DataFrame | None, pd.DataFrame | None]:
    """Replication ``r`` of ``reps``: its summary and (``frames``) its requests and timeline frames, with a
    ``replication`` column when ``reps > 1``. :func:`run` is these, in order, then :func:`assemble`;
    executors run them apart (sim.plan.parallel) and give the same result. ``progress``: called with the
    fraction of the horizon simulated (sim.core.engine.Engine.run)."""
    raw = simulate(scenario, seed=seed, replication=r, progress=progress)
    finalize_status(raw)
    memo: dict = {}     # each endpoint's busy periods, sorted once for the summary and the timeline
    summary = summarize(raw, memo)
    if not frames:
        return summary, None, None
    req, tl = requests_frame(raw), timeline(raw, memo)
    if reps > 1:
        req.insert(0, "replication", r)
        tl.insert(0, "replication", r)
    return summary, req, tl


def assemble(scenario: Scenario, outs: list[tuple[dict, pd.DataFrame | None, pd.DataFrame | None]]) -> Result:
    """The result of replications 0, 1, ... (:func:`run_replication`'s outputs, in order)."""
    import pandas as pd

    summaries = [o[0] for o in outs]
    reqs, tls = [o[1] for o in outs], [o[2] for o in outs]
    requests = reqs[0] if len(outs) == 1 else pd.concat(reqs, ignore_index=True)
    tline = tls[0] if len(outs) == 1 else pd.concat(tls, ignore_index=True)
    return Result(scenario, combine(summaries), requests, tline, summaries)
