"""Test checkpoints: mixed dtypes, odd shapes, Llama-like names; sha256 of each tensor."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()


def mixed_tensors(seed: int, layers: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(97, 48, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.randn(48, generator=g),
        "lm_head.weight": torch.randn(97, 48, generator=g).to(torch.float16),
        "model.scalar": torch.randn((), generator=g),
        "model.empty": torch.zeros(0, 5),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}.self_attn.qkv_proj.weight"] = torch.randn(144, 48, generator=g).to(torch.bfloat16)
        out[f"{p}.self_attn.o_proj.weight"] = torch.randn(48, 48, generator=g).to(torch.float16)
        out[f"{p}.mlp.up_proj.weight"] = (torch.randn(131, 48, generator=g) * 50).to(
            torch.float8_e4m3fn
        )
        out[f"{p}.mlp.down_proj.weight"] = torch.randint(
            -128, 127, (48, 131), generator=g, dtype=torch.int8
        )
        out[f"{p}.input_layernorm.weight"] = torch.randn(48, generator=g)
        out[f"{p}.odd"] = torch.randn(3, 5, 7, generator=g)
    return out


def write_sharded(tensors: dict[str, torch.Tensor], directory: Path, shards: int = 2) -> Path:
    """A directory with model.safetensors.index.json and `shards` files."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / fname))
        weight_map.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


def digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: sha(t) for n, t in tensors.items()}


def delta_meta(name: str, base: torch.Tensor, target: torch.Tensor, enc: Any) -> Any:
    """The TensorMeta an engine receives for `enc` (a ckpt_common.delta.Encoded from base
    to target, version 1 to the next), with both checksums."""
    from ckpt.v1 import types_pb2 as tpb
    from ckpt_common import checksum
    from ckpt_common.dtypes import dtype_name

    m = tpb.TensorMeta(name=name, dtype=dtype_name(target.dtype), shape=list(target.shape))
    m.nbytes = enc.payload.numel()
    b8, t8 = (x.reshape(-1).view(torch.uint8) for x in (base, target))
    m.delta.CopyFrom(
        tpb.DeltaMeta(base_version=1, encoding=int(enc.encoding), count=enc.count,
                      base_checksum=checksum.of_torch(b8), target_checksum=checksum.of_torch(t8),
                      target_nbytes=t8.numel())
    )  # fmt: skip
    return m
