"""The calibration job: steps, resume, fits, profile.

Steps (each resumable): "runtime", "loads:<size>" per model size,
"inference:<family>:<size>" per family and inference size, "steps:<size>" per
size of the llama-like decoder whose step time is timed (calibration/steps.py). After each step the
state is written atomically to the partial file (PROFILE.partial.json next to
--out PROFILE.json); a restart with the same --out (same host, device, dtype,
mode) skips the finished steps. An out-of-memory error (or any other error)
in a step is recorded in `errors` and the job goes on. Temporary model files
are removed at the end, also on Ctrl-C / SIGTERM (unless keep=True).
"""
from __future__ import annotations

import copy
import gc
import json
import os
import shutil
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

import torch

from . import env, harness, loads, models, runtime
from . import steps as stepmod
from . import fit as fitmod
from . import inference as inf
from . import profile as prof

PARTIAL_SCHEMA = "capsim.profile-partial/1"
DEFAULT_SIZES = {
    ("cpu", True): ["5M", "10M", "25M", "50M", "75M", "100M"],      # fp32: 20-400 MB
    ("cpu", False): ["10M", "25M", "50M", "100M", "250M", "500M"],
    ("cuda", True): ["10M", "25M", "50M", "100M", "150M", "200M"],   # fp16: 20-400 MB
    ("cuda", False): ["50M", "125M", "350M", "760M", "1.3B", "2.7B"],
}
# Largest model timed for inference by default, and how many sizes at most.
INFER_CAP = {("cpu", True): (30e6, 2), ("cpu", False): (120e6, 3),
             ("cuda", True): (200e6, 3), ("cuda", False): (3e9, 6)}
SECTIONS = ("runtime", "loads", "inference", "steps")


@dataclass
class Config:
    out: str
    device: str = "cpu"
    quick: bool = False
    sizes: list | None = None
    infer_sizes: list | None = None
    families: list = field(default_factory=lambda: list(models.FAMILIES))
    load_family: str | None = None
    workdir: str | None = None
    keep: bool = False
    dtype: str | None = None
    concurrency: list | None = None
    runtime_repeats: int | None = None
    sections: list = field(default_factory=lambda: list(SECTIONS))
    resume: bool = True
    # intra-op threads while timing loads: deserialisation is single-threaded
    # in practice, and one thread keeps the loads robust to a busy neighbour
    # (OpenMP threads spinning for a descheduled sibling). 0 = torch default.
    load_threads: int = 1
    # run-wide time allowed for waiting out other processes' CPU bursts
    # (None: 40 s quick, 600 s full; 0: never wait nor re-measure, only flag)
    wait_budget_s: float | None = None
    note: str | None = None         # free text stored as metadata.note
    # sizes of the llama-like decoder whose step time is timed (None: steps.SIZES)
    step_sizes: list | None = None

    def resolve(self) -> "Config":
        models.check_device(self.device)
        kind = "cuda" if self.device.startswith("cuda") else "cpu"
        for f in self.families:
            if f not in models.FAMILIES:
                raise ValueError(f"unknown family {f!r}: expected one of {models.FAMILIES}")
        for s in self.sections:
            if s not in SECTIONS:
                raise ValueError(f"unknown section {s!r}: expected one of {SECTIONS}")
        if self.dtype is None:
            self.dtype = "float16" if kind == "cuda" else "float32"
        if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.sizes is None:
            self.sizes = list(DEFAULT_SIZES[(kind, self.quick)])
        self.sizes = sorted(self.sizes, key=models.parse_size)
        if self.infer_sizes is None:
            cap, most = INFER_CAP[(kind, self.quick)]
            ok = [s for s in self.sizes if models.parse_size(s) <= cap] or self.sizes[:1]
            if len(ok) > most:   # spread over the range, smallest and largest included
                idx = sorted({round(i * (len(ok) - 1) / max(1, most - 1)) for i in range(most)})
                ok = [ok[i] for i in idx]
            self.infer_sizes = ok
        if self.step_sizes is None:
            self.step_sizes = list(stepmod.SIZES[(kind, self.quick)])
        self.step_sizes = sorted(self.step_sizes, key=models.parse_size)
        for s in list(self.sizes) + list(self.infer_sizes) + list(self.step_sizes):
            models.parse_size(s)
        if self.concurrency is None:
            self.concurrency = [1, 2] if self.quick else [1, 2, 4]
        if 1 not in self.concurrency:
            self.concurrency = [1] + list(self.concurrency)
        if self.runtime_repeats is None:
            self.runtime_repeats = 3 if self.quick else 5
        if self.load_family is None:
            self.load_family = self.families[0] if self.families else "encoder"
        return self

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)


