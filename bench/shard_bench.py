"""Shard-aware updates by tensor-parallel layout, against a broadcast of the same checkpoint,
on the GPUs of this machine (ckptd + one agent + reference receivers emulating TP ranks).

    python -m bench.shard_bench --size-gib 16 --tp 1,2,4,8 --iters 3 --out shard.json

For each TP size N: N agent slots and N receivers (`ckpt-receiver --tp N/r`, each keeping
rank r's parts of a Llama-shaped bf16 checkpoint: q/k/v/gate/up/embed/lm_head on dim 0,
o/down on dim 1, norms whole), each its own instance. Where the machine has fewer GPUs than
N, the ranks share them in turn (`--slots N`): each rank's bytes are exact, but ranks on one
GPU share its host link, so their update time is the sum of theirs, not one rank's (the
table says how many ranks each GPU held). Each rank first learns its layout by a P2P read of
the whole checkpoint from the same node's stores (one instance at a time: ranks on one GPU
cannot share an NCCL group); then the shard-aware update is timed. TP=1 is the broadcast
baseline (one rank receives every byte). Last, a new version is pushed and its first update
timed (the version before dropped first, as a trainer's loop does): for shard-aware layouts it
includes the owners checksumming the parts. Then a version pushed as a trainer pushes it
(direct, from GPU tensors, part checksums taken on the GPU for the layouts ckptd knows): its
first update, and a repeat of it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.llama import specs, total_bytes  # noqa: E402
from bench.run import GB, log, make_tensors  # noqa: E402
from ckpt.v1 import types_pb2 as tpb  # noqa: E402


def trainer_version(c: Any, sp: list, names: list[str], method: int) -> dict:
    """A new version pushed the way a trainer pushes it (direct, from GPU tensors, its part
    checksums taken on its GPU for the layouts ckptd knows), then its first update timed,
    then that update again (a repeat)."""
    import torch

    c.client.delete("bench", 2)
    gpu = {k: t.cuda() for k, t in make_tensors(sp).items()}
    torch.cuda.synchronize()
    c.client.push_direct("bench", 3, gpu, node_id="bench", timeout_s=900)
    asked = c.client.last_push.part_checksums
    del gpu
    torch.cuda.empty_cache()
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        job = c.client.wait(c.client.update("bench", 3, instances=names, method=method).id, 900)
        walls.append(time.perf_counter() - t0)
        if job.state != tpb.JOB_SUCCEEDED:
            raise RuntimeError(f"update to v3 failed: {job.reason}")
    store_sums = any(
        "part_sums_from_store" in ln and '"version": 3' in ln for ln in c.log("ckptd").splitlines()
    )
    rec = {"trainer_first_s": walls[0], "trainer_repeat_s": walls[1], "parts_asked": asked,
           "owners_summed_parts": store_sums}  # fmt: skip
    log("trainer version", json.dumps(rec))
    return rec


def run_tp(n: int, gpus: int, size_gib: float, iters: int, root: Path) -> dict:
    from safetensors.torch import save_file

    from tests.support.cluster import Cluster, wait_for

    c = Cluster(root)
    path = f"/dev/shm/ckpt-shard-bench-{n}.safetensors"
    try:
        c.start_daemon("--receiver-timeout-s", "120")
        c._spawn(
            "agent",
            ["-m", "ckpt_agent.main", "--daemon", c.addr, "--node-id", "bench"]
            + ["--device", "cuda", "--slots", str(n)],
        )
        for r in range(n):
            c._spawn(
                f"recv-{r}",
                ["-m", "vllm_ext.reference", "--node-id", "bench", "--device", str(r)]
                + ["--cuda", "--cuda-index", str(r % gpus), "--prealloc", "--tp", f"{n}/{r}"],
            )
        c.wait_ranks(n, 180)
        for r in range(n):
            wait_for(lambda r=r: "receiver_ready" in c.log(f"recv-{r}"), 180, "receivers")
            c.client.register_instance(
                tpb.Instance(
                    name=f"r{r}", kind=tpb.INSTANCE_RECEIVER, tp_size=1,
                    ranks=[tpb.InstanceRank(node_id="bench", device=r)],
                )
            )  # fmt: skip
        sp = specs(size_gib)
        S = total_bytes(sp)
        save_file(make_tensors(sp), path)
        c.client.push("bench", 1, [path], timeout_s=900)
        names = [f"r{r}" for r in range(n)]
        for name in names:  # learn each layout (a whole-checkpoint read by the rank itself)
            job = c.client.wait(c.client.update("bench", 1, instances=[name],
                                                method=tpb.UPDATE_P2P).id, 900)  # fmt: skip
            if job.state != tpb.JOB_SUCCEEDED:
                raise RuntimeError(f"learning update of {name} failed: {job.reason}")
        runs = []
        method = tpb.UPDATE_BROADCAST if n == 1 else tpb.UPDATE_SHARDED
        for it in range(iters + 1):
            t0 = time.perf_counter()
            job = c.client.wait(c.client.update("bench", 1, instances=names, method=method).id, 900)
            wall = time.perf_counter() - t0
            if job.state != tpb.JOB_SUCCEEDED:
                raise RuntimeError(f"update failed: {job.reason}")
            rec = {
                "wall_s": wall,
                "rank_total_s": max(r.times.total_s for r in job.results),
                "bytes_per_rank": sorted(r.bytes for r in job.results),
                "buckets": job.buckets_total,
            }
            log(f"tp={n}", it, json.dumps(rec))
            if it:
                runs.append(rec)
        # a new version, steady state (the one before dropped first, so its pinned stores are
        # reused, and stay mapped in the readers): its parts' checksums are taken by the
        # owners before it moves
        c.client.delete("bench", 1)
        c.client.push("bench", 2, [path], timeout_s=900)
        t0 = time.perf_counter()
        job = c.client.wait(c.client.update("bench", 2, instances=names, method=method).id, 900)
        new_version_s = time.perf_counter() - t0
        if job.state != tpb.JOB_SUCCEEDED:
            raise RuntimeError(f"update to v2 failed: {job.reason}")
        log(f"tp={n} new version", json.dumps({"wall_s": new_version_s}))
        trainer = trainer_version(c, sp, names, method)
        return {
            "tp": n,
            "new_version_wall_s": new_version_s,
            **trainer,
            "ranks_per_gpu": -(-n // gpus),
            "bytes": S,
            "runs": runs,
            "wall_s_median": statistics.median(r["wall_s"] for r in runs),
            "rank_total_s_median": statistics.median(r["rank_total_s"] for r in runs),
            "max_bytes_per_rank": max(runs[-1]["bytes_per_rank"]),
        }
    finally:
        c.close()
        Path(path).unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-gib", type=float, default=16)
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default="shard.json")
    a = ap.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpus": gpus,
        "device": torch.cuda.get_device_name(0),
        "size_gib": a.size_gib,
        "layouts": [],
    }
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-shard-bench-"))
    for n in [int(x) for x in a.tp.split(",")]:
        try:
            out["layouts"].append(run_tp(n, gpus, a.size_gib, a.iters, tmp / f"tp{n}"))
        except Exception as e:  # the other layouts still count
            out["layouts"].append({"tp": n, "error": repr(e)})
        Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{'TP':>3} {'ranks/GPU':>9} {'GB/rank':>8} {'share':>6} {'update s':>9} {'rank s':>7}"
          f" {'new version s':>13} {'trainer: first':>14} {'repeat':>7}")  # fmt: skip
    for r in out["layouts"]:
        if "error" in r:
            print(f"{r['tp']:>3} error: {r['error'][:100]}")
            continue
        b = r["max_bytes_per_rank"]
        print(f"{r['tp']:>3} {r['ranks_per_gpu']:>9} {b / GB:>8.2f} {b / r['bytes']:>6.3f} "
              f"{r['wall_s_median']:>9.3f} {r['rank_total_s_median']:>7.3f} "
              f"{r['new_version_wall_s']:>13.3f} {r['trainer_first_s']:>14.3f} "
              f"{r['trainer_repeat_s']:>7.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
