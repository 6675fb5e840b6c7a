"""Units of scenario files (DESIGN.md, schema v1): durations in seconds, sizes in GB
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
