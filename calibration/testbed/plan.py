"""The testbed's plan: what capsim writes (PLAN.json) and the testbed serves.

Format ``capsim.testbed-plan/1``::

    {"schema": "capsim.testbed-plan/1",
     "name": "mme_thrash",
     "mode": "mme",                    # mme: load on demand, evict LRU; sme: every model preloaded
     "instances": 1,                   # serving processes
     "memory_budget_gb": 0.2,          # per instance: memory that may hold models
     "routing": "random",              # random | round_robin | least_outstanding_requests | power_of_two
     "max_concurrency": 1,             # requests one model serves at once on an instance
     "instance_concurrency": 1,        # requests an instance serves at once over its models
     "max_concurrent_loads": 1,        # loads under way at once on an instance
     "replicate_above": 8,             # mme: load a hot model on another instance above this
     "timeout_s": 60,
     "threads": 1,                     # torch intra-op threads per instance
     "reference_request_s": 0.0125,    # optional: the request time the arrivals were written for;
                                       # their times are stretched by this machine's over it (null:
                                       # replayed as written)
     "reference_load_s": 0.061,        # optional, with reference_request_s: the cold start they were
                                       # written for; an mme plan's stretch then counts the expected
                                       # misses' loads beside the requests (replay.time_scale)
     "models": [{"name": "m-00", "family": "encoder", "params": "8M", "seq_len": 64,
                 "memory_gb": 0.032}]}  # memory_gb: what a loaded copy counts against the budget

A language model served with continuous batching (calibration/testbed/llm.py)::

    {"schema": "capsim.testbed-plan/1", "name": "llm_conversation",
     "mode": "continuous_batching",    # one instance, one llama-like decoder, one serving loop
     "instances": 1, "memory_budget_gb": 1.0, "timeout_s": 120, "threads": 1,
     "max_num_seqs": 16,               # sequences in a step at most
     "max_num_batched_tokens": 256,    # tokens in a step at most (decodes count); prompts prefill in chunks
     "reference_step_s": 0.004,        # optional: the reference step's time the arrivals were written for
     "models": [{"name": "llm-00", "family": "llama", "params": "5M", "memory_gb": 0.02}]}

Its arrivals CSV has the columns ``arrival_s``, ``input_tokens`` and ``output_tokens``.

Versions: 1 (2026-12) first; ``reference_request_s`` and ``reference_load_s`` added (optional,
2026-12); mode ``continuous_batching`` with ``max_num_seqs``, ``max_num_batched_tokens`` and
``reference_step_s``, family ``llama`` (2026-12).
"""
from __future__ import annotations

import json
import os

SCHEMA = "capsim.testbed-plan/1"
ROUTING = ("random", "round_robin", "least_outstanding_requests", "power_of_two")
_INTS = ("instances", "max_concurrency", "instance_concurrency", "max_concurrent_loads", "replicate_above",
         "threads")
_DEFAULTS = {"mode": "mme", "routing": "random", "max_concurrency": 1, "instance_concurrency": 1,
             "max_concurrent_loads": 1, "replicate_above": 8, "timeout_s": 60.0, "threads": 1,
             "reference_request_s": None, "reference_load_s": None,
             "max_num_seqs": None, "max_num_batched_tokens": None, "reference_step_s": None}
MODES = ("mme", "sme", "continuous_batching")
FAMILIES = ("encoder", "decoder", "llama")


