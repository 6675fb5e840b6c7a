"""Reading scenario files: YAML, ``--set`` overrides and readable errors."""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from . import schema
from .errors import ScenarioError, format_path, suggest
from .resolve import Scenario, resolve

_KNOWN_KEYS = sorted({
    name for cls in vars(schema).values()
    if isinstance(cls, type) and issubclass(cls, BaseModel) for name in cls.model_fields
})


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of ``path``, or a ScenarioError naming the file and line."""
    p = Path(path)
    if not p.exists():
        raise ScenarioError("file not found", source=str(path))
    if p.is_dir():
        raise ScenarioError("is a directory; expected a scenario YAML file", source=str(path))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"cannot read the file ({e})", source=str(path)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        problem = getattr(e, "problem", None) or str(e)
        raise ScenarioError(f"YAML syntax error: {problem}", source=str(path), path=where) from None
    if data is None:
        raise ScenarioError("the file is empty; expected a scenario with name, duration, models and endpoints",
                            source=str(path))
    if not isinstance(data, dict):
        raise ScenarioError(f"expected a mapping of scenario keys at the top level, got {type(data).__name__}",
                            source=str(path))
    return data


_SEG = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _segments(key_path: str) -> list[str | int]:
    segs: list[str | int] = []
    for name, idx in _SEG.findall(key_path):
        segs.append(int(idx) if idx else (int(name) if name.isdigit() else name))
    return segs


def apply_overrides(data: dict, overrides: Iterable[str], source: str = "--set") -> dict:
    """A copy of ``data`` with each ``key.path=value`` applied (value parsed as YAML).

    List items are addressed by index (``endpoints[0]`` or ``endpoints.0``) or
    by their ``name`` (``endpoints.embeddings.instances=3``).
    """
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ScenarioError(f"expected key.path=value, got {item!r}", source=source)
        key, raw = item.split("=", 1)
        segs = _segments(key.strip())
        if not segs:
            raise ScenarioError(f"empty key path in {item!r}", source=source)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node: Any = out
        for depth, seg in enumerate(segs):
            last = depth == len(segs) - 1
            here = format_path(segs[: depth + 1])
            if isinstance(node, list):
                if isinstance(seg, str):
                    found = [i for i, x in enumerate(node) if isinstance(x, dict) and x.get("name") == seg]
                    if not found:
                        names = [x.get("name") for x in node if isinstance(x, dict)]
                        raise ScenarioError(f"no list item named {seg!r}{suggest(seg, names)}", source=source,
                                            path=here)
                    seg = found[0]
                if not 0 <= seg < len(node):
                    raise ScenarioError(f"index {seg} out of range (the list has {len(node)} items)",
                                        source=source, path=here)
            elif isinstance(node, dict):
                if seg not in node and not last:
                    raise ScenarioError(f"no key {seg!r} to descend into{suggest(seg, node)}", source=source,
                                        path=here)
            else:
                raise ScenarioError("cannot set a key inside a scalar", source=source, path=here)
            if last:
                node[seg] = value
            else:
                node = node[seg]
    return out


def _data_path(data: Any, loc: tuple) -> tuple:
    """The part of a pydantic error location that names keys of the data.

    Pydantic adds the names of union members and validators to a location;
    walking the data keeps only the segments a user wrote.
    """
    out = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and part.isidentifier() and part.islower():
            out.append(part)  # a key the user left out (missing) or misspelt
            node = None
    return tuple(out)


def _message(err: dict) -> str:
    kind = err.get("type", "")
    msg = err.get("msg", "")
    loc = err.get("loc", ())
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
        return f"unknown key {key!r}{suggest(key, _KNOWN_KEYS)}"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        got = err.get("input")
        options = re.findall(r"'([^']*)'", expected)
        return f"unknown value {got!r}{suggest(got, options)}; expected {expected}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    got = err.get("input")
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "int_parsing",
                "float_parsing", "int_type", "float_type", "bool_type", "string_type", "too_short",
                "int_from_float", "list_type", "dict_type", "model_type"):
        msg = f"{msg[0].lower()}{msg[1:]}, got {got!r}" if not isinstance(got, (dict, list)) else msg
    return msg


def format_validation_error(e: ValidationError, data: Any, source: str) -> ScenarioError:
    lines = []
    seen = set()
    for err in e.errors():
        path = format_path(_data_path(data, err.get("loc", ()))) or "(top level)"
        line = f"{path}: {_message(err)}"
        if line not in seen:
            seen.add(line)
            lines.append(line)
    # Unions report one error per member; the first few say enough.
    if len(lines) > 6:
        lines = lines[:6] + [f"... and {len(lines) - 6} more"]
    if len(lines) == 1:
        return ScenarioError(lines[0], source=source)
    return ScenarioError(f"{len(lines)} problems: " + "; ".join(lines), source=source)


def parse_scenario(data: dict, *, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    """Validate and resolve a scenario given as a dict (the parsed YAML)."""
    try:
        spec = schema.ScenarioSpec.model_validate(data)
    except ValidationError as e:
        raise format_validation_error(e, data, source) from None
    return resolve(spec, source=source, base_dir=base_dir)


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load, override, validate and resolve the scenario file at ``path``.

    Raises :class:`ScenarioError` with a one-paragraph message naming the file
    and the key path for any bad input.
    """
    data = read_yaml(path)
    data = apply_overrides(data, overrides, source=f"{path} (--set)")
    return parse_scenario(data, source=str(path), base_dir=Path(path).resolve().parent)
