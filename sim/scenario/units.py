"""Units for scenario files: durations, sizes and rates.

Inside capsim, times are float seconds, sizes float GB (10^9 bytes) and rates
float per second. A scenario may write a bare number in those units or a
string with a unit (``250ms``, ``1.5GB``, ``16GiB``, ``1200/min``).
"""
from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator, StringConstraints

_NUM = r"([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"

_DURATION_UNITS = {
    "us": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0,
    "h": 3600.0, "hr": 3600.0, "d": 86400.0,
}
_SIZE_UNITS = {
    "b": 1e-9, "kb": 1e-6, "mb": 1e-3, "gb": 1.0, "tb": 1e3,
    "kib": 2**10 / 1e9, "mib": 2**20 / 1e9, "gib": 2**30 / 1e9, "tib": 2**40 / 1e9,
}
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "m": 1 / 60.0, "min": 1 / 60.0, "h": 1 / 3600.0, "hr": 1 / 3600.0, "d": 1 / 86400.0}

_DURATION_RE = re.compile(rf"^\s*{_NUM}\s*([a-zA-Z]*)\s*$")
_SIZE_RE = _DURATION_RE
_RATE_RE = re.compile(rf"^\s*{_NUM}\s*(?:/\s*([a-zA-Z]+))?\s*$")


# The largest magnitudes a scenario may write: far beyond any real fleet, far below where floats
# lose their meaning (or a run its end). One place for every number of the schema.
MAX_NUMBER = 1e12          # a plain number: prices, targets, thresholds, factors
MAX_DURATION = 1e9         # seconds: about 31 years
MAX_SIZE = 1e6             # GB: a petabyte
MAX_RATE = 1e7             # per second
MAX_BANDWIDTH = 1e6        # GB/s
MAX_COUNT = 10**9          # any whole number (instances, copies, users, levels, ...)
MAX_TOKENS = 10**8         # tokens of one request
MAX_CV = 100.0             # a coefficient of variation
MIN_CV = 1e-6              # a cv between 0 and this is refused (0 itself means no spread)
MIN_PERIOD = 1e-3          # seconds: the shortest period that drives events (refresh, evaluation, ...)


def shown(value: object) -> str:
    """``repr`` of a value, cut to a readable length (a 400-digit number, a long string)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: object, what: str, example: str) -> float | None:
    if isinstance(value, bool):
        raise ValueError(f"expected a {what} such as {example}, got {shown(value)}")
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"expected a finite {what}, got {shown(value)}") from None
    if not isinstance(value, str):
        raise ValueError(f"expected a {what} such as {example}, got {shown(value)}")
    return None


def _finite_non_negative(x: float, what: str, raw: object, top: float | None = None, unit: str = "") -> float:
    if not math.isfinite(x):
        raise ValueError(f"expected a finite {what}, got {shown(raw)}")
    if x < 0:
        raise ValueError(f"expected a non-negative {what}, got {shown(raw)}")
    if top is not None and x > top:
        raise ValueError(f"expected a {what} of at most {top:g}{unit}, got {shown(raw)}")
    return x


def parse_number(value: object) -> float:
    """A finite plain number of sane magnitude (at most MAX_NUMBER either way)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected a number, got {shown(value)}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"expected a finite number, got {shown(value)}") from None
    except ValueError:
        raise ValueError(f"expected a number, got {shown(value)}") from None
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {shown(value)}")
    if abs(x) > MAX_NUMBER:
        raise ValueError(f"expected a number between -{MAX_NUMBER:g} and {MAX_NUMBER:g}, got {shown(value)}")
    return x


def parse_cv(value: object) -> float:
    """A coefficient of variation: 0 (no spread) or between MIN_CV and MAX_CV."""
    x = parse_number(value)
    if x != 0 and not MIN_CV <= abs(x) <= MAX_CV:
        raise ValueError(f"expected a cv of 0 or between {MIN_CV:g} and {MAX_CV:g}, got {shown(value)}")
    return x


def parse_count(value: object) -> int:
    """A whole number of sane magnitude (at most MAX_COUNT either way); a float must be whole."""
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, got {shown(value)}")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {shown(value)}") from None
    if not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {shown(value)}")
    if abs(value) > MAX_COUNT:
        raise ValueError(f"expected a whole number between -{MAX_COUNT} and {MAX_COUNT}, got {shown(value)}")
    return value


