"""The ``capsim`` command line: parse, call the API, print or write. Nothing more."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .scenario import ScenarioError


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns the errors users cause into one paragraph and exit code 2."""

    def invoke(self, ctx):
        from .workload.traces import TraceError

        try:
            return super().invoke(ctx)
        except (ScenarioError, TraceError) as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="capsim")
def main() -> None:
    """capsim: capacity planning for GPU model hosting (SME, MME, inference components)."""


def _fmt(v, digits=1):
    if v is None:
        return "-"
    if digits == 0 and float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.{max(digits, 1)}f}"


_ROWS = (("requests", "requests", 0), ("completed", "completed", 0), ("failed", "failed", 0),
         ("in flight at end", "in_flight", 0), ("P50 latency (ms)", "p50_ms", 1),
         ("P90 latency (ms)", "p90_ms", 1), ("P99 latency (ms)", "p99_ms", 1), ("mean latency (ms)", "mean_ms", 1),
         ("throughput (req/s)", "throughput_per_s", 2), ("cold starts", "cold_starts", 0),
         ("cache hit rate", "cache_hit_rate", 3), ("instances (mean)", "instances_mean", 2),
         ("instances (max)", "instances_max", 0), ("instance hours", "instance_hours", 2),
         ("cost (USD)", "cost_usd", 2), ("cost per 1M requests (USD)", "cost_per_million_usd", 2),
         ("SLO attainment", "slo_attainment", 3))


def print_summary(summary: dict) -> None:
    """The summary as a table: one column per endpoint and a total."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{summary['scenario']}: {summary['simulated_seconds'] / 60:g} simulated minutes "
                    f"(after {summary.get('warmup_seconds', 0) / 60:g} min warmup)")
    blocks = list(summary["endpoints"].items()) + [("total", summary["overall"])]
    t.add_column("")
    for name, _ in blocks:
        t.add_column(name, justify="right")
    for label, key, digits in _ROWS:
        vals = [b.get(key) for _, b in blocks]
        if all(v is None for v in vals):
            continue
        cis = [b.get(f"{key}_ci95") for _, b in blocks]
        cells = [_fmt(v, digits) + (f" ± {_fmt(c, digits)}" if c is not None else "") for v, c in zip(vals, cis)]
        t.add_row(label, *cells)
    Console().print(t)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Results directory "
              "(default results/<name>/).")
@click.option("--seed", type=int, help="Override the scenario's seed.")
@click.option("--replications", type=click.IntRange(min=1), help="Override the number of replications.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a scenario key, e.g. --set endpoints[0].instances=4 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json alone on stdout.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG figures.")
def run(scenario, out, seed, replications, overrides, as_json, no_plots):
    """Simulate SCENARIO and write summary.json, requests.parquet, timeline.csv and plots/."""
    from . import api
    from .scenario import load_scenario

    sc = load_scenario(scenario, overrides)
    reps = replications or sc.spec.replications

    def progress(done, total):
        if total > 1 and not as_json:
            click.echo(f"replication {done}/{total} done", err=True)

    if not as_json:
        click.echo(f"simulating {sc.name}: {len(sc.models)} models, {len(sc.endpoints)} endpoints, "
                   f"{sc.horizon / 60:g} simulated minutes x {reps} replication(s)", err=True)
    result = api.run(sc, seed=seed, replications=reps, progress=progress)
    path = result.save(out, plots=not no_plots)
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
    else:
        print_summary(result.summary)
        click.echo(f"results written to {path}/", err=True)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
def validate(scenario, overrides):
    """Check SCENARIO without running it."""
    from .scenario import load_scenario

    sc = load_scenario(scenario, overrides)
    click.echo(f"{scenario}: ok ({len(sc.models)} models, {len(sc.endpoints)} endpoints, "
               f"{sc.horizon / 60:g} simulated minutes)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def catalog(as_json):
    """Instance types (with prices and sources) and GPU specs."""
    from .catalog import load_catalog

    cat = load_catalog()
    df = cat.table()
    if as_json:
        click.echo(df.to_json(orient="records", indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    show = [c for c in ("name", "gpu", "gpus", "gpu_memory_gb", "vcpus", "memory_gb", "storage",
                        "network_gbps", "price_per_hour") if c in df.columns]
    t = Table(title="instance types (SageMaker real-time, us-east-1, on-demand $/h)")
    for c in show:
        t.add_column(c, justify="left" if c in ("name", "gpu", "storage") else "right")
    for _, row in df.iterrows():
        t.add_row(*[("-" if row[c] is None or row[c] != row[c] else str(row[c])) for c in show])
    Console().print(t)
    g = Table(title="GPUs")
    for c in ("name", "memory_gb", "memory_bandwidth_gbs", "bf16_tflops", "fp16_tflops", "pcie_gen"):
        g.add_column(c)
    for name, spec in sorted(cat.gpus.items()):
        g.add_row(name, *[str(getattr(spec, c)) for c in ("memory_gb", "memory_bandwidth_gbs", "bf16_tflops",
                                                           "fp16_tflops", "pcie_gen")])
    Console().print(g)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--scale", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
              help="Scale the number of simulated requests (1.0: about 10^6 per case).")
def bench(as_json, scale):
    """Simulated requests per wall second, and the speed-up over a process-per-request SimPy model."""
    from .bench import run_bench

    if not as_json:
        click.echo("benchmarking (about a minute)...", err=True)
    res = run_bench(scale=scale)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for name, c in res["cases"].items():
        click.echo(f"{name}: {c['requests']:,} requests in {c['wall_seconds']:.2f} s = "
                   f"{c['requests_per_s']:,.0f} simulated requests/s")
        if "baseline_requests_per_s" in c:
            click.echo(f"{name} baseline (SimPy process per request): {c['baseline_requests_per_s']:,.0f} "
                       f"requests/s; speed-up {c['speedup_vs_simpy_processes']:.2f}x")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def calibrate(ctx):
    """Run the calibration job (``python -m calibration``; needs torch): e.g.
    ``capsim calibrate run --device cuda --out scenarios/profiles/mine.json``."""
    import subprocess

    args = ctx.args or ["--help"]
    sys.exit(subprocess.call([sys.executable, "-m", "calibration", *args]))


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--seed", type=int)
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
def trace(scenario, out, seed, overrides):
    """Write the exact open-loop arrivals (time, model, tokens) SCENARIO's simulation uses."""
    import pandas as pd

    from .core.rng import Streams
    from .scenario import load_scenario
    from .workload.build import build_workload

    sc = load_scenario(scenario, overrides)
    wl = build_workload(sc, Streams(sc.spec.seed if seed is None else seed))
    names = [m.name for m in sc.models]
    df = pd.DataFrame({"arrival_s": wl.arrival, "model": [names[m] for m in wl.model],
                       "input_tokens": wl.input_tokens, "output_tokens": wl.output_tokens,
                       "service_s": wl.service})
    df.to_csv(out, index=False)
    extra = f" (closed-loop groups are not open-loop arrivals: {len(wl.closed)} left out)" if wl.closed else ""
    click.echo(f"{len(df):,} arrivals written to {out}{extra}", err=True)


if __name__ == "__main__":
    main()
