"""Bad scenario files: one clear paragraph naming the file, the key path and what
was expected, exit code 2 from the CLI, and never a Python traceback.

Each file in tests/data/bad/ is a copy of tests/data/bad/valid_base.yaml with one
thing broken. The CLI runs as a real subprocess (``python -m sim.cli``); all the
subprocesses start at once in a module fixture so the file stays fast.
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import sim
from conftest import sme
from sim.scenario import ScenarioError, parse_scenario

REPO = Path(__file__).resolve().parents[1]
BAD = "tests/data/bad"  # relative to REPO: the CLI and the API both run there
BASE = f"{BAD}/valid_base.yaml"
MISSING = f"{BAD}/no_such_scenario.yaml"  # the missing-file case: deliberately not there

# (file, key path the message must name or None, fragments the message must contain)
CASES = [
    ("unknown_instance_type", "endpoints[0].instance_type",
     ["unknown instance type 'ml.g5.xlarg'", "(did you mean ml.g5.xlarge?)"]),
    ("negative_rate", "models[0].traffic.rate", ["expected a non-negative rate, got '-5/s'"]),
    ("bad_duration_unit", "duration",
     ["expected a duration such as 250ms, 30s, 5m, 2h or 1d, got '30 minutes'"]),
    ("bad_mean_unit", "models[0].service.mean", ["expected a duration such as", "got '40 parsecs'"]),
    ("unknown_mode", "endpoints[0].mode",
     ["unknown value 'mmx'", "(did you mean mme?)", "expected 'sme', 'mme' or 'ic'"]),
    ("model_too_large", "endpoints[0].instance_type",
     ["model 'classifier' needs 40 GB of GPU memory", "ml.g4dn.xlarge offer 16 GB", "choose a larger instance type"]),
    ("zero_instances", "endpoints[0].instances", ["an sme endpoint needs at least 1 instance"]),
    ("unknown_key", "endpoints[0].instnces",
     ["unknown key 'instnces'", "(did you mean instances?)", "expected one of name, mode, instance_type"]),
    ("yaml_bad_indent", "line 9, column 14", ["YAML syntax error", "mapping values are not allowed here"]),
    ("yaml_unclosed_bracket", "line 20, column 1",
     ["YAML syntax error", "expected ',' or ']'", "flow sequence started at line 19, column 13"]),
    ("empty", None, ["the file is empty", "expected a scenario with name, duration, models and endpoints"]),
    ("unknown_model_in_endpoint", "endpoints[0].models[0]",
     ["no model matches 'clasifier'", "(did you mean classifier?)"]),
    ("unknown_routing", "endpoints[0].routing",
     ["unknown routing policy 'least_outstanding'", "(did you mean least_outstanding_requests?)",
      "expected one of random, round_robin, least_outstanding_requests, power_of_two"]),
    ("token_service_without_tokens", "models[0].service",
     ["a token-based service needs token counts", "tokens: {input: N, output: M}"]),
    ("popularity_weights_length", "models[0].traffic.popularity", ["popularity.weights has 2 entries for 3 models"]),
    ("gamma_without_cv", "models[0].traffic", ["process 'gamma' needs cv"]),
    ("missing_trace", "models[0].traffic.path",
     ["trace file not found", "no-such-trace.csv", "relative to the scenario file"]),
    ("duplicate_model_names", "models[1].name", ["duplicate model name 'classifier' (also models[0])"]),
    ("model_on_two_endpoints", "endpoints[1].models",
     ["model 'classifier' is already served by endpoint 'classifier'"]),
    (None, None, ["file not found", "expected the path of a scenario YAML file"]),  # missing file
]
IDS = [c[0] or "missing_file" for c in CASES]
RUN_CASES = ["unknown_instance_type", "negative_rate", "missing_trace", "yaml_unclosed_bracket", None]

# --set through the CLI: (overrides, source the message names, key path, fragments)
SET_CASES = [
    (["endpoints.nosuch.instances=2"], f"{BASE} (--set)", "endpoints.nosuch",
     ["no list item named 'nosuch'", "expected an index or one of the names classifier"]),
    (["endpoints.clasifier.instances=2"], f"{BASE} (--set)", "endpoints.clasifier",
     ["no list item named 'clasifier'", "(did you mean classifier?)"]),
    (["endpoints[3].instances=2"], f"{BASE} (--set)", "endpoints[3]",
     ["index 3 out of range (the list has 1 items)"]),
    (["modles[0].size_gb=2"], f"{BASE} (--set)", "modles",
     ["no key 'modles' to descend into", "(did you mean models?)"]),
    (["seed.x=1"], f"{BASE} (--set)", "seed.x", ["cannot set a key inside a scalar"]),
    (["endpoints[0].instances"], f"{BASE} (--set)", None,
     ["expected key.path=value, got 'endpoints[0].instances'"]),
    # a value that parses but breaks the schema: the message names the file and the key it set
    (["models[0].traffic.rate=-1/s"], BASE, "models[0].traffic.rate", ["expected a non-negative rate, got '-1/s'"]),
    (["endpoints[0].instnces=3"], BASE, "endpoints[0].instnces", ["(did you mean instances?)"]),
    (["endpoints[0].instances=two"], BASE, "endpoints[0].instances",
     ["expected a number or a mapping with keys initial, min, max, got 'two'"]),
    (["seed=1.5"], BASE, "seed", ["expected a whole number, got 1.5"]),
    (["models[0].traffic={process: diurnal, rate: 20/s, period: 0s}"], BASE, "models[0].traffic.period",
     ["expected a duration of at least 1ms (a period that drives events), got '0s'"]),
    (["models[0].traffic={process: mmpp, rate: 20/s, mean_on: 0s, mean_off: 1s}"], BASE, "models[0].traffic.mean_on",
     ["expected a duration of at least 1ms"]),
    (["endpoints[0].failures={events: [{at: 10s, instance: 2}]}"], BASE, "endpoints[0]",
     ["failures.events[0].instance: 2 is not an index of the endpoint's instances in service (0 to 1 at most)"]),
    (["endpoints[0].failures={events: [{at: 10s, zone: 1}]}"], BASE, "endpoints[0]",
     ["failures.events[0].zone: 1 is not one of the endpoint's zones (0 to 0"]),
    (["instance_types=[{name: x.gpu, gpus: 1, gpu_memory_gb: 24, vcpus: 4, memory_gb: 16, price_per_hour: 1},"
      " {name: x.gpu, gpus: 1, gpu_memory_gb: 24, vcpus: 4, memory_gb: 16, price_per_hour: 2}]"], BASE,
     "instance_types[1].name", ["duplicate instance type name 'x.gpu' (also instance_types[0])"]),
]
SET_IDS = [s[0][0][:60] for s in SET_CASES]


def _path(name: str | None) -> str:
    return MISSING if name is None else f"{BAD}/{name}.yaml"


def _cli(*args: str) -> dict:
    """``capsim ARGS`` in a fresh Python process: {rc, stdout, stderr}."""
    proc = subprocess.run([sys.executable, "-m", "sim.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    return {"rc": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


# Starting Python and importing sim takes about a second of CPU, so most cases share
# one process that calls the CLI's ``main`` once per case, as ``python -m sim.cli``
# would, and prints a traceback for anything that escapes. test_batch_matches_real_process
# checks that it answers exactly as separate processes do.
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


def _cli_batch(calls: list[tuple[str, ...]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _BATCH], cwd=REPO, input=json.dumps(calls), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


# the calls that also run as a process of their own
REAL = [("validate", "unknown_instance_type"), ("validate", "yaml_unclosed_bracket"), ("validate", None),
        ("run", "negative_rate"), ("run", "missing_trace"), ("set", ("endpoints.nosuch.instances=2",)),
        ("ok", "base")]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every CLI call of this file: {key: {rc, stdout, stderr}}, plus "real": the same for REAL."""
    out = tmp_path_factory.mktemp("results")
    jobs = {("validate", c[0]): ("validate", _path(c[0])) for c in CASES}
    jobs.update({("run", name): ("run", _path(name), "--out", str(out / (name or "missing")), "--no-plots")
                 for name in RUN_CASES})
    jobs.update({("set", tuple(s[0])): ("validate", BASE, *[a for o in s[0] for a in ("--set", o)])
                 for s in SET_CASES})
    jobs[("ok", "base")] = ("validate", BASE)
    jobs[("ok", "set")] = ("validate", BASE, "--set", "endpoints[0].instances=3")
    keys = list(jobs)
    with ThreadPoolExecutor(max_workers=4) as pool:
        batch = pool.submit(_cli_batch, [jobs[k] for k in keys])
        real = {k: pool.submit(_cli, *jobs[k]) for k in REAL}
        results = dict(zip(keys, batch.result()))
        results["real"] = {k: f.result() for k, f in real.items()}
    results["out"] = out
    return results


