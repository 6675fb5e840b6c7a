"""The testbed's router and load generator (the parent process).

It starts one serving process per instance (``server.serve``), replays the
arrivals open-loop on their timestamps, routes each request as the plan says
and records what happens: per request send, start and end times, instance,
cold or warm; every load and unload. Multi-model plans route with affinity, as
SageMaker's MMEs do and the simulator models: to an instance where the model is
loaded or loading (the policy chooses among those; a model whose every holder
has ``replicate_above`` of its requests outstanding goes to one more instance),
else to any instance by the policy, which loads it.
"""
from __future__ import annotations

import csv
import math
import multiprocessing as mp
import os
import random
import threading
import time
from multiprocessing.connection import wait

import numpy as np

from .. import fit, harness
from . import server

STARTUP_S = 0.5   # between the start signal and the first arrival


def read_arrivals(path: str, names: list) -> list:
    """(arrival_s, model index) from ``capsim trace``'s CSV, sorted by time."""
    index = {n: k for k, n in enumerate(names)}
    out = []
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        if rd.fieldnames is None or "arrival_s" not in rd.fieldnames:
            raise ValueError(f"{path}: expected a CSV with a column arrival_s (and model)")
        for k, row in enumerate(rd):
            name = row.get("model") or names[0]
            if name not in index:
                raise ValueError(f"{path}: row {k + 2}: model {name!r} is not in the plan")
            out.append((float(row["arrival_s"]), index[name]))
    out.sort()
    return out


class Router:
    """Routing state as the parent sees it: requests outstanding per instance and model."""

    def __init__(self, plan: dict, seed: int = 0):
        self.n = plan["instances"]
        self.policy = plan["routing"]
        self.affinity = plan["mode"] == "mme"
        self.rep_above = plan["replicate_above"]
        self.rng = random.Random(seed)
        self.outstanding = [0] * self.n
        self.per_model: list[dict] = [dict() for _ in range(self.n)]   # instance -> model -> outstanding
        n_models = len(plan["models"])
        self.holders: list[list[int]] = [[] if self.affinity else list(range(self.n)) for _ in range(n_models)]
        self._rr = 0
        self.lock = threading.Lock()

    def _choose(self, among: list) -> int:
        if len(among) == 1:
            return among[0]
        if self.policy == "random":
            return self.rng.choice(among)
        if self.policy == "round_robin":
            self._rr += 1
            return among[self._rr % len(among)]
        if self.policy == "power_of_two":
            a, b = self.rng.sample(among, 2)
            return a if self.outstanding[a] <= self.outstanding[b] else b
        low = min(self.outstanding[i] for i in among)
        return self.rng.choice([i for i in among if self.outstanding[i] == low])

    def route(self, m: int) -> int:
        with self.lock:
            hold = self.holders[m]
            if hold:
                inst = self._choose(hold)
                if (self.affinity and len(hold) < self.n
                        and all(self.per_model[h].get(m, 0) >= self.rep_above for h in hold)):
                    inst = self._choose([i for i in range(self.n) if i not in hold])
                    hold.append(inst)
            else:
                inst = self._choose(list(range(self.n)))
                hold.append(inst)
            self.outstanding[inst] += 1
            self.per_model[inst][m] = self.per_model[inst].get(m, 0) + 1
            return inst

    def done(self, inst: int, m: int) -> None:
        with self.lock:
            self.outstanding[inst] -= 1
            self.per_model[inst][m] -= 1

    def unloaded(self, inst: int, m: int) -> None:
        with self.lock:
            if inst in self.holders[m]:
                self.holders[m].remove(inst)


