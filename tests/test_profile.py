"""The simulator side of calibration: profiles drive service times, load speeds and
runtime memory; a profile from another GPU is transferred by a roofline model."""
from __future__ import annotations

import json

import numpy as np
import pytest

import sim
from sim.scenario import parse_scenario


def write_profile(path, *, device="cuda", device_name="NVIDIA A100-SXM4-40GB", host_gb=2.5, sustained=None):
    prof = {
        "schema": "capsim.profile/1",
        "metadata": {"host": "box", "device": device, "device_name": device_name},
        "samples": {},
        "fits": {
            "load": {"disk_to_host": {"a_s": 0.05, "bandwidth_gbs": 3.0, "r2": 0.99, "n": 5, "hw_limit_gbs": None},
                     "host_to_gpu_pinned": {"a_s": 0.01, "bandwidth_gbs": 20.0, "r2": 0.99, "n": 5,
                                            "hw_limit_gbs": 31.5}},
            "runtime": {"init_s": 2.0, "host_memory_gb": host_gb, "gpu_memory_gb": 0.5},
            "inference": {"decoder": {"7B": {"params": 7e9, "base_ms": 20.0, "per_input_token_ms": 0.1,
                                             "per_output_token_ms": 10.0, "cv": 0.05, "r2": 0.99,
                                             "slowdown": {"1": 1.0, "2": 1.3}, "sustained": sustained}}},
        },
    }
    path.write_text(json.dumps(prof))
    return path


def scenario(tmp_path, itype, service, profile="p.json"):
    return {
        "name": "prof", "seed": 1, "duration": 2000, "profile": profile,
        "models": [{"name": "llm", "size_gb": 14, "memory_gb": 16, "service": service,
                    "tokens": {"input": 500, "output": 100},
                    "traffic": {"process": "poisson", "rate": 0.5}}],
        "endpoints": [{"name": "e", "mode": "sme", "instance_type": itype, "instances": 4, "models": ["llm"]}],
    }


def test_service_times_follow_the_profile(tmp_path):
    write_profile(tmp_path / "p.json")
    sc = parse_scenario(scenario(tmp_path, "ml.p4d.24xlarge", {"family": "decoder", "params": "7B"}),
                        base_dir=tmp_path)
    assert not [w for w in sc.warnings if "roofline" in w]     # same GPU: no transfer
    res = sim.run(sc)
    svc = res.requests["service_ms"].to_numpy()
    expect = 20.0 + 0.1 * 500 + 10.0 * 100
    assert svc.mean() == pytest.approx(expect, rel=0.01)
    assert svc.std() / svc.mean() == pytest.approx(0.05, rel=0.2)
    # runtime memory from the profile is the default host memory of a model
    assert sc.models[0].host_memory_gb == 2.5
    # load speeds measured on the instance's GPU replace the catalog's
    ep = sc.endpoints[0]
    assert (ep.disk_gbs, ep.h2d_gbs, ep.load_overhead_s) == (3.0, 20.0, pytest.approx(0.06))


def test_roofline_transfer_scales_decode_by_bandwidth(tmp_path):
    write_profile(tmp_path / "p.json")
    sc = parse_scenario(scenario(tmp_path, "ml.g5.xlarge", {"family": "decoder", "params": "7B"}),
                        base_dir=tmp_path)
    a100, a10g = sc.catalog.gpus["A100-40GB"], sc.catalog.gpus["A10G"]
    svc = sc.models[0].service
    assert svc.per_output_token == pytest.approx(10.0e-3 * a100.memory_bandwidth_gbs / a10g.memory_bandwidth_gbs)
    flops = a100.bf16_tflops / (a10g.bf16_tflops or a10g.fp16_tflops)
    assert svc.per_input_token == pytest.approx(0.1e-3 * flops)
    assert any("roofline" in w and "A10G" in w for w in sc.warnings)
    # the warning reaches summary.json
    res = sim.run(sc)
    assert any("roofline" in w for w in res.summary["warnings"])


def test_unmeasured_size_scales_by_parameters_and_cpu_profiles_are_not_transferred(tmp_path):
    write_profile(tmp_path / "p.json", device="cpu", device_name="Intel Xeon")
    sc = parse_scenario(scenario(tmp_path, "ml.g5.xlarge", {"family": "decoder", "params": "14B"}),
                        base_dir=tmp_path)
    assert sc.models[0].service.per_output_token == pytest.approx(20.0e-3)
    assert any("not measured" in w for w in sc.warnings)
    assert any("unchanged" in w for w in sc.warnings)
    assert sc.endpoints[0].disk_gbs is None      # a CPU box's disk says nothing of the instance's


