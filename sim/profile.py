"""Calibration profiles on the simulator side: read a ``capsim.profile/1`` JSON
(written by ``python -m calibration``; no torch here) and turn it into service
times, load bandwidths and runtime memory.

When the profile was measured on another GPU than the scenario's instance
type, service times are transferred by a roofline model: the per-output-token
(decode) term is memory-bound and scales with the memory-bandwidth ratio; the
base and per-input-token (prefill) terms are compute-bound and scale with the
FLOP/s ratio. Each transfer is reported as a warning.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .catalog import Catalog, GPUSpec

SCHEMA = "capsim.profile/1"


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
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"cannot read the profile {path}: {e}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ProfileError(f"{path} is not a calibration profile: expected \"schema\": \"{SCHEMA}\"")
    for key in ("metadata", "fits"):
        if not isinstance(data.get(key), dict):
            raise ProfileError(f"{path}: missing {key!r}")
    return data


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
    best = None
    for key, spec in catalog.gpus.items():
        k = key.upper().replace(" ", "")
        stem = k.split("-")[0]
        if stem and stem in name and (best is None or len(key) > len(best.name)):
            best = spec
    return best


def service_model(profile: dict, family: str, params: str | int | float, *, catalog: Catalog,
                  target_gpu: str | None, where: str) -> tuple[ServiceModel, list[str]]:
    """The service model of ``family`` at ``params`` parameters, on ``target_gpu``.

    A size that was not measured scales each term linearly in the parameter
    count from the nearest measured size (compute and weight traffic both grow
    with it). Returns the model and the warnings to show.
    """
    fams = profile["fits"].get("inference") or {}
    if family not in fams or not fams[family]:
        raise ProfileError(f"{where}: the profile has no inference fits for family {family!r}; "
                           f"it has {', '.join(sorted(fams)) or 'none'}")
    try:
        want = parse_params(params)
    except ProfileError as e:
        raise ProfileError(f"{where}.params: {e}") from None
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