def run(plan: dict, arrivals: list, files: list, device: str = "cpu", seed: int = 0, probe_loads: int = 5,
        probe_requests: int = 40, calibration_requests: int = 240, log=print) -> dict:
    """Serve ``arrivals`` (from read_arrivals) with ``plan`` and its model ``files``; return the
    records, with the models' calibrated times under ``probe`` (see calibration_arrivals)."""
    ctx = mp.get_context("spawn")
    conns, procs = [], []
    for i in range(plan["instances"]):
        parent, child = ctx.Pipe()
        # instance 0 probes the models; the others only start
        p = ctx.Process(target=server.serve, args=(i, plan, files, device, child,
                                                   probe_loads if i == 0 else 0, probe_requests if i == 0 else 0),
                        daemon=True)
        p.start()
        conns.append(parent)
        procs.append(p)
    try:
        probed = None
        for i, (c, p) in enumerate(zip(conns, procs)):
            msg = _ready(i, c, p)
            probed = probed or msg[3]
        scale = time_scale(plan, probed, arrivals)
        if scale != 1.0:
            arrivals = [(t * scale, m) for t, m in arrivals]
            log(f"testbed: arrival times x{scale:.2f}, for this machine's request time against the plan's "
                f"reference of {plan['reference_request_s'] * 1e3:.1f} ms")
        # Half the calibration before the measured replay and half after: the machine's
        # speed drifts (a shared host: +-10% over minutes here), and a drift in between
        # then biases neither side.
        cals, poisson = [], []
        # Each half's Poisson part spans a share of the measured replay at least: the machine's speed
        # wanders over seconds, and a few seconds of it would set the level of a much longer replay.
        seconds = CALIBRATION_SHARE * (arrivals[-1][0] if arrivals else 0.0)
        for half in range(2):
            poisson.append(len(calibration_arrivals(plan, probed, calibration_requests // 2, seed + 1 + half,
                                                    burst=False, groups=False, seconds=seconds)))
            # The burst comes last: its seconds above capacity slow this machine for a while after.
            cal = calibration_arrivals(plan, probed, calibration_requests // 2, seed + 1 + half, burst=half == 1,
                                       seconds=seconds)
            log(f"testbed: calibration replay {half + 1} of 2, {len(cal)} requests over "
                f"{cal[-1][0] if cal else 0:.0f} s")
            cals.append(_replay(plan, cal, conns, seed + 1 + half, lambda m: None))
            _reset(conns)
            if half == 0:
                neighbours = harness.Neighbours([p.pid for p in procs])
                measured = _replay(plan, arrivals, conns, seed, log)
                noise = {"neighbour_cores": neighbours.cores(), "cpus": os.cpu_count(),
                         "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
                _reset(conns)
        curve = slowdown_curve(plan, cals)
        # with a curve, the levels compare the requests' times alone under it: the measured replay's
        # load (and so its overlaps) differs from the calibrations'
        alone = slowdown_fn(curve["slowdown"]) if curve else None
        noise["level_drift"] = level_drift(cals, poisson, alone)
        noise["level_gap"] = level_gap(measured, cals, poisson, alone)
        probed = _calibrated(plan, probed, cals, curve)
        if curve:
            log("testbed: slowdown with concurrency " + ", ".join(
                f"{k}: {v:.2f}" for k, v in curve["slowdown"].items()))
        for name, p in probed.items():
            log(f"probe: {name} cold start {p['load']['median'] * 1e3:.0f} ms, "
                f"request {p['service']['median'] * 1e3:.1f} ms (medians)")
        return {"probe": {"models": probed, "calibration": cals, "concurrency": curve}, "time_scale": scale,
                "noise": noise, **measured}
    finally:
        for c in conns:
            try:
                c.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _ready(i: int, conn, proc, within_s: float = 600.0):
    """Instance ``i``'s ready message; RuntimeError as soon as its process has died (its traceback
    is on stderr), or after ``within_s``."""
    end = time.monotonic() + within_s
    while not conn.poll(0.5):
        if not proc.is_alive() and not conn.poll(0):
            raise RuntimeError(f"instance {i}'s process exited (code {proc.exitcode}) before it was ready; "
                               "its error is above")
        if time.monotonic() > end:
            raise RuntimeError(f"instance {i} did not start within {within_s:.0f} s")
    return conn.recv()


def time_scale(plan: dict, probed: dict, arrivals: list) -> float:
    """By how much the arrivals' times stretch on this machine: its mean busy time per request over
    the one they were written for, 1 without ``reference_request_s``. The busy time is the request
    time (each model's probed median, weighted by its arrivals), plus, with ``reference_load_s``,
    the cold start's (probed median load) times the share of requests expected to miss
    (``miss_share``). So a case keeps its load (the product of rate and busy time) on a machine
    faster or slower than the one it was set on, even where loads and requests speed up unalike (a
    GPU): its queueing and its tail, not the rate, are what it is meant to check."""
    ref = plan.get("reference_request_s")
    if not ref or not arrivals:
        return 1.0
    median = [probed[m["name"]]["service"]["median"] for m in plan["models"]]
    ref_load = plan.get("reference_load_s")
    miss = miss_share(plan) if ref_load else 0.0
    if miss:
        load = [probed[m["name"]]["load"]["median"] for m in plan["models"]]
        return sum(median[m] + miss * load[m] for _, m in arrivals) / len(arrivals) / (ref + miss * ref_load)
    return sum(median[m] for _, m in arrivals) / len(arrivals) / ref


def fitting(plan: dict) -> int:
    """How many of a plan's models an instance holds at once (all of an sme plan's)."""
    ms = plan["models"]
    return int(plan["memory_budget_gb"] // max(m["memory_gb"] for m in ms)) if plan["mode"] == "mme" else len(ms)


def concurrency(plan: dict) -> int:
    """The most requests an instance of a plan has in service at once."""
    return min(plan["instance_concurrency"], plan["max_concurrency"] * len(plan["models"]))


def miss_share(plan: dict) -> float:
    """The share of requests a plan's instances are expected to serve cold: those of the models
    that do not fit the memory budget at once (models alike in traffic)."""
    return max(0.0, 1.0 - fitting(plan) / len(plan["models"]))


CALIBRATION_BUSY = 0.5      # target busy fraction of the calibration replay,
# and where an instance serves several requests at once (``concurrency``): its Poisson part then measures
# the slowdown with concurrency too, under sustained load as a served replay has it. At half of one
# worker's capacity it met 4 in service in short stretches only: on 2026-12-07 the curve it gave at 4
# ranged over 1.67-2.42 from run to run (and 1.5-2.9 between a replay's parts), where the measured
# replays' own requests (at 70%) gave 1.90-2.21, and the simulated P99 swung with it.
CALIBRATION_BUSY_SHARED = 0.8
CALIBRATION_MAX_S = 20.0    # and its longest span (for ``n`` requests),
CALIBRATION_SHARE = 0.125   # but each half spans this share of the measured replay at least
RESTS = 30                  # then, with the burst, requests one at a time after rests
RESTS_S = (0.005, 1.0)      # log-uniform over this span,
BURST_LOAD = 1.25           # then a burst at this multiple of capacity,
BURST_S = 3.0               # this long, after a pause of
BURST_PAUSE_S = 1.0
GROUP_ROUNDS = 10           # with concurrency: rounds of groups of 1..k requests sent at once,
GROUP_REST_S = 0.02         # each after a rest this long
SLOWDOWN_MIN_SAMPLES = 5    # a level with fewer requests is left out of the curve


def calibration_arrivals(plan: dict, probed: dict, n: int, seed: int, burst: bool = True,
                         groups: bool = True, seconds: float = 0.0) -> list:
    """A calibration workload: Poisson arrivals spread evenly over the models, at a
    rate that keeps an instance about half busy (requests and the loads of the
    models that do not fit; with concurrency, CALIBRATION_BUSY_SHARED of one request
    at a time), ``n`` requests or CALIBRATION_MAX_S seconds, and on until ``seconds``
    (``run`` asks for CALIBRATION_SHARE of the measured replay's span); then, with
    ``burst``, RESTS requests of the models that fit, each sent a request's time plus a rest
    (log-uniform over RESTS_S) after the one before, whose times show how the speed comes back
    over a rest; and after a pause of BURST_PAUSE_S, BURST_S of Poisson arrivals at BURST_LOAD times
    the capacity, spread over the models that fit, whose times show how the speed changes along a
    busy period of seconds (``fit.fit_warmth`` fits both). Where an instance serves several requests
    at once (``concurrency``), with ``groups``, the Poisson part is followed by GROUP_ROUNDS rounds
    of groups of 1..k requests sent at once (``slowdown_curve``).

    The simulator's service and load times come from this replay, run through the
    same router, pipes and workers as the measured one: a request's time there is
    the worker's whole occupancy (reading the pipe and replying included, about
    0.3 ms here, see ``occupancy``), and a copy loaded there is placed in memory
    as the served ones are."""
    ms = plan["models"]
    svc = sum(p["service"]["mean"] for p in probed.values()) / len(probed)
    load = sum(p["load"]["mean"] for p in probed.values()) / len(probed)
    fits = fitting(plan)
    busy = CALIBRATION_BUSY_SHARED if concurrency(plan) > 1 else CALIBRATION_BUSY
    rate = busy * plan["instances"] / (svc + miss_share(plan) * load)
    rng = random.Random(seed)
    out, t = [], 0.0
    while len(out) < n or t < seconds:
        t += rng.expovariate(rate)
        if t > max(CALIBRATION_MAX_S, seconds) or (len(out) >= n and t > seconds):
            break
        out.append((t, rng.randrange(len(ms))))
    most = concurrency(plan) if groups else 1
    if most > 1:
        # Groups of k requests sent at once, k = 1..most in a shuffled order round after round (so that
        # the machine's drift touches every level alike), each after the one before has had the time
        # to end (served one at a time, at worst) and a rest: their times give the slowdown with
        # concurrency (``slowdown_curve``).
        t += BURST_PAUSE_S
        levels = list(range(1, most + 1))
        prev = 0
        for _ in range(GROUP_ROUNDS):
            rng.shuffle(levels)
            for k in levels:
                t += prev * svc + GROUP_REST_S
                out += [(t, rng.randrange(min(fits, len(ms)))) for _ in range(k)]
                prev = k
        t += prev * svc
    if not burst:
        return out
    lo, hi = math.log(RESTS_S[0]), math.log(RESTS_S[1])
    for _ in range(RESTS):
        t += svc + math.exp(rng.uniform(lo, hi))
        out.append((t, rng.randrange(min(fits, len(ms)))))
    t += BURST_PAUSE_S
    end = t + BURST_S
    burst_rate = BURST_LOAD * plan["instances"] / svc
    while True:
        t += rng.expovariate(burst_rate)
        if t > end:
            break
        out.append((t, rng.randrange(min(fits, len(ms)))))
    return out


def _reset(conns: list) -> None:
    """Between replays: multi-model instances unload everything (and say so)."""
    for c in conns:
        c.send(("reset",))
    for c in conns:
        c.recv()


def occupancy(req: dict, loads: list, instances: int, busy: list | None = None) -> list:
    """Per request of a replay, the time its instance's one worker spent on it: from the later of its
    send and the end of the worker's previous job (a request or a load) to its end, so that reading
    the pipe, choosing the job and replying count, as the worker cannot serve meanwhile. None for a
    request that did not finish. With ``busy`` (a list as long), also how long the worker had been
    serving requests without a break when the request's occupancy began: 0 for one that found it
    idle or followed a load (a load breaks the speed-up of back-to-back requests here, as idle
    time does: the requests right after one run about as slow as after a rest)."""
    out = [None] * len(req["end_s"])
    for inst in range(instances):
        jobs = [(s, e, rid) for rid, (i, s, e) in enumerate(zip(req["instance"], req["start_s"], req["end_s"]))
                if i == inst and e is not None]
        jobs += [(x["start_s"], x["end_s"], None) for x in loads if x["instance"] == inst]
        jobs.sort()
        free = since = float("-inf")
        loaded = False
        for s, e, rid in jobs:
            begin = s if rid is None else max(req["send_s"][rid], free)
            if begin > free or loaded:
                since = begin     # the worker was idle, or loading: a busy period begins
            if rid is not None:
                out[rid] = e - begin
                if busy is not None:
                    busy[rid] = begin - since
            loaded = rid is None
            free = e
    return out


def _median_in_service(rec: dict, n: int | None = None, slowdown=None) -> float | None:
    """The median time in service (end - start) of a replay's first ``n`` requests (all: None) that
    finished, or with a ``slowdown`` function their times alone under it (``alone_times``, over every
    job of their instance); None if none did."""
    r = rec["requests"]
    if slowdown is None:
        y = [e - s for s, e in zip(r["start_s"][:n], r["end_s"][:n]) if e is not None]
        return float(np.median(y)) if y else None
    y = times_alone(rec, set(r["instance"]), slowdown)[0][:n]
    y = y[np.isfinite(y)]
    return float(np.median(y)) if y.size else None


def level_drift(recs: list, n: list, slowdown=None) -> float | None:
    """How far the machine's speed moved between the calibration replay before the measured one and
    the one after: the median time in service (``_median_in_service``; with a ``slowdown`` function,
    the time alone under it) of the first ``n[i]`` requests of replay ``i`` (their Poisson part, alike
    in both) in the second over the first, less 1; None without finished requests in both."""
    med = [_median_in_service(rec, k, slowdown) for rec, k in zip(recs, n)]
    if len(med) < 2 or None in med:
        return None
    return med[-1] / med[0] - 1.0


def level_gap(measured: dict, recs: list, n: list, slowdown=None) -> float | None:
    """How far the machine's speed during the measured replay was from its calibration replays':
    the measured requests' median time in service over the mean of the calibrations' (their Poisson
    parts, the first ``n[i]`` requests of replay ``i``, whose rate ramps around the measured one), less
    1; None without finished requests on both sides. Both calibrations can agree (``level_drift``
    near 0) while the minute between them ran slower: on 2026-12-07 two quick runs' measured replays
    took 21% and 26% longer per request than both calibrations around them, and the simulator, whose
    times come from those, came out 20-35% fast on those runs alone.

    Where requests share an instance's cores (a ``slowdown`` function: the calibration's curve), each
    side's time is the time alone under it (``alone_times``): a time in service counts the requests
    beside it, and the measured replay's load is not the calibrations' (more of them there at a higher
    load): that alone would read as a slower machine. (On the four full runs of the shared-device cases of
    2026-12-07 the measured replay ran 8-12% faster than its calibrations' Poisson parts alone, where
    times in service said 3-8%; six quick runs that times in service put 6-11% slower came out at -1% to +4%.)"""
    cal = [_median_in_service(rec, k, slowdown) for rec, k in zip(recs, n)]
    mine = _median_in_service(measured, None, slowdown)
    if mine is None or not cal or None in cal:
        return None
    return mine / float(np.mean(cal)) - 1.0


def _intervals(rec: dict, inst: int) -> tuple:
    """A replay's jobs on instance ``inst``: (start, end, request id or -1 for a load) arrays, the
    finished requests' in service and the loads (a load holds a worker and the cores as a request
    does)."""
    r = rec["requests"]
    rows = [(s, e, rid) for rid, (i, s, e) in enumerate(zip(r["instance"], r["start_s"], r["end_s"]))
            if i == inst and e is not None]
    rows += [(x["start_s"], x["end_s"], -1) for x in rec["loads"] if x["instance"] == inst]
    a = np.array(rows, dtype=float).reshape(-1, 3)
    return a[:, 0], a[:, 1], a[:, 2].astype(int)


def mean_in_service(start, end) -> np.ndarray:
    """Per job of one instance, the mean number of jobs in service (itself included) over its own
    time in service."""
    s, e = np.asarray(start, float), np.asarray(end, float)
    overlap = np.clip(np.minimum(e[:, None], e[None, :]) - np.maximum(s[:, None], s[None, :]), 0.0, None)
    span = e - s
    return np.where(span > 0, overlap.sum(axis=1) / np.where(span > 0, span, 1.0), 1.0)


def slowdown_fn(points: dict):
    """``slowdown(k)`` of a curve {k: factor} as the simulator reads one (sim/hosting/device.py's
    ``slowdown_table``): linear between the points, proportional to k beyond the last."""
    pts = {int(k): float(v) for k, v in points.items()}
    pts.setdefault(1, 1.0)
    ks = np.array(sorted(pts), dtype=float)
    fs = np.array([pts[int(k)] for k in ks])

    def f(k):
        k = np.asarray(k, dtype=float)
        return np.where(k >= ks[-1], fs[-1] * k / ks[-1], np.interp(k, ks, fs))
    return f


def alone_times(start, end, slowdown) -> np.ndarray:
    """Per job of one instance, its time in service had it had the cores to itself: with ``k(t)``
    jobs in service, a job progresses at ``1 / slowdown(k(t))`` of its speed alone (the simulator's
    processor sharing), so its work alone is the integral of dt / slowdown(k(t)) over its time in
    service."""
    s, e = np.asarray(start, float), np.asarray(end, float)
    if s.size == 0:
        return s
    t = np.unique(np.concatenate([s, e]))
    step = np.zeros(t.size)
    np.add.at(step, np.searchsorted(t, s), 1.0)
    np.add.at(step, np.searchsorted(t, e), -1.0)
    k = np.cumsum(step)[:-1]                       # jobs in service on [t_j, t_j+1)
    rate = np.where(k > 0, 1.0 / slowdown(np.maximum(k, 1.0)), 0.0)
    work = np.concatenate([[0.0], np.cumsum(np.diff(t) * rate)])
    return work[np.searchsorted(t, e)] - work[np.searchsorted(t, s)]


def times_alone(rec: dict, instances, slowdown) -> tuple[np.ndarray, list]:
    """A replay's jobs on ``instances``, each one's time alone under ``slowdown`` (``alone_times``): per
    request (nan for one that did not finish) and, per load, (its model, its time alone) in the
    replay's order."""
    r = rec["requests"]
    out = np.full(len(r["end_s"]), np.nan)
    loads: list = []
    for inst in instances:
        s, e, rid = _intervals(rec, inst)
        a = alone_times(s, e, slowdown)
        out[rid[rid >= 0]] = a[rid >= 0]
        # (a load's jobs come last in _intervals, in the replay's order)
        loads += zip([x["model"] for x in rec["loads"] if x["instance"] == inst], a[rid < 0].tolist())
    return out, loads


def slowdown_curve(plan: dict, recs: list, min_samples: int = SLOWDOWN_MIN_SAMPLES) -> dict | None:
    """The slowdown with concurrency, from calibration replays: each finished request is labelled
    with the mean number of jobs in service on its instance over its time in service (rounded),
    its time in service is divided by the median time of its model's requests that ran alone (label
    1) in the same replay (so that the machine's drift between replays cancels), and
    ``slowdown[k]`` is the median of those ratios at label k over their median at label 1, for k =
    1..``concurrency(plan)``; a level with fewer than ``min_samples`` requests is left out. Each
    replay's own curve is kept (``replays``), and ``spread`` is, per level, (max - min) / mean over
    them: the measurement's repeatability. None for a plan without concurrency, or too few
    requests alone."""
    most = concurrency(plan)
    if most <= 1:
        return None
    per_replay = []
    for rec in recs:
        labels, ratios = [], []
        for inst in range(plan["instances"]):
            s, e, rid = _intervals(rec, inst)
            if not rid.size:
                continue
            k = np.rint(mean_in_service(s, e)).astype(int)
            mine = rid >= 0
            span, k, model = (e - s)[mine], k[mine], np.array(rec["requests"]["model"], dtype=int)[rid[mine]]
            for m in np.unique(model):
                alone = (model == m) & (k == 1)
                if alone.sum() < 2:
                    continue
                base = np.median(span[alone])
                labels.append(k[model == m])
                ratios.append(span[model == m] / base)
        per_replay.append((np.concatenate(labels) if labels else np.zeros(0, int),
                           np.concatenate(ratios) if ratios else np.zeros(0)))

    def curve(labels, ratios):
        if (labels == 1).sum() < min_samples:
            return None
        one = np.median(ratios[labels == 1])
        c = {"1": 1.0}
        n = {"1": int((labels == 1).sum())}
        for k in range(2, most + 1):
            if (labels == k).sum() >= min_samples:
                c[str(k)] = float(np.median(ratios[labels == k]) / one)
                n[str(k)] = int((labels == k).sum())
        return {"slowdown": c, "n": n}

    pooled = curve(np.concatenate([p[0] for p in per_replay]), np.concatenate([p[1] for p in per_replay]))
    if pooled is None:
        return None
    each = [curve(*p) for p in per_replay]
    spread = {}
    for k in pooled["slowdown"]:
        v = [c["slowdown"][k] for c in each if c and k in c["slowdown"]]
        if len(v) > 1:
            spread[k] = float((max(v) - min(v)) / np.mean(v))
    return {"levels": most, **pooled, "replays": each, "spread": spread}


def _calibrated(plan: dict, probed: dict, recs: list, curve: dict | None = None) -> dict:
    """Each model's service times and load times from the calibration replays; the in-process
    probe's loads are added (its own samples kept under ``probe_*``). A service time is the
    worker's occupancy (``occupancy``) where an instance has one worker, else end - start, and with
    a slowdown ``curve`` (``slowdown_curve``) the time alone that end - start amounts to under it
    (``alone_times``): the simulator slows its draws down by the requests in service itself. With a
    curve, ``load_alone_s`` holds the loads' times alone the same way (a load's init on an
    instance's CPUs shares them with its requests in the simulator too).

    ``service_replay``: which replay each sample came from. With one worker, ``fit.fit_warmth``
    fits how the speed changes along a worker's busy periods and comes back over its rests
    (``sustained``), and ``service_warmth`` holds each sample's state under that fit
    (``service_busy_s``: its time into its busy period). The fit gives each replay a level of its
    own: the machine's speed drifts between replays minutes apart (+-10% here), and
    with one level the burst's fast or slow minute would read as a change with busy time."""
    one_worker = plan["instance_concurrency"] == 1
    slowdown = slowdown_fn(curve["slowdown"]) if curve else None
    seqs = []   # per replay, its finished requests' columns
    alone_loads = []   # with a curve: (model, time alone) of each replay's loads
    for rec in recs:
        r = rec["requests"]
        busy = [None] * len(r["end_s"])
        if one_worker:
            occ = occupancy(r, rec["loads"], plan["instances"], busy)
        else:
            occ = [None if e is None else e - s for s, e in zip(r["start_s"], r["end_s"])]
            if slowdown is not None:
                # each request's and load's time alone, under the measured slowdown with concurrency
                alone, loads = times_alone(rec, range(plan["instances"]), slowdown)
                occ = [None if a != a else float(a) for a in alone.tolist()]
                alone_loads += loads
        done = [j for j, o in enumerate(occ) if o is not None]
        seq = {k: np.array([r[c][j] for j in done], dtype=float) for k, c in
               (("end", "end_s"), ("instance", "instance"), ("model", "model"))}
        seq.update(occ=np.array([occ[j] for j in done]), busy=[busy[j] for j in done])
        seq["begin"] = seq["end"] - seq["occ"]
        seqs.append(seq)
    out = {}
    for k, m in enumerate(plan["models"]):
        p = dict(probed[m["name"]])
        p["probe_service_s"], p["probe_load_s"] = p["service_s"], p["load_s"]
        mine = [seq["model"] == k for seq in seqs]
        p["service_s"] = [float(o) for seq, my in zip(seqs, mine) for o in seq["occ"][my]]
        p["service_replay"] = [i for i, my in enumerate(mine) for y in my if y]
        if not p["service_s"]:
            p["service_s"] = p["probe_service_s"]
        elif one_worker:
            p["service_busy_s"] = [b for seq, my in zip(seqs, mine) for b, y in zip(seq["busy"], my) if y]
            n = plan["instances"]
            p["sustained"] = sus = fit.fit_warmth(
                np.concatenate([seq["begin"] for seq in seqs]), np.concatenate([seq["end"] for seq in seqs]),
                np.concatenate([seq["instance"] + i * n for i, seq in enumerate(seqs)]),
                np.concatenate([seq["occ"] for seq in seqs]), np.concatenate(mine),
                np.concatenate([np.full(len(seq["occ"]), i) for i, seq in enumerate(seqs)]))
            if sus:
                p["service_warmth"] = [float(w) for seq, my in zip(seqs, mine) for w in fit.warmth(
                    seq["begin"], seq["end"], seq["instance"], sus["time_constant_s"],
                    sus["rest_time_constant_s"])[my]]
        p["load_s"] = [x["end_s"] - x["start_s"] for rec in recs for x in rec["loads"] if x["model"] == k]
        p["load_s"] += p["probe_load_s"]
        if slowdown is not None and not one_worker:   # (the probe loads alone)
            p["load_alone_s"] = [a for mk, a in alone_loads if mk == k] + p["probe_load_s"]
        p["service"], p["load"] = harness.robust_summary(p["service_s"]), harness.robust_summary(p["load_s"])
        out[m["name"]] = p
    return out


def _replay(plan: dict, arrivals: list, conns: list, seed: int, log) -> dict:
    router = Router(plan, seed)
    n = len(arrivals)
    req = {k: [None] * n for k in ("model", "arrival_s", "send_s", "instance", "start_s", "end_s", "cold",
                                   "load_ms")}
    loads, unloads = [], []
    left = [n]
    finished = threading.Event()
    if n == 0:
        finished.set()

    def receive():
        open_ = list(conns)
        while open_ and not finished.is_set():
            for c in wait(open_, timeout=0.5):
                try:
                    msg = c.recv()
                except EOFError:
                    open_.remove(c)
                    continue
                kind = msg[0]
                if kind == "done":
                    _, rid, inst, _arrived, start, end, cold, load_ms = msg
                    req["start_s"][rid], req["end_s"][rid] = start, end
                    req["cold"][rid], req["load_ms"][rid] = cold, load_ms
                    router.done(inst, req["model"][rid])
                    left[0] -= 1
                    if left[0] == 0:
                        finished.set()
                elif kind == "load":
                    _, inst, m, queued, start, end = msg
                    loads.append({"instance": inst, "model": m, "queued_s": queued, "start_s": start,
                                  "end_s": end})
                elif kind == "unload":
                    _, inst, m, t = msg
                    router.unloaded(inst, m)
                    unloads.append({"instance": inst, "model": m, "t_s": t})

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    t0 = time.monotonic() + STARTUP_S
    for c in conns:
        c.send(("start", t0))
    horizon = arrivals[-1][0] if arrivals else 0.0
    next_note = 10.0
    for rid, (at, m) in enumerate(arrivals):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        inst = router.route(m)
        req["model"][rid], req["arrival_s"][rid], req["instance"][rid] = m, at, inst
        sent = req["send_s"][rid] = time.monotonic() - t0
        conns[inst].send(("req", rid, m, sent))
        if at >= next_note:
            log(f"testbed: {at:.0f} of {horizon:.0f} s replayed, {rid + 1:,} of {n:,} requests")
            next_note += 10.0
    finished.wait(timeout=plan["timeout_s"] + 60.0)
    finished.set()
    rx.join(timeout=5)
    lag = [s - a for s, a in zip(req["send_s"], req["arrival_s"]) if s is not None]
    return {"requests": req, "loads": loads, "unloads": unloads,
            "unfinished": left[0], "send_lag_ms": {"max": 1e3 * max(lag, default=0.0),
                                                    "mean": 1e3 * sum(lag) / max(len(lag), 1)}}
