"""The trainer's side of a direct push: tensors, or pieces of them, copied straight into the
agents' host stores (POSIX shared memory on this node), one copy, and checksummed where
their bytes are.

CPU tensors are copied by a thread pool; GPU tensors go device -> segment directly as large
async copies over several streams (ckptctl.d2h) into segments page-locked once per process
and kept (ckptctl.segments), never through a full `.cpu()` copy of the model. Each item's
ckpt_common.checksum is computed from the trainer's own bytes (on the GPU for GPU tensors,
one launch while the copies run) and sent with CommitPush: no pass over the host stores."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common import checksum
from ckpt_common.dtypes import dtype_name
from ckpt_common.pieces import Piece

CHUNK = 64 << 20  # bytes per copy of a CPU tensor (the thread pool's unit)


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


def warm_gpu() -> None:
    """Compiles (or loads) the GPU checksum kernel on the current device now, not inside the
    first push (Triton builds it on first use)."""
    import torch

    if torch.cuda.is_available():
        t = torch.zeros(1 << 16, dtype=torch.uint8, device="cuda")
        checksum.finish_many([t.numel()], checksum.launch_parts([t]))


@dataclass(frozen=True, kw_only=True)
class WriteStats:
    """What one part's write took (seconds, from this process's clock)."""

    map_s: float  # mapping (and page-locking, for segments not seen before) the segments
    copy_s: float  # the copies and checksums, until all were done
    bytes: int
    newly_pinned: int  # segments page-locked by this write (0 once the ring is warm)


def _targets(plan: cpb.PushPlan, flats: Sequence[Any], hosts: Sequence[Any]) -> list[Any]:
    """Each item's destination: a view of its segment, checked to lie inside it."""
    out = []
    for i, (flat, t) in enumerate(zip(flats, plan.targets, strict=True)):
        n = flat.numel()
        inside = 0 <= t.segment < len(hosts) and t.offset >= 0
        if not inside or t.offset + n > hosts[t.segment].numel():
            raise ValueError(f"target {i} ({n} bytes at {t.offset}) lies outside its segment")
        out.append(hosts[t.segment][t.offset : t.offset + n])
    return out


def _copy_cpu(jobs: list[tuple[int, Any, Any]], threads: int, sums: list[int] | None) -> None:
    """Copies CPU (or other non-CUDA) sources (index, src, dst) in CHUNK pieces on a thread
    pool and, with sums, puts each item's checksum (numpy releases the GIL) at its index."""

    if not jobs:
        return

    def put(job: tuple[Any, Any]) -> None:
        job[1].copy_(job[0])

    def one_sum(job: tuple[int, Any, Any]) -> None:
        assert sums is not None
        src = job[1]
        cpu = src.device.type == "cpu"
        sums[job[0]] = checksum.of_numpy(src.numpy()) if cpu else checksum.of_torch(src)

    chunks = [
        (src[o : o + CHUNK], dst[o : o + CHUNK])
        for _, src, dst in jobs
        for o in range(0, src.numel(), CHUNK)
    ]
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="push-copy") as ex:
        futs = [ex.submit(put, c) for c in chunks]
        if sums is not None:
            futs += [ex.submit(one_sum, j) for j in jobs]
        for f in futs:
            f.result()


def _gpu_sums(jobs: list[tuple[int, Any, Any]]) -> list[tuple[list[int], Any]]:
    """Launches the checksums of GPU sources, per device on its current stream (no wait):
    (indices, [n, 4] sums) per device."""
    import torch

    by_dev: dict[Any, list[tuple[int, Any]]] = {}
    for i, src, _ in jobs:
        by_dev.setdefault(src.device, []).append((i, src))
    out = []
    for dev, items in by_dev.items():
        with torch.cuda.device(dev):
            out.append(([i for i, _ in items], checksum.launch_parts([t for _, t in items])))
    return out


def write_items(
    plan: cpb.PushPlan, flats: list[Any], cache: Any, *, threads: int = 16,
    streams: int = 4, sums: bool = True,
) -> tuple[list[int], WriteStats]:  # fmt: skip
    """Copies each item's bytes (flats, in plan.targets' order) into its segment; returns
    their checksums (empty without sums) and what it took. cache: a ckptctl.segments
    SegmentCache (the segments stay mapped, and pinned, for the next push)."""
    from ckptctl import d2h

    t0 = time.monotonic()
    gpu = [i for i, f in enumerate(flats) if f.device.type == "cuda"]
    pinned = cache.stats.pinned
    maps = cache.acquire([s.segment for s in plan.segments], pin=bool(gpu))
    t1 = time.monotonic()
    out: list[int] | None = [0] * len(flats) if sums else None
    pending = None
    try:
        dsts = _targets(plan, flats, [m.host for m in maps])
        jobs = [(i, flats[i], dsts[i]) for i in range(len(flats))]
        on_gpu = [jobs[i] for i in gpu]
        pending = d2h.start([(src, dst) for _, src, dst in on_gpu], streams)
        launched = _gpu_sums(on_gpu) if sums and on_gpu else []
        _copy_cpu([j for j in jobs if j[1].device.type != "cuda"], threads, out)
        pending.wait()
        for idx, parts in launched:
            got = checksum.finish_many([flats[i].numel() for i in idx], parts)
            for i, c in zip(idx, got, strict=True):
                out[i] = c  # type: ignore[index]
    finally:
        if pending is not None:
            pending.wait()
        dsts = jobs = on_gpu = []  # no view of a segment outlives the hold
        cache.release(maps)
    stats = WriteStats(
        map_s=t1 - t0, copy_s=time.monotonic() - t1, bytes=sum(f.numel() for f in flats),
        newly_pinned=cache.stats.pinned - pinned,
    )  # fmt: skip
    return out or [], stats
