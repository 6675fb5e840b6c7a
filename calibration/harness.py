"""Timing loops with pyperf-like rigor.

Contention: the machine may be shared (another benchmark on a 2-core box
turns a 5 ms forward pass into 400 ms: OpenMP threads spin waiting for a
descheduled sibling). Every sample therefore also measures the CPU time used
by OTHER processes meanwhile: (user+nice+steal jiffies of /proc/stat) minus
this process's user time (getrusage). System time is left out on purpose:
the kernel threads that write back, evict and fault pages for our own loads
would otherwise read as a neighbour. A sample during which others used more than
30% of a core (and at least 3 jiffies) is flagged "contended": it is kept in
the raw samples, but it does not count towards the stop rule or the summary,
and the loop backs off (sleeps) before retrying, within a run-wide waiting
budget (`CONTENTION`); a measurement that starts within 5 s of a contended
sample first waits (short probes) for the machine to calm down. When fewer
than 2 clean samples remain, the summary falls back to all samples (and says
so). Only CPU neighbours are detected; on a GPU box another process on the
same GPU is not (check nvidia-smi before a calibration run).

`measure(fn, ...)` runs warm-ups, then repeats `fn` until the relative MAD
(median absolute deviation / median) of the samples is at or below a target,
or has settled (stopped moving), or a repeat / time budget is hit.  It returns
the raw samples with their robust summary: median, MAD, IQR and the samples
flagged as outliers by Tukey's rule (outside [Q1 - 1.5 IQR, Q3 + 1.5 IQR]).
Outliers are flagged, never dropped from the raw samples.

Timers: "wall" (time.perf_counter; on cuda the device is synchronised before
and after the call) and "cuda" (CUDA events on the current stream, for GPU
work; the device is synchronised after the end event).
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np


def robust_summary(samples) -> dict:
    x = np.asarray(samples, dtype=float)
    if x.size == 0:
        return {"n": 0, "median": None, "mad": None, "rel_mad": None, "mean": None,
                "std": None, "q1": None, "q3": None, "iqr": None, "min": None,
                "max": None, "outliers": []}
    med = float(np.median(x))
    mad = float(np.median(np.abs(x - med)))
    q1, q3 = (float(v) for v in np.percentile(x, [25, 75]))
    iqr = q3 - q1
    lo, hi = q1 - 1.5 * iqr, q3 + 1.5 * iqr
    outliers = [int(i) for i in np.nonzero((x < lo) | (x > hi))[0]] if x.size >= 4 else []
    return {
        "n": int(x.size), "median": med, "mad": mad,
        "rel_mad": (mad / med) if med > 0 else None,
        "mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
        "q1": q1, "q3": q3, "iqr": iqr, "min": float(x.min()), "max": float(x.max()),
        "outliers": outliers,
    }


def inliers(samples) -> list:
    """Samples that are not IQR outliers."""
    s = robust_summary(samples)
    bad = set(s["outliers"])
    return [v for i, v in enumerate(samples) if i not in bad]


def cv(samples, drop_outliers: bool = True) -> float | None:
    x = inliers(samples) if drop_outliers else list(samples)
    if len(x) < 2:
        return None
    m = statistics.fmean(x)
    return statistics.stdev(x) / m if m > 0 else None


class CpuMeter:
    """User-space CPU time used by other processes, from /proc/stat (Linux)."""

    def __init__(self):
        self.tck = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.ok = os.path.exists("/proc/stat")

    def snap(self):
        busy = None
        if self.ok:
            try:
                with open("/proc/stat") as f:
                    v = [int(x) for x in f.readline().split()[1:]]
                # user nice system idle iowait irq softirq steal ...
                busy = (v[0] + v[1] + (v[7] if len(v) > 7 else 0)) / self.tck
            except (OSError, ValueError, IndexError):
                busy = None
        return busy, resource.getrusage(resource.RUSAGE_SELF).ru_utime, time.perf_counter()

    def foreign(self, a, b):
        """(foreign CPU seconds, wall seconds) between two snaps."""
        if a[0] is None or b[0] is None:
            return 0.0, b[2] - a[2]
        return max(0.0, (b[0] - a[0]) - (b[1] - a[1])), b[2] - a[2]

    def contended(self, a, b) -> bool:
        f, w = self.foreign(a, b)
        return f > max(3.0 / self.tck, 0.3 * w)


METER = CpuMeter()


def _utime_s(pid: int, tck: float) -> float:
    """User CPU seconds of a live process (all its threads), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / tck      # utime: field 14 of /proc/PID/stat
    except (OSError, ValueError, IndexError):
        return 0.0


