"""Synthetic models for calibration: an encoder (BERT-like) and a decoder
(GPT-like, causal, with an incremental KV-cached decode step).

Models are sized by a target parameter count ("10M", "50M", "1.3B"): the width
comes from a ladder and the depth is chosen to hit the target (see `shape_for`).
Weights are random; the models exist to be saved, loaded and timed, not to be
accurate.  The vocabulary is small (8192) so that most parameters sit in the
transformer layers, where the compute is: the per-token cost then scales with
the size label.

Parameter count of one layer (both families, FFN width 4d):
    attention 4d^2 + 4d, FFN 8d^2 + 5d, two LayerNorms 4d  ->  12 d^2 + 13 d.
Encoder extra: token + position embeddings (V + P) d, embedding LN 2d.
Decoder extra: token + position embeddings (V + P) d, final LN 2d and an
untied LM head V d (untied because safetensors refuses shared tensors).
"""
from __future__ import annotations

import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("encoder", "decoder")
VOCAB = 8192
ENCODER_MAX_POS = 512
DECODER_MAX_POS = 2048
WIDTH_LADDER = (64, 128, 192, 256, 320, 384, 512, 640, 768, 1024, 1280, 1536,
                2048, 2560, 3072, 4096, 5120, 6144, 8192)
# Depth cap as a function of width (aspect ratio d/L >= 48): close to the
# BERT-mini/small and GPT-3 ladder (125M: 768x12, 1.3B: 2048x24).
ASPECT = 48

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*$")
_MULT = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_size(label: str) -> int:
    """'50M' -> 50_000_000, '1.3B' -> 1_300_000_000, '800k' -> 800_000."""
    m = _SIZE_RE.match(str(label))
    if not m:
        raise ValueError(f"bad model size {label!r}: expected e.g. 10M, 50M, 1.3B")
    n = int(round(float(m.group(1)) * _MULT[m.group(2).lower()]))
    if n < 100_000:
        raise ValueError(f"model size {label!r} too small (minimum 100k parameters)")
    return n


def size_label(n: int) -> str:
    """Canonical label for a parameter count (inverse of parse_size, roughly)."""
    for unit, mult in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= mult:
            v = n / mult
            return (f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:g}") + unit
    return str(n)


def _layer_params(d: int) -> int:
    return 12 * d * d + 13 * d


def _extra_params(family: str, d: int) -> int:
    if family == "encoder":
        return (VOCAB + ENCODER_MAX_POS) * d + 2 * d
    if family == "decoder":
        return (VOCAB + DECODER_MAX_POS) * d + 2 * d + VOCAB * d
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


