"""Readers for request traces and their replay as arrival times.

Every reader returns a ``pandas.DataFrame`` sorted by arrival with columns

* ``arrival_s``     float seconds (see below for where 0 is),
* ``input_tokens``  int,
* ``output_tokens`` int,
* ``model``         str, only when the file names a model per request.

Formats:

``azure_llm``
    Azure LLM inference trace 2023 (Splitwise): CSV with header
    ``TIMESTAMP,ContextTokens,GeneratedTokens``; ``TIMESTAMP`` is wall-clock
    time such as ``2023-11-16 18:17:03.9799600``. ``arrival_s`` is seconds
    since the first request, so the first request is at 0.0.
``mooncake``
    Mooncake FAST'25 traces: JSONL, one object per line with ``timestamp``
    (milliseconds, relative), ``input_length``, ``output_length`` and
    ``hash_ids`` (ignored). ``arrival_s = timestamp / 1000``; the published
    traces start at timestamp 0.
``csv``
    A plain CSV with a required column ``arrival_s`` (seconds from the start
    of the trace) and optional ``model``, ``input_tokens``, ``output_tokens``
    (missing token columns read as 0). Other columns are ignored. The times
    are kept as written (an initial offset is preserved), so the first
    request is at 0.0 only if the file says so.

Rows out of time order are sorted (stably). Negative times, non-numeric
values, missing columns, and empty files raise :class:`TraceError`, whose
message names the file, the 1-based line and what was expected.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["TraceError", "FORMATS", "loop_period", "read_trace", "trace_arrivals"]

FORMATS = ("azure_llm", "csv", "mooncake")


class TraceError(ValueError):
    """A trace file cannot be read; the message names the file and line."""


# --------------------------------------------------------------------------- #
# shared helpers
# --------------------------------------------------------------------------- #
def _shown(value: object) -> str:
    text = repr(value.item() if hasattr(value, "item") else value)   # numpy scalars as plain numbers
    return text if len(text) <= 60 else text[:57] + "..."


# the most tokens one request may have (as the scenario schema's); checked before any cast to int64
MAX_TOKENS = 10**8


def _open_check(path: Path) -> None:
    if "\0" in str(path):
        raise TraceError(f"{str(path)!r}: the path holds a NUL character; expected a trace file")
    try:
        exists, is_dir, regular = path.exists(), path.is_dir(), path.is_file()
        size = path.stat().st_size if regular else 0
    except (OSError, RuntimeError) as exc:   # a symlink loop, a name too long
        raise TraceError(f"{path}: cannot read the trace file: {getattr(exc, 'strerror', None) or exc}") from None
    if not exists:
        raise TraceError(f"{path}: trace file not found")
    if is_dir:
        raise TraceError(f"{path}: expected a trace file, found a directory")
    if not regular:
        raise TraceError(f"{path}: expected a trace file, found something else (a device, a FIFO or a socket)")
    if size == 0:
        raise TraceError(f"{path}: trace file is empty; expected at least one request")


def _read_text_table(path: Path, required: tuple[str, ...], what: str) -> tuple[pd.DataFrame, np.ndarray]:
    """Read a CSV as strings; return (frame, 1-based line number of each row)."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False,
                         encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path}: trace file is empty; expected a header line and at least one request") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot parse as {what} CSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise TraceError(
            f"{path}: line 1: missing column{'s' if len(missing) > 1 else ''} {names}; "
            f"a {what} trace needs a header with {', '.join(required)} "
            f"(found: {', '.join(df.columns) or 'nothing'})")
    lines = np.arange(len(df), dtype=np.int64) + 2  # header is line 1
    df = df.apply(lambda col: col.str.strip())
    blank = (df == "").all(axis=1).to_numpy()
    if blank.any():
        df = df.loc[~blank].reset_index(drop=True)
        lines = lines[~blank]
    if len(df) == 0:
        raise TraceError(f"{path}: trace file has a header but no requests; expected at least one data line")
    return df, lines


