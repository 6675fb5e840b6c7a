"""The roofline step model: a continuous-batching step's time from the GPU's datasheet and the model's
architecture.

A step with ``n`` decode sequences over ``K`` context tokens and ``p`` prefill tokens, on a copy of
``tp`` tensor-parallel GPUs, takes (:class:`~sim.hosting.steps.StepTime`, two terms)::

    overhead + 2 L (all-reduce latency) + max(memory, compute) + (n + p) * all-reduce time per token

    memory  = (weight bytes read / tp + K * KV bytes per token per GPU) / (bandwidth * MEM_EFFICIENCY)
    compute = ((n + p) * FLOPs per token + K * attention FLOPs per cached token) / tp
              / (peak FLOP/s * COMPUTE_EFFICIENCY)

- Weight bytes read: every weight once per step (the batch shares the read). A mixture-of-experts
  model reads its shared weights and the experts its tokens touch; the roofline takes the experts a
  full decode batch (``max_num_seqs`` tokens) touches, which for Mixtral (2 of 8 experts) is all of
  them from 16 tokens on (:meth:`~sim.catalog.Architecture.experts_touched`). A step model is a
  maximum of affine terms and the experts touched are concave in the tokens, so no such model follows
  them exactly: with fewer tokens in a step than ``max_num_seqs`` the memory time is an upper bound
  (set ``max_num_seqs: 1`` to see batch-1 Mixtral read its 2 experts per layer).
- KV bytes read: the context of every decode sequence, once. Each GPU holds ``kv_heads / tp`` KV
  heads (a whole one, replicated, when ``tp`` exceeds ``kv_heads``, as vLLM does).
- FLOPs: 2 per active parameter per token (:attr:`~sim.catalog.Architecture.flops_per_token`), plus
  a decode token's attention over its context (4 x layers x heads x head_dim per cached token). A
  prefill token's attention over the other tokens of its prompt is left out: it grows with the
  square of the prompt and a step model is affine; for a 7B model and a 2048-token chunk it is about
  4% of the chunk's FLOPs.
- Tensor parallelism (Megatron-style, as vLLM shards a model): two all-reduces per layer (after
  attention and after the MLP), each of ``(n + p) x hidden x dtype_bytes`` bytes; a ring all-reduce
  sends ``2 (tp - 1) / tp`` of them over each GPU's link (:attr:`~sim.catalog.GPUSpec.interconnect_gbs`:
  NVLink where the catalog's GPU has it, else PCIe), plus a fixed latency per all-reduce. They are
  not overlapped with compute (vLLM does not overlap them).

Constants, each with its source (planning figures: a calibration profile measured on the GPU,
``step: {profile: ...}``, replaces all of them):

- ``MEM_EFFICIENCY = 0.70``, the model bandwidth utilisation (MBU: bytes a decode step must read
  over its time, over the datasheet bandwidth; defined in Databricks' "LLM Inference Performance
  Engineering: Best Practices", 2023, https://www.databricks.com/blog/llm-inference-performance-engineering-best-practices,
  whose worked example is a 7B fp16 model at 14 ms per token on a 2 TB/s GPU, 50% MBU). Measured:
  gpt-fast, Llama-2-7B at batch 1 on an A100-80GB (power-limited to 330 W), 104.9 tokens/s at
  1397 GB/s, 68.5% of the 2039 GB/s datasheet figure (https://github.com/pytorch-labs/gpt-fast,
  README, "Benchmarks").
- ``COMPUTE_EFFICIENCY = 0.60``, the model FLOPs utilisation of prefill (large matrix products).
  Pope et al., "Efficiently Scaling Transformer Inference" (MLSys 2023, arXiv:2211.05102), reach 76%
  MFU in large-batch prefill of PaLM 540B on TPU v4, a highly tuned upper end; 7B-class models on
  GPUs reach less (their matrices are smaller). 0.6 is a planning figure between.
- ``COMM_EFFICIENCY = 0.67``: NCCL all-reduce bus bandwidth over the per-direction link bandwidth;
  8 x A100-80GB on NVLink measure about 200 GB/s of 300 (nccl-tests issue 149,
  https://github.com/NVIDIA/nccl-tests/issues/149; 208 GB/s in issue 178).
- ``ALLREDUCE_LATENCY_S = 25 us`` per all-reduce, from gpt-fast's tensor-parallel table (same
  README): Llama-2-7B at 2, 4 and 8 A100s takes 5.92, 3.94 and 3.04 ms per token against 4.82, 2.41
  and 1.21 ms for its weights over 1397 GB/s per GPU: 1.10, 1.53 and 1.84 ms more over 64
  all-reduces, 17, 24 and 29 us each. Measured on NVLink; over PCIe (g5, g6) it is likely optimistic.
- ``STEP_OVERHEAD_S = 0.5 ms`` per step: the serving engine's scheduling, input preparation and
  sampling that the GPU waits for. vLLM measured these at 29% of the time of Llama-3-8B on one H100
  before v0.6.0 and then hid most of them behind the GPU's work (multi-step scheduling,
  asynchronous output processing; "vLLM v0.6.0: 2.7x Throughput Improvement and 5x Latency
  Reduction", https://blog.vllm.ai/2024/09/05/perf-update.html). What stays exposed depends on the
  version and the batch: 0.5 ms is a planning figure (gpt-fast, without a server, is the floor).

Checks against published figures (tests/test_architectures.py): Llama-2-7B at batch 1 on an
A100-80GB, 9.9 ms per decode step here against gpt-fast's 9.5 ms (104.9 tokens/s); on 8 A100s,
3.3 ms against 3.0 ms; Llama-2-70B on 8 A100s, 16.6 ms against 16.0 ms.
"""
from __future__ import annotations

