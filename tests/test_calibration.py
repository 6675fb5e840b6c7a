"""Fast tests of the calibration harness (CPU only, well under a minute)."""
from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calibration import fit, harness, loads, models  # noqa: E402
from calibration import profile as prof  # noqa: E402
from calibration import run as runmod  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAL = ROOT / "calibration"


# --------------------------------------------------------------------- fits
def test_fit_load_recovers_a_and_bandwidth_with_noise_and_outlier():
    rng = np.random.default_rng(7)
    a_true, bw_true = 0.012, 2.5               # s, GB/s
    sizes = np.repeat(np.geomspace(0.02, 0.4, 8), 4)
    t = (a_true + sizes / bw_true) * (1 + 0.03 * rng.standard_normal(sizes.size))
    t[5] *= 6.0                                 # a neighbour's burst
    t[-1] *= 0.3                                # and a too-fast one
    f = fit.fit_load(sizes, t)
    # tolerance: bandwidth within 5 %, intercept within 3 ms
    assert f["bandwidth_gbs"] == pytest.approx(bw_true, rel=0.05)
    assert f["a_s"] == pytest.approx(a_true, abs=0.003)
    assert f["r2"] > 0.99
    assert f["n"] == sizes.size


def test_fit_load_of_sub_millisecond_loads_with_no_intercept():
    # small files load in well under a millisecond and the size explains all of
    # it: the starting intercept (Theil-Sen's, negative) is lifted onto the fit's
    # bounds however small the times, and the fit finds the bandwidth
    sizes = np.repeat([0.0012, 0.004], 3)          # 0.3M and 1M parameters in GB
    t = sizes / 2.5 * np.array([1.0, 1.05, 0.95, 1.0, 1.05, 0.95]) - 2e-5
    f = fit.fit_load(sizes, t)
    assert f["success"]
    # tolerance: 2.5 GB/s within 10 % (3 % noise, an intercept held at zero)
    assert f["bandwidth_gbs"] == pytest.approx(2.5, rel=0.1)


def test_fit_service_recovers_decoder_coefficients():
    rng = np.random.default_rng(3)
    ins, outs = np.meshgrid([16, 64, 256, 512], [1, 8, 32])
    X = np.stack([ins.ravel(), outs.ravel()], 1).repeat(3, 0)
    y = (4.0 + 0.05 * X[:, 0] + 2.0 * X[:, 1]) * (1 + 0.02 * rng.standard_normal(len(X)))
    y[2] *= 10
    f = fit.fit_service(X, y, ["per_input_token_ms", "per_output_token_ms"])
    assert f["base_ms"] == pytest.approx(4.0, abs=1.0)
    assert f["per_input_token_ms"] == pytest.approx(0.05, rel=0.1)
    assert f["per_output_token_ms"] == pytest.approx(2.0, rel=0.05)
    assert f["r2"] > 0.98


def test_robust_summary_flags_iqr_outliers():
    s = harness.robust_summary([1.0, 1.1, 0.9, 1.05, 0.95, 9.0])
    assert s["outliers"] == [5]
    assert s["median"] == pytest.approx(1.025)
    assert harness.cv([1.0, 1.1, 0.9, 1.05, 0.95, 9.0]) < 0.1


def test_measure_stops_and_keeps_raw_samples():
    m = harness.measure(lambda: sum(range(1000)), harness.Policy.quick())
    d = m.to_dict()
    assert d["n"] >= 3 and len(d["samples"]) >= 3 and d["stop"]
    assert d["median"] > 0 and len(d["warmup"]) == 1


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("label", ["5M", "50M", "1.3B"])
def test_shapes_hit_the_target(label):
    for fam in models.FAMILIES:
        s = models.shape_for(fam, models.parse_size(label))
        assert abs(s["params"] - models.parse_size(label)) / models.parse_size(label) < 0.15


def test_parse_size():
    assert models.parse_size("1.3B") == 1_300_000_000
    assert models.parse_size("50M") == 50_000_000
    with pytest.raises(ValueError):
        models.parse_size("fifty")


def test_decoder_incremental_decode_matches_full_pass():
    torch.manual_seed(0)
    s = models.shape_for("decoder", models.parse_size("1M"))
    m = models.build(s)
    assert models.count_params(m) == s["params"]
    ids = models.random_ids(2, 12)
    with torch.inference_mode():
        gen = m.generate(ids, 4)
        full = m(torch.cat([ids, gen[:, :3]], 1)).argmax(-1)
    assert torch.equal(full, gen[:, 3])


