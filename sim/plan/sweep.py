"""Parameter sweeps: the cartesian grid of ``--set``-style overrides, each point
simulated with N replications, resumable, on a local pool or a Dask cluster.

Each point is identified by a hash of what determines its result (the parsed
scenario, the point's overrides, the number of replications and the content of
every file the point's scenario reads: its traces and calibration profiles) and
written, as soon as it finishes, to ``DIR/points/<hash>.json`` (atomically: a
temporary file, then ``os.replace``). A sweep run again over the same DIR skips
the points already there, so an interrupted sweep (Ctrl-C, kill, a lost machine)
loses only the points that were running; a point whose trace changed since is
run again. Temporary files a killed sweep left behind are removed when a sweep
starts there again. The final table (``DIR/results.parquet`` and
``DIR/results.csv``) is built from the per-point files. A point whose override
is wrong, or whose run fails, is recorded with its error; the others go on. A
point whose worker died (killed, out of memory), or that was refused because it
would not fit in memory, fails alone and is not recorded: a rerun tries it again.

Everything random in a point derives from the point: the scenario's seed (or
the seed the point's overrides set) and the replication index, exactly as
``sim.run`` does, so a point's figures are identical whichever executor, and
whichever worker, runs it.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import stat
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
import yaml

from ..api import atomic_write, atomic_write_frame, json_default
from ..output import remove_stale_temporaries
from ..scenario import ScenarioError, apply_overrides, parse_scenario, read_yaml
from .executors import DaskExecutor, Executor, LocalExecutor, SerialExecutor, cpu_count, make_executor

POINT_SCHEMA = "capsim.sweep-point/1"
# Columns that measure the machine, not the simulated system: left out when comparing tables.
WALL_COLUMNS = ("wall_seconds",)
META_COLUMNS = ("point", "key", "status", "error", "replications", "seed", "wall_seconds")


# -- the grid ------------------------------------------------------------------------------------------
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


def parse_grid(specs: Iterable[str], source: str = "--grid") -> dict[str, list]:
    """``["endpoints.e.instances=1,2,3", "endpoints.e.routing=random,round_robin"]`` -> a grid dict.

    Values are YAML (``250ms``, ``{min: 1, max: 4}``, quoted strings), separated
    by commas as in a YAML flow list; ``A..B`` is the integers A to B inclusive.
    """
    grid: dict[str, list] = {}
    for spec in specs:
        if "=" not in spec:
            raise ScenarioError(f"--grid expects key.path=v1,v2,... (for example "
                                f"endpoints[0].instances=1,2,4), got {spec!r}", source=source)
        key, raw = (s.strip() for s in spec.split("=", 1))
        if not key:
            raise ScenarioError(f"--grid {spec!r} has no key path before '='; expected key.path=v1,v2,...",
                                source=source)
        if key in grid:
            raise ScenarioError("the key is given twice; put all its values in one --grid key=v1,v2,...",
                                source=source, path=key)
        m = _RANGE.match(raw)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ScenarioError(f"empty range {raw!r}; expected A..B with A <= B", source=source, path=key)
            values = list(range(a, b + 1))
        else:
            try:
                values = yaml.safe_load(f"[{raw}]")
            except yaml.YAMLError as e:
                problem = " ".join(str(getattr(e, "problem", None) or e).split())
                raise ScenarioError(f"cannot read the values {raw!r} ({problem}); expected a comma-separated "
                                    "list of YAML values, e.g. 1,2,4 or ml.g5.xlarge,ml.g6.xlarge",
                                    source=source, path=key) from None
            if not isinstance(values, list):   # pragma: no cover - a flow list always parses to a list
                values = [values]
        if not values or any(v is None for v in values):
            raise ScenarioError(f"no value (or an empty one) in {raw!r}; expected key.path=v1,v2,...",
                                source=source, path=key)
        grid[key] = values
    return grid


def _check_grid(grid: Mapping[str, Any], source: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, values in grid.items():
        if not isinstance(key, str) or not key.strip():
            raise ScenarioError(f"a grid key must be a key path such as endpoints[0].instances, got {key!r}",
                                source=source)
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            values = [values]
        values = list(values)
        if not values:
            raise ScenarioError("no values; expected a non-empty list", source=source, path=key)
        for v in values:
            try:
                json.dumps(v, allow_nan=False)
            except (TypeError, ValueError):
                raise ScenarioError(f"value {v!r} cannot be written as YAML/JSON; expected numbers, strings, "
                                    "lists or mappings", source=source, path=key) from None
        out[key] = values
    return out


def override_string(key: str, value: Any) -> str:
    """``key=value`` as ``--set`` reads it (JSON is YAML, so the value reads back exactly)."""
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def grid_points(grid: Mapping[str, list]) -> list[dict[str, Any]]:
    """The cartesian product, the last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_key(data: Any, params: Mapping[str, Any], replications: int | None,
              files: Mapping[str, str] | None = None) -> str:
    """What determines a point's result, hashed: the parsed scenario, the overrides, the replications
    and ``files``, the digest of each file the point's scenario reads (:func:`scenario_files`), by the
    path it is written with (a point that reads no file keeps the key it had without them)."""
    what: dict[str, Any] = {"scenario": data, "overrides": [override_string(k, v) for k, v in params.items()],
                            "replications": replications}
    if files:
        what["files"] = dict(files)
    blob = json.dumps(what, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def scenario_files(data: Any) -> list[str]:
    """The files a scenario (its parsed YAML, overrides applied) reads, as written there: the
    scenario's ``profile``, and each model's ``service.profile`` and ``traffic.path``. Read from the
    data as it is, valid or not (a point with a bad override still gets a key)."""
    out: list[str] = []
    if not isinstance(data, Mapping):
        return out
    if isinstance(data.get("profile"), str):
        out.append(data["profile"])
    models = data.get("models")
    for m in models if isinstance(models, list) else ():
        if not isinstance(m, Mapping):
            continue
        for block, key in (("service", "profile"), ("traffic", "path")):
            b = m.get(block)
            if isinstance(b, Mapping) and isinstance(b.get(key), str):
                out.append(b[key])
    return list(dict.fromkeys(out))


class FileDigests:
    """The SHA-256 of files' content, relative to ``base_dir``, each file read once per sweep (or again
    if its size, time or inode changed meanwhile). A file that cannot be read gets a word instead
    (its point then fails, with the loader's message)."""

    _CHUNK = 1 << 20

    def __init__(self, base_dir: str | Path):
        self.base_dir = Path(base_dir)
        self._seen: dict[tuple, str] = {}

    def __call__(self, rel: str) -> str:
        try:
            if "\0" in rel:
                return "unreadable"
            path = (self.base_dir / rel).resolve()
            st = path.stat()
        except (OSError, RuntimeError, ValueError):
            return "missing"
        if not stat.S_ISREG(st.st_mode):   # a FIFO or a device is never read to its end here
            return "not a regular file"
        key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
        if key not in self._seen:
            h = hashlib.sha256()
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(self._CHUNK):
                        h.update(chunk)
            except OSError:
                return "unreadable"
            self._seen[key] = h.hexdigest()
        return self._seen[key]

    def of(self, data: Any, params: Mapping[str, Any]) -> dict[str, str]:
        """The digests of the files a point reads: ``data`` with the point's overrides applied."""
        try:
            point = apply_overrides(data, [override_string(k, v) for k, v in params.items()], source="--grid")
        except ScenarioError:
            point = data   # the point fails when it runs; the files of the scenario as given key it
        return {rel: self(rel) for rel in scenario_files(point)}


# -- one point (runs on a worker) -----------------------------------------------------------------------
@dataclass(frozen=True)
class PointTask:
    """One point, self-contained (the parsed YAML travels with it, so a remote worker needs no copy of
    the scenario file; trace and profile files are read relative to ``base_dir``)."""

    key: str
    params: dict
    overrides: tuple
    data: dict
    source: str
    base_dir: str
    replications: int | None
    force: bool = False        # run even where the size estimate says it will not fit in memory
    share: int = 1             # points running at once on the worker's machine (sharing its memory)


def run_point(task: PointTask) -> dict[str, Any]:
    """Simulate one point; never raises for a bad point: the record says ``status: error``. A point
    refused by the size estimate (:mod:`sim.volume`) also has ``retry: true``: that depends on the
    machine, not the point, and such records are not kept (a rerun, or ``--force``, tries again)."""
    from ..api import run
    from ..scenario.loader import check_trace_files
    from ..volume import check as check_size
    from ..workload.traces import TraceError

    t0 = time.perf_counter()
    rec: dict[str, Any] = {"schema": POINT_SCHEMA, "key": task.key, "params": task.params,
                           "overrides": list(task.overrides), "replications": task.replications,
                           "status": "ok", "error": None, "summary": None}
    try:
        data = apply_overrides(task.data, task.overrides, source=f"{task.source} (--grid)")
        sc = parse_scenario(data, source=task.source, base_dir=Path(task.base_dir))
        check_trace_files(sc)
        if not task.force:
            try:
                check_size(sc, replications=task.replications, share=task.share)
            except ScenarioError:
                rec["retry"] = True
                raise
        res = run(sc, replications=task.replications, force=True)
        s = res.summary
        rec["replications"] = s.get("replications", 1)
        rec["summary"] = {k: s[k] for k in ("seed", "simulated_seconds", "warmup_seconds", "overall", "endpoints")
                          if k in s}
        rec["summary"]["warnings"] = list(s.get("warnings") or [])
    except (ScenarioError, TraceError) as e:
        rec.update(status="error", error=str(e))
    except Exception as e:   # a failing point is recorded, the sweep goes on
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
    rec["wall_seconds"] = time.perf_counter() - t0
    return rec


# -- files --------------------------------------------------------------------------------------------
def _json(rec: dict) -> str:
    return json.dumps(rec, indent=1, default=json_default, ensure_ascii=False) + "\n"


def load_points(points_dir: Path) -> dict[str, dict]:
    """The finished points in ``points_dir`` by key; unreadable or partial files are ignored (re-run)."""
    out: dict[str, dict] = {}
    if not points_dir.is_dir():
        return out
    for p in points_dir.glob("*.json"):
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("schema") == POINT_SCHEMA and rec.get("key") == p.stem:
            out[p.stem] = rec
    return out


# -- the table ----------------------------------------------------------------------------------------
def _flatten(block: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    """Scalars of a summary block as ``prefix + key``; each figure followed by its ``_ci95`` (NaN without
    replications), nested blocks (``cloudwatch``) as ``prefix + block.key``."""
    for k, v in block.items():
        if isinstance(v, Mapping):
            _flatten(v, f"{prefix}{k}.", out)
        elif isinstance(v, (list, tuple)) or isinstance(v, str):
            continue
        else:
            out[prefix + k] = math.nan if v is None else v
            if not k.endswith("_ci95") and f"{k}_ci95" not in block:
                out[f"{prefix}{k}_ci95"] = math.nan


def record_row(index: int, params: Mapping[str, Any], rec: Mapping[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {"point": index, "key": rec.get("key")}
    row.update(params)
    s = rec.get("summary") or {}
    row.update(status=rec.get("status"), error=rec.get("error"), replications=rec.get("replications"),
               seed=s.get("seed"), wall_seconds=rec.get("wall_seconds"))
    if s.get("overall"):
        _flatten(s["overall"], "", row)
    for name, blk in (s.get("endpoints") or {}).items():
        _flatten(blk, f"endpoint.{name}.", row)
    return row


def results_table(points: list[dict[str, Any]], keys: list[str], records: Mapping[str, dict]) -> pd.DataFrame:
    """One row per grid point (in grid order): its parameters, status, error and every figure."""
    rows = [record_row(i, params, records.get(k) or {"key": k, "status": "missing"})
            for i, (params, k) in enumerate(zip(points, keys))]
    df = pd.DataFrame(rows)
    for col in (points[0].keys() if points else ()):
        vals = df[col].tolist()
        kinds = {type(v) for v in vals}
        if len(kinds) > 1 and not kinds <= {int, float}:
            # mixed values (numbers and strings, mappings): strings, so that parquet can hold them
            df[col] = [v if isinstance(v, str) else json.dumps(v) for v in vals]
        elif kinds <= {dict, list}:
            df[col] = [json.dumps(v) for v in vals]
    for col in ("error", "seed", "replications"):
        if col in df and df[col].isna().all():
            df[col] = df[col].astype(object)
    return df


def comparable(df: pd.DataFrame) -> pd.DataFrame:
    """The table without the columns that measure the machine (wall time): two executors give equal ones."""
    return df.drop(columns=[c for c in df.columns if c in WALL_COLUMNS]).reset_index(drop=True)


# -- the sweep ----------------------------------------------------------------------------------------
def _as_executor(executor: Any, workers: int | None, scheduler: Any) -> tuple[Executor, bool]:
    """(executor, whether we own it and must close it)."""
    if isinstance(executor, Executor):
        return executor, False
    if executor is not None:
        try:
            from dask.distributed import Client
        except ImportError:  # pragma: no cover
            Client = None
        if Client is not None and isinstance(executor, Client):
            return DaskExecutor(executor), True
        if executor == "serial":
            return SerialExecutor(), True
        if executor == "local":
            return LocalExecutor(workers), True
        raise ScenarioError(f"unknown executor {executor!r}; expected an Executor, a dask Client, "
                            "'serial' or 'local'", source="executor")
    return make_executor(workers, scheduler), True


class _Bar:
    """A rich progress bar on stderr with the time left, or a callback ``progress(done, total)``."""

    def __init__(self, progress: bool | Callable[[int, int], None], total: int, label: str):
        self.cb = progress if callable(progress) else None
        self.total = total
        self.done = 0
        self._p = None
        if progress is True and total:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                               TextColumn("{task.fields[failed]}"),
                               console=Console(stderr=True), transient=False)
            self._task = self._p.add_task(label, total=total, failed="")

    def __enter__(self):
        if self._p is not None:
            self._p.start()
        return self

    def advance(self, failed: int) -> None:
        self.done += 1
        if self._p is not None:
            self._p.update(self._task, advance=1, failed=f"{failed} failed" if failed else "")
        if self.cb is not None:
            self.cb(self.done, self.total)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.stop()


def sweep(scenario_path: str | Path, grid: Mapping[str, Iterable[Any]] | Iterable[str], *,
          replications: int | None = None, out: str | Path | None = None, executor: Any = None,
          workers: int | None = None, scheduler: str | None = None,
          progress: bool | Callable[[int, int], None] = False, retry_failed: bool = False,
          overrides: Iterable[str] = (), log: Callable[[str], None] | None = None,
          force: bool = False) -> pd.DataFrame:
    """Simulate every point of ``grid`` (``{"endpoints.e.instances": [1, 2, 4], ...}`` or ``--grid``
    strings) on ``scenario_path`` with ``replications`` each (default: the scenario's).

    ``out``: a directory for the per-point files and the final table (``results.parquet``,
    ``results.csv``); a sweep run again over it skips the finished points (``retry_failed``: except
    those that failed). Without ``out`` nothing is written. ``executor``: an :class:`Executor`, a
    ``dask.distributed.Client``, ``"serial"`` or ``"local"``; default a local process pool of
    ``workers`` (all cores; 1: serial in this process), or the Dask cluster at ``scheduler``.
    ``overrides`` apply to every point before the grid's. Each point's size is estimated before it
    runs (:mod:`sim.volume`, against the memory of its machine shared by the local workers); one that
    would not fit fails with that estimate unless ``force``. Returns the table, one row per point.
    """
    path = Path(scenario_path)
    source = str(scenario_path)
    data = read_yaml(path)
    if overrides:
        data = apply_overrides(data, overrides, source=f"{source} (--set)")
    if isinstance(grid, Mapping):
        grid = _check_grid(grid, f"{source} (--grid)")
    else:
        grid = parse_grid(list(grid), source=f"{source} (--grid)")
    if replications is not None and replications < 1:
        raise ScenarioError(f"expected at least 1 replication, got {replications}", source="--replications")
    points = grid_points(grid)
    base_dir = str(path.resolve().parent)
    digests = FileDigests(base_dir)
    keys = [point_key(data, p, replications, digests.of(data, p)) for p in points]

    records: dict[str, dict] = {}
    points_dir = None
    if out is not None:
        out = Path(out)
        points_dir = out / "points"
        points_dir.mkdir(parents=True, exist_ok=True)
        for folder in (out, points_dir):   # what a killed sweep was writing
            remove_stale_temporaries(folder)
        wanted = set(keys)
        records = {k: r for k, r in load_points(points_dir).items() if k in wanted}
        if retry_failed:
            records = {k: r for k, r in records.items() if r.get("status") == "ok"}
        atomic_write(out / "sweep.json", json.dumps({
            "scenario": str(path.resolve()), "grid": grid, "replications": replications,
            "overrides": list(overrides), "points": len(points)}, indent=2, default=json_default) + "\n")

    todo: list[PointTask] = []
    seen = set(records)
    for p, k in zip(points, keys):
        if k in seen:
            continue
        seen.add(k)
        todo.append(PointTask(k, p, tuple(override_string(kk, v) for kk, v in p.items()), data, source,
                              base_dir, replications, force))
    say = log or (lambda msg: None)
    if records:
        say(f"{len(records)} of {len(set(keys))} points already done in {points_dir}; running the other "
            f"{len(todo)}")

    failed = sum(1 for r in records.values() if r.get("status") != "ok")
    if todo:
        ex, own = _as_executor(executor, workers, scheduler)
        if isinstance(ex, LocalExecutor):   # its workers share this machine's memory
            share = min(ex.workers, len(todo))
            todo = [replace(t, share=share) for t in todo]
        say(f"sweep of {len(todo)} points x {replications or data.get('replications', 1)} replication(s) "
            f"on {ex.describe()}")
        try:
            it = ex.map(run_point, todo)
            with _Bar(progress, len(todo), "sweep") as bar:
                for i, outcome in it:
                    task = todo[i]
                    if outcome.ok:
                        rec = json.loads(_json(outcome.value))   # exactly what a resumed sweep reads back
                        if points_dir is not None and not rec.get("retry"):
                            atomic_write(points_dir / f"{task.key}.json", _json(rec))
                    else:   # the executor failed (a worker died): reported, not saved, so a rerun retries it
                        e = outcome.error
                        rec = {"schema": POINT_SCHEMA, "key": task.key, "params": task.params,
                               "overrides": list(task.overrides), "replications": replications,
                               "status": "error", "error": f"executor: {type(e).__name__}: {e}", "summary": None}
                    records[task.key] = rec
                    if rec["status"] != "ok":
                        failed += 1
                    bar.advance(failed)
        except BaseException:
            if not own:
                ex.close()   # an interruption: stop the points still queued or running
            raise
        finally:
            if own:
                ex.close()

    table = results_table(points, keys, records)
    if out is not None:
        atomic_write_frame(table, out / "results.parquet")
        atomic_write_frame(table, out / "results.csv")
    return table


# -- a benchmark (not a unit test) ----------------------------------------------------------------------
def _bench_scenario(duration: float, rate: float) -> dict:
    return {
        "name": "bench-sweep", "seed": 1, "duration": duration, "warmup": 0,
        "models": [{"name": "m", "size_gb": 1, "service": {"dist": "lognormal", "mean": 0.05, "cv": 1.0},
                    "traffic": {"process": "poisson", "rate": rate}}],
        "endpoints": [{"name": "e", "mode": "sme", "instance_type": "ml.g5.xlarge", "instances": 8,
                       "routing": "least_outstanding_requests", "max_concurrency": 2, "models": ["m"]}],
    }


def bench_parallel(points: int = 16, workers: int | None = None, duration: float = 1800.0, rate: float = 100.0,
                   replications: int = 1, repeat: int = 1) -> dict[str, Any]:
    """Wall time of a ``points``-point sweep, serial in this process vs a local process pool of ``workers``
    (default: all cores), and whether both give the same table. With ``repeat`` > 1 the two alternate and
    the fastest of each counts (robust to other load on the machine). Not a unit test: run it by hand::

        python -c "from sim.plan.sweep import bench_parallel; print(bench_parallel())"
    """
    t_serial, t_par, same, n_workers, requests = [], [], True, 0, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.yaml"
        path.write_text(yaml.safe_dump(_bench_scenario(duration, rate), sort_keys=False))
        grid = {"seed": list(range(1, points + 1))}
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            serial = sweep(path, grid, replications=replications, executor=SerialExecutor())
            t_serial.append(time.perf_counter() - t0)
            pool = LocalExecutor(workers)
            n_workers = pool.workers
            t0 = time.perf_counter()
            try:
                parallel = sweep(path, grid, replications=replications, executor=pool)
            finally:
                pool.close()
            t_par.append(time.perf_counter() - t0)
            same = same and comparable(serial).equals(comparable(parallel))
            requests = int(serial["requests"].iloc[0])
    return {"points": points, "workers": n_workers, "cores": cpu_count(), "requests_per_point": requests,
            "serial_seconds": round(min(t_serial), 3), "parallel_seconds": round(min(t_par), 3),
            "speedup": round(min(t_serial) / min(t_par), 3), "runs": {"serial": [round(x, 3) for x in t_serial],
                                                                    "parallel": [round(x, 3) for x in t_par]},
            "identical": bool(same)}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(bench_parallel(), indent=2), file=sys.stdout)
