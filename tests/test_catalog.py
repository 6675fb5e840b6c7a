"""The built-in instance-type and GPU catalog (sim.catalog)."""
from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from sim.catalog import (
    Catalog,
    GPUSpec,
    InstanceType,
    UnknownNameError,
    load_catalog,
    load_catalog_files,
)

CATALOG_DIR = Path(__file__).resolve().parents[1] / "sim" / "catalog"

REQUIRED_TYPES = [
    "ml.g4dn.xlarge", "ml.g4dn.2xlarge",
    "ml.g5.xlarge", "ml.g5.2xlarge", "ml.g5.12xlarge", "ml.g5.24xlarge", "ml.g5.48xlarge",
    "ml.g6.xlarge", "ml.g6e.xlarge",
    "ml.p4d.24xlarge", "ml.p5.48xlarge", "ml.p5en.48xlarge",
    "ml.inf2.xlarge",
    "ml.m5.xlarge", "ml.c5.xlarge", "ml.c5.2xlarge",
]
REQUIRED_GPUS = ["T4", "A10G", "L4", "L40S", "A100-40GB", "H100", "H200", "Inferentia2"]


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return load_catalog()


def test_required_types_and_gpus_present(cat):
    missing = [n for n in REQUIRED_TYPES if n not in cat.instance_types]
    assert not missing
    assert not [g for g in REQUIRED_GPUS if g not in cat.gpus]


def test_prices_positive_and_provenance(cat):
    for it in cat.instance_types.values():
        assert it.price_per_hour > 0, it.name
        assert it.source, it.name
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", it.date), it.name
    for g in cat.gpus.values():
        assert g.source and re.fullmatch(r"\d{4}-\d{2}-\d{2}", g.date), g.name


def test_gpu_keys_resolve(cat):
    for it in cat.instance_types.values():
        if it.is_gpu:
            spec = cat.gpu_spec(it.gpu)
            assert spec.name == it.gpu
            assert it.gpu_memory_gb == spec.memory_gb, it.name
        else:
            assert it.gpu is None and it.gpu_memory_gb == 0 and it.total_gpu_memory_gb == 0


def test_storage_kinds(cat):
    for name in REQUIRED_TYPES:
        it = cat.instance(name)
        family = name.split(".")[1]
        expected = "nvme" if family in {"g4dn", "g5", "g6", "g6e", "p4d", "p5", "p5en"} else "ebs"
        assert it.storage == expected, name
        assert it.disk_read_gbs > 0 and it.network_gbps > 0 and it.storage_gb > 0
    assert cat.instance("ml.m5.xlarge").storage_gb == 30


def test_g4dn(cat):
    x = cat.instance("ml.g4dn.xlarge")
    assert (x.gpus, x.gpu, x.gpu_memory_gb, x.vcpus, x.memory_gb) == (1, "T4", 16, 4, 16)
    assert x.is_gpu and x.total_gpu_memory_gb == 16
    x2 = cat.instance("ml.g4dn.2xlarge")
    assert (x2.gpus, x2.gpu, x2.gpu_memory_gb, x2.memory_gb) == (1, "T4", 16, 32)


def test_big_instances(cat):
    p4d = cat.instance("ml.p4d.24xlarge")
    assert (p4d.gpus, p4d.gpu, p4d.gpu_memory_gb, p4d.total_gpu_memory_gb) == (8, "A100-40GB", 40, 320)
    p5en = cat.instance("ml.p5en.48xlarge")
    assert p5en.gpu == "H200" and p5en.gpus == 8 and p5en.gpu_memory_gb == 141
    assert cat.instance("ml.p5.48xlarge").gpu == "H100"
    inf2 = cat.instance("ml.inf2.xlarge")
    assert (inf2.gpus, inf2.gpu) == (1, "Inferentia2")
    assert not cat.instance("ml.c5.xlarge").is_gpu


def test_gpu_specs(cat):
    assert cat.gpu_spec("T4").bf16_tflops is None
    assert cat.gpu_spec("H200").memory_gb == 141
    assert cat.gpu_spec("H100").pcie_bandwidth_gbs == 63
    a100 = cat.gpu_spec("A100-40GB")
    assert (a100.memory_bandwidth_gbs, a100.bf16_tflops) == (1555, 312)


def test_unknown_name_suggests(cat):
    with pytest.raises(KeyError) as ei:
        cat.instance("ml.g5.xlarg")
    assert isinstance(ei.value, UnknownNameError)
    assert "did you mean ml.g5.xlarge?" in str(ei.value)
    assert "did you mean ml.g5.xlarge?" in ei.value.args[0]
    with pytest.raises(KeyError, match="did you mean H100"):
        cat.gpu_spec("H10O")
    with pytest.raises(KeyError) as ei:
        cat.instance("zzz")
    assert "did you mean" not in str(ei.value)


def test_with_instance_types_overrides(cat):
    cheap = dataclasses.replace(cat.instance("ml.g5.xlarge"), price_per_hour=0.5, source="test")
    new = InstanceType(name="test.gpu1", gpus=1, gpu_memory_gb=10, vcpus=8, memory_gb=64, price_per_hour=1.0)
    cat2 = cat.with_instance_types([cheap, new])
    assert cat2.instance("ml.g5.xlarge").price_per_hour == 0.5
    assert cat2.instance("test.gpu1").gpu is None
    assert len(cat2.instance_types) == len(cat.instance_types) + 1
    # the original (cached) catalog is untouched, and stays read-only
    assert cat.instance("ml.g5.xlarge").price_per_hour == 1.408
    assert "test.gpu1" not in cat.instance_types
    with pytest.raises(TypeError):
        cat.instance_types["x"] = new  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown GPU 'H1000'"):
        cat.with_instance_types([dataclasses.replace(new, gpu="H1000")])


