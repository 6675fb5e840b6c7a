"""Load paths, each timed separately at one file size (see profile.py for the
list and meaning of each path).

Cold reads: before each repeat the file is fsync'd and dropped from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED). Whether that worked is checked
two ways: mincore(2) (via ctypes) on the file right after the eviction (the
fraction of pages still resident), and the time of a cold read against a warm
one. If pages stay resident, or a "cold" read is barely slower than a warm
one, the page cache eviction is flagged "ineffective". If the first cold read
is much slower than the later ones, a cache below the page cache (a
hypervisor or a disk controller) is suspected: `device_cache_suspected`. The
first cold read of each file is a warm-up (not in the fit); the fit over the
first reads alone is reported in diagnostics.page_cache.first_cold_read_fit.

Host memory: every repeat starts with gc + malloc_trim, and allocations of
256 KiB and more get fresh mmap'd pages (fresh_host_memory), so each load pays
the page faults a new serving process would pay.
"""
from __future__ import annotations

import ctypes
import gc
import mmap
import os

import numpy as np
import torch

from . import harness, models

try:  # optional
    import safetensors.torch as st
except ImportError:  # pragma: no cover - exercised only without safetensors
    st = None

CPU_PATHS = ("disk_to_host", "safetensors_to_host", "torch_load", "torch_load_mmap",
             "build_module")
CUDA_PATHS = ("host_to_gpu_pageable", "host_to_gpu_pinned", "safetensors_to_gpu")
ST_PATHS = ("safetensors_to_host", "safetensors_to_gpu")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def fresh_host_memory(on: bool = True) -> int | None:
    """glibc only: serve allocations >= 256 KiB with fresh mmap'd pages
    (on=True), so that every repeat of a load pays the page faults a new
    serving process would pay, instead of reusing the heap freed by the
    previous repeat -- which glibc's dynamic mmap threshold does for tensors
    under 32 MiB but not above, making the time per byte depend on the
    tensor sizes. on=False sets the threshold to 32 MiB (glibc's dynamic
    maximum) for the rest of the run. Returns the threshold set, or None."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    thr = 256 * 1024 if on else 32 * 1024 * 1024
    if mallopt(M_MMAP_THRESHOLD, thr) != 1:
        return None
    mallopt(M_TRIM_THRESHOLD, thr * 2 if on else 64 * 1024 * 1024)
    trim()
    return thr


def trim() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so that the
    next allocation faults in fresh pages rather than reusing warm ones."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    oom_cls = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(e, oom_cls):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def evict(path: str) -> bool:
    """fsync and drop the file from the page cache. False if unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_libc = None