def _numbers(path: Path, col: pd.Series, name: str, lines: np.ndarray, expected: str) -> np.ndarray:
    import pandas as pd

    values = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise TraceError(f"{path}: line {lines[i]}: column '{name}': expected {expected}, "
                         f"got {_shown(col.iloc[i]) if col.iloc[i] != '' else 'an empty value'}")
    return values


def _token_counts(path: Path, values: np.ndarray, name: str, lines: np.ndarray,
                  raw: pd.Series | list | None = None) -> np.ndarray:
    import pandas as pd

    bad = ~np.isfinite(values) | (values < 0) | (values > MAX_TOKENS) | (values != np.floor(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        got = raw.iloc[i] if isinstance(raw, pd.Series) else (raw[i] if raw is not None else values[i])
        raise TraceError(f"{path}: line {lines[i]}: '{name}': expected a whole number of tokens between 0 and "
                         f"{MAX_TOKENS}, got {_shown(got)}")
    return values.astype(np.int64)


def _finish(path: Path, fmt: str, arrival: np.ndarray, lines: np.ndarray, name: str,
            input_tokens: np.ndarray, output_tokens: np.ndarray, model=None) -> pd.DataFrame:
    import pandas as pd

    neg = arrival < 0
    if neg.any():
        i = int(np.flatnonzero(neg)[0])
        raise TraceError(f"{path}: line {lines[i]}: '{name}': expected a time >= 0, got {_shown(arrival[i])}")
    data = {"arrival_s": arrival.astype(np.float64), "input_tokens": input_tokens,
            "output_tokens": output_tokens}
    if model is not None:
        data["model"] = np.asarray(model, dtype=object)
    df = pd.DataFrame(data)
    if not (np.diff(arrival) >= 0).all():
        order = np.argsort(arrival, kind="stable")
        df = df.iloc[order].reset_index(drop=True)
    if model is not None:
        df["model"] = df["model"].astype(str)
    df.attrs["source"] = str(path)
    df.attrs["format"] = fmt
    df.attrs["token_columns"] = ["input_tokens", "output_tokens"]   # csv narrows this
    return df


# --------------------------------------------------------------------------- #
# formats
# --------------------------------------------------------------------------- #
def _read_csv(path: Path) -> pd.DataFrame:
    df, lines = _read_text_table(path, ("arrival_s",), "csv")
    arrival = _numbers(path, df["arrival_s"], "arrival_s", lines, "a number of seconds")
    tokens = {}
    for name in ("input_tokens", "output_tokens"):
        if name in df.columns:
            vals = _numbers(path, df[name], name, lines, "a whole number of tokens >= 0")
            tokens[name] = _token_counts(path, vals, name, lines, df[name])
        else:
            tokens[name] = np.zeros(len(df), dtype=np.int64)
    model = None
    has_tokens = [n for n in ("input_tokens", "output_tokens") if n in df.columns]
    if "model" in df.columns:
        empty = (df["model"] == "").to_numpy()
        if empty.any():
            i = int(np.flatnonzero(empty)[0])
            raise TraceError(f"{path}: line {lines[i]}: column 'model': expected a model name, got an empty value")
        model = df["model"].to_numpy()
    out = _finish(path, "csv", arrival, lines, "arrival_s",
                  tokens["input_tokens"], tokens["output_tokens"], model)
    out.attrs["token_columns"] = has_tokens
    return out


def _read_azure(path: Path) -> pd.DataFrame:
    import pandas as pd

    df, lines = _read_text_table(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"), "azure_llm")
    raw = df["TIMESTAMP"]
    try:
        ts = pd.to_datetime(raw, format="%Y-%m-%d %H:%M:%S.%f", errors="coerce")
        if ts.isna().any():  # e.g. a time exactly on the second, written without a fraction
            ts = ts.fillna(pd.to_datetime(raw.where(ts.isna()), format="ISO8601", errors="coerce"))
        if not pd.api.types.is_datetime64_any_dtype(ts):
            raise ValueError("times in several time zones, or some with a zone and some without")
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise TraceError(f"{path}: column 'TIMESTAMP': expected times like "
                         f"'2023-11-16 18:17:03.9799600', all without a time zone (or all in one): {exc}") from None
    bad = ts.isna().to_numpy()
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        got = raw.iloc[i]
        raise TraceError(f"{path}: line {lines[i]}: column 'TIMESTAMP': expected a date and time like "
                         f"'2023-11-16 18:17:03.9799600', got {_shown(got) if got != '' else 'an empty value'}")
    if getattr(ts.dt, "tz", None) is not None:
        ts = ts.dt.tz_convert("UTC").dt.tz_localize(None)
    ns = ts.to_numpy(dtype="datetime64[ns]").astype(np.int64)
    arrival = (ns - ns.min()).astype(np.float64) / 1e9
    toks = []
    for name in ("ContextTokens", "GeneratedTokens"):
        vals = _numbers(path, df[name], name, lines, "a whole number of tokens >= 0")
        toks.append(_token_counts(path, vals, name, lines, df[name]))
    return _finish(path, "azure_llm", arrival, lines, "TIMESTAMP", toks[0], toks[1])


_MOONCAKE_FIELDS = ("timestamp", "input_length", "output_length")


def _read_mooncake(path: Path) -> pd.DataFrame:
    stamps: list[float] = []
    ins: list[float] = []
    outs: list[float] = []
    models: list[str] = []
    lines: list[int] = []
    has_model = None
    try:
        fh = open(path, encoding="utf-8-sig")
    except (OSError, ValueError) as exc:
        raise TraceError(f"{path}: cannot open trace file: {exc}") from None
    with fh:
        for lineno, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{path}: line {lineno}: expected one JSON object per line "
                                 f"(mooncake JSONL), got invalid JSON: {exc.msg}") from None
            except RecursionError:
                raise TraceError(f"{path}: line {lineno}: expected one flat JSON object per line (mooncake "
                                 "JSONL), got one nested too deeply to read") from None
            if not isinstance(rec, dict):
                raise TraceError(f"{path}: line {lineno}: expected a JSON object with "
                                 f"{', '.join(_MOONCAKE_FIELDS)}, got {type(rec).__name__}")
            row = []
            for key in _MOONCAKE_FIELDS:
                if key not in rec:
                    raise TraceError(f"{path}: line {lineno}: missing field '{key}'; a mooncake record needs "
                                     f"{', '.join(_MOONCAKE_FIELDS)}")
                v = rec[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    what = "milliseconds" if key == "timestamp" else "a whole number of tokens >= 0"
                    raise TraceError(f"{path}: line {lineno}: field '{key}': expected a number ({what}), "
                                     f"got {_shown(v)}")
                row.append(v)
            if has_model is None:
                has_model = "model" in rec
            if has_model:
                m = rec.get("model")
                if not isinstance(m, str) or not m:
                    raise TraceError(f"{path}: line {lineno}: field 'model': expected a model name "
                                     f"(the first record has one), got {_shown(m)}")
                models.append(m)
            stamps.append(row[0])
            ins.append(row[1])
            outs.append(row[2])
            lines.append(lineno)
    if not lines:
        raise TraceError(f"{path}: trace file has no requests; expected one JSON object per line")
    line_arr = np.asarray(lines, dtype=np.int64)
    arrival = np.asarray(stamps, dtype=np.float64) / 1000.0
    in_tok = _token_counts(path, np.asarray(ins, dtype=np.float64), "input_length", line_arr, ins)
    out_tok = _token_counts(path, np.asarray(outs, dtype=np.float64), "output_length", line_arr, outs)
    return _finish(path, "mooncake", arrival, line_arr, "timestamp", in_tok, out_tok,
                   models if has_model else None)


_READERS = {"azure_llm": _read_azure, "csv": _read_csv, "mooncake": _read_mooncake}


def read_trace(path: str | os.PathLike, fmt: str) -> pd.DataFrame:
    """Read a request trace in format ``fmt`` (``azure_llm``, ``mooncake`` or ``csv``)."""
    path = Path(path)
    key = fmt.strip().lower() if isinstance(fmt, str) else fmt
    if key not in _READERS:
        raise TraceError(f"{path}: unknown trace format {fmt!r}; expected one of {', '.join(FORMATS)}")
    _open_check(path)
    return _READERS[key](path)


# --------------------------------------------------------------------------- #
# replay
# --------------------------------------------------------------------------- #
def loop_period(arrival_s: np.ndarray, time_scale: float = 1.0, rate_scale: float = 1.0) -> float:
    """The period with which a looped trace repeats (seconds, once scaled): its span (last - first
    arrival) plus a mean gap, so the seam looks like an average gap; 0.0 where there is no span (one
    row, or all at one time)."""
    n = len(arrival_s)
    if n < 2:
        return 0.0
    span = float(np.max(arrival_s) - np.min(arrival_s))
    if not span > 0:
        return 0.0
    return (span + span / (n - 1)) * (time_scale / rate_scale)   # as the replay scales its times


def trace_arrivals(df: pd.DataFrame, t_end: float, t_start: float = 0.0, *, rate_scale: float = 1.0,
                   time_scale: float = 1.0, loop: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Replay a trace as arrival times in ``[t_start, t_end)``.

    Request ``i`` arrives at ``t_start + arrival_s[i] * time_scale / rate_scale``:
    ``rate_scale=2`` replays the trace twice as fast (double the rate, half the
    span); ``time_scale`` stretches time (e.g. to read a trace in other
    units). With ``loop=True`` the trace repeats end to end until ``t_end``
    with period ``span + mean gap`` (in trace time, then scaled), where
    ``span = last - first`` arrival, so the seam looks like an average gap.

    Returns ``(times, rows)``: sorted float64 times and the int64 positional
    row (``df.iloc``) each one replays.
    """
    if "arrival_s" not in getattr(df, "columns", ()):
        raise ValueError("trace_arrivals needs a DataFrame with an 'arrival_s' column (see read_trace)")
    rate_scale = float(rate_scale)
    time_scale = float(time_scale)
    for name, v in (("rate_scale", rate_scale), ("time_scale", time_scale)):
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    t_start, t_end = float(t_start), float(t_end)
    if not (math.isfinite(t_start) and math.isfinite(t_end)) or t_end < t_start:
        raise ValueError(f"need finite t_start <= t_end, got {t_start!r}, {t_end!r}")

    base = df["arrival_s"].to_numpy(dtype=np.float64)
    n = base.size
    if n == 0 or t_end == t_start:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
    if not np.all(np.isfinite(base)) or np.any(base < 0):
        raise ValueError("arrival_s must be finite and >= 0")
    rows = np.arange(n, dtype=np.int64)
    if not (np.diff(base) >= 0).all():
        rows = np.argsort(base, kind="stable").astype(np.int64)
        base = base[rows]
    factor = time_scale / rate_scale
    times = t_start + base * factor

    if not loop:
        keep = int(np.searchsorted(times, t_end, side="left"))
        return times[:keep], rows[:keep]

    period = loop_period(base, time_scale, rate_scale)
    if period <= 0:
        raise ValueError("cannot loop a trace whose requests all arrive at the same time "
                         f"({n} request{'s' if n != 1 else ''}); there is no period to repeat")
    reps = int(math.ceil((t_end - times[0]) / period)) + 1 if times[0] < t_end else 1
    reps = max(reps, 1)
    offs = np.arange(reps, dtype=np.float64) * period
    all_times = (times[None, :] + offs[:, None]).ravel()
    all_rows = np.broadcast_to(rows, (reps, n)).ravel()
    keep = int(np.searchsorted(all_times, t_end, side="left"))
    return all_times[:keep].copy(), all_rows[:keep].copy()