def parse_period(value: object) -> float:
    """A duration that drives events: at least MIN_PERIOD, so that a run cannot spin for ever."""
    x = parse_duration(value)
    if x < MIN_PERIOD:
        raise ValueError(f"expected a duration of at least 1ms (a period that drives events), got {shown(value)}")
    return x


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string such as ``250ms``, ``5m``, ``2h``."""
    example = "250ms, 30s, 5m, 2h or 1d"
    x = _number(value, "duration", example)
    if x is None:
        m = _DURATION_RE.match(value)  # type: ignore[arg-type]
        unit = m.group(2).lower() if m else None
        if not m or (unit and unit not in _DURATION_UNITS):
            raise ValueError(f"expected a duration such as {example}, got {shown(value)}")
        x = float(m.group(1)) * _DURATION_UNITS[unit or "s"]
    return _finite_non_negative(x, "duration", value, MAX_DURATION, " s")


def parse_size(value: object) -> float:
    """GB (10^9 bytes) from a number of GB or a string such as ``292MB``, ``16GiB``."""
    example = "292MB, 1.5GB or 16GiB"
    x = _number(value, "size", example)
    if x is None:
        m = _SIZE_RE.match(value)  # type: ignore[arg-type]
        unit = m.group(2).lower() if m else None
        if not m or (unit and unit not in _SIZE_UNITS):
            raise ValueError(f"expected a size such as {example}, got {shown(value)}")
        x = float(m.group(1)) * _SIZE_UNITS[unit or "gb"]
    return _finite_non_negative(x, "size", value, MAX_SIZE, " GB")


def parse_rate(value: object) -> float:
    """Events per second from a number per second or a string such as ``1200/min``."""
    example = "20/s, 1200/min or 3/h"
    x = _number(value, "rate", example)
    if x is None:
        m = _RATE_RE.match(value)  # type: ignore[arg-type]
        unit = m.group(2).lower() if m and m.group(2) else "s"
        if not m or unit not in _RATE_UNITS:
            raise ValueError(f"expected a rate such as {example}, got {shown(value)}")
        x = float(m.group(1)) * _RATE_UNITS[unit]
    return _finite_non_negative(x, "rate", value, MAX_RATE, "/s")


_PARAMS_RE = re.compile(rf"^\s*{_NUM}\s*([kKmMbBtT]?)\s*$")
_PARAMS_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}
MAX_PARAMS = 1e15          # parameters of one model
MAX_SEED = 2 ** 63 - 1     # a scenario's seed (numpy's generators take it whole)


def parse_params(value: object) -> int:
    """A parameter count from a number or a string such as ``6.74B``, ``125M`` or ``1.2T``
    (K, M, B, T: thousand, million, billion, trillion), rounded to a whole number, at least 1."""
    example = "6.74B, 125M or 6738415616"
    x = _number(value, "parameter count", example)
    if x is None:
        m = _PARAMS_RE.match(value)  # type: ignore[arg-type]
        if not m:
            raise ValueError(f"expected a parameter count such as {example}, got {shown(value)}")
        x = float(m.group(1)) * _PARAMS_UNITS[m.group(2).lower()]
    x = _finite_non_negative(x, "parameter count", value, MAX_PARAMS)
    if x < 1:
        raise ValueError(f"expected a parameter count of at least 1, got {shown(value)}")
    return int(round(x))


_BANDWIDTH_RE = re.compile(rf"^\s*{_NUM}\s*([a-zA-Z]+)(?:\s*/\s*s)?\s*$")
_BITS = {"gbps": 1 / 8, "mbps": 1e-3 / 8, "gbit": 1 / 8, "mbit": 1e-3 / 8}


def parse_bandwidth(value: object) -> float:
    """GB/s from a number of GB/s or a string such as ``100MB/s``, ``1.5GB/s``, ``10Gbps``."""
    example = "100MB/s, 1.5GB/s or 10Gbps"
    x = _number(value, "bandwidth", example)
    if x is None:
        m = _BANDWIDTH_RE.match(value)  # type: ignore[arg-type]
        unit = m.group(2).lower() if m else None
        if not m or (unit not in _SIZE_UNITS and unit not in _BITS):
            raise ValueError(f"expected a bandwidth such as {example}, got {shown(value)}")
        x = float(m.group(1)) * (_SIZE_UNITS.get(unit) or _BITS[unit])
    x = _finite_non_negative(x, "bandwidth", value, MAX_BANDWIDTH, " GB/s")
    if x == 0:
        raise ValueError(f"expected a bandwidth > 0, got {shown(value)}")
    return x


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[float, BeforeValidator(parse_size)]
Rate = Annotated[float, BeforeValidator(parse_rate)]
Bandwidth = Annotated[float, BeforeValidator(parse_bandwidth)]
Number = Annotated[float, BeforeValidator(parse_number)]
MAX_TEXT = 256             # characters of a name, a glob, a path
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
CV = Annotated[float, BeforeValidator(parse_cv)]
Count = Annotated[int, BeforeValidator(parse_count)]
Period = Annotated[float, BeforeValidator(parse_period)]
Params = Annotated[int, BeforeValidator(parse_params)]


# -- bare numbers that were most likely meant in another unit ---------------------------------------
# A bare number is in the schema's unit: seconds, GB, per second. Where it is far beyond what that
# unit makes plausible, the author most likely wrote milliseconds (``slo.p99: 2000``; ``service.base:
# 20``): validate and run warn, with the key path and the value as milliseconds. Each key's threshold
# in seconds, at or above which a bare number is suspect (README, Scenarios, "Units"):
BARE_SECONDS_HINTS: tuple[tuple[str, float, str], ...] = (
    ("slo.p50", 60.0, "a latency target"),
    ("slo.p90", 60.0, "a latency target"),
    ("slo.p99", 60.0, "a latency target"),
    ("slo.mean", 60.0, "a latency target"),
    ("slo.ttft", 60.0, "a time to first token"),
    ("slo.tpot", 1.0, "a time per output token"),
    ("models[*].service.mean", 10.0, "a request's mean service time"),
    ("models[*].service.base", 10.0, "a request's fixed service time"),
    ("models[*].service.samples", 10.0, "measured service times"),
    ("models[*].service.per_input_token", 1.0, "a time per input token"),
    ("models[*].service.per_output_token", 1.0, "a time per output token"),
    ("models[*].service.continuous_batching.step.base", 1.0, "a step's fixed time"),
    ("models[*].service.continuous_batching.step.per_prefill_token", 1.0, "a time per prefill token"),
    ("models[*].service.continuous_batching.step.per_decode_seq", 1.0, "a time per decoding sequence"),
    ("models[*].service.continuous_batching.step.per_kv_token", 1.0, "a time per KV token"),
    ("endpoints[*].timeout", 3600.0, "an invocation timeout"),
)

_BARE_RE = re.compile(rf"^\s*{_NUM}\s*$")


def _bare(value: object) -> float | None:
    """The number of a value written without a unit (``2000``, ``"2000"``), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and _BARE_RE.match(value):
        try:
            x = float(value)
        except (ValueError, OverflowError):
            return None
        return x if math.isfinite(x) else None
    return None


