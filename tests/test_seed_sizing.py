"""The public sources' figures derived again by the planner (sim.plan) on the device model.

tests/test_seeds.py reruns the sources' figures on the scenarios' own fleets (endpoints written
in the scenario files). Here no instance count is written by hand: each figure comes out of
capsim's sizing mechanisms for the scenario's fleet and SLO, with the source's hardware:

- models per MME instance: the planner's MME builder (``build_mme``: the working set's GPU
  memory, host memory and disk against the cache's tiers, with MME_SLACK headroom), the
  simulator's cache (what one instance holds at once) and the device's compute share (the
  batching estimator on the T4's slowdown curve);
- savings and cost ratios: the plans ``sim.compare`` builds and sizes (estimate, then simulation)
  for the fleet, on the source's instance types, priced by the metrics; where a figure is about a
  window of the day (the quietest), the builders at that window's rates (``at_trough``, as
  compare's autoscaled plans take their floor).

Each test prints capsim's figures beside the source's (``pytest -s``) and asserts capsim's with
the tolerance it states. Where they differ, the docstring says by how much and why; nothing here
(no curve, no scenario) was tuned to reach a figure. Seeds: the scenarios' own (5, 11, 21).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import yaml

import sim
from conftest import print_table as _table
from sim.plan.autoscaled import at_trough
from sim.plan.builders import build_ic, build_mme, build_sme, estimate, mme_count, pooled
from sim.plan.load import fleet_load
from sim.plan.sizing import instances
from sim.plan.slo import SLO
from sim.pricing import fleet_hourly

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
EKS_NODE = "eks.g4dn.xlarge.2-slots"     # the EKS baseline's node: a g4dn.xlarge cut in two rigid slots
SHORT = ["duration=6m", "warmup=1m"]


def _fleet(counts: dict) -> str:
    return ", ".join(f"{v} x {k}" for k, v in counts.items())


def _typical(loads: list):
    """A model of the fleet (all have the same sizes and service) at the fleet's mean rates."""
    return replace(loads[0], rate=sum(lm.rate for lm in loads) / len(loads),
                   peak_rate=sum(lm.peak_rate for lm in loads) / len(loads))


def _copies(lm, k: int) -> list:
    """``k`` models of ``lm``'s sizes and traffic (names of their own)."""
    return [replace(lm, index=i, name=f"{lm.name}-{i}") for i in range(k)]


def _planner_per_instance(lm, it, slo_s: float) -> int:
    """The most models of ``lm``'s kind that compare's MME builder puts on one instance of ``it``."""
    k = 0
    while build_mme(_copies(lm, k + 1), [it], slo_s).endpoints[0]["instances"] == 1:
        k += 1
    return k


def _packed_per_instance(lm, it, cache, slo_s: float) -> int:
    """The same with the endpoint's own cache block (the scenario's memory_fraction, host_reserve)."""
    k = 0
    while mme_count(_copies(lm, k + 1), it, cache, slo_s, lm.concurrency) == 1:
        k += 1
    return k


def _held(path: Path, itype: str) -> int:
    """Models one instance holds at once in the simulation (LoadedModelCount's maximum on a single
    instance of the scenario's endpoint, with its cache block), as tests/test_seeds.py finds them."""
    sc = sim.load_scenario(path, [f"endpoints[0].instance_type={itype}", "endpoints[0].instances=1",
                                  "duration=10m", "warmup=2m"])
    return int(sim.run(sc).summary["endpoints"][sc.endpoints[0].name]["cloudwatch"]["LoadedModelCount_max"])


def _compute_bound(lm, it, k: int, slo_s: float) -> float:
    """Requests per second each of ``k`` models of ``lm``'s kind may get before their pooled traffic
    (``pooled``, as the MME builder counts it) needs a second device (the capacity estimate of their
    execution model: the batching chain on the slowdown curve, ``max_concurrency`` requests in
    service on the one GPU)."""
    lo, hi = 0.0, 1000.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if estimate(pooled(_copies(replace(lm, peak_rate=mid), k), lm.concurrency), lm.concurrency, slo_s, it) <= 1:
            lo = mid
        else:
            hi = mid
    return lo


