"""The ``capsim`` command line: parse, call the API, print or write. Nothing more."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .scenario import ScenarioError
from .scenario.units import MAX_SEED


def _default_out(scenario: Path, *sub: str) -> Path:
    """``results/<name>/<sub>``, the scenario's name made safe as a folder name (never a path)."""
    from .output import default_dir
    from .scenario import read_yaml

    data = read_yaml(scenario)
    name = data.get("name") if isinstance(data, dict) else None
    return default_dir(name if name else scenario.stem, *sub)


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


class _Group(click.Group):
    """Turns the errors users cause into one paragraph and exit code 2."""

    def invoke(self, ctx):
        from .output import OutputError
        from .workload.traces import TraceError

        try:
            return super().invoke(ctx)
        except (ScenarioError, TraceError, OutputError) as e:
            _fail(str(e))
        except ValueError as e:   # click's path check stats a name with a NUL in it
            if "null byte" not in str(e):
                raise
            _fail("an argument holds a NUL character; expected a path (no file name holds one)")
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="capsim")
def main() -> None:
    """capsim: capacity planning for GPU model hosting (SME, MME, inference components)."""
    import signal

    def terminated(signum, frame):   # SIGTERM as Ctrl-C: saves under way clean up, then exit 143
        raise SystemExit(128 + signum)

    try:
        signal.signal(signal.SIGTERM, terminated)
    except ValueError:   # not the main thread (an embedding); leave the default
        pass


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


def _ms(v: float) -> str:
    return f"{v / 1e3:g} s" if v >= 1000 else f"{v:g} ms"


def slo_lines(summary: dict, blocks: dict[str, dict], most: int | None = None) -> list[str]:
    """Per block (named as it is to be shown), whether it met the summary's SLO and why not
    (:func:`sim.metrics.slo_verdict`), as lines to print. With more than ``most`` blocks, those that
    met it are one line (how many, and the worst figure's block); the others each keep theirs."""
    from .metrics import SLO_FIGURES, SLO_LABELS, slo_verdict

    slo = summary.get("slo") or {}
    if not slo:
        return ["no SLO set (add e.g. slo: {p99: 500ms} to the scenario): no verdict"]
    out = ["SLO " + ", ".join(f"{SLO_LABELS[SLO_FIGURES[k]]} <= {_ms(v)}" for k, v in slo.items()) + ":"]
    fold = most is not None and len(blocks) > most
    met_names = []
    for name, b in blocks.items():
        met, why = slo_verdict(b, slo)
        if met is None:
            out.append(f"  {name}: not judged (no requests)")
            continue
        if not met:
            out.append(f"  {name}: MISSED ({'; '.join(why)})")
            continue
        if fold:
            met_names.append(name)
            continue
        figs = [f"{SLO_LABELS[SLO_FIGURES[k]]} {_fmt(b[SLO_FIGURES[k]])} ms" for k in slo
                if b.get(SLO_FIGURES[k]) is not None]
        if b.get("slo_attainment") is not None:
            figs.append(f"attainment {b['slo_attainment']:.1%}")
        out.append(f"  {name}: met ({', '.join(figs)})")
    if met_names:
        k = next(iter(slo))
        fig = SLO_FIGURES[k]
        have = [n for n in met_names if blocks[n].get(fig) is not None]
        worst = max(have, key=lambda n: blocks[n][fig]) if have else None
        tail = (f" (the closest: {worst}, {SLO_LABELS[fig]} {_fmt(blocks[worst][fig])} ms)" if worst else "")
        n = len(met_names)
        out.append(f"  {'all' if n == len(blocks) else 'the other'} {n} met it{tail}")
    return out


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Results directory "
              "(default results/<name>/).")
@click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED), help="Override the scenario's seed.")
@click.option("--replications", type=click.IntRange(min=1), help="Override the number of replications.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a scenario key, e.g. --set endpoints[0].instances=4 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print summary.json alone on stdout.")
@click.option("--no-plots", is_flag=True, help="Skip the PNG figures.")
@click.option("--force", is_flag=True, help="Run even where the size estimate says the requests will not fit in "
              "the memory available.")
