"""Shard-aware transfer plans (ckpt_daemon.plan.shard_plan): executed on real bytes, every rank's
kept parts come out exact, buckets stay within their size, each class moves only what it
keeps; a million kept parts over 2048 ranks plan in under a second."""

from __future__ import annotations

import random
import time
from dataclasses import replace

import numpy as np
import pytest

from ckpt_daemon.model import RankRef, TensorSpec
from ckpt_daemon.plan.keeps import Keep
from ckpt_daemon.plan.placement import PlanError, place
from ckpt_daemon.plan.shard_plan import plan_class, plan_classes

OWNERS = [RankRef("n1", 0), RankRef("n1", 1), RankRef("n2", 0)]
ITEM = {"F32": 4, "BF16": 2, "I8": 1}


def checkpoint(seed: int, n: int = 24):
    rng = random.Random(seed)
    specs = []
    for i in range(n):
        dtype = rng.choice(list(ITEM))
        shape = (rng.randrange(1, 9), rng.randrange(1, 40)) if i % 5 else (rng.randrange(1, 50),)
        nb = ITEM[dtype] * int(np.prod(shape))
        specs.append(TensorSpec(name=f"model.layers.{i // 3}.w{i}", dtype=dtype, shape=shape,
                                nbytes=nb, path="", file_offset=0))  # fmt: skip
    placed = place(specs, OWNERS)
    stores = {r: np.frombuffer(rng.randbytes(n), dtype=np.uint8).copy()
              for r, n in placed.store_bytes.items()}  # fmt: skip
    return placed.tensors, stores