def test_forethought_models_per_instance_from_memory_and_compute():
    """12 embedding models per ml.g4dn.xlarge, 4 and 10 autocomplete models on ml.g4dn.xlarge and
    2xlarge (the source), derived three ways.

    - The simulator's cache with the scenario's cache block (memory_fraction 0.8, the source's 80%
      target; host_reserve 4 GB for the autocomplete endpoint, an assumption): 12, 4 and 10, the
      source's. GPU memory binds the embeddings (0.8 x 16 GB / 1.04 GB = 12.3), host memory the
      autocomplete models (12 GB / 2.7 GB = 4.4, 28 GB / 2.7 GB = 10.4; their 2.7 GB is an
      assumption taken in the range the source's 4 and 10 imply, so this checks the mechanism).
    Each count is for models of the fleet's sizes at its mean rate per model.

    - The planner's MME builder as compare runs it (default cache: memory_fraction 0.9,
      host_reserve 2 GB, and 20% headroom over the working set, MME_SLACK): 11, 4 and 9. Its
      headroom is for cold-start churn; the source pre-warms every model and its 80% target is
      already its headroom, so the builder provisions 1 model fewer per instance on both T4 types.
    - The same builder's packing with the scenario's cache block: 10, 3 and 8 (the 20% headroom on
      top of the 80% target and the 4 GB reserve).
    - Compute is not the limit: under the T4's slowdown curve (the source's 0.12 s with 5
      concurrent requests) one device serves 12 embedding models up to ~2.9 requests per second
      each (the scenario's traffic: 0.67/s at its peak), 10 autocomplete models up to ~2.0/s each
      (the day's peak: 0.53/s). The source gives no per-model traffic, so these bounds are what
      capsim can say: below them memory, not the GPU's time, sets the count. (The bound is the
      pooled estimate the MME builder counts, ``pooled``: the test at the end of this file.)

    Tolerances: the counts are integers and exact; the compute bounds to 10%.
    """
    emb, ac = SCENARIOS / "forethought_embeddings.yaml", SCENARIOS / "forethought_autocomplete.yaml"
    rows, got = [], {}
    for label, path, itype, reported in (("embeddings", emb, "ml.g4dn.xlarge", 12),
                                         ("autocomplete", ac, "ml.g4dn.xlarge", 4),
                                         ("autocomplete", ac, "ml.g4dn.2xlarge", 10)):
        sc = sim.load_scenario(path)
        slo_s = SLO.of(sc).latency_s
        loads = fleet_load(sc)
        lm = _typical(loads)
        it = sc.catalog.instance(itype)
        held = _held(path, itype)
        planner = _planner_per_instance(lm, it, slo_s)
        packed = _packed_per_instance(lm, it, sc.endpoints[0].spec.cache, slo_s)
        got[(label, itype)] = (held, planner, packed)
        rows.append((label, itype, reported, held, planner, packed))
    day = sim.load_scenario(SCENARIOS / "forethought_autocomplete_day.yaml")
    e_sc = sim.load_scenario(emb)
    e_lm, d_lm = _typical(fleet_load(e_sc)), _typical(fleet_load(day))
    e_peak, d_peak = e_lm.peak_rate, d_lm.peak_rate
    e_bound = _compute_bound(e_lm, e_sc.catalog.instance("ml.g4dn.xlarge"), 12, SLO.of(e_sc).latency_s)
    d_bound = _compute_bound(d_lm, day.catalog.instance("ml.g4dn.2xlarge"), 10, SLO.of(day).latency_s)
    _table("Forethought: models per MME instance (reported / simulated cache / compare's MME builder / "
           "the builder's packing with the scenario's cache)",
           ("models", "instance type", "reported", "simulated", "planner", "planner, scenario cache"), rows)
    _table("Forethought: requests per second per model that one T4 serves before compute binds "
           "(batching estimate, slowdown curve of the scenario)",
           ("models", "per instance", "compute bound /s each", "scenario's peak /s each"),
           [("embeddings", 12, f"{e_bound:.2f}", f"{e_peak:.2f}"),
            ("autocomplete (day)", 10, f"{d_bound:.2f}", f"{d_peak:.2f}")])
    assert got[("embeddings", "ml.g4dn.xlarge")] == (12, 11, 10)
    assert got[("autocomplete", "ml.g4dn.xlarge")] == (4, 4, 3)
    assert got[("autocomplete", "ml.g4dn.2xlarge")] == (10, 9, 8)
    assert abs(e_bound / 2.9 - 1) <= 0.10 and e_peak < e_bound
    assert abs(d_bound / 2.0 - 1) <= 0.10 and d_peak < d_bound


