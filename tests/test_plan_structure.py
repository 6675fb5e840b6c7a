"""The planner's structure: compare.py and optimize.py orchestrate (each under 450 lines), and no
module of sim uses another module's private (underscore) names."""
from __future__ import annotations

import ast
from pathlib import Path

SIM = Path(__file__).resolve().parents[1] / "sim"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SIM.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(mod: str, level: int, here: str, is_pkg: bool) -> str:
    if level == 0:
        return mod or ""
    base = here.split(".")
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([mod] if mod else []))


def private_uses(path: Path) -> list[str]:
    """``from X import _name`` and ``X._name`` (X a module imported here) in one file."""
    here = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    modules: set[str] = set()       # local names bound to modules of other files
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _resolve(node.module or "", node.level, here, path.name == "__init__.py")
            for a in node.names:
                if not (src == "sim" or src.startswith("sim.")):
                    continue   # the standard library and other packages are not capsim's modules
                if a.name.startswith("_") and not a.name.startswith("__") and src != here:
                    out.append(f"{path.relative_to(SIM.parent)}:{node.lineno}: from {src} import {a.name}")
                if node.module is None or (SIM / Path(*src.split(".")[1:]) / a.name).with_suffix(".py").exists() \
                        or (SIM / Path(*src.split(".")[1:]) / a.name).is_dir():
                    modules.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "sim" or a.name.startswith("sim."):
                    modules.add(a.asname or a.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            v = node.value
            if isinstance(v, ast.Name) and v.id in modules:
                out.append(f"{path.relative_to(SIM.parent)}:{node.lineno}: {v.id}.{node.attr}")
    return out


def test_no_module_uses_another_modules_private_names():
    found = [u for p in sorted(SIM.rglob("*.py")) for u in private_uses(p)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_checker_sees_both_forms(tmp_path):
    pkg = SIM / "plan"
    probe = pkg / "_structure_probe.py"
    probe.write_text("from .compare import _hidden\nfrom . import compare as cmp\nx = cmp._other\n")
    try:
        found = private_uses(probe)
    finally:
        probe.unlink()
    assert any("import _hidden" in f for f in found) and any("cmp._other" in f for f in found), found


def test_compare_and_optimize_only_orchestrate():
    for name in ("compare.py", "optimize.py"):
        n = len((SIM / "plan" / name).read_text().splitlines())
        assert n < MAX_LINES, f"sim/plan/{name} has {n} lines (at most {MAX_LINES - 1})"
