"""A small llama-like decoder, in plain torch, that steps a continuous batch.

The language-model family of the calibration (``python -m calibration run``'s
``steps`` section) and of the testbed's continuous-batching server
(``calibration.testbed.llm``): no download, random weights, sized by a target
parameter count like the other families (``shape_for``).

Per layer: RMSNorm -> attention (rotary positions, grouped-query: ``kv_heads``
<= ``heads``, head dimension 64) -> residual; RMSNorm -> SwiGLU MLP (gate, up,
down; ``intermediate`` ~ 8/3 x hidden) -> residual. Token embeddings, a final
RMSNorm and an untied LM head. No biases. Parameters:

    per layer   2 d^2 + 2 d kv_heads head_dim + 3 d intermediate + 2 d
    extra       2 vocab d + d

A step (:meth:`Engine.step`) is one iteration of a continuous batch, as
vLLM-style servers run it: the new tokens of every sequence in the step (one
per decoding sequence, a chunk of prompt per prefilling one) are flattened
into one ``[tokens, hidden]`` matrix for the weights, so that each weight is
read once per step whatever the batch; attention runs per sequence against
that sequence's own KV cache (its cost grows with its context, not with the
longest one's); logits are computed only for the sequences that emit a token
this step. What a step costs therefore follows the step-time model the
simulator reads: a base per step, a cost per prefill token, per decoding
sequence and per context (KV) token those sequences attend to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILY = "llama"
VOCAB = 4096
HEAD_DIM = 64
WIDTH_LADDER = (128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 2560, 3072, 4096)
ASPECT = 48            # depth at most hidden / ASPECT, as calibration.models does
ROPE_THETA = 10000.0
ARCH_KEYS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab")


def intermediate_for(d: int) -> int:
    """Llama's MLP width: about 8/3 of the hidden size, a multiple of 32."""
    return max(32, int(round(8 * d / 3 / 32)) * 32)


def count_params(layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int) -> int:
    hd = hidden // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * hd + 3 * hidden * intermediate + 2 * hidden
    return layers * per_layer + 2 * vocab * hidden + hidden


