"""Shard-aware transfer plans (ckpt_daemon.shard_plan): executed on real bytes, every rank's
kept parts come out exact, buckets stay within their size, each class moves only what it
keeps; a million kept parts over 2048 ranks plan in under a second."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from ckpt_daemon.model import RankRef, TensorSpec
from ckpt_daemon.planner import PlanError, place
from ckpt_daemon.shard_plan import Keep, plan_class, plan_classes

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


def test_a_million_parts_over_2048_ranks_in_under_a_second() -> None:
    """256 TP=8 replicas (2048 ranks): 8 classes, each keeping a slice of each of 131072
    tensors (dimension 0 or 1 in turn), 1,048,576 kept parts in all."""
    from ckpt_daemon.model import TensorInfo

    n, tp = 131072, 8
    owners = [RankRef(f"n{i // 8:03d}", i % 8) for i in range(64)]
    tensors = [
        TensorInfo(name=f"model.layers.{i // 64}.w{i}", dtype="BF16", shape=(64, 128),
                   nbytes=64 * 128 * 2, owner=owners[i % 64], store_offset=(i // 64) * 16384)
        for i in range(n)
    ]  # fmt: skip
    maps = [
        [Keep(t.name, i % 2, r * (8 if i % 2 == 0 else 16), 8 if i % 2 == 0 else 16)
         for i, t in enumerate(tensors)]
        for r in range(tp)
    ]  # fmt: skip
    ranks = [maps[r % tp] for r in range(2048)]
    took = 1e9
    for _ in range(2):  # the better of two: a machine's hiccup is not the planner's time
        t0 = time.perf_counter()
        plans, of = plan_classes(tensors, ranks, bucket_bytes=64 << 20)
        took = min(took, time.perf_counter() - t0)
    print(f"\nplan: {sum(len(p.keeps) for p in plans)} parts, 2048 ranks, {took:.3f} s")
    assert len(plans) == tp and of[:9] == [0, 1, 2, 3, 4, 5, 6, 7, 0]
    assert all(p.nbytes == n * 64 * 128 * 2 // tp for p in plans)
    assert took < 1.0
