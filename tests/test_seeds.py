"""The public sources' results reproduced as scenarios (README, Sources): each test
prints the simulated figures beside the reported ones (run with -s to see the
tables) and asserts the tolerance it states. Savings and ratios come out of
simulated costs (instances in service x prices), never written in."""
from __future__ import annotations

import math
from pathlib import Path

import yaml

import sim
from conftest import print_table as _table
from sim.scenario import parse_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def _fleet(instances: dict) -> str:
    return ", ".join(f"{v} x {k}" for k, v in instances.items())


def _models(path: Path) -> list:
    return yaml.safe_load(path.read_text())["models"]


# -- Forethought (the Forethought post): MME against the dedicated EKS set-up ----------------------------------------
def _per_instance(path: Path, itype: str) -> int:
    """Models one instance holds at once, as the simulation finds it (LoadedModelCount's maximum on a
    single instance that every model asks for)."""
    sc = sim.load_scenario(path, [f"endpoints[0].instance_type={itype}", "endpoints[0].instances=1",
                                  "duration=10m", "warmup=2m"])
    return int(sim.run(sc).summary["endpoints"][sc.endpoints[0].name]["cloudwatch"]["LoadedModelCount_max"])


def test_forethought_mme_against_dedicated_eks(tmp_path):
    emb, eks_emb = SCENARIOS / "forethought_embeddings.yaml", SCENARIOS / "forethought_eks_embeddings.yaml"
    day, eks_ac = SCENARIOS / "forethought_autocomplete_day.yaml", SCENARIOS / "forethought_eks_autocomplete.yaml"
    assert _models(emb) == _models(eks_emb) and _models(day) == _models(eks_ac)

    # Embeddings. Production provisions memory for every model (pre-warmed, no cold start): the MME
    # plan is as many instances as hold all models once (1 replica) or three times (3 replicas), with
    # the models-per-instance figure the simulation finds (12; the source's 12).
    per = _per_instance(emb, "ml.g4dn.xlarge")
    n = len(sim.load_scenario(emb).models)
    ep = yaml.safe_load(emb.read_text())["endpoints"][0]
    plans = {"eks": str(eks_emb)}
    for reps in (1, 3):
        plans[f"mme-{reps}"] = [{**ep, "instances": math.ceil(reps * n / per)}]
    (tmp_path / "emb.yaml").write_text(yaml.safe_dump(plans, sort_keys=False))
    c = sim.compare(emb, tmp_path / "emb.yaml")
    s = c.summary["plans"]
    for name, b in s.items():
        assert b["slo_met"] and b["failed"] == 0, name
        assert b["requests"] == s["eks"]["requests"]           # the same arrivals
    eks_cost = s["eks"]["cost_per_hour_usd"]
    save1 = 1 - s["mme-1"]["cost_per_hour_usd"] / eks_cost
    save3 = 1 - s["mme-3"]["cost_per_hour_usd"] / eks_cost

    # Autocomplete: the day of forethought_autocomplete_day.yaml (MME on ml.g4dn.2xlarge, autoscaling on
    # InvocationsPerInstance 225 from a floor of 3 instances that hold all 30 models) against the
    # fixed EKS fleet on g4dn.xlarge. Savings over the whole day, and at the quietest hour (the
    # floor): the source's "66-74%" reads as that range.
    per_ac = _per_instance(SCENARIOS / "forethought_autocomplete.yaml", "ml.g4dn.2xlarge")
    per_ac_1x = _per_instance(SCENARIOS / "forethought_autocomplete.yaml", "ml.g4dn.xlarge")
    n_ac = len(sim.load_scenario(day).models)
    assert sim.load_scenario(day).endpoints[0].instances.min == math.ceil(n_ac / per_ac)
    (tmp_path / "ac.yaml").write_text(yaml.safe_dump({"eks": str(eks_ac), "mme": str(day)}))
    a = sim.compare(day, tmp_path / "ac.yaml")
    sa = a.summary["plans"]
    for name, b in sa.items():
        assert b["slo_met"] and b["failed"] == 0, name
    save_day = 1 - sa["mme"]["cost_per_hour_usd"] / sa["eks"]["cost_per_hour_usd"]
    tl = a.plans["mme"].result.timeline
    warm = a.scenario.spec.warmup
    floor = int(tl.loc[tl["t_s"] >= warm, "instances"].min())
    price_2x = a.scenario.catalog.instance("ml.g4dn.2xlarge").price_per_hour
    save_night = 1 - floor * price_2x / sa["eks"]["cost_per_hour_usd"]

    rows = [("embeddings, 1 replica", f"{_fleet(s['eks']['instances'])} vs {_fleet(s['mme-1']['instances'])}",
             f"{save1:.1%}", "up to 80%"),
            ("embeddings, 3 replicas", f"{_fleet(s['eks']['instances'])} vs {_fleet(s['mme-3']['instances'])}",
             f"{save3:.1%}", "about 43%"),
            ("autocomplete, day average", f"{_fleet(sa['eks']['instances'])} vs {_fleet(sa['mme']['instances'])}",
             f"{save_day:.1%}", "66-74%"),
            ("autocomplete, quietest hour", f"{floor} x ml.g4dn.2xlarge", f"{save_night:.1%}", "66-74%")]
    _table(f"Forethought: MME savings against dedicated EKS (rigid fractions: 2 models per g4dn.xlarge); "
           f"models per instance simulated {per} (reported 12), autocomplete {per_ac_1x} on g4dn.xlarge "
           f"(reported 4) and {per_ac} on g4dn.2xlarge (reported 10)",
           ("case", "EKS vs MME instances", "simulated", "reported"), rows)
    assert per == 12 and per_ac == 10
    # The same T4 with half the host memory: host memory, not GPU memory, limits the autocomplete models
    # (each one's 2.7 GB of host memory is an assumption taken in the 2.55-2.8 GB that the source's 4 and
    # 10 imply, forethought_autocomplete.yaml: the two counts check the mechanism, not a prediction).
    assert per_ac_1x == 4
    # Tolerances: 5 percentage points around a reported figure, 3 outside a reported range.
    assert abs(save1 - 0.80) <= 0.05
    # 3 replicas: ceil(90 / 12) = 8 instances against 15 gives 47%; the source's 43% implies about 2.3
    # models per GPU on EKS on average (our rigid 2 is an assumption, see forethought_eks_embeddings.yaml).
    assert abs(save3 - 0.43) <= 0.05
    assert 0.66 - 0.03 <= save_day <= 0.74 + 0.03
    assert 0.66 - 0.03 <= save_night <= 0.74 + 0.03 and save_night >= save_day


