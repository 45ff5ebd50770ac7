"""Synthetic Llama-3-8B-shaped bf16 checkpoint: the layer count scales to the size asked."""

from __future__ import annotations

import math

H, KV, FFN, VOCAB = 4096, 1024, 14336, 128256
LAYER = [
    ("self_attn.q_proj.weight", (H, H)),
    ("self_attn.k_proj.weight", (KV, H)),
    ("self_attn.v_proj.weight", (KV, H)),
    ("self_attn.o_proj.weight", (H, H)),
    ("mlp.gate_proj.weight", (FFN, H)),
    ("mlp.up_proj.weight", (FFN, H)),
    ("mlp.down_proj.weight", (H, FFN)),
    ("input_layernorm.weight", (H,)),
    ("post_attention_layernorm.weight", (H,)),
]


def specs(size_gib: float) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in bf16; 32 layers + embeddings + lm_head = 8.03e9 params = 14.96 GiB."""
    layer_bytes = sum(math.prod(s) for _, s in LAYER) * 2
    ends = (2 * VOCAB * H + H) * 2
    target = size_gib * (1 << 30)
    with_ends = target >= 2 * ends
    n = max(1, round((target - (ends if with_ends else 0)) / layer_bytes))
    out: list[tuple[str, tuple[int, ...]]] = []
    if with_ends:
        out.append(("model.embed_tokens.weight", (VOCAB, H)))
    for i in range(n):
        out += [(f"model.layers.{i}.{name}", s) for name, s in LAYER]
    if with_ends:
        out += [("model.norm.weight", (H,)), ("lm_head.weight", (VOCAB, H))]
    return out


def fill_value(i: int) -> float:
    """Exactly representable in bf16, distinct per tensor (mod 255)."""
    return float((i % 255) + 1) / 8.0


def total_bytes(sp: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(s) * 2 for _, s in sp)
