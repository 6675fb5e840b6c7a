"""From a scenario's traffic specs to the arrays the event core replays.

This is the edge between files and the core: trace files are read here, so
that the core receives plain arrays. Every group draws from its own streams,
keyed by the group's name, so plans of the same fleet see the same requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..core.rng import Streams
from ..scenario.errors import ScenarioError
from ..scenario.resolve import Group, Scenario
from ..service import sample_tokens, service_times
from .arrivals import diurnal_arrivals, gamma_arrivals, mmpp_on_off_arrivals, poisson_arrivals
from .popularity import assign, zipf_weights
from .traces import TraceError, loop_period, read_trace, trace_arrivals

_CHUNK = 4096


def group_weights(group: Group) -> np.ndarray:
    pop = group.traffic.popularity if group.traffic else "uniform"
    n = len(group.models)
    if pop == "uniform":
        return np.full(n, 1.0 / n)
    if "zipf" in pop:
        return zipf_weights(n, float(pop["zipf"]))
    w = np.asarray(pop["weights"], dtype=float)
    return w / w.sum()


class ClosedSource:
    """The requests of a closed-loop group, drawn in chunks as users ask for them."""

    def __init__(self, scenario: Scenario, group: Group, streams: Streams):
        self.group = group
        tr = group.traffic
        self.users = int(tr.users)
        self.think_time = float(tr.think_time)
        self._models = np.asarray(group.models)
        self._weights = group_weights(group)
        self._spec = scenario.spec.models[group.index]
        self._rng_pop = streams.get("popularity", group.name)
        self._rng_svc = streams.get("service", group.name)
        self._rng_tok = streams.get("tokens", group.name)
        self._buf: list[tuple[int, float, int, int]] = []

    def _refill(self) -> None:
        m = self._models[assign(self._rng_pop, _CHUNK, self._weights)]
        tin, tout = _served_tokens(self.group, *_tokens(self._spec.tokens, self._rng_tok, _CHUNK))
        svc = service_times(self._rng_svc, self.group.service, tin, tout, _CHUNK)
        self._buf = list(zip(m.tolist(), svc.tolist(), tin.tolist(), tout.tolist()))[::-1]

    def draw(self) -> tuple[int, float, int, int]:
        """(model, service time, input tokens, output tokens) of the next request."""
        if not self._buf:
            self._refill()
        return self._buf.pop()


@dataclass
class Workload:
    """Open-loop requests sorted by arrival, plus the closed-loop sources."""

    arrival: np.ndarray
    model: np.ndarray
    service: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    closed: list[ClosedSource] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrival)


def _tokens(spec, rng, n) -> tuple[np.ndarray, np.ndarray]:
    if spec is None:
        z = np.zeros(n, dtype=np.int64)
        return z, z.copy()
    return sample_tokens(rng, spec.input, n), sample_tokens(rng, spec.output, n)


def _served_tokens(group: Group, tin: np.ndarray, tout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The tokens as served: a continuous-batching model's sequence takes at least one token in and gives
    at least one out (a count of 0, drawn or in a trace, is served as 1, and the request table says so);
    other models' counts as they are."""
    if group.service.continuous:
        return np.maximum(tin, 1), np.maximum(tout, 1)
    return tin, tout


def _trace_table(scenario: Scenario, group: Group, cache: dict):
    tr = group.traffic
    path = (scenario.base_dir / tr.path).resolve()
    key = (str(path), tr.format)
    if key not in cache:
        try:
            cache[key] = read_trace(path, tr.format)
        except TraceError as e:
            raise ScenarioError(str(e), source=scenario.source,
                                path=f"models[{group.index}].traffic.path") from None
    if tr.loop:
        _check_loop(scenario, group, cache[key])
    return cache[key]


MIN_LOOP_PERIOD = 1e-3     # seconds: a looped trace repeats no faster (as the schema's periods)


def _check_loop(scenario: Scenario, group: Group, df) -> None:
    """A looped trace needs a span to repeat, of at least MIN_LOOP_PERIOD once scaled (how many
    requests the loop sends is :mod:`sim.volume`'s estimate, checked before a run)."""
    tr = group.traffic
    where = f"models[{group.index}].traffic.loop"
    t = df["arrival_s"].to_numpy(dtype=np.float64)
    n = len(t)
    span = float(t.max() - t.min()) if n else 0.0
    period = loop_period(t, tr.time_scale, tr.rate_scale)
    if period < MIN_LOOP_PERIOD:
        what = (f"{n} request{'s' if n != 1 else ''}, all at one time" if span <= 0
                else f"repeats every {period:.3g} s once scaled by time_scale / rate_scale")
        raise ScenarioError(f"cannot loop the trace {tr.path} ({what}); loop: true needs requests spread over "
                            "a span that repeats every 1ms or more", source=scenario.source, path=where)


def check_traces(scenario: Scenario) -> None:
    """Read every trace a scenario replays and take its arrivals as a run would: ScenarioError (with the
    traffic's key path) for a file, or a model column, that a run would refuse."""
    cache: dict = {}
    streams = Streams(scenario.spec.seed)
    for g in scenario.groups:
        if g.traffic is not None and g.traffic.process == "trace":
            _group_arrivals(scenario, g, streams, scenario.horizon, cache)