# -- Salesforce (the Salesforce post): SMEs, ICs and the hybrid, as hand-written plans ----------------------
def test_salesforce_sme_ic_and_hybrid_plans():
    plans = SCENARIOS / "salesforce_plans.yaml"
    c = sim.compare(SCENARIOS / "salesforce_ic.yaml", plans)
    s = c.summary["plans"]
    assert list(s) == ["sme", "ic", "hybrid"]
    cost = {n: b["cost_per_hour_usd"] for n, b in s.items()}
    rows = [(n, _fleet(b["instances"]), f"{cost[n]:,.2f}",
             f"{cost['sme'] / cost[n]:.2f}x", f"{b['p99_ms']:,.0f}", "yes" if b["slo_met"] else "no")
            for n, b in s.items()]
    _table("Salesforce, one day on ml.p4d.24xlarge (reported: ICs cut cost by up to 8x)",
           ("plan", "instances (mean)", "USD/h", "SME cost / plan cost", "P99 ms", "SLO met"), rows)
    for name, b in s.items():
        assert b["slo_met"] and b["failed"] == 0, name
        assert b["requests"] == s["sme"]["requests"]
    assert c.summary["best"] == "ic"
    # IC: between 4x and the reported 8x (8x needs one instance all day). With full-speed slots the IC
    # plan held one instance at night and a second at the noon peak: 4.61x. With the slowdown curve
    # (the Forethought post's T4 figure, transferred; salesforce_ic.yaml) the medium models scale on 98 invocations
    # per copy-minute instead of 150, which keeps a second codegen-inline copy, so a second instance,
    # through the night: 4.02x (tolerance 0.1). P99 3,563 -> 6,299 ms (IC), 3,518 -> 3,597 ms (SME).
    assert 4.0 <= cost["sme"] / cost["ic"] <= 8.0
    assert abs(cost["sme"] / cost["ic"] - 4.02) <= 0.1
    # The hybrid keeps an 8-GPU SME per steady (large, lightly used) model: between the two.
    assert cost["ic"] < cost["hybrid"] < cost["sme"]
    assert sum(s["hybrid"]["instances"].values()) >= 7


