"""Shared helpers: scenarios built as dicts, run through the public API."""
from __future__ import annotations

import copy

import pytest

import sim
from sim.scenario import parse_scenario

TEST_TYPE = {"name": "test.gpu8", "gpus": 8, "gpu_memory_gb": 80, "vcpus": 96, "memory_gb": 1024,
             "price_per_hour": 8.0}


def sme(*, rate=10.0, mean=0.05, dist="exponential", cv=None, instances=1, routing="random",
        max_concurrency=1, duration=3600.0, warmup=0.0, seed=1, instance_type="ml.g5.xlarge",
        traffic=None, accelerators=1, **extra) -> dict:
    """A one-model SME scenario as a dict (the parsed YAML)."""
    service = {"dist": dist, "mean": mean}
    if cv is not None:
        service["cv"] = cv
    d = {
        "name": "t", "seed": seed, "duration": duration, "warmup": warmup,
        "instance_types": [TEST_TYPE],
        "models": [{"name": "m", "size_gb": 1, "accelerators": accelerators, "service": service,
                    "traffic": traffic or {"process": "poisson", "rate": rate}}],
        "endpoints": [{"name": "e", "mode": "sme", "instance_type": instance_type, "instances": instances,
                       "routing": routing, "max_concurrency": max_concurrency, "models": ["m"]}],
    }
    d.update(extra)
    return d


def run_dict(d: dict, **kw) -> sim.Result:
    return sim.run(parse_scenario(copy.deepcopy(d), source="test"), **kw)


@pytest.fixture
def make_sme():
    return sme


# Timing-sensitive tests measure their machine's noise (pyperf-style) and say when it is too noisy
# to measure instead of failing on it: the cores other processes took while they ran
# (calibration.harness.Neighbours). Above this share of the machine's cores, a timing that misses
# its bound is an xfail with the measurement in its message.
NOISY_SHARE = 0.25


def too_noisy(neighbours) -> str | None:
    """Why the span ``neighbours`` (a started calibration.harness.Neighbours) measured is too noisy
    to time anything, or None."""
    import os

    cores, cpus = neighbours.cores(), os.cpu_count() or 1
    if cores is not None and cores > NOISY_SHARE * cpus:
        return f"too noisy to measure: other processes used {cores:.2f} of {cpus} cores meanwhile"
    return None


def print_table(title: str, head: tuple[str, ...], rows: list[tuple]) -> None:
    """A table printed under ``title`` (the seed reproductions' figures, with ``pytest -s``)."""
    widths = [max(len(str(h)), *(len(str(r[k])) for r in rows)) for k, h in enumerate(head)]
    print(f"\n{title}")
    print(" | ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)))
