"""Warm inference latency per family and size: vs sequence length, vs batch,
repeated (cv), and under concurrency (k threads, one shared model).

Timing: CUDA events on GPU (harness timer "cuda"), perf_counter on CPU.
Sustained load: after a rest, requests at the reference shape back to back
for a span of seconds, each with how long the run had been going when it
began (the busy time), then requests one at a time after rests of a few ms
to seconds: how the speed changes under sustained load (clocks that boost or
throttle, caches that warm) and comes back over a rest, fitted by
fit.fit_warmth.
Concurrency: k threads start together (a barrier), each runs `per_thread`
requests at the reference shape against the same module; per-request latency
is wall time (on cuda each thread has its own stream and synchronises it).

Request shapes:
  encoder  one forward pass over `seq` tokens (batch b): tokens = b * seq.
  decoder  prefill of `in` tokens filling a KV cache, then `out - 1`
           incremental decode steps of one token against the cache (greedy),
           i.e. `out` output tokens in all (out = 1: prefill only).
"""
from __future__ import annotations

import gc
import math
import random
import threading
import time

import numpy as np
import torch

from . import fit as fitmod
from . import harness, models

QUICK = {
    "encoder": {"seqs": [16, 64, 128, 256], "batches": [1, 2, 4, 8], "ref": {"seq": 64}},
    "decoder": {"ins": [16, 64, 192], "outs": [1, 8, 24], "batches": [1, 2, 4, 8],
                "ref": {"in": 64, "out": 8}},
    "cv_reps": 15, "concurrency": [1, 2], "per_thread": 6,
    "sustained": {"runs": 2, "rest_s": 0.5, "span_s": 1.5, "rests": 12, "rests_s": [0.005, 0.5]},
}
FULL = {
    "encoder": {"seqs": [16, 32, 64, 128, 256, 512], "batches": [1, 2, 4, 8, 16, 32],
                "ref": {"seq": 128}},
    "decoder": {"ins": [16, 64, 256, 512], "outs": [1, 16, 64], "batches": [1, 2, 4, 8, 16],
                "ref": {"in": 128, "out": 16}},
    "cv_reps": 40, "concurrency": [1, 2, 4], "per_thread": 20,
    "sustained": {"runs": 2, "rest_s": 3.0, "span_s": 15.0, "rests": 20, "rests_s": [0.005, 2.0]},
}


def _request_fn(model, family: str, device: str, batch: int, a: int, b: int = 0, seed=0):
    """A closure that runs one request. encoder: seq=a. decoder: in=a, out=b."""
    ids = models.random_ids(batch, a, device=device, seed=seed)
    if family == "encoder":
        return lambda: model(ids)
    return lambda: model.generate(ids, b)


def measure_model(family: str, label: str, device: str, dtype, plan: dict,
                  policy: harness.Policy, log, concurrency_levels=None) -> dict:
    shape = models.shape_for(family, models.parse_size(label))
    torch.manual_seed(0)
    timer = "cuda" if device.startswith("cuda") else "wall"
    model = models.build(shape, device=device, dtype=dtype)
    fam = plan[family]
    out = {"shape": shape, "dtype": str(dtype).replace("torch.", ""), "latency": [],
           "batch": [], "reference": fam["ref"]}
    try:
        with torch.inference_mode():
            # latency vs sequence length (batch 1)
            if family == "encoder":
                grid = [(s, 0) for s in fam["seqs"]]
            else:
                grid = [(i, o) for i in fam["ins"] for o in fam["outs"]]
            for a, b in grid:
                m = harness.measure(_request_fn(model, family, device, 1, a, b), policy,
                                    timer=timer, device=device)
                d = m.to_dict()
                d.update({"batch": 1, ("seq" if family == "encoder" else "in"): a})
                if family == "decoder":
                    d["out"] = b
                out["latency"].append(d)
                what = f"seq {a}" if family == "encoder" else f"in {a} out {b}"
                log(f"inference: {family} {label} {what} ... {d['median'] * 1e3:.2f} ms "
                    f"(n={d['n']})")
            ref = fam["ref"]
            ra, rb = (ref["seq"], 0) if family == "encoder" else (ref["in"], ref["out"])
            for bs in fam["batches"]:
                m = harness.measure(_request_fn(model, family, device, bs, ra, rb), policy,
                                    timer=timer, device=device)
                d = m.to_dict()
                d["batch"] = bs
                out["batch"].append(d)
                log(f"inference: {family} {label} batch {bs} ... {d['median'] * 1e3:.2f} ms")
            # cv: many repeats at the reference shape
            cvp = policy.scaled(min_reps=plan["cv_reps"], max_reps=plan["cv_reps"],
                                rel_mad_target=0.0, settle_tol=-1.0)
            m = harness.measure(_request_fn(model, family, device, 1, ra, rb, seed=1), cvp,
                                timer=timer, device=device)
            d = m.to_dict()
            d["cv"] = harness.cv(m.clean)
            d["cv_raw"] = harness.cv(m.samples, drop_outliers=False)
            out["repeat"] = d
            log(f"inference: {family} {label} repeat x{d['n']} ... cv {d['cv'] or 0:.3f}")
        if plan.get("sustained"):
            out["sustained"] = sustained(model, family, device, ra, rb, **plan["sustained"])
            log(f"inference: {family} {label} sustained load ... "
                + ", ".join(f"{r['n']} requests in {r['span_s']:.1f} s" for r in out["sustained"]["runs"]))
        out["concurrency"] = {}
        for k in (concurrency_levels or plan["concurrency"]):
            r = concurrent(model, family, device, k, plan["per_thread"], ra, rb)
            out["concurrency"][str(k)] = r
            log(f"inference: {family} {label} concurrency {k} ... "
                f"{r['median_latency_s'] * 1e3:.2f} ms/request, {r['throughput_rps']:.1f} req/s")
    finally:
        del model
        gc.collect()
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def concurrent(model, family: str, device: str, k: int, per_thread: int, a: int, b: int,
               warmup: int = 1, retries: int = 3) -> dict:
    """Run the level; if other processes used the CPU meanwhile, back off and
    retry (up to `retries` times, within the run-wide waiting budget)."""
    attempts = []
    for attempt in range(retries + 1):
        if harness.CONTENTION.recently_contended():
            harness.CONTENTION.wait_quiet(10.0)
        snap0 = harness.METER.snap()
        r = _concurrent_once(model, family, device, k, per_thread, a, b, warmup)
        snap1 = harness.METER.snap()
        foreign, wall = harness.METER.foreign(snap0, snap1)
        r["foreign_cpu_s"] = foreign
        r["contended"] = harness.METER.contended(snap0, snap1)
        if r["contended"]:
            harness.CONTENTION.last_contended = snap1[2]
        attempts.append(r)
        if not r["contended"] or not harness.CONTENTION.backoff(attempt):
            break
    best = min(attempts, key=lambda x: (x["contended"], x["median_latency_s"]))
    best["attempts"] = len(attempts)
    return best


