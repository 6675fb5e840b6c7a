"""Units of scenario files (README, Scenarios): durations in seconds, sizes in GB
(10^9 bytes), rates per second; a bare number is already in those units."""
from __future__ import annotations

import math

import pytest
from pydantic import TypeAdapter, ValidationError

from sim.scenario.units import Duration, Rate, Size, parse_duration, parse_rate, parse_size


@pytest.mark.parametrize("text,seconds", [
    ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0), ("1.5h", 5400.0),
    ("100us", 1e-4), ("10min", 600.0), ("2sec", 2.0), ("3hr", 10800.0), (".5s", 0.5), ("1e3ms", 1.0),
    (" 30 s ", 30.0), ("2H", 7200.0), ("90", 90.0), ("0s", 0.0),
    (45, 45.0), (2.5, 2.5), (0, 0.0),
])
def test_durations(text, seconds):
    got = parse_duration(text)
    assert isinstance(got, float)
    assert got == pytest.approx(seconds, rel=1e-12, abs=0)


@pytest.mark.parametrize("text,gb", [
    ("292MB", 0.292), ("1.5GB", 1.5), ("16GiB", 17.179869184), ("512MiB", 0.536870912), ("2TB", 2000.0),
    ("1TiB", 1099.511627776), ("1024KB", 0.001024), ("1KiB", 1.024e-6), ("1000000000B", 1.0),
    ("16gib", 17.179869184), ("40", 40.0), (40, 40.0), (1.3, 1.3), ("0.5 GB", 0.5),
])
def test_sizes(text, gb):
    got = parse_size(text)
    assert isinstance(got, float)
    assert got == pytest.approx(gb, rel=1e-12, abs=0)


@pytest.mark.parametrize("text,per_second", [
    ("20/s", 20.0), ("1200/min", 20.0), ("3/h", 3 / 3600), ("60/m", 1.0), ("86400/d", 1.0), ("7200/hr", 2.0),
    ("5/sec", 5.0), ("20 / s", 20.0), ("1200/MIN", 20.0), ("0/s", 0.0), ("5", 5.0), ("2.5", 2.5),
    (5, 5.0), (0.25, 0.25),
])
def test_rates(text, per_second):
    got = parse_rate(text)
    assert isinstance(got, float)
    assert got == pytest.approx(per_second, rel=1e-12, abs=0)


_PARSERS = {"duration": parse_duration, "size": parse_size, "rate": parse_rate}


@pytest.mark.parametrize("kind,value,fragment", [
    # negative
    ("duration", -1, "expected a non-negative duration, got -1"),
    ("duration", "-2s", "expected a non-negative duration, got '-2s'"),
    ("size", -0.5, "expected a non-negative size, got -0.5"),
    ("size", "-1GB", "expected a non-negative size, got '-1GB'"),
    ("rate", -5, "expected a non-negative rate, got -5"),
    ("rate", "-5/s", "expected a non-negative rate, got '-5/s'"),
    # not finite
    ("duration", math.nan, "expected a finite duration, got nan"),
    ("duration", math.inf, "expected a finite duration, got inf"),
    ("duration", "1e999s", "expected a finite duration, got '1e999s'"),
    ("size", math.inf, "expected a finite size, got inf"),
    ("size", -math.inf, "expected a finite size, got -inf"),
    ("rate", math.nan, "expected a finite rate, got nan"),
    ("rate", "1e999/s", "expected a finite rate, got '1e999/s'"),
    ("duration", "nan", "expected a duration such as 250ms, 30s, 5m, 2h or 1d, got 'nan'"),
    ("rate", "inf", "expected a rate such as 20/s, 1200/min or 3/h, got 'inf'"),
    # booleans are not numbers here
    ("duration", True, "expected a duration such as 250ms, 30s, 5m, 2h or 1d, got True"),
    ("size", False, "expected a size such as 292MB, 1.5GB or 16GiB, got False"),
    ("rate", True, "expected a rate such as 20/s, 1200/min or 3/h, got True"),
    # unknown units and other junk
    ("duration", "5 parsecs", "expected a duration such as 250ms, 30s, 5m, 2h or 1d, got '5 parsecs'"),
    ("duration", "30 minutes", "got '30 minutes'"),
    ("size", "5 parsecs", "expected a size such as 292MB, 1.5GB or 16GiB, got '5 parsecs'"),
    ("size", "3GBs", "got '3GBs'"),
    ("rate", "5 parsecs", "expected a rate such as 20/s, 1200/min or 3/h, got '5 parsecs'"),
    ("rate", "5/fortnight", "got '5/fortnight'"),
    ("rate", "20/s/s", "got '20/s/s'"),
    ("duration", "", "got ''"),
    ("duration", "ms", "got 'ms'"),
    ("duration", None, "got None"),
    ("size", [1], "got [1]"),
    ("rate", {"per": "s"}, "got {'per': 's'}"),
])
def test_rejections(kind, value, fragment):
    with pytest.raises(ValueError) as info:
        _PARSERS[kind](value)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("annotated,value,expected", [
    (Duration, "5m", 300.0), (Size, "16GiB", 17.179869184), (Rate, "1200/min", 20.0),
])
def test_annotated_types_in_pydantic(annotated, value, expected):
    adapter = TypeAdapter(annotated)
    assert adapter.validate_python(value) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValidationError, match="expected a non-negative"):
        adapter.validate_python("-" + value)


