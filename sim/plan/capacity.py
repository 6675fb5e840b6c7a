"""Capacity estimators: how many units (instances, or copies) serve a model's traffic within its SLO.

One estimator per execution model of a copy (:mod:`sim.hosting.device`), behind one interface,
:class:`Estimator`; :data:`ESTIMATORS` is their registry by execution model:

- ``slots`` (no ``batching``: each request in service runs at full speed): Erlang C on
  ``units x slots`` pooled servers (:func:`units_needed`);
- ``batching`` (processor sharing with a capacity function): the birth-death chain whose death
  rate with ``k`` requests in service on a device is ``k / (slowdown(k) x mean)``, summed over
  the devices of the pool with the requests spread evenly (least-outstanding routing); the
  chance of waiting is the chain's mass at or above the pool's slots and the wait's tail decays
  at the full pool's rate (:class:`BatchingEstimator`). Without a curve it is Erlang C exactly;
- ``continuous`` (a language model's continuous batching): on each instance type, the engine a
  copy gets there (its KV cache beside the weights, its step model: sim.scenario.resolve's own
  resolution); the step model's saturation throughput of a copy (``max_num_seqs`` sequences, or
  as many as the KV cache holds once grown to the mean prompt plus output) with an Erlang C wait on
  copies of that rate against the TTFT target less the P99 prompt's prefill
  (:class:`ContinuousEstimator`, :class:`ContinuousSizing`).

Estimates start the planner's sizing; the simulation checks them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Protocol

TAIL = 0.002                 # queueing estimate: P(wait > SLO - service P99) allowed
MAX_UTILISATION = 0.9        # queueing estimate: busy fraction of the servers at most
MAX_UNITS = 100_000


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/``servers`` queue offered ``load`` Erlangs."""
    if load <= 0:
        return 0.0
    if servers <= load:
        return 1.0
    b = 1.0
    for k in range(1, servers + 1):   # Erlang B by its stable recursion
        b = load * b / (k + load * b)
    return servers * b / (servers - load * (1.0 - b))

def units_needed(rate: float, mean_s: float, p99_s: float, slo_s: float | None, slots: int) -> int:
    """Units (instances, or copies) of ``slots`` servers each that serve ``rate`` requests
    per second of mean service ``mean_s`` with waits short enough for the SLO:
    offered load ``rate x mean_s / (units x slots)`` at most MAX_UTILISATION, and
    (M/M/c, pooled by least-outstanding-requests routing) the chance of waiting
    longer than ``slo - service P99`` at most TAIL."""
    if rate <= 0 or mean_s <= 0:
        return 1
    a = rate * mean_s
    mu = 1.0 / mean_s
    budget = max((slo_s - p99_s) if slo_s is not None else 10 * mean_s, 0.0)
    u = max(1, math.ceil(a / (slots * MAX_UTILISATION)))
    while u < 100_000:
        n = u * slots
        if n > a and erlang_c(n, a) * math.exp(-(n * mu - rate) * budget) <= TAIL:
            return u
        u += 1
    return u

def wait_tail(c: int, lam: float, mean_s: float, t: float, cv: float = 1.0) -> float:
    """P(wait > t) in M/M/c with arrival rate ``lam`` and mean service ``mean_s``; for service times
    of coefficient of variation ``cv``, the wait scaled by (1 + cv^2) / 2 (Allen-Cunneen, M/G/c)."""
    a = lam * mean_s
    if a >= c:
        return 1.0
    scale = (1.0 + cv * cv) / 2.0
    return erlang_c(c, a) * math.exp(-(c / mean_s - lam) * max(t, 0.0) / max(scale, 1e-9))

def mean_wait(c: int, lam: float, mean_s: float, cv: float = 1.0) -> float:
    a = lam * mean_s
    if a >= c:
        return math.inf
    return erlang_c(c, a) / (c / mean_s - lam) * (1.0 + cv * cv) / 2.0


class Estimator(Protocol):
    """Units of ``slots`` requests in service at once each (``per_device`` of them on one device)
    that serve ``load`` (a :class:`~sim.plan.load.ModelLoad`: ``peak_rate``, ``mean_s``, ``p99_s``)
    within ``slo_s`` (seconds; None: no target, a budget of ten mean service times)."""

    name: str

    def units(self, load: Any, slots: int, slo_s: float | None, per_device: int | None = None,
              it: Any = None) -> int: ...


