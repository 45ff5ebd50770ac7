"""The trainer's side of a direct push: tensors copied straight into the agents' host
stores (POSIX shared memory on this node), in parallel, one copy."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.dtypes import dtype_name

CHUNK = 64 << 20


def tensor_metas(tensors: Any) -> tuple[list[tpb.TensorMeta], list[Any]]:
    """Wire metadata and each tensor's bytes as a flat uint8 numpy array."""
    import torch

    metas, flats = [], []
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        flat = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        metas.append(
            tpb.TensorMeta(
                name=name, dtype=dtype_name(t.dtype), shape=list(t.shape), nbytes=flat.size
            )
        )
        flats.append(flat)
    return metas, flats


def copy_into_segments(plan: cpb.PushPlan, flats: list[Any], *, threads: int = 16) -> None:
    import numpy as np

    from ckpt_agent import shm

    mems = [shm.attach(s.segment) for s in plan.segments]
    views = [np.frombuffer(m.buf, dtype=np.uint8) for m in mems]
    jobs = []
    for flat, tgt in zip(flats, plan.targets, strict=True):
        for o in range(0, flat.size, CHUNK):
            jobs.append((flat[o : o + CHUNK], tgt.segment, tgt.offset + o))

    def put(job: tuple[Any, int, int]) -> None:
        src, seg, at = job
        np.copyto(views[seg][at : at + src.size], src)

    try:
        with ThreadPoolExecutor(max(1, threads)) as ex:
            list(ex.map(put, jobs))
    finally:
        views.clear()
        for m in mems:
            m.close()