@click.option("--report", "with_report", is_flag=True, help="Also write report.html (as capsim report DIR).")
def run(scenario, out, seed, replications, overrides, as_json, no_plots, force, with_report):
    """Simulate SCENARIO and write summary.json, requests.parquet, timeline.csv and plots/."""
    from . import api
    from .scenario import load_scenario

    from .output import default_dir, preflight

    sc = load_scenario(scenario, overrides)
    reps = replications or sc.spec.replications
    preflight(out if out is not None else default_dir(sc.name), "run")
    if not force:   # before any word of a simulation: a run that will not fit is refused here
        from .volume import check

        check(sc, replications=reps)

    def progress(done, total):
        if total > 1 and not as_json:
            click.echo(f"replication {done}/{total} done", err=True)

    if not as_json:
        click.echo(f"simulating {sc.name}: {len(sc.models)} models, {len(sc.endpoints)} endpoints, "
                   f"{sc.horizon / 60:g} simulated minutes x {reps} replication(s)", err=True)
    from .progress import bar

    with bar(f"simulating {sc.name}", enabled=not as_json) as tick:   # a bar on a terminal only
        result = api.run(sc, seed=seed, replications=reps, progress=progress, force=True,   # checked above
                         progress_time=tick)
    path = result.save(out, plots=not no_plots)
    if with_report:
        from .report.html import write_report

        page = write_report(path)
        if not as_json:
            click.echo(f"report written to {page}", err=True)
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
    else:
        print_summary(result.summary)
        blocks = {**{f"endpoint {n}": b for n, b in result.summary["endpoints"].items()},
                  "all endpoints": result.summary["overall"]}
        for line in slo_lines(result.summary, blocks):
            click.echo(line)
        for w in result.summary.get("warnings", []):
            click.echo(f"warning: {w}", err=True)
        click.echo(f"results written to {path}/", err=True)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
def validate(scenario, overrides):
    """Check SCENARIO (and the traces it replays) without running it; estimate the run's size."""
    from .scenario import load_scenario
    from .volume import check, human_bytes
    from .workload.build import check_traces

    sc = load_scenario(scenario, overrides)
    check_traces(sc)
    vol = check(sc)
    for w in sc.warnings:
        click.echo(f"warning: {w}", err=True)
    unbounded = f"; not bounded: {', '.join(vol.unbounded)}" if vol.unbounded else ""
    click.echo(f"{scenario}: ok ({len(sc.models)} models, {len(sc.endpoints)} endpoints, "
               f"{sc.horizon / 60:g} simulated minutes; about {vol.requests:,.0f} requests, "
               f"{human_bytes(vol.bytes)} of memory{unbounded})")


