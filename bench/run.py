"""One command for the GPU benchmark: ceilings, a ckptd broadcast update, checkpoint-engine on
the same workload, and push. Prints a table and writes every raw number as JSON.

    python -m bench.run --gpus 4 --size-gib 32 --iters 5 --out bench.json [--skip-ce]

Workload: a synthetic Llama-3-8B-shaped bf16 checkpoint (bench/llama.py) pushed from this
process (the trainer) through ckptd, spread evenly over every GPU's host store; every GPU's
receiver (ckpt-receiver --cuda --prealloc, parameters allocated before the first bucket)
gets every tensor. A warm-up update (NCCL connect, first mapping) is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.llama import fill_value, specs, total_bytes  # noqa: E402
from ckpt.v1 import types_pb2 as tpb  # noqa: E402
from ckptctl.st_writer import write_safetensors  # noqa: E402

GB = 1e9


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def ceilings(n: int, out: Path) -> dict:
    subprocess.run(
        [sys.executable, "-m", "bench.ceilings", "--gpus", str(n), "--out", str(out)],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    return json.loads(out.read_text())


def make_tensors(sp: list) -> dict:
    import torch

    return {
        name: torch.full(shape, fill_value(i), dtype=torch.bfloat16)
        for i, (name, shape) in enumerate(sp)
    }


def ckptd_bench(n: int, size_gib: float, iters: int, root: Path, bucket_mib: int) -> dict:
    from safetensors.torch import save_file

    from tests.support.cluster import Cluster, wait_for

    c = Cluster(root)
    res: dict = {}
    path = f"/dev/shm/ckpt-bench-{os.getpid()}.safetensors"
    try:
        extra = ["--max-bucket-mib", str(bucket_mib)] if bucket_mib else []
        c.start_daemon("--receiver-timeout-s", "120", *extra)
        c._spawn(
            "agent",
            ["-m", "ckpt_agent.main", "--daemon", c.addr, "--node-id", "bench"]
            + ["--device", "cuda", "--slots", str(n)],
        )
        for d in range(n):
            c._spawn(
                f"recv-{d}",
                ["-m", "vllm_ext.reference", "--node-id", "bench", "--device", str(d)]
                + ["--cuda", "--prealloc"],
            )
        c.wait_ranks(n, 180)
        for d in range(n):
            wait_for(lambda d=d: "receiver_ready" in c.log(f"recv-{d}"), 180, "receivers")
        sp = specs(size_gib)
        S = total_bytes(sp)
        res["bytes"] = S
        res["tensors"] = len(sp)
        # push: the trainer's tensors -> a safetensors file in /dev/shm -> host stores
        t0 = time.perf_counter()
        tensors = make_tensors(sp)
        res["make_tensors_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        save_file(tensors, path)  # what ckptctl's push_tensors does today
        t1 = time.perf_counter()
        del tensors
        cp = c.client.push("bench", 1, [path], timeout_s=900)
        t2 = time.perf_counter()
        res["push_write_file_s"] = t1 - t0
        res["push_load_stores_s"] = t2 - t1
        res["push_total_s"] = t2 - t0
        res["push_store_load"] = agent_store_seconds(c, n)
        res["shards_bytes"] = sorted(s.nbytes for s in cp.shards)
        ranks = list(range(n))
        runs = []
        for it in range(iters + 1):
            rec = timed_update(c, 1, ranks)
            log("ckptd update", it, json.dumps(rec))
            if it:
                runs.append(rec)
            else:
                res["warmup"] = rec
        res["runs"] = runs
        for k in ("wall_s", "rank_total_s", "setup_s", "first_bucket_s"):
            res[f"{k}_median"] = statistics.median(r[k] for r in runs)
        res["update_s"] = res["wall_s_median"]
        res["GBps"] = S / res["update_s"] / GB
        # Push + update end to end, steady state: the version before is dropped first (its
        # pinned stores become spares the next load reuses), and the trainer rewrites its
        # staging file in place (parallel writer): trainer tensors -> file -> pinned host
        # stores -> every GPU.
        try:
            c.client.delete("bench", 1)
            tensors = make_tensors(sp)
            t0 = time.perf_counter()
            write_safetensors(tensors, path)
            t1 = time.perf_counter()
            del tensors
            c.client.push("bench", 2, [path], timeout_s=900)
            t2 = time.perf_counter()
            rec = timed_update(c, 2, ranks)
            t3 = time.perf_counter()
            res["e2e"] = {
                "write_file_s": t1 - t0,
                "load_stores_s": t2 - t1,
                "store_load": agent_store_seconds(c, n),
                "update_s": t3 - t2,
                "total_s": t3 - t0,
                "update": rec,
            }
            log("e2e", json.dumps(res["e2e"]))
        except Exception as e:  # the main numbers stand without it
            res["e2e"] = {"error": repr(e)}
        # Push + update with a direct push: the trainer copies its tensors straight into the
        # agents' pinned host stores (BeginPush / parallel copy / CommitPush): no file. Steady
        # state as above (the version before is deleted first; its stores are reused).
        direct = []
        prev = 2
        for version in (3, 4):
            try:
                c.client.delete("bench", prev)
                tensors = make_tensors(sp)
                t0 = time.perf_counter()
                c.client.push_direct(
                    "bench",
                    version,
                    tensors,
                    node_id="bench",
                    threads=int(os.environ.get("CKPT_PUSH_THREADS", "16")),
                )
                t1 = time.perf_counter()
                rec = timed_update(c, version, ranks)
                t2 = time.perf_counter()
                del tensors
                direct.append(
                    {"push_s": t1 - t0, "update_s": t2 - t1, "total_s": t2 - t0, "update": rec}
                )
                log("e2e_direct", json.dumps(direct[-1]))
                prev = version
            except Exception as e:
                direct.append({"error": repr(e)})
                break
        res["e2e_direct"] = direct
    finally:
        c.close()
        if os.path.exists(path):
            os.unlink(path)
    return res


def agent_store_seconds(c: object, n: int) -> dict:
    """The workers' latest n store loads, from the agent's log: seconds of the whole load
    (read + pin) and of the pin alone."""
    out: dict[str, list[float]] = {"store_loaded": [], "store_pinned": []}
    for line in c.log("agent").splitlines():  # type: ignore[attr-defined]
        for ev, vals in out.items():
            if f'"{ev}"' in line:
                try:
                    vals.append(round(float(json.loads(line)["seconds"]), 3))
                except (ValueError, KeyError):
                    pass
    return {"load_s": out["store_loaded"][-n:], "pin_s": out["store_pinned"][-n:]}


def timed_update(c: object, version: int, ranks: list[int]) -> dict:
    t0 = time.perf_counter()
    job = c.client.update("bench", version, ranks=ranks)  # type: ignore[attr-defined]
    done = c.client.wait(job.id, 900)  # type: ignore[attr-defined]
    wall = time.perf_counter() - t0
    if done.state != tpb.JOB_SUCCEEDED:
        raise RuntimeError(f"update failed: {done.reason}")
    rr = list(done.results)
    return {
        "wall_s": wall,
        "rank_total_s": max(r.times.total_s for r in rr),
        "setup_s": max(r.times.setup_s for r in rr),
        "h2d_gpu_s": max(r.times.copy_s for r in rr),
        "broadcast_s": max(r.times.broadcast_s for r in rr),
        "reload_wait_s": max(r.times.reload_s for r in rr),
        "first_bucket_s": getattr(done, "first_bucket_s", 0.0),
        "buckets": done.buckets_total,
        "bucket_bytes": getattr(done, "bucket_bytes", 0),
    }


def ce_bench(n: int, size_gib: float, iters: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        + [f"--nproc-per-node={n}", str(REPO / "bench" / "ce_bench.py")]
        + ["--size-gib", str(size_gib), "--iters", str(iters), "--warmup", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        log(r.stdout[-3000:], r.stderr[-6000:])
        return {"error": f"rc={r.returncode}", "stderr_tail": r.stderr[-2000:]}
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=0)
    ap.add_argument("--size-gib", type=float, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--bucket-mib", type=int, default=0, help="ckptd's max bucket (0: default)")
    ap.add_argument("--skip-ce", action="store_true")
    ap.add_argument("--skip-ceilings", action="store_true")
    ap.add_argument("--out", default="bench.json")
    a = ap.parse_args()
    import torch

    n = a.gpus or torch.cuda.device_count()
    out: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpus": n,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "size_gib": a.size_gib,
    }
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    if not a.skip_ceilings:
        out["ceilings"] = ceilings(n, tmp / "ceil.json")
        log("ceilings", json.dumps(out["ceilings"]))
    out["ckptd"] = ckptd_bench(n, a.size_gib, a.iters, tmp / "ckptd", a.bucket_mib)
    if not a.skip_ce:
        out["checkpoint_engine"] = ce_bench(n, a.size_gib, a.iters)
    S = out["ckptd"]["bytes"]
    ce = out.get("ceilings", {})
    if ce:
        h2d = ce["h2d_concurrent_min_GBps"] * GB
        terms = [S / (n * h2d)]
        if ce.get("bcast_GBps"):
            terms.append(S / (ce["bcast_GBps"] * GB))
        out["roofline_s"] = max(terms)
        out["ratio_to_roofline"] = out["ckptd"]["update_s"] / out["roofline_s"]
        out["h1_target_s"] = 1.15 * S / (ce["h2d_alone_GBps"][0] * GB) if n == 1 else None
    cej = out.get("checkpoint_engine", {})
    if "update_wall_s" in cej:
        out["ce_over_ckptd"] = cej["update_wall_s"]["median"] / out["ckptd"]["update_s"]
    Path(a.out).write_text(json.dumps(out, indent=1))
    k = out["ckptd"]
    print(f"\n== {n} x {out['device']}, {S / (1 << 30):.1f} GiB bf16, {k['tensors']} tensors")
    if ce:
        print(f"ceilings: H2D alone {[round(x, 1) for x in ce['h2d_alone_GBps']]} GB/s, ")
        print(f"  concurrent {[round(x, 1) for x in ce['h2d_concurrent_GBps']]} GB/s,")
        print(f"  D2D {[round(x) for x in ce['d2d_copy_GBps']]} GB/s, bcast {ce.get('bcast_GBps')}")
        print(f"roofline {out['roofline_s']:.3f} s")
    print(f"ckptd update median {k['update_s']:.3f} s ({k['GBps']:.1f} GB/s), runs:")
    for r in k["runs"]:
        print("  ", json.dumps({x: round(y, 4) for x, y in r.items()}))
    if ce:
        print(f"ratio to roofline {out['ratio_to_roofline']:.2f}")
    print(
        f"push: file {k['push_write_file_s']:.2f} s + stores {k['push_load_stores_s']:.2f} s"
        f" = {k['push_total_s']:.2f} s; first bucket {k['first_bucket_s_median']:.3f} s"
    )
    print("push per worker:", json.dumps(k.get("push_store_load")))
    e2e = k.get("e2e", {})
    if "total_s" in e2e:
        print(
            f"push + update (steady state): file {e2e['write_file_s']:.2f} s + stores"
            f" {e2e['load_stores_s']:.2f} s + update {e2e['update_s']:.3f} s"
            f" = {e2e['total_s']:.2f} s; per worker {json.dumps(e2e['store_load'])}"
        )
    elif e2e:
        print("push + update failed:", e2e.get("error"))
    for d in k.get("e2e_direct", []):
        if "total_s" in d:
            print(
                f"direct push + update: push {d['push_s']:.2f} s + update {d['update_s']:.3f} s"
                f" = {d['total_s']:.2f} s"
            )
        else:
            print("direct push failed:", d.get("error"))
    if "update_wall_s" in cej:
        print(
            f"checkpoint-engine: update median {cej['update_wall_s']['median']:.3f} s "
            f"(all {[round(x, 3) for x in cej['update_wall_s']['all']]}), register "
            f"{cej['register_s']:.2f} s, gather {cej['gather_metas_s']:.2f} s;"
            f" ce/ckptd = {out['ce_over_ckptd']:.2f}"
        )
    elif cej:
        print("checkpoint-engine failed:", cej.get("error"))


if __name__ == "__main__":
    main()
