"""Whether a model fits an instance type: one place for the scenario resolver and the planner.

Each check takes anything with a model's sizes (``name``, ``memory_gb``, ``host_memory_gb``,
``size_gb``, ``accelerators``: a resolved :class:`~sim.scenario.resolve.Model` or the planner's
:class:`~sim.plan.load.ModelLoad`) and an :class:`~sim.catalog.InstanceType`, and returns
what does not fit as one sentence (None: it fits). The resolver raises that sentence as a
ScenarioError; the planner skips the type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..catalog import InstanceType

EPS = 1e-9
IC_MIN_MEMORY_GB = 0.128     # the memory a component's copy reserves at least (its default)


@dataclass(frozen=True)
class Fit:
    """Copies of a model one instance holds as a single-model endpoint, or why none fits."""

    copies: int
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.problem is None


def sme_fit(model: Any, it: InstanceType) -> Fit:
    """A single-model endpoint: copies per instance (its GPUs // the model's accelerators; 1 on a
    CPU type or for a CPU model), the model's GPU memory within its accelerators' and the copies'
    host memory within the instance's. The disk is not checked (see :func:`disk_problem`)."""
    if it.gpus > 0 and model.accelerators > 0:
        if model.accelerators > it.gpus:
            return Fit(0, f"model {model.name!r} needs {model.accelerators} accelerators but {it.name} has "
                          f"{it.gpus}")
        room = model.accelerators * it.gpu_memory_gb
        if model.memory_gb > room + EPS:
            return Fit(0, f"model {model.name!r} needs {model.memory_gb:g} GB of GPU memory but "
                          f"{model.accelerators} GPU(s) of {it.name} offer {room:g} GB; choose a larger instance "
                          "type or more accelerators")
        copies = it.gpus // model.accelerators
        host_one = model.host_memory_gb
    else:
        copies = 1
        host_one = model.memory_gb + model.host_memory_gb
    return Fit(copies, host_problem(model, it, host_one))


def host_problem(model: Any, it: InstanceType, host_needed: float) -> str | None:
    """The resolver's host-memory check of one copy (the planner checks all the copies)."""
    if host_needed > it.memory_gb + EPS:
        return f"model {model.name!r} needs {host_needed:g} GB of host memory but {it.name} has {it.memory_gb:g} GB"
    return None


def sme_copies(model: Any, it: InstanceType) -> int:
    """The planner's rule: copies of the model one instance of ``it`` holds as an SME with every
    copy's host memory and the artifact on its disk (0: it does not fit)."""
    if it.gpus > 0 and model.accelerators > 0:
        f = sme_fit(model, it)
        if f.problem is not None and f.copies == 0:
            return 0
        copies, host = f.copies, f.copies * model.host_memory_gb
    else:
        copies, host = 1, model.memory_gb + model.host_memory_gb
    return copies if host <= it.memory_gb + EPS and disk_problem(model, it) is None else 0


def disk_problem(model: Any, it: InstanceType, disk_gb: float | None = None) -> str | None:
    cap = it.storage_gb if disk_gb is None else disk_gb
    if model.size_gb > cap + EPS:
        return f"model {model.name!r} needs {model.size_gb:g} GB of disk but {it.name} offers {cap:g} GB"
    return None


def mme_problem(model: Any, it: InstanceType, cache: Any) -> str | None:
    """A model of a multi-model endpoint must fit, alone, in every memory tier of one instance:
    ``cache.memory_fraction`` of the GPU memory, host memory above ``cache.host_reserve`` and the
    disk (``cache.disk``, else the instance's storage)."""
    gpu_cap = it.total_gpu_memory_gb * cache.memory_fraction
    host_cap = it.memory_gb - cache.host_reserve
    disk_cap = cache.disk if getattr(cache, "disk", None) is not None else it.storage_gb
    gpu, host = (model.memory_gb, model.host_memory_gb) if it.gpus > 0 else \
        (0.0, model.memory_gb + model.host_memory_gb)
    for need, cap, tier in ((gpu, gpu_cap, "GPU memory for models (memory_fraction of the GPU memory)"),
                            (host, host_cap, "host memory above cache.host_reserve"),
                            (model.size_gb, disk_cap, "disk for artifacts")):
        if need > cap + EPS:
            return (f"model {model.name!r} needs {need:g} GB but one {it.name} offers {max(cap, 0):g} GB of {tier}; "
                    "choose a larger instance type")
    return None


def ic_accelerators(model: Any, it: InstanceType) -> int:
    """Accelerators the planner gives a component's copy: the model's, at least 1 on a GPU type, 0 on a CPU type."""
    return max(model.accelerators, 1) if it.gpus > 0 else 0


def ic_problem(model: Any, it: InstanceType, accelerators: int,
               memory_gb: float | None = None) -> tuple[str, str] | None:
    """A component's copy with ``accelerators`` GPUs and ``memory_gb`` of reserved memory (default: the
    model's, at least IC_MIN_MEMORY_GB) on one instance of ``it``: None where it fits, else the
    component's key at fault (``accelerators`` or ``memory_gb``) and why."""
    mem = max(model.memory_gb, IC_MIN_MEMORY_GB) if memory_gb is None else memory_gb
    if it.gpus > 0:
        if accelerators < 1:
            return "accelerators", (f"a copy on {it.name} (a GPU instance type) needs at least 1 accelerator "
                                    "(NumberOfAcceleratorDevicesRequired >= 1)")
        if accelerators > it.gpus:
            return "accelerators", (f"a copy of {model.name!r} asks for {accelerators} accelerators but {it.name} "
                                    f"has {it.gpus}")
        if model.memory_gb > accelerators * it.gpu_memory_gb + EPS:
            return "accelerators", (f"model {model.name!r} needs {model.memory_gb:g} GB of GPU memory but "
                                    f"{accelerators} GPU(s) of {it.name} offer {accelerators * it.gpu_memory_gb:g} "
                                    "GB; give each copy more accelerators or choose a larger instance type")
    elif accelerators > 0:
        return "accelerators", f"{it.name} has no GPUs: set accelerators: 0"
    if mem > it.memory_gb + EPS:
        return "memory_gb", (f"a copy of {model.name!r} reserves {mem:g} GB of memory but {it.name} has "
                             f"{it.memory_gb:g} GB")
    return None