def test_forethought_embeddings_savings_from_planned_plans():
    """Embeddings: up to 80% saved against EKS, about 43% with 3 replicas (the source).

    The plans, sized by ``sim.compare`` for the fleet of forethought_embeddings.yaml (30 models,
    SLO P99 1 s, seed 5, 6 simulated minutes) on the source's ml.g4dn.xlarge:

    - MME: compare's MME builder holds the working set (30 x 1.04 GB with 20% headroom in 0.9 x
      16 GB) on 3 instances, which the simulation confirms (SLO met, no growth);
    - the EKS baseline: compare's IC builder on the EKS node of forethought_eks_embeddings.yaml (a
      g4dn.xlarge cut in 2 rigid GPU-memory slots, an assumption stated there) packs one pod per
      model, 2 to a node: 15 nodes, simulated on the same arrivals;
    - SME, for reference: one ml.g4dn.xlarge per model, 30 (the planner's SME plan; the source's
      baseline is EKS, not SMEs).

    1 replica: 1 - 3/15 = 80.0%, the source's figure (but the 2 slots per EKS node were chosen in
    that scenario so that this lands at 80%: it checks the packing, not a prediction). 3 replicas
    (every model held on three instances): compare's builder for the working set held three times
    gives 8 instances, 46.7% (the source: about 43%, 3.7 points away); with the scenario's cache
    block (80% target, and the builder's 20% headroom on top) 9 instances, 40.0%. The source's 43%
    lies between the two: about 8.5 instances' worth against 15 nodes. Against the planner's SMEs
    the MME saves 90.0% (73.3% with 3 replicas).

    Tolerances: 0.5 point on each saving (the fleets are fixed, so the costs are counts x prices:
    only a change of count moves them); the counts exact.
    """
    emb, eks = SCENARIOS / "forethought_embeddings.yaml", SCENARIOS / "forethought_eks_embeddings.yaml"
    c = sim.compare(emb, ["sme", "mme"], overrides=SHORT, instance_types=["ml.g4dn.xlarge"])
    e = sim.compare(eks, ["ic"], overrides=SHORT, instance_types=[EKS_NODE])
    s, se = c.summary["plans"], e.summary["plans"]
    for name, b in {**s, "eks": se["ic"]}.items():
        assert b["slo_met"] and b["failed"] == 0, name
    assert s["mme"]["requests"] == s["sme"]["requests"] == se["ic"]["requests"]     # the same arrivals
    assert [len(p.sizing) for p in c.plans.values()] == [1, 1]                         # no growth needed
    cost = {"sme": s["sme"]["cost_per_hour_usd"], "mme": s["mme"]["cost_per_hour_usd"],
            "eks": se["ic"]["cost_per_hour_usd"]}

    # 3 replicas: every model's copy on three instances, as compare's builder holds such a working set.
    sc = c.scenario
    it = sc.catalog.instance("ml.g4dn.xlarge")
    triple = [replace(lm, index=k, name=f"{lm.name}-r{r}") for r in range(3) for k, lm in enumerate(c.loads)]
    n3 = build_mme(triple, [it], c.slo.latency_s).endpoints[0]["instances"]
    n3_cache = mme_count(triple, it, sc.endpoints[0].spec.cache, c.slo.latency_s, c.loads[0].concurrency)
    mme3, mme3_cache = fleet_hourly({it.name: n3}, sc.catalog), fleet_hourly({it.name: n3_cache}, sc.catalog)
    save1 = 1 - cost["mme"] / cost["eks"]
    save3, save3_cache = 1 - mme3 / cost["eks"], 1 - mme3_cache / cost["eks"]
    vs_sme1, vs_sme3 = 1 - cost["mme"] / cost["sme"], 1 - mme3 / cost["sme"]
    rows = [("1 replica", _fleet(se["ic"]["instances"]), _fleet(s["mme"]["instances"]), f"{save1:.1%}",
             "up to 80%", f"{vs_sme1:.1%}"),
            ("3 replicas", _fleet(se["ic"]["instances"]), f"{n3} x {it.name}", f"{save3:.1%}", "about 43%",
             f"{vs_sme3:.1%}"),
            ("3 replicas, scenario's cache", _fleet(se["ic"]["instances"]), f"{n3_cache} x {it.name}",
             f"{save3_cache:.1%}", "about 43%", "")]
    _table(f"Forethought embeddings: the planner's MME against the EKS baseline packed by its IC builder "
           f"(SME plan: {_fleet(s['sme']['instances'])})",
           ("case", "EKS", "MME", "saved", "reported", "saved against SMEs"), rows)
    assert se["ic"]["instances"] == {EKS_NODE: 15} and s["mme"]["instances"] == {it.name: 3}
    assert (n3, n3_cache) == (8, 9)
    assert abs(save1 - 0.800) <= 0.005
    assert abs(save3 - 0.467) <= 0.005 and abs(save3_cache - 0.400) <= 0.005
    assert save3_cache <= 0.43 <= save3                   # the source's figure lies between the two
    assert abs(vs_sme1 - 0.900) <= 0.005 and abs(vs_sme3 - 0.733) <= 0.005


