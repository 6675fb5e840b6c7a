"""Reading scenario files: YAML, ``--set`` overrides and readable errors."""
from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, get_args

import yaml
from pydantic import BaseModel, ValidationError

from . import schema
from .errors import ScenarioError, format_path, suggest
from .units import bare_number_warnings, shown
from .resolve import Scenario, resolve

_KNOWN_KEYS = sorted({
    name for cls in vars(schema).values()
    if isinstance(cls, type) and issubclass(cls, BaseModel) for name in cls.model_fields
})


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (YAML lets the last
    one win without a word, so a typo'd copy of a block would silently replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue   # ``<<: *anchor``: the merged keys may be overridden here (flatten_mapping)
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"a {'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'} as a key; expected a "
                    "name", key_node.start_mark)
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"key {key!r} appears twice", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:
                pass
        return super().construct_mapping(node, deep=deep)


MAX_FILE_BYTES = 16 * 2**20   # a scenario is a page or two of YAML; this bounds the read of /dev/zero
MAX_DEPTH = 64                # nesting of mappings and lists; a scenario needs under 10


def _check_depth(text: str) -> None:
    """A yaml.YAMLError at the first collection nested deeper than MAX_DEPTH (PyYAML's composer
    recurses per level, so a file nested hundreds deep would exhaust Python's stack)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested more than {MAX_DEPTH} levels deep; a scenario needs a "
                                           "few", problem_mark=event.start_mark)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of ``path``, or a ScenarioError naming the file and line."""
    p = Path(path)
    if "\0" in str(path):
        raise ScenarioError("the path holds a NUL character; expected the path of a scenario YAML file",
                            source=repr(str(path)))
    try:
        exists, is_dir, regular = p.exists(), p.is_dir(), p.is_file()
    except OSError as e:   # a symlink loop, a name too long, ...
        raise ScenarioError(f"cannot read the file ({e.strerror or e})", source=str(path)) from None
    if not exists:
        raise ScenarioError("file not found; expected the path of a scenario YAML file", source=str(path))
    if is_dir:
        raise ScenarioError("is a directory; expected a scenario YAML file", source=str(path))
    if not regular:
        raise ScenarioError("is not a regular file (a device, a FIFO or a socket); expected a scenario YAML file",
                            source=str(path))
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise ScenarioError(f"the file is larger than {MAX_FILE_BYTES // 2**20} MiB; expected a scenario YAML "
                                "file", source=str(path))
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ScenarioError(f"cannot read the file ({e})", source=str(path)) from None
    try:
        _check_depth(text)
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise ScenarioError(f"YAML nested too deeply; expected at most {MAX_DEPTH} levels",
                            source=str(path)) from None
    except yaml.YAMLError as e:
        raise ScenarioError(f"YAML syntax error: {_yaml_problem(e, text)}", source=str(path),
                            path=_yaml_where(e, text)) from None
    if data is None:
        raise ScenarioError("the file is empty; expected a scenario with name, duration, models and endpoints",
                            source=str(path))
    if not isinstance(data, dict):
        raise ScenarioError(f"expected a mapping of scenario keys at the top level, got {type(data).__name__}",
                            source=str(path))
    return data


def _yaml_where(e: yaml.YAMLError, text: str) -> str | None:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}"
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow; no mark, a position
        return f"line {text.count(chr(10), 0, e.position) + 1}"
    return None


def _yaml_problem(e: yaml.YAMLError, text: str) -> str:
    """The problem on one line, with where the construct it broke began (an unclosed bracket's line)."""
    if isinstance(e, yaml.reader.ReaderError):
        char = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        return f"unacceptable character {char}: {e.reason}"
    problem = getattr(e, "problem", None) or str(e)
    context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and cmark is not None:
        problem += f" ({context} started at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        problem += f" ({context})"
    return " ".join(problem.split())


_SEG = re.compile(r"([^.\[\]]+)|\[(-?\d+)\]")