def _check_paragraph(res: dict, source: str, key: str | None, fragments: list[str]) -> str:
    err = res["stderr"]
    assert res["rc"] == 2, (res["rc"], res["stdout"], err)
    assert "Traceback" not in err, err
    assert res["stdout"] == "", res["stdout"]
    text = err.strip()
    lines = text.splitlines()
    assert 1 <= len(lines) <= 3 and all(line.strip() for line in lines), f"not one paragraph:\n{err}"
    assert text.startswith("error: "), err
    prefix = f"error: {source}: " + (f"{key}: " if key else "")
    assert text.startswith(prefix), f"expected the message to start with {prefix!r}:\n{err}"
    assert Path(source.split(" ")[0]).name in text
    for frag in fragments:
        assert frag in text, f"{frag!r} not in:\n{err}"
    return text


def test_base_scenario_is_valid(cli):
    """The files below fail only because of the one thing each breaks."""
    res = cli[("ok", "base")]
    assert res["rc"] == 0, res["stderr"]
    assert "ok (1 models, 1 endpoints" in res["stdout"]
    sc = sim.load_scenario(REPO / BASE)
    assert sc.endpoints[0].instances.start == 2


def test_every_bad_file_has_a_case():
    files = {p.stem for p in (REPO / BAD).glob("*.yaml")} - {"valid_base"}
    assert files == {c[0] for c in CASES if c[0]}
    assert not (REPO / MISSING).exists()


