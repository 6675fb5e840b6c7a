"""Results as a unit (issue 21): a save is all or nothing, leaves no stale file, honours the umask,
reports an unwritable folder in one paragraph; a scenario's name is never a path."""
from __future__ import annotations

import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

import sim
from sim.cli import main
from sim.output import OutputError, safe_name

from conftest import run_dict, sme

REPO = Path(__file__).resolve().parents[1]
RUN_SET = {"summary.json", "requests.parquet", "timeline.csv"}


def _small(**kw) -> dict:
    d = sme(rate=5.0, mean=0.02, duration=60.0, instances=1, **kw)
    d["slo"] = {"p99": "1s"}
    return d


def _write(tmp_path: Path, d: dict, name: str = "s.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


# -- interrupted saves ---------------------------------------------------------------------------
SAVER = textwrap.dedent("""
    import sys, itertools
    import numpy as np, pandas as pd
    from sim.api import Result
    out, rows = sys.argv[1], int(sys.argv[2])
    base = pd.DataFrame({"request_id": np.arange(rows), "x": np.random.default_rng(0).random(rows)})
    for k in itertools.count(1):
        req = base.assign(marker=k)
        Result(None, {"marker": k}, req, pd.DataFrame({"t_s": [0.0], "marker": [k]})).save(out, plots=False)
        print(k, flush=True)
""")


def _check_complete(out: Path) -> int:
    """The folder holds one complete result set, all of one save; returns its marker."""
    names = set(os.listdir(out))
    assert names == RUN_SET, f"not one complete set: {sorted(names)}"
    k = json.loads((out / "summary.json").read_text())["marker"]
    req = pd.read_parquet(out / "requests.parquet", columns=["marker"])
    tl = pd.read_csv(out / "timeline.csv")
    assert set(req["marker"]) == {k} and set(tl["marker"]) == {k}, "files of different saves side by side"
    return k


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM], ids=["kill-9", "sigint", "sigterm"])
def test_a_save_killed_at_random_moments_leaves_one_complete_set(tmp_path, sig):
    out = tmp_path / "res"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(21 + int(sig))
    last = 0
    for attempt in range(4):
        p = subprocess.Popen([sys.executable, str(script), str(out), "400000"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env, text=True)
        try:
            first = p.stdout.readline()   # one save done: from here on a kill lands in the next save
            assert first.strip(), "the saver did not save"
            time.sleep(rng.uniform(0.0, 0.6))
            p.send_signal(sig)
            p.wait(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        k = _check_complete(out)
        assert k >= 1
        last = k
    # leftovers of a killed save (hidden, beside the folder) are removed by the next save there
    Result = sim.Result
    Result(None, {"marker": last + 1}, pd.DataFrame({"marker": [last + 1]}),
           pd.DataFrame({"t_s": [0.0], "marker": [last + 1]})).save(out, plots=False)
    assert _check_complete(out) == last + 1
    assert sorted(os.listdir(tmp_path)) == ["res", "saver.py"]


# -- stale files ------------------------------------------------------------------------------------
def test_a_run_without_plots_leaves_no_old_plots(tmp_path):
    res = run_dict(_small())
    out = tmp_path / "r"
    res.save(out)
    assert (out / "plots").is_dir()
    (out / "compare").mkdir()           # another verb's default subfolder: kept
    (out / "compare" / "compare.json").write_text("{}")
    res.save(out, plots=False)
    assert set(os.listdir(out)) == RUN_SET | {"compare"}
    assert (out / "compare" / "compare.json").read_text() == "{}"


def test_compare_with_fewer_plans_leaves_no_old_plan(tmp_path):
    path = _write(tmp_path, _small())
    out = tmp_path / "cmp"
    sim.compare(path, ["sme", "mme"], out=out)
    assert {"sme", "mme"} <= set(os.listdir(out / "runs"))
    sim.compare(path, ["sme"], out=out)
    assert os.listdir(out / "runs") == ["sme"]
    assert os.listdir(out / "plans") == ["sme.yaml"]
    assert set(json.loads((out / "compare.json").read_text())["plans"]) == {"sme"}


def test_a_folder_of_other_files_is_not_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="did not write"):
        run_dict(_small()).save(out, plots=False)
    assert os.listdir(out) == ["notes.txt"]


# -- modes and errors -------------------------------------------------------------------------------
def test_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        out = run_dict(_small()).save(tmp_path / "r", plots=False)
    finally:
        os.umask(old)
    for f in RUN_SET:
        assert stat.S_IMODE(os.stat(out / f).st_mode) == 0o644, f
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o755


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_disk_or_read_only_folder_is_one_clean_message(tmp_path, monkeypatch, code):
    res = run_dict(_small())
    out = tmp_path / "r"
    res.save(out, plots=False)
    before = {f: (out / f).read_bytes() for f in RUN_SET}

    def boom(self, path, *a, **k):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OutputError) as e:
        res.save(out, plots=False)
    msg = str(e.value)
    assert "\n" not in msg and str(out) in msg and ("space" in msg or "read-only" in msg)
    assert {f: (out / f).read_bytes() for f in RUN_SET} == before    # the old set, untouched
    assert sorted(os.listdir(tmp_path)) == ["r"]                      # no temporary folder left