def _wide_console():
    """A rich Console that never squeezes a table: piped (no terminal to measure), rich would fit it in
    80 columns and cut the names; then as wide as the table needs, up to 240 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 240)


def _emit_frame(df, fmt: str) -> None:
    """A catalog table for scripts: ``json`` (a list of records; null where a figure is absent) or ``csv``."""
    if fmt == "csv":
        click.echo(df.to_csv(index=False), nl=False)
        return
    from .api import json_default

    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}
            for r in df.to_dict(orient="records")]
    click.echo(json.dumps(rows, indent=2, default=json_default))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON (a list of records, every field "
              "with its source) for scripts.")
@click.option("--csv", "as_csv", is_flag=True, help="Print the listing as CSV (every field) for scripts.")
@click.option("--models", "models", is_flag=True,
              help="List the language-model architectures instead (figures from their published configs).")
@click.option("--gpus", "gpus", is_flag=True, help="List the GPU specs instead.")
def catalog(as_json, as_csv, models, gpus):
    """Instance types (with prices and sources) and GPU specs; with --models, model architectures."""
    from .catalog import load_catalog

    if as_json and as_csv:
        _fail("--json and --csv: choose one")
    if models and gpus:
        _fail("--models and --gpus: choose one")
    fmt = "json" if as_json else "csv" if as_csv else None
    cat = load_catalog()
    if models:
        _catalog_models(cat, fmt)
        return
    if gpus:
        import dataclasses

        import pandas as pd

        df = pd.DataFrame([dataclasses.asdict(g) for _, g in sorted(cat.gpus.items())])
    else:
        df = cat.table()
    if fmt:
        _emit_frame(df, fmt)
        return
    from rich.table import Table

    console = _wide_console()
    if not gpus:
        show = [c for c in ("name", "gpu", "gpus", "gpu_memory_gb", "vcpus", "memory_gb", "storage",
                            "network_gbps", "price_per_hour") if c in df.columns]
        t = Table(title="instance types (SageMaker real-time, us-east-1, on-demand $/h; sources: --json)")
        for c in show:
            t.add_column(c, justify="left" if c in ("name", "gpu", "storage") else "right", no_wrap=True)
        for _, row in df.iterrows():
            t.add_row(*[("-" if row[c] is None or row[c] != row[c] else str(row[c])) for c in show])
        console.print(t)
    g = Table(title="GPUs")
    for c in ("name", "memory_gb", "memory_bandwidth_gbs", "bf16_tflops", "fp16_tflops", "pcie_gen"):
        g.add_column(c, no_wrap=True)
    for name, spec in sorted(cat.gpus.items()):
        g.add_row(name, *[str(getattr(spec, c)) for c in ("memory_gb", "memory_bandwidth_gbs", "bf16_tflops",
                                                           "fp16_tflops", "pcie_gen")])
    console.print(g)


def _catalog_models(cat, fmt: str | None) -> None:
    """``capsim catalog --models``: one row per architecture with its derived figures."""
    df = cat.models_table()
    if fmt:
        _emit_frame(df, fmt)
        return
    from rich.table import Table

    t = Table(title="model architectures (all fields and sources: --json)")
    cols = ("name", "params", "active", "layers", "hidden", "heads", "kv_heads", "experts", "weight_gb",
            "kv_kb/token")
    for c in cols:
        t.add_column(c, justify="left" if c == "name" else "right", no_wrap=True)
    for a in cat.architectures.values():
        t.add_row(a.name, f"{a.params / 1e9:.2f}B", f"{a.active_params / 1e9:.2f}B", str(a.layers), str(a.hidden),
                  str(a.heads), str(a.kv_heads), f"{a.experts_per_token}/{a.experts}" if a.experts else "-",
                  f"{a.weight_gb:.2f}", f"{a.kv_bytes_per_token / 1e3:g}")
    _wide_console().print(t)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.option("--scale", type=click.FloatRange(min=0.001), default=1.0, show_default=True,
              help="Scale the number of simulated requests (1.0: about 10^6 per case, 2 x 10^5 for continuous_batching, "
              "5 x 10^4 for each of its output lengths; below 1, that share of the simulated day).")
@click.option("--parallel", is_flag=True, help="Also time a 16-point sweep serially and on a local process "
              "pool (sweep_serial_s, sweep_parallel_s, sweep_speedup; about half a minute more).")
@click.option("--fleet", is_flag=True, help="Also time capsim run of scenarios/fleet_100_models_day.yaml (63 "
              "endpoints, a day) at 1/24 of its traffic, about 360,000 requests, phase by phase (fleet_run_s; "
              "about 10 s more).")
def bench(as_json, scale, parallel, fleet):
    """Simulated requests per wall second, and the speed-up over a process-per-request SimPy model."""
    from .bench import run_bench

    if not as_json:
        click.echo("benchmarking (about a minute)...", err=True)
    cases = ("sme", "mme", "batching", "continuous_batching", "continuous_batching_day", "routing_lor")
    res = run_bench(cases + (("fleet",) if fleet else ()) + (("sweep",) if parallel else ()), scale=scale)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    for name, c in res["cases"].items():
        if name == "sweep":
            click.echo(f"sweep: {c['points']} points ({c['requests_per_point']:,} requests each) serial "
                       f"{c['sweep_serial_s']:.2f} s, on {c['workers']} worker processes "
                       f"{c['sweep_parallel_s']:.2f} s: {c['sweep_speedup']:.2f}x on {c['cores']} cores"
                       f"{'' if c['identical'] else ' (TABLES DIFFER)'}")
            continue
        if name == "routing_lor":
            for n, us in c["lor_us_per_request"].items():
                click.echo(f"routing_lor: {n:,} instance{'s' if n != 1 else ''}: {us:.1f} us per request "
                           f"(random routing: {c['random_us_per_request'][n]:.1f} us)")
            continue
        if name == "fleet":
            click.echo(f"fleet: capsim run of a day of {c['models']} models on {c['endpoints']} endpoints at "
                       f"{c['share']:.3g} of their traffic ({c['requests']:,} requests): {c['total_s']:.1f} s "
                       f"(simulation {c['simulate_s']:.1f}, summary {c['summary_s']:.1f}, request table "
                       f"{c['requests_frame_s']:.1f}, timeline {c['timeline_s']:.1f}, save {c['save_s']:.1f})")
            continue
        if name == "continuous_batching_day":
            click.echo(f"{name}: {c['simulated_seconds'] / 3600:.3g} simulated hours ({c['requests']:,} requests, "
                       f"{c['rate_per_s']:g}/s) in {c['wall_seconds']:.2f} s")
            continue
        if "us_per_request" in c and "output_tokens" in c:
            click.echo(f"{name}: {c['requests']:,} requests of {c['output_tokens']:,} output tokens in "
                       f"{c['wall_seconds']:.2f} s = {c['us_per_request']:.1f} us per request")
            continue
        ratio = (f" ({c['requests_per_s'] / res['requests_per_s']:.0%} of sme)"
                 if name in ("batching", "continuous_batching") and "requests_per_s" in res else "")
        tokens = f", {c['output_tokens_per_s']:,.0f} output tokens/s" if "output_tokens_per_s" in c else ""
        click.echo(f"{name}: {c['requests']:,} requests in {c['wall_seconds']:.2f} s = "
                   f"{c['requests_per_s']:,.0f} simulated requests/s{ratio}{tokens}")
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
@click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED), help="Override the scenario's seed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE")
@click.option("--force", is_flag=True, help="Write them even where the size estimate says they will not fit in "
              "the memory available.")
def trace(scenario, out, seed, overrides, force):
    """Write the exact open-loop arrivals (time, model, tokens) SCENARIO's simulation uses."""
    from .scenario import load_scenario
    from .workload.build import arrivals_frame

    sc = load_scenario(scenario, overrides)
    if not force:
        from .volume import check

        check(sc, replications=1)
    df = arrivals_frame(sc, seed)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
    except OSError as e:
        _fail(f"{out}: cannot write the arrivals: {e.strerror or e}")
    closed = df.attrs["closed_groups"]
    extra = f" (closed-loop groups are not open-loop arrivals: {closed} left out)" if closed else ""
    click.echo(f"{len(df):,} arrivals written to {out}{extra}", err=True)


