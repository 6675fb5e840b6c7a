"""Simulations of the planner on an executor (:mod:`sim.plan.executors`), with the serial results.

A job is a scenario as data (``data``, ``source``, ``base_dir``: what each worker parses again; a
resolved Scenario does not travel between processes), a seed and a number of replications. Every
replication is one task (:func:`replication_task`, :func:`sim.api.run_replication` in a worker),
and the outputs are assembled in replication order as :func:`sim.api.run` does: the same seed,
the same replication index, the same code, so the same figures as a serial run, whichever worker
ran which replication.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..api import Result, assemble, run_replication
from ..scenario import parse_scenario
from .executors import Executor, make_executor


@dataclass(frozen=True)
class Job:
    data: dict
    source: str
    base_dir: Path
    seed: int | None
    replications: int


def replication_task(task: tuple) -> tuple:
    """In a worker: one replication of a job; ``(summary, requests, timeline)`` (frames None unless asked)."""
    data, source, base_dir, seed, r, reps, frames = task
    sc = parse_scenario(data, source=source, base_dir=base_dir)
    return run_replication(sc, sc.spec.seed if seed is None else seed, r, reps, frames)


def run_jobs(jobs: Sequence[Job], executor: Executor | None, *, frames: bool = True) -> list[Any]:
    """Each job's result: a :class:`~sim.api.Result` (``frames``), else its combined summary (a dict).
    Without an executor (or with one worker) the jobs run here, one after the other."""
    from ..metrics import combine

    parsed = [parse_scenario(j.data, source=j.source, base_dir=j.base_dir) for j in jobs]
    tasks, where = [], []
    for k, (j, sc) in enumerate(zip(jobs, parsed)):
        for r in range(j.replications):
            tasks.append((j.data, j.source, j.base_dir, j.seed, r, j.replications, frames))
            where.append(k)
    outs: list[Any] = [None] * len(tasks)
    if executor is None or executor.workers <= 1:
        for i, t in enumerate(tasks):
            sc = parsed[where[i]]
            outs[i] = run_replication(sc, sc.spec.seed if t[3] is None else t[3], t[4], t[5], frames)
    else:
        for i, outcome in executor.map(replication_task, tasks):
            if not outcome.ok:
                raise outcome.error
            outs[i] = outcome.value
    results = []
    for k, sc in enumerate(parsed):
        mine = [o for o, w in zip(outs, where) if w == k]
        results.append(assemble(sc, mine) if frames else combine([o[0] for o in mine]))
    return results


def run_one(data: dict, source: str, base_dir: Path, replications: int, executor: Executor | None,
            seed: int | None = None, frames: bool = True) -> Result | dict:
    """One job (see :func:`run_jobs`)."""
    return run_jobs([Job(data, source, base_dir, seed, replications)], executor, frames=frames)[0]


def planner_executor(workers: int | None, scheduler: Any) -> Executor | None:
    """compare's and optimize's executor: None (here, one after the other) unless ``scheduler`` (Dask) or
    ``workers`` > 1 (local processes) asks for one."""
    if scheduler:
        return make_executor(None, scheduler)
    if workers is not None and workers < 1:
        return make_executor(workers, None)   # the one-paragraph error
    if workers is None or workers == 1:
        return None
    return make_executor(workers, None)
