"""Calibrate the testbed's plan on this machine: per model, the time of a
whole cold start (file -> module -> warm-up pass) and of one request, with the
same code, threads and device as the serving processes.

Requests are timed as a server meets them, not back to back: the models take
turns in a random order and a random pause (exponential, as long as a request
on average, spent spinning as an idle polling worker does) comes between two,
so that a request does not find the weights it needs still in the processor's
caches from the one before."""
from __future__ import annotations

import random
import sys
import time

import torch

from .. import harness
from . import server


def to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def probe(plan: dict, files: list, device: str = "cpu", loads: int = 3, requests: int = 40,
          log=to_stderr, seed: int = 0) -> dict:
    """Samples (seconds) of each model's load and service times, and their robust summaries;
    and each model's request function on its last loaded copy."""
    torch.set_num_threads(plan["threads"])
    torch.set_grad_enabled(False)
    rng = random.Random(seed)
    ms = plan["models"]
    load_s = [[] for _ in ms]
    runs = [None] * len(ms)
    for _ in range(loads):
        for k, (m, f) in enumerate(zip(ms, files)):
            runs[k] = None
            t = time.perf_counter()
            _, runs[k] = server.load_and_warm(f, m, k, device)
            load_s[k].append(time.perf_counter() - t)
    svc = [[] for _ in ms]
    order = [k for k in range(len(ms)) for _ in range(requests)]
    rng.shuffle(order)
    pause = 0.0
    for k in order:
        # a pause as the polling worker idles (server._serve_polling): spinning
        end = time.perf_counter() + (rng.expovariate(1.0 / pause) if pause > 0 else 0.0)
        while time.perf_counter() < end:
            pass
        t = time.perf_counter()
        runs[k]()
        svc[k].append(time.perf_counter() - t)
        pause = svc[k][-1]
    out = {}
    for k, m in enumerate(ms):
        out[m["name"]] = {"load_s": load_s[k], "service_s": svc[k], "file_gb": files[k]["file_gb"],
                          "param_gb": files[k]["param_gb"], "load": harness.robust_summary(load_s[k]),
                          "service": harness.robust_summary(svc[k])}
        log(f"probe: {m['name']} load {out[m['name']]['load']['median'] * 1e3:.0f} ms, "
            f"request {out[m['name']]['service']['median'] * 1e3:.1f} ms")
    return out, runs
