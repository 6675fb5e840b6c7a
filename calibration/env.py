"""Environment metadata: device, driver, CUDA and torch versions, CPU model,
host, date, clocks, memory, load average. Everything read where it can be,
None where it cannot (never guessed)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import socket
import subprocess
import sys

# Per-lane PCIe throughput in GB/s after line encoding (gen1/2: 8b/10b,
# gen3-5: 128b/130b, gen6: FLIT/PAM4 ~ 7.56).
PCIE_LANE_GBS = {1: 0.25, 2: 0.5, 3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def gpu_ident(index: int = 0) -> str:
    """How nvidia-smi should name torch's cuda device `index`: its PCI bus id
    when torch exposes it (robust to CUDA_VISIBLE_DEVICES), else the index
    mapped through CUDA_VISIBLE_DEVICES, else the index."""
    try:
        import torch
        p = torch.cuda.get_device_properties(index)
        dom, bus, dev = (getattr(p, a, None) for a in ("pci_domain_id", "pci_bus_id",
                                                       "pci_device_id"))
        if None not in (dom, bus, dev):
            return f"{dom:08X}:{bus:02X}:{dev:02X}.0"
    except Exception:  # noqa: BLE001 - best effort
        pass
    vis = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(vis):
        return vis[index]
    return str(index)


def nvidia_smi(query: str, index: int | str = 0, timeout: float = 10.0) -> list | None:
    """`nvidia-smi --query-gpu=<query> --format=csv,noheader,nounits` for one GPU
    (an index or a PCI bus id); returns the fields as strings, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits",
                              f"--id={index}"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return [f.strip() for f in out.stdout.strip().splitlines()[0].split(",")]


def nvidia_smi_apps(timeout: float = 10.0) -> dict | None:
    """{pid: used_memory_MiB} of compute processes, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    apps = {}
    for line in out.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2:
            try:
                apps[int(parts[0])] = float(parts[1])
            except ValueError:
                pass
    return apps


def _num(s):
    try:
        return float(s)
    except (TypeError, ValueError):
        return None


def cpu_model() -> str | None:
    txt = _read("/proc/cpuinfo") or ""
    for line in txt.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or None


def cpu_clocks_mhz() -> dict | None:
    base = "/sys/devices/system/cpu/cpu0/cpufreq"
    out = {}
    for name in ("scaling_cur_freq", "scaling_max_freq", "cpuinfo_max_freq"):
        v = _num((_read(os.path.join(base, name)) or "").strip())
        if v is not None:
            out[name] = v / 1e3
    if not out:
        txt = _read("/proc/cpuinfo") or ""
        for line in txt.splitlines():
            if line.lower().startswith("cpu mhz"):
                out["cpuinfo_cur_mhz"] = _num(line.split(":", 1)[1])
                break
    return out or None


def mem_total_gb() -> float | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return None


def loadavg() -> list | None:
    txt = _read("/proc/loadavg")
    return [float(v) for v in txt.split()[:3]] if txt else None


def filesystem_of(path: str) -> dict | None:
    path = os.path.realpath(path)
    best = None
    for line in (_read("/proc/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) >= 3 and (path == parts[1] or path.startswith(parts[1].rstrip("/") + "/")):
            if best is None or len(parts[1]) > len(best["mount"]):
                best = {"device": parts[0], "mount": parts[1], "fstype": parts[2]}
    return best


def rss_gb(pid: str | int = "self") -> float | None:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return None


def pcie_info(index: int | str = 0) -> dict | None:
    """PCIe generation/width (max and current) and the one-direction limit in
    GB/s implied by the max link, from nvidia-smi; None if unreadable."""
    f = nvidia_smi("pcie.link.gen.max,pcie.link.width.max,pcie.link.gen.current,"
                   "pcie.link.width.current", index)
    if not f:
        return None
    gen, width, gcur, wcur = (_num(v) for v in f)
    limit = None
    if gen and width and int(gen) in PCIE_LANE_GBS:
        limit = PCIE_LANE_GBS[int(gen)] * width
    return {"gen_max": gen, "width_max": width, "gen_current": gcur, "width_current": wcur,
            "limit_gbs": limit}


def collect(device: str, workdir: str | None = None) -> dict:
    import numpy
    import scipy
    import torch
    try:
        import safetensors
        st_version = safetensors.__version__
    except ImportError:
        st_version = None
    meta = {
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": None,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "safetensors": st_version,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "host_memory_gb": mem_total_gb(),
        "cpu_clocks_mhz": cpu_clocks_mhz(),
        "loadavg_start": loadavg(),
        "filesystem": filesystem_of(workdir) if workdir else None,
        "cuda_version": None, "driver": None, "gpu_memory_gb": None, "gpu_clocks_mhz": None,
        "pcie": None, "cudnn": None,
    }
    if device.startswith("cuda"):
        idx = torch.cuda.current_device() if torch.cuda.is_available() else 0
        ident = gpu_ident(idx) if torch.cuda.is_available() else "0"
        meta["nvidia_smi_id"] = ident
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(idx)
            meta["device_name"] = p.name
            meta["gpu_memory_gb"] = p.total_memory / 1e9
            meta["compute_capability"] = f"{p.major}.{p.minor}"
        meta["cuda_version"] = torch.version.cuda
        try:
            meta["cudnn"] = torch.backends.cudnn.version()
        except Exception:  # noqa: BLE001 - optional
            pass
        f = nvidia_smi("driver_version,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,"
                       "power.limit,temperature.gpu", ident)
        if f:
            meta["driver"] = f[0]
            meta["gpu_clocks_mhz"] = {"sm": _num(f[1]), "mem": _num(f[2]),
                                      "max_sm": _num(f[3]), "max_mem": _num(f[4])}
            meta["gpu_power_limit_w"] = _num(f[5])
            meta["gpu_temperature_c"] = _num(f[6])
        meta["pcie"] = pcie_info(ident)
    else:
        meta["device_name"] = meta["cpu_model"]
    return meta