def test_the_profiles_sustained_speed_reaches_the_service(tmp_path):
    write_profile(tmp_path / "p.json", sustained={"factor": 1.1, "time_constant_s": 30.0, "rest_ratio": 0.95})
    calibrated = {"family": "decoder", "params": "7B"}
    svc = parse_scenario(scenario(tmp_path, "ml.p4d.24xlarge", calibrated), base_dir=tmp_path).models[0].service
    # the fit's terms scaled to the times at rest, which the factor then scales along busy periods
    assert (svc.sustained.factor, svc.sustained.time_constant, svc.sustained.rest_time_constant) == (1.1, 30.0, None)
    assert (svc.base, svc.per_output_token) == (pytest.approx(0.95 * 20e-3), pytest.approx(0.95 * 10e-3))
    # with the rest samples' fit, its rest time constant too
    write_profile(tmp_path / "rest.json", sustained={"factor": 1.1, "time_constant_s": 30.0, "rest_ratio": 0.95,
                                                    "rest_time_constant_s": 0.04})
    svc = parse_scenario(scenario(tmp_path, "ml.p4d.24xlarge", calibrated, profile="rest.json"),
                         base_dir=tmp_path).models[0].service
    assert svc.sustained.rest_time_constant == 0.04
    # a scenario's own sustained speed applies to the fit's terms as they are
    own = dict(calibrated, sustained={"factor": 0.9, "time_constant": "2s"})
    svc = parse_scenario(scenario(tmp_path, "ml.p4d.24xlarge", own), base_dir=tmp_path).models[0].service
    assert (svc.sustained.factor, svc.base) == (0.9, pytest.approx(20e-3))
    # another GPU: the measured GPU's clocks say nothing of it
    sc = parse_scenario(scenario(tmp_path, "ml.g5.xlarge", calibrated), base_dir=tmp_path)
    assert sc.models[0].service.sustained is None
    assert any("not carried over" in w for w in sc.warnings)


def test_profile_errors_are_clear(tmp_path):
    with pytest.raises(sim.ScenarioError, match="profile not found"):
        parse_scenario(scenario(tmp_path, "ml.g5.xlarge", {"family": "decoder", "params": "7B"}), base_dir=tmp_path)
    write_profile(tmp_path / "p.json")
    with pytest.raises(sim.ScenarioError, match="no inference fits for family 'encoder'"):
        parse_scenario(scenario(tmp_path, "ml.g5.xlarge", {"family": "encoder", "params": "7B"}), base_dir=tmp_path)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(sim.ScenarioError, match="not a calibration profile"):
        parse_scenario(scenario(tmp_path, "ml.g5.xlarge", {"family": "decoder", "params": "7B"}, profile="bad.json"),
                       base_dir=tmp_path)


def test_the_shipped_cpu_profile_drives_a_scenario():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    d = {
        "name": "cpu-profile", "seed": 2, "duration": 600, "profile": "profiles/cpu-quick.json",
        "models": [{"name": "tiny-gpt", "size_gb": 0.1, "accelerators": 0,
                    "service": {"family": "decoder", "params": "25M"},
                    "tokens": {"input": 64, "output": 16},
                    "traffic": {"process": "poisson", "rate": 1}}],
        "endpoints": [{"name": "cpu", "mode": "sme", "instance_type": "ml.c5.2xlarge", "instances": 2,
                       "models": ["tiny-gpt"]}],
    }
    sc = parse_scenario(d, base_dir=root / "scenarios")
    prof = json.loads((root / "scenarios" / "profiles" / "cpu-quick.json").read_text())
    fit = prof["fits"]["inference"]["decoder"]["25M"]
    expect = fit["base_ms"] + 64 * fit["per_input_token_ms"] + 16 * fit["per_output_token_ms"]
    res = sim.run(sc)
    assert res.requests["service_ms"].mean() == pytest.approx(expect, rel=0.05)
    assert sc.models[0].host_memory_gb == pytest.approx(prof["fits"]["runtime"]["host_memory_gb"])


@pytest.mark.parametrize("device_name, memory_gb, gpu", [
    ("NVIDIA A100-SXM4-80GB", 85.1, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", 42.4, "A100-40GB"),
    ("NVIDIA A100-PCIE", 85.1, "A100-80GB"),      # no memory in the name: the nearest memory
    ("NVIDIA A100-PCIE", None, "A100-40GB"),      # nothing to tell them apart: the first listed
    ("NVIDIA L40S", 48.3, "L40S"),
    ("NVIDIA L4", 23.7, "L4"),
    ("Tesla T4", 15.8, "T4"),
    ("NVIDIA H100 80GB HBM3", 85.0, "H100"),
    ("NVIDIA GeForce RTX 4090", 25.4, None),
])
def test_a_cuda_profile_names_the_catalog_gpu_it_was_measured_on(device_name, memory_gb, gpu):
    from sim.catalog import load_catalog
    from sim.profile import device_gpu

    meta = {"device": "cuda", "device_name": device_name, "gpu_memory_gb": memory_gb}
    got = device_gpu({"metadata": meta}, load_catalog())
    assert (got.name if got else None) == gpu
