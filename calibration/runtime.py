"""Runtime cost: what a fresh Python backend pays to bring torch up.

Each repeat spawns a FRESH interpreter that times `import torch` and the
runtime initialisation with a first op (cuda: `torch.cuda.init();
torch.zeros(1, device="cuda")`; cpu: `torch.zeros(1) + 1`), and reads its own
VmRSS (/proc/self/status) before and after. The child then waits on stdin so
that the parent can read the child's GPU memory from nvidia-smi
(--query-compute-apps, the per-process figure, i.e. the CUDA context), or,
without nvidia-smi, from torch.cuda.mem_get_info deltas. This is the
Forethought effect (each Python backend's CUDA context costs host memory),
measured rather than assumed.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

from . import env, harness

CHILD = r"""
import json, os, sys, time
def _rss():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
dev = sys.argv[1]
t0 = time.perf_counter(); r0 = _rss()
import torch
t1 = time.perf_counter(); r1 = _rss()
info = {}
if dev.startswith("cuda"):
    torch.cuda.init()
    x = torch.zeros(1, device=dev)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info(x.device)
    info = {"mem_free": free, "mem_total": total}
else:
    x = torch.zeros(1) + 1
    float(x)
t2 = time.perf_counter(); r2 = _rss()
print(json.dumps({"pid": os.getpid(), "import_s": t1 - t0, "first_op_s": t2 - t1,
                  "init_s": t2 - t0, "rss0": r0["VmRSS"], "rss_import": r1["VmRSS"],
                  "rss_init": r2["VmRSS"], "hwm_init": r2["VmHWM"], **info}), flush=True)
sys.stdin.readline()
"""

MIB = 1024 * 1024


def _parent_used_gpu_bytes(device: str):
    """Device memory in use (all processes) seen from the parent, or None."""
    try:
        import torch
        if device.startswith("cuda") and torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(torch.device(device))
            return total - free
    except Exception:  # noqa: BLE001 - best effort
        return None
    return None


def measure_once(device: str, timeout: float = 300.0) -> dict:
    before_used = None
    smi_before = None
    ident = "0"
    if device.startswith("cuda"):
        import torch
        dev = torch.device(device)
        ident = env.gpu_ident(dev.index if dev.index is not None else torch.cuda.current_device())
        f = env.nvidia_smi("memory.used", ident)
        smi_before = float(f[0]) * MIB if f else None
        before_used = _parent_used_gpu_bytes(device)
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", CHILD, device], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    try:
        line = p.stdout.readline()
        ready = time.perf_counter() - t0
        if not line:
            err = p.stderr.read()
            raise RuntimeError(f"runtime probe failed: {err.strip()[-2000:]}")
        r = json.loads(line)
        r["process_wall_s"] = ready
        if device.startswith("cuda"):
            gpu_bytes, how = None, None
            apps = env.nvidia_smi_apps()
            if apps and r["pid"] in apps:
                gpu_bytes, how = apps[r["pid"]] * MIB, "nvidia-smi per-process"
            else:
                f = env.nvidia_smi("memory.used", ident)
                if f and smi_before is not None:
                    gpu_bytes, how = float(f[0]) * MIB - smi_before, "nvidia-smi memory.used delta"
                elif before_used is not None and "mem_total" in r:
                    gpu_bytes = (r["mem_total"] - r["mem_free"]) - before_used
                    how = "mem_get_info delta"
            r["gpu_bytes"], r["gpu_method"] = gpu_bytes, how
        p.stdin.write("\n")
        p.stdin.flush()
        p.wait(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        for s in (p.stdin, p.stdout, p.stderr):
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
    r["host_bytes"] = r["rss_init"] - r["rss0"]
    return r


def _cpu_snap():
    return harness.METER.snap(), os.times().children_user


def _contended(a, b) -> bool:
    """Did OTHER processes (not us, not our child) use the CPU meanwhile?"""
    (sa, ca), (sb, cb) = a, b
    foreign, wall = harness.METER.foreign(sa, sb)
    foreign = max(0.0, foreign - (cb - ca))
    return foreign > max(3.0 / harness.METER.tck, 0.3 * wall)


def measure(device: str, repeats: int = 3, log=None, max_extra: int = 3) -> dict:
    """`repeats` fresh-process probes; a probe during which other processes
    used the CPU is flagged and (up to max_extra times) repeated after a
    back-off."""
    runs = []
    extra = 0
    while sum(not r["contended"] for r in runs) < repeats and len(runs) < repeats + max_extra:
        a = _cpu_snap()
        r = measure_once(device)
        r["contended"] = _contended(a, _cpu_snap())
        runs.append(r)
        if log:
            log(f"runtime {len(runs)}/{repeats}{' (contended)' if r['contended'] else ''}: "
                f"init {r['init_s']:.2f} s (import {r['import_s']:.2f} s), "
                f"host +{r['host_bytes'] / 1e9:.3f} GB"
                + (f", GPU {r['gpu_bytes'] / 1e9:.3f} GB" if r.get("gpu_bytes") else ""))
        if r["contended"]:
            if not harness.CONTENTION.backoff(extra) and len(runs) >= repeats:
                break
            extra += 1
    return {"device": device, "runs": runs}


def fit(samples: dict) -> dict:
    runs = [r for r in samples["runs"] if not r.get("contended")] or samples["runs"]
    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    gpu = [r["gpu_bytes"] for r in runs if r.get("gpu_bytes") is not None]
    return {"init_s": med("init_s"),
            "host_memory_gb": med("host_bytes") / 1e9,
            "gpu_memory_gb": (statistics.median(gpu) / 1e9) if gpu else None}
