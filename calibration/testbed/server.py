"""One serving instance of the testbed: a process that loads models on demand
from safetensors files into a memory budget, evicts idle ones least recently
used first, and runs real inference on each request.

Threads: the instance's ``instance_concurrency`` workers (a CPU-bound model
server's). A free worker first reads what the router's pipe holds, then takes
the job that has waited longest: a queued request of a loaded model with a
free concurrency slot, or the next pending load (file -> state dict -> module
-> warm-up pass; at most ``max_concurrent_loads`` at once), for which idle
models are evicted. No thread reads the pipe while a worker computes: a
reader thread would take the interpreter lock from it at every message, and a
request would cost more (about 7% here) the more requests arrive while it
runs, so that bursts drained faster than a calibration could tell. Requests
keep the router's send time, so reading them late changes neither their
order nor their latency. All state is under one lock; loads and inference
run outside it. The rules are the
simulator's for multi-model endpoints (sim/hosting/mme.py), so that the two
can be compared on the same plan.

Times are ``time.monotonic()`` (one clock for every process of the machine)
minus the replay's ``t0``.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque

import torch

from .. import models

try:
    import safetensors.torch as st
except ImportError:  # pragma: no cover - the testbed needs safetensors
    st = None


def model_file(m: dict, index: int, workdir: str, dtype=torch.float32) -> dict:
    """Write model ``m`` of a plan (random weights, seeded by its index) as
    safetensors under ``workdir``; return its path, shape and sizes."""
    shape = models.shape_for(m["family"], models.parse_size(m["params"]))
    path = os.path.join(workdir, f"{index:03d}-{m['name']}.safetensors")
    if not os.path.exists(path):
        torch.manual_seed(1000 + index)
        mod = models.build(shape, dtype=dtype)
        sd = {k: v.detach().contiguous() for k, v in mod.state_dict().items()}
        tmp = path + ".tmp"
        st.save_file(sd, tmp)
        os.replace(tmp, path)
    return {"path": path, "shape": shape, "file_gb": os.path.getsize(path) / 1e9,
            "param_gb": models.param_bytes(shape, dtype) / 1e9}


def load_module(path: str, shape: dict, device: str) -> torch.nn.Module:
    """The real load: safetensors file -> state dict -> module on ``device``."""
    sd = st.load_file(path, device="cpu")
    mod = models.build(shape, device="cpu", dtype=next(iter(sd.values())).dtype)
    mod.load_state_dict(sd)
    del sd
    return mod.to(device).eval()


def load_and_warm(f: dict, m: dict, index: int, device: str):
    """A whole cold start: load the module, then one warm-up pass (as model servers
    do), so that no request pays a first call's set-up. Returns (module, run)."""
    mod = load_module(f["path"], f["shape"], device)
    run = request_fn(mod, m, device, seed=index)
    run()
    return mod, run


