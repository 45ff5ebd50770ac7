"""One rank of a sharded (FSDP2-style) publisher for bench.rl_step --sharded N: run under
torchrun by it, against its ckptd (CKPTD_ADDR, CKPTD_TOKEN_FILE) and its node (CKPT_NODE_ID).

Every rank holds 1/N of each tensor (DTensor, Shard(0) over a 1-D mesh; tensors whose first
dimension N does not divide are replicated, pushed by rank 0) on its GPU (LOCAL_RANK modulo
the GPUs there are: on one GPU every rank shares it, which the report says), and every step
changes them and calls `Publisher(sharded=True).publish(step, state)`: each rank writes its
own shards into the node's host stores, ckptd commits the version once all are in, rank 0
updates instance R. Each rank appends one JSON line per step to --out-dir/rank<r>.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--keep", type=int, default=1)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--cpu-smoke", action="store_true", help="bench.rl_step's tiny CPU run")
    a = ap.parse_args()

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from bench.llama import fill_value
    from bench.rl_step import workload
    from ckpt_trainer import Publisher

    dist.init_process_group("gloo")  # several ranks may share one GPU: no NCCL among them
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = "cpu" if a.cpu_smoke else "cuda"
    if not a.cpu_smoke:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    mesh = init_device_mesh(dev, (world,))
    state = {}
    for i, (name, shape) in enumerate(workload(a)):
        if shape[0] % world == 0:
            local = (shape[0] // world, *shape[1:])
            t = torch.full(local, fill_value(i), dtype=torch.bfloat16, device=dev)
            state[name] = DTensor.from_local(t, mesh, [Shard(0)], run_check=False)
        else:
            t = torch.full(shape, fill_value(i), dtype=torch.bfloat16, device=dev)
            state[name] = DTensor.from_local(t, mesh, [Replicate()], run_check=False)
    pub = Publisher("rl-sharded", instances=["R"], keep=a.keep, sharded=True, timeout_s=900)
    for step in range(1, a.steps + 1):
        for t in state.values():
            t.to_local().add_(1.0)
        if not a.cpu_smoke:
            torch.cuda.synchronize()
        dist.barrier()
        t0 = time.perf_counter()
        res = pub.publish(step, state)
        step_s = time.perf_counter() - t0
        lp = pub.client.last_push
        rec = {"step": step, "rank": rank, "step_s": step_s, "push_s": res.push_s,
               "update_s": res.update_s, "prune_s": res.prune_s, "write_s": lp.write_s,
               "copy_s": lp.copy_s, "begin_s": lp.begin_s, "commit_s": lp.commit_s,
               "bytes": lp.bytes, "state": res.state.value, "reason": res.reason}  # fmt: skip
        rec["gpus"] = torch.cuda.device_count() if not a.cpu_smoke else 0
        with open(os.path.join(a.out_dir, f"rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if res.state.value != "succeeded":
            raise SystemExit(f"step {step}: {res.state.value}: {res.reason}")
    pub.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
