"""Pure planning of an update: how it moves a version's bytes (where they live:
placement.py). Nothing here does I/O or reads the clock.

- ``plan_update``: at update time, order the participants (targets first, in global rank
  order, then owners that are not targets), and cut each owner's bytes into buckets that
  never split a layer unless the layer alone exceeds a bucket (then tensors, and a tensor
  larger than a bucket is cut into chunks). Buckets of different owners are interleaved so
  the next bucket's copy can overlap the current broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from ckpt_common.layers import layer_key
from ckpt_daemon.model import RankRef, TensorInfo
from ckpt_daemon.plan.placement import ALIGN, PlanError, align_up, rank_order

MIB = 1 << 20
MIN_REQUESTED_BUCKET = 4096


# --------------------------------------------------------------------------- update plan


class Entry(NamedTuple):
    """A piece of a tensor in a bucket (a NamedTuple: plans hold one per tensor)."""

    tensor: int  # index into Plan.tensors
    bucket_offset: int
    store_offset: int
    nbytes: int
    chunk_offset: int
    rows: int = 1  # a strided read (shard_plan): rows runs of nbytes // rows bytes,
    stride: int = 0  # stride bytes apart in the store, packed in the bucket
    source: int = 0  # reading plans (P2P, shard-aware): the index of the store read from


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketPlan:
    owner: int  # group rank
    nbytes: int
    entries: tuple[Entry, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    participants: list[RankRef]  # index = group rank
    targets: list[RankRef]
    tensors: list[TensorInfo]
    buckets: list[BucketPlan]
    bucket_bytes: int
    nbuf: int
    total_bytes: int
    partial: bool
    kept: bool = False  # tensors are the parts the targets keep (shard_plan), not whole
    group: str = ""  # one of several groups of a job (shard-aware: one per class)
    delta_base: int = 0  # tensors are a delta store's payloads, from this version

    def is_target(self, group_rank: int) -> bool:
        return group_rank < len(self.targets)


def select_tensors(tensors: Sequence[TensorInfo], patterns: Sequence[str]) -> list[TensorInfo]:
    """Every tensor whose name equals a pattern or starts with it (a prefix). Linear: one set
    lookup per distinct pattern length and name, not one comparison per pattern."""
    if not patterns:
        return list(tensors)
    by_len: dict[int, set[str]] = {}
    for p in patterns:
        by_len.setdefault(len(p), set()).add(p)
    lengths = sorted(by_len)
    chosen = [
        t for t in tensors if any(t.name[:n] in by_len[n] for n in lengths if n <= len(t.name))
    ]
    if not chosen:
        raise PlanError(
            f"no tensor matches the {len(patterns)} pattern(s) (first: {patterns[0][:80]!r})"
        )
    return chosen


def choose_bucket_bytes(
    free_bytes: Sequence[int],
    *,
    nbuf: int,
    cap: int,
    floor: int = MIB,
    requested: int = 0,
    largest_owner_bytes: int = 0,
) -> int:
    """The largest bucket every participant can hold nbuf (+1 staging) of, capped, and no
    larger than the most bytes one owner sends (a small update gets small buffers)."""
    if requested:
        if requested < MIN_REQUESTED_BUCKET:
            raise PlanError(f"bucket_bytes {requested} is below the minimum {MIN_REQUESTED_BUCKET}")
        return align_up(requested, ALIGN)
    if not free_bytes:
        raise PlanError("no participant reported free memory")
    fit = min(free_bytes) // (nbuf + 1)
    size = min(cap, fit) // MIB * MIB
    if largest_owner_bytes:
        size = min(size, max(floor, align_up(largest_owner_bytes, MIB)))
    if size < floor:
        raise PlanError(
            f"too little free memory for {nbuf} buffers: the smallest participant has "
            f"{min(free_bytes)} bytes free"
        )
    return size


def choose_nbuf(kinds: set[str], free_bytes: Sequence[int], default: int) -> int:
    """Triple-buffer on GPUs when every participant has room for four 64 MiB buffers:
    H2D of k+2, broadcast of k+1 and reload of k then all overlap."""
    if "cuda" in kinds and free_bytes and min(free_bytes) // 4 >= 64 * MIB:
        return max(default, 3)
    return default


def _owner_buckets(
    owned: list[int], tensors: Sequence[TensorInfo], owner: int, bucket_bytes: int
) -> list[BucketPlan]:
    """Cut one owner's tensors (indices, in store order) into buckets, layer-aware."""
    buckets: list[BucketPlan] = []
    entries: list[Entry] = []
    used = 0
    mask = ALIGN - 1

    # Consecutive tensors with the same layer key form a group.
    groups: list[tuple[int, list[int]]] = []  # (aligned bytes, indices)
    last_key = None
    for i in owned:
        t = tensors[i]
        key = layer_key(t.name)
        if key != last_key:
            groups.append((0, []))
            last_key = key
        need, members = groups[-1]
        members.append(i)
        groups[-1] = (need + ((t.nbytes + mask) & ~mask), members)

    for need, group in groups:
        if need <= bucket_bytes and used + need > bucket_bytes and entries:
            buckets.append(BucketPlan(owner=owner, nbytes=used, entries=tuple(entries)))
            entries, used = [], 0
        for i in group:
            t = tensors[i]
            n = t.nbytes
            if n == 0:
                entries.append(Entry(i, used, t.store_offset, 0, 0))
                continue
            done = 0
            while done < n:
                room = bucket_bytes - used
                if room <= 0:
                    buckets.append(BucketPlan(owner=owner, nbytes=used, entries=tuple(entries)))
                    entries, used, room = [], 0, bucket_bytes
                piece = room if room < n - done else n - done
                entries.append(Entry(i, used, t.store_offset + done, piece, done))
                used = (used + piece + mask) & ~mask
                if used > bucket_bytes:
                    used = bucket_bytes
                done += piece
    if entries:
        buckets.append(BucketPlan(owner=owner, nbytes=used, entries=tuple(entries)))
    return buckets


