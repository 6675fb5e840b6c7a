"""Scenario files: schema v1, units, loading and resolution."""
from .errors import ScenarioError
from .loader import apply_overrides, load_scenario, parse_scenario, read_yaml
from .resolve import ContinuousBatching, Endpoint, Group, Model, Scenario
from .schema import ScenarioSpec

__all__ = ["ScenarioError", "Scenario", "ScenarioSpec", "Endpoint", "Group", "Model", "ContinuousBatching",
           "load_scenario", "parse_scenario", "apply_overrides", "read_yaml"]