def test_forethought_autocomplete_savings_from_planned_plans():
    """Autocomplete: 66-74% saved on ml.g4dn.2xlarge against EKS on g4dn.xlarge (the source).

    The plans, sized by ``sim.compare`` for the fleet of forethought_autocomplete_day.yaml (30
    models, busy office hours and quiet nights, SLO P99 1 s, seed 21), simulated from 00:00 to
    10:00 (the quiet night and the first office hour, at the day's peak weight: the same busiest
    and quietest windows as the whole day, which the sizing reads, in less time):

    - MME on the source's two T4 types: compare's builder weighs both and takes ml.g4dn.2xlarge by
      itself, for host memory (each model's 2.7 GB of CUDA runtime: 30 x 2.7 GB with 20% headroom
      is 7 g4dn.xlarge, 5.15 USD/h, or 4 g4dn.2xlarge, 3.76 USD/h), as the source did; the
      simulation meets the SLO at the peak with the 4 (no growth);
    - no autoscaled plan: compare builds one where the traffic varies, but its floor, the count at
      the quietest window's rate, is the same 4 (host memory for all 30 models, not traffic, sets
      it), so nothing would scale in;
    - EKS: compare's IC builder on the 2-slot EKS node, one pod per model: 15 nodes.

    Saved: 1 - 4 x 0.94 / (15 x 0.7364) = 66.0%, all day and at the quietest hour alike: the low
    end of the source's 66-74%. The hand-written day of tests/test_seeds.py scales down to 3
    instances at night (the scenario's floor: 30 models / 10 held per instance, without the
    builder's headroom) and gets 68.4% over the day and 74.5% at the quietest hour; the source's
    range is the span between 4 and 3 g4dn.2xlarge against 15 g4dn.xlarge.

    Tolerances: 0.5 point on the saving (fixed fleets: counts x prices); the counts exact.
    """
    day, eks = SCENARIOS / "forethought_autocomplete_day.yaml", SCENARIOS / "forethought_eks_autocomplete.yaml"
    window = ["duration=10h"]
    c = sim.compare(day, ["mme"], overrides=window, instance_types=["ml.g4dn.xlarge", "ml.g4dn.2xlarge"])
    e = sim.compare(eks, ["ic"], overrides=window, instance_types=[EKS_NODE])
    s, se = c.summary["plans"], e.summary["plans"]
    assert list(s) == ["mme"]                             # no autoscaled twin (see above)
    for name, b in {"mme": s["mme"], "eks": se["ic"]}.items():
        assert b["slo_met"] and b["failed"] == 0, name
    assert s["mme"]["requests"] == se["ic"]["requests"]
    assert len(c.plans["mme"].sizing) == 1

    # Why 2xlarge: the builder's count on each type alone, and the floor at the quietest window.
    sc, slo_s = c.scenario, c.slo.latency_s
    per_type = {t: build_mme(c.loads, [sc.catalog.instance(t)], slo_s).endpoints[0]["instances"]
                for t in ("ml.g4dn.xlarge", "ml.g4dn.2xlarge")}
    floor = build_mme([at_trough(lm) for lm in c.loads], [sc.catalog.instance("ml.g4dn.2xlarge")],
                      slo_s).endpoints[0]["instances"]
    saved = 1 - s["mme"]["cost_per_hour_usd"] / se["ic"]["cost_per_hour_usd"]
    _table("Forethought autocomplete: the planner's MME against the EKS baseline packed by its IC builder "
           f"(the builder on g4dn.xlarge alone: {per_type['ml.g4dn.xlarge']} instances, "
           f"{fleet_hourly({'ml.g4dn.xlarge': per_type['ml.g4dn.xlarge']}, sc.catalog):.2f} USD/h; "
           f"at the quietest window: {floor} x ml.g4dn.2xlarge)",
           ("case", "EKS", "MME", "saved", "reported"),
           [("day and quietest hour", _fleet(se["ic"]["instances"]), _fleet(s["mme"]["instances"]),
             f"{saved:.1%}", "66-74%")])
    assert s["mme"]["instances"] == {"ml.g4dn.2xlarge": 4} and se["ic"]["instances"] == {EKS_NODE: 15}
    assert per_type == {"ml.g4dn.xlarge": 7, "ml.g4dn.2xlarge": 4} and floor == 4
    assert abs(saved - 0.660) <= 0.005
    assert 0.66 - 0.005 <= saved <= 0.74                  # within the source's range, at its low end