def resident_fraction(path: str) -> float | None:
    """Fraction of the file's pages in the page cache (mincore), or None."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t,
                                      ctypes.POINTER(ctypes.c_ubyte))
        size = os.path.getsize(path)
        if size == 0:
            return None
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
            try:
                arr = np.frombuffer(mm, dtype=np.uint8)
                npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vec = (ctypes.c_ubyte * npages)()
                rc = _libc.mincore(ctypes.c_void_p(arr.ctypes.data), size, vec)
                del arr
                if rc != 0:
                    return None
                v = np.frombuffer(vec, dtype=np.uint8)
                return float(np.count_nonzero(v & 1)) / npages
            finally:
                mm.close()
    except (OSError, AttributeError, ValueError, BufferError):
        return None


def _fresh():
    """Untimed set-up of each repeat: collect garbage, return freed memory."""
    gc.collect()
    trim()
    return True


def read_file(path: str) -> np.ndarray:
    """Read a whole file into a fresh host buffer."""
    n = os.path.getsize(path)
    buf = np.empty(n, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        mv = memoryview(buf)
        got = 0
        while got < n:
            k = f.readinto(mv[got:])
            if not k:
                break
            got += k
    return buf


def _nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for t in sd.values())


def measure_size(shape: dict, files: dict, device: str, policy: harness.Policy, log,
                 paths=None, hw_limit_gbs=None) -> tuple[dict, dict, list]:
    """Time every load path for one model's files.
    Returns (samples_by_path, page_cache_check, errors)."""
    on_cuda = device.startswith("cuda")
    want = list(paths or (CPU_PATHS + (CUDA_PATHS if on_cuda else ())))
    if not on_cuda:
        want = [p for p in want if p not in CUDA_PATHS]
    if st is None or "safetensors" not in files:
        want = [p for p in want if p not in ST_PATHS]
    st_file = files.get("safetensors")
    pt_file = files["torch"]
    raw_file = st_file or pt_file
    out, errors, page = {}, [], {}

    def load_host_sd():
        """A state dict in ordinary (anonymous) host memory."""
        if st is not None and st_file:
            return {k: v.clone() for k, v in st.load_file(st_file, device="cpu").items()}
        return torch.load(pt_file, weights_only=True, map_location="cpu")

    def record(path, m: harness.Measurement, nbytes: int, extra=None):
        d = m.to_dict()
        d["bytes"] = int(nbytes)
        d["size_gb"] = nbytes / 1e9
        if extra:
            d.update(extra)
        out[path] = d
        log(f"loads: {path} {harness.fmt_bytes(nbytes)} ... {d['median']:.3f} s "
            f"(n={d['n']}, rel MAD {d['rel_mad'] or 0:.1%})")

    thr = fresh_host_memory(True)
    page["malloc_mmap_threshold"] = thr
    for path in want:
        try:
            if path == "disk_to_host":
                nbytes = os.path.getsize(raw_file)
                evict_ok = evict(raw_file)
                res_after = resident_fraction(raw_file)
                # the warm-up is the first read of a freshly written file: on a
                # VM it can be much slower than later cold reads (a cache below
                # the page cache); it is kept as cold_first_s, not in the fit
                m = harness.measure(lambda _: read_file(raw_file),
                                    policy.scaled(warmup=1, min_reps=max(3, policy.min_reps)),
                                    setup=lambda: _fresh() and evict(raw_file))
                warm = harness.measure(lambda _: read_file(raw_file), policy.scaled(warmup=1),
                                       setup=_fresh)
                clean = m.clean
                page.update({"evict_call_ok": evict_ok, "resident_after_evict": res_after,
                             "cold_median_s": float(np.median(clean)),
                             "cold_first_s": m.warmup[0],
                             "warm_median_s": float(np.median(warm.clean)),
                             "warm_samples": warm.samples, "bytes": nbytes})
                record(path, m, nbytes)
            elif path == "safetensors_to_host":
                nbytes = os.path.getsize(st_file)
                # The file's bytes deserialised into anonymous host memory, as a
                # server that reads its artifact does. load_file is mmap-backed
                # and lazy: on a warm page cache its cost hardly depends on the
                # size (the mmap path is torch_load_mmap's to show).
                def st_load():
                    with open(st_file, "rb") as f:
                        return st.load(f.read())
                m = harness.measure(lambda _: st_load(), policy, setup=_fresh)
                record(path, m, nbytes)
            elif path == "torch_load":
                nbytes = os.path.getsize(pt_file)
                m = harness.measure(
                    lambda _: torch.load(pt_file, weights_only=True, map_location="cpu"), policy,
                    setup=_fresh)
                record(path, m, nbytes)
            elif path == "torch_load_mmap":
                nbytes = os.path.getsize(pt_file)

                # The mapped tensors copied out into anonymous memory, as building a
                # module from them does: faulting in one byte per page of a warm page
                # cache costs next to nothing per byte, and the fit was noise.
                def mm_load():
                    sd = torch.load(pt_file, mmap=True, weights_only=True, map_location="cpu")
                    return {k: v.clone() for k, v in sd.items()}
                m = harness.measure(lambda _: mm_load(), policy, setup=_fresh)
                record(path, m, nbytes)
            elif path == "build_module":
                sd = load_host_sd()
                nbytes = _nbytes(sd)
                parts = {"construct_s": [], "load_state_dict_s": []}

                def build():
                    import time
                    t0 = time.perf_counter()
                    mod = models.build(shape, device="cpu", dtype=next(iter(sd.values())).dtype)
                    t1 = time.perf_counter()
                    mod.load_state_dict(sd)
                    parts["construct_s"].append(t1 - t0)
                    parts["load_state_dict_s"].append(time.perf_counter() - t1)
                    return mod
                m = harness.measure(lambda _: build(), policy, setup=_fresh)
                record(path, m, nbytes, parts)
                del sd
            elif path in ("host_to_gpu_pageable", "host_to_gpu_pinned"):
                sd = load_host_sd()
                nbytes = _nbytes(sd)
                pinned = path.endswith("pinned")
                if pinned:
                    sd = {k: v.pin_memory() for k, v in sd.items()}
                m = harness.measure(
                    lambda: {k: v.to(device, non_blocking=pinned) for k, v in sd.items()},
                    policy, timer="cuda", device=device)
                record(path, m, nbytes, {"hw_limit_gbs": hw_limit_gbs})
                del sd
            elif path == "safetensors_to_gpu":
                nbytes = os.path.getsize(st_file)
                m = harness.measure(lambda: st.load_file(st_file, device=device), policy,
                                    device=device)
                record(path, m, nbytes, {"hw_limit_gbs": hw_limit_gbs})
        except Exception as e:  # noqa: BLE001 - recorded, the job goes on
            errors.append({"path": path, "kind": "oom" if is_oom(e) else "error",
                           "type": type(e).__name__, "message": str(e)[:500]})
            log(f"loads: {path} FAILED: {type(e).__name__}: {str(e)[:200]}")
        finally:
            gc.collect()
            if on_cuda and torch.cuda.is_available():
                torch.cuda.empty_cache()
    fresh_host_memory(False)
    return out, page, errors


def page_cache_verdict(checks: list, fstype: str | None) -> dict:
    """Summarise the per-size page-cache checks into one verdict."""
    if fstype in ("tmpfs", "ramfs"):
        return {"page_cache_eviction": "unavailable", "reason": f"work dir on {fstype}",
                "device_cache_suspected": None}
    checks = [c for c in checks if c and "cold_median_s" in c]
    if not checks:
        return {"page_cache_eviction": "unavailable", "reason": "no checks",
                "device_cache_suspected": None}
    if not all(c.get("evict_call_ok") for c in checks):
        return {"page_cache_eviction": "unavailable", "reason": "posix_fadvise failed",
                "device_cache_suspected": None}
    res = [c["resident_after_evict"] for c in checks if c.get("resident_after_evict") is not None]
    ratios = [c["cold_median_s"] / c["warm_median_s"] for c in checks if c["warm_median_s"] > 0]
    firsts = [c["cold_first_s"] / c["cold_median_s"] for c in checks if c["cold_median_s"] > 0]
    verdict, reason = "effective", None
    if res and max(res) > 0.5:
        verdict, reason = "ineffective", "pages still resident after POSIX_FADV_DONTNEED (mincore)"
    elif ratios and float(np.median(ratios)) < 1.2:
        verdict, reason = "ineffective", "cold reads barely slower than warm reads"
    dev_cache = bool(firsts) and (float(np.median(firsts)) > 2.0 or max(firsts) > 3.0)
    return {"page_cache_eviction": verdict, "reason": reason,
            "resident_after_evict_max": max(res) if res else None,
            "cold_over_warm_median": float(np.median(ratios)) if ratios else None,
            "first_over_median_cold": float(np.median(firsts)) if firsts else None,
            "device_cache_suspected": dev_cache}


def generate_files(shape: dict, workdir: str, stem: str, dtype, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    m = models.build(shape, device="cpu", dtype=dtype)
    try:
        return models.save(m, workdir, stem, safetensors_ok=st is not None)
    finally:
        del m
        gc.collect()
