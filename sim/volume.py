"""How big a run is, before it starts: the requests it will hold and the memory they need.

Every verb that simulates (``capsim run``, ``validate``, ``compare``, ``optimize``, ``sweep``,
``trace`` and the Python API's :func:`sim.run`) estimates, before any simulation, the requests a
run will hold: per traffic group, the expected count over the horizon (warmup + duration), times
the replications, times the result sets kept at once (``compare`` keeps one per plan). It then
refuses, with one paragraph naming the file, the key that drives the size and what would fit, a
run whose memory would exceed what the machine has available; ``--force`` (``force=True``) tries
anyway. This replaces the fixed cap of 10^8 requests per group the scenario loader used to apply.

Expected requests per replication, by traffic process:

- ``poisson``, ``gamma``: ``rate x horizon``;
- ``diurnal``: the integral of its rate profile over the horizon (the mean rate over whole
  periods; a horizon shorter than a period counts the part of the day it covers);
- ``mmpp``: the long-run rate ``(rate x mean_on + rate_off x mean_off) / (mean_on + mean_off)``;
- ``closed``: at most ``users x horizon / (think_time + mean service time)`` (each user has one
  request out at a time; queueing only lowers it). Unbounded (no think time, a service that can
  take no time) it is not counted, and the estimate says so;
- ``trace``: its rows (lines of the file, counted without parsing it: an upper bound); a looping
  trace ``rows x horizon / period`` as the replay repeats it;
- ``prewarm`` on an endpoint: one request per model per interval.

The memory: ``BYTES_PER_REQUEST`` per request of the replication being simulated,
``BYTES_PER_KEPT_REQUEST`` per request of the other replications (and result sets) kept meanwhile,
``BYTES_PER_TRACE_ROW`` per trace row read (all measured: see their comments). The core does no
I/O, so this module sits at the edge: it reads ``/proc/meminfo`` and counts trace lines.
"""
from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .scenario import Scenario, ScenarioError

# Peak resident memory per request, measured on capsim 0.1.0 (2026-12-06, Python 3.11, numpy,
# pandas, pyarrow; a 2-core Linux machine) as the growth of the peak RSS (ru_maxrss) of
# `capsim run` between two sizes of one scenario, which leaves out the interpreter and the imports.
# While a replication is simulated its requests are Python lists (about 14 columns), then numpy
# columns, then its requests DataFrame; that frame is kept until the run is saved (parquet).
#
# A request of the replication being simulated, its frame included: one replication, 2e5 and 8e5
# requests, --no-plots: SME poisson 600 bytes, MME of 20 models 610, token-based with batching 541;
# 1e5 and 4e5 requests: SME 499, 424 with the plots. The largest, rounded up:
BYTES_PER_REQUEST = 620
# A request of every other replication (and of every other result set a verb keeps meanwhile:
# compare keeps each plan's): 10 replications of 1e5 and of 4e5 requests each grew by 2850 bytes
# per request of a replication, 620 + 9 x 248. Rounded up (3 replications measured 687 bytes per
# request of a replication, below the 1140 this gives):
BYTES_PER_KEPT_REQUEST = 260
# A row of a trace file while it is read (as strings, then parsed): read_trace of a csv trace of four
# columns, 2.5e5 and 1e6 rows: 292 bytes per row (a run replaying it grew by 849 bytes per request,
# 600 + 249). Rounded up:
BYTES_PER_TRACE_ROW = 300

# A run is refused when it needs more than this share of the memory available: the rest is for
# the interpreter, the libraries and whatever else the machine runs meanwhile.
USABLE_SHARE = 0.9

_LINE_COUNT_CHUNK = 1 << 20


@dataclass(frozen=True)
class Part:
    """One source of requests: its key path in the scenario, the requests it sends per replication
    and how that was reckoned."""

    path: str
    requests: float
    why: str
    kind: str                       # rate | users | trace | loop | prewarm
    scale: float | None = None      # the value a 'fit' suggestion scales (a rate, users, rate_scale)
    fixed: float = 0.0              # requests of the part that do not scale with it (mmpp: the quiet rate's)
    trace_rows: int = 0             # rows of a trace file read for this part
    file: str = ""                  # that file (read once however many groups replay it)


