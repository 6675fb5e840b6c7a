"""The calibration profile: a versioned JSON file the simulator reads.

# ---------------------------------------------------------------------------
# Format versions (log every change here; the simulator checks "schema").
#
# capsim.profile/1  (this version)
#   {
#     "schema":   "capsim.profile/1",
#     "metadata": {host, date (ISO 8601 UTC), device ("cpu"|"cuda"),
#                  device_name, driver, cuda_version, torch, python,
#                  cpu_model, clocks (cpu_clocks_mhz / gpu_clocks_mhz), ...
#                  null where not readable;
#                  page_cache_eviction: "effective"|"ineffective"|"unavailable"
#                  (could the cold reads really be cold?);
#                  contention: {samples, contended, contended_fraction,
#                  waited_s} -- samples taken while other processes used the
#                  CPU, excluded from medians and fits; note: free text},
#     "config":   the run configuration (sizes, families, quick, ...),
#     "samples":  raw measurements (every repeat kept, with median, MAD, IQR,
#                 outlier indices); layout in samples_layout below,
#     "fits":     the fitted model, layout below (the simulator reads this),
#     "diagnostics": fit details not part of the contract (r2 on raw samples,
#                 residual spread, page-cache checks, notes),
#     "errors":   [{"step", "kind" ("oom"|"error"), "type", "message"}]
#   }
#
#   fits.load.<path> = {"a_s": float, "bandwidth_gbs": float, "r2": float,
#                       "n": int, "hw_limit_gbs": float|null}
#       time_s(size) = a_s + size_gb / bandwidth_gbs   (GB = 1e9 bytes of file)
#       paths: disk_to_host          cold read of the file into host memory
#                                    (page cache evicted before each repeat)
#              safetensors_to_host   safetensors.torch.load of the file's
#                                    bytes into host memory; file in page cache
#                                    (v1 before 2026-12: load_file + faulting
#                                    in every page, nearly size-independent)
#              torch_load            torch.load(weights_only=True)
#              torch_load_mmap       torch.load(mmap=True, weights_only=True)
#                                    + copying the tensors out (v1 before
#                                    2026-12: + faulting in every page)
#              host_to_gpu_pageable  state dict .to("cuda") from pageable memory
#              host_to_gpu_pinned    state dict .to("cuda", non_blocking) from
#                                    pinned memory (pinning not timed)
#              safetensors_to_gpu    load_file(device="cuda") (file in cache)
#              build_module          construct the module (default init) and
#                                    load_state_dict from a host state dict
#       a cold load from disk ~ disk_to_host + one deserialise path (+ host->GPU).
#       hw_limit_gbs: the hardware limit where readable (host->GPU paths: the
#       PCIe link, per direction); null otherwise.
#       Paths that were not measured (cuda-only on cpu) are absent.
#
#   fits.runtime = {"init_s": float, "host_memory_gb": float,
#                   "gpu_memory_gb": float|null}   (or null if it failed)
#       measured in a fresh process: `import torch` + runtime init + first op
#       (cuda: torch.cuda.init(); torch.zeros(1, device="cuda")); host memory
#       is the VmRSS growth over that, GPU memory the process's device memory
#       (nvidia-smi) -- the per-backend cost of a CUDA context.
#
#   fits.inference.<family>.<params label e.g. "50M"> =
#       {"params": int, "base_ms": float,
#        decoder: "per_input_token_ms", "per_output_token_ms"
#        encoder: "per_token_ms",
#        "cv": float, "r2": float,
#        "slowdown": {"1": 1.0, "2": float, "4": float},
#        "batch": {"1": ms, "4": ms, ...},
#        "sustained": {"factor": float, "time_constant_s": float,
#                      "rest_time_constant_s": float (optional),
#                      "rest_ratio": float} | null}   (optional)
#       decoder service time = base_ms + per_input_token_ms * input_tokens
#                                      + per_output_token_ms * output_tokens
#       encoder service time = base_ms + per_token_ms * tokens
#       slowdown[k] = median per-request latency with k concurrent requests
#                     on one shared model / that with 1.
#       batch[b]    = latency (ms) of one call serving b requests at the
#                     reference shape (config.reference).
#       cv          = std/mean of repeated warm requests at the reference
#                     shape (IQR outliers excluded; raw cv in diagnostics).
#       sustained   = how the time changes along a busy period and comes
#                     back over a rest, from requests back to back after a
#                     rest, then one at a time after rests: a server's state
#                     w (1 at rest) decays as exp(-t / time_constant_s) while
#                     it serves and comes back as 1 - (1 - w) * exp(-t /
#                     rest_time_constant_s) while it rests (absent: any rest
#                     brings it back at once); a request takes factor + (1 -
#                     factor) * w times its time at rest, which is rest_ratio
#                     times the fit's (the fit's samples run back to back
#                     too); null when the change is under 3%
#                     (calibration.fit.fit_warmth; fit_sustained for runs
#                     without rest samples).
#                     Added later to capsim.profile/1: rest_time_constant_s,
#                     and the runs' rest samples (after_s, after_time_s).
#
#   fits.step.<params label e.g. "8M"> =          (added to capsim.profile/1
#                                                 in 2026-12; absent before)
#       {"params": int, "layers": int, "hidden": int, "heads": int,
#        "kv_heads": int, "intermediate": int, "vocab": int, "dtype_bytes": int,
#        "base": s, "per_prefill_token": s, "per_decode_seq": s,
#        "per_kv_token": s, "r2": float, "rel_err": float, "n": int}
#       the iteration (step) time of the llama-like decoder of that size
#       (calibration/llama.py: its architecture numbers above) stepping a
#       continuous batch with KV caches (calibration/steps.py):
#       step_s = base + per_prefill_token * p + per_decode_seq * n
#                     + per_kv_token * K
#       n: sequences decoding one token in the step, K: the context (KV)
#       tokens they attend to (in their caches when the step starts), p:
#       prompt (prefill) tokens in the step. Coefficients >= 0 (non-negative
#       least squares on the grid points' median times, relative residuals);
#       r2 on those medians, rel_err the mean |fit - median| / median, n the
#       points fitted. `continuous_batching.step: {profile: ...}` reads them
#       (sim.profile.step_coefficients).
#       samples.step.<label> = {"shape", "dtype", "dtype_bytes", "points":
#       [{"kind": decode|prefill|mixed, "contexts": [decoding sequences'
#       contexts], "chunks": [prompt chunk tokens, fresh prompts], "n", "K",
#       "p", harness summary and samples}]}.
#
#   Units: seconds for load/runtime and step, ms for inference, GB = 1e9 bytes.
# ---------------------------------------------------------------------------
"""
from __future__ import annotations

