"""The source documents' results reproduced as scenarios (MISSION.md): each test
prints the simulated figures beside the reported ones."""
from __future__ import annotations

from pathlib import Path

import pytest

import sim

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def _routing_run(instances: int, routing: str) -> dict:
    sc = sim.load_scenario(SCENARIOS / "routing_codegen2.yaml", [
        f"endpoints[0].instances={instances}", f"models[0].traffic.users={4 * instances}",
        f"endpoints[0].routing={routing}", "duration=40m"])
    o = sim.run(sc).summary["overall"]
    return {"p99": o["p99_ms"], "per_instance_per_min": o["throughput_per_s"] * 60 / instances}


def test_routing_lor_against_random_codegen2():
    rows = []
    for n in (1, 5, 10, 15, 20):
        lor, rnd = _routing_run(n, "least_outstanding_requests"), _routing_run(n, "random")
        p99_lower = 1 - lor["p99"] / rnd["p99"]
        tput_higher = lor["per_instance_per_min"] / rnd["per_instance_per_min"] - 1
        rows.append((n, p99_lower, tput_higher))
    print("\ninstances | LOR P99 lower (reported 4-33%) | LOR throughput/instance higher (reported 15-16%)")
    for n, p, t in rows:
        print(f"{n:9d} | {p:30.1%} | {t:.1%}")
    one = rows[0]
    assert abs(one[1]) < 0.02 and abs(one[2]) < 0.02          # one instance: routing cannot matter
    for n, p, t in rows[1:]:
        assert 0.04 <= p <= 0.33, (n, p)                      # within the reported 4-33% lower P99
        # More throughput per instance, but about twice the reported 15-16%: capsim's copy serves
        # each of its max_concurrency requests at full speed, so an instance that random routing
        # leaves with 1-2 requests wastes its batch slots; a real batching server runs a small
        # batch faster per request, which narrows the gap (see routing_codegen2.yaml).
        assert 0.10 <= t <= 0.45, (n, t)