def test_page_cache_verdicts():
    ok = {"evict_call_ok": True, "resident_after_evict": 0.0, "cold_median_s": 0.2,
          "warm_median_s": 0.05, "cold_first_s": 0.2, "bytes": 1}
    assert loads.page_cache_verdict([ok], "ext4")["page_cache_eviction"] == "effective"
    bad = dict(ok, resident_after_evict=1.0)
    assert loads.page_cache_verdict([bad], "ext4")["page_cache_eviction"] == "ineffective"
    fast = dict(ok, cold_median_s=0.051)
    assert loads.page_cache_verdict([fast], "ext4")["page_cache_eviction"] == "ineffective"
    assert loads.page_cache_verdict([ok], "tmpfs")["page_cache_eviction"] == "unavailable"
    dev = dict(ok, cold_first_s=1.0)
    assert loads.page_cache_verdict([dev], "ext4")["device_cache_suspected"] is True


# ----------------------------------------------------------------- profile
def _profile(host="box-a", device="cuda", name="NVIDIA T4"):
    return {
        "schema": prof.SCHEMA,
        "metadata": {"host": host, "date": "2025-01-01T00:00:00+00:00", "device": device,
                     "device_name": name, "torch": "2.x", "python": "3.12"},
        "samples": {"load": {}},
        "fits": {
            "load": {"disk_to_host": {"a_s": 0.01, "bandwidth_gbs": 1.5, "r2": 0.99, "n": 12,
                                      "hw_limit_gbs": None},
                     "host_to_gpu_pinned": {"a_s": 0.001, "bandwidth_gbs": 11.0, "r2": 0.999,
                                            "n": 12, "hw_limit_gbs": 15.76}},
            "runtime": {"init_s": 2.5, "host_memory_gb": 1.2, "gpu_memory_gb": 0.4},
            "inference": {
                "decoder": {"50M": {"params": 51185920, "base_ms": 3.0,
                                    "per_input_token_ms": 0.05, "per_output_token_ms": 8.0,
                                    "cv": 0.04, "r2": 0.99,
                                    "slowdown": {"1": 1.0, "2": 1.3, "4": 2.1},
                                    "batch": {"1": 10.0, "4": 18.0}}},
                "encoder": {"50M": {"params": 49883520, "base_ms": 2.0, "per_token_ms": 0.1,
                                    "cv": 0.05, "r2": 0.98, "slowdown": {"1": 1.0},
                                    "batch": {"1": 5.0}}}},
        },
        "errors": [],
    }


def test_profile_round_trip(tmp_path):
    p = _profile()
    path = tmp_path / "p.json"
    prof.save(p, path)
    q = prof.load(path)
    assert q == json.loads(json.dumps(p))
    assert "runtime: init 2.50 s" in prof.summary(q)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


def test_profile_validation_errors_are_clear(tmp_path):
    p = _profile()
    p["schema"] = "capsim.profile/0"
    with pytest.raises(ValueError, match="schema"):
        prof.validate(p)
    p = _profile()
    del p["fits"]["load"]["disk_to_host"]["bandwidth_gbs"]
    del p["fits"]["inference"]["decoder"]["50M"]["per_output_token_ms"]
    with pytest.raises(ValueError) as e:
        prof.validate(p)
    assert "fits.load.disk_to_host.bandwidth_gbs" in str(e.value)
    assert "fits.inference.decoder.50M.per_output_token_ms" in str(e.value)
    p = _profile()
    p["fits"]["inference"]["encoder"]["50M"]["sustained"] = {"factor": 0.8, "time_constant_s": -1.0,
                                                             "rest_ratio": 1.0}
    with pytest.raises(ValueError, match=r"fits.inference.encoder.50M.sustained.time_constant_s: expected > 0"):
        prof.validate(p)
    p["fits"]["inference"]["encoder"]["50M"]["sustained"] = {"factor": 0.8, "time_constant_s": 1.0,
                                                             "rest_ratio": 1.0, "rest_time_constant_s": None}
    with pytest.raises(ValueError, match=r"sustained.rest_time_constant_s: expected a number, got null"):
        prof.validate(p)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        prof.load(bad)


def test_merge_refuses_different_hosts_unless_forced():
    a, b = _profile("box-a"), _profile("box-b")
    with pytest.raises(ValueError) as e:
        prof.merge(a, b)
    assert "box-a" in str(e.value) and "box-b" in str(e.value)
    m = prof.merge(a, b, force=True)
    assert len(m["metadata"]["merged_from"]) == 2
    c = copy.deepcopy(a)
    c["fits"]["inference"]["encoder"]["10M"] = dict(
        c["fits"]["inference"]["encoder"]["50M"], params=10_000_000)
    m = prof.merge(a, c)
    assert set(m["fits"]["inference"]["encoder"]) == {"50M", "10M"}


# ---------------------------------------------------------------- mini run
def _mini_cfg(tmp_path, **kw):
    cfg = dict(out=str(tmp_path / "mini.json"), device="cpu", quick=True,
               sizes=["0.3M", "1M", "2M"], infer_sizes=["0.3M"], families=["encoder"],
               concurrency=[1, 2], runtime_repeats=1, workdir=str(tmp_path / "work"),
               wait_budget_s=0.0, step_sizes=["1M"])
    cfg.update(kw)
    return runmod.Config(**cfg)


