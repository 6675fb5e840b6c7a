"""Calibration profiles on the simulator side: read a ``capsim.profile/1`` JSON
(written by ``python -m calibration``; no torch here) and turn it into service
times, load bandwidths and runtime memory.

When the profile was measured on another GPU than the scenario's instance
type, service times are transferred by a roofline model: the per-output-token
(decode) term is memory-bound and scales with the memory-bandwidth ratio; the
base and per-input-token (prefill) terms are compute-bound and scale with the
FLOP/s ratio. Each transfer is reported as a warning.

Language models' step times (``continuous_batching.step: {profile: ...}``)
come from the profile's ``fits.step`` (``step_coefficients``): the measured
decoder size nearest the model's, scaled to the model's size and moved to the
instance's GPU by the same roofline reasoning.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .catalog import Catalog, GPUSpec

SCHEMA = "capsim.profile/1"
STEP_TERMS = ("base", "per_prefill_token", "per_decode_seq", "per_kv_token")


class ProfileError(ValueError):
    pass


@lru_cache(maxsize=32)
def _read(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ProfileError(f"profile not found: {path}; expected a JSON file written by "
                           "`python -m calibration run` (a path is relative to the scenario file)")
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ProfileError(f"cannot read the profile {path}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ProfileError(f"{path} is not a calibration profile: expected \"schema\": \"{SCHEMA}\"")
    for key in ("metadata", "fits"):
        if not isinstance(data.get(key), dict):
            raise ProfileError(f"{path}: missing {key!r}")
    check_fits(path, data["fits"])
    return data


def _shown(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(path: str, where: str, v: object, *, positive: bool, top: float = 1e12) -> None:
    """A finite number >= 0 (> 0 with ``positive``) of sane magnitude, or ProfileError naming the key."""
    import math

    ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
          and (v > 0 if positive else v >= 0) and v <= top)
    if not ok:
        raise ProfileError(f"{path}: {where}: expected a finite number {'>' if positive else '>='} 0"
                           f"{f' and at most {top:g}' if top != 1e12 else ''}, got {_shown(v)}")


def _mapping(path: str, where: str, v: object, optional: bool = True) -> dict:
    if v is None and optional:
        return {}
    if not isinstance(v, dict):
        raise ProfileError(f"{path}: {where}: expected a mapping, got {_shown(v)}")
    return v


def check_fits(path: str, fits: dict) -> None:
    """The fields of ``fits`` the simulator reads: types, finite and positive bandwidths and times,
    slowdown levels whole >= 1 with factors finite > 0. ProfileError names the file and the key."""
    load = _mapping(path, "fits.load", fits.get("load"))
    for name, entry in load.items():
        w = f"fits.load.{name}"
        entry = _mapping(path, w, entry, optional=False)
        if "bandwidth_gbs" in entry or name in ("disk_to_host", "host_to_gpu_pinned", "host_to_gpu_pageable"):
            _number(path, f"{w}.bandwidth_gbs", entry.get("bandwidth_gbs"), positive=True, top=1e6)
        if entry.get("a_s") is not None:
            _number(path, f"{w}.a_s", entry["a_s"], positive=False, top=1e6)
    runtime = _mapping(path, "fits.runtime", fits.get("runtime"))
    for key in ("host_memory_gb", "init_s"):
        if runtime.get(key) is not None:
            _number(path, f"fits.runtime.{key}", runtime[key], positive=False, top=1e6)
    inference = _mapping(path, "fits.inference", fits.get("inference"))
    for family, sizes in inference.items():
        for size, fit in _mapping(path, f"fits.inference.{family}", sizes).items():
            w = f"fits.inference.{family}.{size}"
            fit = _mapping(path, w, fit, optional=False)
            if fit.get("params") is not None:
                _number(path, f"{w}.params", fit["params"], positive=True, top=1e15)
            else:
                try:
                    parse_params(size)
                except ProfileError:
                    raise ProfileError(f"{path}: {w}: expected a size such as 7B as the key, or params") from None
            _number(path, f"{w}.base_ms", fit.get("base_ms"), positive=False, top=1e9)
            for key in ("per_token_ms", "per_input_token_ms", "per_output_token_ms"):
                if fit.get(key) is not None:
                    _number(path, f"{w}.{key}", fit[key], positive=False, top=1e9)
            if fit.get("cv") is not None:
                _number(path, f"{w}.cv", fit["cv"], positive=False, top=100)
            for level, factor in _mapping(path, f"{w}.slowdown", fit.get("slowdown")).items():
                k = str(level).strip()
                if not k.isdigit() or int(k) < 1 or int(k) > 10**6:
                    raise ProfileError(f"{path}: {w}.slowdown: level {_shown(level)} is not a whole number of "
                                       "requests; expected levels 1, 2, ...")
                _number(path, f"{w}.slowdown.{k}", factor, positive=True, top=1e6)
            sus = fit.get("sustained")
            if sus is not None:
                sus = _mapping(path, f"{w}.sustained", sus)
                _number(path, f"{w}.sustained.factor", sus.get("factor"), positive=True, top=1e6)
                _number(path, f"{w}.sustained.time_constant_s", sus.get("time_constant_s"), positive=True, top=1e9)
                if sus.get("rest_time_constant_s") is not None:
                    _number(path, f"{w}.sustained.rest_time_constant_s", sus["rest_time_constant_s"],
                            positive=False, top=1e9)
                _number(path, f"{w}.sustained.rest_ratio", sus.get("rest_ratio"), positive=True, top=1e6)
    for size, fit in _mapping(path, "fits.step", fits.get("step")).items():
        w = f"fits.step.{size}"
        fit = _mapping(path, w, fit, optional=False)
        _number(path, f"{w}.params", fit.get("params"), positive=True, top=1e15)
        for key in STEP_TERMS:
            _number(path, f"{w}.{key}", fit.get(key), positive=False, top=1e6)
        for key in ("layers", "heads", "kv_heads", "hidden", "dtype_bytes"):
            if fit.get(key) is not None:
                _number(path, f"{w}.{key}", fit[key], positive=True, top=1e9)


def load_profile(path: str | Path) -> dict:
    """The parsed profile (cached), validated for the keys the simulator reads."""
    return _read(str(Path(path).resolve()))


_PARAMS = re.compile(r"^\s*([0-9.]+)\s*([KMBT]?)\s*$", re.I)
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}


def parse_params(label: str | int | float) -> float:
    """``"7B"`` -> 7e9, ``"50M"`` -> 5e7."""
    if isinstance(label, (int, float)):
        return float(label)
    m = _PARAMS.match(str(label))
    if not m:
        raise ProfileError(f"expected a parameter count such as 50M or 7B, got {label!r}")
    return float(m.group(1)) * _SCALE[m.group(2).upper()]


@dataclass(frozen=True)
class ServiceModel:
    """Token-based service time (ms terms) with the spread and concurrency slowdown measured, and
    the speed under sustained load where it was measured: (factor, time_constant_s,
    rest_time_constant_s or None) applied to the times at rest, which are ``rest_ratio`` times the
    terms above."""

    base_ms: float
    per_input_token_ms: float
    per_output_token_ms: float
    cv: float
    slowdown: dict[int, float]
    note: str
    sustained: tuple[float, float, float | None] | None = None
    rest_ratio: float = 1.0


def device_gpu(profile: dict, catalog: Catalog) -> GPUSpec | None:
    """The catalog GPU a profile was measured on, or None (a CPU profile, or an unknown GPU)."""
    meta = profile["metadata"]
    if meta.get("device") != "cuda":
        return None
    name = str(meta.get("device_name") or "").upper().replace(" ", "")
    mem = meta.get("gpu_memory_gb")

    def rank(spec: GPUSpec) -> tuple:
        # the GPUs whose name's stem the device name holds; first those whose every part it holds
        # ("A100-SXM4-80GB" holds A100-80GB's), then the nearest memory, then the longest name
        # (L40S before L4)
        parts = spec.name.upper().replace(" ", "").split("-")
        return (all(p in name for p in parts), -abs(spec.memory_gb - float(mem)) if mem else 0.0, len(spec.name))

    found = [spec for key, spec in catalog.gpus.items() if key.upper().replace(" ", "").split("-")[0] in name]
    return max(found, key=rank) if found else None


def service_model(profile: dict, family: str, params: str | int | float, *, catalog: Catalog,
                  target_gpu: str | None, where: str) -> tuple[ServiceModel, list[str]]:
    """The service model of ``family`` at ``params`` parameters, on ``target_gpu``.

    A size that was not measured scales each term linearly in the parameter
    count from the nearest measured size (compute and weight traffic both grow
    with it). Returns the model and the warnings to show.
    """
    fams = profile["fits"].get("inference") or {}
    if family not in fams or not fams[family]:
        has = [f for f in sorted(fams) if fams[f]]
        raise ProfileError(f"{where}: the profile has no inference fits for family {family!r}"
                           + (" (its entry is empty)" if family in fams else "")
                           + f"; it has fits for {', '.join(has) or 'no family'}")
    try:
        want = parse_params(params)
    except ProfileError as e:
        raise ProfileError(f"{where}.params: {e}") from None
    if not want >= 1 or want == float("inf"):
        raise ProfileError(f"{where}.params: expected a parameter count of at least 1 (such as 50M or 7B), "
                           f"got {params!r}")
    entries = sorted(((float(v.get("params") or parse_params(k)), v) for k, v in fams[family].items()),
                     key=lambda x: x[0])
    size, fit = min(entries, key=lambda e: abs(_log(e[0]) - _log(want)))
    ratio = want / size
    warnings = []
    if abs(ratio - 1) > 1e-6:
        warnings.append(f"{where}: {family} {params} was not measured; scaled from {_label(size)} "
                        f"by the parameter ratio {ratio:.3g}")
    per_in = fit.get("per_input_token_ms", fit.get("per_token_ms", 0.0)) * ratio
    per_out = fit.get("per_output_token_ms", 0.0) * ratio
    base = fit["base_ms"] * ratio
    src = device_gpu(profile, catalog)
    note = f"profile {profile['metadata'].get('device_name') or profile['metadata'].get('device')}"
    sus = fit.get("sustained")
    rest = None if not sus or sus.get("rest_time_constant_s") is None else float(sus["rest_time_constant_s"])
    sustained = None if not sus else (float(sus["factor"]), float(sus["time_constant_s"]), rest)
    rest_ratio = 1.0 if not sus else float(sus["rest_ratio"])
    if target_gpu is not None:
        dst = catalog.gpus.get(target_gpu)
        if src is None:
            warnings.append(f"{where}: the profile was measured on {profile['metadata'].get('device_name') or 'a CPU'}, "
                            f"not on a GPU of the catalog; its service times are used on {target_gpu} unchanged")
        elif dst is not None and dst.name != src.name:
            bw = src.memory_bandwidth_gbs / dst.memory_bandwidth_gbs
            flops = _flops(src) / _flops(dst)
            per_out *= bw
            per_in *= flops
            base *= flops
            warnings.append(f"{where}: profile measured on {src.name}, instance has {dst.name}: roofline transfer "
                            f"(decode x{bw:.3g} by memory bandwidth, prefill and base x{flops:.3g} by FLOP/s)"
                            + ("; its sustained-load speed is the measured GPU's and is not carried over"
                               if sustained else ""))
            sustained, rest_ratio = None, 1.0
    slowdown = {int(k): float(v) for k, v in (fit.get("slowdown") or {"1": 1.0}).items()}
    return ServiceModel(base, per_in, per_out, float(fit.get("cv", 0.0)), slowdown, note, sustained,
                        rest_ratio), warnings


def load_speeds(profile: dict) -> dict[str, float]:
    """Bandwidths (GB/s) and fixed overhead (s) of the load paths a profile measured."""
    load = profile["fits"].get("load") or {}
    out: dict[str, float] = {}
    if "disk_to_host" in load:
        out["disk_gbs"] = float(load["disk_to_host"]["bandwidth_gbs"])
        out["overhead_s"] = float(load["disk_to_host"].get("a_s", 0.0))
    for path in ("host_to_gpu_pinned", "host_to_gpu_pageable"):
        if path in load:
            out["h2d_gbs"] = float(load[path]["bandwidth_gbs"])
            out["overhead_s"] = out.get("overhead_s", 0.0) + float(load[path].get("a_s", 0.0))
            break
    return out


def runtime_memory(profile: dict) -> float | None:
    rt = profile["fits"].get("runtime")
    return float(rt["host_memory_gb"]) if rt and rt.get("host_memory_gb") is not None else None


def _flops(g: GPUSpec) -> float:
    return float(g.bf16_tflops or g.fp16_tflops or 1.0)


def _log(x: float) -> float:
    import math

    return math.log(max(x, 1.0))


def _label(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


@dataclass(frozen=True)
class StepCoefficients:
    """A continuous-batching step's time in seconds: ``base + per_prefill_token * p +
    per_decode_seq * n + per_kv_token * K`` (p prefill tokens in the step, n decoding sequences, K
    the context tokens they attend to). ``source``: the profile's size label it came from."""

    base: float
    per_prefill_token: float
    per_decode_seq: float
    per_kv_token: float
    source: str
    note: str

    def __getitem__(self, term: str) -> float:
        """``coef["base"]`` etc.: the four terms by name (STEP_TERMS)."""
        if term not in STEP_TERMS:
            raise KeyError(term)
        return getattr(self, term)

    def time(self, prefill_tokens: float, decode_seqs: float, kv_tokens: float) -> float:
        return (self.base + self.per_prefill_token * prefill_tokens + self.per_decode_seq * decode_seqs
                + self.per_kv_token * kv_tokens)


