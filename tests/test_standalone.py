"""The project stands alone (issue 22, item 7): no file points outside it (the documents it was
written from are cited by their public titles and URLs), and what the README shows of custom
instance types works as written."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from sim.scenario import parse_scenario

REPO = Path(__file__).resolve().parents[1]
# Names of files that live outside the project, built so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"MISSION\.md", r"DESIGN\.md", r"STYLE\.md", r"\.\./" + "shared",
                               r"\bseeds? 00\d"]), re.IGNORECASE)


def _project_files():
    yield REPO / "README.md"
    yield REPO / "Makefile"
    for top in ("sim", "calibration", "scenarios", "tests", "notebooks"):
        for p in sorted((REPO / top).rglob("*")):
            if p.suffix in (".py", ".yaml", ".yml", ".md", ".ipynb") and p.is_file() and p != Path(__file__):
                yield p


def test_no_file_points_outside_the_project():
    hits = []
    for p in _project_files():
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_scenarios_that_reproduce_a_source_cite_its_url():
    urls = {"forethought": "how-forethought-saves-over-66-in-costs",
            "salesforce": "optimizing-salesforces-model-endpoints",
            "routing_codegen2": "minimize-real-time-inference-latency",
            "routing_refresh": "minimize-real-time-inference-latency",
            "mme_az_outage": "multi-model-endpoint-instance.html"}
    readme = (REPO / "README.md").read_text()
    for p in sorted((REPO / "scenarios").glob("*.yaml")):
        for prefix, slug in urls.items():
            if p.stem.startswith(prefix):
                assert slug in p.read_text(), p.name
                assert slug in readme                   # and the README's Sources explain it


def test_readme_custom_instance_type_example_works():
    text = (REPO / "README.md").read_text()
    block = text.split("#### Instance types of your own")[1].split("```yaml\n")[1].split("```")[0]
    types = yaml.safe_load(block)["instance_types"]
    d = {"name": "t", "duration": 60, "instance_types": types,
         "models": [{"name": "m", "size_gb": 1, "service": {"dist": "exponential", "mean": "20ms"},
                     "traffic": {"process": "poisson", "rate": "5/s"}}],
         "endpoints": [{"name": "e", "mode": "sme", "instance_type": types[0]["name"], "instances": 1,
                        "models": ["m"]}]}
    sc = parse_scenario(d, source="readme")
    it = sc.endpoints[0].instance_type
    assert (it.gpus, it.gpu, it.price_per_hour, it.storage) == (1, "A10G", 1.10, "nvme")
