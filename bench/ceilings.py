"""Hardware ceilings measured in the same run as the update benchmark: pinned H2D per GPU
alone and on all GPUs at once, D2D copy, NCCL broadcast bandwidth.

    python -m bench.ceilings --gpus 4 --out ceilings.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

GB = 1e9


def _h2d(dev: int, host, dev_buf, reps: int) -> float:
    import torch

    s = torch.cuda.Stream(dev)
    with torch.cuda.device(dev), torch.cuda.stream(s):
        dev_buf.copy_(host, non_blocking=True)  # warm-up
        s.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            dev_buf.copy_(host, non_blocking=True)
        s.synchronize()
    return host.numel() * reps / (time.perf_counter() - t0) / GB


def h2d(ngpu: int, nbytes: int, reps: int) -> dict:
    import torch

    hosts = [torch.empty(nbytes, dtype=torch.uint8).pin_memory() for _ in range(ngpu)]
    for h in hosts:
        h.fill_(3)
    devs = [torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}") for i in range(ngpu)]
    alone = [_h2d(i, hosts[i], devs[i], reps) for i in range(ngpu)]
    res: list[float] = [0.0] * ngpu
    barrier = threading.Barrier(ngpu)

    def run(i: int) -> None:
        barrier.wait()
        res[i] = _h2d(i, hosts[i], devs[i], reps)

    ths = [threading.Thread(target=run, args=(i,)) for i in range(ngpu)]
    t0 = time.perf_counter()
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    agg = ngpu * nbytes * (reps + 1) / wall / GB
    d2d = []
    for i in range(ngpu):
        with torch.cuda.device(i):
            a = devs[i]
            b = torch.empty_like(a)
            b.copy_(a)
            torch.cuda.synchronize(i)
            t0 = time.perf_counter()
            for _ in range(reps):
                b.copy_(a)
            torch.cuda.synchronize(i)
            d2d.append(nbytes * reps / (time.perf_counter() - t0) / GB)  # bytes copied
            del b
    return {
        "h2d_alone_GBps": alone,
        "h2d_concurrent_GBps": res,
        "h2d_concurrent_min_GBps": min(res),
        "h2d_concurrent_aggregate_GBps": agg,
        "d2d_copy_GBps": d2d,
        "bytes": nbytes,
    }


def _bcast_worker(rank: int, world: int, port: int, nbytes: int, reps: int, q) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        device_id=torch.device("cuda", rank),
    )
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    for r in range(world):
        dist.broadcast(buf, r)
    torch.cuda.synchronize()
    times = []
    for i in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.broadcast(buf, i % world)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put(times)
    dist.destroy_process_group()


def bcast(ngpu: int, nbytes: int, reps: int) -> dict:
    if ngpu < 2:
        return {"bcast_GBps": None, "note": "one GPU: no broadcast"}
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    ps = [
        ctx.Process(target=_bcast_worker, args=(r, ngpu, port, nbytes, reps, q))
        for r in range(ngpu)
    ]
    for p in ps:
        p.start()
    times = q.get(timeout=300)
    for p in ps:
        p.join(60)
    med = statistics.median(times)
    return {"bcast_GBps": nbytes / med / GB, "bcast_bytes": nbytes, "bcast_median_s": med}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--h2d-gib", type=float, default=2.0)
    ap.add_argument("--bcast-mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    import torch

    n = a.gpus or torch.cuda.device_count()
    out = {"gpus": n, "device": torch.cuda.get_device_name(0)}
    out.update(h2d(n, int(a.h2d_gib * (1 << 30)), a.reps))
    out.update(bcast(n, a.bcast_mib << 20, max(20, a.reps)))
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
