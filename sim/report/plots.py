"""PNG figures of a run: latency CDFs and a per-minute timeline."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from ..api import Result


def latency_cdf(result: "Result", ax=None):
    """Empirical CDF of the latency of completed requests, per endpoint (measured horizon)."""
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4))
    req = result.requests
    warm = result.scenario.spec.warmup
    sel = (req["status"] == "ok") & (req["arrival_s"] >= warm)
    for name, grp in req[sel].groupby("endpoint", observed=True):
        lat = np.sort(grp["latency_ms"].to_numpy())
        if len(lat):
            ax.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=str(name))
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{result.scenario.name}: latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return fig or ax.figure


def timeline_figure(result: "Result"):
    """Invocations, instances, requests in flight and P99 latency per minute, per endpoint."""
    tl = result.timeline
    req = result.requests
    if "replication" in tl.columns:
        tl = tl[tl["replication"] == 0]
        req = req[req["replication"] == 0]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    minutes = lambda s: s / 60.0  # noqa: E731
    ok = req[req["status"] == "ok"]
    for name, g in tl.groupby("endpoint", sort=False):
        axes[0].plot(minutes(g["t_s"]), g["invocations"], label=str(name))
        axes[1].step(minutes(g["t_s"]), g["instances"], where="post", label=str(name))
        axes[2].plot(minutes(g["t_s"]), g["in_flight"], label=str(name))
        r = ok[ok["endpoint"] == name]
        if len(r):
            minute = (r["arrival_s"] // 60).astype(int)
            p99 = r.groupby(minute)["latency_ms"].quantile(0.99)
            axes[3].plot(p99.index.to_numpy(), p99.to_numpy(), label=str(name))
    for ax, label in zip(axes, ("invocations / min", "instances in service", "requests in flight",
                                "P99 latency (ms)")):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    warm = result.scenario.spec.warmup
    if warm > 0:
        for ax in axes:
            ax.axvspan(0, warm / 60.0, color="grey", alpha=0.15, lw=0)
    axes[0].legend(loc="upper right", fontsize="small")
    axes[-1].set_xlabel("simulated minutes (shaded: warmup)")
    fig.suptitle(f"{result.scenario.name}: timeline")
    fig.tight_layout()
    return fig


def save_run_plots(result: "Result", out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, make in (("latency_cdf.png", latency_cdf), ("timeline.png", timeline_figure)):
        fig = make(result)
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