# -- bare numbers most likely meant in milliseconds (issue 22, item 2) ---------------------------------
def _bare_hints(**edits):
    """The unit warnings of a one-model scenario after ``edits`` (``key.path=value`` overrides)."""
    from sim.scenario.loader import apply_overrides, parse_scenario

    from conftest import sme

    d = sme(mean="20ms", duration=60.0)
    d = apply_overrides(d, [f"{k}={v}" for k, v in edits.items()])
    return [w for w in parse_scenario(d, source="s.yaml").warnings if "a bare number is in" in w]


@pytest.mark.parametrize("key,value,path,suggestion", [
    ("slo", "{p99: 2000}", "slo.p99", "did you mean 2000ms?"),
    ("slo", "{p50: 60}", "slo.p50", "did you mean 60ms?"),                   # at the threshold
    ("slo", "{tpot: 50}", "slo.tpot", "did you mean 50ms?"),
    ("slo", "{ttft: '1500'}", "slo.ttft", "did you mean 1500ms?"),           # a string without unit too
    ("models[0]", "{name: m, size_gb: 1, service: {base: 20, per_input_token: 0, per_output_token: 0}, "
     "tokens: {input: 10, output: 10}, traffic: {process: poisson, rate: 1}}", "models[0].service.base",
     "did you mean 20ms?"),
    ("models[0].service.mean", "30", "models[0].service.mean", "did you mean 30ms?"),
    ("models[0].service", "{dist: empirical, samples: [9.8, 10.4, 12]}", "models[0].service.samples",
     "the largest, 12, is 12 seconds"),
    ("endpoints[0].timeout", "60000", "endpoints[0].timeout", "did you mean 60000ms?"),
])
def test_bare_number_far_beyond_its_unit_warns(key, value, path, suggestion):
    hints = _bare_hints(**{key: value})
    assert len(hints) == 1 and hints[0].startswith(f"{path}: ") and suggestion in hints[0]
    assert "a bare number is in seconds" in hints[0]


@pytest.mark.parametrize("key,value", [
    ("slo", "{p99: 2000ms}"),          # a unit: never a warning
    ("slo", "{p99: 2s}"),
    ("slo", "{p99: 59}"),              # below the threshold (60 s)
    ("slo", "{tpot: 0.1}"),
    ("models[0].service.mean", "9.9"),
    ("models[0].service.mean", "'20000ms'"),
    ("endpoints[0].timeout", "600"),
    ("endpoints[0].timeout", "2h"),
])
def test_plausible_or_unit_bearing_numbers_do_not_warn(key, value):
    assert _bare_hints(**{key: value}) == []


def test_bare_number_warning_in_validate_and_run(tmp_path):
    import json

    import yaml
    from click.testing import CliRunner

    from sim.cli import main

    from conftest import sme

    p = tmp_path / "s.yaml"
    d = sme(rate=5.0, mean=0.02, duration=60.0)
    d["slo"] = {"p99": 2000}
    p.write_text(yaml.safe_dump(d))
    r = CliRunner().invoke(main, ["validate", str(p)], catch_exceptions=False)
    assert r.exit_code == 0 and "warning: slo.p99: 2000 is 33.3 minutes" in r.stderr
    r = CliRunner().invoke(main, ["run", str(p), "--out", str(tmp_path / "r"), "--no-plots"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "did you mean 2000ms?" in r.stderr
    assert any(w.startswith("slo.p99: ") for w in json.loads((tmp_path / "r" / "summary.json").read_text())["warnings"])
    # the SLO as written (2000 s) is what the run judged against
    assert "P99 <= 2000 s" in r.stdout


def test_shipped_scenarios_have_no_bare_number_warnings():
    from pathlib import Path

    from sim.scenario import load_scenario

    for f in sorted((Path(__file__).resolve().parents[1] / "scenarios").glob("*.yaml")):
        if f.name == "salesforce_plans.yaml":   # plans for compare --plans, not a scenario
            continue
        assert not [w for w in load_scenario(f).warnings if "a bare number is in" in w], f.name