def _one_copy_bound(lm, it, slo_s: float) -> float:
    """Requests per second one copy of ``lm`` serves within the SLO (the capacity estimate)."""
    lo, hi = 0.0, 100.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if estimate(replace(lm, peak_rate=mid), lm.concurrency, slo_s, it) <= 1:
            lo = mid
        else:
            hi = mid
    return lo


def test_salesforce_ic_against_sme_from_planned_plans(tmp_path):
    """Salesforce: inference components cut cost "up to 8x" against SMEs (the source).

    The plans compare builds and sizes for the fleet of salesforce_ic.yaml (6 large models with a
    few requests a minute, 2 medium ones whose traffic follows the day; SLO P99 20 s; seed 11) on
    the source's ml.p4d.24xlarge:

    - SME: each model on its own p4d (8 copies, one per A100): 8 instances, 301.50 USD/h;
    - IC: a copy per GPU, packed: 6 large copies and, at the noon peak (the busiest window, in the
      simulated 00:00-12:30), 4 copies of codegen-inline and 2 of texteval (the batching estimate
      on the A100 curve): 12 GPUs, 2 instances. Simulated: both meet the SLO, SME cost / IC cost
      4.0x (the hand-written IC plan of tests/test_seeds.py, with managed instance scaling over the
      day, 4.02x);
    - the same builders at the day's quietest window (``at_trough``, the floor compare gives its
      autoscaled plans): one copy of each medium model, 8 GPUs, one instance: 8.0x, the source's
      figure, and its simulation from 00:30 to 01:30 meets the SLO (P99 ~15 s of 20 s).

    So the planner reaches 8x only at the bottom of the night: one codegen-inline copy serves up
    to ~1.59 requests per second within the SLO (the estimate, under the slowdown curve), and the
    scenario's night is 1.6/s at its lowest (4/s mean, peak_to_trough 4; the quietest 5-minute
    window read 1.51/s). Anywhere else in the day a second copy, and so a second instance, is
    needed: 4x. The source's "up to" is its best case; its traffic is not stated.

    On the whole catalog (builders only, not simulated) the planner's SMEs move to single-GPU
    ml.g6e.xlarge (L40S 48 GB) and ml.g6.xlarge (L4 24 GB) instances, 22.42 USD/h: 0.30x the IC
    plan's cost, which stays on 2 p4d (an IC copy reserves its model's memory_gb of host memory:
    the 36 GB xgen copy fits no single-GPU type's host memory). The source's 8x compares hosting
    modes on the same P4d hardware, which is what the figures above hold fixed.

    Tolerances: 0.05 on the ratios (fixed fleets: counts x prices), 0.05/s on the one-copy bound.
    """
    path = SCENARIOS / "salesforce_ic.yaml"
    p4d = "ml.p4d.24xlarge"
    c = sim.compare(path, ["sme", "ic"], overrides=["duration=750m"], instance_types=[p4d])
    s = c.summary["plans"]
    for name, b in s.items():
        assert b["slo_met"] and b["failed"] == 0, name
    assert s["sme"]["requests"] == s["ic"]["requests"] and [len(p.sizing) for p in c.plans.values()] == [1, 1]
    peak_ratio = s["sme"]["cost_per_hour_usd"] / s["ic"]["cost_per_hour_usd"]

    # The day's quietest window: the builders at the rates compare's autoscaled plans take as their floor.
    sc = sim.load_scenario(path)
    slo_s, cat = SLO.of(sc).latency_s, sc.catalog
    day = fleet_load(sc)
    night = [at_trough(lm) for lm in day]
    it = cat.instance(p4d)
    sme_night, ic_night = build_sme(night, [it], slo_s), build_ic(night, [it], slo_s)
    night_ratio = fleet_hourly(instances(sme_night.endpoints), cat) / fleet_hourly(instances(ic_night.endpoints), cat)
    (tmp_path / "night.yaml").write_text(yaml.safe_dump({"ic-night": ic_night.endpoints}))
    n = sim.compare(path, tmp_path / "night.yaml", overrides=["duration=90m"]).summary["plans"]["ic-night"]
    assert n["slo_met"] and n["failed"] == 0
    inline = next(lm for lm in day if lm.name == "codegen-inline")
    bound = _one_copy_bound(inline, it, slo_s)

    # The whole catalog, for reference: the builders' choice of types.
    types = list(cat.instance_types.values())
    sme_all, ic_all = build_sme(day, types, slo_s), build_ic(day, types, slo_s)
    all_sme, all_ic = instances(sme_all.endpoints), instances(ic_all.endpoints)
    all_ratio = fleet_hourly(all_sme, cat) / fleet_hourly(all_ic, cat)
    copies = dict(zip((lm.name for lm in day), c.plans["ic"].state["copies"]))
    _table("Salesforce: SME cost / IC cost of the plans the planner sizes (reported: up to 8x)",
           ("window", "SME", "IC", "SME / IC", "how"),
           [("busiest (noon)", _fleet(s["sme"]["instances"]), _fleet(s["ic"]["instances"]), f"{peak_ratio:.2f}x",
             f"simulated; IC copies inline {copies['codegen-inline']}, texteval {copies['texteval']}"),
            ("quietest (night)", _fleet(instances(sme_night.endpoints)), _fleet(instances(ic_night.endpoints)),
             f"{night_ratio:.2f}x", f"estimate; IC simulated 00:30-01:30, P99 {n['p99_ms']:,.0f} ms"),
            ("busiest, whole catalog", _fleet(all_sme), _fleet(all_ic), f"{all_ratio:.2f}x", "estimate")])
    print(f"one codegen-inline copy serves up to {bound:.2f}/s within the SLO; its quietest window "
          f"{inline.trough_rate:.2f}/s, its busiest {inline.peak_rate:.2f}/s")
    assert s["sme"]["instances"] == {p4d: 8} and s["ic"]["instances"] == {p4d: 2}
    assert abs(peak_ratio - 4.0) <= 0.05
    assert instances(ic_night.endpoints) == {p4d: 1} and abs(night_ratio - 8.0) <= 0.05
    assert abs(bound - 1.59) <= 0.05 and inline.trough_rate < bound < 1.6
    assert all(t != p4d for t in all_sme) and abs(all_ratio - 0.30) <= 0.05


