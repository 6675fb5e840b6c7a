"""Step time of a KV-cached decoder stepping a continuous batch, per decoder size.

For each size of the llama-like family (calibration/llama.py) the job times
single steps (``Engine.step``) over a designed grid of batch compositions:

  decode-only   n sequences decoding one token each, their contexts (KV
                tokens already cached) spread about a mean c (from c/2 to
                3c/2), so that K, their total, varies apart from n;
  prefill-only  one or two fresh prompts' chunks, p tokens in all;
  mixed         n decoding sequences and one prompt chunk of p tokens.

Each point is a harness.measure of the step (warm-ups, repeats until the
spread settles, contended samples flagged); the caches are filled once with
zeros (their content does not change the time) and each repeat starts from
the same lengths. The points run in a shuffled order (seeded), so that a
drift of the machine's speed does not read as an effect of the batch.

The fit (``fit.fit_step``, non-negative least squares on the points' median
times, relative residuals):

    step_s = base + per_prefill_token * p + per_decode_seq * n + per_kv_token * K

n: decoding sequences in the step, K: the context (KV) tokens they attend to
(the tokens in their caches when the step starts), p: prefill tokens in the
step. ``continuous_batching.step: {profile: ...}`` reads these coefficients.
"""
from __future__ import annotations

import gc
import random

import numpy as np
import torch

from . import fit as fitmod
from . import harness, llama, models

# Sizes of the llama-like family timed by default: per device kind and mode.
SIZES = {("cpu", True): ["5M", "20M"], ("cpu", False): ["5M", "20M", "50M"],
         ("cuda", True): ["25M", "100M"], ("cuda", False): ["125M", "350M", "1.3B"]}

# The grids: decode (n, mean context c), prefill (chunk tokens of fresh prompts), mixed (n, c, p).
QUICK = {"decode": [(n, c) for n in (1, 2, 4, 8, 16) for c in (32, 256)] + [(4, 768)],
         "prefill": [[16], [64], [128], [256], [64, 64]],
         "mixed": [(4, 128, 64), (8, 256, 128), (16, 64, 32), (2, 512, 256)]}
FULL = {"decode": [(n, c) for n in (1, 2, 4, 8, 16, 32) for c in (32, 128, 512)] + [(4, 1536), (16, 1024)],
        "prefill": [[16], [64], [128], [256], [512], [64, 64], [128, 128, 128]],
        "mixed": [(4, 128, 64), (8, 256, 128), (16, 64, 32), (2, 512, 256), (32, 128, 256), (8, 1024, 64)]}
CUDA_QUICK = {"decode": [(n, c) for n in (1, 4, 16, 64) for c in (64, 512)] + [(8, 2048)],
              "prefill": [[64], [256], [1024], [2048], [512, 512]],
              "mixed": [(8, 256, 256), (32, 512, 512), (64, 128, 128), (4, 1024, 1024)]}
CUDA_FULL = {"decode": [(n, c) for n in (1, 2, 4, 8, 16, 32, 64, 128) for c in (64, 512, 2048)],
             "prefill": [[64], [256], [512], [1024], [2048], [4096], [512, 512], [1024, 1024]],
             "mixed": [(8, 256, 256), (32, 512, 512), (64, 128, 128), (4, 1024, 1024), (128, 512, 512),
                       (16, 2048, 2048)]}


def grid_for(device: str, quick: bool) -> dict:
    if device.startswith("cuda"):
        return CUDA_QUICK if quick else CUDA_FULL
    return QUICK if quick else FULL


def contexts(n: int, c: int) -> list:
    """n contexts spread evenly from c/2 to 3c/2 (c alone for n = 1): mean c, total n * c."""
    if n == 1:
        return [c]
    return [max(1, int(round(c * (0.5 + i / (n - 1))))) for i in range(n)]


def points(grid: dict) -> list:
    """The grid as batch compositions: {"kind", "contexts" (decoding sequences'), "chunks" (prompt
    chunk tokens, fresh prompts), "n", "K", "p"}."""
    out = []
    for n, c in grid["decode"]:
        ctx = contexts(n, c)
        out.append({"kind": "decode", "contexts": ctx, "chunks": []})
    for chunks in grid["prefill"]:
        out.append({"kind": "prefill", "contexts": [], "chunks": list(chunks)})
    for n, c, p in grid["mixed"]:
        out.append({"kind": "mixed", "contexts": contexts(n, c), "chunks": [p]})
    for pt in out:
        pt.update(n=len(pt["contexts"]), K=int(sum(pt["contexts"])), p=int(sum(pt["chunks"])))
    return out