def _concurrent_once(model, family: str, device: str, k: int, per_thread: int, a: int, b: int,
                     warmup: int = 1) -> dict:
    barrier = threading.Barrier(k)
    threads_each = torch.get_num_threads()   # (OpenMP's count is per thread: each worker sets it)
    lat = [[] for _ in range(k)]
    spans = [[None, None] for _ in range(k)]
    errors = []
    on_cuda = device.startswith("cuda")

    def worker(i):
        try:
            torch.set_num_threads(threads_each)
            stream = torch.cuda.Stream() if on_cuda else None
            ctx = torch.cuda.stream(stream) if on_cuda else _null()
            with ctx, torch.inference_mode():
                fn = _request_fn(model, family, device, 1, a, b, seed=100 + i)
                for _ in range(warmup):
                    fn()
                if on_cuda:
                    stream.synchronize()
                barrier.wait()
                spans[i][0] = time.perf_counter()
                for _ in range(per_thread):
                    t0 = time.perf_counter()
                    fn()
                    if on_cuda:
                        stream.synchronize()
                    lat[i].append(time.perf_counter() - t0)
                spans[i][1] = time.perf_counter()
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(k)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    # throughput over the measured phase: barrier release to the last completion
    span = max(e for _, e in spans) - min(b for b, _ in spans)
    flat = [v for x in lat for v in x]
    s = harness.robust_summary(flat)
    return {"k": k, "per_thread": per_thread, "samples": lat, "median_latency_s": s["median"],
            "mad_s": s["mad"], "outliers": s["outliers"], "span_s": span, "wall_s": wall,
            "throughput_rps": len(flat) / span if span > 0 else None}


SUSTAINED_KEEP = 1500  # samples kept per run (evenly thinned): fast requests on a GPU make thousands


