"""capsim calibration harness.

Times real model loads, runtime (CUDA context) initialisation, inference and
the step of a KV-cached decoder serving a continuous batch (calibration/steps.py)
on local hardware and writes a versioned JSON profile (`capsim.profile/1`, see
calibration/profile.py) that the simulator reads.

Dependency rule: this package imports only torch, numpy, scipy, safetensors
(optional) and the standard library -- never `sim`, pandas, pydantic or simpy
-- so that a calibration job runs on a bare GPU box.

Usage:
    python -m calibration run --device cpu|cuda [--quick] [--sizes 10M,50M]
        [--families encoder,decoder] [--sections runtime,loads,inference,steps]
        [--step-sizes 5M,20M] [--workdir DIR] --out PROFILE.json
    python -m calibration validate PROFILE.json

Importing this package is cheap: torch is imported by the submodules only.
"""
from .profile import SCHEMA, load, merge, save, validate  # noqa: F401

__all__ = ["SCHEMA", "load", "save", "merge", "validate"]
