"""The engine side of a push in pieces: the checks that an update's pieces tile each tensor
and that what a rank keeps fits it, and the assembly of a tensor from its pieces as their
buckets arrive."""

from __future__ import annotations

from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.dtypes import torch_dtype
from ckpt_common.pieces import piece_of, region, tiling_problem


def pieces_problem(tensors: list[tpb.TensorMeta]) -> str | None:
    """Why the update's pieces (TensorMeta.piece_*) do not make their tensors whole, or None."""
    bad = tiling_problem(
        (m.name, m.dtype, m.shape, piece_of(m.piece_offset, m.piece_shape)) for m in tensors
    )
    return None if bad is None else f"tensor {bad[0]!r}: {bad[1]}"


def kept_problem(
    tensors: list[tpb.TensorMeta], layout: dict[str, Any], partial: bool
) -> str | None:
    """Why the parts of a shard-aware update are not what this rank keeps (its layout has
    changed since ckptd planned), or None."""
    got = set()
    for m in tensors:
        mine = layout.get(m.name)
        p = piece_of(m.piece_offset, m.piece_shape)
        if mine is None or mine == "none":
            return f"tensor {m.name!r}: this rank keeps none of it"
        if p is not None and mine != [list(p.offset), list(p.shape)]:
            return (
                f"tensor {m.name!r}: sent {list(p.offset)}+{list(p.shape)}, this rank keeps {mine}"
            )
        got.add(m.name)
    if not partial:
        missing = sorted(n for n, box in layout.items() if box != "none" and n not in got)
        if missing:
            return f"{len(missing)} tensors this rank keeps are missing, e.g. {missing[0]!r}"
    return None


class Assembly:
    """Pieces of tensors copied into the whole tensor; each whole handed over once its last
    piece came. Whole tensors pass through untouched.

    Kept parts (a shard-aware update: each piece is the part this rank keeps) are handed
    over one by one, each in a tensor of the full shape of which only the part is written:
    the engine's loader narrows it to exactly that part (the layout says so), and nothing
    else of it is read."""

    def __init__(
        self, tensors: list[tpb.TensorMeta], kept: bool = False, as_parts: bool = False
    ) -> None:
        self._left: dict[str, int] = {}  # name -> piece bytes still to come
        self._kept = kept
        self._as_parts = kept and as_parts  # hand kept parts over as they are (their box)
        for m in tensors:
            if m.piece_shape or m.piece_offset:
                self._left[m.name] = self._left.get(m.name, 0) + m.nbytes
        self._whole: dict[str, Any] = {}

    @property
    def waiting(self) -> int:
        return len(self._whole)

    def add(self, meta: tpb.TensorMeta, raw: Any, copy: bool) -> list[tuple[Any, Any, bool]]:
        """(meta, raw bytes, copy) of what is now complete: the tensor, or nothing yet."""
        p = piece_of(meta.piece_offset, meta.piece_shape)
        if p is None:
            return [(meta, raw, copy)]
        if self._as_parts:
            part = tpb.TensorMeta(name=meta.name, dtype=meta.dtype, shape=p.shape)
            part.nbytes = meta.nbytes
            return [(part, raw, copy)]
        import torch

        dt = torch_dtype(meta.dtype)
        whole = self._whole.get(meta.name)
        if whole is None:
            whole = torch.empty(tuple(meta.shape), dtype=dt, device=raw.device)
            self._whole[meta.name] = whole
        whole[region(p)].copy_(raw.view(dt).reshape(p.shape))
        self._left[meta.name] -= meta.nbytes
        if self._left[meta.name] > 0 and not self._kept:
            return []
        del self._whole[meta.name]
        m = tpb.TensorMeta(name=meta.name, dtype=meta.dtype, shape=meta.shape)
        m.nbytes = whole.numel() * whole.element_size()
        return [(m, whole.reshape(-1).view(torch.uint8), False)]