import copy
import json
import math
import os
import tempfile

SCHEMA = "capsim.profile/1"
LOAD_PATHS = ("disk_to_host", "safetensors_to_host", "torch_load", "torch_load_mmap",
              "host_to_gpu_pageable", "host_to_gpu_pinned", "safetensors_to_gpu",
              "build_module")
LOAD_KEYS = ("a_s", "bandwidth_gbs", "r2", "n", "hw_limit_gbs")
RUNTIME_KEYS = ("init_s", "host_memory_gb", "gpu_memory_gb")
INFERENCE_COMMON = ("params", "base_ms", "cv", "r2", "slowdown", "batch")
INFERENCE_FAMILY_KEYS = {"decoder": ("per_input_token_ms", "per_output_token_ms"),
                         "encoder": ("per_token_ms",)}
REQUIRED_METADATA = ("host", "date", "device", "device_name", "torch", "python")
STEP_ARCH = ("params", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "dtype_bytes")
STEP_TERMS = ("base", "per_prefill_token", "per_decode_seq", "per_kv_token")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_num(errs, where, v, *, nullable=False, integer=False, positive=False):
    if v is None:
        if not nullable:
            errs.append(f"{where}: expected a number, got null")
        return
    if integer and not (isinstance(v, int) and not isinstance(v, bool)):
        errs.append(f"{where}: expected an integer, got {v!r}")
    elif not _is_num(v):
        errs.append(f"{where}: expected a finite number, got {v!r}")
    elif positive and v <= 0:
        errs.append(f"{where}: expected > 0, got {v!r}")