def shape_for(family: str, target: int) -> dict:
    """Choose (d_model, n_layers, n_heads) for a target parameter count: the
    smallest width of the ladder whose depth (rounded, >= 1) is <= d/ASPECT."""
    chosen = None
    for d in WIDTH_LADDER:
        rest = target - _extra_params(family, d)
        layers = max(1, int(round(rest / _layer_params(d)))) if rest > 0 else 1
        chosen = (d, layers)
        if layers <= max(1, d // ASPECT):
            break
    d, layers = chosen
    heads = max(1, d // 64)
    params = _extra_params(family, d) + layers * _layer_params(d)
    return {"family": family, "d_model": d, "n_layers": layers, "n_heads": heads,
            "vocab": VOCAB, "params": params}


class EncoderModel(nn.Module):
    """BERT-like: token + position embeddings, LayerNorm, N post-norm encoder
    layers (torch.nn.TransformerEncoderLayer, GELU), first-token pooling."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, vocab: int = VOCAB,
                 max_pos: int = ENCODER_MAX_POS):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_pos, d_model)
        self.ln = nn.LayerNorm(d_model)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0,
                                           activation="gelu", batch_first=True)
        self.layers = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.max_pos = max_pos

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.tok(ids) + self.pos(pos))
        x = self.layers(x)
        return x[:, 0]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x, cache=None, pos: int = 0):
        """x: [B, T, d]. cache: (K, V) preallocated [B, H, maxlen, hd] or None.
        pos: number of positions already in the cache."""
        B, T, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            K, V = cache
            K[:, :, pos:pos + T] = k
            V[:, :, pos:pos + T] = v
            if T == 1:  # one new token attends to everything before it: no mask
                a = F.scaled_dot_product_attention(q, K[:, :, :pos + 1], V[:, :, :pos + 1])
            elif pos == 0:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(pos)
                a = F.scaled_dot_product_attention(q, K[:, :, :pos + T], V[:, :, :pos + T],
                                                   attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x


class DecoderModel(nn.Module):
    """GPT-like pre-norm causal decoder with an incremental decode step.

    `prefill(ids, cache)` runs the prompt and fills a preallocated KV cache;
    `decode_step(tok, cache, pos)` runs ONE new token against the cached
    context (cost per output token); `generate(ids, n_out)` does both with
    greedy sampling."""

    def __init__(self, d_model: int, n_layers: int, n_heads: int, vocab: int = VOCAB,
                 max_pos: int = DECODER_MAX_POS):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_pos, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.d, self.h, self.max_pos = d_model, n_heads, max_pos

    def new_cache(self, batch: int, length: int, device=None, dtype=None):
        p = self.head.weight
        shape = (batch, self.h, length, self.d // self.h)
        return [(torch.empty(shape, device=device or p.device, dtype=dtype or p.dtype),
                 torch.empty(shape, device=device or p.device, dtype=dtype or p.dtype))
                for _ in self.blocks]

    def _run(self, ids, cache, pos):
        T = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(pos, pos + T, device=ids.device))
        for blk, c in zip(self.blocks, cache if cache is not None else [None] * len(self.blocks)):
            x = blk(x, c, pos)
        return self.head(self.ln_f(x[:, -1]))

    def forward(self, ids):  # full causal pass, no cache
        return self._run(ids, None, 0)

    def prefill(self, ids, cache):
        return self._run(ids, cache, 0)

    def decode_step(self, tok, cache, pos: int):
        return self._run(tok.view(-1, 1), cache, pos)

    def generate(self, ids: torch.Tensor, n_out: int) -> torch.Tensor:
        B, T = ids.shape
        if T + n_out > self.max_pos:
            raise ValueError(f"sequence {T}+{n_out} exceeds max positions {self.max_pos}")
        cache = self.new_cache(B, T + n_out)
        logits = self.prefill(ids, cache)
        tok = logits.argmax(-1)
        out = [tok]
        for i in range(1, n_out):
            logits = self.decode_step(tok, cache, T + i - 1)
            tok = logits.argmax(-1)
            out.append(tok)
        return torch.stack(out, 1)


def check_device(device: str) -> None:
    """Raise ValueError unless ``device`` ("cpu", "cuda" or "cuda:N") is usable here."""
    kind, _, index = device.partition(":")
    if kind == "cpu" and not index:
        return
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but torch.cuda.is_available() is False")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def build(shape: dict, device="cpu", dtype=torch.float32) -> nn.Module:
    """Construct a module with default (random) initialisation."""
    cls = EncoderModel if shape["family"] == "encoder" else DecoderModel
    with torch.device(device):
        m = cls(shape["d_model"], shape["n_layers"], shape["n_heads"], shape["vocab"])
    return m.to(dtype=dtype).eval()


def count_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def save(model: nn.Module, workdir: str, stem: str, safetensors_ok: bool = True) -> dict:
    """Save a model as safetensors and as a torch state dict (fsync'd, so that
    the page cache can drop the pages afterwards). Returns the paths."""
    os.makedirs(workdir, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out = {}
    if safetensors_ok:
        from safetensors.torch import save_file
        p = os.path.join(workdir, stem + ".safetensors")
        save_file(sd, p)
        out["safetensors"] = p
    p = os.path.join(workdir, stem + ".pt")
    torch.save(sd, p)
    out["torch"] = p
    for p in out.values():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return out


def random_ids(batch: int, seq: int, device="cpu", seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g).to(device)


def param_bytes(shape: dict, dtype=torch.float32) -> int:
    return shape["params"] * torch.empty((), dtype=dtype).element_size()


def approx_flops_per_token(shape: dict) -> float:
    return 2.0 * shape["params"]


__all__ = ["FAMILIES", "parse_size", "size_label", "shape_for", "build", "save",
           "EncoderModel", "DecoderModel", "random_ids", "count_params"]