def validate(plan: dict, source: str = "plan") -> dict:
    """A checked copy of ``plan`` with defaults filled in; ValueError names the key."""
    if not isinstance(plan, dict) or plan.get("schema") != SCHEMA:
        raise ValueError(f"{source}: schema: expected {SCHEMA!r}")
    p = {**_DEFAULTS, **plan}
    for key in ("name", "instances", "memory_budget_gb", "models"):
        if key not in p:
            raise ValueError(f"{source}: {key}: missing")
    unknown = set(p) - set(_DEFAULTS) - {"schema", "name", "instances", "memory_budget_gb", "models"}
    if unknown:
        raise ValueError(f"{source}: unknown keys {sorted(unknown)}")
    for key in _INTS:
        if not isinstance(p[key], int) or p[key] < 1:
            raise ValueError(f"{source}: {key}: expected an integer >= 1, got {p[key]!r}")
    if p["mode"] not in MODES:
        raise ValueError(f"{source}: mode: expected one of {', '.join(MODES)}, got {p['mode']!r}")
    batching = ("max_num_seqs", "max_num_batched_tokens", "reference_step_s")
    if p["mode"] == "continuous_batching":
        for key in batching[:2]:
            if isinstance(p[key], bool) or not isinstance(p[key], int) or p[key] < 1:
                raise ValueError(f"{source}: {key}: expected an integer >= 1 for mode continuous_batching, "
                                 f"got {p[key]!r}")
        if p["max_num_batched_tokens"] < p["max_num_seqs"]:
            raise ValueError(f"{source}: max_num_batched_tokens: {p['max_num_batched_tokens']} is below "
                             f"max_num_seqs {p['max_num_seqs']}: every running sequence decodes a token per step")
        if p["instances"] != 1 or not isinstance(p["models"], list) or len(p["models"]) != 1:
            raise ValueError(f"{source}: mode continuous_batching serves one model on one instance")
        ref = p["reference_step_s"]
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (int, float)) or ref <= 0):
            raise ValueError(f"{source}: reference_step_s: expected a number of seconds > 0 or null, got {ref!r}")
    else:
        for key in batching:
            if p[key] is not None:
                raise ValueError(f"{source}: {key}: only for mode continuous_batching")
    if p["routing"] not in ROUTING:
        raise ValueError(f"{source}: routing: expected one of {', '.join(ROUTING)}, got {p['routing']!r}")
    for key in ("reference_request_s", "reference_load_s"):
        ref = p[key]
        if ref is not None and (isinstance(ref, bool) or not isinstance(ref, (int, float)) or ref <= 0):
            raise ValueError(f"{source}: {key}: expected a number of seconds > 0 or null, got {ref!r}")
    if p["reference_load_s"] is not None and p["reference_request_s"] is None:
        raise ValueError(f"{source}: reference_load_s: needs reference_request_s")
    if not isinstance(p["memory_budget_gb"], (int, float)) or p["memory_budget_gb"] <= 0:
        raise ValueError(f"{source}: memory_budget_gb: expected a number > 0")
    if not isinstance(p["models"], list) or not p["models"]:
        raise ValueError(f"{source}: models: expected a non-empty list")
    names = set()
    for k, m in enumerate(p["models"]):
        where = f"{source}: models[{k}]"
        for key in ("name", "family", "params", "memory_gb"):
            if key not in m:
                raise ValueError(f"{where}.{key}: missing")
        if m["family"] not in FAMILIES or (m["family"] == "llama") != (p["mode"] == "continuous_batching"):
            raise ValueError(f"{where}.family: expected encoder or decoder, or llama for mode "
                             "continuous_batching (and only there)")
        if m["name"] in names:
            raise ValueError(f"{where}.name: duplicate {m['name']!r}")
        names.add(m["name"])
        if m["memory_gb"] > p["memory_budget_gb"]:
            raise ValueError(f"{where}.memory_gb: {m['memory_gb']} GB does not fit the budget of "
                             f"{p['memory_budget_gb']} GB")
    if p["mode"] == "sme" and sum(m["memory_gb"] for m in p["models"]) > p["memory_budget_gb"]:
        raise ValueError(f"{source}: mode sme preloads every model: they do not fit memory_budget_gb")
    return p


def load(path: str) -> dict:
    with open(path) as f:
        try:
            plan = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON: {e}") from None
    return validate(plan, os.path.basename(path))
