"""Shard-aware transfer plans (pure): the bytes each engine rank keeps, cut out of the host
stores and bucketed, for every class of ranks that keep the same parts.

The sharding map of an engine rank (vllm_ext.layout) says what it keeps of each checkpoint
tensor: all of it, nothing, or a box. Here a kept part is a `Keep`: the tensor, and the
dimension it is narrowed on with its start and length (dim -1: the whole tensor). A box
narrowed on more than one dimension, or a tensor stored in pieces (a sharded push), is kept
whole: the engine's loader does the rest (never wrong, only more bytes).

Ranks whose maps are equal form a class (the same TP rank of every replica of a layout);
a class's bytes are planned once. For a tensor stored whole in an owner's store, the part a
rank keeps is `rows` runs of `run` bytes, `stride` bytes apart, from `src` (a dimension-0
part is one run; a dimension-1 part of a matrix is one run per row). Per class and owner the
runs are laid out back to back (each part 256-byte aligned) in a stream cut into buckets of
bucket_bytes; a part that crosses a bucket boundary is split there (at a row, or inside a
row at an element). Vectorised with numpy: a million kept parts plan in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ckpt_common.dtypes import DTYPE_SIZES
from ckpt_daemon.model import RankRef, TensorInfo
from ckpt_daemon.planner import ALIGN, PlanError

MAX_DIMS = 8


class Keep(NamedTuple):
    name: str
    dim: int = -1  # -1: the whole tensor
    start: int = 0
    length: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class Runs:
    """Copies of one class, as parallel arrays (one row per copy)."""

    keep: np.ndarray  # index into the class's keeps
    tensor: np.ndarray  # index into the plan's tensors (the stored entry read)
    src: np.ndarray  # byte offset of the first run in the owner's store
    rows: np.ndarray  # runs in this copy
    run: np.ndarray  # bytes per run
    stride: np.ndarray  # bytes from one run's start to the next in the store
    dst: np.ndarray  # byte offset of this copy inside the kept part (packed)
    bucket: np.ndarray  # index into ClassPlan.buckets
    offset: np.ndarray  # byte offset inside the bucket


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassBucket:
    owner: RankRef
    nbytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ClassPlan:
    keeps: list[Keep]
    runs: Runs
    buckets: list[ClassBucket]
    nbytes: int  # bytes each member of the class receives (padding excluded)


def classes_of(maps: Sequence[Sequence[Keep]]) -> tuple[list[list[Keep]], list[int]]:
    """Distinct maps, and for each rank its class (index into the distinct maps)."""
    index: dict[tuple[Keep, ...], int] = {}
    seen: dict[int, int] = {}  # id of a map object -> its class (ranks of one layout share it)
    out: list[list[Keep]] = []
    of: list[int] = []
    for m in maps:
        c = seen.get(id(m))
        if c is None:
            key = tuple(m)
            c = index.get(key)
            if c is None:
                c = index[key] = len(out)
                out.append(list(m))
            seen[id(m)] = c
        of.append(c)
    return out, of


class _Tensors:
    """The stored entries as arrays: owner, offset, item size, shape and its suffix products."""

    def __init__(self, tensors: Sequence[TensorInfo], owners: list[RankRef]) -> None:
        n = len(tensors)
        self.index: dict[str, int] = {}
        owner_ix = {r: i for i, r in enumerate(owners)}
        self.owner = np.empty(n, dtype=np.int64)
        self.offset = np.empty(n, dtype=np.int64)
        self.item = np.empty(n, dtype=np.int64)
        self.nbytes = np.empty(n, dtype=np.int64)
        self.ndim = np.empty(n, dtype=np.int64)
        self.shape = np.ones((n, MAX_DIMS), dtype=np.int64)
        self.pieces: set[str] = set()
        for i, t in enumerate(tensors):
            if t.piece is not None:
                self.pieces.add(t.name)
                continue  # a tensor stored in pieces is kept whole (see the module doc)
            if len(t.shape) > MAX_DIMS:
                raise PlanError(f"tensor {t.name!r} has over {MAX_DIMS} dimensions")
            self.index[t.name] = i
            self.owner[i] = owner_ix[t.owner]
            self.offset[i] = t.store_offset
            self.item[i] = DTYPE_SIZES[t.dtype]
            self.nbytes[i] = t.nbytes
            self.ndim[i] = len(t.shape)
            self.shape[i, : len(t.shape)] = t.shape
        # inner[i, d]: elements of one step along dimension d (product of the later dims)
        rev = np.cumprod(self.shape[:, ::-1], axis=1)[:, ::-1]
        self.inner = np.concatenate([rev[:, 1:], np.ones((n, 1), dtype=np.int64)], axis=1)


def plan_class(
    tensors: Sequence[TensorInfo], keeps: Sequence[Keep], *, bucket_bytes: int
) -> ClassPlan:
    owners = sorted({t.owner for t in tensors})
    return _plan(_Tensors(tensors, owners), owners, list(keeps), bucket_bytes)


def plan_classes(
    tensors: Sequence[TensorInfo], maps: Sequence[Sequence[Keep]], *, bucket_bytes: int
) -> tuple[list[ClassPlan], list[int]]:
    """One plan per distinct map, and each rank's class."""
    distinct, of = classes_of(maps)
    owners = sorted({t.owner for t in tensors})
    arrays = _Tensors(tensors, owners)
    return [_plan(arrays, owners, k, bucket_bytes) for k in distinct], of