@dataclass(frozen=True)
class Volume:
    """The estimated size of a run: its parts, replications and result sets held at once."""

    source: str
    horizon: float
    duration: float
    warmup: float
    replications: int
    copies: int = 1                 # result sets of ``replications`` runs held at once (compare: plans)
    parts: tuple[Part, ...] = ()
    unbounded: tuple[str, ...] = ()   # key paths whose requests cannot be bounded

    @property
    def per_replication(self) -> float:
        return float(sum(p.requests for p in self.parts))

    @property
    def requests(self) -> float:
        """Requests held at once, over the replications and result sets."""
        return self.per_replication * self.replications * self.copies

    @property
    def trace_rows(self) -> int:
        seen: dict[str, int] = {}
        for p in self.parts:
            if p.trace_rows:
                seen[p.file or p.path] = p.trace_rows
        return sum(seen.values())

    @property
    def per_request(self) -> float:
        """Bytes per request of a replication: its own, and those of the other replications and result
        sets kept meanwhile."""
        return BYTES_PER_REQUEST + (self.replications * self.copies - 1) * BYTES_PER_KEPT_REQUEST

    @property
    def bytes(self) -> float:
        return self.per_replication * self.per_request + self.trace_rows * BYTES_PER_TRACE_ROW

    def driver(self) -> Part | None:
        """The part that sends the most requests."""
        parts = [p for p in self.parts if p.requests]
        return max(parts, key=lambda p: p.requests) if parts else None

    def describe(self) -> str:
        """``about 1.2e+06 requests (...), about 540 MB``: for messages."""
        reps = (f" x {self.replications} replications" if self.replications > 1 else "")
        held = f" x {self.copies} result sets" if self.copies > 1 else ""
        d = self.driver()
        how = f"{d.why}" if d is not None else "no open-loop traffic"
        others = len([p for p in self.parts if p.requests]) - 1
        if others > 0:
            how += f", and {others} other source{'s' if others > 1 else ''}"
        kept = (f", {BYTES_PER_KEPT_REQUEST} for each kept from the other "
                f"{'result sets' if self.copies > 1 else 'replications'}"
                if self.replications * self.copies > 1 else "")
        return (f"about {_count(self.requests)} requests ({how}{reps}{held}), about "
                f"{human_bytes(self.bytes)} at {BYTES_PER_REQUEST} bytes per request simulated{kept}")


def _count(x: float) -> str:
    return f"{x:,.0f}" if x < 1e6 else f"{x:.3g}"


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def _num(x: float) -> str:
    return f"{x:.3g}"


# -- memory ---------------------------------------------------------------------------------------
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """What this process's cgroup still allows (v2 ``memory.max - memory.current``, or v1's limit
    less usage); None without a limit or where it cannot be read."""
    candidates = [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")]
    for limit_file, usage_file in candidates:
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit = int(raw)
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:   # v1 writes a huge number for "no limit"
            return None
        return max(limit - usage, 0)
    return None


def available_memory() -> int | None:
    """Bytes of memory this process could still take: ``MemAvailable`` of /proc/meminfo (or
    ``os.sysconf`` free pages where there is none), less where a cgroup limit is tighter; None where
    nothing can be read (then no run is refused)."""
    avail = _meminfo_available()
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):
            avail = None
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


# -- the estimate ---------------------------------------------------------------------------------
def count_lines(path: Path) -> int:
    """Lines of a text file (a last line without a newline counts), read in chunks."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_LINE_COUNT_CHUNK)
            if not chunk:
                break
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _trace_rows(path: Path, fmt: str) -> int:
    """Rows of a trace file, counted from its lines (the header left out): an upper bound."""
    lines = count_lines(path)
    return max(lines - (0 if fmt == "mooncake" else 1), 0)


def _mean_service(sc: Scenario, group) -> float:
    """The mean service time of a group's requests, from draws of its service model."""
    import numpy as np

    from .core.rng import Streams
    from .service import sample_tokens, service_times

    spec = sc.spec.models[group.index]
    rng = Streams(sc.spec.seed).get("size-estimate", group.name)
    k = 1024
    tin = sample_tokens(rng, spec.tokens.input, k) if spec.tokens else np.zeros(k, np.int64)
    tout = sample_tokens(rng, spec.tokens.output, k) if spec.tokens else np.zeros(k, np.int64)
    s = service_times(rng, group.service, tin, tout, k)
    return float(s.mean()) if len(s) else 0.0