@pytest.mark.parametrize("key", REAL, ids=[f"{k[0]}-{k[1]}" for k in REAL])
def test_batch_matches_real_process(cli, key):
    """``python -m sim.cli`` in a process of its own: exit code 2, the same paragraph, no traceback."""
    real = cli["real"][key]
    if key[0] != "ok":
        assert real["rc"] == 2 and "Traceback" not in real["stderr"], real
    assert real == cli[key]


@pytest.mark.parametrize("name,key,fragments", CASES, ids=IDS)
def test_validate_reports_one_paragraph(cli, name, key, fragments):
    _check_paragraph(cli[("validate", name)], _path(name), key, fragments)


@pytest.mark.parametrize("name", RUN_CASES, ids=[n or "missing_file" for n in RUN_CASES])
def test_run_reports_the_same_error(cli, name):
    key, fragments = next((c[1], c[2]) for c in CASES if c[0] == name)
    text = _check_paragraph(cli[("run", name)], _path(name), key, fragments)
    assert text == cli[("validate", name)]["stderr"].strip()
    assert not (cli["out"] / (name or "missing")).exists()  # nothing written


@pytest.mark.parametrize("name,key,fragments", CASES, ids=IDS)
def test_api_raises_the_same_message(cli, monkeypatch, name, key, fragments):
    monkeypatch.chdir(REPO)
    with pytest.raises(sim.ScenarioError) as info:
        sim.load_scenario(_path(name))
    assert f"error: {info.value}" == cli[("validate", name)]["stderr"].strip()
    assert info.value.source == _path(name)