def validate(p, source: str = "profile") -> dict:
    """Check a profile dict; raise ValueError listing every problem."""
    errs = []
    if not isinstance(p, dict):
        raise ValueError(f"{source}: expected a JSON object at the top level")
    if p.get("schema") != SCHEMA:
        raise ValueError(f"{source}: schema: expected {SCHEMA!r}, got {p.get('schema')!r}")
    for key in ("metadata", "samples", "fits"):
        if not isinstance(p.get(key), dict):
            errs.append(f"{key}: required object missing")
    if errs:
        raise ValueError(f"{source}: " + "; ".join(errs))
    md = p["metadata"]
    for key in REQUIRED_METADATA:
        if key not in md:
            errs.append(f"metadata.{key}: required key missing")
    if not isinstance(p.get("errors", []), list):
        errs.append("errors: expected a list")
    fits = p["fits"]
    for key in ("load", "runtime", "inference"):
        if key not in fits:
            errs.append(f"fits.{key}: required key missing")
    load = fits.get("load") or {}
    if not isinstance(load, dict):
        errs.append("fits.load: expected an object")
        load = {}
    for path, f in load.items():
        w = f"fits.load.{path}"
        if path not in LOAD_PATHS:
            errs.append(f"{w}: unknown load path (expected one of {', '.join(LOAD_PATHS)})")
            continue
        if not isinstance(f, dict):
            errs.append(f"{w}: expected an object")
            continue
        for k in LOAD_KEYS:
            if k not in f:
                errs.append(f"{w}.{k}: required key missing")
        _check_num(errs, f"{w}.a_s", f.get("a_s"))
        _check_num(errs, f"{w}.bandwidth_gbs", f.get("bandwidth_gbs"), positive=True)
        _check_num(errs, f"{w}.r2", f.get("r2"))
        _check_num(errs, f"{w}.n", f.get("n"), integer=True, positive=True)
        _check_num(errs, f"{w}.hw_limit_gbs", f.get("hw_limit_gbs"), nullable=True,
                   positive=True)
    rt = fits.get("runtime")
    if rt is not None:
        if not isinstance(rt, dict):
            errs.append("fits.runtime: expected an object or null")
        else:
            for k in RUNTIME_KEYS:
                if k not in rt:
                    errs.append(f"fits.runtime.{k}: required key missing")
            _check_num(errs, "fits.runtime.init_s", rt.get("init_s"), positive=True)
            _check_num(errs, "fits.runtime.host_memory_gb", rt.get("host_memory_gb"))
            _check_num(errs, "fits.runtime.gpu_memory_gb", rt.get("gpu_memory_gb"),
                       nullable=True)
    inf = fits.get("inference") or {}
    if not isinstance(inf, dict):
        errs.append("fits.inference: expected an object")
        inf = {}
    for fam, by_size in inf.items():
        if not isinstance(by_size, dict):
            errs.append(f"fits.inference.{fam}: expected an object keyed by size label")
            continue
        for label, f in by_size.items():
            w = f"fits.inference.{fam}.{label}"
            if not isinstance(f, dict):
                errs.append(f"{w}: expected an object")
                continue
            keys = INFERENCE_COMMON + INFERENCE_FAMILY_KEYS.get(fam, ())
            for k in keys:
                if k not in f:
                    errs.append(f"{w}.{k}: required key missing")
            _check_num(errs, f"{w}.params", f.get("params"), integer=True, positive=True)
            for k in ("base_ms",) + INFERENCE_FAMILY_KEYS.get(fam, ()):
                _check_num(errs, f"{w}.{k}", f.get(k))
            _check_num(errs, f"{w}.cv", f.get("cv"))
            _check_num(errs, f"{w}.r2", f.get("r2"))
            for k in ("slowdown", "batch"):
                d = f.get(k)
                if d is None:
                    continue
                if not isinstance(d, dict) or not d:
                    errs.append(f"{w}.{k}: expected a non-empty object")
                    continue
                for kk, vv in d.items():
                    if not str(kk).isdigit():
                        errs.append(f"{w}.{k}: key {kk!r} is not an integer string")
                    _check_num(errs, f"{w}.{k}.{kk}", vv, positive=True)
            sus = f.get("sustained")
            if sus is not None:
                if not isinstance(sus, dict):
                    errs.append(f"{w}.sustained: expected an object or null")
                else:
                    for k in ("factor", "time_constant_s", "rest_ratio"):
                        _check_num(errs, f"{w}.sustained.{k}", sus.get(k), positive=True)
                    if "rest_time_constant_s" in sus:
                        _check_num(errs, f"{w}.sustained.rest_time_constant_s", sus["rest_time_constant_s"],
                                   positive=True)
            sd = f.get("slowdown")
            if isinstance(sd, dict) and "1" not in sd:
                errs.append(f"{w}.slowdown: level \"1\" missing")
    step = fits.get("step") or {}     # optional: profiles before 2026-12 have none
    if not isinstance(step, dict):
        errs.append("fits.step: expected an object keyed by size label")
        step = {}
    for label, f in step.items():
        w = f"fits.step.{label}"
        if not isinstance(f, dict):
            errs.append(f"{w}: expected an object")
            continue
        for k in STEP_ARCH + STEP_TERMS + ("r2", "rel_err", "n"):
            if k not in f:
                errs.append(f"{w}.{k}: required key missing")
        for k in STEP_ARCH + ("n",):
            if k in f:
                _check_num(errs, f"{w}.{k}", f[k], integer=True, positive=True)
        for k in STEP_TERMS + ("rel_err",):
            if k in f:
                _check_num(errs, f"{w}.{k}", f[k])
                if _is_num(f[k]) and f[k] < 0:
                    errs.append(f"{w}.{k}: expected >= 0, got {f[k]!r}")
        if "r2" in f:
            _check_num(errs, f"{w}.r2", f["r2"], nullable=True)
    if errs:
        raise ValueError(f"{source}: invalid profile:\n  " + "\n  ".join(errs))
    return p


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _sanitize(o):
    """JSON has no inf/nan: write them as null."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k): _sanitize(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_sanitize(v) for v in o]
    return o


def write_json_atomic(obj, path: str) -> None:
    """Write JSON to a temp file in the same directory, fsync, os.replace."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_sanitize(obj), f, indent=1, default=_json_default, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def save(profile: dict, path: str) -> None:
    validate(_sanitize(profile), str(path))
    write_json_atomic(profile, path)