@dataclass(frozen=True)
class SlotsEstimator:
    name: str = "slots"

    def units(self, load: Any, slots: int, slo_s: float | None, per_device: int | None = None,
              it: Any = None) -> int:
        return units_needed(load.peak_rate, load.mean_s, load.p99_s, slo_s, slots)


def pool_rate(k: int, devices: int, per_device: int, slowdown) -> float:
    """Requests per mean service time that ``devices`` devices of ``per_device`` slots complete with
    ``k`` requests in service, spread evenly (``slowdown(n)``: the factor with ``n`` on one device)."""
    k = min(k, devices * per_device)
    if k <= 0:
        return 0.0
    base, extra = divmod(k, devices)
    r = 0.0
    if base > 0:
        r += (devices - extra) * base / slowdown(base)
    if extra:
        r += extra * (base + 1) / slowdown(base + 1)
    return r


def batching_wait(lam: float, mean_s: float, devices: int, per_device: int, slowdown,
                  budget: float) -> tuple[float, float]:
    """(P(wait > budget), mean requests in service per device) of the pool's birth-death chain."""
    n = devices * per_device
    mu = [pool_rate(k, devices, per_device, slowdown) / mean_s for k in range(n + 1)]
    if lam >= mu[n]:
        return 1.0, float(per_device)
    # Unnormalised stationary weights, in logs (the chain's products can overflow).
    logp = [0.0]
    for k in range(1, n + 1):
        logp.append(logp[-1] + math.log(lam) - math.log(mu[k]))
    top = max(logp)
    w = [math.exp(x - top) for x in logp]
    rho = lam / mu[n]
    tail = w[n] / (1.0 - rho)                    # states n, n+1, ... (geometric beyond the full pool)
    total = sum(w[:n]) + tail
    p_wait = tail / total
    in_service = (sum(k * w[k] for k in range(n)) + n * tail) / total
    return p_wait * math.exp(-(mu[n] - lam) * max(budget, 0.0)), in_service / devices


