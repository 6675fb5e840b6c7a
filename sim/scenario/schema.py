"""Scenario schema v1 (README, Scenarios): pydantic models of the YAML file.

The schema checks the shape and the units of each field. Cross-references
(instance types, model names, fits) are resolved in :mod:`sim.scenario.resolve`.
"""
from __future__ import annotations

import math
import statistics
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..catalog import Architecture, UnknownNameError, load_catalog
from .units import CV, Text, MAX_SEED, MAX_TOKENS, Bandwidth, Count, Duration, Number, Params, Period, Rate, Size, shown

# One source of truth for the names the YAML accepts; each registry in the
# core is checked against these lists by the tests.
MODES = ("sme", "mme", "ic")
ROUTING_POLICIES = ("random", "round_robin", "least_outstanding_requests", "power_of_two")
SERVICE_DISTS = ("exponential", "deterministic", "lognormal", "gamma")
PROCESSES = ("poisson", "gamma", "diurnal", "mmpp", "closed", "trace")
TRACE_FORMATS = ("csv", "azure_llm", "mooncake")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class InstanceTypeSpec(Strict):
    name: Text = Field(min_length=1)
    gpus: Count = Field(ge=0, le=1024)
    gpu_memory_gb: Size = 0.0
    vcpus: Count = Field(ge=1)
    memory_gb: Size
    price_per_hour: Number = Field(ge=0)
    gpu: Text | None = None
    storage: Literal["nvme", "ebs"] = "ebs"
    storage_gb: Size = 30.0
    disk_read_gbs: Number = Field(default=0.25, gt=0, le=1e9)
    network_gbps: Number = Field(default=10.0, gt=0, le=1e9)

    @model_validator(mode="after")
    def _gpu_memory(self) -> "InstanceTypeSpec":
        if self.gpus > 0 and self.gpu_memory_gb <= 0:
            raise ValueError("an instance type with gpus > 0 needs gpu_memory_gb > 0")
        return self


def _check_dist_cv(dist: str, cv: float | None) -> None:
    """The spreads an exponential and a deterministic distribution cannot have."""
    if dist == "exponential" and cv not in (None, 1.0):
        raise ValueError("an exponential distribution has cv 1; use lognormal or gamma for another cv")
    if dist == "deterministic" and cv not in (None, 0.0):
        raise ValueError("a deterministic distribution has cv 0")


class Distribution(Strict):
    """A positive random quantity given by its mean and coefficient of variation."""

    dist: Literal[SERVICE_DISTS] = "lognormal"  # type: ignore[valid-type]
    mean: Number = Field(ge=0, le=MAX_TOKENS)
    cv: CV | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _spread(self) -> "Distribution":
        _check_dist_cv(self.dist, self.cv)
        return self


class TokensSpec(Strict):
    """Token counts of a model's requests: a constant or a distribution each."""

    input: Count | Distribution = 0
    output: Count | Distribution = 0

    @field_validator("input", "output", mode="before")
    @classmethod
    def _non_negative(cls, v: Any) -> Any:
        # (before parsing: a whole number's own bound, MAX_COUNT, would name the wrong range)
        n = v
        if isinstance(v, str):
            try:
                n = int(v.strip())
            except ValueError:
                pass
        elif isinstance(v, float) and math.isfinite(v) and v.is_integer():
            n = int(v)
        if isinstance(n, int) and not isinstance(n, bool) and not 0 <= n <= MAX_TOKENS:
            raise ValueError(f"expected a whole number of tokens between 0 and {MAX_TOKENS}, got {shown(v)}")
        return v


class SustainedSpec(Strict):
    """How a server's speed changes while it stays busy (clocks that boost under load, caches that
    warm; or thermal throttling), and comes back while it rests. A server (an instance; an inference
    component's copy) keeps a state ``w``, 1 at rest; a request starting at ``w`` takes ``factor +
    (1 - factor) * w`` times its drawn service time (below 1, sustained load serves faster). While the
    server serves requests, ``w`` decays as ``exp(-t / time_constant)``: a request ``b`` seconds into a
    busy period that began at rest takes ``factor + (1 - factor) * exp(-b / time_constant)``. While it
    serves none (idle, or loading a model), ``w`` comes back as ``1 - (1 - w) * exp(-t /
    rest_time_constant)``; unset (or 0), any rest brings it back to 1 at once."""

    factor: Number = Field(gt=0, le=1e6)
    time_constant: Duration
    rest_time_constant: Duration | None = None

    @field_validator("time_constant")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("time_constant must be > 0")
        return v

    @field_validator("rest_time_constant")
    @classmethod
    def _non_negative(cls, v: float | None) -> float | None:
        if v is not None and v < 0:
            raise ValueError("rest_time_constant must be >= 0")
        return v