def sustained(model, family: str, device: str, a: int, b: int, *, runs: int, rest_s: float,
              span_s: float, rests: int = 0, rests_s=(0.005, 1.0)) -> dict:
    """``runs`` times: rest ``rest_s``, then requests back to back for ``span_s`` seconds, then
    ``rests`` requests each after a rest drawn log-uniform over ``rests_s`` (seeded). Each
    back-to-back sample is (busy_s: how long the run had been going when the request began,
    time_s); each rest sample is (after_s: the rest before it, measured, after_time_s). A run during
    which other processes used the CPU is flagged ``contended``."""
    on_cuda = device.startswith("cuda")
    lo, hi = math.log(rests_s[0]), math.log(rests_s[1])
    rng = random.Random(3)
    out = []
    with torch.inference_mode():
        fn = _request_fn(model, family, device, 1, a, b, seed=2)

        def served() -> float:
            """One request, run to completion; when it ended."""
            fn()
            if on_cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        for _ in range(runs):
            if on_cuda:
                torch.cuda.synchronize()
            time.sleep(rest_s)
            busy, times = [], []
            snap0 = harness.METER.snap()
            t0 = time.perf_counter()
            now = t0
            while now - t0 < span_s:
                end = served()
                busy.append(now - t0)
                times.append(end - now)
                now = end
            span = now - t0
            after, after_times = [], []
            for _ in range(rests):
                time.sleep(math.exp(rng.uniform(lo, hi)))
                begin = time.perf_counter()
                end = served()
                after.append(begin - now)
                after_times.append(end - begin)
                now = end
            snap1 = harness.METER.snap()
            step = max(1, -(-len(times) // SUSTAINED_KEEP))
            out.append({"n": len(times), "span_s": span, "contended": harness.METER.contended(snap0, snap1),
                        "busy_s": busy[::step], "time_s": times[::step],
                        "after_s": after, "after_time_s": after_times})
    return {"rest_s": rest_s, "runs": out}


def sequences(runs: list) -> tuple:
    """The sustained-load runs as fit.fit_warmth's request sequences (begin, end, server, time),
    one server per run: the back-to-back samples (thinned) each run until the next one kept
    begins, as the requests between them ran back to back; the rest samples follow the run's
    span."""
    begin, end, server, times = [], [], [], []
    for k, r in enumerate(runs):
        bs = list(r["busy_s"])
        begin += bs
        end += bs[1:] + [r["span_s"]]
        times += list(r["time_s"])
        now = r["span_s"]
        for g, t in zip(r.get("after_s") or [], r.get("after_time_s") or []):
            begin.append(now + g)
            end.append(now + g + t)
            times.append(t)
            now += g + t
        server += [k] * (len(begin) - len(server))
    return np.array(begin), np.array(end), np.array(server), np.array(times)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def fit_model(family: str, label: str, s: dict) -> dict:
    """fits.inference.<family>.<label> from the raw samples of measure_model."""
    X, y = [], []
    for d in s["latency"]:
        for v in harness.clean_samples(d):
            if family == "encoder":
                X.append([d["batch"] * d["seq"]])
            else:
                X.append([d["batch"] * d["in"], d["batch"] * d["out"]])
            y.append(v * 1e3)
    names = ["per_token_ms"] if family == "encoder" else ["per_input_token_ms",
                                                          "per_output_token_ms"]
    f = fitmod.fit_service(np.array(X), np.array(y), names)
    conc = s.get("concurrency", {})
    base = conc.get("1", {}).get("median_latency_s")
    slowdown = {}
    if base:
        slowdown = {k: v["median_latency_s"] / base for k, v in
                    sorted(conc.items(), key=lambda kv: int(kv[0]))}
        slowdown["1"] = 1.0
    out = {"params": int(s["shape"]["params"]), "base_ms": f["base_ms"]}
    for n in names:
        out[n] = f[n]
    out.update({
        # never null (the simulator draws with it): inliers, else all samples, else 0
        "cv": next((c for c in (s.get("repeat", {}).get("cv"), s.get("repeat", {}).get("cv_raw"))
                    if c is not None), 0.0),
        "r2": f["r2"],
        "slowdown": slowdown,
        "batch": {str(d["batch"]): d["median"] * 1e3 for d in s["batch"]},
    })
    sus = _fit_sustained(s)
    out["sustained"] = None if sus is None else {
        k: sus[k] for k in ("factor", "time_constant_s", "rest_time_constant_s", "rest_ratio") if k in sus}
    diag = {"r2_samples": f["r2_samples"], "n": f["n"], "groups": f["groups"],
            "rel_resid_mad": f["rel_resid_mad"],
            "cv_raw": s.get("repeat", {}).get("cv_raw"),
            "throughput_rps": {k: v["throughput_rps"] for k, v in conc.items()},
            "reference": s.get("reference"),
            "sustained": None if sus is None else {k: sus[k] for k in ("base_s", "n", "rel_resid_mad")}}
    return out, diag


def _fit_sustained(s: dict) -> dict | None:
    """The sustained-load fit over the sustained-load runs (the uncontended ones, if any):
    fit.fit_warmth where the runs have rest samples (factor, time constant and rest time constant),
    else fit.fit_sustained (a profile from before them). ``rest_ratio``: the time at rest over the
    repeated requests' median at the same shape, which the service fit rests on (those run back to
    back too, so on a machine that speeds up under load they are partly at the sustained speed)."""
    runs = (s.get("sustained") or {}).get("runs") or []
    runs = [r for r in runs if not r["contended"]] or runs
    if not runs:
        return None
    if all(r.get("after_s") for r in runs):
        f = fitmod.fit_warmth(*sequences(runs))
    else:
        f = fitmod.fit_sustained([v for r in runs for v in r["busy_s"]], [v for r in runs for v in r["time_s"]])
    if f is None:
        return None
    ref = (s.get("repeat") or {}).get("median")
    return {**f, "rest_ratio": f["base_s"] / ref if ref else 1.0}
