"""The GPU checksum kernel alone (on a CUDA machine): correctness on hostile sizes (empty,
tails, many small tensors in one bucket, one flipped byte) and the time of
ckpt_common.checksum_gpu.batch_parts over a 16 GiB Llama's buckets, with and without a
read-back per bucket.

    python bench/checksum_kernel.py
"""

import json
import math
import sys
import time

import numpy as np
import torch

sys.path.insert(0, ".")
from bench.checksum_cost import buckets
from bench.llama import specs
from ckpt_common import checksum
from ckpt_common import checksum_gpu as G

res = {}
rng = np.random.default_rng(0)
# correctness: many shapes in one bucket, including empty, tails, many small tensors
sizes_t = [0, 3, 1024, 8191, 8192 * 300 + 5, 4 << 20, 9 << 20] + [1024 * k for k in range(1, 40)]
arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes_t]
pad = [(-a.size) % 8 for a in arrays]
buf = torch.from_numpy(
    np.concatenate(
        [np.concatenate([a, np.zeros(p, np.uint8)]) for a, p in zip(arrays, pad, strict=True)]
    )
).cuda()
items, at = [], 0
for i, (a, p) in enumerate(zip(arrays, pad, strict=True)):
    items.append((f"t{i}", checksum.of_numpy(a), buf[at : at + a.size]))
    at += a.size + p
res["mismatch_clean"] = checksum.mismatches(items)
buf[at // 2] ^= 1
res["mismatch_flip"] = checksum.mismatches(items)
sizes = [math.prod(s) * 2 for _, s in specs(16)]
plan = buckets(sizes, 512 << 20)
biggest = max(sum(n for _, n in b) for b in plan)
big = torch.randint(0, 256, (biggest,), dtype=torch.uint8, device="cuda")
tss = [[big[o : o + n] for o, n in b] for b in plan]
W = checksum._weights(8 * 128, big.device)


def timeit(name, fn, iters=7):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    res[name] = round(sorted(ts)[len(ts) // 2] * 1e3, 3)


timeit("batch_parts_nosync", lambda: [G.batch_parts(ts, 128, W) for ts in tss])
timeit("batch_parts_sync_each", lambda: [G.batch_parts(ts, 128, W).tolist() for ts in tss])
timeit("table_build_cpu", lambda: [G._table(ts, 128) for ts in tss])
want = [[checksum.of_numpy(t.cpu().numpy()) for t in ts] for ts in tss[:2]]
res["gpu_eq_torch"] = all(
    checksum.mismatches([(str(i), w, t) for i, (w, t) in enumerate(zip(ww, ts, strict=True))]) == []
    for ww, ts in zip(want, tss[:2], strict=True)
)
res["buckets"] = len(plan)
res["bytes"] = sum(sizes)
print(json.dumps(res))