def _loop_part(sc: Scenario, group, path: Path, where: str, rows: int) -> Part:
    """A looping trace: its rows times the horizon over its period (the trace is read for its span)."""
    import numpy as np

    from .workload.build import MIN_LOOP_PERIOD
    from .workload.traces import TraceError, loop_period, read_trace

    tr = group.traffic
    try:
        df = read_trace(path, tr.format)
    except TraceError as e:
        raise ScenarioError(str(e), source=sc.source, path=f"{where}.path") from None
    t = df["arrival_s"].to_numpy(dtype=np.float64)
    n = len(t)
    period = loop_period(t, tr.time_scale, tr.rate_scale)
    if period < MIN_LOOP_PERIOD:   # the replay refuses it, with its own message
        return Part(f"{where}.loop", float(n), f"the trace {tr.path}'s {n:,} rows", "trace", trace_rows=rows,
                    file=str(path))
    expected = n * sc.horizon / period
    return Part(f"{where}.rate_scale", expected,
                f"the trace {tr.path}'s {n:,} rows, looped every {_num(period)} s over {sc.horizon:g} s",
                "loop", scale=tr.rate_scale, trace_rows=rows, file=str(path))


def estimate(scenario: Scenario, *, replications: int | None = None, copies: int = 1) -> Volume:
    """The expected requests of a run of ``scenario`` (see the module's doc) and the memory they
    need; ``replications`` (default: the scenario's), ``copies``: result sets held at once."""
    from .workload.arrivals import cumulative_intensity

    sc = scenario
    horizon = sc.horizon
    parts: list[Part] = []
    unbounded: list[str] = []
    for g in sc.groups:
        tr = g.traffic
        if tr is None:
            continue
        where = f"models[{g.index}].traffic"
        p = tr.process
        if p in ("poisson", "gamma"):
            parts.append(Part(f"{where}.rate", tr.rate * horizon, f"{_num(tr.rate)}/s x {horizon:g} s", "rate",
                              scale=tr.rate))
        elif p == "diurnal":
            n = float(cumulative_intensity(horizon, tr.rate, peak_to_trough=tr.peak_to_trough, period=tr.period,
                                           phase=tr.phase, hourly_weights=tr.hourly_weights))
            parts.append(Part(f"{where}.rate", max(n, 0.0), f"a diurnal mean of {_num(tr.rate)}/s over "
                              f"{horizon:g} s", "rate", scale=tr.rate))
        elif p == "mmpp":
            mean = (tr.rate * tr.mean_on + tr.rate_off * tr.mean_off) / (tr.mean_on + tr.mean_off)
            quiet = tr.rate_off * tr.mean_off / (tr.mean_on + tr.mean_off) * horizon
            parts.append(Part(f"{where}.rate", mean * horizon, f"bursts of {_num(tr.rate)}/s, a long-run "
                              f"{_num(mean)}/s x {horizon:g} s", "rate", scale=tr.rate, fixed=quiet))
        elif p == "closed":
            cycle = tr.think_time + _mean_service(sc, g)
            if cycle > 0 and math.isfinite(cycle):
                parts.append(Part(f"{where}.users", tr.users * horizon / cycle,
                                  f"{tr.users} users, one request per {_num(cycle)} s at most, over {horizon:g} s",
                                  "users", scale=float(tr.users)))
            else:
                unbounded.append(f"{where}.users")
        elif p == "trace":
            path = (sc.base_dir / tr.path)
            try:
                regular = "\0" not in str(path) and stat.S_ISREG(path.stat().st_mode)
                rows = _trace_rows(path, tr.format) if regular else None
            except (OSError, RuntimeError, ValueError):
                rows = None
            if rows is None:   # not there, or not a file: the trace reader refuses it with its own message
                continue
            if tr.loop and rows * BYTES_PER_TRACE_ROW < (available_memory() or math.inf):
                parts.append(_loop_part(sc, g, path.resolve(), where, rows))
            else:
                parts.append(Part(f"{where}.path", float(rows), f"the trace {tr.path}'s {rows:,} rows", "trace",
                                  trace_rows=rows, file=str(path.resolve())))
    for ep in sc.endpoints:
        interval = ep.spec.prewarm
        if interval:
            n = len(ep.models) * math.ceil(horizon / interval)
            parts.append(Part(f"endpoints[{ep.spec_index}].prewarm", float(n),
                              f"{len(ep.models)} models prewarmed every {interval:g} s", "prewarm",
                              scale=float(interval)))
    return Volume(sc.source, horizon, sc.spec.duration, sc.spec.warmup,
                  max(int(replications or sc.spec.replications), 1), max(int(copies), 1), tuple(parts),
                  tuple(unbounded))