def load(path: str) -> dict:
    try:
        with open(path) as f:
            p = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return validate(p, str(path))


def _deep_merge(a, b):
    if isinstance(a, dict) and isinstance(b, dict):
        out = dict(a)
        for k, v in b.items():
            out[k] = _deep_merge(a[k], v) if k in a else copy.deepcopy(v)
        return out
    return copy.deepcopy(b)


def _ident(p):
    md = p.get("metadata", {})
    return md.get("host"), md.get("device"), md.get("device_name")


def merge(a: dict, b: dict, force: bool = False) -> dict:
    """Merge profile b into a (b wins where both have the same fit or sample).
    Refuses profiles measured on different hosts or devices unless force."""
    validate(a, "first profile")
    validate(b, "second profile")
    ha, da, na = _ident(a)
    hb, db, nb = _ident(b)
    if not force and (ha != hb or da != db or na != nb):
        raise ValueError(
            f"refusing to merge profiles from different machines: host {ha!r} "
            f"(device {da!r}, {na!r}) vs host {hb!r} (device {db!r}, {nb!r}); "
            "pass force=True to merge anyway")
    out = copy.deepcopy(a)
    out["samples"] = _deep_merge(a["samples"], b["samples"])
    out["fits"] = _deep_merge(a["fits"], b["fits"])
    if "diagnostics" in a or "diagnostics" in b:
        out["diagnostics"] = _deep_merge(a.get("diagnostics", {}), b.get("diagnostics", {}))
    out["errors"] = list(a.get("errors", [])) + list(b.get("errors", []))
    merged = list(a["metadata"].get("merged_from", [])) or [
        {"host": ha, "device_name": na, "date": a["metadata"].get("date")}]
    merged.append({"host": hb, "device_name": nb, "date": b["metadata"].get("date")})
    out["metadata"]["merged_from"] = merged
    return validate(out, "merged profile")