def _csv_list(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--grid", "grids", multiple=True, metavar="KEY.PATH=V1,V2,...",
              help="A swept key and its values (YAML, comma-separated; A..B for integers A to B); repeat for "
                   "more keys: the sweep runs their cartesian product.")
@click.option("--replications", type=click.IntRange(min=1), help="Replications per point (default: the "
              "scenario's); each figure then has its 95% CI (<key>_ci95).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Sweep directory (default "
              "results/<name>/sweep/): points/<hash>.json per finished point, results.parquet and results.csv. "
              "Run the same command again to resume an interrupted sweep.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Run the points on this Dask distributed scheduler.")
@click.option("--workers", type=click.IntRange(min=1), help="Local worker processes (default: all cores; 1: "
              "serial, in this process).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a scenario key for every point (repeatable).")
@click.option("--retry-failed", is_flag=True, help="Run again the points recorded with an error.")
@click.option("--force", is_flag=True, help="Run points even where the size estimate says the requests will not fit in "
              "the memory available.")
def sweep(scenario, grids, replications, out, scheduler, workers, overrides, retry_failed, force):
    """Simulate SCENARIO over a grid of overrides, each point with N replications; resumable."""
    from .plan.sweep import sweep as run_sweep
    from .scenario import read_yaml

    if out is None:
        out = _default_out(scenario, "sweep")
    try:
        table = run_sweep(scenario, list(grids), replications=replications, out=out, workers=workers,
                          scheduler=scheduler, progress=True, retry_failed=retry_failed, overrides=overrides,
                          log=lambda m: click.echo(m, err=True), force=force)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished points are kept in {out}/points/; run the same command to resume",
                   err=True)
        sys.exit(130)
    _print_sweep(table)
    bad = table[table["status"] != "ok"]
    params = _sweep_params(table)
    for _, row in bad.iterrows():
        where = ", ".join(f"{c}={row[c]}" for c in params)
        click.echo(f"point {row['point']} ({where}) failed: {row['error']}", err=True)
    click.echo(f"{len(table) - len(bad)} of {len(table)} points done"
               + (f", {len(bad)} failed (point{'s' if len(bad) > 1 else ''} "
                  f"{', '.join(str(p) for p in bad['point'])})" if len(bad) else "")
               + f"; table written to {out}/results.parquet and {out}/results.csv", err=True)
    if len(bad):
        sys.exit(1)