class BatchingSpec(Strict):
    """How requests in service at once on one device share it (processor sharing with a capacity
    function). While ``k`` requests are in service on a device, whatever their model, each progresses at
    ``1 / slowdown(k)`` of its speed alone: linear between the points given, proportional to ``k`` beyond
    the last (no more throughput). ``slowdown(1)`` is 1 (the service's times are those alone), implied
    when absent. A curve whose throughput ``k / slowdown(k)`` falls, or with a factor below 1, is taken
    as given, with a warning."""

    slowdown: dict[Count, Number]

    @field_validator("slowdown", mode="before")
    @classmethod
    def _whole_levels(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for k in v:
                ok = (isinstance(k, int) and not isinstance(k, bool)) or (isinstance(k, str) and k.strip().isdigit())
                if not ok:
                    raise ValueError(f"slowdown: level {k!r} is not a whole number of requests (expected "
                                     "{k: factor} with k = 1, 2, ...)")
            seen: dict[int, Any] = {}
            for k in v:
                n = int(k)
                if n in seen:   # 2 and "2" (or "02"): one level twice, the last silently winning otherwise
                    raise ValueError(f"slowdown: level {n} is given twice ({seen[n]!r} and {k!r})")
                seen[n] = k
        return v

    @field_validator("slowdown")
    @classmethod
    def _curve(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("slowdown: expected at least one level {k: factor}, such as {1: 1.0, 4: 2.0}")
        for k, f in v.items():
            if k < 1:
                raise ValueError(f"slowdown: level {k} must be >= 1 (requests in service on the device)")
            if not math.isfinite(f) or f <= 0:
                raise ValueError(f"slowdown[{k}]: expected a finite factor > 0, got {f!r}")
        if 1 in v and abs(v[1] - 1.0) > 1e-9:
            raise ValueError(f"slowdown[1] is 1 by definition (the service's times are those of a request "
                             f"alone on the device), got {v[1]!r}")
        return dict(sorted(v.items()))

    def notes(self) -> list[str]:
        """What is odd about the curve, though allowed: factors below 1, throughput that falls."""
        out = []
        pts = [(1, 1.0)] + [(k, f) for k, f in self.slowdown.items() if k > 1]
        low = [k for k, f in pts if f < 1.0]
        if low:
            out.append(f"slowdown below 1 at k = {', '.join(map(str, low))}: requests run faster in company "
                       "than alone")
        falls = [b[0] for a, b in zip(pts, pts[1:]) if b[0] / b[1] < a[0] / a[1] - 1e-9]
        if falls:
            out.append(f"throughput k / slowdown(k) falls at k = {', '.join(map(str, falls))}: the device "
                       "serves less at that concurrency than at a lower one")
        return out


# vLLM's defaults (vllm/config.py, v0.6 to v0.8: _DEFAULT_MAX_NUM_SEQS = 256 and
# _DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048, "chosen to have a balance between ITL and TTFT", with chunked
# prefill; gpu_memory_utilization 0.9 and block_size 16 of its engine arguments). Later versions pick
# per GPU and entry point (the OpenAI server on an H100-class GPU: 8192 tokens and 1024 sequences).
CB_MAX_NUM_SEQS = 256
CB_MAX_NUM_BATCHED_TOKENS = 2048
CB_GPU_MEMORY_UTILIZATION = 0.9
CB_BLOCK_SIZE = 16
STEP_COEFFICIENTS = ("base", "per_prefill_token", "per_decode_seq", "per_kv_token")
STEP_FORMS = "roofline, {profile: path} or {base, per_prefill_token, per_decode_seq, per_kv_token}"


class ArchitectureSpec(Strict):
    """A language model's architecture given in the scenario: the keys of a ``models.yaml`` entry
    (see ``capsim catalog --models``). ``params`` takes ``6.74B``-style counts; ``dtype_bytes``
    defaults to 2 (fp16/bf16); ``experts`` and ``experts_per_token`` for a mixture of experts only."""

    params: Params
    layers: Count = Field(ge=1, le=100_000)
    hidden: Count = Field(ge=1)
    heads: Count = Field(ge=1)
    kv_heads: Count = Field(ge=1)
    intermediate: Count = Field(ge=1)
    vocab: Count = Field(ge=1)
    dtype_bytes: Number = Field(default=2.0, gt=0, le=8)
    experts: Count | None = Field(default=None, ge=1, le=1_000_000)
    experts_per_token: Count | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> "ArchitectureSpec":
        self.build()   # raises ValueError naming the key
        return self

    def build(self, name: str = "(scenario)") -> Architecture:
        """The :class:`~sim.catalog.Architecture` of these figures."""
        return Architecture(name=name, **self.model_dump(), source="scenario")


# A name or a mapping: the value's shape picks the member, so that an error speaks of that one alone.
ArchitectureField = Annotated[
    Union[Annotated[Text, Tag("name")], Annotated[ArchitectureSpec, Tag("mapping")]],
    Discriminator(lambda v: "name" if isinstance(v, str) else "mapping"),
]


class StepModelSpec(Strict):
    """How long a continuous-batching step takes: ``roofline`` (the default: the catalog GPU's
    bandwidth and FLOP/s, sim/hosting/roofline.py), ``{profile: path}`` (a calibration profile's fitted
    coefficients) or the coefficients given, all four: ``{base, per_prefill_token, per_decode_seq,
    per_kv_token}`` (durations; ``base + per_prefill_token * p + per_decode_seq * n + per_kv_token *
    K`` for ``p`` prefill tokens and ``n`` decode sequences over ``K`` context tokens)."""

    profile: Text | None = None
    base: Duration | None = None
    per_prefill_token: Duration | None = None
    per_decode_seq: Duration | None = None
    per_kv_token: Duration | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v.strip() == "roofline":
                return {}
            from .errors import suggest

            raise ValueError(f"unknown step model {shown(v)}{suggest(v, ['roofline', 'profile'])}; expected "
                             f"{STEP_FORMS}")
        if not isinstance(v, dict):
            raise ValueError(f"expected {STEP_FORMS}, got {shown(v)}")
        return v

    @model_validator(mode="after")
    def _one_form(self) -> "StepModelSpec":
        given = [k for k in STEP_COEFFICIENTS if getattr(self, k) is not None]
        if self.profile is not None and given:
            raise ValueError(f"give either profile or the coefficients, not both (drop {', '.join(given)})")
        if given and len(given) < len(STEP_COEFFICIENTS):
            missing = [k for k in STEP_COEFFICIENTS if k not in given]
            raise ValueError(f"missing {', '.join(missing)}: coefficients given need all four ({', '.join(STEP_COEFFICIENTS)}; "
                             "0 where a term is absent)")
        if given and not any(getattr(self, k) > 0 for k in STEP_COEFFICIENTS):
            raise ValueError("every coefficient is 0: a step must take time")
        if self.profile is not None and not self.profile.strip():
            raise ValueError("profile: expected the path of a calibration profile")
        return self

    @property
    def kind(self) -> str:
        """``roofline``, ``profile`` or ``given``."""
        if self.profile is not None:
            return "profile"
        return "given" if self.base is not None else "roofline"


class ContinuousBatchingSpec(Strict):
    """vLLM-style iterations on each copy (README, Language models). Defaults are vLLM's.
    ``kv_cache_gb`` sets the KV cache of a copy outright; without it the cache is what
    ``gpu_memory_utilization`` of the copy's GPU memory leaves beside the weights (on a CPU copy: of the
    instance's memory, beside the model's memory and host memory)."""

    max_num_seqs: Count = Field(default=CB_MAX_NUM_SEQS, ge=1, le=1_000_000)
    max_num_batched_tokens: Count = Field(default=CB_MAX_NUM_BATCHED_TOKENS, ge=1, le=MAX_TOKENS)
    gpu_memory_utilization: Number = Field(default=CB_GPU_MEMORY_UTILIZATION, gt=0, le=1)
    block_size: Count = Field(default=CB_BLOCK_SIZE, ge=1, le=1_000_000)
    kv_cache_gb: Size | None = None
    step: StepModelSpec = StepModelSpec()

    @model_validator(mode="after")
    def _budget(self) -> "ContinuousBatchingSpec":
        # vLLM refuses the same (SchedulerConfig): each running sequence needs a token of the budget
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}): every running sequence takes a token of a step's budget")
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ValueError("kv_cache_gb must be > 0")
        return self


