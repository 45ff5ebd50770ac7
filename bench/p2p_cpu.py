"""P2P join throughput on CPU (Mooncake over TCP on loopback) against the raw Mooncake read
rate measured in the same run.

    .venv/bin/python -m bench.p2p_cpu --mib 256 --runs 3

1. raw: a process registers a shared-memory buffer with a transfer engine; this process
   reads it whole with batch reads in bucket-sized pieces (what a join reader does).
2. join: ckptd, an owner agent (2 devices hold the checkpoint), a joining agent (2 devices,
   reference receivers, TP=2); JoinInstance; time from job start to finish.
Prints a JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

MIB = 1 << 20


def _owner(size: int, q: mp.Queue, stop: mp.Event) -> None:
    from ckpt_agent import shm
    from ckpt_agent.p2p import P2PEngine
    from ckpt_agent.worker import buffer_address

    mem = shm.create(f"ckpt_bench_{os.getpid()}", size)
    mem.buf[:] = bytes(range(256)) * (size // 256)
    eng = P2PEngine("127.0.0.1", 0)
    addr = buffer_address(mem)
    eng.register(addr, size)
    q.put((eng.session, addr))
    stop.wait(600)
    shm.unlink(mem.name)


def raw_rate(size: int, chunk: int, runs: int) -> list[float]:
    import torch

    from ckpt_agent.p2p import P2PEngine

    ctx = mp.get_context("spawn")
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_owner, args=(size, q, stop), daemon=True)
    p.start()
    session, raddr = q.get(timeout=120)
    eng = P2PEngine("127.0.0.1", 1)
    dst = torch.zeros(size, dtype=torch.uint8)
    eng.register(dst.data_ptr(), size)
    eng.read(session, [dst.data_ptr()], [raddr], [4096])  # handshake
    rates = []
    for _ in range(runs):
        offs = list(range(0, size, chunk))
        t0 = time.perf_counter()
        eng.read(
            session,
            [dst.data_ptr() + o for o in offs],
            [raddr + o for o in offs],
            [min(chunk, size - o) for o in offs],
        )
        rates.append(size / (time.perf_counter() - t0) / 1e9)
    stop.set()
    p.join(10)
    return rates


def join_rate(size: int, runs: int, root: Path) -> tuple[list[float], list[float]]:
    import torch
    from safetensors.torch import save_file

    from ckpt.v1 import types_pb2 as tpb
    from tests.support.cluster import Cluster, wait_for

    c = Cluster(root)
    c.env["MC_LOG_LEVEL"] = "ERROR"
    try:
        c.start_daemon()
        c.start_agent("a-own", 2)
        c.start_agent("b-new", 2)
        reports = [c.start_receiver("b-new", d) for d in (0, 1)]
        c.wait_ranks(4)
        for r in reports:
            wait_for(r.exists, 60, "receivers")
        n = max(1, size // (4 * MIB))
        g = torch.Generator().manual_seed(0)
        t = {f"model.layers.{i}.w": torch.randn(MIB, generator=g) for i in range(n)}
        save_file(t, str(root / "ck.safetensors"))
        c.client.push("bench", 1, [str(root / "ck.safetensors")], ranks=[0, 1])
        inst = tpb.Instance(
            name="new",
            kind=tpb.INSTANCE_RECEIVER,
            tp_size=2,
            ranks=[tpb.InstanceRank(node_id="b-new", device=d) for d in (0, 1)],
        )
        rates, secs = [], []
        for _ in range(runs + 1):  # the first warms connections and buffers
            job = c.client.wait(c.client.join(inst, "bench", 1).id, 600)
            if job.state != tpb.JOB_SUCCEEDED:
                raise SystemExit(f"join failed: {job.reason}")
            took = job.finished_unix - job.started_unix
            secs.append(took)
            rates.append(job.bytes_total / took / 1e9)
        return rates[1:], secs[1:]
    finally:
        c.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--chunk-mib", type=int, default=64, help="= ckptd's CPU bucket size")
    p.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    size = a.mib * MIB
    raw = raw_rate(size, a.chunk_mib * MIB, a.runs)
    print(json.dumps({"raw_read_GBps": [round(x, 3) for x in raw]}), flush=True)
    with tempfile.TemporaryDirectory() as d:
        rates, secs = join_rate(size, a.runs, Path(d))
    print(
        json.dumps(
            {"join_GBps": [round(x, 3) for x in rates], "join_s": [round(x, 3) for x in secs]}
        ),
        flush=True,
    )
    print(
        json.dumps(
            {
                "mib": a.mib,
                "raw_median_GBps": round(statistics.median(raw), 3),
                "join_median_GBps": round(statistics.median(rates), 3),
                "join_over_raw": round(statistics.median(rates) / statistics.median(raw), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