def request_fn(mod: torch.nn.Module, m: dict, device: str, seed: int = 0):
    """One request of model ``m``: an encoder pass over ``seq_len`` tokens, or a
    decoder's prefill of ``seq_len`` and ``output_tokens`` decode steps."""
    ids = models.random_ids(1, int(m.get("seq_len", 64)), device=device, seed=seed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # inference_mode here, not once per process: grad mode is per thread, and
    # the workers are threads of their own
    if m["family"] == "encoder":
        def run():
            with torch.inference_mode():
                mod(ids)
            sync()
    else:
        out = int(m.get("output_tokens", 8))

        def run():
            with torch.inference_mode():
                mod.generate(ids, out)
            sync()
    return run


class _Slot:
    __slots__ = ("m", "loaded", "loaded_at", "busy", "queue", "waiting", "last_used", "queued", "module", "run")

    def __init__(self, m: int, now: float):
        self.m = m
        self.queued = now               # when its load was asked for
        self.loaded = False
        self.loaded_at = float("-inf")  # when its load ended
        self.busy = 0
        self.queue: deque = deque()     # (rid, arrived, cold, load_ms) waiting for a worker
        self.waiting: list = []         # (rid, arrived) waiting for the load
        self.last_used = now
        self.module = None
        self.run = None

    @property
    def idle(self) -> bool:
        return self.loaded and self.busy == 0 and not self.queue


class Server:
    def __init__(self, index: int, plan: dict, files: list, device: str, t0: float, conn):
        self.index = index
        self.plan = plan
        self.files = files
        self.device = device
        self.t0 = t0
        self.conn = conn
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self.lock = threading.Lock()
        self.slots: dict[int, _Slot] = {}
        self.pending: deque = deque()      # slots whose load waits for a worker and room
        self.used_gb = 0.0
        self.serving = 0
        self.loading = 0
        self.stopping = False
        self.cap = plan["instance_concurrency"]
        self.max_conc = plan["max_concurrency"]
        self.budget = plan["memory_budget_gb"]
        # With several workers, one idle worker spins on the pipe and the others wait here: idle
        # threads spinning together take the interpreter lock from the ones computing (a request
        # alone took 2-3 times its time with three spinning beside it here).
        self.idle = threading.Condition(self.lock)
        self.spinner = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def read(self) -> None:
        """Handle what the router's pipe holds, without waiting (one worker at a time)."""
        if not self._recv_lock.acquire(blocking=False):
            return
        try:
            while not self.stopping and self.conn.poll():
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):      # the router is gone
                    msg = ("stop",)
                if msg[0] == "req":
                    self.arrive(msg[1], msg[2], msg[3])
                elif msg[0] == "start":          # a replay begins: its clock's origin
                    self.t0 = msg[1]
                elif msg[0] == "reset":
                    self.reset()
                    self.send(("reset", self.index))
                elif msg[0] == "stop":
                    self.stop()
        finally:
            self._recv_lock.release()

    # -- requests -----------------------------------------------------------------
    def arrive(self, rid: int, m: int, sent: float) -> None:
        """Request ``rid`` of model ``m``, sent by the router at ``sent``."""
        with self.lock:
            now = sent
            slot = self.slots.get(m)
            if slot is None:
                slot = _Slot(m, now)
                self.slots[m] = slot
                self.pending.append(slot)
            slot.last_used = now
            if slot.loaded and slot.loaded_at > now:
                # sent while its model loaded, read once the worker was free: it waited for the load
                slot.queue.append((rid, now, True, (slot.loaded_at - now) * 1e3))
            elif slot.loaded:
                slot.queue.append((rid, now, False, 0.0))
            else:
                slot.waiting.append((rid, now))

    def _next_job(self):
        """Under the lock: the longest-waiting job a free worker may start, or None:
        ("req", slot, request) or ("load", slot) -- the simulator's rule (sim/hosting/mme.py)."""
        if self.serving >= self.cap:
            return None
        ready = [s for s in self.slots.values() if s.loaded and s.queue and s.busy < self.max_conc]
        slot = min(ready, key=lambda s: s.queue[0][1]) if ready else None
        load = self.pending[0] if self.pending and self.loading < self.plan["max_concurrent_loads"] else None
        if load is not None and (slot is None or load.queued <= slot.queue[0][1]):
            if self._make_room(self.plan["models"][load.m]["memory_gb"]):
                self.pending.popleft()
                self.used_gb += self.plan["models"][load.m]["memory_gb"]
                self.loading += 1
                return ("load", load)
        if slot is None:
            return None
        return ("req", slot, slot.queue.popleft())

    def worker(self) -> None:
        """One of the instance's workers: it serves requests and loads models, oldest job
        first, reading the pipe before each. Idle, it spins on the pipe (one worker at
        a time: the other idle ones wait for it to take a job), as GPU
        servers spin on their stream: a worker that slept would leave its core
        idle, and the next request would pay the wake-up (cold caches, a
        descheduled virtual CPU), about +10% here, a cost that depends on the gaps
        between requests, which the probe cannot know."""
        # OpenMP's thread count is per thread: a new thread would run its matrix products on every
        # core until its first parallel operator takes the process's setting
        torch.set_num_threads(self.plan["threads"])
        me = threading.get_ident()
        while True:
            self.read()
            with self.lock:
                computing = False
                job = self._next_job()
                if job is not None:
                    self.serving += 1
                    if job[0] == "req":
                        job[1].busy += 1
                    if self.cap > 1:
                        if self.spinner == me:
                            self.spinner = None
                        self.idle.notify()     # a waiting worker takes the next job or the pipe
                elif self.stopping:
                    self.idle.notify_all()
                    return
                elif self.cap > 1 and self.spinner is None:
                    self.spinner = me
                elif self.cap > 1 and self.spinner != me:
                    self.idle.wait(0.1)
                    continue
                computing = self.serving > 0
            if job is None:
                if computing:
                    # the cores are busy with this instance's other workers: wait on the pipe
                    # without the interpreter lock rather than spin for it
                    try:
                        self.conn.poll(0.001)
                    except (OSError, EOFError):
                        pass
                else:
                    time.sleep(0)
                continue
            if job[0] == "req":
                self._serve(*job[1:])
            else:
                self._load(job[1])

    def _serve(self, slot: "_Slot", request) -> None:
        rid, arrived, cold, load_ms = request
        start = self.now()
        slot.run()
        end = self.now()
        with self.lock:
            slot.busy -= 1
            self.serving -= 1
        self.send(("done", rid, self.index, arrived, start, end, cold, load_ms))

    def _load(self, slot: "_Slot") -> None:
        start = self.now()
        mod, run = load_and_warm(self.files[slot.m], self.plan["models"][slot.m], slot.m, self.device)
        end = self.now()
        with self.lock:
            slot.module, slot.run, slot.loaded, slot.loaded_at = mod, run, True, end
            self.loading -= 1
            self.serving -= 1
            for rid, arrived in slot.waiting:
                slot.queue.append((rid, arrived, True, (end - arrived) * 1e3))
            slot.waiting = []
        self.send(("load", self.index, slot.m, slot.queued, start, end))

    # -- memory ---------------------------------------------------------------------
    def _make_room(self, need: float) -> bool:
        """Under the lock: evict idle models, least recently used first, until ``need`` fits."""
        while self.used_gb + need > self.budget + 1e-9:
            idle = [s for s in self.slots.values() if s.idle]
            if not idle:
                return False
            victim = min(idle, key=lambda s: s.last_used)
            del self.slots[victim.m]
            self.used_gb -= self.plan["models"][victim.m]["memory_gb"]
            victim.module = victim.run = None
            self.send(("unload", self.index, victim.m, self.now()))
        return True

    def preload(self, runs: list | None = None) -> None:
        """Load every model before the replay (an SME's instances start warm); ``runs``:
        requests of models already loaded (the probe's), served as they are."""
        for m, f in enumerate(self.files):
            slot = _Slot(m, 0.0)
            if runs:
                slot.run = runs[m]
            else:
                slot.module, slot.run = load_and_warm(f, self.plan["models"][m], m, self.device)
            slot.loaded = True
            self.slots[m] = slot
            self.used_gb += self.plan["models"][m]["memory_gb"]

    def reset(self) -> None:
        """Between replays (all idle): a multi-model instance unloads everything."""
        with self.lock:
            if self.plan["mode"] == "mme":
                self.slots.clear()
                self.pending.clear()
                self.used_gb = 0.0

    def stop(self) -> None:
        with self.lock:
            self.stopping = True


def serve(index: int, plan: dict, files: list, device: str, conn, probe_loads: int = 5,
          probe_requests: int = 40) -> None:
    """The instance process: probe its models (in this very process, where they will
    be served), set up, say ready with the probe, then serve replays until told to stop."""
    from .probe import probe

    torch.set_num_threads(plan["threads"])
    torch.set_grad_enabled(False)
    probed, runs = probe(plan, files, device, loads=probe_loads, requests=probe_requests,
                         log=lambda m: None) if probe_loads or probe_requests else (None, None)
    server = Server(index, plan, files, device, 0.0, conn)
    if plan["mode"] == "sme":
        # Serve with the very copies the probe timed: a copy's speed depends on where
        # its weights lie in memory (about +-8% from one load to the next here).
        server.preload(runs)
    del runs
    conn.send(("ready", index, os.getpid(), probed))
    threads = [threading.Thread(target=server.worker, daemon=True) for _ in range(server.cap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
