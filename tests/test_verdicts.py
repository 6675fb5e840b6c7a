"""Verdicts on screen (issue 22, item 1): ``capsim run`` and ``compare`` say, per endpoint, whether the
SLO was met (the figure, the target, the attainment), and summary.json warns of an endpoint whose
requests fail or are still in flight at the end (an overloaded endpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from sim.cli import main
from sim.metrics import outcome_warnings, slo_verdict

from conftest import run_dict, sme

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "scenarios" / "quickstart.yaml")


def _cli(*args: str):
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def test_quickstart_says_codegen_misses_its_slo(tmp_path):
    # The quickstart (seed 7) as shipped: the classifier meets P99 <= 5 s; codegen's P99 is about 9 s
    # (its 7B requests run 1-2 s alone and queue in gamma bursts of cv 3), so it misses, while the
    # total, dominated by 60 classifier requests a second, meets it.
    code, out, err = _cli("run", QUICKSTART, "--out", str(tmp_path / "q"), "--no-plots")
    assert code == 0
    assert "SLO P99 <= 5 s:" in out
    line = {ln.split(":")[0].strip(): ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "met (P99" in line["endpoint classifier"] and "attainment 100.0%" in line["endpoint classifier"]
    cg = line["endpoint codegen"]
    assert "MISSED" in cg and "> 5,000 ms" in cg and "attainment" in cg and "< 99%" in cg
    s = json.loads((tmp_path / "q" / "summary.json").read_text())
    p99 = s["endpoints"]["codegen"]["p99_ms"]
    assert p99 > 5000 and f"P99 {p99:,.1f} ms" in cg            # the figure printed is summary.json's
    assert "all endpoints: met" in out


def test_overloaded_run_warns_on_screen_and_in_summary(tmp_path):
    # One T4 for the classifier's 60 requests a second: 2 at once at slowdown(2) = 1.5 of 40 ms serve
    # about 33 a second, so most requests wait past the 60 s timeout.
    code, out, err = _cli("run", QUICKSTART, "--out", str(tmp_path / "o"), "--no-plots",
                          "--set", "endpoints[0].instances=1", "--set", "duration=5m")
    assert code == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    blk = s["endpoints"]["classifier"]
    assert blk["failed"] > 0.5 * (blk["requests"] - blk["in_flight"])
    assert blk["failed_by_status"]["timeout"] == blk["failed"]
    failed = [w for w in s["warnings"] if w.startswith("endpoint classifier:") and "failed" in w]
    assert len(failed) == 1 and "timeout" in failed[0] and "overloaded" in failed[0]
    assert not [w for w in s["warnings"] if w.startswith("endpoint codegen:")]
    assert f"warning: {failed[0]}" in err
    assert "endpoint classifier: MISSED" in out


def test_no_slo_says_so(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(sme(rate=5.0, mean=0.02, duration=60.0)))
    code, out, _ = _cli("run", str(p), "--out", str(tmp_path / "r"), "--no-plots")
    assert code == 0 and "no SLO set" in out


def test_warnings_once_over_replications():
    # 3 replications of an overloaded endpoint: one failure warning, from the mean figures.
    d = sme(rate=30.0, mean=0.05, duration=120.0, seed=3)     # load 1.5 on one slot
    d["endpoints"][0]["timeout"] = "5s"
    res = run_dict(d, replications=3)
    ws = [w for w in res.summary["warnings"] if "failed" in w]
    assert len(ws) == 1
    b = res.summary["endpoints"]["e"]
    assert f"{b['failed'] / (b['requests'] - b['in_flight']):.1%}" in ws[0]
    assert "timeout" in ws[0] and "_ci95" not in ws[0]
    assert all(any("failed" in w for w in r["warnings"]) for r in res.replication_summaries)


def test_healthy_run_has_no_outcome_warning():
    res = run_dict(sme(rate=5.0, mean=0.02, duration=600.0, seed=2))    # load 0.1
    assert outcome_warnings(res.summary) == [] and res.summary["warnings"] == []


def test_outcome_warning_thresholds():
    def summ(requests, failed, in_flight=0, **by):
        return {"endpoints": {"e": {"requests": requests, "failed": failed, "in_flight": in_flight,
                                    "failed_by_status": by}}}

    assert outcome_warnings(summ(1000, 10, timeout=10)) == []               # 1% exactly: no warning
    w = outcome_warnings(summ(1000, 11, throttled=11))
    assert len(w) == 1 and "1.1%" in w[0] and "queue_limit" in w[0]
    w = outcome_warnings(summ(1000, 200, no_capacity=200))
    assert "no instance or copy in service" in w[0] and "add instances" not in w[0]
    assert outcome_warnings(summ(1000, 0, in_flight=10)) == []
    assert "still in flight" in outcome_warnings(summ(1000, 0, in_flight=11))[0]


def test_slo_verdict_rules():
    slo = {"p99_ms": 1000.0}
    ok = {"requests": 100, "in_flight": 0, "failed": 0, "p99_ms": 900.0, "slo_attainment": 0.995}
    assert slo_verdict(ok, slo) == (True, [])
    met, why = slo_verdict({**ok, "p99_ms": 1200.0}, slo)
    assert met is False and why[0] == "P99 1,200.0 ms > 1,000 ms"
    met, why = slo_verdict({**ok, "slo_attainment": 0.9}, slo)         # failures count as misses
    assert met is False and why == ["attainment 90.0% < 99%"]
    # Without a P99 target, more than 1% failed misses it.
    assert slo_verdict({**ok, "p50_ms": 100.0, "failed": 2}, {"p50_ms": 200.0})[0] is False
    assert slo_verdict({**ok, "p50_ms": 100.0, "failed": 1}, {"p50_ms": 200.0})[0] is True
    # TTFT and TPOT are read at their P99, and not judged where the block has none.
    llm = {**ok, "ttft_p99_ms": 1320.0, "tpot_p99_ms": 78.5, "slo_attainment": None}
    met, why = slo_verdict(llm, {"ttft_ms": 1000.0, "tpot_ms": 100.0})
    assert met is False and why == ["TTFT P99 1,320.0 ms > 1,000 ms"]
    assert slo_verdict({**ok, "ttft_p99_ms": None}, {"ttft_ms": 1000.0})[0] is True
    assert slo_verdict(ok, {}) == (None, []) and slo_verdict({**ok, "requests": 0}, slo) == (None, [])


def test_compare_prints_each_plans_verdicts_and_warnings(tmp_path):
    # The quickstart's fleet on 3 simulated minutes, one plan per mode (seed 7). The verdict lines
    # follow each plan's endpoints in compare.json; a plan's warnings go to stderr under its name.
    code, out, err = _cli("compare", QUICKSTART, "--set", "duration=3m", "--out", str(tmp_path / "c"))
    assert code == 0
    cmp = json.loads((tmp_path / "c" / "compare.json").read_text())
    for plan, b in cmp["plans"].items():
        assert f"{plan}: SLO P99 <= 5 s:" in out
        for ep, blk in b["endpoints"].items():
            met, _ = slo_verdict(blk, cmp["slo"])
            assert f"  endpoint {ep}: {'met' if met else 'MISSED'}" in out
        for w in b["warnings"]:
            assert f"{plan}: warning: {w}" in err
    assert any(b["warnings"] for b in cmp["plans"].values())    # the MME plan's full-speed warning


def test_many_endpoints_that_met_the_slo_fold_into_one_line():
    from sim.cli import slo_lines

    summary = {"slo": {"p99_ms": 1000.0}}
    blocks = {f"endpoint e{i}": {"requests": 100, "p99_ms": 100.0 + i, "slo_attainment": 1.0} for i in range(12)}
    blocks["endpoint slow"] = {"requests": 100, "p99_ms": 1500.0, "slo_attainment": 0.9}
    lines = slo_lines(summary, blocks, most=8)
    assert lines[0] == "SLO P99 <= 1 s:"
    assert lines[1].startswith("  endpoint slow: MISSED (P99 1,500.0 ms > 1,000 ms")
    assert lines[2] == "  the other 12 met it (the closest: endpoint e11, P99 111.0 ms)"
    assert len(lines) == 3
    assert len(slo_lines(summary, blocks)) == 14          # unfolded without ``most``


def test_a_ttft_or_tpot_target_without_a_language_model_warns():
    """TTFT and TPOT exist only for requests of a continuous-batching engine: a scenario whose SLO sets
    them with no such model (its verdict would say "met" whatever the latency) warns, naming the key,
    and says whether a latency target still judges the fleet; with a language model it does not."""
    import copy

    from sim.scenario import parse_scenario

    d = sme(duration=60.0)
    d["slo"] = {"tpot": "10ms", "ttft": "100ms"}
    w = [x for x in parse_scenario(copy.deepcopy(d), source="s.yaml").warnings if x.startswith("slo.")]
    assert w == ["slo.ttft: no model is served with continuous batching (a language model with "
                 "service.continuous_batching), so TTFT and TPOT apply to no request; set a latency target "
                 "(p99, p90, p50 or mean) to judge this fleet"]
    d["slo"] = {"tpot": "10ms", "p99": "1s"}
    w = [x for x in parse_scenario(copy.deepcopy(d), source="s.yaml").warnings if x.startswith("slo.")]
    assert len(w) == 1 and w[0].startswith("slo.tpot: ") and w[0].endswith("only the latency target judges this fleet")
    llm = sme(duration=60.0)
    m = llm["models"][0]
    del m["size_gb"]
    m.update(architecture="llama-2-7b", tokens={"input": 10, "output": 5},
             service={"continuous_batching": {"step": {"base": "4ms", "per_prefill_token": 0, "per_decode_seq": 0,
                                                       "per_kv_token": 0}}})
    llm["instance_types"][0]["gpu_memory_gb"] = 80
    llm["endpoints"][0]["instance_type"] = "test.gpu8"
    llm["slo"] = {"ttft": "100ms"}
    assert not [x for x in parse_scenario(llm, source="s.yaml").warnings if x.startswith("slo.")]


def test_no_capacity_on_a_language_model_endpoint_names_the_kv_cache():
    """A continuous-batching copy refuses a request longer than its whole KV cache with status
    no_capacity: the warning of an endpoint with such an engine (its summary has ``preemptions``) names
    that cause beside the fleet's; other endpoints keep the fleet's alone."""
    b = {"requests": 100, "in_flight": 0, "failed": 9, "failed_by_status": {"no_capacity": 9}}
    plain = outcome_warnings({"endpoints": {"e": b}})
    llm = outcome_warnings({"endpoints": {"e": {**b, "preemptions": 4}}})
    assert len(plain) == len(llm) == 1 and "KV cache" not in plain[0]
    assert llm[0].startswith(plain[0]) and llm[0].endswith(
        ", or were longer (prompt and output tokens) than a copy's KV cache holds: give the copies more memory "
        "or shorten the requests")