# -- Routing (the routing post): least outstanding requests against random ----------------------------------------
REPORTED_P99_LOWER = (0.04, 0.33)       # LOR's P99 4-33% lower, from 5 to 20 instances
REPORTED_TPUT_HIGHER = (0.15, 0.16)     # LOR's throughput per instance per minute 15-16% higher


def _routing_run(instances: int, routing: str) -> dict:
    sc = sim.load_scenario(SCENARIOS / "routing_codegen2.yaml", [
        f"endpoints[0].instances={instances}", f"models[0].traffic.users={4 * instances}",
        f"endpoints[0].routing={routing}", "duration=40m"])
    o = sim.run(sc).summary["overall"]
    return {"p99": o["p99_ms"], "per_instance_per_min": o["throughput_per_s"] * 60 / instances}


def test_routing_lor_against_random_codegen2():
    rows = []
    for n in (1, 5, 10, 15, 20):
        lor, rnd = _routing_run(n, "least_outstanding_requests"), _routing_run(n, "random")
        p99_lower = 1 - lor["p99"] / rnd["p99"]
        tput_higher = lor["per_instance_per_min"] / rnd["per_instance_per_min"] - 1
        rows.append((n, 4 * n, f"{rnd['p99']:,.0f}", f"{lor['p99']:,.0f}", f"{p99_lower:.1%}",
                     f"{rnd['per_instance_per_min']:.1f}", f"{lor['per_instance_per_min']:.1f}",
                     f"{tput_higher:.1%}", p99_lower, tput_higher))
    _table("Routing, codegen2-7B-like on ml.g5.24xlarge, 4 closed-loop users per instance "
           "(reported from 5 to 20 instances: P99 4-33% lower, throughput/instance 15-16% higher)",
           ("instances", "users", "P99 random", "P99 LOR", "P99 lower", "req/min/inst random",
            "req/min/inst LOR", "tput higher"), [r[:8] for r in rows])
    one = rows[0]
    assert abs(one[8]) < 0.02 and abs(one[9]) < 0.02          # one instance: routing cannot matter
    for r in rows[1:]:
        n, p, t = r[0], r[8], r[9]
        assert REPORTED_P99_LOWER[0] <= p <= REPORTED_P99_LOWER[1], (n, p)   # within the reported range
        # More throughput per instance than the reported 15-16%: 24-29% with the slowdown curve of
        # routing_codegen2.yaml (the Forethought post's T4 figure, transferred), 33-38% with full-speed slots. Under
        # the curve an instance that random routing leaves with 1-2 requests runs them faster, which
        # narrows the gap; what is left is random's idle instances. Tolerance: 18-35%.
        assert 0.18 <= t <= 0.35, (n, t)


def _short(routing: str, rho: float, mean: float = 0.003, n: int = 4, requests: int = 100_000) -> dict:
    rate = rho * n / mean
    d = {"name": "short", "seed": 3, "duration": requests / rate, "warmup": 0,
         "models": [{"name": "m", "size_gb": 1, "service": {"dist": "exponential", "mean": mean},
                     "traffic": {"process": "poisson", "rate": rate}}],
         "endpoints": [{"name": "e", "mode": "sme", "instance_type": "ml.g5.xlarge", "instances": n,
                        "routing": routing, "max_concurrency": 1, "models": ["m"]}]}
    return sim.run(parse_scenario(d, source="short")).summary["overall"]


def test_routing_with_a_few_ms_of_service_exact_lor_never_loses():
    # The source: "with very short latencies random may do better". capsim's least-outstanding router
    # sees every instance's in-flight count exactly and at once, and joining the shortest queue of
    # identical servers is never worse than random: it cannot show random winning. What does, in a
    # real router, is a lagging view of the counts that herds requests onto the instance that looked
    # least loaded: `routing_refresh` (the tests below).
    rows = []
    for rho in (0.2, 0.5, 0.8):
        lor, rnd = _short("least_outstanding_requests", rho), _short("random", rho)
        rows.append((rho, f"{rnd['p99_ms']:.1f}", f"{lor['p99_ms']:.1f}", lor["p99_ms"], rnd["p99_ms"]))
    _table("Routing, 3 ms exponential service, 4 instances (exact LOR)", ("utilisation", "P99 random ms",
                                                                          "P99 LOR ms"), [r[:3] for r in rows])
    for rho, _, _, lor, rnd in rows:
        assert lor <= rnd, rho