def test_a_bad_out_is_one_line_from_the_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, _small())
    (tmp_path / "afile").write_text("")
    for out in ("afile/x", "."):
        rc, stdout, stderr = _cli("run", str(path), "--out", out, "--no-plots")
        assert rc == 2, (rc, stderr)
        assert "Traceback" not in stderr and stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
        assert not (tmp_path / "results").exists()


# -- names are not paths ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../../x", "/tmp/capsim-escape-x", "a/../../b", "..", "\n"])
def test_a_name_is_not_a_path(tmp_path, monkeypatch, name):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    d = _small()
    d["name"] = name
    path = _write(work, d)
    rc, _, stderr = _cli("run", str(path), "--no-plots")
    assert rc == 0, stderr
    made = [p for p in tmp_path.rglob("summary.json")]
    assert len(made) == 1 and made[0].parent.parent == work / "results", made
    assert not Path("/tmp/capsim-escape-x").exists()
    assert safe_name(name) and "/" not in safe_name(name) and not safe_name(name).startswith(".")


def test_a_name_with_a_newline_cannot_inject_keys_into_a_plan_file(tmp_path):
    d = _small()
    d["name"] = "fleet\nseed: 99\nduration: 1"
    path = _write(tmp_path, d)
    cmp = sim.compare(path, ["sme"], out=tmp_path / "cmp")
    plan = yaml.safe_load((tmp_path / "cmp" / "plans" / "sme.yaml").read_text())
    assert plan["seed"] == d["seed"] and plan["duration"] == d["duration"]
    assert plan["name"].startswith(d["name"])
    assert cmp.summary["plans"]["sme"]["scenario_file"] == "plans/sme.yaml"


def test_csv_text_is_to_csv_to_the_byte():
    """timeline.csv's fast writer gives pandas' to_csv text exactly: floats as their shortest repr, -0.0
    apart from 0.0, NaN empty, inf, subnormals and huge values, integers, booleans, names; frames it does
    not cover (a field that needs quoting, one column, objects) go to to_csv itself."""
    import numpy as np

    from sim.output import csv_text

    rng = np.random.default_rng(7)
    edge = [0.1, 1e-5, 1e-4, 9.99e-5, 1e16, 1e15, 1.2345678901234568e17, -0.0, 0.0, np.inf, -np.inf, np.nan,
            1 / 3, 2.5e-310, 5e-324, 1.7976931348623157e308, 60.0]
    x = np.concatenate([edge, rng.standard_normal(5000) * 10.0 ** rng.integers(-20, 20, 5000)])
    n = len(x)
    df = pd.DataFrame({"t_s": np.arange(n) * 60.0, "endpoint": pd.array(["ep-a"] * (n - 5) + ["b"] * 5, "string"),
                       "x": x, "k": rng.integers(-5, 5, n), "on": x > 0,
                       "cat": pd.Categorical(rng.choice(["p", "q"], n)), "u": np.full(n, np.nan)})
    assert csv_text(df) == df.to_csv(index=False)
    assert csv_text(df[["x"]]) == df[["x"]].to_csv(index=False)            # one column: to_csv
    quoted = df.assign(endpoint=["a,b"] * n)
    assert csv_text(quoted) == quoted.to_csv(index=False)                  # needs quoting: to_csv
    objects = df.assign(endpoint=[None] + ["a"] * (n - 1))
    assert csv_text(objects) == objects.to_csv(index=False)


def test_timeline_csv_is_the_timeline_frame(tmp_path):
    """timeline.csv as written is Result.timeline as to_csv writes it."""
    res = run_dict(sme(duration=600.0))
    out = res.save(tmp_path / "r", plots=False)
    assert (out / "timeline.csv").read_text() == res.timeline.to_csv(index=False)
