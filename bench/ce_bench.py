#!/usr/bin/env python3
# ruff: noqa: B023, E501
"""checkpoint-engine 0.4.2 (PyPI) on the same workload as bench/run.py (no vLLM).

Launch (single node):
    torchrun --standalone --nproc-per-node N ce_bench.py --size-gib 15 --iters 5

Per rank:
  * the PS process (this torchrun worker) builds a synthetic bf16 "Llama-3-8B-like" checkpoint,
    keeps only its 1/N share (whole tensors, greedily balanced by bytes) and registers it with
    ParameterServer.register_checkpoint(name, named_tensors=...) -> copied into pinned host memory;
  * a separate *spawned* receiver process (stand-in for an inference worker) holds the FULL set of
    preallocated GPU parameters and runs checkpoint_engine.worker.update_weights_from_ipc, whose
    `run` callback copies every received tensor into its parameter. (It must be a separate process:
    the PS shares its GPU buffer through a CUDA IPC handle, and CUDA IPC handles cannot be opened
    by the process that created them.)
  * ParameterServer.update(name, req_func) with ranks=None -> broadcast mode. req_func just hands
    the ZMQ socket paths to the receiver through a multiprocessing queue (like upstream
    tests/test_update.py).

Prints one JSON line (rank 0) with min/median of the update wall time (max over ranks per iter).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.llama import fill_value  # noqa: E402
from bench.llama import specs as llama_specs


def shard_specs(specs, world_size):
    """Greedy balanced partition of whole tensors over ranks (deterministic on every rank)."""
    numel = math.prod
    order = sorted(range(len(specs)), key=lambda i: (-numel(specs[i][1]), specs[i][0]))
    loads = [0] * world_size
    owner = {}
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[specs[i][0]] = r
        loads[r] += numel(specs[i][1]) * 2
    return owner, loads


# ----------------------------------------------------------------------------- receiver
def receiver_main(local_rank, device_uuid, specs, req_q, res_q, device, setup=None):
    """Runs in a spawned process: stand-in for one inference-engine worker on GPU local_rank."""
    if setup is not None:
        setup()
    import torch
    import zmq
    from checkpoint_engine.worker import update_weights_from_ipc

    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    params = {n: torch.empty(s, dtype=torch.bfloat16, device=device) for n, s in specs}
    expected = {n: fill_value(i) for i, (n, _) in enumerate(specs)}
    zmq_ctx = zmq.Context()
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    sync()
    res_q.put(("ready", local_rank))
    while True:
        msg = req_q.get()
        if msg is None:
            break
        kind, payload = msg
        if kind == "update":
            stats = {"tensors": 0, "bytes": 0, "buckets": 0, "unknown": 0, "t_first": None}
            err = None

            def load_weights(weights):  # == vLLM model.load_weights(weights) stand-in
                if stats["t_first"] is None:
                    stats["t_first"] = time.perf_counter()
                stats["buckets"] += 1
                for name, t in weights:
                    p = params.get(name)
                    if p is None:
                        stats["unknown"] += 1
                        continue
                    p.copy_(t, non_blocking=True)
                    stats["tensors"] += 1
                    stats["bytes"] += t.nbytes
                # update_weights_from_ipc calls device synchronize() after run() returns,
                # before acking, so the IPC buffer slot is free to be overwritten afterwards.

            try:
                # payload = socket_paths: list[(device_uuid, "ipc://@checkpoint-engine-<uuid>-<n>.sock")]
                update_weights_from_ipc(
                    zmq_ctx,
                    dict(payload)[device_uuid],
                    device_id=local_rank,
                    run=load_weights,
                    post_hook=sync,
                )
            except Exception as e:  # noqa: BLE001
                err = repr(e)
            stats["t_last"] = time.perf_counter()
            res_q.put(("updated", stats, err))
        elif kind == "reset":
            for p in params.values():
                p.zero_()
            sync()
            res_q.put(("reset", None))
        elif kind == "verify":
            bad = [n for n, p in params.items() if not bool((p == expected[n]).all())]
            res_q.put(("verify", bad[:5], len(bad)))


# ----------------------------------------------------------------------------- helpers
def store_barrier(store, key, world_size):
    n = store.add(key, 1)
    if n == world_size:
        store.set(key + "/done", "1")
    store.wait([key + "/done"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--size-gib", type=float, default=15.0, help="total checkpoint size (all ranks)"
    )
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--bucket-gib", type=float, default=None, help="sets PS_MAX_BUCKET_SIZE_GB (default 8)"
    )
    ap.add_argument(
        "--mem-fraction", type=float, default=None, help="sets PS_MEM_FRACTION (default 0.9)"
    )
    ap.add_argument(
        "--keep-pg",
        action="store_true",
        help="auto_pg=False: create the NCCL group once instead of per update()",
    )
    ap.add_argument(
        "--verify", action="store_true", help="zero receiver params, update, check values"
    )
    ap.add_argument(
        "--allow-p2p-store",
        action="store_true",
        help="do not block `import mooncake` (default: blocked -> broadcast only)",
    )
    args = ap.parse_args()

    if args.bucket_gib is not None:
        os.environ["PS_MAX_BUCKET_SIZE_GB"] = str(args.bucket_gib)
    if args.mem_fraction is not None:
        os.environ["PS_MEM_FRACTION"] = str(args.mem_fraction)
    if not args.allow_p2p_store:
        # ParameterServer.__init__ tries P2PStore() -> `from mooncake.engine import TransferEngine`;
        # ImportError is caught (ps.py:226-230) but other errors (no RDMA NIC) are not.
        sys.modules["mooncake"] = None

    import checkpoint_engine.ps as ce_ps
    import torch
    import torch.multiprocessing as mp
    from checkpoint_engine.ps import ParameterServer

    # get_ip() does a UDP connect to 8.8.8.8, falling back to gethostbyname(gethostname()).
    # On an offline box the fallback may raise; the value only labels hosts, so pin it.
    try:
        ce_ps.get_ip()
    except Exception:  # noqa: BLE001
        ce_ps.get_ip = lambda: "127.0.0.1"

    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = os.environ.get("CE_BENCH_DEVICE", "cuda")  # "cpu" only for the CPU simulation harness
    setup = getattr(sys.modules.get("__main__"), "CE_BENCH_CHILD_SETUP", None)
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"

    specs = llama_specs(args.size_gib)
    owner, loads = shard_specs(specs, world)
    total_bytes = sum(loads)

    # PS: needs RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (TCPStore on MASTER_PORT+1).
    t0 = time.perf_counter()
    ps = ParameterServer(auto_pg=not args.keep_pg)
    t_ps_init = time.perf_counter() - t0
    device_uuid = ps._device_uuid  # "GPU-<uuid>", exactly the key used in socket_paths

    ctx = mp.get_context("spawn")
    req_q, res_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(
        target=receiver_main,
        args=(local_rank, device_uuid, specs, req_q, res_q, device, setup),
        daemon=True,
    )
    proc.start()

    # synthetic shard for this rank (CPU, bf16, per-tensor constant so --verify is cheap)
    named = {}
    for i, (n, s) in enumerate(specs):
        if owner[n] == rank:
            named[n] = torch.full(s, fill_value(i), dtype=torch.bfloat16)

    name = "bench"
    t0 = time.perf_counter()
    ps.register_checkpoint(
        name, named_tensors=named
    )  # copies into pinned host buffers (4 GiB chunks)
    t_register = time.perf_counter() - t0
    del named

    # receiver must have allocated its params before update() measures free GPU memory
    kind, _ = res_q.get(timeout=600)
    assert kind == "ready", kind

    if args.keep_pg:
        ps.init_process_group()
    t0 = time.perf_counter()
    ps.gather_metas(name)  # all_gather_object of metas + device uuids (inits PG if auto_pg)
    t_gather = time.perf_counter() - t0

    # instrumentation (wraps, does not change behaviour)
    info = {}
    orig_detect = ps._detect_bucket_size

    def detect(*a, **k):
        bs, dis = orig_detect(*a, **k)
        info["bucket_size"], info["disable_h2d_buffer"] = bs, dis
        return bs, dis

    ps._detect_bucket_size = detect
    orig_upb = ps._update_per_bucket

    def upb(*a, **k):
        s = time.perf_counter()
        try:
            return orig_upb(*a, **k)
        finally:
            info["t_update_per_bucket"] = time.perf_counter() - s

    ps._update_per_bucket = upb

    def req_func(socket_paths):  # called by ps in a thread; must not block the PS
        req_q.put(("update", socket_paths))

    store = ps._store
    results = []
    for it in range(args.warmup + args.iters):
        if args.verify and it == args.warmup + args.iters - 1:
            req_q.put(("reset", None))
            assert res_q.get(timeout=600)[0] == "reset"
        store_barrier(store, f"bench/start/{it}", world)
        t0 = time.perf_counter()
        ps.update(name, req_func)  # ranks=None -> broadcast path
        dt = time.perf_counter() - t0
        kind, st, err = res_q.get(timeout=600)
        assert kind == "updated" and err is None, (kind, err)
        assert st["tensors"] == len(specs) and st["unknown"] == 0, st
        rec = {
            "wall": dt,
            "inner": info.get("t_update_per_bucket"),
            "buckets": st["buckets"],
            "recv_span": st["t_last"] - st["t_first"],
        }
        store.set(f"bench/res/{it}/{rank}", json.dumps(rec))
        results.append(rec)

    verify = None
    if args.verify:
        req_q.put(("verify", None))
        _, bad, nbad = res_q.get(timeout=600)
        verify = {"ok": nbad == 0, "n_bad": nbad, "examples": bad}
        store.set(f"bench/verify/{rank}", json.dumps(verify))

    store_barrier(store, "bench/end", world)
    if rank == 0:
        per_iter = []
        for it in range(args.warmup, args.warmup + args.iters):
            recs = [json.loads(store.get(f"bench/res/{it}/{r}")) for r in range(world)]
            per_iter.append(
                {k: max(x[k] for x in recs) for k in ("wall", "inner", "recv_span")}
                | {"buckets": recs[0]["buckets"]}
            )
        walls = [x["wall"] for x in per_iter]
        inners = [x["inner"] for x in per_iter]
        out = {
            "system": "checkpoint-engine-0.4.2",
            "mode": "broadcast",
            "world_size": world,
            "keep_pg": args.keep_pg,
            "size_gib": total_bytes / (1 << 30),
            "num_tensors": len(specs),
            "per_rank_gib": [x / (1 << 30) for x in loads],
            "bucket_size_gib": info.get("bucket_size", 0) / (1 << 30),
            "disable_h2d_buffer": info.get("disable_h2d_buffer"),
            "ipc_buckets_per_update": per_iter[0]["buckets"] if per_iter else None,
            "ps_init_s": t_ps_init,
            "register_s": t_register,
            "gather_metas_s": t_gather,
            "update_wall_s": {"min": min(walls), "median": statistics.median(walls), "all": walls},
            "update_per_bucket_s": {"min": min(inners), "median": statistics.median(inners)},
            "recv_span_s_median": statistics.median(x["recv_span"] for x in per_iter),
            "eff_GiBps_median": total_bytes / (1 << 30) / statistics.median(walls),
            "verify": (
                [json.loads(store.get(f"bench/verify/{r}")) for r in range(world)]
                if args.verify
                else None
            ),
        }
        print(json.dumps(out), flush=True)

    req_q.put(None)
    proc.join(timeout=60)
    ps.unregister_checkpoint(name)
    if args.keep_pg:
        import checkpoint_engine.distributed as ce_dist

        if ce_dist.is_initialized():
            ce_dist.destroy_process_group()
    store_barrier(store, "bench/exit", world)
    if rank == 0:
        time.sleep(2)  # rank 0 hosts the TCPStore: let the others return from their last wait


if __name__ == "__main__":
    main()
