"""Cases of the planner's regression test (tests/test_plan_regression.py) and how their
expected values were made.

The expected values in plan_regression.json were produced by the planner as it stood at
commit ee51f97 (before sim/plan was split by concept), by running

    PYTHONPATH=. python tests/data/plan_regression.py

once; the test runs the same cases through the current planner and compares. A case
named ``...-nobatch`` is a shipped scenario with every ``service.batching`` removed
(the case the refactor must leave alone whatever the sizing of batched models
becomes); the other cases are the shipped scenarios as they are.

Regenerate only for a change meant to move plans or costs, and say why in the commit and in the
file's ``changes`` list (so far: ``optimize_demo-modes``, when ``optimize --modes`` came to
search the routing policies of the scenario's own endpoints; the cases whose IC plan moved when IC
plans came to weigh single-GPU instance types; ``quickstart-nobatch``, when compare came to stop
growing a plan that more capacity no longer moves, whose MME plan misses the SLO either way).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
DATA = Path(__file__).with_suffix(".json")
OPT_TYPES = ["ml.g5.xlarge", "ml.g5.2xlarge", "ml.g6.xlarge"]

# name -> (scenario file, strip batching, overrides)
COMPARE_CASES = {
    "compare_small_models-nobatch": ("compare_small_models.yaml", True, []),
    "compare_small_models": ("compare_small_models.yaml", False, []),
    "compare_large_models-nobatch": ("compare_large_models.yaml", True, ["duration=4m"]),
    "forethought_embeddings-nobatch": ("forethought_embeddings.yaml", True, ["duration=6m", "warmup=1m"]),
    "quickstart-nobatch": ("quickstart.yaml", True, ["duration=6m", "warmup=1m"]),
}
# name -> (scenario file, strip batching, keyword arguments of sim.plan.optimize)
OPTIMIZE_CASES = {
    "optimize_demo-types": ("optimize_demo.yaml", False,
                            dict(instance_types=OPT_TYPES, max_instances=8, slo="p99=600ms", replications=2)),
    "optimize_demo-modes": ("optimize_demo.yaml", False,
                            dict(modes="sme,mme,ic", max_instances=6, replications=2)),
    "compare_small_models-nobatch-modes": ("compare_small_models.yaml", True,
                                           dict(modes="sme,mme", max_instances=8, replications=2,
                                                overrides=["duration=3m"])),
}


def strip_batching(data: dict) -> dict:
    d = copy.deepcopy(data)
    for m in d.get("models", []):
        svc = m.get("service") if isinstance(m, dict) else None
        if isinstance(svc, dict):
            svc.pop("batching", None)
    return d


def scenario_file(name: str, strip: bool, tmp: Path) -> Path:
    """The scenario to run: the shipped file, or a copy without batching in ``tmp`` (the stripped
    scenarios name no file of their own, so their base directory does not matter)."""
    import yaml

    src = SCENARIOS / name
    if not strip:
        return src
    data = strip_batching(yaml.safe_load(src.read_text()))
    out = tmp / name
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def compare_record(case: str) -> dict:
    import tempfile

    import sim

    name, strip, ovs = COMPARE_CASES[case]
    with tempfile.TemporaryDirectory() as t:
        c = sim.compare(scenario_file(name, strip, Path(t)), overrides=ovs)
    s = c.summary
    out = {"best": s["best"], "plans": {}, "skipped": s["skipped"]}
    for n, b in s["plans"].items():
        out["plans"][n] = {"endpoints": c.plans[n].endpoints, "cost_per_hour_usd": b["cost_per_hour_usd"],
                           "slo_met": b["slo_met"], "p99_ms": b["p99_ms"],
                           "sizing": [{"cost_per_hour_usd": r["cost_per_hour_usd"], "instances": r["instances"]}
                                      for r in b["sizing"]]}
    return out


def optimize_record(case: str) -> dict:
    import tempfile

    from sim.plan import optimize

    name, strip, kw = OPTIMIZE_CASES[case]
    with tempfile.TemporaryDirectory() as t:
        r = optimize(scenario_file(name, strip, Path(t)), **kw)
    ov = (r.best_summary or {}).get("overall") or {}
    return {"feasible": r.feasible, "best_plan": r.best_plan, "cost_per_hour_usd": r.cost_per_hour_usd,
            "mode": r.mode, "n_simulations": r.n_simulations, "p99_ms": ov.get("p99_ms"),
            "modes": {m: {k: o.get(k) for k in ("status", "cost_per_hour_usd", "best_plan")}
                      for m, o in r.modes.items()}}


def normalise(x):
    """JSON round trip: tuples become lists, keys strings, as in the stored file."""
    return json.loads(json.dumps(x, default=str))


if __name__ == "__main__":
    import subprocess
    import time

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    rec = {"generated_by": "PYTHONPATH=. python tests/data/plan_regression.py", "commit": rev,
           "compare": {}, "optimize": {}}
    for k in COMPARE_CASES:
        t = time.perf_counter()
        rec["compare"][k] = normalise(compare_record(k))
        print(f"compare {k}: {time.perf_counter() - t:.1f} s")
    for k in OPTIMIZE_CASES:
        t = time.perf_counter()
        rec["optimize"][k] = normalise(optimize_record(k))
        print(f"optimize {k}: {time.perf_counter() - t:.1f} s")
    DATA.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