# -- Routing on a view of the counts refreshed every second (scenarios/routing_refresh.yaml) -------------
LONG = ["models[0].service.mean=500ms", "models[0].traffic.rate=20/s", "duration=1h", "warmup=1m"]


def _refresh_run(routing: str, seed: int, extra: list[str], refresh: str | None = "1s") -> float:
    sc = sim.load_scenario(SCENARIOS / "routing_refresh.yaml", [
        f"endpoints[0].routing={routing}", f"endpoints[0].routing_refresh={refresh or 'null'}", *extra])
    return sim.run(sc, seed=seed).summary["overall"]["p99_ms"]


def _refresh_table(seeds: tuple[int, ...], extra: list[str], label: str) -> list[dict]:
    rows = []
    for seed in seeds:
        rows.append({"seed": seed, "random": _refresh_run("random", seed, extra),
                     "lor_exact": _refresh_run("least_outstanding_requests", seed, extra, None),
                     "lor": _refresh_run("least_outstanding_requests", seed, extra),
                     "p2c": _refresh_run("power_of_two", seed, extra)})
    _table(f"Routing, {label}, 20 instances at 50% utilisation, router view refreshed every 1 s "
           "(P99 ms; the source: random may do better with very short latencies)",
           ("seed", "random", "LOR exact view", "LOR 1 s view", "power_of_two 1 s view", "LOR / random"),
           [(r["seed"], f"{r['random']:,.1f}", f"{r['lor_exact']:,.1f}", f"{r['lor']:,.1f}", f"{r['p2c']:,.1f}",
             f"{r['lor'] / r['random']:.2f}") for r in rows])
    return rows


def test_routing_refresh_random_beats_lor_with_a_few_ms_of_service():
    # 4 ms of service, 2,500 requests/s: between two refreshes ~2,500 requests herd onto the instances
    # that looked idle. Tolerance: LOR's P99 at least 2x random's on each seed (capsim gives ~6-9x).
    rows = _refresh_table((3, 5), [], "4 ms exponential service")
    for r in rows:
        assert r["lor"] >= 2.0 * r["random"], r
        assert r["lor_exact"] <= r["random"], r          # exact LOR still never loses: the view is what does
        assert r["p2c"] < r["lor"], r                     # two random choices herd less (Mitzenmacher 2000)


def test_routing_refresh_lor_still_beats_random_with_hundreds_of_ms_of_service():
    # 500 ms of service, 20 requests/s: a second of staleness is two service times and ~20 requests.
    # Tolerance: LOR's P99 at least 10% below random's on each seed (capsim gives ~20%), and no better
    # than with the exact view.
    rows = _refresh_table((3, 5), LONG, "500 ms exponential service")
    for r in rows:
        assert r["lor"] <= 0.9 * r["random"], r
        assert r["lor_exact"] <= r["lor"], r


def test_routing_refresh_changes_nothing_for_policies_that_read_no_counts():
    for routing in ("random", "round_robin"):
        assert _refresh_run(routing, 3, ["duration=20s"]) == _refresh_run(routing, 3, ["duration=20s"], None)


def test_routing_refresh_key_is_a_positive_duration():
    import pytest

    from sim.scenario import ScenarioError

    base = SCENARIOS / "routing_refresh.yaml"
    assert sim.load_scenario(base).endpoints[0].spec.routing_refresh == 1.0
    assert sim.load_scenario(base, ["endpoints[0].routing_refresh=250ms"]).endpoints[0].spec.routing_refresh == 0.25
    with pytest.raises(ScenarioError, match=r"endpoints\[0\]\.routing_refresh.*at least 1ms"):
        sim.load_scenario(base, ["endpoints[0].routing_refresh=0"])
    with pytest.raises(ScenarioError, match="unknown key 'routing_refesh'"):
        sim.load_scenario(base, ["endpoints[0].routing_refesh=1s"])
