"""The sharding map of one vLLM worker, taken from the engine itself: which part of each
checkpoint tensor this rank keeps.

The model's own `load_weights` runs over zero-storage stand-ins of the checkpoint tensors
(vLLM's `FakeRDTTensor`, which records the ops a weight loader applies to its input:
narrow, chunk, views, indexing) while the parameters sit on the meta device (vLLM's
layerwise-reload set-up), so nothing is read, allocated or changed. Every `copy_` a loader
makes into a parameter is replayed on a meta tensor of the checkpoint tensor's shape: a view
that is a box of the tensor (an offset and an extent per dimension; TP shards of fused
q/k/v and gate/up included, since the loader narrows each checkpoint tensor before copying
it into its section of the fused parameter) is what the rank keeps. A tensor whose loader
does anything else (a transpose, a computation, a copy the recorder cannot attribute) is
kept whole: the engine gets the full tensor and its own loader does the rest (an unknown
name too, so the engine refuses it). A tensor the loader took without copying anything on
this rank (another expert-parallel rank's experts, a buffer it skips) is "none".

The parameters are put back exactly as they were (vLLM's dry-run restore), so this can run
on a serving engine between updates. It leans on vLLM 0.32 internals (the same the
sharded-RDT backend uses); anything unexpected makes every tensor whole, never wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import structlog

from ckpt_common.dtypes import torch_dtype

log = structlog.get_logger("vllm_ext.layout")
WHOLE = "whole"
NONE = "none"  # the loader took the tensor and kept none of it here (another EP rank's expert)


class _Sink:
    """Receives every loader's copy_ of a stand-in; records the source box per name."""

    def __init__(self, full: dict[str, tuple[int, ...]]) -> None:
        self.full = full  # each checkpoint tensor's shape
        self.current: tuple[Any, str] | None = None
        self.boxes: dict[str, list[tuple[tuple[int, ...], tuple[int, ...]] | None]] = {}

    def accept_copy(self, dest: Any, src: Any) -> Any:
        from vllm.distributed.weight_transfer.sharded_rdt_fake import _meta_copy_

        self.boxes.setdefault(src._name, []).append(
            _box_of(src, self.full[src._name])
            if self.current is not None and dest.numel() == src.numel()
            else None
        )
        return _meta_copy_(dest, src)


def _box_of(src: Any, full: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The box of the source tensor that the stand-in's op chain selects, or None."""
    import torch

    v = torch.empty(full, dtype=src.dtype, device="meta")
    try:
        for op, args, kwargs in src._ops:
            v = v[args[0]] if op == "__getitem__" else getattr(v, op)(*args, **dict(kwargs))
    except Exception:
        return None
    return view_box(full, int(v.storage_offset()), tuple(v.shape), tuple(v.stride()))


def view_box(
    full: Sequence[int], offset: int, shape: Sequence[int], stride: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """A strided view into a contiguous tensor of shape `full`, as (offset, shape) of the
    box it covers, or None where it is not a box in the tensor's own dimensions."""
    n = len(full)
    strides = [math.prod(full[d + 1 :]) for d in range(n)]
    if len(shape) != n:
        return None
    if len(stride) != n or any(
        s > 1 and st != strides[d] for d, (s, st) in enumerate(zip(shape, stride, strict=True))
    ):
        return None
    start = []
    rest = offset
    for d in range(n):
        start.append(rest // strides[d] if strides[d] else 0)
        rest -= start[-1] * strides[d]
    if rest or any(o + s > f for o, s, f in zip(start, shape, full, strict=False)):
        return None
    return tuple(start), tuple(int(s) for s in shape)


def _merge(
    full: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]] | None]
) -> Any:
    """One box from a tensor's recorded copies (their bounding box when they tile it)."""
    if any(b is None for b in boxes):
        return WHOLE
    lo = [min(b[0][d] for b in boxes if b) for d in range(len(full))]
    hi = [max(b[0][d] + b[1][d] for b in boxes if b) for d in range(len(full))]
    shape = [h - lo_ for lo_, h in zip(lo, hi, strict=True)]
    if sum(math.prod(b[1]) for b in boxes if b) != math.prod(shape):
        return WHOLE  # overlapping or gapped copies: not one box
    if lo == [0] * len(full) and tuple(shape) == full:
        return WHOLE
    return [lo, shape]


def capture(model: Any, tensors: Sequence[tuple[str, str, Sequence[int]]], device: Any) -> dict:
    """{name: "whole" | [offset, shape] | "none"} for every checkpoint tensor (name, dtype,
    shape): "none" where the model's loader took it and kept nothing of it on this rank."""
    import torch
    from vllm.distributed.weight_transfer.sharded_rdt_engine import (
        ShardedRDTWeightTransferEngine as Rdt,
    )
    from vllm.distributed.weight_transfer.sharded_rdt_fake import FakeRDTTensor
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

    full = {n: tuple(int(s) for s in shape) for n, _, shape in tensors}
    sink = _Sink(full)
    refused: set[str] = set()
    with torch.device(device):
        initialize_layerwise_reload(model)
        try:
            # vLLM's own dry-run set-up and restore (they use neither engine state nor
            # self): each loader stamps sink.current; parameters and loaders put back
            Rdt._install_recording_stamps(None, model, sink)  # type: ignore[arg-type]
            for name, dtype, shape in tensors:
                fake = FakeRDTTensor(name, torch.Size(shape), torch_dtype(dtype), device, sink=sink)
                try:  # one tensor at a time: a loader the recorder cannot follow costs one
                    model.load_weights([(name, fake)])
                except Exception as e:
                    refused.add(name)
                    log.info("layout_whole", tensor=name, why=f"{type(e).__name__}: {e}"[:200])
        finally:
            Rdt._restore_after_dry_run(None, model)  # type: ignore[arg-type]
    out = dict.fromkeys(full, NONE)  # accepted, nothing copied: this rank keeps none of it
    out.update({n: _merge(full[n], b) for n, b in sink.boxes.items()})
    out.update(dict.fromkeys(refused, WHOLE))
    return out