def test_table_sorted_by_price(cat):
    df = cat.table()
    assert len(df) == len(cat.instance_types)
    for col in ("name", "gpu", "gpus", "gpu_memory_gb", "vcpus", "memory_gb", "storage",
                "network_gbps", "price_per_hour", "source", "date"):
        assert col in df.columns
    assert df["price_per_hour"].is_monotonic_increasing
    assert df.iloc[0]["name"] == "ml.c5.xlarge"


def test_load_catalog_is_cached():
    assert load_catalog() is load_catalog()


def test_dataclasses_frozen_and_validated(cat):
    with pytest.raises(dataclasses.FrozenInstanceError):
        cat.instance("ml.g5.xlarge").price_per_hour = 0  # type: ignore[misc]
    with pytest.raises(ValueError, match="gpu_memory_gb"):
        InstanceType(name="x", gpus=1, gpu_memory_gb=0, vcpus=4, memory_gb=16, price_per_hour=1)
    with pytest.raises(ValueError, match="storage"):
        InstanceType(name="x", gpus=0, gpu_memory_gb=0, vcpus=4, memory_gb=16, price_per_hour=1,
                     storage="s3")
    with pytest.raises(ValueError, match="pcie_gen"):
        GPUSpec(name="g", memory_gb=1, memory_bandwidth_gbs=1, fp16_tflops=None, bf16_tflops=None,
                pcie_gen=0, pcie_bandwidth_gbs=1)


# ---------------------------------------------------------------- validation of the files

@pytest.fixture
def files(tmp_path):
    inst, gpus = tmp_path / "instances.yaml", tmp_path / "gpus.yaml"
    shutil.copy(CATALOG_DIR / "instances.yaml", inst)
    shutil.copy(CATALOG_DIR / "gpus.yaml", gpus)
    return inst, gpus


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def test_copied_files_load(files):
    cat = load_catalog_files(*files)
    assert cat.instance_types.keys() == load_catalog().instance_types.keys()


def test_missing_field_names_file_entry_field(files):
    inst, gpus = files
    _edit(inst, "ml.g4dn.xlarge:\n  gpus: 1\n", "ml.g4dn.xlarge:\n")
    with pytest.raises(ValueError, match=r"instances\.yaml: ml\.g4dn\.xlarge: missing field 'gpus'"):
        load_catalog_files(inst, gpus)


def test_unknown_field_names_file_entry_field(files):
    inst, gpus = files
    _edit(gpus, "T4:\n", "T4:\n  tdp_watts: 70\n")
    with pytest.raises(ValueError, match=r"gpus\.yaml: T4: unknown field 'tdp_watts'"):
        load_catalog_files(inst, gpus)


def test_bad_value_names_file_entry_field(files):
    inst, gpus = files
    _edit(inst, "  vcpus: 4\n", "  vcpus: four\n")
    with pytest.raises(ValueError, match=r"instances\.yaml: ml\.g4dn\.xlarge\.vcpus: expected a number"):
        load_catalog_files(inst, gpus)


def test_unknown_gpu_key_rejected(files):
    inst, gpus = files
    _edit(inst, "  gpu: T4\n", "  gpu: T4G\n")
    with pytest.raises(ValueError, match=r"instances\.yaml: ml\.g4dn\.xlarge\.gpu: unknown GPU 'T4G' \(did you mean T4\?\)"):
        load_catalog_files(inst, gpus)


# -- catalog for scripts: --json and --csv (issue 22, item 7) -----------------------------------------
def _cli(*args):
    from click.testing import CliRunner

    from sim.cli import main

    return CliRunner().invoke(main, ["catalog", *args], catch_exceptions=False)


def test_catalog_json_and_csv_hold_every_type_and_field(cat):
    import io
    import json

    import pandas as pd

    r = _cli("--json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows] == list(cat.table()["name"])
    g5 = next(x for x in rows if x["name"] == "ml.g5.xlarge")
    assert g5["price_per_hour"] == cat.instance_types["ml.g5.xlarge"].price_per_hour
    assert g5["source"].startswith("https://") and "\\/" not in r.stdout      # plain URLs, not escaped
    assert next(x for x in rows if x["name"] == "ml.c5.xlarge")["gpu"] is None
    r = _cli("--csv")
    assert r.exit_code == 0
    df = pd.read_csv(io.StringIO(r.stdout))
    assert list(df["name"]) == [x["name"] for x in rows] and set(rows[0]) == set(df.columns)
    assert df.set_index("name").loc["ml.p4d.24xlarge", "gpus"] == 8


def test_catalog_gpus_and_models_for_scripts(cat):
    import io
    import json

    import pandas as pd

    gpus = {x["name"]: x for x in json.loads(_cli("--gpus", "--json").stdout)}
    assert set(gpus) == set(cat.gpus) and gpus["T4"]["memory_gb"] == cat.gpus["T4"].memory_gb
    assert set(pd.read_csv(io.StringIO(_cli("--gpus", "--csv").stdout))["name"]) == set(cat.gpus)
    models = pd.read_csv(io.StringIO(_cli("--models", "--csv").stdout))
    assert set(models["name"]) == set(cat.architectures)


def test_catalog_piped_table_keeps_whole_names(cat):
    r = _cli()      # CliRunner's stdout is no terminal: as a pipe
    assert r.exit_code == 0
    for name in cat.instance_types:
        assert name in r.stdout, name
    assert "…" not in r.stdout


def test_catalog_json_and_csv_together_refused():
    r = _cli("--json", "--csv")
    assert r.exit_code == 2 and "choose one" in r.stderr
