"""The trainer's side of a direct push: tensors, or pieces of them, copied straight into the
agents' host stores (POSIX shared memory on this node), one copy, and checksummed where
their bytes are.

CPU tensors are copied by a thread pool; GPU tensors go device -> segment directly as large
async copies over several streams (ckpt_client.d2h) into segments page-locked once per process
and kept (ckpt_client.segments), never through a full `.cpu()` copy of the model. Each item's
ckpt_common.checksum is computed from the trainer's own bytes (on the GPU for GPU tensors,
one launch while the copies run) and sent with CommitPush: no pass over the host stores."""

from __future__ import annotations

import math
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
    part_sums: tuple[int, ...] = ()  # the checksums of plan.parts, in order


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


PART_BATCH = 1 << 30  # bytes of contiguous part copies checksummed per GPU launch


def _part_view(flat: Any, shape: Sequence[int], p: cpb.PartWanted) -> Any:
    """The bytes of a part of a whole tensor (flat: its bytes, row-major), contiguous."""
    if not shape or not 0 <= p.dim < len(shape) or p.start < 0 or p.length < 1:
        raise ValueError(f"part {p} does not fit a tensor of shape {list(shape)}")
    if p.start + p.length > shape[p.dim]:
        raise ValueError(f"part {p} lies outside a tensor of shape {list(shape)}")
    es = flat.numel() // max(1, math.prod(shape))
    b = flat.view(*shape[:-1], shape[-1] * es)
    last = p.dim == len(shape) - 1
    part = b.narrow(p.dim, p.start * (es if last else 1), p.length * (es if last else 1))
    return part.contiguous().reshape(-1)


def launch_part_sums(
    parts: Sequence[cpb.PartWanted], flats: Sequence[Any], shapes: Sequence[Sequence[int]]
) -> Callable[[], list[int]]:
    """Starts the checksums of the parts ckptd asked for (PushPlan.parts) where the bytes
    are: GPU parts copied contiguous and summed in launches of up to PART_BATCH bytes, on the
    current stream (after the D2H copies were queued, so they do not wait for this); CPU
    parts at once. Returns what waits for them and gives them in order."""
    out = [0] * len(parts)
    launched: list[tuple[list[int], Any]] = []
    batch: list[tuple[int, Any]] = []

    def flush() -> None:
        if batch:
            launched.append(([i for i, _ in batch], checksum.launch_parts([v for _, v in batch])))
            batch.clear()

    for k, p in enumerate(parts):
        if not 0 <= p.tensor < len(flats):
            raise ValueError(f"part {k} names tensor {p.tensor} of {len(flats)}")
        view = _part_view(flats[p.tensor], shapes[p.tensor], p)
        if view.device.type != "cuda":
            out[k] = checksum.of_numpy(view.numpy())
            continue
        if batch and (view.device != batch[0][1].device or sum(
            v.numel() for _, v in batch) + view.numel() > PART_BATCH
        ):  # fmt: skip
            flush()
        batch.append((k, view))
    flush()

    def finish() -> list[int]:
        for idx, got in launched:
            sums = checksum.finish_many([_part_len(parts[i], flats, shapes) for i in idx], got)
            for i, c in zip(idx, sums, strict=True):
                out[i] = c
        return out

    return finish


def _part_len(p: cpb.PartWanted, flats: Sequence[Any], shapes: Sequence[Sequence[int]]) -> int:
    shape = shapes[p.tensor]
    return flats[p.tensor].numel() // shape[p.dim] * p.length


def _marked_write(
    plan: cpb.PushPlan, flats: list[Any], dsts: list[Any], hosts: list[Any], threads: int,
    streams: int, started: Callable[[], None],
) -> None:  # fmt: skip
    """Copies the items in store order and raises each segment's progress mark as its
    bytes land (ckpt_common.progress), then sets every mark to DONE: an update streaming
    from this push reads each bucket as soon as it is in."""
    from ckpt_client import d2h

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
        started()
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
    shapes: Sequence[Sequence[int]] = (),
) -> tuple[list[int], WriteStats]:  # fmt: skip
    """Copies each item's bytes (flats, in plan.targets' order) into its segment; returns
    their checksums (empty without sums) and what it took. cache: a ckpt_client.segments
    SegmentCache (the segments stay mapped, and pinned, for the next push). marked: in
    store order, with progress marks, for an update streaming from the push (no sums: they
    were declared at BeginPush). shapes: each item's (whole) tensor shape, for the part
    checksums ckptd asked for (plan.parts; WriteStats.part_sums), taken while the copies
    run."""
    from ckpt_client import d2h

    t0 = time.monotonic()
    gpu = [i for i, f in enumerate(flats) if f.device.type == "cuda"]
    pinned = cache.stats.pinned
    maps = cache.acquire([s.segment for s in plan.segments], pin=bool(gpu))
    t1 = time.monotonic()
    out: list[int] | None = [0] * len(flats) if sums and not marked else None
    pending = None
    finish: list[Callable[[], list[int]]] = []

    def parts() -> None:
        if plan.parts:
            finish.append(launch_part_sums(plan.parts, flats, shapes))

    try:
        dsts = _targets(plan, flats, [m.host for m in maps])
        if marked:
            _marked_write(plan, flats, dsts, [m.host for m in maps], threads, streams, parts)
        else:
            jobs = [(i, flats[i], dsts[i]) for i in range(len(flats))]
            on_gpu = [jobs[i] for i in gpu]
            pending = d2h.start([(src, dst) for _, src, dst in on_gpu], streams)
            parts()
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
    part_sums = tuple(finish[0]()) if finish else ()
    stats = WriteStats(
        map_s=t1 - t0, copy_s=time.monotonic() - t1, bytes=sum(f.numel() for f in flats),
        newly_pinned=cache.stats.pinned - pinned, part_sums=part_sums,
    )  # fmt: skip
    return out or [], stats
