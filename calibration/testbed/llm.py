"""The testbed's language-model server: a real continuous-batching loop on a KV-cached decoder.

A plan of mode ``continuous_batching`` (capsim.testbed-plan/1) has one instance serving one
llama-like decoder (calibration/llama.py, random weights, built in the serving process). Its loop
(:class:`Batcher`) runs vLLM-style iterations:

- every running sequence whose prompt is in its cache decodes one token;
- sequences part-way through their prompt prefill their next chunk, in admission order, within
  the step's token budget (``max_num_batched_tokens``, which the decoding tokens count against);
- waiting requests are admitted first come first served while fewer than ``max_num_seqs``
  sequences run and budget is left, each prefilling a chunk of its prompt (chunked prefill);
- the step runs (:meth:`llama.Engine.step`: every new token through the weights at once,
  attention per sequence against its own cache);
- a sequence whose prompt completes in the step emits its first token at the end of the step; a
  decoding one emits its next; one with all its output tokens retires at the end of the step.

Requests that arrive during a step join at the next step boundary. The KV cache of a sequence is
allocated whole at admission (prompt + output): memory is ample here, so there is no preemption
(the simulator's runs of this plan have room for every sequence too).

The serving process first probes (:func:`probe`): the time of a reference step (the decode of 8
sequences at 64 tokens of context), by which the replay stretches the arrivals' times against the
plan's ``reference_step_s`` (so a case keeps its load on a faster or slower machine), and the
designed step grid of the calibration (calibration/steps.py, quick), fitted as a profile would
be. The parent (:func:`run`) then replays a calibration workload before the measured replay and
one after (Poisson arrivals whose rate ramps from half to 1.5 times the measured replay's mean,
token counts drawn from its own), and fits the step-time coefficients on every step the loop ran
in those two (``fit.fit_step``, robust): the simulator's ``continuous_batching.step``. Every
step of every replay is logged (begin, end, decoding sequences n, their context tokens K, prefill
tokens p, prefilling sequences, idle wait before it).
"""
from __future__ import annotations

import csv
import math
import multiprocessing as mp
import os
import random
import threading
import time
from collections import deque

import numpy as np
import torch

from .. import fit, harness, llama, models
from .. import steps as stepmod

STARTUP_S = 0.5                 # between the start signal and the first arrival
REFERENCE = {"kind": "decode", "contexts": [64] * 8, "chunks": []}   # the reference step's batch
CALIBRATION_S = 20.0            # each calibration replay's span at least (about 3,000 steps at the case's load)
CALIBRATION_SHARE = 0.25        # and at least this share of the measured replay's span (see run)
CALIBRATION_RAMP = (0.5, 1.5)   # its rate, from this multiple of the measured replay's mean to this
STEP_COLUMNS = ("begin_s", "end_s", "n", "K", "p", "prefill_seqs", "waited_s")


class Request:
    __slots__ = ("rid", "sent", "input", "output", "seq", "admitted", "first", "end", "generated")

    def __init__(self, rid: int, sent: float, input_tokens: int, output_tokens: int):
        self.rid, self.sent = rid, sent
        self.input, self.output = max(1, int(input_tokens)), max(1, int(output_tokens))
        self.seq = None
        self.admitted = self.first = self.end = None
        self.generated = 0


