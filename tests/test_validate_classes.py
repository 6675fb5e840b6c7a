"""`validate` checks all that `run` needs (issue 21, items 1, 6 and 7).

One test per class of bad input: numbers that are not finite or absurdly large, token counts
beyond int range, periods so short they hang a run, profiles and testbed files with bad fields,
and the inputs that used to escape as a Python traceback (deep YAML, odd keys, name patterns,
huge numbers, odd paths, odd trace files, files that are not regular files). Each answer is a
ScenarioError (the CLI's one paragraph, exit code 2) naming the file, the key and what was expected.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import sim
from conftest import sme
from sim.scenario import ScenarioError, parse_scenario

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "scenarios" / "profiles" / "cpu-quick.json"


def _refused(d: dict, *fragments: str) -> str:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(copy.deepcopy(d), source="t.yaml")
    text = str(info.value)
    assert text.startswith("t.yaml: "), text
    assert "\n" not in text, text
    for frag in fragments:
        assert frag in text, f"{frag!r} not in {text!r}"
    return text


def _at(d: dict, path: str, value) -> dict:
    """``d`` with ``path`` (``models.0.traffic.cv``) set to ``value``; missing mappings are made."""
    node = d
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for k in keys[:-1]:
        if isinstance(node, dict) and k not in node:
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value
    return d


def _gamma():
    return sme(traffic={"process": "gamma", "rate": 5.0, "cv": 2.0})


def _batching():
    d = sme()
    d["models"][0]["service"]["batching"] = {"slowdown": {2: 1.5}}
    return d


def _sustained():
    d = sme()
    d["models"][0]["service"]["sustained"] = {"factor": 0.9, "time_constant": "10s"}
    return d


def _diurnal():
    d = sme(traffic={"process": "diurnal", "rate": 5.0, "hourly_weights": [1.0] * 24})
    return d


INF, NAN = float("inf"), float("nan")

# (scenario maker, key path, bad value, the key path the message names)
NON_FINITE = [
    (_gamma, "models.0.traffic.cv", INF, "models[0].traffic.cv"),
    (lambda: sme(traffic={"process": "poisson", "rate": 5.0, "popularity": {"zipf": INF}}),
     None, None, "models[0].traffic"),
    (lambda: sme(traffic={"process": "poisson", "rate": 5.0, "popularity": {"weights": [INF]}}),
     None, None, "models[0].traffic"),
    (_diurnal, "models.0.traffic.hourly_weights.3", INF, "models[0].traffic.hourly_weights"),
    (sme, "instance_types.0.price_per_hour", INF, "instance_types[0].price_per_hour"),
    (sme, "instance_types.0.price_per_hour", NAN, "instance_types[0].price_per_hour"),
    (lambda: sme(dist="lognormal", cv=0.5), "models.0.service.cv", INF, "models[0].service.cv"),
    (_sustained, "models.0.service.sustained.factor", INF, "models[0].service.sustained.factor"),
    (sme, "models.0.traffic.rate_scale", NAN, "models[0].traffic.rate_scale"),
    (sme, "endpoints.0.cache", {"memory_fraction": NAN}, "endpoints[0].cache.memory_fraction"),
    (lambda: sme(instances={"min": 1, "max": 3}), "endpoints.0.autoscaling",
     {"metric": "invocations_per_instance", "target": INF}, "endpoints[0].autoscaling.target"),
    (_batching, "models.0.service.batching.slowdown.2", NAN, "models[0].service.batching.slowdown"),
    (sme, "models.0.traffic.rate", "1e400/s", "models[0].traffic.rate"),
    (sme, "models.0.size_gb", 1e300, "models[0].size_gb"),
    (sme, "duration", 1e300, "duration"),
]


@pytest.mark.parametrize("make,path,value,where", NON_FINITE, ids=[f"{w}={v!r}" for _, _, v, w in NON_FINITE])
def test_numbers_are_finite_and_sane(make, path, value, where):
    d = copy.deepcopy(make())
    if path:
        _at(d, path, value)
    _refused(d, where)


@pytest.mark.parametrize("cv", [1e-300, 1e200])
@pytest.mark.parametrize("where", ["service", "traffic"])
def test_gamma_cv_extremes_are_refused_not_crashes(where, cv):
    if where == "service":
        d = sme(dist="gamma", cv=cv, duration=10)
        key = "models[0].service.cv"
    else:
        d = sme(traffic={"process": "gamma", "rate": 5.0, "cv": cv}, duration=10)
        key = "models[0].traffic.cv"
    _refused(d, key, "cv")


def _token_scenario(tokens):
    d = sme(duration=10)
    d["models"][0]["service"] = {"base": "5ms", "per_input_token": "0.01ms", "per_output_token": "1ms"}
    d["models"][0]["tokens"] = tokens
    return d


@pytest.mark.parametrize("tokens,where", [
    ({"input": {"dist": "lognormal", "mean": INF, "cv": 0.5}, "output": 10}, "models[0].tokens.input"),
    ({"input": {"dist": "lognormal", "mean": 1e30, "cv": 0.5}, "output": 10}, "models[0].tokens.input"),
    ({"input": 10, "output": {"dist": "gamma", "mean": 50, "cv": INF}}, "models[0].tokens.output"),
    ({"input": 2 ** 63, "output": 10}, "models[0].tokens.input"),
    ({"input": 10 ** 400, "output": 10}, "models[0].tokens.input"),
])
def test_token_counts_stay_in_range(tokens, where):
    _refused(_token_scenario(tokens), where, "tokens")


def _write_scenario(tmp_path: Path, d: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("header,row", [
    ("arrival_s,input_tokens,output_tokens", f"1.0,{2 ** 63},5"),
    ("arrival_s,input_tokens,output_tokens", "1.0,5,1e30"),
])
def test_trace_token_counts_are_checked_before_a_cast(tmp_path, header, row):
    (tmp_path / "t.csv").write_text(f"{header}\n0.5,10,5\n{row}\n")
    d = _token_scenario(None)
    del d["models"][0]["tokens"]
    d["models"][0]["traffic"] = {"process": "trace", "path": "t.csv", "format": "csv"}
    p = _write_scenario(tmp_path, d)
    with pytest.raises(ScenarioError) as info:
        sc = sim.load_scenario(p)
        from sim.workload.build import check_traces
        check_traces(sc)
    assert "models[0].traffic.path" in str(info.value) and "line 3" in str(info.value), str(info.value)


def test_mooncake_token_counts_are_checked_before_a_cast(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"timestamp": 0, "input_length": 2 ** 63, "output_length": 3})
                                      + "\n")
    from sim.workload.traces import TraceError, read_trace

    with pytest.raises(TraceError, match="line 1"):
        read_trace(tmp_path / "t.jsonl", "mooncake")


# Periods that drive events: a floor of 1 ms
PERIODS = [
    (lambda: sme(routing="least_outstanding_requests"), "endpoints.0.routing_refresh", 1e-300,
     "endpoints[0].routing_refresh"),
    (lambda: sme(instances={"min": 1, "max": 3}), "endpoints.0.autoscaling",
     {"metric": "invocations_per_instance", "target": 10, "period": 1e-300}, "endpoints[0].autoscaling.period"),
    (lambda: sme(), "endpoints.0.failures", {"mtbf": 1e-300}, "endpoints[0].failures.mtbf"),
    (lambda: sme(), "models.0.traffic", {"process": "mmpp", "rate": 5, "mean_on": 1e-300, "mean_off": 1},
     "models[0].traffic"),
    (lambda: sme(), "models.0.traffic", {"process": "diurnal", "rate": 5, "period": "1us"}, "models[0].traffic"),
]


@pytest.mark.parametrize("make,path,value,where", PERIODS, ids=[p[3] for p in PERIODS])
def test_periods_that_drive_events_have_a_floor(make, path, value, where):
    _refused(_at(copy.deepcopy(make()), path, value), where, "1ms")


def test_prewarm_has_a_floor():
    d = sme()
    d["endpoints"][0]["mode"] = "mme"
    d["endpoints"][0]["prewarm"] = 1e-300
    _refused(d, "endpoints[0].prewarm", "1ms")


@pytest.mark.parametrize("rows,extra", [
    ("0.5\n", {}),                                  # one row: nothing to repeat
    ("0.5\n0.5\n", {}),                             # all at once
    ("0\n1e-300\n", {}),                            # a span of 1e-300 s
    ("0\n1\n", {"rate_scale": 1e6}),                # a 1 s span replayed a million times faster
])
def test_a_looped_trace_needs_a_period(tmp_path, rows, extra):
    (tmp_path / "t.csv").write_text("arrival_s\n" + rows)
    d = sme(duration=10, traffic={"process": "trace", "path": "t.csv", "format": "csv", "loop": True, **extra})
    p = _write_scenario(tmp_path, d)
    res = _cli("validate", str(p))
    assert res["rc"] == 2 and "Traceback" not in res["stderr"], res
    assert "models[0].traffic" in res["stderr"] and "loop" in res["stderr"], res


# -------------------------------------------------------------------------------------------- #
# 6. profiles and testbed runs
# -------------------------------------------------------------------------------------------- #
def _profile(tmp_path: Path, edit) -> Path:
    prof = json.loads(PROFILE.read_text())
    prof["metadata"].update(device="cuda", device_name="NVIDIA A10G")
    prof["fits"]["load"]["host_to_gpu_pinned"] = {"a_s": 0.001, "bandwidth_gbs": 12.0}
    edit(prof)
    p = tmp_path / "p.json"
    p.write_text(json.dumps(prof))
    return p


@pytest.mark.parametrize("edit,where", [
    (lambda p: p["fits"]["load"]["host_to_gpu_pinned"].update(bandwidth_gbs=-3.0),
     "fits.load.host_to_gpu_pinned.bandwidth_gbs"),
    (lambda p: p["fits"]["load"]["disk_to_host"].update(bandwidth_gbs="fast"), "fits.load.disk_to_host.bandwidth_gbs"),
    (lambda p: p["fits"]["load"]["disk_to_host"].update(a_s=-1), "fits.load.disk_to_host.a_s"),
    (lambda p: p["fits"]["runtime"].update(host_memory_gb=-1), "fits.runtime.host_memory_gb"),
    (lambda p: p["fits"]["inference"]["encoder"]["5M"].update(base_ms=float("nan")), "fits.inference.encoder.5M.base_ms"),
    (lambda p: p["fits"]["inference"]["encoder"]["5M"].update(slowdown={"2": 0}),
     "fits.inference.encoder.5M.slowdown"),
    (lambda p: p["fits"]["inference"]["encoder"]["5M"].update(slowdown={"1.5": 1.2}),
     "fits.inference.encoder.5M.slowdown"),
    (lambda p: p["fits"]["inference"]["encoder"]["5M"].update(slowdown={"0": 1.0}),
     "fits.inference.encoder.5M.slowdown"),
    (lambda p: p["fits"]["inference"]["encoder"].update({"5M": [1, 2]}), "fits.inference.encoder.5M"),
    (lambda p: p["fits"].update(load=[]), "fits.load"),
])
def test_profiles_are_validated_on_load(tmp_path, edit, where):
    path = _profile(tmp_path, edit)
    d = sme(instance_type="ml.g5.xlarge", profile=str(path))
    d["models"][0]["service"] = {"profile": str(path), "family": "encoder", "params": "5M"}
    d["models"][0]["tokens"] = {"input": 64}
    text = _refused(d, where, str(path))
    assert "expected" in text


def test_a_negative_bandwidth_no_longer_gives_negative_latencies(tmp_path):
    path = _profile(tmp_path, lambda p: p["fits"]["load"]["host_to_gpu_pinned"].update(bandwidth_gbs=-3.0))
    d = sme(instance_type="ml.g5.xlarge", profile=str(path))
    d["endpoints"][0]["mode"] = "mme"
    _refused(d, "profile", "bandwidth_gbs", "> 0")


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"schema": "capsim.testbed/1"}),
    json.dumps({"schema": "capsim.testbed/1", "plan": [1, 2]}),
    json.dumps({"schema": "capsim.testbed/1", "plan": {"name": "x", "models": "no"}, "requests": {}}),
    json.dumps([1, 2, 3]),
])
def test_fidelity_on_a_malformed_measured_file_is_one_paragraph(tmp_path, content):
    p = tmp_path / "measured.json"
    p.write_text(content)
    res = _cli("fidelity", str(p))
    assert res["rc"] == 2, res
    assert "Traceback" not in res["stderr"], res["stderr"]
    text = res["stderr"].strip()
    assert text.startswith("error: ") and str(p) in text and len(text.splitlines()) <= 3, text


# -------------------------------------------------------------------------------------------- #
# 7. the inputs that used to escape as tracebacks
# -------------------------------------------------------------------------------------------- #
def _cli(*args: str, timeout: float = 60) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sim.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


_BATCH = """
import contextlib, io, json, sys, traceback
from sim.cli import main
out = []
for args in json.load(sys.stdin):
    o, e, rc = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            main(args=args, prog_name="capsim")
        except SystemExit as x:
            rc = x.code if isinstance(x.code, int) else (0 if x.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    out.append({"rc": rc, "stdout": o.getvalue(), "stderr": e.getvalue()})
print(json.dumps(out))
"""

BASE = (REPO / "tests/data/bad/valid_base.yaml").read_text()


def _base_with(tmp: Path, name: str, text: str) -> str:
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return str(p)


def _traceback_cases(tmp: Path) -> dict[str, tuple[str, str | None]]:
    """{case: (scenario file, key path the message names or None)}."""
    base = yaml.safe_load(BASE)
    cases: dict[str, tuple[str, str | None]] = {}
    deep = "a:\n" + "".join("  " * (k + 1) + "a:\n" for k in range(600))
    cases["yaml_600_deep"] = (_base_with(tmp, "deep", deep), None)
    cases["yaml_600_deep_flow"] = (_base_with(tmp, "deepflow", "name: " + "[" * 600 + "]" * 600 + "\n"), None)
    cases["list_as_key"] = (_base_with(tmp, "listkey", "? [a, b]\n: 1\nname: x\n"), None)
    cases["mapping_as_key"] = (_base_with(tmp, "mapkey", "{a: 1}: 2\nname: x\n"), None)
    for k, pat in enumerate(("m-{i.foo}", "m-{i[0]}", "m-{i:>1000000000}", "m-{i!r:>99999999999}",
                             "m-{j}", "m-{0}", "m-{i:{i}}")):
        d = copy.deepcopy(base)
        d["models"][0]["name"] = pat
        d["models"][0]["count"] = 2
        d["endpoints"][0]["models"] = ["m-*"]
        cases[f"name_pattern_{k}"] = (_base_with(tmp, f"pattern{k}", yaml.safe_dump(d)), "models[0].name")
    for key in ("duration", "seed", "models[0].size_gb", "endpoints[0].instances", "models[0].count"):
        text = BASE
        d = copy.deepcopy(base)
        big = "9" * 400
        if key == "duration":
            d["duration"] = "__BIG__"
        elif key == "seed":
            d["seed"] = "__BIG__"
        elif key == "models[0].size_gb":
            d["models"][0]["size_gb"] = "__BIG__"
        elif key == "endpoints[0].instances":
            d["endpoints"][0]["instances"] = "__BIG__"
        else:
            d["models"][0]["count"] = "__BIG__"
        text = yaml.safe_dump(d).replace("__BIG__", big)
        cases[f"400_digits_{key}"] = (_base_with(tmp, f"big_{key.replace('[', '_').replace(']', '')}", text), key)
    (tmp / "loop1.csv").symlink_to(tmp / "loop2.csv")
    (tmp / "loop2.csv").symlink_to(tmp / "loop1.csv")
    for name, path in (("symlink_loop", "loop1.csv"), ("nul_in_path", "t\0.csv")):
        d = copy.deepcopy(base)
        d["models"][0]["traffic"] = {"process": "trace", "path": path, "format": "csv"}
        cases[f"trace_{name}"] = (_base_with(tmp, name, yaml.safe_dump(d)), "models[0].traffic.path")
    (tmp / "azure.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                   "2023-11-16 18:17:03.9799600+00:00,10,5\n"
                                   "2023-11-16 18:17:04.1000000+05:00,10,5\n"
                                   "2023-11-16 18:17:05.1000000,10,5\n")
    (tmp / "azure2.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                    "2023-11-16T18:17:03Z,10,5\n"
                                    "2023-11-16 18:17:04.1000000+05:00,10,5\n")
    (tmp / "deep.jsonl").write_text(json.dumps({"timestamp": 0, "input_length": 1, "output_length": 1}) + "\n"
                                    + '{"timestamp": 1, "input_length": 1, "output_length": 1, "x": '
                                    + "[" * 100000 + "]" * 100000 + "}\n")
    for name, path, fmt in (("azure_mixed_tz", "azure.csv", "azure_llm"), ("azure_mixed_tz2", "azure2.csv",
                                                                             "azure_llm"),
                            ("mooncake_deep", "deep.jsonl", "mooncake")):
        d = copy.deepcopy(base)
        d["models"][0]["traffic"] = {"process": "trace", "path": path, "format": fmt}
        d["models"][0]["service"] = {"base": "5ms", "per_output_token": "1ms"}
        cases[name] = (_base_with(tmp, name, yaml.safe_dump(d)), "models[0].traffic.path")
    cases["dev_zero"] = ("/dev/zero", None)
    cases["nul_in_scenario_path"] = (str(tmp / "s\0.yaml"), None)
    return cases


@pytest.fixture(scope="module")
def traceback_cases(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tb")
    cases = _traceback_cases(tmp)
    names = list(cases)
    calls = [("validate", cases[n][0]) for n in names]
    # each case in a process of its own memory limit: a case that once allocated without bound fails alone
    proc = subprocess.run([sys.executable, "-c", _BATCH], cwd=REPO, input=json.dumps(calls), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {n: (cases[n], r) for n, r in zip(names, json.loads(proc.stdout))}


TRACEBACK_CASES = ["yaml_600_deep", "yaml_600_deep_flow", "list_as_key", "mapping_as_key"] + \
    [f"name_pattern_{k}" for k in range(7)] + \
    [f"400_digits_{k}" for k in ("duration", "seed", "models[0].size_gb", "endpoints[0].instances",
                                 "models[0].count")] + \
    ["trace_symlink_loop", "trace_nul_in_path", "azure_mixed_tz", "azure_mixed_tz2", "mooncake_deep", "dev_zero",
     "nul_in_scenario_path"]


@pytest.mark.parametrize("name", TRACEBACK_CASES)
def test_former_tracebacks_are_one_paragraph(traceback_cases, name):
    (path, key), res = traceback_cases[name]
    err = res["stderr"]
    assert "Traceback" not in err, err[-3000:]
    assert res["rc"] == 2, res
    text = err.strip()
    assert text.startswith("error: "), text
    assert len(text.splitlines()) <= 3 and len(text) < 1500, text
    if "\0" not in path:
        assert path in text, text
    if key:
        assert key in text, text


def test_a_fifo_as_the_scenario_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "s.yaml"
    os.mkfifo(fifo)
    res = _cli("validate", str(fifo), timeout=60)
    assert res["rc"] == 2 and "Traceback" not in res["stderr"], res
    assert str(fifo) in res["stderr"] and "regular file" in res["stderr"], res


def test_an_oversized_scenario_file_is_refused(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text(BASE + "#" * (20 * 2 ** 20) + "\n")
    with pytest.raises(ScenarioError, match="larger than"):
        sim.load_scenario(p)


MERGED = """\
name: merged
duration: 1m
seed: 1
models:
  - &first
    name: a
    size_gb: 1
    service: {dist: exponential, mean: 50ms}
    traffic: {process: poisson, rate: 1/s}
  - <<: *first
    name: b
    size_gb: 2
endpoints:
  - name: e
    mode: mme
    instance_type: ml.g5.xlarge
    models: [a, b]
"""


def test_yaml_merge_keys_are_accepted_and_a_key_twice_refused(tmp_path):
    p = tmp_path / "merge.yaml"
    p.write_text(MERGED)
    sc = sim.load_scenario(p)
    assert [m.name for m in sc.models] == ["a", "b"]
    assert sc.models[1].size_gb == 2 and sc.models[1].service.mean == pytest.approx(0.05)
    # a merged mapping's own key twice is still an error
    p.write_text(MERGED.replace("    name: b\n", "    name: b\n    name: c\n", 1))
    with pytest.raises(ScenarioError, match="key 'name' appears twice"):
        sim.load_scenario(p)
    p.write_text(MERGED.replace("seed: 1\n", "seed: 1\nseed: 2\n", 1))
    with pytest.raises(ScenarioError, match="key 'seed' appears twice"):
        sim.load_scenario(p)
    # a list of merges
    p.write_text(MERGED.replace("<<: *first", "<<: [*first]", 1))
    assert [m.name for m in sim.load_scenario(p).models] == ["a", "b"]
