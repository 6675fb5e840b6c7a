"""capsim: a discrete-event capacity-planning simulator for GPU model hosting.

Public API::

    import sim
    sc = sim.load_scenario("scenarios/quickstart.yaml")
    result = sim.run(sc)            # Result: summary dict, requests and timeline DataFrames
    result.save("results/quickstart")
    cmp = sim.compare(sc)           # SME, MME and IC plans sized to the SLO, on the same arrivals
"""
from .api import Result, run
from .scenario import Scenario, ScenarioError, load_scenario

__version__ = "0.1.0"
__all__ = ["load_scenario", "run", "compare", "Result", "Scenario", "ScenarioError", "__version__"]


def __getattr__(name: str):
    # sim.compare is imported on first use: plain runs do not pay for the planner.
    if name == "compare":
        from .plan.compare import compare

        return compare
    raise AttributeError(f"module 'sim' has no attribute {name!r}")
