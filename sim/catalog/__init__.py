"""The instance-type and GPU catalog: two YAML data files and a small loader.

``instances.yaml`` lists SageMaker instance types (hardware, storage, network,
on-demand price) and ``gpus.yaml`` the accelerators they carry. Both live next
to this module; every entry names its source and the date its figures were
taken. :func:`load_catalog` reads and validates them once (cached).

    >>> from sim.catalog import load_catalog
    >>> cat = load_catalog()
    >>> cat.instance("ml.g5.xlarge").gpu_memory_gb
    24.0
    >>> cat.table()          # one row per instance type, cheapest first

A scenario adds or overrides instance types with :meth:`Catalog.with_instance_types`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import yaml

__all__ = [
    "GPUSpec",
    "InstanceType",
    "Catalog",
    "UnknownNameError",
    "load_catalog",
    "load_catalog_files",
]

STORAGE_KINDS = ("nvme", "ebs")


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator (a GPU, or an Inferentia2 chip). Units: GB, GB/s, TFLOPS.

    ``fp16_tflops`` and ``bf16_tflops`` are dense tensor-core peaks (no
    sparsity), ``None`` where the part has no such path. ``pcie_bandwidth_gbs``
    is the theoretical per-direction bandwidth of an x16 link of ``pcie_gen``.
    """

    name: str
    memory_gb: float
    memory_bandwidth_gbs: float
    fp16_tflops: float | None
    bf16_tflops: float | None
    pcie_gen: int
    pcie_bandwidth_gbs: float
    source: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        for f in ("memory_gb", "memory_bandwidth_gbs", "pcie_bandwidth_gbs"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f}: must be > 0, got {getattr(self, f)!r}")
        for f in ("fp16_tflops", "bf16_tflops"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"{f}: must be > 0 or null, got {v!r}")
        if self.pcie_gen < 1:
            raise ValueError(f"pcie_gen: must be >= 1, got {self.pcie_gen!r}")


@dataclass(frozen=True)
class InstanceType:
    """One instance type. Units: GB (memory, storage), GB/s (disk), Gbit/s (network), USD/hour.

    ``gpu_memory_gb`` is per accelerator; ``gpu`` names a :class:`GPUSpec` of the
    catalog (``None`` for CPU types or for a scenario's custom type).
    """

    name: str
    gpus: int
    gpu_memory_gb: float
    vcpus: int
    memory_gb: float
    price_per_hour: float
    gpu: str | None = None
    storage: str = "ebs"
    storage_gb: float = 30.0
    disk_read_gbs: float = 0.25
    network_gbps: float = 10.0
    source: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if self.gpus < 0:
            raise ValueError(f"gpus: must be >= 0, got {self.gpus!r}")
        if self.vcpus < 1:
            raise ValueError(f"vcpus: must be >= 1, got {self.vcpus!r}")
        for f in ("gpu_memory_gb", "memory_gb", "price_per_hour", "storage_gb"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f}: must be >= 0, got {getattr(self, f)!r}")
        for f in ("disk_read_gbs", "network_gbps"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f}: must be > 0, got {getattr(self, f)!r}")
        if self.gpus > 0 and not self.gpu_memory_gb > 0:
            raise ValueError("gpu_memory_gb: an instance type with gpus > 0 needs gpu_memory_gb > 0")
        if self.storage not in STORAGE_KINDS:
            raise ValueError(f"storage: expected one of {', '.join(STORAGE_KINDS)}, got {self.storage!r}")

    @property
    def total_gpu_memory_gb(self) -> float:
        """Device memory of all accelerators of one instance, GB."""
        return self.gpus * self.gpu_memory_gb

    @property
    def is_gpu(self) -> bool:
        """True when the instance has accelerators (GPUs or Inferentia chips)."""
        return self.gpus > 0