class Neighbours:
    """How many cores other processes used over a span: the machine's user CPU time
    (/proc/stat: user, nice and steal, as CpuMeter counts it) less this process's, its
    reaped children's (getrusage) and ``pids``' (live processes of ours, /proc/PID/stat).
    ``start()``, then ``cores()`` at the end: the mean number of cores they used, None where
    /proc/stat cannot be read. The measurement of a timing's noise that a timing alone cannot
    give: a neighbour that takes a core for minutes shows here whatever the samples say."""

    def __init__(self, pids=()):
        self.pids = list(pids)
        self.start()

    def _snap(self):
        busy, _, wall = METER.snap()
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        own = me.ru_utime + kids.ru_utime + sum(_utime_s(p, METER.tck) for p in self.pids)
        return busy, own, wall

    def start(self) -> "Neighbours":
        self.a = self._snap()
        return self

    def cores(self) -> float | None:
        b = self._snap()
        if self.a[0] is None or b[0] is None or b[2] <= self.a[2]:
            return None
        return max(0.0, (b[0] - self.a[0]) - (b[1] - self.a[1])) / (b[2] - self.a[2])


class _Contention:
    """Run-wide bookkeeping of contended samples and of the time spent
    waiting for the machine to calm down."""

    def __init__(self):
        self.reset(60.0)

    def reset(self, wait_budget_s: float):
        self.wait_budget_s = wait_budget_s
        self.waited_s = 0.0
        self.samples = 0
        self.contended = 0
        self.last_contended = -1e9

    def wait_quiet(self, max_s: float, probe_s: float = 0.1) -> bool:
        """Wait (within both budgets) until a short probe sees no neighbour."""
        t0 = time.perf_counter()
        if self.waited_s >= self.wait_budget_s:
            return False
        while True:
            a = METER.snap()
            time.sleep(probe_s)
            b = METER.snap()
            if not METER.contended(a, b):
                return True
            self.waited_s += b[2] - a[2]
            self.last_contended = b[2]
            if self.waited_s >= self.wait_budget_s or b[2] - t0 >= max_s:
                return False

    def recently_contended(self, within_s: float = 5.0) -> bool:
        return time.perf_counter() - self.last_contended < within_s

    def backoff(self, attempt: int):
        left = self.wait_budget_s - self.waited_s
        if left <= 0:
            return False
        d = min(left, 0.2 * (2 ** min(attempt, 4)))
        time.sleep(d)
        self.waited_s += d
        return True

    def to_dict(self):
        return {"samples": self.samples, "contended": self.contended,
                "contended_fraction": self.contended / self.samples if self.samples else 0.0,
                "waited_s": self.waited_s, "wait_budget_s": self.wait_budget_s}


CONTENTION = _Contention()


@dataclass
class Policy:
    """How hard to try. `quick()` and `full()` are the two presets."""
    warmup: int = 2
    min_reps: int = 5
    max_reps: int = 30
    budget_s: float = 10.0           # per measure() call (warm-ups excluded)
    rel_mad_target: float = 0.02     # stop when MAD/median <= this
    settle_tol: float = 0.005        # ... or when it moves less than this
    max_wait_s: float = 30.0         # per measure(): waiting out contention

    @classmethod
    def quick(cls):
        return cls(warmup=1, min_reps=3, max_reps=8, budget_s=2.0, rel_mad_target=0.03,
                   settle_tol=0.01, max_wait_s=5.0)

    @classmethod
    def full(cls):
        return cls(warmup=3, min_reps=7, max_reps=50, budget_s=20.0, rel_mad_target=0.01,
                   settle_tol=0.003)

    def scaled(self, **kw):
        d = dict(self.__dict__)
        d.update(kw)
        return Policy(**d)