def partial_path(out: str) -> str:
    out = os.fspath(out)
    return (out[:-5] if out.endswith(".json") else out) + ".partial.json"


def _steps(cfg: Config) -> list:
    steps = []
    if "runtime" in cfg.sections:
        steps.append("runtime")
    if "loads" in cfg.sections:
        # interleave sizes (largest, smallest, ...) so that a drift in the
        # machine's load does not masquerade as a size effect
        s = list(cfg.sizes)
        order = []
        while s:
            order.append(s.pop())
            if s:
                order.append(s.pop(0))
        steps += [f"loads:{x}" for x in order]
    if "inference" in cfg.sections:
        steps += [f"inference:{f}:{x}" for f in cfg.families for x in cfg.infer_sizes]
    if "steps" in cfg.sections:
        steps += [f"steps:{x}" for x in cfg.step_sizes]
    return steps


def _identity(cfg: Config, host: str) -> dict:
    return {"host": host, "device": cfg.device, "dtype": cfg.dtype, "quick": cfg.quick,
            "load_family": cfg.load_family}


def _new_state(cfg: Config, workdir: str) -> dict:
    md = env.collect(cfg.device, workdir)
    return {"schema": PARTIAL_SCHEMA, "identity": _identity(cfg, md["host"]),
            "config": asdict(cfg), "metadata": md, "done": [], "errors": [],
            "samples": {"runtime": None, "load": {}, "page_cache": {}, "inference": {},
                        "models": {}, "step": {}}}


def _load_state(cfg: Config, log) -> dict | None:
    p = partial_path(cfg.out)
    if not (cfg.resume and os.path.exists(p)):
        return None
    try:
        with open(p) as f:
            st = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log(f"resume: ignoring unreadable {p} ({e})")
        return None
    import socket
    if st.get("schema") != PARTIAL_SCHEMA or st.get("identity") != _identity(
            cfg, socket.gethostname()):
        log(f"resume: {p} was made by a different run (host/device/dtype/mode); starting afresh")
        return None
    return st