def step_fn(engine: llama.Engine, point: dict, seed: int = 0):
    """(setup, fn) timing one step of ``point``: setup puts every sequence back at its length."""
    seqs, lengths, work = [], [], []
    for k, c in enumerate(point["contexts"]):
        s = engine.new_sequence(c, 2, seed=seed + k)
        s.length = c                      # a decoding sequence: its prompt is in its cache
        s.last = 1
        seqs.append(s)
        lengths.append(c)
        work.append(llama.Work(s, 1, True))
    for k, p in enumerate(point["chunks"]):
        s = engine.new_sequence(p, 1, seed=seed + 1000 + k)
        seqs.append(s)
        lengths.append(0)
        work.append(llama.Work(s, p, True))

    def setup():
        for s, n in zip(seqs, lengths):
            s.length = n
        return None

    return setup, (lambda _: engine.step(work))


def measure_size(label: str, device: str, dtype, grid: dict, policy: harness.Policy, log, seed: int = 0) -> dict:
    """The raw samples of one decoder size over ``grid``: {"shape", "dtype", "dtype_bytes",
    "points": [{kind, contexts, chunks, n, K, p, ...harness summary and samples}]}."""
    shape = llama.shape_for(models.parse_size(label))
    model = llama.build(shape, device=device, dtype=dtype, seed=seed)
    engine = llama.Engine(model)
    timer = "cuda" if device.startswith("cuda") else "wall"
    # a step of a small decoder takes a millisecond or two: more warm-ups and repeats than a request
    # (the first repeats of a new batch shape run slower while its buffers are first touched)
    policy = policy.scaled(warmup=max(policy.warmup, 3), min_reps=max(policy.min_reps, 10),
                           max_reps=max(policy.max_reps, 20))
    pts = points(grid)
    order = list(range(len(pts)))
    random.Random(seed).shuffle(order)
    out = {"shape": shape, "dtype": str(dtype).replace("torch.", ""),
           "dtype_bytes": torch.empty((), dtype=dtype).element_size(), "points": [None] * len(pts)}
    log(f"steps: {label}: {llama.describe(shape)}")
    try:
        for i in order:
            pt = pts[i]
            setup, fn = step_fn(engine, pt, seed=i)
            m = harness.measure(fn, policy, timer=timer, device=device, setup=setup)
            d = m.to_dict()
            d.update(pt)
            out["points"][i] = d
            log(f"steps: {label} n={pt['n']} K={pt['K']} p={pt['p']} ... {d['median'] * 1e3:.2f} ms (n={d['n']})")
    finally:
        del engine, model
        gc.collect()
        if device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def fit_size(s: dict) -> tuple:
    """fits.step.<label> and its diagnostics from measure_size's samples: the coefficients fitted
    on each point's median (its uncontended samples')."""
    X, y = [], []
    for d in s["points"]:
        clean = harness.clean_samples(d)
        if not clean:
            continue
        X.append([d["p"], d["n"], d["K"]])
        y.append(float(np.median(clean)))
    f = fitmod.fit_step(X, y)
    shape = s["shape"]
    out = {"params": int(shape["params"]), **{k: int(shape[k]) for k in llama.ARCH_KEYS},
           "dtype_bytes": int(s["dtype_bytes"]),
           "base": f["base"], "per_prefill_token": f["per_prefill_token"], "per_decode_seq": f["per_decode_seq"],
           "per_kv_token": f["per_kv_token"], "r2": f["r2"], "rel_err": f["rel_err"], "n": f["n"]}
    diag = {"rel_err_max": f["rel_err_max"], "points": len(s["points"]),
            "kv_bytes_per_token": llama.kv_bytes_per_token(shape, int(s["dtype_bytes"]))}
    return out, diag


__all__ = ["SIZES", "QUICK", "FULL", "grid_for", "points", "measure_size", "fit_size"]