@pytest.mark.parametrize("overrides,source,key,fragments", SET_CASES, ids=SET_IDS)
def test_set_errors(cli, monkeypatch, overrides, source, key, fragments):
    text = _check_paragraph(cli[("set", tuple(overrides))], source, key, fragments)
    monkeypatch.chdir(REPO)
    with pytest.raises(sim.ScenarioError) as info:
        sim.load_scenario(BASE, overrides=overrides)
    assert f"error: {info.value}" == text


def test_set_takes_effect(cli):
    res = cli[("ok", "set")]
    assert res["rc"] == 0, res["stderr"]
    assert "ok (1 models, 1 endpoints" in res["stdout"]
    sc = sim.load_scenario(REPO / BASE, overrides=["endpoints[0].instances=3"])
    assert (sc.endpoints[0].instances.start, sc.endpoints[0].instances.lo, sc.endpoints[0].instances.hi) == (3, 3, 3)
    by_name = sim.load_scenario(REPO / BASE, overrides=["endpoints.classifier.instances={initial: 2, min: 1, max: 4}",
                                                        "models[0].traffic.rate=1200/min"])
    inst = by_name.endpoints[0].instances
    assert (inst.start, inst.lo, inst.hi) == (2, 1, 4)
    assert by_name.groups[0].traffic.rate == pytest.approx(20.0)
    # the file itself is untouched by an override
    assert sim.load_scenario(REPO / BASE).endpoints[0].instances.start == 2


def test_set_starts_a_mapping_the_file_leaves_out():
    """``--set slo.p99=1s`` on a scenario without ``slo`` (as compare's message suggests) starts the
    mapping; so do nested keys of a mapping left out. A name close to a key of the file is a typo
    (an error with the suggestion), and a key the schema does not know is refused by it."""
    sc = sim.load_scenario(REPO / BASE, overrides=["slo.p99=1s", "slo.ttft=200ms"])
    assert (sc.spec.slo.p99, sc.spec.slo.ttft) == (1.0, 0.2)
    with pytest.raises(sim.ScenarioError) as info:
        sim.load_scenario(REPO / BASE, overrides=["endpoints[0].autoscaling.target=5"])
    assert "endpoints[0].autoscaling.metric: missing required key" in str(info.value)
    with pytest.raises(sim.ScenarioError) as info:
        sim.load_scenario(REPO / BASE, overrides=["sloo.p99=1s"])
    assert "unknown key 'sloo' (did you mean slo?)" in str(info.value)
    with pytest.raises(sim.ScenarioError) as info:
        sim.load_scenario(REPO / BASE, overrides=["endpoints[0].autoscalin.target=5"])
    assert "(did you mean autoscaling?)" in str(info.value)


def test_empirical_service_errors_name_the_key():
    for bad, word in (({"dist": "empirical"}, "samples"), ({"dist": "empirical", "samples": []}, "samples"),
                      ({"dist": "empirical", "samples": ["10ms"], "mean": 0.01}, "mean and cv"),
                      ({"dist": "lognormal", "samples": [0.01], "mean": 0.01}, "samples need dist: empirical"),
                      ({"family": "encoder", "params": "8M", "dist": "empirical", "samples": [0.01]}, "samples"),
                      ({"family": "encoder", "params": "8M", "dist": "empirical"}, "dist cannot be empirical")):
        d = sme()
        d["models"][0]["service"] = bad
        with pytest.raises(ScenarioError) as e:
            parse_scenario(d, source="t.yaml")
        assert "t.yaml" in str(e.value) and "service" in str(e.value) and word in str(e.value)


def test_calibrated_params_errors_name_the_key(tmp_path):
    prof = REPO / "scenarios" / "profiles" / "cpu-quick.json"
    d = sme(instance_type="ml.c5.2xlarge", accelerators=0)
    d["models"][0]["service"] = {"profile": str(prof), "family": "encoder", "params": "lots"}
    d["models"][0]["tokens"] = {"input": 64}
    with pytest.raises(ScenarioError, match=r"models\[0\]\.service\.params: expected a parameter count"):
        parse_scenario(d, source="t.yaml")
    for none in (0, "0M", 0.5):   # no parameters: every term would scale to 0 ms
        d["models"][0]["service"]["params"] = none
        with pytest.raises(ScenarioError, match=r"models\[0\]\.service\.params: expected a parameter count of "
                                                r"at least 1"):
            parse_scenario(d, source="t.yaml")