def run(cfg: Config, log=harness.progress) -> dict:
    """Run the calibration job and write cfg.out; returns the profile."""
    cfg.resolve()
    t_start = time.perf_counter()
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    os.makedirs(out_dir, exist_ok=True)
    created_dir = None
    if cfg.workdir:
        workdir = cfg.workdir
        os.makedirs(workdir, exist_ok=True)
    else:
        # next to the output (a real disk, usually), not /tmp (often tmpfs)
        workdir = created_dir = tempfile.mkdtemp(prefix=".capsim-calib-", dir=out_dir)
    tracked = []
    state = _load_state(cfg, log)
    if state is not None:
        log(f"resume: {len(state['done'])} step(s) already done in {partial_path(cfg.out)}")
        state["metadata"].setdefault("resumed", []).append(
            env.collect(cfg.device, workdir)["date"])
        state["config"] = asdict(cfg)
        if state.get("contention_current"):   # the interrupted invocation's share
            state.setdefault("contention", []).append(state.pop("contention_current"))
    else:
        state = _new_state(cfg, workdir)
    steps = _steps(cfg)
    n = len(steps)
    hw = None
    if cfg.device.startswith("cuda"):
        pc = state["metadata"].get("pcie")
        hw = pc.get("limit_gbs") if pc else None
    policy = harness.Policy.quick() if cfg.quick else harness.Policy.full()
    wait = cfg.wait_budget_s if cfg.wait_budget_s is not None else DEFAULT_WAIT_S[cfg.quick]
    harness.CONTENTION.reset(wait)
    policy = policy.scaled(max_wait_s=max(policy.max_wait_s, wait / 10))
    plan = inf.QUICK if cfg.quick else inf.FULL
    # Every repeat's untimed set-up collects garbage (loads._fresh): a full collection also walked
    # the objects torch and numpy made at import, which are never garbage (0.15 s a collection on a
    # 2-core CPU, a tenth of the quick job). Frozen until the job ends, they are left out of every
    # collection; the job's own objects are collected as before.
    gc.collect()
    gc.freeze()
    try:
        for i, step in enumerate(steps, 1):
            def log_step(msg, _i=i):
                log(f"[{_i}/{n}] {msg}")
            if step in state["done"]:
                log_step(f"{step}: done earlier, skipped")
                continue
            t0 = time.perf_counter()
            try:
                _run_step(step, cfg, state, workdir, tracked, policy, plan, hw, log_step)
            except Exception as e:  # noqa: BLE001 - recorded, the job goes on
                kind = "oom" if loads.is_oom(e) else "error"
                state["errors"].append({"step": step, "kind": kind, "type": type(e).__name__,
                                        "message": str(e)[:500],
                                        "traceback": traceback.format_exc(limit=4)[-1500:]})
                log_step(f"{step}: FAILED ({kind}) {type(e).__name__}: {str(e)[:200]}")
                gc.collect()
                if cfg.device.startswith("cuda") and torch.cuda.is_available():
                    torch.cuda.empty_cache()
            state["done"].append(step)
            state.setdefault("step_s", {})[step] = time.perf_counter() - t0
            state["contention_current"] = harness.CONTENTION.to_dict()
            prof.write_json_atomic(state, partial_path(cfg.out))
        _retry_contended(cfg, state, steps, workdir, tracked, policy, plan, hw, log, t_start)
        state.pop("contention_current", None)
        state.setdefault("contention", []).append(harness.CONTENTION.to_dict())
        profile = build_profile(state, cfg)
        profile["metadata"]["wall_s"] = time.perf_counter() - t_start  # this invocation
        prof.save(profile, cfg.out)
        try:
            os.unlink(partial_path(cfg.out))
        except OSError:
            pass
        log(f"wrote {cfg.out} in {time.perf_counter() - t_start:.1f} s"
            + (f" with {len(state['errors'])} error(s)" if state["errors"] else ""))
        return profile
    finally:
        gc.unfreeze()
        if cfg.keep:
            log(f"kept the model files in {workdir}")
        else:
            for p in tracked:
                try:
                    os.unlink(p)
                except OSError:
                    pass
            if created_dir:
                shutil.rmtree(created_dir, ignore_errors=True)


RETRY_FRACTION = 0.3          # re-measure a step if more of its samples were contended
RETRY_DEADLINE_S = {True: 170.0, False: 4 * 3600.0}   # ... and if the run is younger
DEFAULT_WAIT_S = {True: 40.0, False: 600.0}             # than this (+ any extra wait budget)


def _step_entries(state: dict, step: str) -> list:
    """(container, key) pairs of the samples a step wrote."""
    S = state["samples"]
    if step == "runtime":
        return [(S, "runtime")]
    kind, *rest = step.split(":")
    if kind == "loads":
        return [(S["load"][p], rest[0]) for p in S["load"] if rest[0] in S["load"][p]] + (
            [(S["page_cache"], rest[0])] if rest[0] in S["page_cache"] else [])
    if kind == "steps":
        by = S.setdefault("step", {})
        return [(by, rest[0])] if rest[0] in by else []
    fam, label = rest
    by = S["inference"].get(fam, {})
    return [(by, label)] if label in by else []


def contended_fraction(state: dict, step: str) -> float:
    flags = []

    def walk(o):
        if isinstance(o, dict):
            if "samples" in o and "contended" in o and isinstance(o["contended"], list):
                flags.extend(i in set(o["contended"]) for i in range(len(o["samples"])))
                return
            if isinstance(o.get("contended"), bool):
                flags.append(o["contended"])
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    for cont, key in _step_entries(state, step):
        walk(cont.get(key))
    return sum(flags) / len(flags) if flags else 0.0