def _cuda_sync(device):
    import torch
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(fn, timer: str = "wall", device: str = "cpu", setup=None):
    """Time one call of fn() in seconds. `setup()` runs first, untimed; its
    return value, if not None, is passed to fn."""
    arg = setup() if setup is not None else None
    call = (lambda: fn(arg)) if setup is not None else fn
    if timer == "cuda":
        import torch
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = call()
        end.record()
        end.synchronize()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3, out
    _cuda_sync(device)
    t0 = time.perf_counter()
    out = call()
    _cuda_sync(device)
    return time.perf_counter() - t0, out


@dataclass
class Measurement:
    samples: list = field(default_factory=list)
    warmup: list = field(default_factory=list)
    contended: list = field(default_factory=list)   # indices into samples
    stop: str = ""

    @property
    def clean(self) -> list:
        bad = set(self.contended)
        c = [v for i, v in enumerate(self.samples) if i not in bad]
        return c if len(c) >= 2 or len(c) == len(self.samples) else list(self.samples)

    def to_dict(self) -> dict:
        d = robust_summary(self.clean)
        d["summary_of"] = "clean" if len(self.clean) < len(self.samples) else "all"
        d["samples"] = list(self.samples)
        d["contended"] = list(self.contended)
        d["warmup"] = list(self.warmup)
        d["stop"] = self.stop
        return d


def clean_samples(d: dict) -> list:
    """The uncontended samples of a Measurement.to_dict() (all if < 2)."""
    bad = set(d.get("contended", []))
    c = [v for i, v in enumerate(d["samples"]) if i not in bad]
    return c if len(c) >= 2 or len(c) == len(d["samples"]) else list(d["samples"])


def measure(fn, policy: Policy, *, timer: str = "wall", device: str = "cpu", setup=None,
            teardown=None) -> Measurement:
    """Warm up, then repeat until the relative MAD settles, the target is met,
    max_reps or the time budget is reached. teardown(out) runs untimed after
    each call (free memory, etc.)."""
    m = Measurement()
    if CONTENTION.recently_contended():
        # the machine was busy a moment ago: wait for it to calm down first
        CONTENTION.wait_quiet(policy.max_wait_s)
    for _ in range(policy.warmup):
        dt, out = time_once(fn, timer, device, setup)
        m.warmup.append(dt)
        if teardown is not None:
            teardown(out)
        del out
    t_start = time.perf_counter()
    waited0 = CONTENTION.waited_s
    prev = None
    attempt = 0
    while True:
        a = METER.snap()
        dt, out = time_once(fn, timer, device, setup)
        b = METER.snap()
        m.samples.append(dt)
        if teardown is not None:
            teardown(out)
        del out
        CONTENTION.samples += 1
        if METER.contended(a, b):
            CONTENTION.contended += 1
            CONTENTION.last_contended = b[2]
            m.contended.append(len(m.samples) - 1)
            if (len(m.samples) < 3 * policy.max_reps
                    and CONTENTION.waited_s - waited0 < policy.max_wait_s
                    and CONTENTION.backoff(attempt)):
                attempt += 1
                continue
        else:
            attempt = 0
        clean = m.clean
        n = len(clean)
        if n >= policy.max_reps or len(m.samples) >= 3 * policy.max_reps:
            m.stop = "max_reps"
            break
        # waiting for contention to pass does not eat the measuring budget
        spent = time.perf_counter() - t_start - (CONTENTION.waited_s - waited0)
        if spent >= policy.budget_s and n >= 2:
            m.stop = "budget"
            break
        if n >= policy.min_reps:
            s = robust_summary(clean)
            r = s["rel_mad"] if s["rel_mad"] is not None else math.inf
            if r <= policy.rel_mad_target:
                m.stop = "rel_mad_target"
                break
            if prev is not None and abs(r - prev) <= policy.settle_tol:
                m.stop = "rel_mad_settled"
                break
            prev = r
    return m


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.0f}{unit}" if n / div >= 10 else f"{n / div:.1f}{unit}"
    return f"{n:.0f}B"