def shape_for(target: int, vocab: int = VOCAB) -> dict:
    """The architecture for a target parameter count: the smallest width of the ladder whose depth
    (rounded, >= 1) is at most width / ASPECT; head dimension 64; as KV heads the largest divisor of
    the heads up to half of them."""
    chosen = None
    for d in WIDTH_LADDER:
        heads = max(1, d // HEAD_DIM)
        kv = max(k for k in range(1, max(1, heads // 2) + 1) if heads % k == 0)
        inter = intermediate_for(d)
        one = count_params(1, d, heads, kv, inter, vocab) - count_params(0, d, heads, kv, inter, vocab)
        rest = target - count_params(0, d, heads, kv, inter, vocab)
        layers = max(1, int(round(rest / one))) if rest > 0 else 1
        chosen = {"layers": layers, "hidden": d, "heads": heads, "kv_heads": kv, "intermediate": inter,
                  "vocab": vocab}
        if layers <= max(1, d // ASPECT):
            break
    return {"family": FAMILY, **chosen, "params": count_params(**chosen)}


def kv_bytes_per_token(shape: dict, dtype_bytes: int) -> int:
    """K and V of one token over all layers: 2 x layers x kv_heads x head_dim x dtype_bytes."""
    return 2 * shape["layers"] * shape["kv_heads"] * (shape["hidden"] // shape["heads"]) * dtype_bytes


class _Layer(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, inter: int):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.norm1 = nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * self.hd, bias=False)
        self.o = nn.Linear(heads * self.hd, d, bias=False)
        self.norm2 = nn.RMSNorm(d, eps=1e-5)
        self.gate_up = nn.Linear(d, 2 * inter, bias=False)
        self.down = nn.Linear(inter, d, bias=False)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of x [T, heads, hd] (cos, sin: [T, 1, hd/2])."""
    a, b = x[..., ::2], x[..., 1::2]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class LlamaModel(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int,
                 vocab: int = VOCAB):
        super().__init__()
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
        self.shape = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads,
                      "intermediate": intermediate, "vocab": vocab}
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(_Layer(hidden, heads, kv_heads, intermediate) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden, eps=1e-5)
        self.head = nn.Linear(hidden, vocab, bias=False)
        hd = hidden // heads
        self.register_buffer("inv_freq", 1.0 / ROPE_THETA ** (torch.arange(0, hd, 2).float() / hd),
                             persistent=False)


def build(shape: dict, device="cpu", dtype=torch.float32, seed: int = 0) -> LlamaModel:
    """A model of ``shape`` (``shape_for``'s) with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        m = LlamaModel(*(shape[k] for k in ARCH_KEYS))
    m = m.to(dtype=dtype).eval()
    m.inv_freq = m.inv_freq.float()
    return m


class Sequence:
    """One sequence of a batch: its prompt, its KV cache (``[layers, 2, kv_heads, capacity,
    head_dim]``, allocated once) and how many tokens the cache holds (``length``)."""

    __slots__ = ("prompt", "cache", "length", "last")

    def __init__(self, model: LlamaModel, prompt: torch.Tensor, capacity: int):
        s = model.shape
        p = model.head.weight
        self.prompt = prompt
        # zeros, not empty: garbage may hold NaNs or denormals, which are slow on some CPUs
        self.cache = torch.zeros((s["layers"], 2, s["kv_heads"], capacity, s["hidden"] // s["heads"]),
                                 device=p.device, dtype=p.dtype)
        self.length = 0
        self.last = 0        # the token the next decode step feeds

    @property
    def capacity(self) -> int:
        return self.cache.shape[3]


@dataclass(frozen=True)
class Work:
    """A sequence's share of a step: ``tokens`` new tokens (1 to decode; a chunk of its prompt to
    prefill, from ``seq.length``), and whether its last position emits a token (``emit``)."""

    seq: Sequence
    tokens: int
    emit: bool


class Engine:
    """Runs steps of a model (``step``). Not thread-safe; inference mode inside."""

    def __init__(self, model: LlamaModel):
        self.model = model
        p = model.head.weight
        self.device, self.dtype = p.device, p.dtype
        self._sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)

    def new_sequence(self, prompt_tokens: int, output_tokens: int, seed: int = 0) -> Sequence:
        """A sequence with a random prompt of ``prompt_tokens`` and room for its output."""
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, self.model.shape["vocab"], (max(1, prompt_tokens),), generator=g)
        return Sequence(self.model, prompt.to(self.device), max(1, prompt_tokens) + max(1, output_tokens))

    def step(self, work: list) -> list:
        """One iteration over ``work`` (a list of :class:`Work`): appends each one's new tokens to its
        cache (``seq.length`` grows by ``tokens``) and returns the next token of each one that emits
        (greedy), in order, as ints. The device is synchronised before it returns."""
        with torch.inference_mode():
            out = self._step(work)
        self._sync()
        return out

    def _step(self, work: list) -> list:
        m = self.model
        ids, pos, spans = [], [], []
        at = 0
        for w in work:
            s = w.seq
            if w.tokens < 1 or s.length + w.tokens > s.capacity:
                raise ValueError(f"a step of {w.tokens} token(s) at {s.length} does not fit the sequence's "
                                 f"capacity of {s.capacity}")
            if s.length < s.prompt.numel():
                if s.length + w.tokens > s.prompt.numel():
                    raise ValueError("a prefill chunk runs past the prompt")
                ids.append(s.prompt[s.length:s.length + w.tokens])
            else:
                if w.tokens != 1:
                    raise ValueError("a decoding sequence takes one token per step")
                ids.append(torch.tensor([s.last], device=self.device))
            pos.append(torch.arange(s.length, s.length + w.tokens, device=self.device))
            spans.append((at, w.tokens, s))
            at += w.tokens
        x = m.embed(torch.cat(ids))
        ang = torch.cat(pos).float()[:, None] * m.inv_freq[None, :]
        cos, sin = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)
        T = x.shape[0]
        for li, layer in enumerate(m.layers):
            h = layer.norm1(x)
            qkv = layer.qkv(h)
            H, KV, hd = layer.heads, layer.kv_heads, layer.hd
            q = _rotate(qkv[:, :H * hd].view(T, H, hd), cos, sin)
            k = _rotate(qkv[:, H * hd:(H + KV) * hd].view(T, KV, hd), cos, sin)
            v = qkv[:, (H + KV) * hd:].view(T, KV, hd)
            outs = []
            for start, t, s in spans:
                L = s.length
                K, V = s.cache[li, 0], s.cache[li, 1]                   # [KV, capacity, hd]
                K[:, L:L + t] = k[start:start + t].transpose(0, 1)
                V[:, L:L + t] = v[start:start + t].transpose(0, 1)
                qs = q[start:start + t].transpose(0, 1)[None]            # [1, H, t, hd]
                Ks, Vs = K[None, :, :L + t], V[None, :, :L + t]
                if t == 1:     # one new token attends to everything before it: no mask
                    a = F.scaled_dot_product_attention(qs, Ks, Vs, enable_gqa=True)
                elif L == 0:
                    a = F.scaled_dot_product_attention(qs, Ks, Vs, is_causal=True, enable_gqa=True)
                else:          # a later chunk of a prompt: causal, shifted by the context before it
                    mask = torch.ones(t, L + t, dtype=torch.bool, device=x.device).tril(L)
                    a = F.scaled_dot_product_attention(qs, Ks, Vs, attn_mask=mask, enable_gqa=True)
                outs.append(a[0].transpose(0, 1).reshape(t, H * hd))
            x = x + layer.o(torch.cat(outs) if len(outs) > 1 else outs[0])
            gu = layer.gate_up(layer.norm2(x))
            g, u = gu.chunk(2, dim=-1)
            x = x + layer.down(F.silu(g) * u)
        for w in work:
            w.seq.length += w.tokens
        last = [start + t - 1 for (start, t, _), w in zip(spans, work) if w.emit]
        if not last:
            return []
        logits = m.head(m.norm(x[torch.tensor(last, device=x.device)]))
        nxt = logits.argmax(-1).tolist()
        for tok, w in zip(nxt, (w for w in work if w.emit)):
            w.seq.last = int(tok)
        return nxt


def describe(shape: dict) -> str:
    return (f"{shape['params'] / 1e6:.1f}M params: {shape['layers']} layers x {shape['hidden']} hidden, "
            f"{shape['heads']} heads ({shape['kv_heads']} KV), MLP {shape['intermediate']}, vocab {shape['vocab']}")


__all__ = ["FAMILY", "shape_for", "build", "count_params", "kv_bytes_per_token", "LlamaModel", "Sequence",
           "Work", "Engine", "describe"]