class UnknownNameError(KeyError):
    """A name not in the catalog. ``args[0]`` (and ``str()``) is the whole message,
    with a ``(did you mean X?)`` suggestion when a close match exists."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


def _suggest(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


TABLE_COLUMNS = [
    "name", "gpu", "gpus", "gpu_memory_gb", "total_gpu_memory_gb", "vcpus", "memory_gb",
    "storage", "storage_gb", "disk_read_gbs", "network_gbps", "price_per_hour", "source", "date",
]


@dataclass(frozen=True)
class Catalog:
    """Instance types and GPU specs by name (read-only mappings)."""

    instance_types: Mapping[str, InstanceType]
    gpus: Mapping[str, GPUSpec]

    def __post_init__(self) -> None:
        # Read-only views, so the cached catalog cannot be changed by accident.
        object.__setattr__(self, "instance_types", MappingProxyType(dict(self.instance_types)))
        object.__setattr__(self, "gpus", MappingProxyType(dict(self.gpus)))

    def instance(self, name: str) -> InstanceType:
        """The instance type ``name``; :class:`UnknownNameError` (a KeyError) if unknown."""
        try:
            return self.instance_types[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown instance type {name!r}{_suggest(name, self.instance_types)}"
            ) from None

    def gpu_spec(self, name: str) -> GPUSpec:
        """The GPU spec ``name``; :class:`UnknownNameError` (a KeyError) if unknown."""
        try:
            return self.gpus[name]
        except KeyError:
            raise UnknownNameError(f"unknown GPU {name!r}{_suggest(name, self.gpus)}") from None

    def with_instance_types(self, extra: Iterable[InstanceType]) -> "Catalog":
        """A new catalog with ``extra`` added; an entry of ``extra`` replaces one of the same name.

        Raises ValueError when an entry names a GPU this catalog does not know.
        """
        merged = dict(self.instance_types)
        for it in extra:
            if not isinstance(it, InstanceType):
                raise TypeError(f"expected InstanceType, got {type(it).__name__}")
            if it.gpu is not None and it.gpu not in self.gpus:
                raise ValueError(
                    f"instance type {it.name!r}: unknown GPU {it.gpu!r}{_suggest(it.gpu, self.gpus)}"
                )
            merged[it.name] = it
        return Catalog(merged, self.gpus)

    def table(self) -> "pandas.DataFrame":  # noqa: F821
        """One row per instance type, cheapest first (ties by name)."""
        import pandas as pd

        rows = []
        for it in self.instance_types.values():
            row = {c: getattr(it, c) for c in TABLE_COLUMNS}
            rows.append(row)
        df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return df.sort_values(["price_per_hour", "name"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- loading

def _field_kinds(cls: type) -> dict[str, str]:
    """Field name -> kind ('str', 'int', 'float', 'float?', 'str?') from the annotations."""
    kinds = {}
    for f in dataclasses.fields(cls):
        t = str(f.type).replace(" ", "")
        kinds[f.name] = {
            "str": "str", "int": "int", "float": "float",
            "float|None": "float?", "str|None": "str?",
        }[t]
    return kinds


def _convert(value: Any, kind: str, where: str) -> Any:
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind == "str":
        if isinstance(value, (_dt.date, _dt.datetime)):
            return value.isoformat()
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if kind == "int":
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{where}: expected a whole number, got {value!r}")
        return int(value)
    return float(value)


def _parse_entry(cls: type, name: Any, data: Any, where: str) -> Any:
    """Build ``cls`` from one YAML entry; every field is required, unknown fields are errors."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: entry names must be non-empty strings, got {name!r}")
    here = f"{where}: {name}"
    if not isinstance(data, Mapping):
        raise ValueError(f"{here}: expected a mapping of fields, got {data!r}")
    kinds = _field_kinds(cls)
    kinds.pop("name")
    for key in data:
        if key not in kinds:
            raise ValueError(
                f"{here}: unknown field {key!r}{_suggest(str(key), kinds)}; "
                f"expected {', '.join(kinds)}"
            )
    missing = [k for k in kinds if k not in data]
    if missing:
        raise ValueError(f"{here}: missing field {missing[0]!r}" + (
            f" (and {', '.join(repr(m) for m in missing[1:])})" if len(missing) > 1 else ""))
    values = {k: _convert(data[k], kind, f"{here}.{k}") for k, kind in kinds.items()}
    try:
        return cls(name=name, **values)
    except ValueError as e:
        raise ValueError(f"{here}.{e}") from None


def _read_yaml(path: Any, label: str) -> Mapping:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{label}: cannot read ({e})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{label}: not valid YAML ({e})") from None
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"{label}: expected a mapping of entries by name")
    return data


def load_catalog_files(instances_path: str | Path, gpus_path: str | Path) -> Catalog:
    """Read and validate a catalog from two YAML files (see :func:`load_catalog`).

    Raises ValueError naming the file, the entry and the field on a missing or
    unknown field, a value of the wrong type or range, or an instance type whose
    ``gpu`` is not in the GPU file.
    """
    return _load(Path(instances_path), Path(gpus_path))


def _load(instances_path: Any, gpus_path: Any) -> Catalog:
    glabel, ilabel = gpus_path.name, instances_path.name
    gpus = {
        name: _parse_entry(GPUSpec, name, entry, glabel)
        for name, entry in _read_yaml(gpus_path, glabel).items()
    }
    instance_types: dict[str, InstanceType] = {}
    for name, entry in _read_yaml(instances_path, ilabel).items():
        it = _parse_entry(InstanceType, name, entry, ilabel)
        if it.gpu is not None and it.gpu not in gpus:
            raise ValueError(
                f"{ilabel}: {name}.gpu: unknown GPU {it.gpu!r}{_suggest(it.gpu, gpus)}; "
                f"{glabel} has {', '.join(gpus)}"
            )
        if it.gpus > 0 and it.gpu is None:
            raise ValueError(f"{ilabel}: {name}.gpu: an instance type with gpus > 0 must name its GPU")
        instance_types[name] = it
    return Catalog(instance_types, gpus)


@functools.lru_cache(maxsize=None)
def load_catalog() -> Catalog:
    """The built-in catalog: ``instances.yaml`` and ``gpus.yaml`` next to this module (cached)."""
    here = resources.files(__name__)
    return _load(here / "instances.yaml", here / "gpus.yaml")
