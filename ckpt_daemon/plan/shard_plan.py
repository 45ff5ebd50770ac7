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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ckpt_common.dtypes import DTYPE_SIZES
from ckpt_daemon.model import RankRef, TensorInfo
from ckpt_daemon.plan.keeps import Keep, part_of
from ckpt_daemon.plan.placement import ALIGN, PlanError
from ckpt_daemon.plan.planner import BucketPlan, Entry, Plan, readers_near

MAX_DIMS = 8


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
        owner_ix = {r: i for i, r in enumerate(owners)}
        # a tensor stored in pieces is kept whole (see the module doc): it has no index
        self.pieces = {t.name for t in tensors if t.piece is not None}
        self.index = {t.name: i for i, t in enumerate(tensors) if t.piece is None}
        if any(len(t.shape) > MAX_DIMS for t in tensors):
            raise PlanError(f"a tensor has over {MAX_DIMS} dimensions")

        def col(values: list[int]) -> np.ndarray:
            return np.array(values, dtype=np.int64).reshape(n)

        by_id = {id(r): i for r, i in owner_ix.items()}  # owners are shared objects: no hashing
        self.owner = col([by_id.get(id(t.owner), -1) for t in tensors])
        for i in np.nonzero(self.owner < 0)[0]:  # an equal owner held in another object
            self.owner[i] = owner_ix[tensors[i].owner]
        self.offset = col([t.store_offset for t in tensors])
        self.item = col([DTYPE_SIZES[t.dtype] for t in tensors])
        self.nbytes = col([t.nbytes for t in tensors])
        self.ndim = col([len(t.shape) for t in tensors])
        self.shape = np.ones((n, MAX_DIMS), dtype=np.int64)
        for d in np.unique(self.ndim):
            rows = np.nonzero(self.ndim == d)[0]
            if d:
                self.shape[rows, :d] = np.array([tensors[i].shape for i in rows], np.int64)
        self._last: tuple[list[str], np.ndarray] | None = None
        # inner[i, d]: elements of one step along dimension d (product of the later dims)
        rev = np.cumprod(self.shape[:, ::-1], axis=1)[:, ::-1]
        self.inner = np.concatenate([rev[:, 1:], np.ones((n, 1), dtype=np.int64)], axis=1)

    def indices(self, names: list[str]) -> np.ndarray:
        """The stored entry of each name (the classes of a layout keep the same names: the
        last lookup is reused when they are equal, which compares string identities)."""
        if self._last is not None and self._last[0] == names:
            return self._last[1]
        try:
            t = np.array(list(map(self.index.__getitem__, names)), dtype=np.int64)
        except KeyError as e:
            missing = e.args[0]
            why = "is stored in pieces" if missing in self.pieces else "is not in the checkpoint"
            raise PlanError(f"a rank keeps part of {missing!r}, which {why}") from None
        t = t.reshape(len(names))
        self._last = (names, t)
        return t


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
    t = ts.indices([k[0] for k in keeps])
    dim = np.array([k[1] for k in keeps], dtype=np.int64).reshape(n)
    start = np.array([k[2] for k in keeps], dtype=np.int64).reshape(n)
    length = np.array([k[3] for k in keeps], dtype=np.int64).reshape(n)
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
    order = np.lexsort((src, owner))  # by owner, then store order
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


# --------------------------------------------------------------------------- from maps to groups


@dataclass(frozen=True, kw_only=True, slots=True)
class GroupPlan:
    """One class's group: its members read the class's buckets from the owners' stores
    (each bucket by one member, on the owner's node where the class has one) and broadcast
    them among themselves. `sources[i]` is the owner an entry's source index i names, and
    `local[i]` whether every read of it is on the owner's own node."""

    plan: Plan
    sources: list[RankRef]
    local: list[bool]


def _readers(cp: ClassPlan, members: list[RankRef]) -> list[int]:
    """Each bucket's reader (group rank): the class's members on its owner's node in turn,
    or every member in turn where none is there."""
    turn: dict[RankRef, int] = {}
    out = []
    for b in cp.buckets:
        near = [g for g, m in enumerate(members) if m.node_id == b.owner.node_id]
        pool = near or list(range(len(members)))
        k = turn.get(b.owner, 0)
        turn[b.owner] = k + 1
        out.append(pool[k % len(pool)])
    return out


def _interleave(cp: ClassPlan) -> list[int]:
    """Bucket order: owners in turn, so consecutive buckets come from different owners."""
    per: dict[RankRef, list[int]] = {}
    for i, b in enumerate(cp.buckets):
        per.setdefault(b.owner, []).append(i)
    lists = list(per.values())
    return [lst[k] for k in range(max(map(len, lists), default=0)) for lst in lists if k < len(lst)]


def group_plans(
    tensors: Sequence[TensorInfo],
    maps: Mapping[RankRef, Sequence[Keep]],
    *,
    bucket_bytes: int,
    nbuf: int,
    partial: bool,
) -> list[GroupPlan]:
    """A shard-aware update: one group per class of target ranks keeping the same parts."""
    ranks = sorted(maps)
    plans, of = plan_classes(tensors, [maps[r] for r in ranks], bucket_bytes=bucket_bytes)
    by_name = {t.name: t for t in tensors if t.piece is None}
    out = []
    for c, cp in enumerate(plans):
        members = [r for r, k in zip(ranks, of, strict=True) if k == c]
        owners = sorted({b.owner for b in cp.buckets})
        src = {o: i for i, o in enumerate(owners)}
        readers = _readers(cp, members)
        order = _interleave(cp)
        new = {old: i for i, old in enumerate(order)}
        r = cp.runs
        entries: list[list[Entry]] = [[] for _ in order]
        for i in np.lexsort((r.offset, r.bucket)):
            b = int(r.bucket[i])
            rows, run = int(r.rows[i]), int(r.run[i])
            entries[new[b]].append(
                Entry(int(r.keep[i]), int(r.offset[i]), int(r.src[i]), rows * run,
                      int(r.dst[i]), rows, int(r.stride[i]), src[cp.buckets[b].owner])
            )  # fmt: skip
        buckets = [
            BucketPlan(owner=readers[old], nbytes=cp.buckets[old].nbytes, entries=tuple(e))
            for old, e in zip(order, entries, strict=True)
        ]
        plan = Plan(
            participants=members, targets=members,
            tensors=[part_of(by_name[k.name], k) for k in cp.keeps], buckets=buckets,
            bucket_bytes=bucket_bytes, nbuf=nbuf, total_bytes=cp.nbytes, partial=partial,
            kept=True, group=f"c{c}",
        )  # fmt: skip
        near = readers_near(plan, len(owners), owners)
        out.append(GroupPlan(plan=plan, sources=owners, local=near))
    return out
