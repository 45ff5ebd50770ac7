"""What a vLLM model accepts, in checkpoint format, so an update is refused before any
weight is touched when names or shapes don't match."""

from __future__ import annotations

import os
from typing import Any

from ckpt_common.safetensors_header import SafetensorsError, expand_source, read_header


def expected_from_model(vllm_config: Any, model: Any) -> dict[str, tuple[int, ...]]:
    """Names and full shapes the model takes in checkpoint format: the model directory's
    safetensors headers (what vLLM loaded at start-up), else the transformers model built on
    the meta device from the engine's own config (no memory); {} when neither works."""
    return _from_headers(vllm_config) or _from_meta_model(vllm_config)


def _from_meta_model(vllm_config: Any) -> dict[str, tuple[int, ...]]:
    try:
        import torch
        from transformers import AutoModelForCausalLM

        hf_config = vllm_config.model_config.hf_config
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(hf_config)
    except Exception:
        return {}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    return {
        k: tuple(v.shape) for k, v in m.state_dict().items() if not (tied and k == "lm_head.weight")
    }


def _from_headers(vllm_config: Any) -> dict[str, tuple[int, ...]]:
    path = getattr(getattr(vllm_config, "model_config", None), "model", "") or ""
    if not path or not os.path.isdir(path):
        return {}
    try:
        files = expand_source(path)
    except (FileNotFoundError, SafetensorsError):
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            tensors, _ = read_header(f)
        except (OSError, SafetensorsError):
            return {}
        out.update({t.name: tuple(t.shape) for t in tensors})
    return out


def packed_names(model: Any) -> set[str]:
    """Checkpoint names derived from the model's parameters: fused modules (qkv_proj,
    gate_up_proj) expanded through packed_modules_mapping."""
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    names: set[str] = set()
    for n, _ in model.named_parameters():
        mod, _, leaf = n.rpartition(".")
        parent, _, last = mod.rpartition(".")
        if last in packed:
            names.update(f"{parent}.{sub}.{leaf}" for sub in packed[last])
        else:
            names.add(n)
    return names


def check_names(
    tensors: list, expected: dict[str, tuple[int, ...]] | None, model: Any, *, partial: bool
) -> str | None:
    """None when the update's names and shapes fit the model, else the first reason they do
    not. Whether a partial update fills whole engine layers is vllm_ext.coverage's check."""
    if expected:
        for t in tensors:
            want = expected.get(t.name)
            if want is None:
                return f"the model has no tensor {t.name!r}"
            if tuple(t.shape) != want:
                return f"tensor {t.name!r} has shape {list(t.shape)}, the model wants {list(want)}"
        if not partial:
            missing = sorted(set(expected) - {t.name for t in tensors})
            if missing:
                return (
                    f"the update lacks {len(missing)} of the model's tensors, e.g. {missing[0]!r}"
                )
        return None
    known = packed_names(model)
    for t in tensors:
        if t.name not in known:
            return f"the model has no tensor {t.name!r}"
    return None