def _segments(key_path: str) -> list[str | int]:
    segs: list[str | int] = []
    for name, idx in _SEG.findall(key_path):
        segs.append(int(idx) if idx else (int(name) if name.isdigit() else name))
    return segs


def apply_overrides(data: dict, overrides: Iterable[str], source: str = "--set") -> dict:
    """A copy of ``data`` with each ``key.path=value`` applied (value parsed as YAML).

    List items are addressed by index (``endpoints[0]`` or ``endpoints.0``) or
    by their ``name`` (``endpoints.embeddings.instances=3``). A mapping the data lacks is started
    empty (``slo.p99=1s`` on a scenario without ``slo``), unless its name is close to a key there
    (a typo: an error with the suggestion).
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
                        names = [str(x.get("name")) for x in node if isinstance(x, dict) and "name" in x]
                        hint = suggest(seg, names) or (
                            f"; expected an index or one of the names {', '.join(names)}" if names else "")
                        raise ScenarioError(f"no list item named {seg!r}{hint}", source=source, path=here)
                    seg = found[0]
                if not 0 <= seg < len(node):
                    raise ScenarioError(f"index {seg} out of range (the list has {len(node)} items)",
                                        source=source, path=here)
            elif isinstance(node, dict):
                if seg not in node and not last:
                    close = suggest(seg, node)
                    if isinstance(segs[depth + 1], str) and not close:
                        # a mapping the file leaves out (slo.p99=1s on a scenario without slo): start it
                        # empty; the schema then checks the key and what it holds
                        node[seg] = {}
                    else:
                        hint = close or (f"; expected one of {', '.join(map(str, node))}" if node else "")
                        raise ScenarioError(f"no key {seg!r} to descend into{hint}", source=source, path=here)
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
        elif isinstance(node, dict) and part in _KNOWN_KEYS:
            out.append(part)  # a key the user left out (missing); not a union member such as 'int'
            node = None
    return tuple(out)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (``list[ModelSpec]``, ``TokensSpec | None``, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in get_args(annotation) for m in _models_in(a)]


def _allowed_keys(loc: tuple) -> list[str]:
    """The keys the schema allows in the mapping holding ``loc[-1]``; empty if unknown."""
    classes: list[type[BaseModel]] = [schema.ScenarioSpec]
    for part in loc[:-1]:
        if not isinstance(part, str):
            continue  # a list index
        fields = [c.model_fields[part] for c in classes if part in c.model_fields]
        if fields:
            classes = [m for f in fields for m in _models_in(f.annotation)]
            if not classes:
                return []
        else:  # a union member pydantic names ('Distribution'); keep it if it is one of ours
            classes = [c for c in classes if c.__name__ == part] or classes
    return list(dict.fromkeys(k for c in classes for k in c.model_fields))


def _message(err: dict) -> str:
    kind = err.get("type", "")
    msg = err.get("msg", "")
    loc = err.get("loc", ())
    if kind == "extra_forbidden":
        key = loc[-1] if loc else "?"
        allowed = _allowed_keys(tuple(loc))
        if not allowed:
            return f"unknown key {key!r}{suggest(key, _KNOWN_KEYS)}"
        return f"unknown key {key!r}{suggest(key, allowed)}; expected one of {', '.join(allowed)}"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        got = err.get("input")
        options = re.findall(r"'([^']*)'", expected)
        return f"unknown value {shown(got)}{suggest(got, options) if len(repr(got)) <= 60 else ''}; expected {expected}"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if msg.startswith("Assertion failed, "):
        msg = msg[len("Assertion failed, "):]
    got = err.get("input")
    if isinstance(got, (int, float, str)) and len(repr(got)) > 60:
        got = _Shown(shown(got))
    if kind == "model_type":   # a mapping was expected: say which keys, not the class behind them
        keys = _allowed_keys(tuple(loc) + ("?",))
        counts = err.get("ctx", {}).get("class_name") in ("InstancesSpec", "CopiesSpec")   # an int too
        return (f"expected {'a number or ' if counts else ''}a mapping{' with keys ' + ', '.join(keys) if keys else ''}"
                + ("" if isinstance(got, (dict, list)) else f", got {got!r}"))
    if kind == "int_from_float":
        return f"expected a whole number, got {got!r}"
    ctx = err.get("ctx", {})
    if kind == "list_type":
        return "expected a list" + ("" if isinstance(got, (dict, list)) else f", got {got!r}")
    if kind == "too_short" and "min_length" in ctx:
        n = ctx["min_length"]
        return f"expected at least {n} item{'s' if n != 1 else ''}, got {ctx.get('actual_length', 'fewer')}"
    if kind in ("too_long", "string_too_long") and "max_length" in ctx:
        what = "characters" if kind == "string_too_long" else "items"
        raw = err.get("input")
        return f"expected at most {ctx['max_length']} {what}, got {len(raw) if hasattr(raw, '__len__') else 'more'}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "int_parsing",
                "float_parsing", "int_type", "float_type", "bool_type", "string_type", "too_short",
                "string_too_short",
                "int_from_float", "list_type", "dict_type", "model_type"):
        msg = f"{msg[0].lower()}{msg[1:]}, got {got!r}" if not isinstance(got, (dict, list)) else msg
    return msg


class _Shown(str):
    """A value cut to a readable length, shown without quotes."""

    def __repr__(self) -> str:
        return str(self)


def format_validation_error(e: ValidationError, data: Any, source: str) -> ScenarioError:
    lines = []
    seen = set()
    errors = e.errors()
    # A union (a count or a distribution, say) reports one error per member: where a member
    # accepted the value's shape and refused its content, that says more than another's type.
    specific = {format_path(_data_path(data, x.get("loc", ())))
                for x in errors if x.get("type") == "value_error"}
    for err in errors:
        path = format_path(_data_path(data, err.get("loc", ()))) or "(top level)"
        if path in specific and err.get("type") != "value_error" and err.get("type", "").endswith(
                ("_type", "_parsing")):
            continue
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
    scenario = resolve(spec, source=source, base_dir=base_dir)
    hints = bare_number_warnings(data)
    if hints:
        scenario = dataclasses.replace(scenario, warnings=tuple(dict.fromkeys(hints + list(scenario.warnings))))
    return scenario


def load_scenario(path: str | Path, overrides: Iterable[str] = ()) -> Scenario:
    """Load, override, validate and resolve the scenario file at ``path``.

    Raises :class:`ScenarioError` with a one-paragraph message naming the file
    and the key path for any bad input.
    """
    data = read_yaml(path)
    data = apply_overrides(data, overrides, source=f"{path} (--set)")
    scenario = parse_scenario(data, source=str(path), base_dir=Path(path).resolve().parent)
    check_trace_files(scenario)
    return scenario


def check_trace_files(scenario: Scenario) -> None:
    """A trace that is not there fails here (``validate``), not minutes into a run."""
    for g in scenario.groups:
        tr = g.traffic
        if tr is None or tr.process != "trace" or not tr.path:
            continue
        where = f"models[{g.index}].traffic.path"
        if "\0" in tr.path:
            raise ScenarioError(f"the path {tr.path!r} holds a NUL character; expected the path of a {tr.format} "
                                "trace file", source=scenario.source, path=where)
        try:
            full = (scenario.base_dir / tr.path).resolve()
            exists, is_dir, regular = full.exists(), full.is_dir(), full.is_file()
        except (OSError, RuntimeError) as e:   # a symlink loop (RuntimeError before Python 3.13)
            raise ScenarioError(f"cannot read the trace file {tr.path!r} ({getattr(e, 'strerror', None) or e}); "
                                f"expected a {tr.format} trace file", source=scenario.source, path=where) from None
        if not exists:
            problem = "trace file not found"
        elif is_dir:
            problem = "is a directory"
        elif not regular:
            problem = "is not a regular file"
        else:
            continue
        raise ScenarioError(f"{problem}: {full}; expected a {tr.format} trace file (a path is relative to "
                            f"the scenario file)", source=scenario.source, path=where)