def _sweep_params(table) -> list[str]:
    """The swept keys: the table's columns before its figures, less the point's own columns (its seed too,
    unless the grid sweeps it)."""
    from .plan.sweep import META_COLUMNS

    params = []
    for c in table.columns:
        if c in META_COLUMNS and not (c == "seed" and table["seed"].nunique() > 1):   # (a grid over seed)
            continue
        if c == "requests":
            break
        params.append(c)
    return params


def _print_sweep(table) -> None:
    """The sweep's main figures on stdout, one row per point."""
    import math

    from rich.console import Console
    from rich.table import Table

    params = _sweep_params(table)
    t = Table(title=f"sweep: {len(table)} points")
    for c in ["point", *params, "status"]:
        t.add_column(c, justify="right" if c == "point" else "left", overflow="fold")
    figs = [("p99_ms", "P99 (ms)", 1), ("failed", "failed", 0), ("cost_usd", "cost (USD)", 2)]
    figs = [f for f in figs if f[0] in table.columns]
    for _, label, _ in figs:
        t.add_column(label, justify="right")

    def cell(row, key, digits):
        v = row.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        ci = row.get(f"{key}_ci95")
        s = _fmt(v, digits)
        return s + (f" ± {_fmt(ci, digits)}" if ci is not None and not (isinstance(ci, float) and math.isnan(ci))
                    else "")

    for _, row in table.iterrows():
        t.add_row(str(row["point"]), *[str(row[c]) for c in params], str(row["status"]),
                  *[cell(row, k, d) for k, _, d in figs])
    Console().print(t)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--instance-types", metavar="A,B,C", help="Instance types to consider (default: each "
              "endpoint's own).")
@click.option("--max-instances", type=click.IntRange(min=1), default=10, show_default=True,
              help="Largest instance count per endpoint.")
@click.option("--min-instances", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--slo", "slo", multiple=True, metavar="p99=500ms",
              help="Target(s) to meet: p50, p90, p99, mean, ttft or tpot (default: the scenario's slo).")
@click.option("--max-failed", type=click.FloatRange(min=0, max=1, max_open=True), default=0.001,
              show_default=True, help="Largest share of failed requests a feasible plan may have.")
@click.option("--routing", metavar="A,B", help="Routing policies to consider (default: each endpoint's own).")
@click.option("--endpoint", "endpoints", multiple=True, metavar="NAME",
              help="Endpoints to size (default: every sme and mme endpoint).")
@click.option("--modes", metavar="sme,mme,ic", help="Search hosting modes too: per mode the endpoints are "
              "replaced by the plan capsim compare builds for the fleet, sized by the search (ic: by compare's "
              "sizing, checked with the replications' CIs); the cheapest feasible mode wins.")
@click.option("--replications", type=click.IntRange(min=1), help="Replications per plan (default: the "
              "scenario's when more than 1, else 5).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a scenario key first (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print optimize.json alone on stdout.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output directory (default "
              "results/<name>/optimize/): optimize.json, best.yaml, plans.csv, frontier.csv, frontier.png.")
@click.option("--workers", type=click.IntRange(min=1), help="Local worker processes for the simulations "
              "(default 1: one after the other); the results are the same.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Run the simulations on this Dask distributed "
              "scheduler; the results are the same.")
@click.option("--force", is_flag=True, help="Run even where the size estimate says the requests will not fit in "
              "the memory available.")
@click.option("--knobs/--no-knobs", default=True, show_default=True, help="Also search each endpoint's per-copy "
              "concurrency where it changes the cost: max_concurrency of models with a batching curve, "
              "max_num_seqs of language models (--no-knobs: keep the scenario's).")
