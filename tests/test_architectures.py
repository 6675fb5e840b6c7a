"""Language-model architectures (sim/catalog/models.yaml), the scenario keys that use them
(``architecture``, ``service.continuous_batching``) and the roofline step model."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sim.catalog import Architecture, UnknownNameError, load_catalog, load_catalog_files
from sim.cli import main
from sim.hosting.roofline import (ALLREDUCE_LATENCY_S, COMM_EFFICIENCY, COMPUTE_EFFICIENCY, MEM_EFFICIENCY,
                                  STEP_OVERHEAD_S, roofline)
from sim.hosting.steps import StepTime
from sim.scenario import ScenarioError, parse_scenario

CATALOG_DIR = Path(__file__).resolve().parents[1] / "sim" / "catalog"
REQUIRED = ["llama-2-7b", "llama-2-13b", "llama-2-70b", "codellama-34b", "mistral-7b", "mixtral-8x7b",
            "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-7b", "codegen2-7b"]
GIVEN_STEP = {"base": "4ms", "per_prefill_token": "0.03ms", "per_decode_seq": "0.05ms", "per_kv_token": "0.1us"}


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


# ---------------------------------------------------------------- the catalog and derived figures

def test_required_architectures_with_provenance(cat):
    assert [n for n in REQUIRED if n not in cat.architectures] == []
    for a in cat.architectures.values():
        assert a.source.startswith("https://huggingface.co/") and a.source.endswith("/config.json"), a.name
        assert len(a.date) == 10, a.name


def test_llama_2_7b_by_hand(cat):
    a = cat.architecture("llama-2-7b")
    assert a.head_dim == 4096 // 32 == 128
    assert a.weight_bytes == 6_738_415_616 * 2
    # K and V, 32 layers, 32 KV heads of 128, 2 bytes: 512 KiB per token
    assert a.kv_bytes_per_token == 2 * 32 * 32 * 128 * 2 == 524_288
    assert a.flops_per_token == 2 * 6_738_415_616
    assert a.active_params == a.params and not a.is_moe
    assert a.weight_bytes_read(1) == a.weight_bytes_read() == a.weight_bytes
    assert a.attention_flops_per_kv_token == 4 * 32 * 32 * 128


def test_llama_2_70b_by_hand(cat):
    a = cat.architecture("llama-2-70b")
    assert a.weight_gb == pytest.approx(137.95, abs=0.01)
    # grouped-query attention: 8 KV heads of 128 -> 320 KiB per token, an eighth of 64 full heads
    assert a.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    # on 8 GPUs each holds one KV head; on 16 the heads would be replicated (vLLM: max(1, 8 // 16))
    assert a.kv_bytes_per_token_per_gpu(8) == a.kv_bytes_per_token / 8
    assert a.kv_bytes_per_token_per_gpu(16) == a.kv_bytes_per_token / 8


def test_mixtral_by_hand(cat):
    a = cat.architecture("mixtral-8x7b")
    experts = 32 * 8 * 3 * 4096 * 14336          # layers x experts x (w1, w2, w3) x hidden x intermediate
    assert a.expert_params == experts == 45_097_156_608
    assert a.shared_params == 46_702_792_704 - experts == 1_605_636_096
    # Mistral AI's published figure: 12.9B active parameters of 46.7B
    assert a.active_params == 1_605_636_096 + experts / 4
    assert a.active_params / 1e9 == pytest.approx(12.9, abs=0.05)
    assert a.flops_per_token == 2 * a.active_params
    assert a.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    # experts touched: one token reads 2 of 8; 16 tokens nearly all (1 - 0.75^16 = 0.99)
    assert a.experts_touched(1) == pytest.approx(0.25)
    assert a.experts_touched(16) == pytest.approx(1 - 0.75 ** 16)
    assert a.weight_bytes_read(1) == pytest.approx(a.active_params * 2)
    assert a.weight_bytes_read(256) == pytest.approx(a.weight_bytes, rel=1e-12)
    assert a.weight_bytes_read() == a.weight_bytes


def test_published_parameter_counts_match_the_configs(cat):
    """Each published count is the count computed from its config (llama layout)."""
    def count(a: Architecture, qkv_bias: bool = False) -> int:
        h, kv = a.hidden, a.kv_heads * a.head_dim
        attn = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if qkv_bias else 0)
        mlp = 3 * h * a.intermediate * (a.experts or 1) + (h * a.experts if a.experts else 0)
        return 2 * a.vocab * h + a.layers * (attn + mlp + 2 * h) + h
    for name in REQUIRED:
        if name != "codegen2-7b":
            assert cat.architecture(name).params == count(cat.architecture(name), name.startswith("qwen")), name


def test_architecture_validation():
    ok = dict(name="x", params=10**9, layers=2, hidden=64, heads=8, kv_heads=2, intermediate=128, vocab=100)
    Architecture(**ok)
    for bad, match in (({"kv_heads": 3}, "kv_heads"), ({"hidden": 60}, "hidden"), ({"experts": 8}, "experts"),
                       ({"experts": 8, "experts_per_token": 9}, "experts_per_token"),
                       ({"experts": 8, "experts_per_token": 2, "params": 1000}, "params"),
                       ({"dtype_bytes": 0}, "dtype_bytes"), ({"layers": 0}, "layers")):
        with pytest.raises(ValueError, match=match):
            Architecture(**{**ok, **bad})


def test_catalog_listing_and_unknown_name(cat):
    df = cat.models_table()
    assert list(df["name"]) == list(cat.architectures)
    assert {"params", "kv_bytes_per_token", "weight_gb", "active_params", "source"} <= set(df.columns)
    with pytest.raises(UnknownNameError, match=r"did you mean llama-2-7b\?"):
        cat.architecture("llama2-7b")


def test_models_file_unknown_field(tmp_path):
    files = [tmp_path / n for n in ("instances.yaml", "gpus.yaml", "models.yaml")]
    for f in files:
        shutil.copy(CATALOG_DIR / f.name, f)
    assert list(load_catalog_files(*files).architectures) == list(load_catalog().architectures)
    text = files[2].read_text().replace("llama-2-7b:\n", "llama-2-7b:\n  rope_theta: 10000\n", 1)
    files[2].write_text(text)
    with pytest.raises(ValueError, match=r"models\.yaml: llama-2-7b: unknown field 'rope_theta'"):
        load_catalog_files(*files)


def test_cli_catalog_models():
    r = CliRunner().invoke(main, ["catalog", "--models"], catch_exceptions=False)
    assert r.exit_code == 0
    for name in REQUIRED:
        assert name in r.output
    assert "2/8" in r.output          # mixtral's experts
    r = CliRunner().invoke(main, ["catalog", "--models", "--json"], catch_exceptions=False)
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["llama-2-7b"]["kv_bytes_per_token"] == 524_288
    assert rows["mixtral-8x7b"]["experts"] == 8 and rows["llama-2-7b"]["experts"] is None
    # without --models the instance types, as before
    r = CliRunner().invoke(main, ["catalog", "--json"], catch_exceptions=False)
    assert "ml.g5.xlarge" in r.output and "llama-2-7b" not in r.output


# ---------------------------------------------------------------- the roofline

def test_roofline_batch_one_decode_against_published(cat):
    """Batch-1 decode of a 7B fp16 model: the weights over the bandwidth at MEM_EFFICIENCY.

    Published: gpt-fast (https://github.com/pytorch-labs/gpt-fast, README, Benchmarks) runs Llama-2-7B
    at batch 1 on an A100-80GB (power-limited to 330 W) at 104.9 tokens/s: 9.53 ms per token, 1397
    GB/s. 13.48 GB over 2039 GB/s x 0.70 is 9.44 ms, plus the 0.5 ms step overhead: 9.94 ms, 4% above
    (gpt-fast has no serving engine). On an H100 SXM (3350 GB/s) the same rule gives 6.25 ms.
    """
    a = cat.architecture("llama-2-7b")
    for gpu, expected_ms in (("A100-80GB", 9.94), ("A100-40GB", 12.88), ("H100", 6.25)):
        g = cat.gpu_spec(gpu)
        step = roofline(a, g)
        by_rule = a.weight_bytes / (g.memory_bandwidth_gbs * 1e9 * MEM_EFFICIENCY) + STEP_OVERHEAD_S
        t = step.time(1, 100, 0)     # one sequence, 100 tokens of context
        assert t == pytest.approx(by_rule + 100 * a.kv_bytes_per_token / (g.memory_bandwidth_gbs * 1e9 * MEM_EFFICIENCY))
        assert step.time(1, 5, 0) * 1e3 == pytest.approx(expected_ms, abs=0.01)   # a 5-token prompt, as gpt-fast
    gpt_fast = 1 / 104.9
    assert roofline(a, cat.gpu_spec("A100-80GB")).time(1, 5, 0) == pytest.approx(gpt_fast, rel=0.06)
    assert roofline(a, cat.gpu_spec("A100-80GB")).time(1, 5, 0) > gpt_fast


def test_roofline_tensor_parallel_against_published(cat):
    """gpt-fast's tensor-parallel table (A100-80GB, batch 1): Llama-2-7B on 8 GPUs 328.43 tokens/s
    (3.04 ms), Llama-2-70B on 8 GPUs 62.50 tokens/s (16.0 ms), on 4 GPUs 38.01 (26.3 ms)."""
    g = cat.gpu_spec("A100-80GB")
    for name, tp, tokens_per_s in (("llama-2-7b", 8, 328.43), ("llama-2-70b", 8, 62.50), ("llama-2-70b", 4, 38.01)):
        t = roofline(cat.architecture(name), g, tp).time(1, 5, 0)
        assert t == pytest.approx(1 / tokens_per_s, rel=0.10), (name, tp, t)


def test_roofline_terms_by_hand(cat):
    a, g = cat.architecture("llama-2-70b"), cat.gpu_spec("H100")
    step = roofline(a, g, 4)
    bw, fl = 3350e9 * MEM_EFFICIENCY, 989e12 * COMPUTE_EFFICIENCY * 4
    link = 450e9 * COMM_EFFICIENCY
    comm = 160 * 2 * 3 / 4 * 8192 * 2 / link
    assert step.overhead == pytest.approx(STEP_OVERHEAD_S + 160 * ALLREDUCE_LATENCY_S)
    (ma, mb, mc, md), (ca, cb, cc, cd) = step.terms
    assert (ma, mb, mc, md) == pytest.approx((a.weight_bytes / 4 / bw, comm, a.kv_bytes_per_token / 4 / bw, comm))
    assert (ca, cb, cc, cd) == pytest.approx((0.0, a.flops_per_token / fl + comm,
                                              a.attention_flops_per_kv_token / fl, a.flops_per_token / fl + comm))
    assert "llama-2-70b on 4 x H100" in step.source


def test_roofline_regimes_and_monotonicity(cat):
    a = cat.architecture("llama-2-7b")
    step = roofline(a, cat.gpu_spec("A100-80GB"))
    # decode at small batches is memory-bound: 32 sequences cost little more than one
    assert step.time(32, 32 * 100, 0) < 1.2 * step.time(1, 100, 0)
    # a 2048-token prefill is compute-bound: its FLOPs over 312 TFLOPS x 0.6
    assert step.time(0, 0, 2048) == pytest.approx(STEP_OVERHEAD_S + 2048 * a.flops_per_token / (312e12 * 0.6))
    # never decreasing in any argument
    for n, k, p in ((1, 100, 0), (8, 4000, 0), (64, 64_000, 512), (256, 256_000, 2048)):
        base = step.time(n, k, p)
        assert step.time(n + 1, k, p) >= base and step.time(n, k + 1000, p) >= base
        assert step.time(n, k, p + 16) >= base
    # more bandwidth, fewer seconds; more GPUs, less per step for a large model
    assert roofline(a, cat.gpu_spec("H100")).time(8, 8000, 0) < roofline(a, cat.gpu_spec("A100-80GB")).time(8, 8000, 0)
    big = cat.architecture("llama-2-70b")
    times = [roofline(big, cat.gpu_spec("H100"), tp).time(16, 16_000, 0) for tp in (2, 4, 8)]
    assert times == sorted(times, reverse=True)
    # mixtral: a full batch reads every expert; batch-1 serving reads about its active weights
    mx = cat.architecture("mixtral-8x7b")
    one = roofline(mx, cat.gpu_spec("H100"), 2, max_num_seqs=1).terms[0][0]
    full = roofline(mx, cat.gpu_spec("H100"), 2, max_num_seqs=256).terms[0][0]
    assert one / full == pytest.approx(mx.weight_bytes_read(1) / mx.weight_bytes)
    assert 0.25 < one / full < 0.3


def test_roofline_refusals(cat):
    a = cat.architecture("llama-2-7b")
    with pytest.raises(ValueError, match="tensor-parallel"):
        roofline(a, cat.gpu_spec("H100"), 0)
    with pytest.raises(ValueError, match="mem_efficiency"):
        roofline(a, cat.gpu_spec("H100"), mem_efficiency=1.5)


# ---------------------------------------------------------------- the scenario keys

def _scenario(model: dict, endpoint: dict | None = None, instance_types: list | None = None) -> dict:
    m = {"name": "llm", "tokens": {"input": 600, "output": 250}, "traffic": {"rate": "1/s"}}
    m.update(model)
    e = {"name": "e", "instance_type": "ml.g5.xlarge", "models": ["llm"]}
    e.update(endpoint or {})
    d = {"name": "t", "duration": "1m", "models": [m], "endpoints": [e]}
    if instance_types:
        d["instance_types"] = instance_types
    return d


def _error(d: dict) -> str:
    with pytest.raises(ScenarioError) as ei:
        parse_scenario(copy.deepcopy(d), source="s.yaml")
    return str(ei.value)


def test_defaults_and_resolution(cat):
    sc = parse_scenario(_scenario({"architecture": "llama-2-7b", "service": {"continuous_batching": {}}}))
    m = sc.models[0]
    a = cat.architecture("llama-2-7b")
    assert m.size_gb == m.memory_gb == a.weight_gb       # size_gb defaults to the weights
    assert m.architecture == a
    llm = m.llm
    assert (llm.max_num_seqs, llm.max_num_batched_tokens, llm.block_size, llm.tp, llm.step_kind) == \
        (256, 2048, 16, 1, "roofline")
    # 0.9 x 24 GB of the A10G less 13.48 GB of weights, in blocks of 16 tokens x 512 KiB
    room = 0.9 * 24 - a.weight_gb
    assert llm.kv_cache_gb == pytest.approx(room)
    assert llm.kv_blocks == int(room * 1e9 // (16 * 524_288)) == 968
    assert llm.kv_tokens == 968 * 16
    assert llm.step == roofline(a, cat.gpu_spec("A10G"), 1, max_num_seqs=256)
    assert sc.warnings == ()
    # a size_gb given wins over the architecture's
    sc = parse_scenario(_scenario({"architecture": "llama-2-7b", "size_gb": 14,
                                   "service": {"continuous_batching": {}}}))
    assert sc.models[0].size_gb == 14
    # a model without an architecture resolves as before
    sc = parse_scenario(_scenario({"size_gb": 1, "service": {"mean": "50ms"}}))
    assert sc.models[0].llm is None and sc.models[0].architecture is None


def test_tensor_parallel_copy_and_mapping(cat):
    d = _scenario({"architecture": "llama-2-70b", "accelerators": 8, "service": {"continuous_batching": {
        "max_num_seqs": 64, "gpu_memory_utilization": 0.85, "block_size": 32}}},
        {"instance_type": "ml.p4d.24xlarge"})
    llm = parse_scenario(d).models[0].llm
    per_gpu = 0.85 * 40 - 137.953296384 / 8
    assert llm.tp == 8 and llm.kv_cache_gb == pytest.approx(8 * per_gpu)
    assert llm.kv_blocks == int(per_gpu * 1e9 // (32 * 327_680 / 8))
    # the same figures as a mapping (params with a unit) give the same copy
    mapping = {"params": "68976648192", "layers": 80, "hidden": 8192, "heads": 64, "kv_heads": 8,
               "intermediate": 28672, "vocab": 32000}
    d["models"][0]["architecture"] = mapping
    llm2 = parse_scenario(d).models[0].llm
    assert llm2.kv_blocks == llm.kv_blocks and llm2.step.terms == llm.step.terms
    d["models"][0]["architecture"] = {**mapping, "params": "6.74B", "layers": 32, "hidden": 4096, "heads": 32,
                                      "kv_heads": 32, "intermediate": 11008}
    assert parse_scenario(d).models[0].size_gb == pytest.approx(13.48)


def test_given_coefficients_and_cpu_copy():
    d = _scenario({"architecture": "llama-2-7b", "accelerators": 0,
                   "service": {"continuous_batching": {"step": GIVEN_STEP, "max_num_seqs": 8,
                                                       "max_num_batched_tokens": 512}}},
                  {"instance_type": "ml.c5.2xlarge"})
    llm = parse_scenario(d).models[0].llm
    assert llm.step == StepTime.linear(4e-3, 0.03e-3, 0.05e-3, 0.1e-6, source="given")
    assert llm.tp == 0 and llm.step_kind == "given"
    # a CPU copy: gpu_memory_utilization of the instance's 16 GB less the model's 13.48 GB
    assert llm.kv_cache_gb == pytest.approx(0.9 * 16 - 13.476831232)
    d["models"][0]["service"]["continuous_batching"]["kv_cache_gb"] = "500MB"
    llm = parse_scenario(d).models[0].llm
    assert llm.kv_cache_gb == 0.5 and llm.kv_blocks == int(0.5e9 // (16 * 524_288))


def test_error_unknown_architecture():
    msg = _error(_scenario({"architecture": "llama2-7b", "service": {"continuous_batching": {}}}))
    assert "s.yaml: models[0].architecture: unknown architecture 'llama2-7b' (did you mean llama-2-7b?)" in msg


def test_error_continuous_batching_without_architecture():
    msg = _error(_scenario({"size_gb": 13, "service": {"continuous_batching": {}}}))
    assert "models[0]: service.continuous_batching needs the model's architecture" in msg
    msg = _error(_scenario({"service": {"mean": "1s"}}))
    assert "missing size_gb" in msg


def test_error_mapping_missing_key_and_bad_values():
    base = {"params": "6.74B", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008,
            "vocab": 32000}
    for change, expected in (
            ({"vocab": None}, "models[0].architecture.vocab: missing required key"),
            ({"params": "6.7Q"}, "models[0].architecture.params: expected a parameter count"),
            ({"kv_heads": 5}, "models[0].architecture: kv_heads: 5 must divide heads (32)"),
            ({"experts": 8}, "needs both experts and experts_per_token"),
            ({"rope": 1}, "models[0].architecture.rope: unknown key 'rope'")):
        arch = {k: v for k, v in {**base, **change}.items() if v is not None}
        msg = _error(_scenario({"architecture": arch, "service": {"continuous_batching": {}}}))
        assert expected in msg, msg
        assert "problems" not in msg, msg          # one paragraph about one thing
    msg = _error(_scenario({"architecture": 7, "service": {"continuous_batching": {}}}))
    assert "models[0].architecture: expected an architecture name" in msg


def test_error_weights_do_not_fit():
    # 13.48 GB of weights fit a 16 GB T4, but not in 0.8 x 16 = 12.8 GB: no room for the KV cache
    msg = _error(_scenario({"architecture": "llama-2-7b", "service": {"continuous_batching": {
        "gpu_memory_utilization": 0.8}}}, {"instance_type": "ml.g4dn.xlarge"}))
    assert "models[0].service.continuous_batching: model 'llm': its weights take 13.5 GB per GPU" in msg
    assert "0.8 x 16 GB gives 12.8 GB per T4 of ml.g4dn.xlarge" in msg
    # larger than the whole GPU: the fit check names the instance type
    msg = _error(_scenario({"architecture": "llama-2-13b", "service": {"continuous_batching": {}}}))
    assert "endpoints[0].instance_type: model 'llm' needs 26.0317 GB of GPU memory" in msg
    msg = _error(_scenario({"architecture": "llama-2-7b", "service": {"continuous_batching": {
        "kv_cache_gb": 10}}}))
    assert "models[0].service.continuous_batching.kv_cache_gb" in msg and "21.6 GB" in msg


def test_error_sequence_longer_than_the_cache():
    msg = _error(_scenario({"architecture": "llama-2-7b", "tokens": {"input": 6000, "output": 250},
                            "service": {"continuous_batching": {"gpu_memory_utilization": 0.6}}}))
    assert "a request of 6250 tokens (input and output) needs more than the copy's KV cache of 1760 tokens" in msg


def test_error_bad_step():
    cb = lambda step: _scenario({"architecture": "llama-2-7b", "service": {"continuous_batching": {"step": step}}})  # noqa: E731
    where = "models[0].service.continuous_batching.step"
    assert f"{where}: unknown step model 'rofline' (did you mean roofline?)" in _error(cb("rofline"))
    assert f"{where}: missing per_prefill_token, per_decode_seq, per_kv_token" in _error(cb({"base": "4ms"}))
    assert f"{where}: give either profile or the coefficients" in _error(cb({"profile": "p.json", **GIVEN_STEP}))
    assert f"{where}: every coefficient is 0" in _error(cb({k: 0 for k in GIVEN_STEP}))
    assert f"{where}.base: expected a duration" in _error(cb({**GIVEN_STEP, "base": "fast"}))
    assert f"{where}.per_token: unknown key" in _error(cb({"per_token": "1ms"}))


def test_error_roofline_needs_a_gpu():
    d = _scenario({"architecture": "llama-2-7b", "accelerators": 0, "service": {"continuous_batching": {}}},
                  {"instance_type": "ml.c5.2xlarge"})
    msg = _error(d)
    assert "models[0].service.continuous_batching.step: step roofline needs a GPU copy" in msg
    custom = {"name": "x.gpu", "gpus": 1, "gpu_memory_gb": 80, "vcpus": 8, "memory_gb": 64, "price_per_hour": 1}
    msg = _error(_scenario({"architecture": "llama-2-7b", "service": {"continuous_batching": {}}},
                           {"instance_type": "x.gpu"}, [custom]))
    assert "names no GPU of the catalog" in msg


def test_error_service_forms_and_limits():
    def cb(extra_service=None, **cb_keys):
        return _scenario({"architecture": "llama-2-7b",
                          "service": {"continuous_batching": cb_keys, **(extra_service or {})}})
    assert "drop mean" in _error(cb({"mean": "1s"}))
    assert "continuous_batching and batching are two execution models" in _error(
        cb({"batching": {"slowdown": {2: 1.5}}}))
    assert "models[0].service.continuous_batching.max_num_batched_tokens: input should be greater than or equal " \
           "to 1, got 0" in _error(cb(max_num_batched_tokens=0))
    assert "max_num_batched_tokens (2048) must be >= max_num_seqs (4096)" in _error(cb(max_num_seqs=4096))
    assert "gpu_memory_utilization" in _error(cb(gpu_memory_utilization=1.5))
    d = cb()
    del d["models"][0]["tokens"]
    assert "a continuous-batching service needs token counts" in _error(d)


def test_error_heads_not_divisible():
    d = _scenario({"architecture": "qwen2.5-7b", "accelerators": 8, "service": {"continuous_batching": {}}},
                  {"instance_type": "ml.p4d.24xlarge"})
    assert "models[0].accelerators: qwen2.5-7b has 28 attention heads, which 8 tensor-parallel GPUs" in _error(d)


def test_profile_step_until_the_profile_reader_exists(monkeypatch):
    import sim.profile as prof

    d = _scenario({"architecture": "llama-2-7b", "service": {"continuous_batching": {"step": {"profile": "p.json"}}}})
    monkeypatch.delattr(prof, "step_coefficients", raising=False)
    assert "needs sim.profile.step_coefficients" in _error(d)
    seen = {}

    def fake(path, params, kv_bytes_per_token=None, gpu=None):
        seen.update(path=path, params=params, kv=kv_bytes_per_token, gpu=gpu)
        return {"base": 5e-3, "per_prefill_token": 2e-5, "per_decode_seq": 1e-4, "per_kv_token": 1e-7}, ["note"]

    monkeypatch.setattr(prof, "step_coefficients", fake, raising=False)
    sc = parse_scenario(copy.deepcopy(d), base_dir=Path("/x"))
    assert sc.models[0].llm.step == StepTime.linear(5e-3, 2e-5, 1e-4, 1e-7, source="profile p.json")
    assert seen["path"] == Path("/x/p.json") and seen["params"] == 6_738_415_616 and seen["kv"] == 524_288
    assert seen["gpu"].name == "A10G" and "note" in sc.warnings


def test_error_mapping_without_each_required_key():
    """Every key but dtype_bytes and the two expert keys is required: leaving out any one is one error
    naming that key's path."""
    base = {"params": "6.74B", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 32, "intermediate": 11008,
            "vocab": 32000}
    for key in base:
        arch = {k: v for k, v in base.items() if k != key}
        msg = _error(_scenario({"architecture": arch, "service": {"continuous_batching": {}}}))
        assert f"models[0].architecture.{key}: missing required key" in msg, msg
        assert "problems" not in msg, msg
    # the optional ones may be left out
    assert parse_scenario(_scenario({"architecture": base, "service": {"continuous_batching": {}}})).models[0].llm


def test_warning_token_means_longer_than_the_cache():
    """Token counts drawn from distributions whose means together exceed the copy's KV cache: a warning
    (such requests cannot be served; the run refuses them as no_capacity), not an error as for constant
    tokens (test_error_sequence_longer_than_the_cache): 0.6 x 24 GB less 13.48 GB leaves 110 blocks, 1760
    tokens."""
    d = _scenario({"architecture": "llama-2-7b",
                   "tokens": {"input": {"dist": "lognormal", "mean": 6000, "cv": 0.5}, "output": 250},
                   "service": {"continuous_batching": {"gpu_memory_utilization": 0.6}}})
    sc = parse_scenario(copy.deepcopy(d), source="s.yaml")
    assert sc.models[0].llm.kv_tokens == 1760
    assert any(w.startswith("models[0].service.continuous_batching: model 'llm': a request of 6250 tokens (input "
                            "and output, means) needs more than the copy's KV cache of 1760 tokens") for w in sc.warnings)


def test_warning_memory_below_the_architectures_weights():
    """A language model whose memory_gb is below its architecture's weights (13.48 GB for llama-2-7b) would
    have its KV cache sized beside the smaller figure: a warning naming both; none at the weights."""
    d = _scenario({"architecture": "llama-2-7b", "memory_gb": 8, "service": {"continuous_batching": {}}})
    small = parse_scenario(copy.deepcopy(d), source="s.yaml")
    msg = [w for w in small.warnings if "weights are" in w]
    assert msg and msg[0].startswith("models[0]: 'llm' takes 8 GB of memory") and "13.5 GB" in msg[0], small.warnings
    del d["models"][0]["memory_gb"]
    assert not [w for w in parse_scenario(d, source="s.yaml").warnings if "weights are" in w]