def _walk(data: object, parts: list[str], where: str):
    """(key path, value) of every value at ``parts`` (``name``, ``name[*]``) under ``data``."""
    if not parts:
        yield where, data
        return
    head, rest = parts[0], parts[1:]
    name, each = (head[:-3], True) if head.endswith("[*]") else (head, False)
    if not isinstance(data, dict) or name not in data:
        return
    value, here = data[name], f"{where}.{name}" if where else name
    if not each:
        yield from _walk(value, rest, here)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _walk(item, rest, f"{here}[{i}]")


def _human_seconds(x: float) -> str:
    for unit, size in (("days", 86400.0), ("hours", 3600.0), ("minutes", 60.0)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:g} seconds"


def bare_number_warnings(data: object) -> list[str]:
    """Warnings for the bare numbers of a scenario (the parsed YAML, overrides applied) that are far
    beyond what their unit makes plausible (BARE_SECONDS_HINTS): ``slo.p99: 2000 is 2000 seconds (33.3
    minutes): a bare number is in seconds; did you mean 2000ms?``."""
    out = []
    for pattern, threshold, what in BARE_SECONDS_HINTS:
        for where, value in _walk(data, pattern.split("."), ""):
            if isinstance(value, (list, tuple)):   # a list of times (samples): one warning, at its largest
                xs = [x for x in map(_bare, value) if x is not None]
                x, said = (max(xs), "the largest, ") if xs else (None, "")
            else:
                x, said = _bare(value), ""
            if x is None or x < threshold:
                continue
            shown_x = f"{x:g}"
            out.append(f"{where}: {said}{shown_x}{',' if said else ''} is {_human_seconds(x)} for {what} (a bare "
                       f"number is in seconds); did you mean {shown_x}ms?")
    return out