def test_seed_and_output_errors_of_the_cli(tmp_path):
    for verb in (("run", BASE, "--out", str(tmp_path / "r")), ("trace", BASE, "--out", str(tmp_path / "a.csv"))):
        res = _cli(*verb, "--seed", "-3")
        assert res["rc"] == 2 and "Traceback" not in res["stderr"] and "--seed" in res["stderr"]
    # the scenario's own bound (seed: at most 2**63 - 1), so that a run's seed can be written back to a file
    res = _cli("run", BASE, "--out", str(tmp_path / "r"), "--seed", str(2 ** 63))
    assert res["rc"] == 2 and "--seed" in res["stderr"] and "9223372036854775807" in res["stderr"]
    # trace makes the folder it writes into; one it cannot make is a one-line error
    res = _cli("trace", BASE, "--out", str(tmp_path / "new" / "dir" / "a.csv"))
    assert res["rc"] == 0 and (tmp_path / "new" / "dir" / "a.csv").exists()
    (tmp_path / "file").write_text("")
    res = _cli("trace", BASE, "--out", str(tmp_path / "file" / "a.csv"))
    assert res["rc"] == 2 and "Traceback" not in res["stderr"] and "cannot write the arrivals" in res["stderr"]


def test_validate_reads_the_traces_a_run_replays(tmp_path):
    (tmp_path / "t.csv").write_text("time,model\n0.5,classifier\n")
    d = sme(traffic={"process": "trace", "path": "t.csv", "format": "csv"})
    import yaml
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(d))
    res = _cli("validate", str(tmp_path / "s.yaml"))
    assert res["rc"] == 2 and "Traceback" not in res["stderr"], res
    assert "models[0].traffic.path" in res["stderr"] and "arrival_s" in res["stderr"]


def test_a_gpu_model_on_a_cpu_instance_is_served_from_host_memory_with_a_warning():
    sc = parse_scenario(sme(instance_type="ml.c5.xlarge"), source="t.yaml")
    assert any("ml.c5.xlarge has no GPU: m (accelerators >= 1) are served from host memory" in w
               for w in sc.warnings)
    assert not parse_scenario(sme(instance_type="ml.c5.xlarge", accelerators=0), source="t.yaml").warnings