def _plan(ts: _Tensors, owners: list[RankRef], keeps: list[Keep], bucket_bytes: int) -> ClassPlan:
    if bucket_bytes < ALIGN or bucket_bytes % ALIGN:
        raise PlanError(f"bucket_bytes must be a positive multiple of {ALIGN}")
    n = len(keeps)
    try:
        t = np.fromiter((ts.index[k.name] for k in keeps), dtype=np.int64, count=n)
    except KeyError as e:
        missing = e.args[0]
        why = "is stored in pieces" if missing in ts.pieces else "is not in the checkpoint"
        raise PlanError(f"a rank keeps part of {missing!r}, which {why}") from None
    dim = np.fromiter((k.dim for k in keeps), dtype=np.int64, count=n)
    start = np.fromiter((k.start for k in keeps), dtype=np.int64, count=n)
    length = np.fromiter((k.length for k in keeps), dtype=np.int64, count=n)
    whole = dim < 0
    d = np.where(whole, 0, dim)
    if np.any(~whole & (d >= ts.ndim[t])):
        raise PlanError("a kept part names a dimension its tensor does not have")
    extent = ts.shape[t, d]
    if np.any(~whole & ((start < 0) | (length <= 0) | (start + length > extent))):
        raise PlanError("a kept part lies outside its tensor")
    item, inner = ts.item[t], ts.inner[t, d]
    outer = np.where(whole, 1, ts.nbytes[t] // np.maximum(1, extent * inner * item))
    run = np.where(whole, ts.nbytes[t], length * inner * item)
    stride = np.where(whole, 0, extent * inner * item)
    src = ts.offset[t] + np.where(whole, 0, start * inner * item)
    total = outer * run
    # the stream of each owner: parts in store order, each aligned
    owner = ts.owner[t]
    order = np.lexsort((src, owner))
    size = (total[order] + ALIGN - 1) // ALIGN * ALIGN
    first = np.ones(n, dtype=bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    csum = np.cumsum(size)
    base = np.maximum.accumulate(np.where(first, csum - size, 0))  # stream start per owner
    pos = csum - size - base  # offset of each part in its owner's stream
    return _cut(
        keeps, owners, bucket_bytes, order, t[order], owner[order], src[order], outer[order],
        run[order], stride[order], total[order], pos, item[order],
    )  # fmt: skip


def _cut(
    keeps: list[Keep], owners: list[RankRef], B: int, order: np.ndarray, t: np.ndarray,
    owner: np.ndarray, src: np.ndarray, rows: np.ndarray, run: np.ndarray, stride: np.ndarray,
    total: np.ndarray, pos: np.ndarray, item: np.ndarray,
) -> ClassPlan:  # fmt: skip
    """Buckets of each owner's stream; parts crossing a boundary split there."""
    n = len(order)
    first_b = pos // B
    last_b = (pos + np.maximum(total, 1) - 1) // B
    inside = first_b == last_b
    # bucket numbering: per owner, its stream's buckets; owners in turn
    nb = np.zeros(len(owners), dtype=np.int64)
    if n:
        np.maximum.at(nb, owner, last_b + 1)
    bucket_base = np.concatenate([[0], np.cumsum(nb)[:-1]])
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("keep", "tensor", "src", "rows",
                                                         "run", "stride", "dst", "bucket",
                                                         "offset")}  # fmt: skip
    i = np.nonzero(inside)[0]
    for key, val in (
        ("keep", order[i]), ("tensor", t[i]), ("src", src[i]), ("rows", rows[i]),
        ("run", run[i]), ("stride", stride[i]), ("dst", np.zeros(len(i), dtype=np.int64)),
        ("bucket", bucket_base[owner[i]] + first_b[i]), ("offset", pos[i] - first_b[i] * B),
    ):  # fmt: skip
        cols[key].append(val)
    extra = [
        piece
        for j in np.nonzero(~inside)[0]
        for piece in _split_part(
            int(order[j]),
            int(t[j]),
            int(src[j]),
            int(rows[j]),
            int(run[j]),
            int(stride[j]),
            int(pos[j]),
            int(item[j]),
            B,
            int(bucket_base[owner[j]]),
        )  # fmt: skip
    ]
    if extra:
        arr = np.array(extra, dtype=np.int64).T
        for key, val in zip(cols, arr, strict=True):
            cols[key].append(val)
    runs = Runs(**{k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in cols.items()})
    sizes = np.zeros(int(nb.sum()), dtype=np.int64)
    np.maximum.at(sizes, runs.bucket, runs.offset + runs.rows * runs.run)
    bucket_owner = np.repeat(np.arange(len(owners)), nb)
    buckets = [
        ClassBucket(owner=owners[int(o)], nbytes=int(s))
        for o, s in zip(bucket_owner, sizes, strict=True)
    ]
    return ClassPlan(keeps=keeps, runs=runs, buckets=buckets, nbytes=int(total.sum()))


def _split_part(
    keep: int, t: int, src: int, rows: int, run: int, stride: int, pos: int, item: int, B: int,
    base: int,
) -> list[tuple[int, ...]]:  # fmt: skip
    """A part crossing bucket boundaries as copies that each stay inside one bucket: whole
    runs where they fit, a run cut at an element where it must be."""
    out = []
    done = 0  # bytes of the part laid out so far (packed: row r at r * run)
    total = rows * run
    while done < total:
        b = (pos + done) // B
        room = (b + 1) * B - (pos + done)
        r, inrow = divmod(done, run)
        if inrow == 0 and room >= run:  # whole runs
            k = min(rows - r, room // run)
            out.append(
                (keep, t, src + r * stride, k, run, stride, done, base + b, pos + done - b * B)
            )
            done += k * run
            continue
        n = min(run - inrow, room) // item * item or min(run - inrow, room)
        out.append((keep, t, src + r * stride + inrow, 1, n, n, done, base + b, pos + done - b * B))
        done += n
    return out