@dataclass(frozen=True)
class BatchingEstimator:
    name: str = "batching"

    def units(self, load: Any, slots: int, slo_s: float | None, per_device: int | None = None,
              it: Any = None) -> int:
        from ..hosting.device import slowdown_table

        rate, mean_s, p99_s = load.peak_rate, load.mean_s, load.p99_s
        if rate <= 0 or mean_s <= 0:
            return 1
        per = max(1, min(per_device or getattr(load, "concurrency", slots) or 1, slots))
        dev_per_unit = max(1, slots // per)
        f = slowdown_table(dict(load.slowdown)) if getattr(load, "slowdown", ()) else (lambda k: 1.0)
        full = pool_rate(per, 1, per, f) / mean_s       # one full device's requests per second
        u = max(1, math.ceil(rate / (dev_per_unit * full * MAX_UTILISATION)))
        while u < MAX_UNITS:
            d = u * dev_per_unit
            occ = 1.0
            for _ in range(4):   # the service P99 stretched at the chain's mean occupancy, to a fixed point
                budget = max((slo_s - p99_s * f(occ)) if slo_s is not None else 10 * mean_s, 0.0)
                tail, per_dev = batching_wait(rate, mean_s, d, per, f, budget)
                nxt = max(1.0, min(float(per), per_dev))
                if abs(nxt - occ) < 1e-3:
                    break
                occ = nxt
            if tail <= TAIL:
                return u
            u += 1
        return u


@dataclass(frozen=True)
class ContinuousEstimator:
    """A continuous-batching copy at saturation: ``B`` sequences (``max_num_seqs``, or as many as
    ``kv_tokens`` hold when each has grown to the mean prompt plus output, in whole blocks of
    ``block_size``: the cache must hold a sequence's context at its end, or the engine preempts
    and recomputes), each step giving each one token and prefilling the prompts that arrive
    meanwhile (``B x input / output`` tokens a step). Its throughput is ``B / (output x step)``
    requests per second; copies are counted as Erlang C servers of that rate against the TTFT
    budget (or the latency's, without a TTFT target) less the prefill of the P99 prompt
    (``p99_input`` tokens, in chunks of what ``max_batched_tokens`` leaves beside the batch's
    decode tokens, each a step with the full batch). Where that prefill alone takes the whole
    budget, no count meets the target there: MAX_UNITS (as a type with no room for the cache).

    With a TPOT target (``tpot_s``) the batch is also at most the largest whose step takes no
    longer than the target (a sequence's time per output token is the step time of the batch it
    runs in): a copy runs its batch that short, or its tokens come too slowly. Where a step of one
    sequence alone takes longer, no count meets the target: MAX_UNITS."""

    step: Any                     # sim.hosting.steps.StepTime
    max_num_seqs: int
    mean_input: float
    mean_output: float
    kv_tokens: int | None = None
    block_size: int = 1
    p99_input: float | None = None
    max_batched_tokens: int | None = None
    tpot_s: float | None = None
    name: str = "continuous"

    def kv_batch(self) -> int:
        """Sequences the KV cache holds once each has grown to the mean prompt plus output, in whole
        blocks (``max_num_seqs`` aside; without a cache size: ``max_num_seqs``)."""
        if not self.kv_tokens:
            return self.max_num_seqs
        bs = max(1, self.block_size)
        held = math.ceil(max(self.mean_input + self.mean_output, 1.0) / bs) * bs
        return max(1, int(self.kv_tokens // held))

    def batch(self) -> int:
        """The sequences a saturated copy runs: ``max_num_seqs``, at most what the KV cache holds and
        what the TPOT target allows (0: not even one sequence meets it)."""
        b = min(self.max_num_seqs, self.kv_batch())
        if self.tpot_s is None or self.step_seconds(b) <= self.tpot_s:
            return b
        lo, hi = 0, b            # step_seconds grows with the batch: the largest within the target
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.step_seconds(mid) <= self.tpot_s else (lo, mid)
        return lo

    def step_seconds(self, b: int | None = None) -> float:
        """Seconds of a step of ``b`` sequences (default: :meth:`batch`) at the mean context, with
        the prompts that arrive meanwhile."""
        b = self.batch() if b is None else b
        kv = b * (self.mean_input + self.mean_output / 2.0)
        return self.step.time(b, kv, b * self.mean_input / max(self.mean_output, 1.0))

    def throughput(self) -> float:
        """Requests per second of one copy at saturation (0: the TPOT target is out of reach)."""
        b = self.batch()
        return b / (max(self.mean_output, 1.0) * self.step_seconds(b)) if b else 0.0

    def prefill_seconds(self, tokens: float | None = None) -> float:
        """Seconds to prefill a prompt of ``tokens`` (default: the P99 prompt) beside a full batch."""
        p = float(tokens if tokens is not None else (self.p99_input or self.mean_input))
        b = max(1, self.batch())
        kv = b * (self.mean_input + self.mean_output / 2.0)
        chunk = max(1, (self.max_batched_tokens or int(math.ceil(p)) + b) - b)
        t = 0.0
        while p > 0:
            t += self.step.time(b, kv, int(min(chunk, math.ceil(p))))
            p -= chunk
        return t

    def units(self, load: Any, slots: int = 1, slo_s: float | None = None, per_device: int | None = None,
              ttft_s: float | None = None) -> int:
        x = self.throughput()
        rate = load.peak_rate
        if rate <= 0:
            return 1
        if x <= 0:                   # a step of one sequence alone misses the TPOT target
            return MAX_UNITS
        u = max(1, math.ceil(rate / (x * MAX_UTILISATION)))
        budget = ttft_s if ttft_s is not None else slo_s
        if budget is not None:
            budget -= self.prefill_seconds()
            if budget <= 0:          # the P99 prompt's prefill alone misses the target: no count meets it
                return MAX_UNITS
        while u < MAX_UNITS:
            if budget is None or wait_tail(u, rate, 1.0 / x, budget) <= TAIL:
                return u
            u += 1
        return u


@dataclass(frozen=True)
class ContinuousSizing:
    """The estimator of continuous-batching models: on instance type ``it``, the engine a copy gets
    there (``load.llm.engine(it)``: its KV cache and step model) as a :class:`ContinuousEstimator`;
    units of ``slots // per_device`` copies each (an instance's copies). A type where no copy runs
    (no room for the KV cache) needs MAX_UNITS; without a type or an engine, slots of the service time."""

    name: str = "continuous"

    def copy_estimator(self, load: Any, it: Any) -> ContinuousEstimator | None:
        llm = getattr(load, "llm", None)
        eng = llm.engine(it) if llm is not None and it is not None else None
        if eng is None:
            return None
        return ContinuousEstimator(eng.step, eng.max_num_seqs, max(llm.mean_input, 1.0), max(llm.mean_output, 1.0),
                                   eng.kv_blocks * eng.block_size, eng.block_size, getattr(llm, "p99_input", None),
                                   eng.max_num_batched_tokens, getattr(llm, "tpot_s", None))

    def units(self, load: Any, slots: int, slo_s: float | None, per_device: int | None = None,
              it: Any = None) -> int:
        llm = getattr(load, "llm", None)
        if llm is None or it is None:
            return SlotsEstimator().units(load, slots, slo_s, per_device)
        est = self.copy_estimator(load, it)
        if est is None:
            return MAX_UNITS
        per = max(1, per_device or 1)
        copies_per_unit = max(1, slots // per)
        copies = est.units(load, 1, None, ttft_s=llm.ttft_s)
        if copies >= MAX_UNITS:
            return MAX_UNITS
        return max(1, math.ceil(copies / copies_per_unit))


ESTIMATORS: dict[str, Any] = {"slots": SlotsEstimator(), "batching": BatchingEstimator(),
                              "continuous": ContinuousSizing()}


def estimator_for(load: Any) -> Estimator:
    """The estimator of a model's execution model (``load.execution``)."""
    return ESTIMATORS.get(getattr(load, "execution", "slots"), ESTIMATORS["slots"])


def pooled(loads: Any, conc: int) -> Any:
    """The batching models of ``loads`` as one load on a shared device (an MME instance's GPU runs the
    requests of every model loaded there: the slowdown counts them all): their peak rates summed,
    the rate-weighted mean service time, the largest P99, and the curve that slows most at ``conc``
    requests in service (None: no batching model, or no traffic)."""
    from ..hosting.device import slowdown_table

    shared = [lm for lm in loads if lm.execution == "batching" and lm.peak_rate > 0]
    if not shared:
        return None
    rate = sum(lm.peak_rate for lm in shared)
    worst = max(shared, key=lambda lm: slowdown_table(dict(lm.slowdown))(max(conc, 1)))
    return replace(worst, name="+".join(lm.name for lm in shared[:3]), peak_rate=rate,
                   mean_s=sum(lm.peak_rate * lm.mean_s for lm in shared) / rate,
                   p99_s=max(lm.p99_s for lm in shared), concurrency=conc)


def instances_needed(loads: Any, it: Any, copies_per_instance: int, concurrency: int, slo_s: float | None,
                     models_per_instance: int = 1, ttft_s: float | None = None,
                     tpot_s: float | None = None) -> int:
    """Instances of type ``it`` that serve ``loads`` (:class:`~sim.plan.load.ModelLoad`, the models of
    one endpoint) by each model's execution model (:func:`estimator_for`): an instance holds
    ``copies_per_instance`` copies of ``concurrency`` requests at once (one model's, on a single-model
    endpoint), or copies of up to ``models_per_instance`` models at once (a multi-model endpoint: the
    copies every model needs, ``models_per_instance`` to an instance). ``ttft_s`` and ``tpot_s`` replace
    a language model's TTFT and TPOT targets. MAX_UNITS where a model's copy does not run on ``it``. On a GPU type, a
    multi-model endpoint's instances also serve their batching models' pooled traffic
    (:func:`pooled`: the models an instance holds share its GPU)."""
    loads = list(loads)
    if not loads:
        return 1
    copies = 0
    units = 1
    for lm in loads:
        if getattr(lm, "llm", None) is not None:
            if ttft_s is not None:
                lm = replace(lm, llm=replace(lm.llm, ttft_s=ttft_s))
            if tpot_s is not None:
                lm = replace(lm, llm=replace(lm.llm, tpot_s=tpot_s))
        if len(loads) == 1:
            units = estimator_for(lm).units(lm, copies_per_instance * concurrency, slo_s, concurrency, it)
        else:
            c = estimator_for(lm).units(lm, concurrency, slo_s, concurrency, it)
            if c >= MAX_UNITS:
                return MAX_UNITS
            copies += c
    if len(loads) > 1:
        units = max(1, math.ceil(copies / max(1, models_per_instance)))
        pool = pooled(loads, concurrency) if models_per_instance > 1 and it is not None and it.gpus > 0 else None
        if pool is not None:    # the models an instance holds share its GPU's time
            units = max(units, estimator_for(pool).units(pool, concurrency, slo_s, concurrency, it))
    return min(units, MAX_UNITS)
