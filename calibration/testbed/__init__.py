"""A real multi-model serving testbed on local hardware, to check the simulator against.

    python -m calibration testbed ARRIVALS.csv --plan PLAN.json --device cpu|cuda --out measured.json

``testbed`` starts one serving process per instance of the plan (real
synthetic torch models saved as safetensors on local disk, loaded on demand
into a memory budget, evicted LRU, real inference), routes each request of
ARRIVALS.csv (``capsim trace`` output) as the plan says, replays them open-loop
on their timestamps and writes every request, load and unload.
First, instance 0 times each model's cold start and requests with the same
code, in its own process before it serves (``probe``): the simulator's side
takes its times from there, never from the replay. Neither imports the simulator. Output format
``capsim.testbed/1``: ``{"schema", "metadata", "plan", "probe": {"models":
{name: {"load_s": [...], "service_s": [...], ...}}}, "requests": {column:
[...]}, "loads": [...], "unloads": [...], "unfinished", "send_lag_ms", "time_scale", "noise"}``;
``probe.concurrency``: where an instance serves several requests at once, the slowdown with
concurrency its calibration replays measured (``replay.slowdown_curve``), else null (with one, each
model's ``load_alone_s``: its loads' times alone under it, as its ``service_s`` are); ``noise``:
the cores other processes used during the measured replay (``neighbour_cores``, of ``cpus``), the
load average after it, the drift of the request time between the calibration replays
(``level_drift``) and how far the measured replay's was from theirs (``level_gap``; with a
slowdown curve, of the requests' times alone under it; a language model's: its step time's level
under the fit);
request and load times in seconds from the arrivals' origin. With the plan's
``reference_request_s`` the arrivals' times are first multiplied by
``time_scale`` (``replay.time_scale``: this machine's request time over that
reference), and ``requests.arrival_s`` holds the times replayed.

A plan of mode ``continuous_batching`` (calibration/testbed/llm.py) serves a llama-like decoder
with a continuous-batching loop; its arrivals carry ``input_tokens`` and ``output_tokens``, and its
measured.json adds, per request, ``first_token_s``, ``input_tokens``, ``output_tokens`` (and
``start_s``: the step that admitted it), ``steps`` (every step of the measured replay: begin,
end, decoding sequences ``n``, their context tokens ``K``, prefill tokens ``p``, prefilling
sequences, the idle wait before it), and under ``probe``: the reference step, the designed grid
with its fit, the calibration replays and ``step``, the step-time coefficients fitted on their
steps (what the simulator takes), scaled to the steps' mean time (``mean_scale``: llm.fit_steps),
with ``measured_prediction``, how well they predict the measured replay's steps. ``loads`` is empty
and every request is warm (``cold`` false).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from .. import env, models
from ..profile import write_json_atomic
from . import plan as _plan
from . import llm, replay, server

SCHEMA = "capsim.testbed/1"


def _workdir(workdir: str | None, out: str) -> tuple[str, bool]:
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        return workdir, False
    base = os.path.dirname(os.path.abspath(out))
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix=".testbed-", dir=base), True


def run_testbed(arrivals_path: str, plan_path: str, out: str, device: str = "cpu",
                workdir: str | None = None, seed: int = 0, probe_loads: int = 5, probe_requests: int = 0,
                log=print) -> dict:
    """Probe the plan's models, then serve the arrivals with the plan; write ``out``
    (capsim.testbed/1, with the probe under ``probe``) and return it."""
    models.check_device(device)
    plan = _plan.load(plan_path)
    if plan["mode"] == "continuous_batching":
        arrivals = llm.read_arrivals(arrivals_path)
        log(f"testbed: a continuous-batching server ({plan['models'][0]['params']} llama-like decoder, "
            f"max_num_seqs {plan['max_num_seqs']}, max_num_batched_tokens {plan['max_num_batched_tokens']}), "
            f"{len(arrivals):,} arrivals over {arrivals[-1][0] if arrivals else 0:.0f} s; probing first")
        rec = llm.run(plan, arrivals, device=device, seed=seed, log=log)
        result = {"schema": SCHEMA, "metadata": env.collect(device), "plan": plan, **rec}
        write_json_atomic(result, out)
        return result
    arrivals = replay.read_arrivals(arrivals_path, [m["name"] for m in plan["models"]])
    wd, temp = _workdir(workdir, out)
    try:
        files = [server.model_file(m, k, wd) for k, m in enumerate(plan["models"])]
        # 300 timed requests in all by default (a few seconds), at least 40 per model
        per_model = probe_requests or max(40, 300 // len(plan["models"]))
        log(f"testbed: {plan['instances']} instance(s), {len(plan['models'])} model(s), "
            f"{len(arrivals):,} arrivals over {arrivals[-1][0] if arrivals else 0:.0f} s; probing first")
        rec = replay.run(plan, arrivals, files, device=device, seed=seed, probe_loads=probe_loads,
                         probe_requests=per_model, log=log)
    finally:
        if temp:
            shutil.rmtree(wd, ignore_errors=True)
    result = {"schema": SCHEMA, "metadata": env.collect(device), "plan": plan, **rec}
    write_json_atomic(result, out)
    return result
