"""The trainer's side of a direct push: tensors, or pieces of them, copied straight into the
agents' host stores (POSIX shared memory on this node), one copy. CPU tensors are copied in
parallel; GPU tensors go device -> segment directly (the segment is page-locked for the copy
where CUDA allows it), never through a full `.cpu()` copy of the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.dtypes import dtype_name
from ckpt_common.pieces import Piece

CHUNK = 64 << 20


class Item(NamedTuple):
    """What one part pushes of a tensor: the tensor, or its piece (the box `piece` of a
    tensor of shape `shape`; the local tensor has the box's shape)."""

    name: str
    tensor: Any
    shape: tuple[int, ...]
    piece: Piece | None = None


def whole(tensors: Mapping[str, Any]) -> list[Item]:
    return [Item(n, t, tuple(t.shape)) for n, t in tensors.items()]


def tensor_metas(items: Sequence[Item]) -> tuple[list[tpb.TensorMeta], list[Any]]:
    """Wire metadata and each item's bytes as a flat uint8 tensor (on its own device)."""
    import torch

    metas, flats = [], []
    for it in items:
        t = it.tensor.detach()
        flat = t.contiguous().reshape(-1).view(torch.uint8)
        m = tpb.TensorMeta(
            name=it.name, dtype=dtype_name(t.dtype), shape=list(it.shape), nbytes=flat.numel()
        )
        if it.piece is not None:
            if tuple(t.shape) != it.piece.shape:
                raise ValueError(f"{it.name}: local {list(t.shape)} is not the piece's shape")
            m.piece_offset.extend(it.piece.offset)
            m.piece_shape.extend(it.piece.shape)
        metas.append(m)
        flats.append(flat)
    return metas, flats


@contextlib.contextmanager
def _page_locked(view: Any, wanted: bool) -> Iterator[None]:
    """The segment registered with CUDA (pinned) while GPU tensors are copied into it."""
    import torch

    ok = False
    if wanted and view.size:
        rt = torch.cuda.cudart()
        ok = int(rt.cudaHostRegister(view.ctypes.data, view.size, 0)) == 0
    try:
        yield
    finally:
        if ok:
            torch.cuda.cudart().cudaHostUnregister(view.ctypes.data)


def copy_into_segments(plan: cpb.PushPlan, flats: list[Any], *, threads: int = 16) -> None:
    import numpy as np
    import torch

    from ckpt_agent import shm

    mems = [shm.attach(s.segment) for s in plan.segments]
    views = [np.frombuffer(m.buf, dtype=np.uint8) for m in mems]
    host, device = [], []
    for flat, tgt in zip(flats, plan.targets, strict=True):
        for o in range(0, flat.numel(), CHUNK):
            job = (flat[o : o + CHUNK], tgt.segment, tgt.offset + o)
            (host if flat.device.type == "cpu" else device).append(job)

    def put(job: tuple[Any, int, int]) -> None:
        src, seg, at = job
        torch.from_numpy(views[seg][at : at + src.numel()]).copy_(src)

    try:
        with contextlib.ExitStack() as stack:
            for i in range(len(views)):
                stack.enter_context(_page_locked(views[i], bool(device)))
            for job in device:
                put(job)
            with ThreadPoolExecutor(max(1, threads)) as ex:
                list(ex.map(put, host))
            if device:
                torch.cuda.synchronize()
    finally:
        views.clear()
        for m in mems:
            m.close()