def test_mini_run_produces_a_valid_profile(tmp_path):
    logs = []
    p = runmod.run(_mini_cfg(tmp_path), log=logs.append)
    q = prof.load(tmp_path / "mini.json")
    assert q["fits"] == json.loads(json.dumps(p["fits"]))
    assert not q["errors"], q["errors"]
    for path in loads.CPU_PATHS:
        f = q["fits"]["load"][path]
        assert f["bandwidth_gbs"] > 0 and f["n"] >= 6 and f["hw_limit_gbs"] is None
    assert q["fits"]["runtime"]["init_s"] > 0
    assert q["fits"]["runtime"]["host_memory_gb"] > 0.01
    enc = q["fits"]["inference"]["encoder"]["0.3M"]
    assert set(enc["slowdown"]) == {"1", "2"} and enc["slowdown"]["1"] == 1.0
    assert enc["per_token_ms"] >= 0 and enc["batch"]
    assert "sustained" in enc and [r["n"] for r in p["samples"]["inference"]["encoder"]["0.3M"]["sustained"]["runs"]]
    assert q["metadata"]["page_cache_eviction"] in ("effective", "ineffective", "unavailable")
    step = q["fits"]["step"]["1M"]                   # the llama-like decoder's step time
    assert step["base"] > 0 and step["per_decode_seq"] >= 0 and step["r2"] is not None and step["n"] >= 20
    assert len(q["samples"]["step"]["1M"]["points"]) == step["n"]
    assert any(line.startswith("[2/") and "loads:" in line for line in logs)
    # model files are gone, the partial file too
    assert os.listdir(tmp_path / "work") == []
    assert not os.path.exists(runmod.partial_path(str(tmp_path / "mini.json")))


def test_interrupted_run_resumes_and_cleans_up(tmp_path, monkeypatch):
    real = runmod._run_step

    def boom(step, *a, **kw):
        if step.startswith("inference"):
            raise KeyboardInterrupt
        return real(step, *a, **kw)

    cfg = _mini_cfg(tmp_path, sections=["loads", "inference"], sizes=["0.3M", "1M"])
    monkeypatch.setattr(runmod, "_run_step", boom)
    with pytest.raises(KeyboardInterrupt):
        runmod.run(cfg, log=lambda m: None)
    part = runmod.partial_path(cfg.out)
    assert os.path.exists(part) and not os.path.exists(cfg.out)
    assert os.listdir(tmp_path / "work") == []          # model files removed
    assert json.load(open(part))["done"] == ["loads:1M", "loads:0.3M"]
    monkeypatch.setattr(runmod, "_run_step", real)
    logs = []
    p = runmod.run(_mini_cfg(tmp_path, sections=["loads", "inference"], sizes=["0.3M", "1M"]),
                   log=logs.append)
    assert sum("done earlier, skipped" in m for m in logs) == 2
    assert "encoder" in p["fits"]["inference"] and "disk_to_host" in p["fits"]["load"]


def test_oom_is_recorded_and_the_job_goes_on(tmp_path, monkeypatch):
    from calibration import inference
    real = inference.measure_model

    def oom(fam, label, *a, **kw):
        if label == "0.3M":
            raise MemoryError("simulated out of memory")
        return real(fam, label, *a, **kw)

    monkeypatch.setattr(inference, "measure_model", oom)
    cfg = _mini_cfg(tmp_path, sections=["inference"], infer_sizes=["0.3M", "0.5M"])
    p = runmod.run(cfg, log=lambda m: None)
    assert [e["kind"] for e in p["errors"]] == ["oom"]
    assert p["errors"][0]["step"] == "inference:encoder:0.3M"
    assert list(p["fits"]["inference"]["encoder"]) == ["0.5M"]
    prof.load(cfg.out)


# ------------------------------------------------------------ dependencies
FORBIDDEN = ("sim", "pandas", "pydantic", "simpy", "matplotlib", "yaml", "click")


def test_calibration_never_imports_sim_or_pandas():
    code = ("import sys, calibration, calibration.run, calibration.__main__, "
            "calibration.inference, calibration.loads\n"
            f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_calibration_imports_only_allowed_packages():
    allowed = {"torch", "numpy", "scipy", "safetensors", "calibration"}
    stdlib = set(sys.stdlib_module_names)
    for f in CAL.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                assert top in allowed or top in stdlib, f"{f.name} imports {n}"


def test_cli_validate(tmp_path):
    path = tmp_path / "p.json"
    prof.save(_profile(), path)
    r = subprocess.run([sys.executable, "-m", "calibration", "validate", str(path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "valid" in r.stdout
    path.write_text(json.dumps({"schema": "nope"}))
    r = subprocess.run([sys.executable, "-m", "calibration", "validate", str(path)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and "schema" in r.stderr
