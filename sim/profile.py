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
