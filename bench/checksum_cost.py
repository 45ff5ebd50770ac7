"""What verifying checksums costs an engine on the GPU: the receiver's work per bucket
(ckpt_common.checksum.mismatches over the bucket's tensors, one read-back per bucket) for a
Llama-shaped bf16 checkpoint, in buckets of the size ckptd plans on CUDA.

    python -m bench.checksum_cost --size-gib 16 --bucket-mib 512 --iters 5 --out cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.llama import specs  # noqa: E402
from ckpt_common import checksum  # noqa: E402


def buckets(sizes: list[int], bucket: int) -> list[list[tuple[int, int]]]:
    """(offset, nbytes) of each tensor, packed into buckets (a tensor larger than a bucket is
    verified whole, as the receiver does once its chunks are assembled)."""
    out: list[list[tuple[int, int]]] = [[]]
    used = 0
    for n in sizes:
        if used and used + n > bucket:
            out.append([])
            used = 0
        out[-1].append((used, n))
        used += n
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=16)
    ap.add_argument("--bucket-mib", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="checksum_cost.json")
    a = ap.parse_args()
    sizes = [math.prod(s) * 2 for _, s in specs(a.size_gib)]
    plan = buckets(sizes, a.bucket_mib << 20)
    biggest = max(sum(n for _, n in b) for b in plan)
    buf = torch.randint(0, 256, (biggest,), dtype=torch.uint8, device="cuda")
    want = {(o, n): checksum.of_torch(buf[o : o + n]) for b in plan for o, n in b}
    times = []
    for it in range(a.iters + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for b in plan:
            items = [(f"{o}", want[(o, n)], buf[o : o + n]) for o, n in b]
            assert checksum.mismatches(items) == []
        torch.cuda.synchronize()
        if it:  # the first pass warms up the kernels
            times.append(time.perf_counter() - t0)
    total = sum(sizes)
    res = {
        "device": torch.cuda.get_device_name(),
        "bytes": total,
        "tensors": len(sizes),
        "buckets": len(plan),
        "bucket_bytes": a.bucket_mib << 20,
        "seconds": times,
        "median_s": statistics.median(times),
        "gb_per_s": total / statistics.median(times) / 1e9,
    }
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
