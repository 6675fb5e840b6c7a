"""The planner's plans and costs against those recorded before sim/plan was split by concept.

tests/data/plan_regression.py holds the cases (shipped scenarios, some with every
``service.batching`` removed) and says how tests/data/plan_regression.json was made: by the
planner at commit ee51f97, run once. Plans (endpoints, instance types, counts, copies, routing)
must be equal; costs and P99 equal to 1e-9 relative (the same seeds give the same arrivals and
the same simulations; only float summation order could move them).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("plan_regression_cases", HERE / "data" / "plan_regression.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)
EXPECTED = json.loads(cases.DATA.read_text())
REL = 1e-9


def same(a, b, where=""):
    """Equal structures; floats to REL relative."""
    if isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None, where
        assert math.isclose(a, b, rel_tol=REL, abs_tol=1e-12), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {a} != {b}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("case", sorted(cases.COMPARE_CASES))
def test_compare_gives_the_recorded_plans_and_costs(case):
    same(cases.normalise(cases.compare_record(case)), EXPECTED["compare"][case], f"compare {case}")


@pytest.mark.parametrize("case", sorted(cases.OPTIMIZE_CASES))
def test_optimize_gives_the_recorded_plans_and_costs(case):
    same(cases.normalise(cases.optimize_record(case)), EXPECTED["optimize"][case], f"optimize {case}")


def test_the_comparison_is_strict():
    """A moved cost, a moved count: both are caught."""
    rec = json.loads(json.dumps(EXPECTED["compare"]["compare_small_models-nobatch"]))
    rec["plans"]["mme"]["cost_per_hour_usd"] *= 1 + 1e-6
    with pytest.raises(AssertionError):
        same(rec, EXPECTED["compare"]["compare_small_models-nobatch"])
    rec = json.loads(json.dumps(EXPECTED["compare"]["compare_small_models-nobatch"]))
    rec["plans"]["mme"]["endpoints"][0]["instances"] += 1
    with pytest.raises(AssertionError):
        same(rec, EXPECTED["compare"]["compare_small_models-nobatch"])
