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
    """One figure to read at a glance: load, instances (in service and pending),
    P99 latency per minute, and cold starts and failures, per endpoint."""
    tl = result.timeline
    req = result.requests
    if "replication" in tl.columns:
        tl = tl[tl["replication"] == 0]
        req = req[req["replication"] == 0]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    ok = req[req["status"] == "ok"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, g) in enumerate(tl.groupby("endpoint", sort=False)):
        col = colors[k % len(colors)]
        m = g["t_s"].to_numpy() / 60.0
        axes[0].plot(m, g["invocations"], color=col, label=str(name))
        axes[1].step(m, g["instances"], where="post", color=col, label=f"{name} in service")
        if "instances_pending" in g and (g["instances_pending"] > 0).any():
            axes[1].step(m, g["instances"] + g["instances_pending"], where="post", color=col, ls="--",
                         label=f"{name} billed (incl. starting / draining)")
        r = ok[ok["endpoint"] == name]
        if len(r):
            minute = (r["arrival_s"] // 60).astype(int)
            p99 = r.groupby(minute)["latency_ms"].quantile(0.99)
            axes[2].plot(p99.index.to_numpy(), p99.to_numpy(), color=col, label=str(name))
        if "cold_starts" in g:
            axes[3].bar(m, g["cold_starts"], width=0.9, color=col, alpha=0.6, label=f"{name} cold starts")
        if "failed_requests" in g and g["failed_requests"].any():
            axes[3].plot(m, g["failed_requests"], color=col, ls=":", marker=".", label=f"{name} failed requests")
        if "failures" in g:
            for t in m[g["failures"].to_numpy() > 0]:
                for ax in axes:
                    ax.axvline(t, color="red", alpha=0.5, lw=1)
    axes[2].set_yscale("log")
    for ax, label in zip(axes, ("invocations / min", "instances", "P99 latency (ms)", "per minute")):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize="x-small")
    warm = result.scenario.spec.warmup
    if warm > 0:
        for ax in axes:
            ax.axvspan(0, warm / 60.0, color="grey", alpha=0.15, lw=0)
    axes[-1].set_xlabel("simulated minutes (shaded: warmup; red lines: instance failures)")
    fig.suptitle(f"{result.scenario.name}: timeline")
    fig.tight_layout()
    return fig


def token_figure(result: "Result"):
    """TTFT and TPOT CDFs per endpoint of the language models' requests (measured horizon)."""
    req = result.requests
    warm = result.scenario.spec.warmup
    sel = (req["status"] == "ok") & (req["arrival_s"] >= warm) & req["ttft_ms"].notna()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    slo = result.scenario.spec.slo
    for ax, col, label, target in ((axes[0], "ttft_ms", "TTFT", slo and slo.ttft),
                                   (axes[1], "tpot_ms", "TPOT", slo and slo.tpot)):
        for name, grp in req[sel].groupby("endpoint", observed=True):
            v = np.sort(grp[col].dropna().to_numpy())
            if len(v):
                ax.plot(v, np.arange(1, len(v) + 1) / len(v), label=str(name))
        if target:
            ax.axvline(target * 1e3, color="red", ls="--", lw=1, label=f"SLO {target * 1e3:g} ms")
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
    fig.suptitle(f"{result.scenario.name}: time to first token and time per output token")
    fig.tight_layout()
    return fig


def save_run_plots(result: "Result", out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    makers = [("latency_cdf.png", latency_cdf), ("timeline.png", timeline_figure)]
    if "ttft_ms" in result.requests and result.requests["ttft_ms"].notna().any():
        makers.append(("ttft_tpot.png", token_figure))
    for name, make in makers:
        fig = make(result)
        p = out / name
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