def optimize(scenario, instance_types, max_instances, min_instances, slo, max_failed, routing, endpoints,
             modes, replications, overrides, as_json, out, workers, scheduler, force, knobs):
    """The cheapest fixed fleet of SCENARIO whose P99 (upper end of its 95% CI) meets the SLO."""
    from .plan.optimize import optimize as run_optimize
    from .scenario import read_yaml

    if out is None:
        out = _default_out(scenario, "optimize")
    from .output import preflight

    preflight(out, "optimize")
    res = run_optimize(scenario, instance_types=_csv_list(instance_types), max_instances=max_instances,
                       min_instances=min_instances, slo=list(slo) or None, max_failed=max_failed,
                       replications=replications, routing=_csv_list(routing), endpoints=list(endpoints) or None,
                       modes=_csv_list(modes), overrides=overrides, out=out, log=(lambda m: None) if as_json else
                       (lambda m: click.echo(m, err=True)), force=force, workers=workers, scheduler=scheduler,
                       knobs=knobs)
    if as_json:
        click.echo(json.dumps(res.to_dict(), indent=2, default=str))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res.scenario}: {'cheapest plan meeting' if res.feasible else 'NO plan meets'} "
                    + ", ".join(f"{m} <= {v:g} ms" for m, v in res.slo.items()))
    if res.modes:
        m = Table(title="hosting modes searched")
        for c in ("mode", "outcome", "cost per hour (USD)", "plans simulated"):
            m.add_column(c)
        for mode, o in res.modes.items():
            m.add_row(mode + (" (best)" if mode == res.mode else ""), o.get("reason") or o["status"],
                      _fmt(o.get("cost_per_hour_usd"), 2), str(o.get("n_simulations", 0)))
        Console().print(m)
    for c in ("endpoint", "instance type", "instances", "routing"):
        t.add_column(c)
    knob_keys = ("max_concurrency", "max_num_seqs")
    per_copy = any(k in p for p in res.best_plan.values() for k in knob_keys)
    if per_copy:
        t.add_column("per copy")
    for name, p in res.best_plan.items():
        cells = [name, p["instance_type"], str(p["instances"]), str(p.get("routing"))]
        if per_copy:
            cells.append(", ".join(f"{k} {p[k]}" for k in knob_keys if k in p) or "-")
        t.add_row(*cells)
    Console().print(t)
    ov = (res.best_summary or {}).get("overall") or {}
    from .plan.slo import summary_key

    for m in res.slo:     # ttft and tpot: their P99
        key = summary_key(m)
        v, ci = ov.get(key), ov.get(f"{key}_ci95")
        label = f"{m} P99" if key != f"{m}_ms" else m
        click.echo(f"{label}: {_fmt(v)}" + (f" ± {_fmt(ci)}" if ci is not None else "") + " ms (95% CI)")
    click.echo(f"cost: ${res.cost_per_hour_usd:,.2f}/h")
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"{res.n_simulations} plans simulated x {res.replications} replications; best plan in "
               f"{out}/best.yaml, frontier in {out}/frontier.csv and {out}/frontier.png", err=True)
    if not res.feasible:
        sys.exit(1)



_COMPARE_ROWS = (("instances", "instances", None), ("execution models", "execution_models", None),
                 ("cost per hour (USD)", "cost_per_hour_usd", 2),
                 ("cost per 1M requests (USD)", "cost_per_million_usd", 2), ("P50 latency (ms)", "p50_ms", 1),
                 ("P99 latency (ms)", "p99_ms", 1), ("TTFT P99 (ms)", "ttft_p99_ms", 1),
                 ("TPOT P99 (ms)", "tpot_p99_ms", 2), ("SLO attainment", "slo_attainment", 4),
                 ("SLO met", "slo_met", None), ("requests", "requests", 0), ("failed", "failed", 0),
                 ("cold starts", "cold_starts", 0), ("cache hit rate", "cache_hit_rate", 4),
                 ("GPU utilisation", "gpu_utilization", 3),
                 ("batch size (mean, busy device)", "batch_size_mean", 2),
                 ("GPU memory utilisation", "gpu_memory_utilization", 3),
                 ("GPUs stranded (fraction)", "gpu_stranded_fraction", 3), ("simulations (sizing)", "simulations", 0))


def print_comparison(summary: dict) -> None:
    """compare.json as a table: one column per plan."""
    from rich.console import Console
    from rich.table import Table

    slo = ", ".join(f"{k[:-3]} <= {v:g} ms" for k, v in (summary.get("slo") or {}).items()) or "no SLO"
    t = Table(title=f"{summary['scenario']}: plans on the same arrivals ({slo}; "
                    f"{summary['simulated_seconds'] / 60:g} simulated minutes)")
    plans = summary["plans"]
    t.add_column("")
    for name, b in plans.items():
        t.add_column(f"{name}{' (best)' if name == summary.get('best') else ''}", justify="right")
    for label, key, digits in _COMPARE_ROWS:
        if key in ("ttft_p99_ms", "tpot_p99_ms") and all(b.get(key) is None for b in plans.values()):
            continue   # no language model in the fleet
        cells = []
        for b in plans.values():
            v = len(b.get("sizing", [])) if key == "simulations" else b.get(key)
            if isinstance(v, dict):
                cells.append(", ".join(f"{n} x {k}" for k, n in v.items()))
            elif isinstance(v, bool) or digits is None:
                cells.append("-" if v is None else ("yes" if v is True else "no" if v is False else str(v)))
            else:
                cells.append(_fmt(v, digits))
        t.add_row(label, *cells)
    Console().print(t)


