"""The instance-type, GPU and model-architecture catalog: three YAML data files and a small loader.

``instances.yaml`` lists SageMaker instance types (hardware, storage, network,
on-demand price), ``gpus.yaml`` the accelerators they carry and ``models.yaml``
language-model architectures (:class:`Architecture`: the figures of each
model's published config, and the bytes and FLOPs derived from them). All live
next to this module; every entry names its source and the date its figures
were taken. :func:`load_catalog` reads and validates them once (cached).

    >>> from sim.catalog import load_catalog
    >>> cat = load_catalog()
    >>> cat.instance("ml.g5.xlarge").gpu_memory_gb
    24.0
    >>> cat.table()          # one row per instance type, cheapest first
    >>> cat.architecture("llama-2-7b").kv_bytes_per_token    # 2 x 32 layers x 32 x 128 x 2 bytes
    524288.0

A scenario adds or overrides instance types with :meth:`Catalog.with_instance_types`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import functools
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import yaml

__all__ = [
    "Architecture",
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
    ``nvlink_gbs`` is the per-direction NVLink bandwidth of one GPU to the
    others of its instance, ``None`` where the GPUs of an instance talk over
    PCIe only (:attr:`interconnect_gbs` is the one tensor parallelism uses).
    """

    name: str
    memory_gb: float
    memory_bandwidth_gbs: float
    fp16_tflops: float | None
    bf16_tflops: float | None
    pcie_gen: int
    pcie_bandwidth_gbs: float
    nvlink_gbs: float | None = None
    source: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if self.nvlink_gbs is not None and not self.nvlink_gbs > 0:
            raise ValueError(f"nvlink_gbs: must be > 0 or null, got {self.nvlink_gbs!r}")
        for f in ("memory_gb", "memory_bandwidth_gbs", "pcie_bandwidth_gbs"):
            if not getattr(self, f) > 0:
                raise ValueError(f"{f}: must be > 0, got {getattr(self, f)!r}")
        for f in ("fp16_tflops", "bf16_tflops"):
            v = getattr(self, f)
            if v is not None and not v > 0:
                raise ValueError(f"{f}: must be > 0 or null, got {v!r}")
        if self.pcie_gen < 1:
            raise ValueError(f"pcie_gen: must be >= 1, got {self.pcie_gen!r}")

    @property
    def interconnect_gbs(self) -> float:
        """GB/s per direction between two GPUs of one instance: NVLink where there is, else PCIe."""
        return self.nvlink_gbs if self.nvlink_gbs is not None else self.pcie_bandwidth_gbs

    @property
    def peak_tflops(self) -> float | None:
        """The dense 16-bit tensor peak: bf16 where the part has it, else fp16."""
        return self.bf16_tflops or self.fp16_tflops


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