class ServiceSpec(Strict):
    """Time to serve one request on one copy.

    Parametric: ``{dist, mean, cv}``. Token-based: ``{base, per_input_token,
    per_output_token, cv}`` with the model's ``tokens`` or the trace's.
    Empirical: ``{dist: empirical, samples: [...]}`` draws the measured times
    themselves (their mean and cv are the service's); with the token-based form
    the samples' shape, scaled to mean 1, is its noise factor.
    Continuous batching: ``{continuous_batching: {...}}`` alone (a language model
    with an ``architecture``): its times come from its step model, so no other
    key of the service applies.
    """

    dist: Literal[SERVICE_DISTS + ("empirical",)] | None = None  # type: ignore[valid-type]
    samples: tuple[Duration, ...] | None = None
    mean: Duration | None = None
    cv: CV | None = Field(default=None, ge=0)
    base: Duration | None = None
    per_input_token: Duration | None = None
    per_output_token: Duration | None = None
    # calibrated: the fitted token-based model of a profile (family and size)
    profile: Text | None = None
    family: Text | None = None
    params: Text | Number | None = None
    # the speed under sustained load (any form above)
    sustained: SustainedSpec | None = None
    # how requests in service at once on one device share it (any form above)
    batching: BatchingSpec | None = None
    # a language model's vLLM-style iterations (alone: no other key applies)
    continuous_batching: ContinuousBatchingSpec | None = None

    @model_validator(mode="after")
    def _form(self) -> "ServiceSpec":
        if self.continuous_batching is not None:
            if self.batching is not None:
                raise ValueError("continuous_batching and batching are two execution models: give one")
            others = [k for k in ("dist", "samples", "mean", "cv", "base", "per_input_token", "per_output_token",
                                  "profile", "family", "params", "sustained") if getattr(self, k) is not None]
            if others:
                raise ValueError(f"a continuous-batching service takes its times from its step model "
                                 f"(continuous_batching.step): drop {', '.join(others)}")
            return self
        token = any(v is not None for v in (self.base, self.per_input_token, self.per_output_token))
        if self.family is not None or self.params is not None or self.profile is not None:
            if self.family is None or self.params is None:
                raise ValueError("a calibrated service needs family (encoder or decoder) and params (e.g. 7B); "
                                 "profile defaults to the scenario's profile")
            if self.mean is not None or token or self.samples is not None:
                raise ValueError("a calibrated service takes its times from the profile: drop "
                                 "mean/base/per_*_token/samples")
            if self.dist == "empirical":
                raise ValueError("a calibrated service takes its spread from the profile: dist cannot be empirical")
            return self
        if (self.dist == "empirical") != (self.samples is not None):
            raise ValueError("dist: empirical takes samples (a list of measured times), and samples need "
                             "dist: empirical")
        if self.samples is not None:
            if not self.samples or min(self.samples) <= 0:
                raise ValueError("samples: expected a non-empty list of times > 0")
            if self.cv is not None or self.mean is not None:
                raise ValueError("an empirical service takes its mean and cv from its samples: drop mean and cv")
            mean = statistics.fmean(self.samples)
            # frozen model: the derived moments are set once, here
            object.__setattr__(self, "cv", statistics.pstdev(self.samples) / mean)
            if not token:
                object.__setattr__(self, "mean", mean)
        if self.mean is None and not token:
            raise ValueError("expected either {dist, mean, cv}, {base, per_input_token, per_output_token}, "
                             "{profile, family, params} or {continuous_batching: {...}}")
        if self.mean is not None and token:
            raise ValueError("give either mean (parametric) or base/per_*_token (token-based), not both")
        if self.mean is not None and self.mean <= 0:
            raise ValueError("mean must be > 0")
        _check_dist_cv(self.effective_dist, self.cv)
        return self

    @property
    def token_based(self) -> bool:
        return self.mean is None

    @property
    def continuous(self) -> bool:
        """A language model served with continuous batching (``continuous_batching``)."""
        return self.continuous_batching is not None

    @property
    def calibrated(self) -> bool:
        return self.family is not None

    @property
    def effective_dist(self) -> str:
        if self.dist:
            return self.dist
        return "exponential" if self.mean is not None and self.cv is None else "lognormal"

    @property
    def effective_cv(self) -> float:
        d = self.effective_dist
        if d == "exponential":
            return 1.0
        if d == "deterministic":
            return 0.0
        return 0.0 if self.cv is None else self.cv