@main.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plans", default="sme,mme,ic", show_default=True, metavar="sme,mme,ic | PLANS.yaml",
              help="Hosting modes to plan automatically, or a YAML file of plans written by hand (name -> list of "
                   "endpoints, or name -> scenario file whose endpoints are taken).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Output directory (default "
              "results/<name>/compare/): compare.json, plans/<plan>.yaml, runs/<plan>/.")
@click.option("--seed", type=click.IntRange(min=0, max=MAX_SEED), help="Override the scenario's seed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a scenario key first, e.g. --set slo.p99=1s (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json alone on stdout.")
@click.option("--report", "with_report", is_flag=True, help="Also write report.html (as capsim report DIR).")
@click.option("--workers", type=click.IntRange(min=1), help="Local worker processes for the simulations "
              "(default 1: one after the other); the results are the same.")
@click.option("--scheduler", metavar="tcp://HOST:PORT", help="Run the simulations on this Dask distributed "
              "scheduler; the results are the same.")
@click.option("--slo", "slo", multiple=True, metavar="p99=500ms",
              help="Target(s) to size for, replacing the scenario's slo: p50, p90, p99, mean, ttft or tpot.")
@click.option("--instance-types", metavar="A,B,C", help="Instance types the plans may use (default: the catalog's).")
@click.option("--force", is_flag=True, help="Run even where the size estimate says the requests will not fit in "
              "the memory available.")
def compare(scenario, plans, out, seed, overrides, as_json, with_report, workers, scheduler, slo, instance_types,
            force):
    """One plan per hosting mode for SCENARIO's fleet, each sized to meet its SLO, all on the same arrivals."""
    from .plan.compare import compare as run_compare
    from .scenario import read_yaml

    if out is None:
        out = _default_out(scenario, "compare")
    from .output import preflight

    preflight(out, "compare")
    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    cmp = run_compare(scenario, plans, overrides=overrides, seed=seed, out=out, progress=say, force=force,
                      workers=workers, scheduler=scheduler, slo=list(slo) or None,
                      instance_types=_csv_list(instance_types))
    if with_report:
        from .report.html import write_report

        page = write_report(out)
        say(f"report written to {page}")
    summary = cmp.summary
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
        return
    print_comparison(summary)
    for name, b in summary["plans"].items():   # each plan's verdict per endpoint, and its run's warnings
        eps = {f"endpoint {e}": blk for e, blk in (b.get("endpoints") or {}).items()}
        for line in slo_lines(summary, eps, most=8):
            click.echo(line if line.startswith("  ") else f"{name}: {line}")
    for name, why in summary["skipped"].items():
        click.echo(f"{name}: not built: {why}", err=True)
    for name, b in summary["plans"].items():
        for note in b["notes"]:
            click.echo(f"{name}: {note}", err=True)
        for w in b.get("warnings", []):
            click.echo(f"{name}: warning: {w}", err=True)
    best = summary["best"]
    judged = any(b.get("slo_met") is not None for b in summary["plans"].values())
    click.echo((f"cheapest plan meeting the SLO: {best}" if best else "no plan meets the SLO" if judged
                else "no plan judged against the SLO (no target, or no request in the horizon)")
               + f"; written to {out}/ (compare.json, plans/*.yaml to edit and re-run, runs/)", err=True)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="HTML file (default DIR/report.html).")
def report(directory, out):
    """Write a self-contained HTML report (figures embedded) for a run or compare directory."""
    from .report.html import write_report

    page = write_report(directory, out)
    click.echo(f"report written to {page} (figures also in {Path(directory) / 'plots'}/)", err=True)