@dataclass(frozen=True)
class Architecture:
    """A decoder-only language model's architecture, from its published config. Units: bytes, FLOPs.

    ``params`` counts every parameter (embeddings and output head included); ``dtype_bytes`` is the
    bytes of one weight and of one KV-cache element as served (2 for fp16/bf16). A mixture-of-experts
    model sets ``experts`` and ``experts_per_token``; a dense one leaves both ``None``.

    The derived figures assume a gated MLP for the experts (gate, up and down projections of
    ``hidden x intermediate`` each, as Mixtral's) and ``head_dim = hidden / heads``.
    """

    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype_bytes: float = 2.0
    experts: int | None = None
    experts_per_token: int | None = None
    source: str = ""
    date: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        for f in ("params", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{f}: must be a whole number >= 1, got {v!r}")
        if not (0 < self.dtype_bytes <= 8) or math.isinf(self.dtype_bytes):
            raise ValueError(f"dtype_bytes: must be > 0 and at most 8 (2 for fp16/bf16), got {self.dtype_bytes!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden: {self.hidden} is not a multiple of heads ({self.heads}); head_dim = "
                             "hidden / heads must be whole")
        if self.kv_heads > self.heads or self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: {self.kv_heads} must divide heads ({self.heads}) (grouped-query "
                             "attention shares each KV head among heads / kv_heads query heads)")
        if (self.experts is None) != (self.experts_per_token is None):
            raise ValueError("experts: a mixture-of-experts model needs both experts and experts_per_token; "
                             "a dense model neither")
        if self.experts is not None:
            if self.experts < 1 or not 1 <= self.experts_per_token <= self.experts:
                raise ValueError(f"experts_per_token: expected between 1 and experts ({self.experts}), got "
                                 f"{self.experts_per_token!r}")
            if self.expert_params >= self.params:
                raise ValueError(f"params: {self.params} is not more than the experts' {self.expert_params} "
                                 f"(layers x experts x 3 x hidden x intermediate); check params and intermediate")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def is_moe(self) -> bool:
        return self.experts is not None

    @property
    def weight_bytes(self) -> float:
        """Bytes of all the weights: ``params x dtype_bytes`` (the model's default ``size_gb``)."""
        return self.params * self.dtype_bytes

    @property
    def weight_gb(self) -> float:
        return self.weight_bytes / 1e9

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes of one token: ``2 x layers x kv_heads x head_dim x dtype_bytes``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def kv_bytes_per_token_per_gpu(self, tp: int) -> float:
        """KV-cache bytes of one token on each of ``tp`` tensor-parallel GPUs. Each holds
        ``kv_heads / tp`` KV heads, and a whole one when ``tp`` exceeds ``kv_heads`` (the KV heads are
        then replicated: vLLM's ``max(1, kv_heads // tp)``)."""
        return 2 * self.layers * max(1, self.kv_heads // tp) * self.head_dim * self.dtype_bytes

    @property
    def expert_params(self) -> int:
        """Parameters in the experts' MLPs (0 for a dense model): ``layers x experts x 3 x hidden x
        intermediate``."""
        return self.layers * self.experts * 3 * self.hidden * self.intermediate if self.experts else 0

    @property
    def shared_params(self) -> int:
        """Parameters every token uses: all but the experts' (attention, norms, routers, embeddings)."""
        return self.params - self.expert_params

    @property
    def active_params(self) -> float:
        """Parameters one token uses: the shared ones and ``experts_per_token / experts`` of the
        experts' (all of them for a dense model)."""
        if not self.experts:
            return float(self.params)
        return self.shared_params + self.expert_params * self.experts_per_token / self.experts

    @property
    def flops_per_token(self) -> float:
        """FLOPs of one token's forward pass through the weights: ``2 x active params``."""
        return 2.0 * self.active_params

    @property
    def attention_flops_per_kv_token(self) -> float:
        """FLOPs of one query token against one cached token: ``4 x layers x heads x head_dim``
        (the score ``q.k`` and the weighted value, a multiply-add each per dimension and head)."""
        return 4.0 * self.layers * self.heads * self.head_dim

    def experts_touched(self, tokens: float) -> float:
        """The expected fraction of each layer's experts that ``tokens`` tokens route to, when each
        token picks ``experts_per_token`` of ``experts`` uniformly and independently: ``1 - (1 -
        k/E)^tokens`` (1 for a dense model). Mixtral (2 of 8): 0.25 at one token, 0.90 at 8, 0.99 at 16."""
        if not self.experts:
            return 1.0
        if tokens <= 0:
            return 0.0
        return 1.0 - (1.0 - self.experts_per_token / self.experts) ** tokens

    def weight_bytes_read(self, tokens: float | None = None) -> float:
        """Weight bytes one step reads with ``tokens`` tokens in it: the shared weights and the
        experts the tokens touch (:meth:`experts_touched`); every weight when ``tokens`` is None,
        and always for a dense model."""
        if not self.experts or tokens is None:
            return self.weight_bytes
        return (self.shared_params + self.expert_params * self.experts_touched(tokens)) * self.dtype_bytes

    @property
    def allreduce_bytes_per_token(self) -> float:
        """Bytes of one token's activation in a tensor-parallel all-reduce: ``hidden x dtype_bytes``."""
        return self.hidden * self.dtype_bytes


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


MODEL_COLUMNS = [
    "name", "params", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "dtype_bytes",
    "experts", "experts_per_token", "active_params", "weight_gb", "kv_bytes_per_token", "flops_per_token",
    "source", "date",
]


@dataclass(frozen=True)
class Catalog:
    """Instance types, GPU specs and model architectures by name (read-only mappings)."""

    instance_types: Mapping[str, InstanceType]
    gpus: Mapping[str, GPUSpec]
    architectures: Mapping[str, Architecture] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read-only views, so the cached catalog cannot be changed by accident.
        object.__setattr__(self, "instance_types", MappingProxyType(dict(self.instance_types)))
        object.__setattr__(self, "gpus", MappingProxyType(dict(self.gpus)))
        object.__setattr__(self, "architectures", MappingProxyType(dict(self.architectures)))

    def architecture(self, name: str) -> Architecture:
        """The model architecture ``name``; :class:`UnknownNameError` (a KeyError) if unknown."""
        try:
            return self.architectures[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown architecture {name!r}{_suggest(name, self.architectures)}; "
                f"expected one of {', '.join(self.architectures)} (capsim catalog --models) or a mapping"
            ) from None

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
        return Catalog(merged, self.gpus, self.architectures)

    def table(self) -> "pandas.DataFrame":  # noqa: F821
        """One row per instance type, cheapest first (ties by name)."""
        import pandas as pd

        rows = []
        for it in self.instance_types.values():
            row = {c: getattr(it, c) for c in TABLE_COLUMNS}
            rows.append(row)
        df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return df.sort_values(["price_per_hour", "name"], kind="stable").reset_index(drop=True)

    def models_table(self) -> "pandas.DataFrame":  # noqa: F821
        """One row per model architecture, in catalog order, with the derived figures."""
        import pandas as pd

        rows = [{c: getattr(a, c) for c in MODEL_COLUMNS} for a in self.architectures.values()]
        return pd.DataFrame(rows, columns=MODEL_COLUMNS)


# ----------------------------------------------------------------------------- loading

def _field_kinds(cls: type) -> dict[str, str]:
    """Field name -> kind ('str', 'int', 'float', 'float?', 'str?') from the annotations."""
    kinds = {}
    for f in dataclasses.fields(cls):
        t = str(f.type).replace(" ", "")
        kinds[f.name] = {
            "str": "str", "int": "int", "float": "float",
            "float|None": "float?", "str|None": "str?", "int|None": "int?",
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


def load_catalog_files(instances_path: str | Path, gpus_path: str | Path,
                       models_path: str | Path | None = None) -> Catalog:
    """Read and validate a catalog from two or three YAML files (see :func:`load_catalog`); without
    ``models_path`` the catalog has no architectures.

    Raises ValueError naming the file, the entry and the field on a missing or
    unknown field, a value of the wrong type or range, or an instance type whose
    ``gpu`` is not in the GPU file.
    """
    return _load(Path(instances_path), Path(gpus_path), None if models_path is None else Path(models_path))


def _load(instances_path: Any, gpus_path: Any, models_path: Any = None) -> Catalog:
    glabel, ilabel = gpus_path.name, instances_path.name
    architectures = {}
    if models_path is not None:
        architectures = {
            name: _parse_entry(Architecture, name, entry, models_path.name)
            for name, entry in _read_yaml(models_path, models_path.name).items()
        }
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
    return Catalog(instance_types, gpus, architectures)


@functools.lru_cache(maxsize=None)
def load_catalog() -> Catalog:
    """The built-in catalog: ``instances.yaml``, ``gpus.yaml`` and ``models.yaml`` next to this module
    (cached)."""
    here = resources.files(__name__)
    return _load(here / "instances.yaml", here / "gpus.yaml", here / "models.yaml")