def _retry_contended(cfg, state, steps, workdir, tracked, policy, plan, hw, log, t_start):
    """Steps measured while other processes were busy get one more chance at
    the end of the run (if time allows); the less contended version is kept."""
    if cfg.wait_budget_s == 0:      # "only flag": no waiting, no second chance
        return
    failed = {":".join(e["step"].split(":")[:2]) if e["step"].startswith("loads:") else e["step"]
              for e in state["errors"]}
    for step in steps:
        frac = contended_fraction(state, step)
        if frac <= RETRY_FRACTION or step in failed or step in state.get("retried", []):
            continue
        elapsed = time.perf_counter() - t_start
        deadline = RETRY_DEADLINE_S[cfg.quick] + max(
            0.0, harness.CONTENTION.wait_budget_s - DEFAULT_WAIT_S[cfg.quick])
        if elapsed + state.get("step_s", {}).get(step, 0.0) > deadline:
            log(f"[retry] {step}: {frac:.0%} of samples contended; no time left to retry")
            continue
        old = [(c, k, copy.deepcopy(c[k])) for c, k in _step_entries(state, step)]
        log(f"[retry] {step}: {frac:.0%} of samples contended; measuring again")
        try:
            _run_step(step, cfg, state, workdir, tracked, policy, plan, hw,
                      lambda m, _s=step: log(f"[retry] {m}"))
            new = contended_fraction(state, step)
        except Exception as e:  # noqa: BLE001 - keep the first measurement
            log(f"[retry] {step}: failed ({type(e).__name__}: {e}); keeping the first")
            new = 2.0
        if new >= frac:
            for c, k, v in old:
                c[k] = v
        state.setdefault("retried", []).append(step)
        log(f"[retry] {step}: contended {frac:.0%} -> {new if new <= 1 else float('nan'):.0%},"
            f" kept the {'new' if new < frac else 'first'} measurement")
        prof.write_json_atomic(state, partial_path(cfg.out))


def _run_step(step, cfg, state, workdir, tracked, policy, plan, hw, log):
    S = state["samples"]
    if step == "runtime":
        S["runtime"] = runtime.measure(cfg.device, cfg.runtime_repeats, log=log)
        return
    kind, *rest = step.split(":")
    if kind == "loads":
        label = rest[0]
        shape = models.shape_for(cfg.load_family, models.parse_size(label))
        S["models"][f"{cfg.load_family}:{label}"] = shape
        t0 = time.perf_counter()
        stem = f"{cfg.load_family}-{label}"
        files = loads.generate_files(shape, workdir, stem, cfg.torch_dtype)
        tracked.extend(files.values())
        log(f"loads: generated {stem} ({shape['params'] / 1e6:.1f}M params, "
            f"{harness.fmt_bytes(os.path.getsize(files['torch']))}) in "
            f"{time.perf_counter() - t0:.2f} s")
        threads = torch.get_num_threads()
        if cfg.load_threads:
            torch.set_num_threads(cfg.load_threads)
        try:
            res, page, errs = loads.measure_size(shape, files, cfg.device, policy, log,
                                                 hw_limit_gbs=hw)
        finally:
            torch.set_num_threads(threads)
            if not cfg.keep:
                for p in files.values():
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        for path, d in res.items():
            S["load"].setdefault(path, {})[label] = d
        if page:
            S["page_cache"][label] = page
        for e in errs:
            state["errors"].append({"step": f"{step}:{e['path']}", **{
                k: v for k, v in e.items() if k != "path"}})
        return
    if kind == "inference":
        fam, label = rest
        S["inference"].setdefault(fam, {})[label] = inf.measure_model(
            fam, label, cfg.device, cfg.torch_dtype, plan, policy, log, cfg.concurrency)
        return
    if kind == "steps":
        label = rest[0]
        S.setdefault("step", {})[label] = stepmod.measure_size(
            label, cfg.device, cfg.torch_dtype, stepmod.grid_for(cfg.device, cfg.quick), policy, log)
        return
    raise ValueError(f"unknown step {step!r}")