def summary(p: dict) -> str:
    """Human-readable summary of a (valid) profile."""
    md, fits = p["metadata"], p["fits"]
    lines = [f"{SCHEMA} measured on {md.get('host')} ({md.get('device')}: "
             f"{md.get('device_name')}, {md.get('cpu_count')} CPUs) at {md.get('date')}, "
             f"torch {md.get('torch')}"]
    if md.get("note"):
        lines.append(f"  note: {md['note']}")
    c = md.get("contention")
    if c:
        lines.append(f"  contention: {c.get('contended_fraction', 0):.0%} of samples taken while "
                     f"other processes used the CPU (excluded), {c.get('waited_s', 0):.0f} s waited")
    if md.get("page_cache_eviction"):
        lines.append(f"  page cache eviction: {md['page_cache_eviction']}")
    if md.get("driver") or md.get("cuda_version"):
        lines.append(f"  driver {md.get('driver')}, CUDA {md.get('cuda_version')}")
    lines.append("load paths (time = a + size/bandwidth):")
    for path in LOAD_PATHS:
        f = fits["load"].get(path)
        if f:
            hw = f.get("hw_limit_gbs")
            hw_s = f", hw limit {hw:.1f} GB/s ({f['bandwidth_gbs'] / hw:.0%})" if hw else ""
            lines.append(f"  {path:22s} a={f['a_s'] * 1e3:8.2f} ms  bw={f['bandwidth_gbs']:8.2f}"
                         f" GB/s  R2={f['r2']:.3f}  n={f['n']}{hw_s}")
    rt = fits.get("runtime")
    if rt:
        g = rt.get("gpu_memory_gb")
        lines.append(f"runtime: init {rt['init_s']:.2f} s, host memory "
                     f"{rt['host_memory_gb']:.3f} GB, GPU memory "
                     f"{'n/a' if g is None else f'{g:.3f} GB'}")
    else:
        lines.append("runtime: not measured")
    lines.append("inference:")
    for fam, by in fits["inference"].items():
        for label, f in by.items():
            if fam == "decoder":
                terms = (f"+ {f['per_input_token_ms']:.4f} ms/in tok "
                         f"+ {f['per_output_token_ms']:.4f} ms/out tok")
            else:
                terms = f"+ {f.get('per_token_ms', float('nan')):.4f} ms/tok"
            sd = ", ".join(f"{k}:{v:.2f}" for k, v in sorted(f["slowdown"].items(),
                                                             key=lambda kv: int(kv[0])))
            cvs = f"{f['cv']:.3f}"
            sus = f.get("sustained")
            sus = ("" if sus is None else f" sustained x{sus['factor']:.2f} "
                   f"(tau {sus['time_constant_s']:.2f} s, at rest x{sus['rest_ratio']:.2f})")
            lines.append(f"  {fam}/{label} ({f['params'] / 1e6:.1f}M params): "
                         f"{f['base_ms']:.2f} ms {terms}  R2={f['r2']:.3f} cv={cvs} "
                         f"slowdown {{{sd}}}{sus}")
    if fits.get("step"):
        lines.append("step time (step = base + per_prefill_token p + per_decode_seq n + per_kv_token K):")
        for label, f in sorted(fits["step"].items(), key=lambda kv: kv[1]["params"]):
            r2 = "n/a" if f.get("r2") is None else f"{f['r2']:.3f}"
            lines.append(f"  {label} ({f['params'] / 1e6:.1f}M params, {f['layers']}x{f['hidden']}): "
                         f"base {f['base'] * 1e3:.3f} ms + {f['per_prefill_token'] * 1e6:.2f} us/prefill tok "
                         f"+ {f['per_decode_seq'] * 1e6:.2f} us/decode seq + {f['per_kv_token'] * 1e9:.2f} ns/KV tok"
                         f"  R2={r2} rel_err={f['rel_err']:.1%} n={f['n']}")
    errs = p.get("errors", [])
    if errs:
        lines.append(f"errors ({len(errs)}):")
        for e in errs:
            lines.append(f"  {e.get('step')}: {e.get('kind')} {e.get('type')}: "
                         f"{e.get('message')}")
    return "\n".join(lines)
