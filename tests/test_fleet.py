"""A fleet's scale (issue 22, item 6): the figures grouped by endpoint once are those of a filter per endpoint,
the fleet scenario runs at a small scale, and `capsim bench --fleet`'s figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from sim.cli import main
from sim.metrics import rows_by_endpoint

REPO = Path(__file__).resolve().parents[1]


def test_rows_by_endpoint_are_the_rows_a_filter_selects_in_order():
    rng = np.random.default_rng(3)
    for n_endpoints, dtype in ((1, np.int32), (7, np.int32), (40_000, np.int64)):
        ep = rng.integers(-1, n_endpoints, 20_000).astype(dtype)    # -1: a model no endpoint serves
        rows = rows_by_endpoint(ep, n_endpoints)
        assert len(rows) == n_endpoints
        for e in list(range(min(n_endpoints, 7))) + [n_endpoints - 1]:
            assert np.array_equal(rows[e], np.flatnonzero(ep == e))


def test_the_fleet_scenario_runs_small(tmp_path):
    """scenarios/fleet_100_models_day.yaml at 20 minutes (seed 5): 100 models on 63 endpoints (60 SMEs, two
    MMEs, one IC endpoint), every endpoint with requests, none failed."""
    out = tmp_path / "r"
    r = CliRunner().invoke(main, ["run", str(REPO / "scenarios" / "fleet_100_models_day.yaml"), "--set",
                                  "duration=20m", "--set", "warmup=2m", "--no-plots", "--out", str(out)])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert len(s["models"]) == 100 and len(s["endpoints"]) == 63
    assert all(b["requests"] > 0 for b in s["endpoints"].values())
    assert s["overall"]["failed"] == 0
    # about 0.4 x 100/s at midnight (the diurnal trough) over 20 minutes: 48,000 requests, within 10%
    assert abs(s["overall"]["requests"] - 48_000) < 4_800


def test_bench_fleet_reports_its_phases():
    """`capsim bench --fleet` at a small scale (no timing is asserted): the fleet's phases and their total."""
    from sim.bench import bench_fleet

    f = bench_fleet(share=0.002, plots=False)
    assert f["endpoints"] == 63 and f["models"] == 100
    # 0.2/s on average over 24.5 h: 17,640 requests, within 10%
    assert abs(f["requests"] - 17_640) < 1_764
    phases = ("simulate_s", "summary_s", "requests_frame_s", "timeline_s", "save_s")
    assert all(f[k] > 0 for k in phases)
    assert abs(f["total_s"] - sum(f[k] for k in phases)) < 1e-9
