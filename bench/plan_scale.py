"""How long shard-aware planning takes at scale (ckpt_daemon.plan.shard_plan): 256 TP=8 replicas
(2048 ranks, 8 classes), each rank keeping a slice of each of 131072 tensors (dimension 0
or 1 in turn): 1,048,576 kept parts. Pure CPU; run anywhere:

    .venv/bin/python -m bench.plan_scale [--repeat 5]
"""

from __future__ import annotations

import argparse
import time

from ckpt_daemon.model import RankRef, TensorInfo
from ckpt_daemon.plan.keeps import Keep
from ckpt_daemon.plan.shard_plan import plan_classes

N, TP, RANKS = 131072, 8, 2048


def workload() -> tuple[list[TensorInfo], list[list[Keep]]]:
    owners = [RankRef(f"n{i // 8:03d}", i % 8) for i in range(64)]
    tensors = [
        TensorInfo(name=f"model.layers.{i // 64}.w{i}", dtype="BF16", shape=(64, 128),
                   nbytes=64 * 128 * 2, owner=owners[i % 64], store_offset=(i // 64) * 16384)
        for i in range(N)
    ]  # fmt: skip
    maps = [
        [Keep(t.name, i % 2, r * (8 if i % 2 == 0 else 16), 8 if i % 2 == 0 else 16)
         for i, t in enumerate(tensors)]
        for r in range(TP)
    ]  # fmt: skip
    return tensors, [maps[r % TP] for r in range(RANKS)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    tensors, ranks = workload()
    times = []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        plans, _ = plan_classes(tensors, ranks, bucket_bytes=64 << 20)
        times.append(time.perf_counter() - t0)
    parts = sum(len(p.keeps) for p in plans)
    print(f"{parts} parts, {RANKS} ranks, {len(plans)} classes: "
          f"min {min(times):.3f} s, all {[round(t, 3) for t in times]}")  # fmt: skip


if __name__ == "__main__":
    main()