def plan_update(
    tensors: Sequence[TensorInfo],
    targets: Sequence[RankRef],
    *,
    bucket_bytes: int,
    nbuf: int = 2,
    partial: bool = False,
) -> Plan:
    if bucket_bytes < ALIGN or bucket_bytes % ALIGN:
        raise PlanError(f"bucket_bytes must be a positive multiple of {ALIGN}")
    if not targets:
        raise PlanError("no target ranks")
    if nbuf < 1:
        raise PlanError("nbuf must be at least 1")
    tlist = rank_order(targets)
    owners = rank_order({t.owner for t in tensors})
    tset = set(tlist)
    participants = tlist + [o for o in owners if o not in tset]
    index = {r: i for i, r in enumerate(participants)}

    by_owner: dict[int, list[int]] = {}
    last_owner, last_g = None, -1
    for i, t in enumerate(tensors):
        if t.owner is not last_owner:  # tensors of one owner come in runs: skip most hashing
            last_owner, last_g = t.owner, index[t.owner]
        by_owner.setdefault(last_g, []).append(i)
    per_owner = []
    for g in sorted(by_owner):
        owned = sorted(by_owner[g], key=lambda i: tensors[i].store_offset)
        per_owner.append(_owner_buckets(owned, tensors, g, bucket_bytes))

    # Round-robin across owners so consecutive buckets come from different owners.
    buckets: list[BucketPlan] = []
    k = 0
    while True:
        added = False
        for lst in per_owner:
            if k < len(lst):
                buckets.append(lst[k])
                added = True
        if not added:
            break
        k += 1
    return Plan(
        participants=participants,
        targets=tlist,
        tensors=list(tensors),
        buckets=buckets,
        bucket_bytes=bucket_bytes,
        nbuf=nbuf,
        total_bytes=sum(t.nbytes for t in tensors),
        partial=partial,
    )


def plan_p2p(
    tensors: Sequence[TensorInfo],
    targets: Sequence[RankRef],
    *,
    bucket_bytes: int,
    nbuf: int = 2,
    partial: bool = False,
) -> tuple[Plan, list[RankRef]]:
    """A P2P plan: only the targets take part. Each bucket is read from its owner's host
    memory by one target (a target on the owner's node where there is one, in turn; else
    every target in turn), then broadcast inside the targets. Returns the plan and the
    sources (owners) each entry's `source` indexes."""
    base = plan_update(tensors, targets, bucket_bytes=bucket_bytes, nbuf=nbuf, partial=partial)
    tlist = base.targets
    sources = rank_order({t.owner for t in tensors})
    src_index = {r: i for i, r in enumerate(sources)}
    near: dict[str, list[int]] = {}
    for g, r in enumerate(tlist):
        near.setdefault(r.node_id, []).append(g)
    turn: dict[str, int] = {}
    buckets = []
    for k, b in enumerate(base.buckets):
        owner = base.participants[b.owner]
        src = src_index[owner]
        entries = tuple(e._replace(source=src) for e in b.entries)
        pool = near.get(owner.node_id)
        if pool:
            i = turn[owner.node_id] = turn.get(owner.node_id, -1) + 1
            reader = pool[i % len(pool)]
        else:
            reader = k % len(tlist)
        buckets.append(BucketPlan(owner=reader, nbytes=b.nbytes, entries=entries))
    plan = Plan(
        participants=list(tlist),
        targets=list(tlist),
        tensors=base.tensors,
        buckets=buckets,
        bucket_bytes=base.bucket_bytes,
        nbuf=base.nbuf,
        total_bytes=base.total_bytes,
        partial=partial,
    )
    return plan, sources


def readers_near(plan: Plan, nsources: int, owners: Sequence[RankRef]) -> list[bool]:
    """For each source of a reading plan (P2P, shard-aware): whether every bucket read from
    it is read by a participant on the owner's own node (a bucket holds one owner's bytes)."""
    near = [True] * nsources
    for b in plan.buckets:
        node = plan.participants[b.owner].node_id
        for e in b.entries[:1]:
            src = e.source
            near[src] = near[src] and node == owners[src].node_id
    return near
