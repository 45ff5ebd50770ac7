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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common import checksum, progress
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
        room = 0  # the store's bytes: never the progress mark after them
        if inside:
            room = min(hosts[t.segment].numel() - progress.TRAILER, plan.segments[t.segment].nbytes)
        if not inside or t.offset + n > room:
            raise ValueError(f"target {i} ({n} bytes at {t.offset}) lies outside its segment")
        out.append(hosts[t.segment][t.offset : t.offset + n])
    return out


def _sum_into(sums: list[int], i: int, src: Any) -> None:
    """The checksum of a non-CUDA source at index i (numpy releases the GIL)."""
    cpu = src.device.type == "cpu"
    sums[i] = checksum.of_numpy(src.numpy()) if cpu else checksum.of_torch(src)


def _copy_cpu(
    jobs: list[tuple[int, Any, Any]], threads: int, sums: list[int] | None,
    done: Callable[[int, int], None] | None = None,
) -> None:  # fmt: skip
    """Copies CPU (or other non-CUDA) sources (index, src, dst) in CHUNK pieces on a thread
    pool, in the order given; with sums, puts each item's checksum at its index; with done,
    calls done(index, offset) as each piece is in."""

    if not jobs:
        return

    def put(i: int, o: int, src: Any, dst: Any) -> None:
        dst.copy_(src)
        if done is not None:
            done(i, o)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="push-copy") as ex:
        futs = [
            ex.submit(put, i, o, src[o : o + CHUNK], dst[o : o + CHUNK])
            for i, src, dst in jobs
            for o in range(0, src.numel(), CHUNK)
        ]
        if sums is not None:
            futs += [ex.submit(_sum_into, sums, i, src) for i, src, _ in jobs]
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


def item_checksums(flats: Sequence[Any], threads: int = 16) -> list[int]:
    """Each item's checksum where its bytes are (GPU: one launch per device; CPU: threads),
    before any copy: declared at BeginPush, they let an update stream from the push."""
    out = [0] * len(flats)
    gpu = [(i, f, None) for i, f in enumerate(flats) if f.device.type == "cuda"]
    launched = _gpu_sums(gpu) if gpu else []
    cpu = [(i, f) for i, f in enumerate(flats) if f.device.type != "cuda"]
    if cpu:
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="push-sum") as ex:
            for f in [ex.submit(_sum_into, out, i, src) for i, src in cpu]:
                f.result()
    _finish_sums(launched, flats, out)
    return out


def _finish_sums(
    launched: list[tuple[list[int], Any]], flats: Sequence[Any], out: list[int]
) -> None:
    """Waits for launched GPU checksums (_gpu_sums) and puts each at its item's index."""
    for idx, parts in launched:
        got = checksum.finish_many([flats[i].numel() for i in idx], parts)
        for i, c in zip(idx, got, strict=True):
            out[i] = c


def _marked_write(
    plan: cpb.PushPlan, flats: list[Any], dsts: list[Any], hosts: list[Any], threads: int,
    streams: int,
) -> None:  # fmt: skip
    """Copies the items in store order and raises each segment's progress mark as its
    bytes land (ckpt_common.progress), then sets every mark to DONE: an update streaming
    from this push reads each bucket as soon as it is in."""
    from ckptctl import d2h

    tg = plan.targets
    order = sorted(range(len(flats)), key=lambda i: (tg[i].segment, tg[i].offset))
    gpu = [i for i in order if flats[i].device.type == "cuda"]
    cpu = [i for i in order if flats[i].device.type != "cuda"]
    on_gpu = set(gpu)
    keys = [
        (i, o, min(unit, flats[i].numel() - o))
        for i in order
        for unit in [d2h.SPLIT if i in on_gpu else CHUNK]
        for o in range(0, flats[i].numel(), unit)
    ]
    index = {(i, o): k for k, (i, o, _) in enumerate(keys)}
    words = [h.numpy() for h in hosts]
    marks = progress.Marks(
        [(tg[i].segment, tg[i].offset + o + n) for i, o, n in keys],
        lambda seg, v: progress.write(words[seg], v),
    )
    pending = d2h.start([(flats[i], dsts[i]) for i in gpu], streams, ordered=True)
    try:
        _copy_cpu(
            [(i, flats[i], dsts[i]) for i in cpu], threads, None,
            lambda i, o: marks.complete(index[(i, o)]),
        )  # fmt: skip
        pending.done_in_order(lambda j, o, n: marks.complete(index[(gpu[j], o)]))
    finally:
        pending.wait()
    marks.finish(len(hosts))


def write_items(
    plan: cpb.PushPlan, flats: list[Any], cache: Any, *, threads: int = 16,
    streams: int = 4, sums: bool = True, marked: bool = False,
) -> tuple[list[int], WriteStats]:  # fmt: skip
    """Copies each item's bytes (flats, in plan.targets' order) into its segment; returns
    their checksums (empty without sums) and what it took. cache: a ckptctl.segments
    SegmentCache (the segments stay mapped, and pinned, for the next push). marked: in
    store order, with progress marks, for an update streaming from the push (no sums: they
    were declared at BeginPush)."""
    from ckptctl import d2h

    t0 = time.monotonic()
    gpu = [i for i, f in enumerate(flats) if f.device.type == "cuda"]
    pinned = cache.stats.pinned
    maps = cache.acquire([s.segment for s in plan.segments], pin=bool(gpu))
    t1 = time.monotonic()
    out: list[int] | None = [0] * len(flats) if sums and not marked else None
    pending = None
    try:
        dsts = _targets(plan, flats, [m.host for m in maps])
        if marked:
            _marked_write(plan, flats, dsts, [m.host for m in maps], threads, streams)
        else:
            jobs = [(i, flats[i], dsts[i]) for i in range(len(flats))]
            on_gpu = [jobs[i] for i in gpu]
            pending = d2h.start([(src, dst) for _, src, dst in on_gpu], streams)
            launched = _gpu_sums(on_gpu) if sums and on_gpu else []
            _copy_cpu([j for j in jobs if j[1].device.type != "cuda"], threads, out)
            pending.wait()
            if out is not None:
                _finish_sums(launched, flats, out)
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