def build_profile(state: dict, cfg: Config | None = None) -> dict:
    S = state["samples"]
    md = dict(state["metadata"])
    md["loadavg_end"] = env.loadavg()
    if cfg is not None and cfg.note:
        md["note"] = cfg.note
    if state.get("contention"):
        cs = state["contention"]
        tot = sum(c["samples"] for c in cs)
        md["contention"] = {
            "samples": tot, "contended": sum(c["contended"] for c in cs),
            "contended_fraction": (sum(c["contended"] for c in cs) / tot) if tot else 0.0,
            "waited_s": sum(c["waited_s"] for c in cs),
            "note": "samples during which other processes used >30% of a core are "
                    "excluded from medians and fits (kept in samples[].contended)"}
    fits = {"load": {}, "runtime": None, "inference": {}, "step": {}}
    diag = {"load": {}, "inference": {}, "step": {}, "notes": []}
    # loads
    for path in prof.LOAD_PATHS:
        by_size = S["load"].get(path) or {}
        xs, ys = [], []
        for label, d in by_size.items():
            c = harness.clean_samples(d)
            xs += [d["size_gb"]] * len(c)
            ys += c
        if len({round(x, 9) for x in xs}) < 2:
            if by_size:
                diag["notes"].append(f"load path {path}: fewer than 2 sizes, no fit")
            continue
        f = fitmod.fit_load(xs, ys)
        hwl = next((d.get("hw_limit_gbs") for d in by_size.values()
                    if d.get("hw_limit_gbs")), None)
        fits["load"][path] = {"a_s": f["a_s"], "bandwidth_gbs": f["bandwidth_gbs"],
                              "r2": f["r2"], "n": f["n"], "hw_limit_gbs": hwl}
        diag["load"][path] = {k: f[k] for k in ("r2_samples", "groups", "rel_resid_mad",
                                                  "success")}
        if hwl:
            diag["load"][path]["fraction_of_hw_limit"] = f["bandwidth_gbs"] / hwl
    # page cache
    checks = [c for c in S.get("page_cache", {}).values() if "cold_first_s" in c]
    if checks:
        fs = (md.get("filesystem") or {}).get("fstype")
        verdict = loads.page_cache_verdict(checks, fs)
        md["page_cache_eviction"] = verdict["page_cache_eviction"]
        diag["page_cache"] = verdict
        firsts = [(c["bytes"] / 1e9, c["cold_first_s"]) for c in checks]
        if len(firsts) >= 2:
            f = fitmod.fit_load([a for a, _ in firsts], [b for _, b in firsts])
            diag["page_cache"]["first_cold_read_fit"] = {
                "a_s": f["a_s"], "bandwidth_gbs": f["bandwidth_gbs"], "r2": f["r2"],
                "n": f["n"]}
    else:
        md.setdefault("page_cache_eviction", None)
    # runtime
    if S.get("runtime") and S["runtime"].get("runs"):
        fits["runtime"] = runtime.fit(S["runtime"])
    # inference
    for fam, by in S.get("inference", {}).items():
        for label, s in by.items():
            try:
                f, d = inf.fit_model(fam, label, s)
            except (ValueError, KeyError) as e:
                diag["notes"].append(f"inference {fam}/{label}: no fit ({e})")
                continue
            fits["inference"].setdefault(fam, {})[label] = f
            diag["inference"].setdefault(fam, {})[label] = d
    # step time of the llama-like decoder, per size
    for label, s in (S.get("step") or {}).items():
        try:
            f, d = stepmod.fit_size(s)
        except (ValueError, KeyError, TypeError) as e:
            diag["notes"].append(f"steps {label}: no fit ({e})")
            continue
        fits["step"][label] = f
        diag["step"][label] = d
    return {"schema": prof.SCHEMA, "metadata": md, "config": state.get("config"),
            "samples": S, "fits": fits, "diagnostics": diag,
            "errors": list(state.get("errors", [])),
            "steps": {"done": list(state.get("done", [])), "step_s": state.get("step_s", {})}}


__all__ = ["Config", "run", "build_profile", "partial_path"]