class Batcher:
    """The continuous-batching loop's state and one iteration (:meth:`step`); see the module."""

    def __init__(self, engine: llama.Engine, max_num_seqs: int, max_num_batched_tokens: int, clock=None):
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_seqs {max_num_seqs} must be >= 1 and max_num_batched_tokens "
                             f"{max_num_batched_tokens} at least as large (every running sequence decodes a token "
                             "per step)")
        self.engine = engine
        self.max_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.clock = clock or time.monotonic
        self.waiting: deque = deque()
        self.running: list = []
        self.log: dict = {c: [] for c in STEP_COLUMNS}

    def add(self, rid: int, sent: float, input_tokens: int, output_tokens: int) -> None:
        self.waiting.append(Request(rid, sent, input_tokens, output_tokens))

    @property
    def busy(self) -> bool:
        return bool(self.running or self.waiting)

    def step(self, waited_s: float = 0.0) -> list:
        """One iteration; returns the requests that retired in it (with admitted, first and end
        times on ``clock``)."""
        begin = self.clock()
        budget = self.budget
        work, chunks = [], []
        n = K = 0
        for r in self.running:                       # decode: one token each
            if r.seq.length >= r.input:
                work.append(llama.Work(r.seq, 1, True))
                chunks.append((r, 0))
                n += 1
                K += r.seq.length
                budget -= 1
        for r in self.running:                       # prompts part-way through, admission order
            if r.seq.length < r.input and budget > 0:
                t = min(r.input - r.seq.length, budget)
                work.append(llama.Work(r.seq, t, r.seq.length + t == r.input))
                chunks.append((r, t))
                budget -= t
        while self.waiting and len(self.running) < self.max_seqs and budget > 0:
            r = self.waiting.popleft()
            r.seq = self.engine.new_sequence(r.input, r.output, seed=r.rid)
            r.admitted = begin
            self.running.append(r)
            t = min(r.input, budget)
            work.append(llama.Work(r.seq, t, t == r.input))
            chunks.append((r, t))
            budget -= t
        if not work:
            return []
        self.engine.step(work)
        end = self.clock()
        done = []
        p = m = 0
        for r, t in chunks:
            if t:                                    # a prefill chunk
                p += t
                m += 1
                if r.seq.length == r.input:
                    r.first = end
                    r.generated = 1
            else:
                r.generated += 1
            if r.generated >= r.output:
                r.end = end
                done.append(r)
        if done:
            self.running = [r for r in self.running if r.end is None]
        for c, v in zip(STEP_COLUMNS, (begin, end, n, K, p, m, waited_s)):
            self.log[c].append(v)
        return done

    def take_log(self) -> dict:
        out, self.log = self.log, {c: [] for c in STEP_COLUMNS}
        return out


# -- the serving process ------------------------------------------------------------------------------------------
def model_of(plan: dict) -> dict:
    m = plan["models"][0]
    return llama.shape_for(models.parse_size(m["params"]))


def probe(engine: llama.Engine, device: str, log=lambda m: None) -> dict:
    """The reference step's time and the designed step grid's samples and fit, in this process."""
    policy = harness.Policy.quick()
    timer = "cuda" if device.startswith("cuda") else "wall"
    setup, fn = stepmod.step_fn(engine, {**REFERENCE, "n": 8, "K": 512, "p": 0})
    ref = harness.measure(fn, policy.scaled(min_reps=15, max_reps=30), timer=timer, device=device, setup=setup)
    pts = stepmod.points(stepmod.grid_for(device, quick=True))
    samples = []
    for i, pt in enumerate(pts):
        setup, fn = stepmod.step_fn(engine, pt, seed=i)
        d = harness.measure(fn, policy, timer=timer, device=device, setup=setup).to_dict()
        d.update(pt)
        samples.append(d)
    X = [[d["p"], d["n"], d["K"]] for d in samples]
    y = [float(np.median(harness.clean_samples(d))) for d in samples]
    grid_fit = fit.fit_step(X, y)
    out = {"reference_step": ref.to_dict(), "grid": samples, "grid_fit": grid_fit}
    log(f"probe: reference step {out['reference_step']['median'] * 1e3:.2f} ms; grid fit R^2 {grid_fit['r2']:.3f}")
    return out


def serve(plan: dict, device: str, conn) -> None:
    """The serving process: build the model, probe, say ready, then serve replays until told to stop."""
    torch.set_num_threads(plan["threads"])
    torch.set_grad_enabled(False)
    shape = model_of(plan)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    engine = llama.Engine(llama.build(shape, device=device, dtype=dtype, seed=1000))
    probed = probe(engine, device)
    probed["shape"] = shape
    probed["dtype_bytes"] = torch.empty((), dtype=dtype).element_size()
    conn.send(("ready", 0, os.getpid(), probed))
    t0 = 0.0
    batcher = Batcher(engine, plan["max_num_seqs"], plan["max_num_batched_tokens"],
                      clock=lambda: time.monotonic() - t0)
    idle_since = None
    while True:
        while conn.poll():
            try:
                msg = conn.recv()
            except (EOFError, OSError):              # the parent is gone
                return
            kind = msg[0]
            if kind == "req":
                _, rid, sent, n_in, n_out = msg
                batcher.add(rid, sent, n_in, n_out)
            elif kind == "start":
                t0 = msg[1]
            elif kind == "collect":                  # between replays: the step log, and idle
                conn.send(("log", batcher.take_log()))
            elif kind == "stop":
                return
        if batcher.busy:
            now = time.monotonic() - t0
            waited = 0.0 if idle_since is None else max(0.0, now - idle_since)
            idle_since = None
            done = batcher.step(waited)
            if done:
                conn.send(("done", [(r.rid, r.admitted, r.first, r.end, r.generated) for r in done]))
        elif idle_since is None:
            # Idle: spin on the pipe (see server.Server.worker: a worker that slept would pay the
            # wake-up on the next request)
            idle_since = time.monotonic() - t0