def _group_arrivals(scenario: Scenario, group: Group, streams: Streams, horizon: float,
                    cache: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Arrival times of a group and, for a trace, its models (local indices) and tokens."""
    tr = group.traffic
    rng = streams.get("arrivals", group.name)
    p = tr.process
    if p == "poisson":
        return poisson_arrivals(rng, tr.rate, horizon), None, None, None
    if p == "gamma":
        return gamma_arrivals(rng, tr.rate, tr.cv, horizon), None, None, None
    if p == "diurnal":
        return diurnal_arrivals(rng, tr.rate, horizon, peak_to_trough=tr.peak_to_trough, period=tr.period,
                                phase=tr.phase, hourly_weights=tr.hourly_weights), None, None, None
    if p == "mmpp":
        return mmpp_on_off_arrivals(rng, tr.rate, tr.rate_off, tr.mean_on, tr.mean_off, horizon), None, None, None
    if p == "trace":
        df = _trace_table(scenario, group, cache)
        times, rows = trace_arrivals(df, horizon, rate_scale=tr.rate_scale, time_scale=tr.time_scale, loop=tr.loop)
        local = None
        if "model" in df.columns:
            # A trace naming the scenario's models sends each request to its model: this group
            # takes the rows of its own. Other names: the group's popularity spreads the rows. Both
            # (some names the scenario's, some not): an error.
            names = [scenario.models[m].name for m in group.models]
            pos = {n: k for k, n in enumerate(names)}
            trace_models = df["model"].to_numpy()[rows].astype(str)
            mapped = np.array([pos.get(x, -1) for x in trace_models], dtype=np.int64)
            known = {m.name for m in scenario.models}
            seen = set(trace_models.tolist())
            if len(mapped) and (mapped >= 0).all():
                local = mapped
            elif len(mapped) and seen <= known:
                mine = mapped >= 0
                times, rows, local = times[mine], rows[mine], mapped[mine]
            elif seen & known:
                # Some names are the scenario's and some are not: a typo or a model left out, whose rows the
                # popularity would otherwise spread over the group's models without a word
                other = sorted(seen - known)
                raise ScenarioError(
                    f"the trace's model column names {', '.join(map(repr, other[:5]))}"
                    f"{' and more' if len(other) > 5 else ''}, which no model of the scenario has, beside "
                    f"names it does ({', '.join(map(repr, sorted(seen & known)[:5]))}): name in the scenario "
                    "every model the trace does, or none (the group's popularity then spreads the rows)",
                    source=scenario.source, path=f"models[{group.index}].traffic.path")
        # A token column the trace lacks (a csv trace may have either, both or none): the model's own
        # token counts for it (None here)
        cols = df.attrs.get("token_columns", ("input_tokens", "output_tokens"))
        tin, tout = (df[c].to_numpy()[rows].astype(np.int64) if c in cols else None
                     for c in ("input_tokens", "output_tokens"))
        return times, local, tin, tout
    raise ValueError(f"not an open-loop process: {p}")


def build_workload(scenario: Scenario, streams: Streams) -> Workload:
    """All open-loop requests of the scenario up to its horizon, sorted by arrival."""
    horizon = scenario.horizon
    parts = []
    closed = []
    cache: dict = {}
    for group in scenario.groups:
        tr = group.traffic
        if tr is None:
            continue
        if tr.process == "closed":
            closed.append(ClosedSource(scenario, group, streams))
            continue
        spec = scenario.spec.models[group.index]
        times, local, tin, tout = _group_arrivals(scenario, group, streams, horizon, cache)
        n = len(times)
        if local is None:
            local = assign(streams.get("popularity", group.name), n, group_weights(group))
        if tin is None or tout is None:
            own_in, own_out = _tokens(spec.tokens, streams.get("tokens", group.name), n)
            tin = own_in if tin is None else tin
            tout = own_out if tout is None else tout
        tin, tout = _served_tokens(group, tin, tout)
        svc = service_times(streams.get("service", group.name), group.service, tin, tout, n)
        models = np.asarray(group.models, dtype=np.int32)[local]
        parts.append((times, models, svc, tin, tout))
    if not parts:
        e = np.empty(0)
        return Workload(e, np.empty(0, np.int32), e, np.empty(0, np.int64), np.empty(0, np.int64), closed)
    cat = [np.concatenate(x) for x in zip(*parts)]
    order = np.argsort(cat[0], kind="stable")
    return Workload(*(c[order] for c in cat), closed=closed)


def arrivals_frame(scenario: Scenario, seed: int | None = None):
    """The exact open-loop arrivals a run of ``scenario`` uses (``capsim trace``):
    time, model name, tokens and service time, one row per request."""
    import pandas as pd

    wl = build_workload(scenario, Streams(scenario.spec.seed if seed is None else seed))
    names = np.array([m.name for m in scenario.models], dtype=object)
    df = pd.DataFrame({"arrival_s": wl.arrival, "model": names[wl.model] if len(wl.model) else [],
                       "input_tokens": wl.input_tokens, "output_tokens": wl.output_tokens,
                       "service_s": wl.service})
    df.attrs["closed_groups"] = len(wl.closed)
    return df
