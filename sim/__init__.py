"""capsim: a discrete-event capacity-planning simulator for GPU model hosting.

Public API::

    import sim
    sc = sim.load_scenario("scenarios/quickstart.yaml")
    result = sim.run(sc)            # Result: summary dict, requests and timeline DataFrames
    result.save("results/quickstart")
"""
from .api import Result, run
from .scenario import Scenario, ScenarioError, load_scenario

__version__ = "0.1.0"
__all__ = ["load_scenario", "run", "Result", "Scenario", "ScenarioError", "__version__"]
