"""What an engine rank keeps of a version's tensors (pure): a `Keep` is the tensor, and the
dimension it is narrowed on with its start and length (dim -1: the whole tensor), read from
the rank's sharding map (vllm_ext.layout); the part of a stored tensor a keep names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from ckpt_common.pieces import Piece
from ckpt_daemon.model import TensorInfo
from ckpt_daemon.plan.placement import PlanError


class Keep(NamedTuple):
    name: str
    dim: int = -1  # -1: the whole tensor
    start: int = 0
    length: int = 0


def keeps_of(layout: Mapping[str, Any], tensors: Sequence[TensorInfo]) -> list[Keep]:
    """A rank's keeps among the tensors of an update, from its sharding map (vllm_ext.layout:
    {name: "whole" | [offset, shape]}), in the tensors' order. A box narrowed on one
    dimension is a part; narrowed on none, or on several, the tensor is kept whole (the
    engine's loader narrows it). "none" (or a name the map lacks): not kept. A malformed map:
    PlanError."""
    out: list[Keep] = []
    for t in tensors:
        box = layout.get(t.name)
        if box is None or box == "none":
            continue
        if box == "whole":
            out.append(Keep(t.name))
            continue
        try:
            off, shape = ([int(x) for x in v] for v in box)
        except (TypeError, ValueError):
            raise PlanError(f"the sharding map of {t.name!r} is malformed: {box!r:.80}") from None
        n = len(t.shape)
        if (
            len(off) != n
            or len(shape) != n
            or any(
                o < 0 or s <= 0 or o + s > f for o, s, f in zip(off, shape, t.shape, strict=True)
            )
        ):
            raise PlanError(f"the sharding map of {t.name!r} lies outside its shape {t.shape}")
        narrowed = [d for d in range(n) if off[d] != 0 or shape[d] != t.shape[d]]
        if len(narrowed) == 1:
            d = narrowed[0]
            out.append(Keep(t.name, d, off[d], shape[d]))
        else:
            out.append(Keep(t.name))
    return out


def part_nbytes(t: TensorInfo, k: Keep) -> int:
    return t.nbytes if k.dim < 0 else t.nbytes // t.shape[k.dim] * k.length


def part_of(t: TensorInfo, k: Keep) -> TensorInfo:
    """The stored tensor t narrowed to a keep: the entry a shard-aware plan reads."""
    if k.dim < 0:
        return t
    off = [0] * len(t.shape)
    shape = list(t.shape)
    off[k.dim], shape[k.dim] = k.start, k.length
    return replace(
        t, nbytes=part_nbytes(t, k), checksum=None, piece=Piece(tuple(off), tuple(shape))
    )