def measured_kv_bytes_per_token(fit: dict) -> float | None:
    """K and V bytes of one token of a measured decoder (2 x layers x kv_heads x head_dim x
    dtype_bytes), or None where the fit lacks its architecture numbers."""
    try:
        head_dim = float(fit["hidden"]) / float(fit["heads"])
        return 2.0 * float(fit["layers"]) * float(fit["kv_heads"]) * head_dim * float(fit["dtype_bytes"])
    except (KeyError, TypeError, ZeroDivisionError):
        return None


def step_coefficients(path: str | Path, params: float | None, *, kv_bytes_per_token: float | None = None,
                      gpu: GPUSpec | str | None = None, catalog: Catalog | None = None,
                      where: str = "service.continuous_batching.step") -> tuple[StepCoefficients, list[str]]:
    """The step-time coefficients a calibration profile gives a language model of ``params``
    parameters (e.g. 6.74e9) on ``gpu`` (the copy's catalog GPU, or its name; None: a CPU copy, or
    the profile's device as it is), and the warnings to show.

    - The measured decoder size nearest ``params`` in log scale is used (``params`` None: the
      largest measured, the nearest to any model served on a GPU; a warning when there are several).
    - A model of another size: base, per_prefill_token and per_decode_seq scale by the ratio of
      parameters (the weights a step reads once, and a token's compute through them, grow with
      it); per_kv_token by the ratio of KV bytes per token (``kv_bytes_per_token``: 2 x layers x
      kv_heads x head_dim x dtype_bytes of the model) over the measured decoder's, or by the ratio
      of parameters where it is not given. A warning says by how much.
    - A profile measured on another catalog GPU than ``gpu``: roofline transfer, as the
      service times' (``service_model``): the memory-bound terms (base: the weights read once per
      step; per_kv_token: the KV cache read) by the ratio of memory bandwidths, the compute-bound
      ones (per_prefill_token, per_decode_seq: a token's FLOPs) by the ratio of FLOP/s. A profile
      measured on a CPU (or an unknown GPU) is used unchanged on a GPU, with a warning.

    ProfileError (naming the file) when the profile cannot be read or has no step fits."""
    profile = load_profile(path)
    fits = profile["fits"].get("step") or {}
    if not fits:
        raise ProfileError(f"{where}: the profile {path} has no step fits (fits.step): it was made before "
                           "the step time was calibrated, or without that section; run `python -m calibration "
                           "run --sections steps --out PROFILE.json` and point step.profile at it")
    entries = sorted(((float(v["params"]), k, v) for k, v in fits.items()), key=lambda e: e[0])
    warnings: list[str] = []
    if params is None:
        size, label, fit = entries[-1]
        if len(entries) > 1:
            warnings.append(f"{where}: the model's parameter count is unknown; using the largest decoder the "
                            f"profile measured ({label}) unscaled")
        want = size
    else:
        want = float(params)
        if not want > 0:
            raise ProfileError(f"{where}: expected a parameter count > 0, got {params!r}")
        size, label, fit = min(entries, key=lambda e: abs(_log(e[0]) - _log(want)))
    ratio = want / size
    base = float(fit["base"]) * ratio
    per_prefill = float(fit["per_prefill_token"]) * ratio
    per_seq = float(fit["per_decode_seq"]) * ratio
    measured_kv = measured_kv_bytes_per_token(fit)
    if kv_bytes_per_token is not None and measured_kv:
        kv_ratio, kv_how = float(kv_bytes_per_token) / measured_kv, "KV bytes per token"
    else:
        kv_ratio, kv_how = ratio, "parameters (no KV bytes per token given)"
    per_kv = float(fit["per_kv_token"]) * kv_ratio
    if abs(ratio - 1) > 1e-6 or abs(kv_ratio - 1) > 1e-6:
        warnings.append(f"{where}: a model of {_label(want)} parameters was not measured; step time scaled from "
                        f"the profile's {label} decoder ({_label(size)}): base and per-token terms x{ratio:.3g} "
                        f"by the parameter ratio, the KV term x{kv_ratio:.3g} by the ratio of {kv_how}")
    meta = profile["metadata"]
    note = f"profile {meta.get('device_name') or meta.get('device')}, decoder {label}"
    if gpu is not None:
        if catalog is None:
            from .catalog import load_catalog
            catalog = load_catalog()
        src = device_gpu(profile, catalog)
        dst = catalog.gpus.get(gpu) if isinstance(gpu, str) else gpu
        if src is None:
            warnings.append(f"{where}: the profile was measured on {meta.get('device_name') or 'a CPU'}, not on a "
                            f"GPU of the catalog; its step time is used on {getattr(dst, 'name', gpu)} unchanged")
        elif dst is not None and dst.name != src.name:
            bw = src.memory_bandwidth_gbs / dst.memory_bandwidth_gbs
            flops = _flops(src) / _flops(dst)
            base, per_kv = base * bw, per_kv * bw
            per_prefill, per_seq = per_prefill * flops, per_seq * flops
            warnings.append(f"{where}: profile measured on {src.name}, instance has {dst.name}: roofline transfer "
                            f"(base and KV term x{bw:.3g} by memory bandwidth, prefill and per-sequence terms "
                            f"x{flops:.3g} by FLOP/s)")
            note += f", moved to {dst.name}"
    return StepCoefficients(base, per_prefill, per_seq, per_kv, label, note), warnings