def tp_keeps(tensors, tp: int, rank: int) -> list[Keep]:
    out = []
    for i, t in enumerate(tensors):
        if len(t.shape) == 1:
            out.append(Keep(t.name))
            continue
        d = i % 2  # column-parallel (dim 0) and row-parallel (dim 1) in turn
        step = -(-t.shape[d] // tp)
        lo = rank * step
        if lo >= t.shape[d]:
            continue  # uneven: this rank keeps nothing of it
        out.append(Keep(t.name, d, lo, min(step, t.shape[d] - lo)))
    return out


def expected(t, stores, k: Keep) -> bytes:
    raw = stores[t.owner][t.store_offset : t.store_offset + t.nbytes]
    arr = raw.reshape(*t.shape, ITEM[t.dtype])
    if k.dim >= 0:
        arr = np.take(arr, range(k.start, k.start + k.length), axis=k.dim)
    return np.ascontiguousarray(arr).tobytes()


def execute(tensors, stores, plan) -> dict[str, bytes]:
    """Moves the bytes as the pipeline would: runs into buckets, buckets into kept parts."""
    by_name = {t.name: t for t in tensors}
    r = plan.runs
    buckets = [np.zeros(b.nbytes, dtype=np.uint8) for b in plan.buckets]
    for i in range(len(r.keep)):
        t = tensors[r.tensor[i]]
        assert plan.buckets[r.bucket[i]].owner == t.owner
        for row in range(r.rows[i]):
            s = r.src[i] + row * r.stride[i]
            o = r.offset[i] + row * r.run[i]
            buckets[r.bucket[i]][o : o + r.run[i]] = stores[t.owner][s : s + r.run[i]]
    parts = {k.name: bytearray(len(expected(by_name[k.name], stores, k))) for k in plan.keeps}
    for i in range(len(r.keep)):
        n = r.rows[i] * r.run[i]
        name = plan.keeps[r.keep[i]].name
        parts[name][r.dst[i] : r.dst[i] + n] = buckets[r.bucket[i]][
            r.offset[i] : r.offset[i] + n
        ].tobytes()
    return {n: bytes(b) for n, b in parts.items()}


@pytest.mark.parametrize("bucket", [256, 512, 4096, 1 << 20])
def test_each_rank_gets_exactly_what_it_keeps(bucket: int) -> None:
    for seed in range(6):
        tensors, stores = checkpoint(seed)
        by_name = {t.name: t for t in tensors}
        maps = [tp_keeps(tensors, 2, r) for r in (0, 1)] + [tp_keeps(tensors, 3, 2)]
        plans, of = plan_classes(tensors, maps + maps[:2], bucket_bytes=bucket)
        assert of == [0, 1, 2, 0, 1]  # replicas of a layout share a class
        whole = sum(t.nbytes for t in tensors)
        for plan in plans:
            got = execute(tensors, stores, plan)
            assert got == {k.name: expected(by_name[k.name], stores, k) for k in plan.keeps}
            assert all(b.nbytes <= bucket for b in plan.buckets)
            assert plan.nbytes == sum(len(v) for v in got.values()) < whole


def test_whole_tensors_and_refusals() -> None:
    tensors, stores = checkpoint(7, 6)
    plan = plan_class(tensors, [Keep(t.name) for t in tensors], bucket_bytes=512)
    assert plan.nbytes == sum(t.nbytes for t in tensors)
    assert execute(tensors, stores, plan) == {
        t.name: expected(t, stores, Keep(t.name)) for t in tensors
    }
    two_d = next(t for t in tensors if len(t.shape) == 2)
    for keep, why in (
        (Keep("nope"), "not in the checkpoint"),
        (Keep(two_d.name, 2, 0, 1), "dimension"),
        (Keep(two_d.name, 0, 0, two_d.shape[0] + 1), "outside"),
        (Keep(two_d.name, 0, -1, 1), "outside"),
    ):
        with pytest.raises(PlanError, match=why):
            plan_class(tensors, [keep], bucket_bytes=512)


def test_a_million_parts_over_2048_ranks_plan_right_and_in_linear_time() -> None:
    """256 TP=8 replicas (2048 ranks): 8 classes, each keeping a slice of each of 131072
    tensors, 1,048,576 kept parts in all. The time itself is bench.plan_scale's (a timed unit
    test is no measurement); this bound only catches a planner gone quadratic."""
    from bench.plan_scale import TP, N, workload

    tensors, ranks = workload()
    t0 = time.perf_counter()
    plans, of = plan_classes(tensors, ranks, bucket_bytes=64 << 20)
    took = time.perf_counter() - t0
    assert sum(len(p.keeps) for p in plans) == 1 << 20
    assert len(plans) == TP and of[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert all(p.nbytes == N * 64 * 128 * 2 // TP for p in plans)
    assert took < 10.0


def test_group_plans_give_every_rank_its_parts_read_near_their_owners() -> None:
    """Two TP=2 instances on two nodes: two groups (one per TP rank), each bucket read by a
    member on its owner's node, every entry's bytes (decoded source, strided runs) landing
    as the exact part; whole keeps carry their checksum, parts none."""
    from ckpt_daemon.plan.keeps import keeps_of
    from ckpt_daemon.plan.shard_plan import group_plans

    tensors, stores = checkpoint(11, 30)
    tensors = [t if i % 4 else replace(t, checksum=1234 + i) for i, t in enumerate(tensors)]
    ranks = [RankRef("n1", 0), RankRef("n1", 1), RankRef("n2", 0), RankRef("n2", 1)]
    layouts = []
    for r in range(2):
        m = {}
        for k in tp_keeps(tensors, 2, r):
            t = next(x for x in tensors if x.name == k.name)
            if k.dim < 0:
                m[k.name] = "whole"
            else:
                off, shape = [0] * len(t.shape), list(t.shape)
                off[k.dim], shape[k.dim] = k.start, k.length
                m[k.name] = [off, shape]
        layouts.append(m)
    maps = {rk: keeps_of(layouts[i % 2], tensors) for i, rk in enumerate(ranks)}
    groups = group_plans(tensors, maps, bucket_bytes=512, nbuf=2, partial=False)
    assert len(groups) == 2
    by_name = {t.name: t for t in tensors}
    for c, g in enumerate(groups):
        p = g.plan
        assert p.kept and p.participants == [ranks[c], ranks[c + 2]]
        assert g.local == [True] * len(g.sources)
        parts = [bytearray(t.nbytes) for t in p.tensors]
        for b in p.buckets:
            reader = p.participants[b.owner]
            bucket = bytearray(b.nbytes)
            for e in b.entries:
                src, off = e.source, e.store_offset
                owner = g.sources[src]
                assert owner.node_id == reader.node_id
                run = e.nbytes // e.rows
                for row in range(e.rows):
                    s = off + row * e.stride
                    bucket[e.bucket_offset + row * run : e.bucket_offset + (row + 1) * run] = (
                        stores[owner][s : s + run].tobytes()
                    )
                parts[e.tensor][e.chunk_offset : e.chunk_offset + e.nbytes] = bucket[
                    e.bucket_offset : e.bucket_offset + e.nbytes
                ]
        for t, got in zip(p.tensors, parts, strict=True):
            k = next(k for k in maps[ranks[c]] if k.name == t.name)
            assert bytes(got) == expected(by_name[t.name], stores, k)
            whole = t.piece is None
            assert whole == (k.dim < 0)
            assert (t.checksum is not None) == (whole and by_name[t.name].checksum is not None)


def test_a_tensor_an_engine_never_saw_makes_it_a_broadcast() -> None:
    """Shard-aware plans only send what the engines' maps name: a tensor missing from a map
    (a name the model may not have) must reach the engine whole, for it to judge; "none"
    (taken by the loader, kept elsewhere) is simply not sent."""
    from ckpt_daemon.jobs.shard_jobs import NotSharded, keeps
    from ckpt_daemon.plan.keeps import keeps_of

    tensors, _ = checkpoint(5, 6)
    r0, r1 = RankRef("n1", 0), RankRef("n1", 1)
    full = {t.name: "whole" for t in tensors}
    first = tensors[0]
    off, shape = [0] * len(first.shape), list(first.shape)
    shape[0] = max(1, shape[0] // 2)
    half = {**full, first.name: [off, shape]}
    got = keeps(tensors, {r0: half, r1: {**full, first.name: "none"}})
    assert [k.name for k in got[r1]] == [t.name for t in tensors[1:]]
    assert keeps_of({first.name: "none"}, tensors) == []
    with pytest.raises(NotSharded, match="has not seen tensor") as e:
        keeps(tensors, {r0: half, r1: {k: v for k, v in full.items() if k != first.name}})
    assert e.value.relearn  # the broadcast instead learns the layouts again
    with pytest.raises(NotSharded, match="broadcast is the plan"):
        keeps(tensors, {r0: full, r1: full})