from ..catalog import Architecture, GPUSpec
from .steps import StepTime

MEM_EFFICIENCY = 0.70
COMPUTE_EFFICIENCY = 0.60
COMM_EFFICIENCY = 0.67
ALLREDUCE_LATENCY_S = 25e-6
STEP_OVERHEAD_S = 0.5e-3


def roofline(arch: Architecture, gpu: GPUSpec, tp: int = 1, *, max_num_seqs: int | None = None,
             mem_efficiency: float = MEM_EFFICIENCY, compute_efficiency: float = COMPUTE_EFFICIENCY,
             comm_efficiency: float = COMM_EFFICIENCY, allreduce_latency: float = ALLREDUCE_LATENCY_S,
             overhead: float = STEP_OVERHEAD_S) -> StepTime:
    """The roofline step model of ``arch`` on ``tp`` tensor-parallel ``gpu``\\ s (see the module).

    ``max_num_seqs``: the decode batch whose experts a mixture-of-experts model is taken to read in
    every step (None: all of them); no effect on a dense model. Raises ValueError for ``tp < 1``, an
    efficiency outside (0, 1], or a GPU without a 16-bit tensor peak.
    """
    if tp < 1:
        raise ValueError(f"tensor-parallel degree must be >= 1, got {tp!r}")
    for what, eff in (("mem_efficiency", mem_efficiency), ("compute_efficiency", compute_efficiency),
                      ("comm_efficiency", comm_efficiency)):
        if not 0.0 < eff <= 1.0:
            raise ValueError(f"{what}: expected a fraction in (0, 1], got {eff!r}")
    tflops = gpu.peak_tflops
    if not tflops:
        raise ValueError(f"GPU {gpu.name} has no fp16/bf16 tensor peak in the catalog")
    bandwidth = gpu.memory_bandwidth_gbs * 1e9 * mem_efficiency      # bytes/s per GPU
    flops = tflops * 1e12 * compute_efficiency * tp                   # FLOP/s of the copy
    weights = arch.weight_bytes_read(max_num_seqs) / tp
    mem_a = weights / bandwidth
    mem_c = arch.kv_bytes_per_token_per_gpu(tp) / bandwidth
    cmp_b = arch.flops_per_token / flops
    cmp_c = arch.attention_flops_per_kv_token / flops
    fixed, per_token = overhead, 0.0
    if tp > 1:
        allreduces = 2 * arch.layers
        link = gpu.interconnect_gbs * 1e9 * comm_efficiency
        fixed += allreduces * allreduce_latency
        per_token = allreduces * 2.0 * (tp - 1) / tp * arch.allreduce_bytes_per_token / link
    source = (f"roofline: {arch.name} on {tp} x {gpu.name} (memory {mem_efficiency:.0%} of "
              f"{gpu.memory_bandwidth_gbs:g} GB/s, compute {compute_efficiency:.0%} of {tflops:g} TFLOPS"
              + (f", all-reduce over {gpu.interconnect_gbs:g} GB/s" if tp > 1 else "") + ")")
    return StepTime(fixed, ((mem_a, per_token, mem_c, per_token),
                            (0.0, cmp_b + per_token, cmp_c, cmp_b + per_token)), source)