def test_duplicate_keys_zero_targets_and_no_op_steps_are_errors(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("name: a\nseed: 1\nname: b\n")
    with pytest.raises(ScenarioError, match=r"line 3, column 1: YAML syntax error: key 'name' appears twice"):
        sim.load_scenario(p)
    for key, value, words in (("slo", {"p99": 0}, "a latency target must be a duration > 0"),
                              ("autoscaling", {"metric": "invocations_per_instance", "target": 10, "period": "0s"},
                               r"autoscaling\.period: expected a duration of at least 1ms"),
                              ("autoscaling", {"policy": "step", "metric": "invocations_per_instance",
                                               "steps": [{"above": 10, "change": 0}]}, "change must not be 0"),
                              ("provisioning", {"dist": "exponential", "mean": "2m", "cv": 0.3},
                               "an exponential distribution has cv 1")):
        d = sme(instances={"initial": 1, "min": 1, "max": 3})
        (d if key == "slo" else d["endpoints"][0])[key] = value
        with pytest.raises(ScenarioError, match=words):
            parse_scenario(d, source="t.yaml")


def test_a_token_distribution_refuses_the_spread_its_dist_cannot_have():
    d = sme(instance_type="ml.g5.xlarge")
    d["models"][0]["service"] = {"base": "20ms", "per_output_token": "1ms"}
    d["models"][0]["tokens"] = {"input": 10, "output": {"dist": "exponential", "mean": 50, "cv": 3}}
    with pytest.raises(ScenarioError) as e:
        parse_scenario(d, source="t.yaml")
    # one problem, the distribution's, not the union's other member (a count)
    assert str(e.value).endswith("models[0].tokens.output: an exponential distribution has cv 1; use lognormal "
                                 "or gamma for another cv")
    assert parse_scenario(sme(), source="t.yaml").endpoints[0].spec.provisioning.cv == 0.3   # the default stands


@pytest.mark.parametrize("count", [3_000_000_000, "3000000000", -5, -5.0, 10**9 + 1])
def test_a_token_count_out_of_range_names_the_tokens_range(count):
    from sim.scenario.units import MAX_TOKENS

    d = sme(instance_type="ml.g5.xlarge")
    d["models"][0]["service"] = {"base": "20ms", "per_output_token": "1ms"}
    d["models"][0]["tokens"] = {"input": count, "output": 10}
    with pytest.raises(ScenarioError) as e:
        parse_scenario(d, source="t.yaml")
    assert f"models[0].tokens.input: expected a whole number of tokens between 0 and {MAX_TOKENS}" in str(e.value)
    assert "1000000000" not in str(e.value)


def test_an_sme_artifact_larger_than_the_volume_warns():
    """A 31 GB artifact on an ml.inf2.xlarge (a 30 GB volume): the warning names both; 30 GB does not warn."""
    d = sme(instance_type="ml.inf2.xlarge", duration=60.0)
    d["models"][0]["size_gb"] = 31
    w = [x for x in parse_scenario(d, source="t.yaml").warnings if "of disk" in x]
    assert len(w) == 1 and "31 GB" in w[0] and "30 GB" in w[0] and w[0].startswith("endpoints[0].instance_type")
    d["models"][0]["size_gb"] = 30
    assert not [x for x in parse_scenario(d, source="t.yaml").warnings if "of disk" in x]


def test_keys_their_process_or_policy_does_not_read_warn():
    """Keys the scenario accepts but its choice ignores are named in a warning each (a run goes on)."""
    d = sme(traffic={"process": "poisson", "rate": 20, "cv": 5, "think_time": 1})
    d["endpoints"][0].update(placement="spread", instances={"min": 1, "max": 2}, autoscaling={
        "metric": "invocations_per_instance", "policy": "step", "steps": [{"above": 100, "change": 1}],
        "target": 5, "scale_in_cooldown": 60})
    w = parse_scenario(d, source="t.yaml").warnings
    for key in ("models[0].traffic.cv", "models[0].traffic.think_time", "endpoints[0].placement",
                "endpoints[0].autoscaling.target", "endpoints[0].autoscaling.scale_in_cooldown"):
        assert sum(x.startswith(key + ":") for x in w) == 1, (key, w)
    d = sme(traffic={"process": "gamma", "rate": 20, "cv": 2})
    assert not [x for x in parse_scenario(d, source="t.yaml").warnings if "does not use" in x]


def test_schema_wording_and_a_group_named_by_its_entry():
    """pydantic's own wording is put as the rest of the messages ("expected ..."), and an endpoint that
    names a model entry with count > 1 is told its models' names."""
    for mutate, key, words in ((lambda d: d.update(models=5), "models", "expected a list, got 5"),
                               (lambda d: d.update(models=[]), "models", "expected at least 1 item, got 0"),
                               (lambda d: d.update(name="x" * 300), "name",
                                "expected at most 256 characters, got 300")):
        d = sme()
        mutate(d)
        with pytest.raises(ScenarioError) as e:
            parse_scenario(d, source="t.yaml")
        assert f"t.yaml: {key}: {words}" in str(e.value), str(e.value)
    d = sme()
    d["models"][0].update(name="m1", count=3)
    d["endpoints"][0].update(mode="mme", models=["m1"])
    with pytest.raises(ScenarioError, match=r"endpoints\[0\]\.models\[0\]: no model matches 'm1': its entry in "
                                            r"models has count 3, so its models are m1-0 \.\. m1-2; name them all "
                                            r"with m1-\*"):
        parse_scenario(d, source="t.yaml")
