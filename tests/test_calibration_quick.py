"""The whole quick calibration job, as a user runs it (about 2 minutes on a
2-core CPU): `python -m calibration run --device cpu --quick --out tmp`. Its timing bounds
(the wall time, the load fits' linearity) hold on a quiet machine; on one where other processes
take over a quarter of the cores meanwhile (measured: conftest.too_noisy) a miss is an xfail
that says so, not a failure."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")

from calibration import profile as prof  # noqa: E402
from calibration.loads import CPU_PATHS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_cpu_run_is_valid_and_load_fits_are_linear(tmp_path):
    from calibration.harness import Neighbours
    from conftest import too_noisy

    out = tmp_path / "cpu-quick.json"
    neighbours = Neighbours()        # the other processes' CPU over the whole test: its noise
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "calibration", "run", "--device", "cpu",
                        "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[1/" in r.stderr and "loads:" in r.stderr          # progress lines
    p = prof.load(out)                                         # validates
    assert not p["errors"], p["errors"]
    assert not (tmp_path / "cpu-quick.partial.json").exists()
    assert [f.name for f in tmp_path.iterdir()] == ["cpu-quick.json"]  # model files gone

    contended = p["metadata"]["contention"]["contended_fraction"]
    if contended > 0.25:
        # Another process kept the CPU busy for most of the run: the samples
        # are flagged and excluded, the profile stays valid, but the fits are
        # not held to the linearity bar (see metadata.contention).
        pytest.skip(f"{contended:.0%} of the samples were taken while other processes "
                    "used the CPU; R^2 not asserted")
    noisy = too_noisy(neighbours)
    if wall >= 300 and noisy:
        pytest.xfail(f"{noisy}; --quick took {wall:.0f} s")
    assert wall < 300, f"--quick took {wall:.0f} s"
    # A copy's speed on this shared machine depends on where its pages land: one size's
    # repeats agree within 1-3%, but from one size's files to the next the speed moves by
    # +-10-15%, and now and then a size is measured while the host is slow for seconds.
    # A path whose fit misses is measured again (the load paths only, on new files), up to
    # twice; its latest fit must hold. A path that is not linear in the size misses every
    # time.
    for attempt in (2, 3):
        bad = [path for path in CPU_PATHS if p["fits"]["load"][path]["r2"] < 0.9]
        if not bad:
            break
        print(f"\nload fits below R^2 0.9 (measurement {attempt - 1}): "
              + ", ".join(f"{b} {p['fits']['load'][b]['r2']:.3f}" for b in bad) + "; measuring the loads again")
        again = tmp_path / f"again{attempt}.json"
        r = subprocess.run([sys.executable, "-m", "calibration", "run", "--device", "cpu", "--quick",
                            "--sections", "loads", "--out", str(again)],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        second = prof.load(again)
        for b in bad:      # the paths that held keep their fit
            p["fits"]["load"][b] = second["fits"]["load"][b]
            p["diagnostics"]["load"][b] = second["diagnostics"]["load"].get(b)
    bad = {path: p["fits"]["load"][path]["r2"] for path in CPU_PATHS if p["fits"]["load"][path]["r2"] < 0.9}
    if bad and (noisy := too_noisy(neighbours)):
        # the fits' scatter is the neighbours' (R^2 fell to 0.46 under a load average of 4 here)
        pytest.xfail(f"{noisy}; load fits below R^2 0.9 after 3 measurements: "
                     + ", ".join(f"{b} {r2:.2f}" for b, r2 in bad.items()))
    for path in CPU_PATHS:
        f = p["fits"]["load"][path]
        assert f["r2"] >= 0.9, (path, f, json.dumps(p["diagnostics"]["load"].get(path)))
        assert f["bandwidth_gbs"] > 0
    for fam in ("encoder", "decoder"):
        for label, f in p["fits"]["inference"][fam].items():
            assert f["slowdown"]["1"] == 1.0 and "2" in f["slowdown"]
            assert f["base_ms"] >= 0 and f["cv"] is not None
    assert p["fits"]["runtime"]["init_s"] > 0