@main.command()
@click.argument("measured", nargs=-1, type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda: where the testbed runs.")
@click.option("--quick", is_flag=True, help="Short replays (about a minute per case).")
@click.option("--cases", metavar="A,B", help="Cases of the built-in suite (default: all).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("results/fidelity"),
              show_default=True, help="fidelity.json and, per case, plan.json, arrivals.csv, measured.json.")
@click.option("--runs", type=click.IntRange(1, 10), default=1, show_default=True,
              help="Testbed runs per case at least (the errors are those of their mean; two or more give "
                   "the real system's own spread). A case outside the tolerance is run again, up to 3 runs "
                   "(or N, if more).")
@click.option("--profile", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="A calibration profile (capsim calibrate's) for the simulator's service and load times, "
                   "instead of the testbed's calibration replays.")
@click.option("--prepare", is_flag=True,
              help="Only write each case's plan.json and arrivals.csv under --out, for a testbed run elsewhere "
                   "(python -m calibration testbed, on a GPU box), compared later with capsim fidelity MEASURED...")
@click.option("--json", "as_json", is_flag=True, help="Print fidelity.json alone on stdout.")
def fidelity(measured, device, quick, cases, out, runs, profile, prepare, as_json):
    """The simulator's error against a real serving testbed on this machine, case by case.

    With MEASURED.json files (testbed runs made elsewhere, e.g. on a GPU box:
    python -m calibration testbed ...), compare those instead of running the suite."""
    from . import fidelity as fid

    say = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    try:
        if measured:
            res = fid.from_measured(list(measured), profile=profile)
        elif prepare:
            res = fid.run_suite(_csv_list(cases), quick=quick, out=out, prepare=True)
            for name, d in res["cases"].items():
                click.echo(f"python -m calibration testbed {d}/arrivals.csv --plan {d}/plan.json --device {device} "
                           f"--out {d}/measured.json", err=as_json)
            click.echo(f"then: capsim fidelity {out}/*/measured.json", err=True)
            if as_json:
                click.echo(json.dumps(res, indent=2))
            return
        else:
            res = fid.run_suite(_csv_list(cases), quick=quick, device=device, out=out, runs=runs, profile=profile,
                                log=say)
    except fid.FidelityError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        click.echo(f"interrupted: the cases finished are in {out}/fidelity.json", err=True)
        sys.exit(130)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title="simulated against measured, same plan and arrivals (means over a case's runs)")
    for c in ("case", "figure", "measured", "simulated", "error", "measured spread"):
        t.add_column(c, justify="left" if c in ("case", "figure") else "right")
    for name, row in res["cases"].items():
        spread = row.get("measured_spread")
        for fig in fid.FIGURES + tuple(f for f in fid.LLM_FIGURES if f in row["measured"]):
            m, s_ = row["measured"][fig], row["simulated"][fig]
            key = fig.replace("_ms", "").replace("_per_s", "")
            err = (f"{row['hit_rate_err_pp']:+.1f} pp" if fig == "hit_rate" else f"{row[key + '_err']:+.1%}")
            first = fig == fid.FIGURES[0]
            t.add_row(f"{name} ({len(row['runs'])} run{'s' if len(row['runs']) > 1 else ''})" if first else "",
                      fig, _fmt(m, 3 if fig == "hit_rate" else 1), _fmt(s_, 3 if fig == "hit_rate" else 1), err,
                      f"{spread[fig]:.1%}" if spread else "")
    Console().print(t)
    for name, row in res["cases"].items():
        st = row.get("settled")
        if st and row["measured"].get("cold_starts"):
            click.echo(f"{name}: P99 from {st['from_s']:.1f} s on (the first loads done): measured "
                       f"{st['measured_p99_ms']:.1f} ms, simulated {st['simulated_p99_ms']:.1f} ms "
                       f"({st['p99_err']:+.1%})")
    for name, row in res["cases"].items():
        noisy = [r["noise"]["why"] for r in row["runs"] if (r.get("noise") or {}).get("noisy")]
        if row.get("verdict") == "too noisy":
            click.echo(f"{name}: outside the tolerance, on a machine too noisy to measure ({'; '.join(noisy)})")
        elif row.get("verdict") == "known gap":
            click.echo(f"{name}: outside the tolerance on known gaps only, each within its bound: "
                       + "; ".join(f"{k} {row[k + '_err']:+.1%} ({why})" for k, why in row["known_gaps"].items()))
        elif row.get("verdict") == "outside":
            click.echo(f"{name}: outside the tolerance ({', '.join(k for k, ok in row['within'].items() if not ok)})")
        elif noisy:
            click.echo(f"{name}: measured on a noisy machine ({'; '.join(noisy)})")
    if not measured:
        click.echo(f"fidelity.json and each case's plan, arrivals and testbed records in {out}/", err=True)


if __name__ == "__main__":
    main()
