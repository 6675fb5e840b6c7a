"""The optimizer's result: the cheapest feasible plan, every plan simulated, the Pareto frontier."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..api import atomic_write, atomic_write_frame, json_default


@dataclass
class OptimizeResult:
    """The cheapest feasible plan found, and everything simulated on the way."""

    scenario: str
    slo: dict[str, float]                 # target in ms by metric
    max_failed: float
    replications: int
    best_plan: dict[str, dict]            # endpoint -> {instance_type, instances, routing}
    best_overrides: list[str]             # key.path=value, as --set reads them
    best_summary: dict | None             # summary of the best plan's simulation (overall, endpoints)
    best_yaml: str                        # the scenario with the best plan applied
    feasible: bool                        # every optimised endpoint meets the SLO with confidence
    cost_per_hour_usd: float              # the optimised endpoints' fleet, per hour
    frontier: pd.DataFrame                # Pareto frontier of cost per hour against P99 (all simulated plans)
    plans: pd.DataFrame                   # every simulated plan
    n_simulations: int                    # plans simulated (each with `replications` runs)
    candidates: list[dict] = field(default_factory=list)   # per endpoint, type and routing: bounds, outcome
    notes: list[str] = field(default_factory=list)
    mode: str | None = None               # with ``modes``: the hosting mode of the best plan
    modes: dict[str, dict] = field(default_factory=dict)   # with ``modes``: each mode's outcome

    def to_dict(self) -> dict[str, Any]:
        best = None
        if self.best_summary is not None:
            best = {"overall": self.best_summary.get("overall"), "endpoints": self.best_summary.get("endpoints")}
        return {
            "scenario": self.scenario, "slo_ms": self.slo, "max_failed": self.max_failed,
            "replications": self.replications, "feasible": self.feasible,
            "best_plan": self.best_plan, "best_overrides": self.best_overrides,
            "cost_per_hour_usd": self.cost_per_hour_usd, "n_simulations": self.n_simulations,
            "n_runs": self.n_simulations * self.replications, "best_summary": best,
            "candidates": self.candidates, "notes": self.notes,
            **({"mode": self.mode, "modes": self.modes} if self.modes else {}),
        }

    def save(self, out: str | Path) -> Path:
        """Write optimize.json, best.yaml, plans.csv, frontier.csv and frontier.png to ``out``."""
        from ..output import publish

        def write(d: Path) -> None:
            atomic_write(d / "optimize.json", json.dumps(self.to_dict(), indent=2, default=json_default) + "\n")
            atomic_write(d / "best.yaml", self.best_yaml)
            atomic_write_frame(self.plans, d / "plans.csv")
            atomic_write_frame(self.frontier, d / "frontier.csv")
            plot_frontier(self, d / "frontier.png")

        return publish(Path(out), write, "optimize")


def plot_frontier(res: OptimizeResult, path: Path) -> None:
    """Cost per hour against P99 of every simulated plan; the Pareto frontier, the SLO and the best plan
    (matplotlib's object API: the backend is left as it is)."""
    from ..report.plots import new_figure

    metric = next(iter(res.slo))
    col = f"{metric}_ms"
    fig, ax = new_figure((7, 4.5))
    df = res.plans.dropna(subset=[col]) if len(res.plans) else res.plans
    if len(df):
        ok = df["feasible"].astype(bool)
        err = df.get(f"{col}_ci95", pd.Series(0.0, index=df.index)).fillna(0.0)
        ax.errorbar(df.loc[~ok, "cost_per_hour_usd"], df.loc[~ok, col], yerr=err[~ok], fmt="o", color="0.6",
                    label="simulated, misses the SLO", capsize=2)
        ax.errorbar(df.loc[ok, "cost_per_hour_usd"], df.loc[ok, col], yerr=err[ok], fmt="o", color="tab:green",
                    label="simulated, meets the SLO", capsize=2)
    if len(res.frontier):
        ax.step(res.frontier["cost_per_hour_usd"], res.frontier[col], where="post", color="tab:blue",
                label="Pareto frontier")
    ax.axhline(res.slo[metric], color="tab:red", ls="--", label=f"SLO {metric} {res.slo[metric]:g} ms")
    if res.feasible and res.best_summary is not None:
        v = (res.best_summary.get("overall") or {}).get(col)
        if v is not None:
            ax.plot([res.cost_per_hour_usd], [v], marker="*", ms=16, color="gold", mec="k", ls="",
                    label="best plan")
    if len(df) and (df[col] > 0).all() and df[col].max() / max(df[col].min(), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("fleet cost (USD per hour)")
    ax.set_ylabel(f"{metric} latency (ms), 95% CI")
    ax.set_title(f"{res.scenario}: {res.n_simulations} plans simulated x {res.replications} replications")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def pareto(df: pd.DataFrame, cost: str, value: str) -> pd.DataFrame:
    """The rows no other row beats on both ``cost`` and ``value`` (lower is better), by cost."""
    d = df.dropna(subset=[value]).sort_values([cost, value], kind="stable")
    keep, best = [], math.inf
    for idx, v in zip(d.index, d[value]):
        if v < best:
            keep.append(idx)
            best = v
    return d.loc[keep].reset_index(drop=True)