# 10 small batching models at 10 requests/s each on one MME endpoint of ml.g4dn.xlarge.
POOLED_FLEET = {
    "name": "pooled", "seed": 3, "duration": "3m", "warmup": "30s", "slo": {"p99": "1s"},
    "models": [{"name": "m-{i}", "count": 10, "size_gb": 0.88, "memory_gb": 1.04, "host_memory_gb": 0.25,
                "service": {"dist": "lognormal", "mean": "30ms", "cv": 0.4,
                            "batching": {"slowdown": {1: 1.0, 5: 4.0}}},
                "traffic": {"process": "poisson", "rate": "100/s", "popularity": "uniform"}}],
    "endpoints": [{"name": "e", "mode": "mme", "instance_type": "ml.g4dn.xlarge", "instances": 1,
                   "max_concurrency": 4, "models": ["m-*"]}]}


def test_mme_builder_counts_the_shared_gpu_time_of_all_its_models():
    """An MME instance's one GPU serves every model loaded there, and the slowdown curve counts all
    their requests in service: the MME builder sizes the pooled traffic of its batching models on
    the device (``pooled``), beside each model's own estimate and the memory tiers. Here 10 small
    models at 10 requests/s each: each alone needs one instance and their memory fits one
    ml.g4dn.xlarge, but one T4 under the curve {5: 4.0} completes at most 5 / (4.0 x 30 ms) =
    42 requests/s, not the 100 offered; the builder's count serves them and the simulation meets
    the SLO in its first round (seed 3, 3 simulated minutes)."""
    from sim.scenario import parse_scenario

    sc = parse_scenario(POOLED_FLEET, source="pooled")
    it = sc.catalog.instance("ml.g4dn.xlarge")
    c = sim.compare(sc, ["mme"], instance_types=[it.name])
    plan = c.plans["mme"]
    n = plan.endpoints[0]["instances"]
    assert max(estimate(lm, 4, c.slo.latency_s, it) for lm in c.loads) == 1    # each model alone: 1
    assert sum(lm.peak_rate for lm in c.loads) > 5 / (4.0 * 0.030)              # more than one T4 completes
    print(f"pooled: {n} x {it.name}, P99 {c.summary['plans']['mme']['p99_ms']:,.0f} ms")
    assert n >= 3 and len(plan.sizing) == 1 and plan.slo_met
    assert c.summary["plans"]["mme"]["failed"] == 0


def test_optimize_s_estimate_counts_the_shared_gpu_time_as_the_builder_does():
    """optimize's estimate of an MME endpoint (``capacity.instances_needed``, models_per_instance > 1 on a
    GPU type) counts the pooled traffic of the models an instance holds, as the MME builder does: the
    fleet above needs at least 3 ml.g4dn.xlarge, where each model's own estimate gave 1."""
    from sim.plan.capacity import instances_needed, pooled
    from sim.plan.load import fleet_load
    from sim.scenario import parse_scenario

    sc = parse_scenario(POOLED_FLEET, source="pooled")
    it = sc.catalog.instance("ml.g4dn.xlarge")
    loads = fleet_load(sc)
    n = instances_needed(loads, it, 1, 4, 1.0, models_per_instance=10)
    assert n == estimate(pooled(loads, 4), 4, 1.0, it) and n >= 3
    # one model an instance (no sharing) or a CPU type: the models' own estimates, as before
    assert instances_needed(loads, it, 1, 4, 1.0, models_per_instance=1) == 10