def _fits(vol: Volume, budget: float) -> str:
    """What would fit in ``budget`` bytes: requests in all, and the change of the driving key, the
    duration or the replications that gets there."""
    left = budget - vol.trace_rows * BYTES_PER_TRACE_ROW
    if left < vol.per_request:
        return (f"reading the traces alone ({vol.trace_rows:,} rows, about "
                f"{human_bytes(vol.trace_rows * BYTES_PER_TRACE_ROW)}) does not fit: use a shorter trace")
    per_rep = left / vol.per_request
    head = f"at most about {_count(per_rep * vol.replications * vol.copies)} requests fit"
    ideas = []
    d = vol.driver()
    total = vol.per_replication
    if d is not None and d.requests:
        others = total - d.requests
        want = per_rep - others            # what the driving part may send
        f = (want - d.fixed) / (d.requests - d.fixed) if d.requests > d.fixed else 0.0
        if 0 < f < 1:
            if d.kind == "rate" and d.scale:
                ideas.append(f"{d.path} at most {_num(d.scale * f)}/s")
            elif d.kind == "users" and d.scale and d.scale * f >= 1:
                ideas.append(f"{d.path} at most {math.floor(d.scale * f)}")
            elif d.kind == "loop" and d.scale:
                ideas.append(f"{d.path} at most {_num(d.scale * f)}")
            elif d.kind == "trace":
                ideas.append(f"a trace of at most {_count(want)} rows")
            elif d.kind == "prewarm" and d.scale:
                ideas.append(f"{d.path} at least {_num(d.scale / f)} s")
    if total > 0:
        f = per_rep / total
        if f < 1:
            dur = vol.horizon * f - vol.warmup
            if dur > 0:
                ideas.append(f"duration at most {_num(dur)} s")
            elif vol.warmup > 0:
                ideas.append(f"warmup and duration together at most {_num(vol.horizon * f)} s")
    if vol.replications > 1:
        per_kept = left / max(total, 1.0) - BYTES_PER_REQUEST + BYTES_PER_KEPT_REQUEST
        k = math.floor(per_kept / (vol.copies * BYTES_PER_KEPT_REQUEST))
        if 1 <= k < vol.replications:
            ideas.append(f"replications at most {k}")
    return head + (": e.g. with " + ", or ".join(ideas) if ideas else "")


def check(scenario: Scenario, *, replications: int | None = None, copies: int = 1, share: int = 1,
          force: bool = False, available: int | None = None) -> Volume:
    """:func:`estimate` the run and refuse it (:class:`ScenarioError` naming the file, the key that
    drives the size, the estimate and what would fit) when it needs more than ``USABLE_SHARE`` of
    the memory available (``available``, default :func:`available_memory`) divided by ``share`` (runs
    sharing the machine at once: a sweep's local workers). ``force``: estimate, never refuse."""
    vol = estimate(scenario, replications=replications, copies=copies)
    if force:
        return vol
    avail = available_memory() if available is None else available
    if avail is None:
        return vol
    budget = avail * USABLE_SHARE / max(share, 1)
    if vol.bytes <= budget:
        return vol
    d = vol.driver()
    where = d.path if d is not None else None
    if d is not None and vol.replications > 1 and vol.trace_rows * BYTES_PER_TRACE_ROW + vol.per_replication * (
            BYTES_PER_REQUEST + (vol.copies - 1) * BYTES_PER_KEPT_REQUEST) <= budget:
        where = "replications"
    of = f"{human_bytes(avail)} available" + (f", shared by {share} runs at once" if share > 1 else "")
    raise ScenarioError(f"this run needs more memory than the machine has: {vol.describe()}, and {of}; "
                        f"{_fits(vol, budget)} (or pass --force to try anyway)",
                        source=scenario.source, path=where)


__all__ = ["BYTES_PER_REQUEST", "BYTES_PER_KEPT_REQUEST", "BYTES_PER_TRACE_ROW", "Part", "Volume",
           "available_memory", "check", "count_lines", "estimate", "human_bytes"]
