"""From a validated :class:`ScenarioSpec` to the resolved scenario the core runs.

Resolution expands model groups (``name: embed-{i:03d}`` with ``count``),
matches endpoint model globs, expands an ``sme`` endpoint that lists several
models into one endpoint per model, looks up instance types and checks that
each model fits the instance type that hosts it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..catalog import Architecture, Catalog, InstanceType, load_catalog
from ..hosting.steps import StepTime
from .errors import ScenarioError, suggest
from .fit import disk_problem, ic_problem, mme_problem, sme_fit
from .schema import CacheSpec, EndpointSpec, InstancesSpec, ModelSpec, ScenarioSpec, ServiceSpec, TokensSpec, TrafficSpec
from .schema import AutoscalingSpec, BatchingSpec, ScaleFromZeroSpec, SustainedSpec


# Host-to-GPU bandwidth (GB/s) for an instance type whose GPU is not in the
# catalog: about what a PCIe gen4 x16 link sustains with pinned memory.
DEFAULT_H2D_GBS = 25.0


@dataclass(frozen=True)
class Model:
    index: int
    name: str
    group: int
    size_gb: float
    memory_gb: float
    host_memory_gb: float
    accelerators: int
    init_time: float
    service: ServiceSpec
    tokens: TokensSpec | None
    architecture: Architecture | None = None   # a language model's (models[].architecture)
    llm: ContinuousBatching | None = None      # service.continuous_batching, resolved on its device


@dataclass(frozen=True)
class ContinuousBatching:
    """What a continuous-batching engine needs of one language model (``Model.llm``), resolved against
    the device a copy runs on: its ``tp`` GPUs (tensor parallel; 0: the instance's CPUs).

    ``kv_blocks`` blocks of ``block_size`` tokens make the copy's KV cache (``kv_tokens`` tokens,
    ``kv_cache_gb`` GB); ``step`` is the time of one iteration (:class:`~sim.hosting.steps.StepTime`)."""

    architecture: Architecture
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    kv_blocks: int
    kv_cache_gb: float
    tp: int
    step: StepTime
    step_kind: str            # roofline | profile | given

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size


@dataclass(frozen=True)
class Group:
    """A model group: one ``models`` entry of the file, whose traffic its models share."""

    index: int
    name: str
    traffic: TrafficSpec | None
    models: tuple[int, ...]
    service: ServiceSpec | None = None   # the group's service (calibrated ones resolved to token terms)


@dataclass(frozen=True)
class Endpoint:
    index: int
    name: str
    mode: str
    instance_type: InstanceType
    instances: InstancesSpec
    routing: str
    max_concurrency: int
    queue_limit: int | None
    timeout: float
    models: tuple[int, ...]
    copies_per_instance: int
    spec: EndpointSpec
    spec_index: int
    h2d_gbs: float = DEFAULT_H2D_GBS
    disk_gbs: float | None = None        # from a calibration profile measured on this GPU, else the catalog's
    load_overhead_s: float = 0.0         # fixed time of a load's disk and host-to-GPU steps (profile)
    components: tuple["Component", ...] = ()   # mode ic: its inference components

    @property
    def cache(self) -> CacheSpec:
        return self.spec.cache or CacheSpec()


@dataclass(frozen=True)
class Component:
    """An inference component of an ``ic`` endpoint: one model and what each copy reserves."""

    index: int                 # among the endpoint's components
    model: int
    accelerators: int          # whole GPUs per copy
    memory_gb: float           # host memory per copy
    cpus: float                # vCPUs per copy
    copies: InstancesSpec      # initial, min and max copies
    max_concurrency: int       # requests one copy serves at once
    autoscaling: AutoscalingSpec | None
    scale_from_zero: ScaleFromZeroSpec | None   # set when copies.min is 0
    path: str                  # key path in the scenario file, for messages


@dataclass(frozen=True)
class Scenario:
    """A scenario ready to simulate: the spec plus everything it refers to, resolved."""

    spec: ScenarioSpec
    models: tuple[Model, ...]
    groups: tuple[Group, ...]
    endpoints: tuple[Endpoint, ...]
    catalog: Catalog
    source: str = "<scenario>"
    base_dir: Path = field(default_factory=Path.cwd)
    warnings: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def horizon(self) -> float:
        """End of the simulated time: warmup plus the measured duration."""
        return self.spec.warmup + self.spec.duration

    def model_endpoint(self) -> list[int]:
        """For each model, the index of the endpoint that serves it."""
        out = [-1] * len(self.models)
        for ep in self.endpoints:
            for m in ep.models:
                out[m] = ep.index
        return out


def _expand_name(pattern: str, i: int, count: int, where: str, source: str) -> str:
    if count == 1 and "{" not in pattern:
        return pattern
    if "{" not in pattern:
        return f"{pattern}-{i}"
    problem = _pattern_problem(pattern)
    if problem is None:
        try:
            name = pattern.format(i=i)
            if len(name) <= 256:
                return name
            problem = f"it expands to {len(name)} characters; a name has at most 256"
        except (KeyError, IndexError, ValueError, TypeError, AttributeError, OverflowError, MemoryError) as e:
            problem = str(e)
    raise ScenarioError(
        f"cannot expand the name pattern {pattern!r} ({problem}); use {{i}} or a format such as {{i:03d}}",
        source=source, path=where,
    )


_FORMAT_SPEC = __import__("re").compile(r"^(?:.?[<>=^])?[+\- ]?#?0?(\d{0,3})[,_]?(?:\.\d{1,3})?[bcdoxXeEfFgGn%]?$")


def _pattern_problem(pattern: str) -> str | None:
    """Why a name pattern cannot be expanded safely, or None: only ``{i}`` fields, no attributes,
    indexes or conversions, and a format spec of a sane width (``{i:>1000000000}`` would build a GB)."""
    import string

    try:
        fields = list(string.Formatter().parse(pattern))
    except ValueError as e:
        return str(e)
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name != "i":
            return f"the field {{{name}}} is not {{i}}"
        if conversion:
            return f"the conversion !{conversion} is not allowed"
        if spec and not _FORMAT_SPEC.match(spec):
            return f"the format {spec!r} is not a number format of width at most 999"
    return None


def _catalog_for(spec: ScenarioSpec, source: str) -> Catalog:
    base = load_catalog()
    if not spec.instance_types:
        return base
    extra = []
    seen: dict[str, int] = {}
    for k, it in enumerate(spec.instance_types):
        if it.name in seen:
            raise ScenarioError(f"duplicate instance type name {it.name!r} (also instance_types[{seen[it.name]}])",
                                source=source, path=f"instance_types[{k}].name")
        seen[it.name] = k
        if it.gpu is not None and it.gpu not in base.gpus:
            raise ScenarioError(
                f"unknown GPU {it.gpu!r}{suggest(it.gpu, base.gpus)}; expected one of {', '.join(sorted(base.gpus))}",
                source=source, path=f"instance_types[{k}].gpu",
            )
        try:
            extra.append(InstanceType(**it.model_dump(), source=f"scenario {source}", date=""))
        except (ValueError, TypeError) as e:
            raise ScenarioError(str(e), source=source, path=f"instance_types[{k}]") from None
    return base.with_instance_types(extra)


def _check_fit(model: Model, it: InstanceType, where: str, source: str) -> int:
    """Copies of ``model`` one instance of ``it`` holds; a ScenarioError if none fits (sim.scenario.fit)."""
    f = sme_fit(model, it)
    if f.problem is not None:
        raise ScenarioError(f.problem, source=source, path=where)
    return f.copies


def _profile(path: str, base_dir: Path, source: str, where: str) -> dict:
    from ..profile import ProfileError, load_profile

    try:
        return load_profile(base_dir / path)
    except ProfileError as e:
        raise ScenarioError(str(e), source=source, path=where) from None


def resolve(spec: ScenarioSpec, *, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    from ..profile import ProfileError, load_speeds, runtime_memory, service_model

    catalog = _catalog_for(spec, source)
    base_dir = base_dir or Path.cwd()
    warnings: list[str] = []
    profile = _profile(spec.profile, base_dir, source, "profile") if spec.profile else None
    runtime_host = (runtime_memory(profile) or 0.0) if profile else 0.0

    models: list[Model] = []
    groups: list[Group] = []
    seen: dict[str, str] = {}
    for g, ms in enumerate(spec.models):
        idx = []
        for i in range(ms.count):
            name = _expand_name(ms.name, i, ms.count, f"models[{g}].name", source)
            if name in seen:
                raise ScenarioError(f"duplicate model name {name!r} (also {seen[name]})", source=source,
                                    path=f"models[{g}].name")
            seen[name] = f"models[{g}]"
            idx.append(len(models))
            host = ms.host_memory_gb if ms.host_memory_gb is not None else runtime_host
            models.append(Model(len(models), name, g, ms.size_gb, ms.gpu_memory_gb, host,
                                ms.accelerators, ms.init_time, ms.service, ms.tokens, ms.arch))
        groups.append(Group(g, ms.name, ms.traffic, tuple(idx), ms.service))
        _check_service(ms, g, source)
        if ms.traffic is not None:
            for k in ms.traffic.unused():
                warnings.append(f"models[{g}].traffic.{k}: process {ms.traffic.process!r} does not use it "
                                f"(it reads {', '.join(ms.traffic.USES[ms.traffic.process])}); ignored")

    names = [m.name for m in models]
    served_by: dict[int, str] = {}
    endpoints: list[Endpoint] = []
    ep_names: set[str] = set()
    for e, es in enumerate(spec.endpoints):
        where = f"endpoints[{e}]"
        if es.mode == "ic":
            if es.name in ep_names:
                raise ScenarioError(f"duplicate endpoint name {es.name!r}", source=source, path=f"{where}.name")
            ep_names.add(es.name)
            endpoints.append(_resolve_ic(es, e, len(endpoints), models, catalog, served_by, where, source))
            continue
        for key in ("components", "scale_in_policy", "scale_in_cooldown", "data_cache"):
            if getattr(es, key) not in (None, []):
                raise ScenarioError(f"{key} applies to mode 'ic' endpoints only", source=source, path=f"{where}.{key}")
        mme_only = [k for k in ("cache", "prewarm", "instance_concurrency") if getattr(es, k) is not None]
        if es.mode != "mme" and mme_only:
            raise ScenarioError(f"{mme_only[0]} applies to mode 'mme' endpoints only", source=source,
                                path=f"{where}.{mme_only[0]}")
        if "placement" in es.model_fields_set:
            warnings.append(f"{where}.placement: applies to mode 'ic' endpoints (where copies are placed); ignored")
        if es.autoscaling is not None:
            _check_autoscaling(es, where, source)
            warnings += _autoscaling_unused(es.autoscaling, f"{where}.autoscaling")
        try:
            it = catalog.instance(es.instance_type)
        except KeyError as err:
            raise ScenarioError(str(err.args[0]) if err.args else f"unknown instance type {es.instance_type!r}",
                                source=source, path=f"{where}.instance_type") from None
        if not es.models:
            raise ScenarioError("an endpoint needs at least one model (names or globs)", source=source,
                                path=f"{where}.models")
        matched: list[int] = []
        for k, pat in enumerate(es.models):
            hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                group = next((ms for ms in spec.models if ms.name == pat and ms.count > 1 and "{" not in pat), None)
                if group is not None:   # a group's name: its models are named after it (_expand_name)
                    raise ScenarioError(f"no model matches {pat!r}: its entry in models has count {group.count}, so "
                                        f"its models are {pat}-0 .. {pat}-{group.count - 1}; name them all with "
                                        f"{pat}-*", source=source, path=f"{where}.models[{k}]")
                raise ScenarioError(f"no model matches {pat!r}{suggest(pat, names + [m.name for m in spec.models])}",
                                    source=source, path=f"{where}.models[{k}]")
            matched += [h for h in hits if h not in matched]
        for m in matched:
            if m in served_by:
                raise ScenarioError(f"model {names[m]!r} is already served by endpoint {served_by[m]!r}",
                                    source=source, path=f"{where}.models")
            served_by[m] = es.name
        if es.instances.start < 1 or es.instances.lo < 1:
            raise ScenarioError(f"an {es.mode} endpoint needs at least 1 instance", source=source,
                                path=f"{where}.instances")
        on_cpu = [names[m] for m in matched if it.gpus == 0 and models[m].accelerators > 0]
        if on_cpu:
            warnings.append(f"{where}: {it.name} has no GPU: {', '.join(on_cpu[:3])}"
                            f"{' and more' if len(on_cpu) > 3 else ''} (accelerators >= 1) are served from host "
                            "memory, as CPU models; set accelerators: 0 to say so")
        h2d = DEFAULT_H2D_GBS
        if it.gpu is not None and it.gpu in catalog.gpus:
            h2d = catalog.gpu_spec(it.gpu).pcie_bandwidth_gbs
        if es.mode == "mme":
            if es.name in ep_names:
                raise ScenarioError(f"duplicate endpoint name {es.name!r}", source=source, path=f"{where}.name")
            ep_names.add(es.name)
            _check_cache_fit([models[m] for m in matched], es, it, where, source)
            llms = [models[m] for m in matched if models[m].service.continuous]
            if llms and len(llms) < len(matched) and "max_concurrency" not in es.model_fields_set:
                # _concurrency takes max_num_seqs only where every model batches continuously: beside other
                # models the default of 1 serves a language model one request at a time
                warnings.append(f"{where}.max_concurrency: unset, so each model of the endpoint serves 1 request "
                                f"at a time per instance, the continuous-batching {llms[0].name!r} included (its "
                                f"max_num_seqs is {llms[0].service.continuous_batching.max_num_seqs}); set "
                                "max_concurrency (one value for every model of an mme endpoint)")
            endpoints.append(Endpoint(len(endpoints), es.name, es.mode, it, es.instances, es.routing,
                                      _concurrency(es, [models[m] for m in matched]), es.queue_limit,
                                      es.timeout, tuple(matched), 1, es, e,
                                      h2d))
            continue
        groups_of = [matched] if len(matched) == 1 else [[m] for m in matched]
        for ms in groups_of:
            m = models[ms[0]]
            name = es.name if len(groups_of) == 1 else f"{es.name}-{m.name}"
            if name in ep_names:
                raise ScenarioError(f"duplicate endpoint name {name!r}", source=source, path=f"{where}.name")
            ep_names.add(name)
            copies = _check_fit(m, it, f"{where}.instance_type", source)
            disk = disk_problem(m, it)
            if disk is not None:   # (SageMaker downloads the artifact to the instance's volume)
                warnings.append(f"{where}.instance_type: {disk}: its instances could not download it (the run "
                                "goes on as if they could); set the type's storage_gb where its volume is larger")
            endpoints.append(Endpoint(len(endpoints), name, es.mode, it, es.instances, es.routing,
                                      _concurrency(es, [m]), es.queue_limit, es.timeout, tuple(ms), copies, es, e,
                                      h2d))

    # Load speeds measured on the instance's own GPU replace the catalog's.
    if profile is not None:
        from ..profile import device_gpu

        speeds = load_speeds(profile)
        gpu = device_gpu(profile, catalog)
        for k, ep in enumerate(endpoints):
            if gpu is not None and ep.instance_type.gpu == gpu.name and speeds:
                endpoints[k] = replace(ep, disk_gbs=speeds.get("disk_gbs"),
                                       h2d_gbs=speeds.get("h2d_gbs", ep.h2d_gbs),
                                       load_overhead_s=speeds.get("overhead_s", 0.0))
    # Calibrated services: the profile's fit for the family and size, on the endpoint's GPU.
    model_ep = {m: ep for ep in endpoints for m in ep.models}
    for gi, grp in enumerate(groups):
        svc = grp.service
        if svc is None or not svc.calibrated:
            continue
        where = f"models[{gi}].service"
        path = svc.profile or spec.profile
        if not path:
            raise ScenarioError("a calibrated service needs a profile (here or the scenario's profile key)",
                                source=source, path=where)
        prof = _profile(path, base_dir, source, f"{where}.profile")
        ep = model_ep.get(grp.models[0])
        target = ep.instance_type.gpu if ep is not None else None
        try:
            fit, notes = service_model(prof, svc.family, svc.params, catalog=catalog, target_gpu=target, where=where)
        except ProfileError as e:
            raise ScenarioError(str(e), source=source) from None
        warnings += notes
        # The profile's sustained-load speed unless the scenario sets its own (then the fit's terms
        # are the times it scales, as for any service).
        sustained, scale = svc.sustained, 1e-3
        if sustained is None and fit.sustained is not None:
            f, tau, rest = fit.sustained
            sustained = SustainedSpec(factor=f, time_constant=tau, rest_time_constant=rest)
            scale *= fit.rest_ratio
        # The profile's measured slowdown with concurrency unless the scenario sets its own curve.
        batching = svc.batching if svc.batching is not None else BatchingSpec(slowdown=fit.slowdown)
        resolved = ServiceSpec(base=fit.base_ms * scale, per_input_token=fit.per_input_token_ms * scale,
                               per_output_token=fit.per_output_token_ms * scale,
                               cv=svc.cv if svc.cv is not None else fit.cv, dist=svc.dist,
                               sustained=sustained, batching=batching)
        groups[gi] = replace(grp, service=resolved)
        for m in grp.models:
            models[m] = replace(models[m], service=resolved)

    # Language models: the KV cache and the step model on the device that serves each copy.
    for m, mod in enumerate(models):
        if mod.service.continuous and m in model_ep:
            models[m] = replace(mod, llm=_resolve_llm(mod, model_ep[m], catalog, base_dir, source, warnings))

    for g in groups:
        b = g.service.batching if g.service is not None else None
        if b is not None:
            warnings += [f"models[{g.index}].service.batching: {note}" for note in b.notes()]
    warnings += _full_speed_warnings(endpoints, models)
    slo = spec.slo
    token_targets = [k for k in ("ttft", "tpot") if slo is not None and getattr(slo, k) is not None]
    if token_targets and not any(m.service.continuous for m in models):
        # A request has a TTFT and a TPOT only on a continuous-batching engine: with none, these targets
        # would judge nothing and the verdict would say met whatever the latency
        warnings.append(f"slo.{token_targets[0]}: no model is served with continuous batching (a language model "
                        f"with service.continuous_batching), so {' and '.join(t.upper() for t in token_targets)} "
                        "apply to no request; " + ("only the latency target judges this fleet" if slo.latency_target
                                                   is not None else "set a latency target (p99, p90, p50 or mean) "
                                                   "to judge this fleet"))

    for g in groups:
        if g.traffic is None:
            continue
        for m in g.models:
            if m not in served_by:
                raise ScenarioError(f"model {names[m]!r} has traffic but no endpoint serves it",
                                    source=source, path=f"models[{g.index}]")
    return Scenario(spec, tuple(models), tuple(groups), tuple(endpoints), catalog, source, base_dir,
                    tuple(dict.fromkeys(warnings)))


def _resolve_llm(model: Model, ep: Endpoint, catalog: Catalog, base_dir: Path, source: str,
                 warnings: list[str]) -> ContinuousBatching:
    """The continuous-batching parameters of ``model`` as ``ep`` serves it (see ContinuousBatching):
    the KV cache that ``gpu_memory_utilization`` of the copy's memory leaves beside the weights, and
    the step model; a ScenarioError naming the key where they cannot be had."""
    acc = model.accelerators
    if ep.mode == "ic":
        acc = next(c.accelerators for c in ep.components if c.model == model.index)
    if ep.mode == "mme" and len(ep.models) > 1:
        warnings.append(f"models[{model.group}].service.continuous_batching: in an mme endpoint the KV cache is "
                        f"sized as if {model.name!r} had its copy's GPUs to itself (the endpoint's other models "
                        "share them)")
    return continuous_batching_on(model, ep.instance_type, acc, catalog, base_dir, source, warnings)


def continuous_batching_on(model: Model, it: InstanceType, acc: int, catalog: Catalog, base_dir: Path,
                           source: str, warnings: list[str]) -> ContinuousBatching:
    """:func:`_resolve_llm` for a copy of ``acc`` accelerators on ``it``; the planner asks it of each
    instance type it weighs (a ScenarioError: no copy runs there)."""
    from ..hosting.roofline import roofline   # pure: no simulation state

    g = model.group
    where = f"models[{g}].service.continuous_batching"
    cb = model.service.continuous_batching
    arch = model.architecture
    tp = acc if it.gpus > 0 else 0
    gpu = catalog.gpus.get(it.gpu) if tp and it.gpu is not None else None
    kind = cb.step.kind
    if tp and tp > 1 and arch.heads % tp:
        # vLLM refuses it too: each GPU takes heads / tp attention heads
        raise ScenarioError(f"{arch.name} has {arch.heads} attention heads, which {tp} tensor-parallel GPUs "
                            "cannot share evenly; choose accelerators that divide the heads",
                            source=source, path=f"models[{g}].accelerators")
    if model.memory_gb < arch.weight_gb * (1.0 - 1e-6):
        # the KV cache is what is left beside memory_gb: less than the weights leaves it too much room
        warnings.append(f"models[{g}]: {model.name!r} takes {model.memory_gb:.3g} GB of memory (memory_gb or size_gb) "
                        f"but {arch.name}'s weights are {arch.weight_gb:.3g} GB: its KV cache is sized beside the "
                        "smaller figure, so it holds more than a real copy's would")

    # The KV cache: what gpu_memory_utilization of the copy's memory leaves beside the weights.
    util = cb.gpu_memory_utilization
    if tp:
        per_gpu = it.gpu_memory_gb * util
        weights = model.memory_gb / tp
        if cb.kv_cache_gb is not None:
            room = cb.kv_cache_gb / tp
            if weights + room > per_gpu + 1e-9:
                raise ScenarioError(
                    f"model {model.name!r}: weights {weights:.3g} GB and KV cache {room:.3g} GB per GPU (over {tp}) "
                    f"exceed gpu_memory_utilization {util:g} x {it.gpu_memory_gb:g} GB = {per_gpu:.3g} GB of each "
                    f"{it.gpu or 'GPU'} of {it.name}", source=source, path=f"{where}.kv_cache_gb")
        else:
            room = per_gpu - weights
            if room <= 0:
                raise ScenarioError(
                    f"model {model.name!r}: its weights take {weights:.3g} GB per GPU ({model.memory_gb:.3g} GB over "
                    f"{tp}) but gpu_memory_utilization {util:g} x {it.gpu_memory_gb:g} GB gives {per_gpu:.3g} GB per "
                    f"{it.gpu or 'GPU'} of {it.name}: no room for the KV cache; give each copy more accelerators, "
                    "a larger GPU or a higher gpu_memory_utilization", source=source, path=where)
        kv_gb = room * tp
        blocks = int(room * 1e9 // (cb.block_size * arch.kv_bytes_per_token_per_gpu(tp)))
    else:
        memory = model.memory_gb + model.host_memory_gb
        if cb.kv_cache_gb is not None:
            kv_gb = cb.kv_cache_gb
            if memory + kv_gb > it.memory_gb + 1e-9:
                raise ScenarioError(f"model {model.name!r}: {memory:.3g} GB of model and {kv_gb:.3g} GB of KV cache "
                                    f"exceed the {it.memory_gb:g} GB of {it.name}", source=source,
                                    path=f"{where}.kv_cache_gb")
        else:
            kv_gb = util * it.memory_gb - memory
            if kv_gb <= 0:
                raise ScenarioError(
                    f"model {model.name!r} takes {memory:.3g} GB of host memory but gpu_memory_utilization {util:g} "
                    f"x {it.memory_gb:g} GB of {it.name} (a CPU copy: of the instance's memory) is {util * it.memory_gb:.3g} "
                    "GB: no room for the KV cache; set kv_cache_gb or choose a larger instance type",
                    source=source, path=where)
        blocks = int(kv_gb * 1e9 // (cb.block_size * arch.kv_bytes_per_token))
    if blocks < 1:
        raise ScenarioError(f"model {model.name!r}: a KV cache of {kv_gb:.3g} GB holds no block of {cb.block_size} "
                            f"tokens ({arch.kv_bytes_per_token * cb.block_size / 1e6:.3g} MB)", source=source,
                            path=where)
    _check_sequence_fits(model, blocks * cb.block_size, where, source, warnings)

    # The step model.
    if kind == "roofline":
        if not tp:
            raise ScenarioError(
                f"step roofline needs a GPU copy, but {model.name!r} runs on the CPUs of {it.name} (accelerators "
                f"{acc}{'' if it.gpus else ', an instance type without GPUs'}); give the step coefficients "
                "{base, per_prefill_token, per_decode_seq, per_kv_token} or {profile: path}",
                source=source, path=f"{where}.step")
        if gpu is None:
            raise ScenarioError(
                f"step roofline needs the GPU's bandwidth and FLOP/s, but instance type {it.name} names no GPU of the "
                f"catalog (its gpu: {it.gpu!r}); set gpu: to one of {', '.join(catalog.gpus)}, or give the step "
                "coefficients", source=source, path=f"{where}.step")
        try:
            step = roofline(arch, gpu, tp, max_num_seqs=cb.max_num_seqs)
        except ValueError as e:
            raise ScenarioError(str(e), source=source, path=f"{where}.step") from None
    elif kind == "given":
        s = cb.step
        step = StepTime.linear(s.base, s.per_prefill_token, s.per_decode_seq, s.per_kv_token, source="given")
    else:
        step = _profile_step(cb.step.profile, arch, gpu, base_dir, source, f"{where}.step.profile", warnings)
    return ContinuousBatching(arch, cb.max_num_seqs, cb.max_num_batched_tokens, cb.block_size, blocks, kv_gb, tp,
                              step, kind)


def _check_sequence_fits(model: Model, kv_tokens: int, where: str, source: str, warnings: list[str]) -> None:
    """A request whose prompt and output together exceed the KV cache can never finish (vLLM refuses to
    start when one sequence of its longest length does not fit)."""
    tk = model.tokens
    if tk is None:
        return
    const = isinstance(tk.input, int) and isinstance(tk.output, int)
    need = (tk.input if isinstance(tk.input, int) else tk.input.mean) + \
        (tk.output if isinstance(tk.output, int) else tk.output.mean)
    if need <= kv_tokens:
        return
    msg = (f"model {model.name!r}: a request of {need:g} tokens (input and output{'' if const else ', means'}) "
           f"needs more than the copy's KV cache of {kv_tokens} tokens")
    if const:
        raise ScenarioError(msg + "; give the copy more memory (accelerators, gpu_memory_utilization, kv_cache_gb) "
                            "or shorten the requests", source=source, path=where)
    warnings.append(f"{where}: {msg}: such requests cannot be served")


def _profile_step(path: str, arch: Architecture, gpu, base_dir: Path, source: str, where: str,
                  warnings: list[str]) -> StepTime:
    """The step coefficients a calibration profile fitted (sim.profile.step_coefficients), in seconds."""
    from .. import profile as prof

    fn = getattr(prof, "step_coefficients", None)
    if fn is None:
        raise ScenarioError("reading step coefficients from a calibration profile needs "
                            "sim.profile.step_coefficients, which this version of capsim lacks; give the "
                            "coefficients or use roofline", source=source, path=where)
    try:
        coef, notes = fn(base_dir / path, arch.params, kv_bytes_per_token=arch.kv_bytes_per_token, gpu=gpu)
    except prof.ProfileError as e:
        raise ScenarioError(str(e), source=source, path=where) from None
    warnings.extend(notes)
    try:
        return StepTime.linear(coef["base"], coef["per_prefill_token"], coef["per_decode_seq"],
                               coef["per_kv_token"], source=f"profile {path}")
    except (KeyError, ValueError) as e:
        raise ScenarioError(f"the profile's step coefficients are unusable ({e})", source=source,
                            path=where) from None


def _concurrency(es: EndpointSpec, served: list[Model]) -> int:
    """Requests a copy serves at once: the endpoint's ``max_concurrency``; where the scenario leaves
    it unset and every model served runs continuous batching, their ``max_num_seqs`` (the engine
    admits what its batch and KV cache allow and the rest queue at the endpoint, as vLLM's waiting
    queue: a default of one request at a time would defeat the batching)."""
    if "max_concurrency" in es.model_fields_set or not served or not all(m.service.continuous for m in served):
        return es.max_concurrency
    return max(m.service.continuous_batching.max_num_seqs for m in served)


def _full_speed_warnings(endpoints: list[Endpoint], models: list[Model]) -> list[str]:
    """A GPU model that can have more than one request in service on one device with no slowdown
    curve: the simulator would serve each at full speed (optimistic)."""
    out = []
    for ep in endpoints:
        where = f"endpoints[{ep.spec_index}]"
        if ep.instance_type.gpus == 0:
            continue
        if ep.mode == "ic":
            for c in ep.components:
                svc = models[c.model].service
                if c.accelerators and c.max_concurrency > 1 and svc.batching is None and not svc.continuous:
                    out.append(_full_speed(c.path, f"max_concurrency {c.max_concurrency} of {models[c.model].name!r}"))
            continue
        plain = [models[m] for m in ep.models if models[m].service.batching is None and
                 not models[m].service.continuous and (ep.mode == "mme" or models[m].accelerators > 0)]
        if not plain:
            continue
        if ep.max_concurrency > 1:
            out.append(_full_speed(where, f"max_concurrency {ep.max_concurrency}"))
        elif ep.mode == "mme" and len(ep.models) > 1 and ep.spec.instance_concurrency != 1:
            out.append(_full_speed(where, "the models an instance holds share its GPU"))
    return out


def _full_speed(where: str, why: str) -> str:
    return (f"{where}: concurrent requests on one GPU each run at full speed ({why}); set service.batching "
            "or use a calibrated service")


_METRIC_MODES = {"invocations_per_instance": ("sme", "mme"), "concurrent_requests_per_model": ("sme", "mme"),
                 "cpu_utilization": ("sme", "mme"), "gpu_memory_utilization": ("mme",),
                 "invocations_per_copy": ("ic",), "concurrent_requests_per_copy": ("ic",)}


def _check_autoscaling(es: EndpointSpec, where: str, source: str) -> None:
    a = es.autoscaling
    modes = _METRIC_MODES.get(a.metric, ())
    if es.mode not in modes:
        raise ScenarioError(f"metric {a.metric!r} does not apply to a {es.mode} endpoint (it applies to "
                            f"{' and '.join(modes)} endpoints)", source=source, path=f"{where}.autoscaling.metric")
    if es.instances.lo == es.instances.hi and not a.schedule:
        raise ScenarioError(f"autoscaling needs room to scale: set instances: {{min, max}} "
                            f"(now min = max = {es.instances.lo})", source=source, path=f"{where}.instances")
    _check_schedule(a, es.instances.lo, es.instances.hi, f"{where}.autoscaling", "instances", source)


def _autoscaling_unused(a, where: str) -> list[str]:
    """Warnings for the keys a scaling policy does not read."""
    unused = (("steps", "datapoints") if a.policy == "target_tracking" else
              ("target", "scale_out_datapoints", "scale_in_datapoints", "scale_in_ratio", "scale_in_cooldown"))
    hint = {"scale_in_cooldown": " (step scaling has one cooldown: scale_out_cooldown)"}
    return [f"{where}.{k}: policy {a.policy!r} does not use it{hint.get(k, '')}; ignored"
            for k in unused if k in a.model_fields_set]


def _check_schedule(a, lo: int, hi: int, where: str, what: str, source: str) -> None:
    """Each scheduled action sets min, max or both, and leaves min <= max (with the bound it leaves as
    configured: ``lo``, ``hi``), as Application Auto Scaling requires of a scalable target."""
    for k, s in enumerate(a.schedule):
        at = f"{where}.schedule[{k}]"
        if s.min is None and s.max is None:
            raise ScenarioError(f"a scheduled action sets min, max or both (the {what} from its time of day)",
                                source=source, path=at)
        new_lo = s.min if s.min is not None else lo
        new_hi = s.max if s.max is not None else hi
        if new_lo > new_hi:
            if s.min is not None and s.max is not None:
                why = f"min {s.min} is above its max {s.max}"
            elif s.min is not None:
                why = f"min {s.min} is above the {what}' max {hi} (set max in the action too)"
            else:
                why = f"max {s.max} is below the {what}' min {lo} (set min in the action too)"
            raise ScenarioError(why, source=source, path=f"{at}.{'min' if s.min is not None else 'max'}")


def _check_cache_fit(models: list[Model], es: EndpointSpec, it: InstanceType, where: str, source: str) -> None:
    """Each model of a multi-model endpoint must fit, alone, in every memory tier of one instance."""
    cache = es.cache or CacheSpec()
    for mod in models:
        problem = mme_problem(mod, it, cache)
        if problem is not None:
            raise ScenarioError(problem, source=source, path=f"{where}.instance_type")


def _check_service(ms: ModelSpec, g: int, source: str) -> None:
    tr = ms.traffic
    if ms.service.token_based and ms.tokens is None and not (tr is not None and tr.process == "trace"):
        what = "a continuous-batching" if ms.service.continuous else "a token-based"
        raise ScenarioError(f"{what} service needs token counts: add tokens: {{input: N, output: M}} "
                            "to the model or replay a trace that has them",
                            source=source, path=f"models[{g}].service")
    if tr is not None and isinstance(tr.popularity, dict) and "weights" in tr.popularity:
        if len(tr.popularity["weights"]) != ms.count:
            raise ScenarioError(f"popularity.weights has {len(tr.popularity['weights'])} entries for "
                                f"{ms.count} models", source=source, path=f"models[{g}].traffic.popularity")


IC_METRICS = ("invocations_per_copy", "concurrent_requests_per_copy")


def _resolve_ic(es: EndpointSpec, e: int, index: int, models: list[Model], catalog: Catalog,
                served_by: dict[int, str], where: str, source: str) -> Endpoint:
    """An inference-component endpoint: its components, each checked against the instance type."""
    from ..hosting.placement import pack  # pure: no simulation state

    try:
        it = catalog.instance(es.instance_type)
    except KeyError as err:
        raise ScenarioError(str(err.args[0]) if err.args else f"unknown instance type {es.instance_type!r}",
                            source=source, path=f"{where}.instance_type") from None
    if getattr(es, "failures", None) is not None:
        raise ScenarioError("failure injection does not apply to ic endpoints in this version", source=source,
                            path=f"{where}.failures")
    for key in ("models", "autoscaling"):
        if getattr(es, key):
            what = "models: list them as components[].model" if key == "models" else \
                "autoscaling: scale each component's copies with components[k].autoscaling"
            raise ScenarioError(f"an ic endpoint takes no {what}", source=source, path=f"{where}.{key}")
    if not es.components:
        raise ScenarioError("an ic endpoint needs at least one component (components: [{model: ...}])",
                            source=source, path=f"{where}.components")
    if es.instances.hi < 1:
        raise ScenarioError("an ic endpoint needs instances.max >= 1", source=source, path=f"{where}.instances")
    names = [m.name for m in models]
    comps: list[Component] = []
    for k, cs in enumerate(es.components):
        cw = f"{where}.components[{k}]"
        hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, cs.model)]
        if not hits:
            raise ScenarioError(f"no model matches {cs.model!r}{suggest(cs.model, names)}", source=source,
                                path=f"{cw}.model")
        for m in hits:
            mod = models[m]
            if m in served_by:
                raise ScenarioError(f"model {mod.name!r} is already served by endpoint {served_by[m]!r}",
                                    source=source, path=f"{cw}.model")
            served_by[m] = es.name
            acc = mod.accelerators if cs.accelerators is None else cs.accelerators
            mem = cs.memory_gb if cs.memory_gb is not None else max(mod.memory_gb, 0.128)
            problem = ic_problem(mod, it, acc, mem)
            if problem is not None:
                raise ScenarioError(problem[1], source=source, path=f"{cw}.{problem[0]}")
            if cs.cpus > it.vcpus + 1e-9:
                raise ScenarioError(f"a copy reserves {cs.cpus:g} vCPUs but {it.name} has {it.vcpus}",
                                    source=source, path=f"{cw}.cpus")
            a = cs.autoscaling
            if a is not None:
                if a.metric not in IC_METRICS:
                    raise ScenarioError(f"metric {a.metric!r} does not apply to an inference component; expected "
                                        f"{' or '.join(IC_METRICS)}", source=source, path=f"{cw}.autoscaling.metric")
                if cs.copies.lo == cs.copies.hi and not a.schedule:
                    raise ScenarioError(f"autoscaling needs room to scale: set copies: {{min, max}} (now min = max "
                                        f"= {cs.copies.lo})", source=source, path=f"{cw}.copies")
                _check_schedule(a, cs.copies.lo, cs.copies.hi, f"{cw}.autoscaling", "copies", source)
            wake = cs.scale_from_zero
            if wake is not None and cs.copies.lo > 0:
                raise ScenarioError("scale_from_zero applies to a component with copies.min 0", source=source,
                                    path=f"{cw}.scale_from_zero")
            if wake is None and cs.copies.lo == 0:
                wake = ScaleFromZeroSpec()
            comps.append(Component(len(comps), m, acc, mem, cs.cpus, cs.copies,
                                   cs.max_concurrency or _concurrency(es, [mod]), a, wake, cw))
    # The initial copies must fit on instances.max instances, or they would wait for ever.
    cap = (it.gpus, it.memory_gb, float(it.vcpus))
    needs = [(c.accelerators, c.memory_gb, c.cpus) for c in comps for _ in range(c.copies.start)]
    need = len(pack(needs, cap, "binpack")[0]) if needs else 0
    if need > es.instances.hi:
        raise ScenarioError(f"the components' initial copies need {need} instances of {it.name} but instances.max "
                            f"is {es.instances.hi}", source=source, path=f"{where}.instances")
    initial = es.instances.initial
    if initial is None:   # managed instance scaling starts with what the initial copies need
        initial = max(es.instances.lo, min(need, es.instances.hi))
    instances = InstancesSpec(initial=initial, min=es.instances.lo, max=es.instances.hi)
    h2d = catalog.gpu_spec(it.gpu).pcie_bandwidth_gbs if it.gpu is not None and it.gpu in catalog.gpus \
        else DEFAULT_H2D_GBS
    return Endpoint(index, es.name, "ic", it, instances, es.routing, es.max_concurrency, es.queue_limit, es.timeout,
                    tuple(c.model for c in comps), 1, es, e, h2d_gbs=h2d, components=tuple(comps))