# -- the parent: arrivals, replays, calibration ---------------------------------------------------------------------
def read_arrivals(path: str) -> list:
    """(arrival_s, input_tokens, output_tokens) from an arrivals CSV with token columns, sorted."""
    out = []
    with open(path, newline="") as f:
        rd = csv.DictReader(f)
        need = ("arrival_s", "input_tokens", "output_tokens")
        if rd.fieldnames is None or any(c not in rd.fieldnames for c in need):
            raise ValueError(f"{path}: a continuous-batching plan needs an arrivals CSV with columns "
                             f"{', '.join(need)}")
        for k, row in enumerate(rd):
            try:
                t, i, o = float(row["arrival_s"]), int(row["input_tokens"]), int(row["output_tokens"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {k + 2}: expected a time and two whole token counts") from None
            if not (math.isfinite(t) and t >= 0 and i >= 1 and o >= 1):
                raise ValueError(f"{path}: row {k + 2}: expected a time >= 0 and token counts >= 1")
            out.append((t, i, o))
    out.sort()
    return out


def calibration_arrivals(arrivals: list, seconds: float, seed: int) -> list:
    """Poisson arrivals over ``seconds`` whose rate ramps linearly from CALIBRATION_RAMP[0] to [1]
    times the mean rate of ``arrivals``, each with the token counts of a request of ``arrivals``
    drawn at random (seeded): the measured replay's sizes, at loads below and above its own."""
    if not arrivals:
        return []
    span = max(arrivals[-1][0] - arrivals[0][0], 1e-9)
    rate = len(arrivals) / span
    lo, hi = CALIBRATION_RAMP
    rng = random.Random(seed)
    out, t = [], 0.0
    top = hi * rate
    while True:     # thinning: a Poisson process at the top rate, kept at rate(t) / top
        t += rng.expovariate(top)
        if t > seconds:
            break
        if rng.random() <= (lo + (hi - lo) * t / seconds) / hi:
            _, i, o = arrivals[rng.randrange(len(arrivals))]
            out.append((t, i, o))
    return out


def calibration_span(arrivals: list) -> float:
    """Each calibration replay's span: CALIBRATION_S, or CALIBRATION_SHARE of the measured replay's if
    longer. This machine's step time wanders by 5-10% from one 10 s stretch to the next, and two short
    replays would set the level of a much longer one (the full suite's 240 s replay had 2 x 20 s)."""
    return max(CALIBRATION_S, CALIBRATION_SHARE * (arrivals[-1][0] if arrivals else 0.0))


def time_scale(plan: dict, probed: dict) -> float:
    """The arrivals' stretch on this machine: its reference step time over the plan's
    ``reference_step_s`` (1 without it)."""
    ref = plan.get("reference_step_s")
    return float(probed["reference_step"]["median"]) / ref if ref else 1.0


def _replay(plan: dict, arrivals: list, conn, log) -> dict:
    """Send ``arrivals`` open-loop on their times; the requests' records and the loop's step log."""
    n = len(arrivals)
    req = {k: [None] * n for k in ("arrival_s", "send_s", "start_s", "first_token_s", "end_s", "input_tokens",
                                   "output_tokens", "generated")}
    left = [n]
    finished = threading.Event()
    lock = threading.Lock()
    if n == 0:
        finished.set()

    def receive():
        while not finished.is_set():
            if not conn.poll(0.2):
                continue
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg[0] == "done":
                with lock:
                    for rid, admitted, first, end, generated in msg[1]:
                        req["start_s"][rid], req["first_token_s"][rid], req["end_s"][rid] = admitted, first, end
                        req["generated"][rid] = generated
                        left[0] -= 1
                    if left[0] == 0:
                        finished.set()

    rx = threading.Thread(target=receive, daemon=True)
    rx.start()
    t0 = time.monotonic() + STARTUP_S
    conn.send(("start", t0))
    horizon = arrivals[-1][0] if arrivals else 0.0
    next_note = 10.0
    for rid, (at, n_in, n_out) in enumerate(arrivals):
        delay = t0 + at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent = time.monotonic() - t0
        with lock:
            req["arrival_s"][rid], req["send_s"][rid] = at, sent
            req["input_tokens"][rid], req["output_tokens"][rid] = n_in, n_out
        conn.send(("req", rid, sent, n_in, n_out))
        if at >= next_note:
            log(f"testbed: {at:.0f} of {horizon:.0f} s replayed, {rid + 1:,} of {n:,} requests")
            next_note += 10.0
    finished.wait(timeout=plan["timeout_s"] + 60.0)
    finished.set()
    rx.join(timeout=5)
    conn.send(("collect",))
    msg = conn.recv()
    while msg[0] != "log":      # replies of requests that ended after the wait gave up
        msg = conn.recv()
    steps = msg[1]
    lag = [s - a for s, a in zip(req["send_s"], req["arrival_s"]) if s is not None]
    return {"requests": req, "steps": steps, "unfinished": left[0],
            "send_lag_ms": {"max": 1e3 * max(lag, default=0.0), "mean": 1e3 * sum(lag) / max(len(lag), 1)}}


def step_rows(steps: dict) -> tuple:
    """A replay's steps as fit rows: X = [p, n, K], each step's time, begin to the next step's
    begin (the loop's whole iteration: scheduling, the forward pass, replies, reading the pipe)
    less any idle wait before that next step (the last step's own begin to end), and the sequences
    in it (decoding and prefilling)."""
    b = np.asarray(steps["begin_s"], float)
    e = np.asarray(steps["end_s"], float)
    w = np.asarray(steps["waited_s"], float)
    if b.size == 0:
        return np.zeros((0, 3)), np.zeros(0), np.zeros(0)
    # the next step's begin less its idle wait: the moment this step's iteration found nothing
    # more to do, or the next one began
    y = np.r_[b[1:] - w[1:], e[-1]] - b
    X = np.c_[steps["p"], steps["n"], steps["K"]].astype(float)
    return X, y, np.asarray(steps["n"], float) + np.asarray(steps["prefill_seqs"], float)


def fit_steps(recs: list) -> dict:
    """The step-time coefficients (``fit.fit_step``, robust) over the steps of replays ``recs``, each
    step weighted by the sequences in it, scaled so that the steps' weighted time is the measured one
    (``mean_scale``, the factor), with each replay's time over the fit's, weighted alike
    (``levels``) and its change from the first to the last, less 1 (``level_drift``): how far the
    machine's speed moved between them.

    Why weighted: a step's time is felt by every sequence in it, so the latencies are a sum of step
    times each counted once per sequence. The step time is not quite linear in the batch (here the
    time per decoding sequence falls as the batch grows: the weights' rows multiply more efficiently
    the more rows there are), and unweighted, the many steps of one or two sequences set the slope:
    on 2026-12-06 that fit made the 10-16-sequence steps 13% too slow and the simulated P99 of the
    latency and of the TTFT 21% and 28% too high; weighted by sequences, within 7%."""
    rows = [step_rows(r["steps"]) for r in recs]
    X = np.vstack([x for x, _, _ in rows])
    y = np.concatenate([v for _, v, _ in rows])
    w = np.concatenate([s for _, _, s in rows])
    f = fit.fit_step(X, y, robust=True, weights=w)
    # The level: a fit of relative residuals predicts a typical step, below the mean of step times
    # skewed to the right (a loop's slow iterations), and the simulator's steps take their predicted
    # time exactly. Scaled so that the steps' predicted time, weighted alike, is their measured time:
    # the simulated loop does the same work in the same time (on 2026-12-07 the fit's steps came out
    # 2-7% short of the mean, and the simulated P50 and P99 8% short on the mean of 9 runs).
    predicted = float(np.sum(w * _predicted(f, X)))
    scale = float(np.sum(w * y)) / predicted if predicted > 0 else 1.0
    f = {**f, **{k: float(f[k] * scale) for k in fit.STEP_TERMS}, "mean_scale": scale}
    levels = [_level(f, x, v, s) for x, v, s in rows]
    drift = levels[-1] / levels[0] - 1.0 if len(levels) > 1 and levels[0] and levels[-1] else None
    return {**f, "levels": levels, "level_drift": drift}


def step_level(coef: dict, steps: dict) -> float | None:
    """A replay's level under a step fit: its steps' time over the fit's (:func:`_level`); None
    without steps."""
    return _level(coef, *step_rows(steps))


def _level(coef: dict, X: np.ndarray, y: np.ndarray, w: np.ndarray) -> float | None:
    """The steps' measured time over the fit's, each step weighted by its sequences (the time the
    requests feel: see fit_steps); None without steps. A median ratio of step times, unweighted, is
    set by the many steps of one or two sequences: on ten quick runs of 2026-12-07 the
    weighted gap of the measured replay against its calibrations correlated -0.98 with the simulated
    P50's error (about -2.7% per 1% of gap), the median one -0.71."""
    if not len(y):
        return None
    p = float(np.sum(w * _predicted(coef, X)))
    return float(np.sum(w * y)) / p if p > 0 else None


def _predicted(coef: dict, X: np.ndarray) -> np.ndarray:
    """The step times coefficients ``coef`` predict for rows ``X`` (step_rows')."""
    return np.c_[np.ones(len(X)), X] @ np.array([coef[k] for k in fit.STEP_TERMS])


def level_gap(stepfit: dict, steps: dict) -> float | None:
    """How far the machine's speed during the measured replay (its ``steps``) was from its
    calibration replays': its level under the fit over the mean of theirs (``levels``), less 1;
    None without steps on both sides."""
    mine, cal = step_level(stepfit, steps), [v for v in stepfit["levels"] if v]
    return mine / float(np.mean(cal)) - 1.0 if mine and cal else None


def predict_error(coef: dict, steps: dict) -> dict:
    """How well coefficients predict a replay's steps: the median and mean relative error."""
    X, y, _ = step_rows(steps)
    if not len(y):
        return {"median": None, "mean": None, "n": 0}
    rel = (_predicted(coef, X) - y) / y
    return {"median": float(np.median(rel)), "mean_abs": float(np.mean(np.abs(rel))), "n": int(len(y))}


def _ready(conn, proc, within_s: float = 600.0):
    from .replay import _ready as ready
    return ready(0, conn, proc, within_s)


def run(plan: dict, arrivals: list, device: str = "cpu", seed: int = 0, calibration_s: float | None = None,
        log=print) -> dict:
    """Serve ``arrivals`` (read_arrivals') with a continuous-batching ``plan``; the records, with the
    probe and the step-time fit of the calibration replays under ``probe``."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(plan, device, child), daemon=True)
    proc.start()
    try:
        probed = _ready(parent, proc)[3]
        scale = time_scale(plan, probed)
        if scale != 1.0:
            arrivals = [(t * scale, i, o) for t, i, o in arrivals]
            log(f"testbed: arrival times x{scale:.2f}, for this machine's reference step of "
                f"{probed['reference_step']['median'] * 1e3:.2f} ms against the plan's "
                f"{plan['reference_step_s'] * 1e3:.2f} ms")
        span = calibration_s or calibration_span(arrivals)
        cals = []
        for half in range(2):
            cal = calibration_arrivals(arrivals, span, seed + 1 + half)
            log(f"testbed: calibration replay {half + 1} of 2, {len(cal)} requests over {span:.0f} s")
            cals.append(_replay(plan, cal, parent, lambda m: None))
            if half == 0:
                neighbours = harness.Neighbours([proc.pid])
                measured = _replay(plan, arrivals, parent, log)
                noise = {"neighbour_cores": neighbours.cores(), "cpus": os.cpu_count(),
                         "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
        stepfit = fit_steps(cals)
        noise["level_drift"] = stepfit["level_drift"]
        noise["level_gap"] = level_gap(stepfit, measured["steps"])
        stepfit["measured_prediction"] = predict_error(stepfit, measured["steps"])
        probed["step"] = stepfit
        probed["calibration"] = cals
        log(f"testbed: step time fit over {stepfit['n']} calibration steps: base {stepfit['base'] * 1e3:.3f} ms, "
            f"{stepfit['per_prefill_token'] * 1e6:.2f} us/prefill token, {stepfit['per_decode_seq'] * 1e6:.2f} "
            f"us/decode seq, {stepfit['per_kv_token'] * 1e9:.2f} ns/KV token, R^2 {stepfit['r2']:.3f}, "
            f"mean error {stepfit['rel_err']:.1%}")
        r = measured["requests"]
        n = len(r["arrival_s"])
        requests = {**r, "model": [0] * n, "instance": [0] * n, "cold": [False] * n, "load_ms": [0.0] * n}
        return {"probe": probed, "time_scale": scale, "noise": noise, "requests": requests,
                "steps": measured["steps"], "loads": [], "unloads": [], "unfinished": measured["unfinished"],
                "send_lag_ms": measured["send_lag_ms"]}
    finally:
        try:
            parent.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