class TrafficSpec(Strict):
    process: Literal[PROCESSES] = "poisson"  # type: ignore[valid-type]
    rate: Rate | None = None
    cv: CV | None = Field(default=None, gt=0)
    # diurnal
    peak_to_trough: Number = Field(default=1.0, ge=1.0)
    period: Period = 86400.0
    phase: Duration = 0.0
    hourly_weights: list[Number] | None = None
    # mmpp (on/off bursts)
    rate_off: Rate = 0.0
    mean_on: Period | None = None
    mean_off: Period | None = None
    # closed loop
    users: Count | None = Field(default=None, ge=1, le=1_000_000)
    think_time: Duration = 0.0
    # trace replay
    path: Text | None = None
    format: Literal[TRACE_FORMATS] = "csv"  # type: ignore[valid-type]
    rate_scale: Number = Field(default=1.0, ge=1e-6, le=1e6)
    time_scale: Number = Field(default=1.0, ge=1e-6, le=1e6)
    loop: bool = False
    # how a group's traffic splits over its models
    popularity: dict[str, Any] | Literal["uniform"] = "uniform"

    # the keys each process reads (popularity: every process, for a group's models)
    USES: ClassVar[dict[str, tuple[str, ...]]] = {"poisson": ("rate",), "gamma": ("rate", "cv"),
            "diurnal": ("rate", "peak_to_trough", "period", "phase", "hourly_weights"),
            "mmpp": ("rate", "rate_off", "mean_on", "mean_off"), "closed": ("users", "think_time"),
            "trace": ("path", "format", "rate_scale", "time_scale", "loop")}

    def unused(self) -> list[str]:
        """The keys given that its process does not read (ignored: a warning says so)."""
        uses = set(self.USES[self.process]) | {"process", "popularity"}
        return [k for k in type(self).model_fields if k in self.model_fields_set and k not in uses]

    @model_validator(mode="after")
    def _required(self) -> "TrafficSpec":
        p = self.process
        if p in ("poisson", "gamma", "diurnal", "mmpp") and self.rate is None:
            raise ValueError(f"process {p!r} needs a rate (for example rate: 20/s)")
        if p == "gamma" and self.cv is None:
            raise ValueError("process 'gamma' needs cv (the inter-arrival coefficient of variation)")
        if p == "mmpp" and (self.mean_on is None or self.mean_off is None):
            raise ValueError("process 'mmpp' needs mean_on and mean_off (burst and quiet durations)")
        if p == "closed" and self.users is None:
            raise ValueError("process 'closed' needs users (the number of closed-loop users)")
        if p == "trace" and not self.path:
            raise ValueError("process 'trace' needs path (a trace file, relative to the scenario)")
        for key in ("period", "mean_on", "mean_off"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ValueError(f"{key} must be a duration > 0, got {v:g} s")
        if self.think_time < 0:
            raise ValueError("think_time must be a duration >= 0")
        if self.hourly_weights is not None:
            if len(self.hourly_weights) != 24 or min(self.hourly_weights) < 0 or sum(self.hourly_weights) <= 0:
                raise ValueError("hourly_weights must be 24 non-negative numbers, not all zero")
        if isinstance(self.popularity, dict):
            keys = set(self.popularity)
            if keys == {"zipf"}:
                s = self.popularity["zipf"]
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 <= s <= 100:
                    raise ValueError(f"popularity.zipf must be a number between 0 and 100, got {shown(s)}")
            elif keys == {"weights"}:
                w = self.popularity["weights"]
                if not isinstance(w, list) or not w or any(
                    isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 1e12 for x in w
                ) or sum(w) <= 0:
                    raise ValueError("popularity.weights must be a list of finite non-negative numbers (at most "
                                     "1e12), not all zero")
            else:
                raise ValueError("popularity must be 'uniform', {zipf: s} or {weights: [...]}")
        return self


class ModelSpec(Strict):
    name: Text = Field(min_length=1)
    count: Count = Field(default=1, ge=1, le=100_000)
    size_gb: Size | None = None          # required unless an architecture gives it (its weight bytes)
    memory_gb: Size | None = None
    host_memory_gb: Size | None = None   # default 0, or the runtime's host memory of the scenario's profile
    accelerators: Count = Field(default=1, ge=0, le=1024)
    init_time: Duration = 0.0          # runtime init per load (backend start, CUDA context, warm-up)
    service: ServiceSpec
    traffic: TrafficSpec | None = None
    tokens: TokensSpec | None = None
    # a language model's architecture: a name of the catalog (capsim catalog --models) or a mapping
    architecture: ArchitectureField | None = None

    @field_validator("size_gb")
    @classmethod
    def _positive_size(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("size_gb must be > 0")
        return v

    @field_validator("architecture", mode="before")
    @classmethod
    def _name_or_mapping(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, dict)):
            raise ValueError(f"expected an architecture name (capsim catalog --models) or a mapping {{params, "
                             f"layers, hidden, heads, kv_heads, intermediate, vocab}}, got {shown(v)}")
        return v

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                load_catalog().architecture(v)
            except UnknownNameError as e:
                raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _size(self) -> "ModelSpec":
        arch = self.arch
        if self.size_gb is None:
            if arch is None:
                raise ValueError("missing size_gb (the artifact's size), or an architecture whose weights give it")
            # frozen model: the default is set once, here
            object.__setattr__(self, "size_gb", arch.weight_gb)
        if self.service.continuous and arch is None:
            raise ValueError("service.continuous_batching needs the model's architecture: a name from "
                             "`capsim catalog --models` (architecture: llama-2-7b) or a mapping {params, layers, "
                             "hidden, heads, kv_heads, intermediate, vocab}")
        return self

    @property
    def arch(self) -> Architecture | None:
        """The model's :class:`~sim.catalog.Architecture` (the catalog's, or the mapping's), or None."""
        if self.architecture is None:
            return None
        if isinstance(self.architecture, str):
            return load_catalog().architecture(self.architecture)
        return self.architecture.build(self.name)

    @property
    def gpu_memory_gb(self) -> float:
        return self.size_gb if self.memory_gb is None else self.memory_gb


class InstancesSpec(Strict):
    initial: Count | None = Field(default=None, ge=0, le=100_000)
    min: Count | None = Field(default=None, ge=0, le=100_000)
    max: Count | None = Field(default=None, ge=0, le=100_000)

    @model_validator(mode="before")
    @classmethod
    def _from_int(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a number of instances or {initial, min, max}")
        if isinstance(v, int):
            return {"initial": v, "min": v, "max": v}
        return v

    @model_validator(mode="after")
    def _order(self) -> "InstancesSpec":
        lo, hi = self.lo, self.hi
        if hi < lo:
            raise ValueError(f"max ({hi}) must be >= min ({lo})")
        if not lo <= self.start <= hi:
            raise ValueError(f"initial ({self.start}) must lie within [min, max] = [{lo}, {hi}]")
        return self

    @property
    def lo(self) -> int:
        if self.min is not None:
            return self.min
        return self.initial if self.initial is not None else 1

    @property
    def hi(self) -> int:
        if self.max is not None:
            return self.max
        return max(self.lo, self.initial if self.initial is not None else 1)

    @property
    def start(self) -> int:
        return self.initial if self.initial is not None else max(self.lo, min(1, self.hi))


class CacheSpec(Strict):
    """How a multi-model endpoint's instances cache models (memory tiers, loads, eviction)."""

    policy: Literal["lru", "lfu", "gds"] = "lru"
    memory_fraction: Number = Field(default=0.9, gt=0, le=1)   # of GPU memory that may hold models
    enabled: bool = True                 # false: unload after every invocation (ModelCacheSetting Disabled)
    host_reserve: Size = 2.0             # host memory kept by the OS and the model server
    disk: Size | None = None             # instance volume for artifacts (default: the instance type's)
    s3_throughput: Bandwidth | None = None   # download speed (default: the instance's network bandwidth)
    max_concurrent_loads: Count = Field(default=2, ge=1)
    replicate_above: Count = Field(default=8, ge=1)   # load a hot model on another instance above this
    thrash_window: Duration = 600.0      # a load of a model unloaded within this window is thrashing
    thrash_warning: Number = Field(default=0.2, ge=0, le=1)   # thrashing index that raises a warning


class StepSpec(Strict):
    """A step-scaling alarm: when the metric is above ``above`` (or below ``below``), add ``change``."""

    change: Count
    above: Number | None = None
    below: Number | None = None

    @model_validator(mode="after")
    def _one_threshold(self) -> "StepSpec":
        if (self.above is None) == (self.below is None):
            raise ValueError("a step needs exactly one of above or below")
        if self.change == 0:
            raise ValueError("a step's change must not be 0 (instances or copies to add, or remove if negative)")
        return self


class ScheduleSpec(Strict):
    """Scheduled scaling: from ``at`` (time of day, e.g. 08:00 or 8h) min and max become these."""

    at: Text | Number
    min: Count | None = Field(default=None, ge=0, le=100_000)
    max: Count | None = Field(default=None, ge=0, le=100_000)

    @property
    def at_seconds(self) -> float:
        from .units import parse_duration

        if isinstance(self.at, str) and ":" in self.at:
            hh, mm = self.at.split(":", 1)
            return int(hh) * 3600.0 + int(mm) * 60.0
        return parse_duration(self.at)

    @field_validator("at")
    @classmethod
    def _time_of_day(cls, v):
        import re as _re

        from .units import parse_duration

        if isinstance(v, str) and ":" in v:
            if not _re.match(r"^\d{1,2}:\d{2}$", v) or int(v.split(":")[0]) > 23 or int(v.split(":")[1]) > 59:
                raise ValueError(f"expected a time of day such as 08:00, got {v!r}")
            return v
        if parse_duration(v) >= 86400:
            raise ValueError(f"expected a time of day under 24h, got {v!r}")
        return v


AUTOSCALING_METRICS = ("invocations_per_instance", "concurrent_requests_per_model", "gpu_memory_utilization",
                       "cpu_utilization", "invocations_per_copy", "concurrent_requests_per_copy")


class AutoscalingSpec(Strict):
    """Target tracking (default) or step scaling of an endpoint's instances (or a component's copies)."""

    policy: Literal["target_tracking", "step"] = "target_tracking"
    metric: Literal[AUTOSCALING_METRICS]  # type: ignore[valid-type]
    target: Number | None = Field(default=None, gt=0)
    period: Period | None = None          # default: 60 s, or 10 s for the high-resolution metrics
    scale_out_cooldown: Duration = 300.0
    scale_in_cooldown: Duration = 300.0
    scale_out_datapoints: Count = Field(default=3, ge=1)
    scale_in_datapoints: Count = Field(default=15, ge=1)
    scale_in_ratio: Number = Field(default=0.9, gt=0, le=1)
    steps: list[StepSpec] = []
    datapoints: Count = Field(default=1, ge=1)   # step scaling: consecutive datapoints for an alarm
    schedule: list[ScheduleSpec] = []

    @model_validator(mode="after")
    def _policy_fields(self) -> "AutoscalingSpec":
        if self.period is not None and self.period <= 0:
            raise ValueError("period must be a duration > 0 (default: 60 s, 10 s for the high-resolution metrics)")
        if self.policy == "target_tracking" and self.target is None:
            raise ValueError("target tracking needs a target (for example target: 225)")
        if self.policy == "step" and not self.steps:
            raise ValueError("step scaling needs steps: [{above: X, change: N}, {below: Y, change: -M}]")
        return self


class ProvisioningSpec(Strict):
    """Time from asking for an instance to its being able to start loading models."""

    dist: Literal[SERVICE_DISTS] = "lognormal"  # type: ignore[valid-type]
    mean: Duration = 300.0
    cv: CV = Field(default=0.3, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _from_duration(cls, v: Any) -> Any:
        if isinstance(v, (int, float, str)) and not isinstance(v, bool):
            return {"dist": "deterministic", "mean": v, "cv": 0.0}
        return v

    @model_validator(mode="after")
    def _spread(self) -> "ProvisioningSpec":
        # the default cv (0.3) is lognormal's: only a cv given beside another dist is checked
        if "cv" in self.model_fields_set:
            _check_dist_cv(self.dist, self.cv)
        return self


class CopiesSpec(InstancesSpec):
    pass


class ScaleFromZeroSpec(Strict):
    """The step-scaling alarm that brings a copy back to a component that has none:
    NoCapacityInvocationFailures (Sum over ``period``) >= 1 for ``datapoints``
    periods adds one copy; no second one within ``cooldown``."""

    period: Period = 60.0
    datapoints: Count = Field(default=1, ge=1)
    cooldown: Duration = 300.0

    @field_validator("period")
    @classmethod
    def _positive_period(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("period must be > 0")
        return v


class FailureEvent(Strict):
    """A scheduled failure: one instance (``instance``: its index among those in
    service) or a whole availability zone (``zone``) at ``at`` (simulated time
    from the start, warmup included); a zone outage lasts ``duration`` (no
    instance is placed there meanwhile)."""

    at: Duration
    instance: Count | None = Field(default=None, ge=0)
    zone: Count | None = Field(default=None, ge=0)
    duration: Duration | None = None

    @model_validator(mode="after")
    def _target(self) -> "FailureEvent":
        if (self.instance is None) == (self.zone is None):
            raise ValueError("a failure event needs exactly one of instance or zone")
        return self


class FailuresSpec(Strict):
    """Instance failures: random (mean time between failures per instance) and scheduled."""

    mtbf: Period | None = None
    events: list[FailureEvent] = []
    in_flight: Literal["fail", "retry"] = "fail"   # requests on a failed instance: fail, or retry once elsewhere
    replace: bool = True                            # the endpoint replaces a failed instance (after provisioning)

    @field_validator("mtbf")
    @classmethod
    def _positive(cls, v):
        if v is not None and v <= 0:
            raise ValueError("mtbf must be > 0")
        return v


class ComponentSpec(Strict):
    """An inference component: a model and what each of its copies reserves on an instance."""

    model: Text                                              # a model name or a glob (one component per model)
    accelerators: Count | None = Field(default=None, ge=0)  # whole GPUs per copy (default: the model's)
    memory_gb: Size | None = None                           # host memory per copy (default: the model's memory_gb)
    cpus: Number = Field(default=1.0, ge=0.25)              # vCPUs per copy
    copies: CopiesSpec = CopiesSpec(initial=1, min=1, max=1)
    max_concurrency: Count | None = Field(default=None, ge=1)  # per copy (default: the endpoint's)
    autoscaling: AutoscalingSpec | None = None
    scale_from_zero: ScaleFromZeroSpec | None = None        # default with copies.min 0: period 1m, +1 copy

    @field_validator("memory_gb")
    @classmethod
    def _min_memory(cls, v: float | None) -> float | None:
        if v is not None and v < 0.128 - 1e-12:
            raise ValueError("memory_gb must be at least 128MB (SageMaker's MinMemoryRequiredInMb >= 128)")
        return v


class EndpointSpec(Strict):
    name: Text = Field(min_length=1)
    mode: Literal[MODES] = "sme"  # type: ignore[valid-type]
    instance_type: Text
    instances: InstancesSpec = InstancesSpec(initial=1, min=1, max=1)
    routing: Text = "random"
    # The router's view of the requests in flight on each instance (ic: each copy) is a snapshot
    # refreshed at this period, as a fleet of router hosts reading a shared load table; between
    # refreshes least_outstanding_requests and power_of_two send every request where the counts
    # looked lowest (they herd). Default (None): exact, instantaneous counts. random and
    # round_robin read no counts: no effect on them.
    routing_refresh: Period | None = None
    max_concurrency: Count = Field(default=1, ge=1)
    queue_limit: Count | None = Field(default=None, ge=0)
    timeout: Duration = 60.0
    models: list[Text] = []
    cache: CacheSpec | None = None
    prewarm: Period | None = None     # invoke every model of the endpoint at this interval
    # mme: workers per instance, which run its requests and its loads alike, the longest-waiting
    # job first (a CPU-bound model server's worker processes); default: no such limit
    instance_concurrency: Count | None = Field(default=None, ge=1)
    autoscaling: AutoscalingSpec | None = None
    # Default: public reports put trigger-to-serving at 2-9 minutes (P50); 5 min mean, cv 0.3.
    provisioning: ProvisioningSpec = ProvisioningSpec()
    zones: Count = Field(default=1, ge=1, le=64)     # availability zones the instances are spread over
    failures: FailuresSpec | None = None
    placement: Literal["binpack", "spread"] = "binpack"
    components: list[ComponentSpec] = []
    # mode ic only (managed instance scaling); None: the defaults of sim.hosting.ic
    scale_in_policy: Literal["idle_release", "consolidation"] | None = None
    scale_in_cooldown: Duration | None = None
    data_cache: bool | None = None       # keep artifacts on an instance's disk for later copies

    @field_validator("timeout")
    @classmethod
    def _positive_timeout(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("timeout must be > 0")
        return v

    @model_validator(mode="after")
    def _failure_targets(self) -> "EndpointSpec":
        """A scheduled failure names a zone of the endpoint's and an instance it can ever have."""
        for k, ev in enumerate(self.failures.events if self.failures else []):
            if ev.zone is not None and ev.zone >= self.zones:
                raise ValueError(f"failures.events[{k}].zone: {ev.zone} is not one of the endpoint's zones "
                                 f"(0 to {self.zones - 1}; set zones to have more)")
            if ev.instance is not None and ev.instance >= self.instances.hi:
                raise ValueError(f"failures.events[{k}].instance: {ev.instance} is not an index of the endpoint's "
                                 f"instances in service (0 to {self.instances.hi - 1} at most)")
        return self

    @field_validator("routing_refresh")
    @classmethod
    def _positive_refresh(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("routing_refresh must be a duration > 0")
        return v

    @field_validator("routing")
    @classmethod
    def _known_routing(cls, v: str) -> str:
        if v not in ROUTING_POLICIES:
            from difflib import get_close_matches

            close = get_close_matches(v, ROUTING_POLICIES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"unknown routing policy {v!r}{hint}; expected one of {', '.join(ROUTING_POLICIES)}")
        return v


class SLOSpec(Strict):
    """Latency targets; ``ttft`` (time to first token) and ``tpot`` (time per output token after the
    first) for language models served with continuous batching. A request attains the SLO when its
    latency meets the latency target and, where it has them, its TTFT and TPOT meet theirs."""

    p50: Duration | None = None
    p90: Duration | None = None
    p99: Duration | None = None
    mean: Duration | None = None
    ttft: Duration | None = None
    tpot: Duration | None = None

    @field_validator("p50", "p90", "p99", "mean", "ttft", "tpot")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("a latency target must be a duration > 0")
        return v

    @property
    def latency_target(self) -> float | None:
        """The latency a request must meet to count as attained (the tightest target given)."""
        given = [v for v in (self.p50, self.p90, self.p99, self.mean) if v is not None]
        return self.p99 if self.p99 is not None else (min(given) if given else None)


class ScenarioSpec(Strict):
    name: Text = Field(min_length=1)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    duration: Duration
    warmup: Duration = 0.0
    replications: Count = Field(default=1, ge=1, le=10_000)
    instance_types: list[InstanceTypeSpec] = []
    profile: Text | None = None           # calibration profile: load bandwidths, runtime memory, services
    models: list[ModelSpec] = Field(min_length=1)
    endpoints: list[EndpointSpec] = Field(min_length=1)
    slo: SLOSpec | None = None

    @field_validator("duration")
    @classmethod
    def _positive_duration(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("duration must be > 0")
        return v
