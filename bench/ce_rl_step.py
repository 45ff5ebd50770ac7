#!/usr/bin/env python3
"""checkpoint-engine's RL step, the counterpart of bench/rl_step.py: the trainer's new bf16
weights are on its GPU; each step registers them as a new checkpoint (copied into pinned
host memory: its shared memory pool, reused from the second step on, its best mode for a
checkpoint per step), gathers the metadata, updates the receiver (broadcast mode, the
process group kept across steps) and unregisters the checkpoint (the pool stays).

Launch (what bench/rl_step.py does):
    torchrun --standalone --nproc-per-node 1 bench/ce_rl_step.py --size-gib 16 --steps 10

Prints one JSON line (rank 0): per step register_s, gather_s, update_s, unregister_s and
step_s (max over ranks), the first step apart.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.ce_bench import receiver_main, shard_specs, store_barrier  # noqa: E402
from bench.llama import fill_value  # noqa: E402
from bench.llama import specs as llama_specs  # noqa: E402

PHASES = ("register_s", "gather_s", "update_s", "unregister_s", "step_s")


def register(ps, name: str, named: dict) -> str:
    """Registers named (GPU tensors) in the shared pinned pool where this version has one."""
    try:
        ps.register_checkpoint(name, named_tensors=named, use_shared_memory_pool=True)
        return "shared_memory_pool"
    except TypeError:  # a release without the pool: a fresh pinned buffer every step
        ps.register_checkpoint(name, named_tensors=named)
        return "fresh_pinned"


def one_step(ps, step: int, named: dict, req_q, res_q, req_func, n_specs: int) -> dict:
    import torch

    for t in named.values():  # the "training step": new values, on the GPU
        t.add_(1.0)
    torch.cuda.synchronize()
    name = f"step-{step}"
    t0 = time.perf_counter()
    mode = register(ps, name, named)
    t1 = time.perf_counter()
    ps.gather_metas(name)
    t2 = time.perf_counter()
    ps.update(name, req_func)
    kind, st, err = res_q.get(timeout=600)
    assert kind == "updated" and err is None, (kind, err)
    assert st["tensors"] == n_specs and st["unknown"] == 0, st
    t3 = time.perf_counter()
    ps.unregister_checkpoint(name)
    t4 = time.perf_counter()
    return {"register_s": t1 - t0, "gather_s": t2 - t1, "update_s": t3 - t2,
            "unregister_s": t4 - t3, "step_s": t4 - t0, "mode": mode}  # fmt: skip


def summary(per_step: list[dict]) -> dict:
    out: dict = {"first": per_step[0], "steps": per_step}
    rest = per_step[1:] or per_step
    for k in PHASES:
        xs = [r[k] for r in rest]
        out[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return out


def setup(args):
    """The parameter server, its receiver process and this rank's GPU tensors."""
    sys.modules["mooncake"] = None  # no P2P store: broadcast mode only
    import checkpoint_engine.ps as ce_ps
    import torch
    import torch.multiprocessing as mp
    from checkpoint_engine.ps import ParameterServer

    try:
        ce_ps.get_ip()
    except Exception:  # an offline box: the value only labels hosts
        ce_ps.get_ip = lambda: "127.0.0.1"
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local_rank)
    specs = llama_specs(args.size_gib)
    owner, loads = shard_specs(specs, world)
    ps = ParameterServer(auto_pg=False)
    ctx = mp.get_context("spawn")
    req_q, res_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(
        target=receiver_main,
        args=(local_rank, ps._device_uuid, specs, req_q, res_q, f"cuda:{local_rank}"),
        daemon=True,
    )
    proc.start()
    dev = f"cuda:{local_rank}"
    named = {
        n: torch.full(s, fill_value(i), dtype=torch.bfloat16, device=dev)
        for i, (n, s) in enumerate(specs)
        if owner[n] == rank
    }
    kind, _ = res_q.get(timeout=600)
    assert kind == "ready", kind
    ps.init_process_group()
    return ps, rank, world, specs, loads, named, proc, req_q, res_q


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    ps, rank, world, specs, loads, named, proc, req_q, res_q = setup(args)

    def req_func(socket_paths):  # called by ps in a thread; must not block it
        req_q.put(("update", socket_paths))

    store = ps._store
    per_step = []
    for step in range(args.steps):
        store_barrier(store, f"rl/start/{step}", world)
        rec = one_step(ps, step, named, req_q, res_q, req_func, len(specs))
        store.set(f"rl/res/{step}/{rank}", json.dumps(rec))
        per_step.append(rec)
    store_barrier(store, "rl/end", world)
    if rank == 0:
        merged = []
        for step in range(args.steps):
            recs = [json.loads(store.get(f"rl/res/{step}/{r}")) for r in range(world)]
            merged.append({k: max(x[k] for x in recs) for k in PHASES} | {"mode": recs[0]["mode"]})
        out = {"system": "checkpoint-engine", "mode": "broadcast, process group kept, "
               f"{merged[0]['mode']}", "world_size": world, "bytes": sum(loads),
               "tensors": len(specs)} | summary(merged)  # fmt: skip
        print(json.dumps(out), flush=True)
    req_q.put(None)
    proc.join(timeout=60)
    store_barrier(store, "rl/exit", world)
    if rank == 0:
        time.sleep(2)  # rank 0 hosts the TCPStore: let the others return from their last wait


if __name__ == "__main__":
    main()
