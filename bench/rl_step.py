"""The RL step, end to end: from "the trainer has new weights in GPU memory" to "the engine
serves them", a new version every step.

    python -m bench.rl_step --size-gib 16 --steps 10 --out rl_step.json

A trainer process (this one) holds a synthetic Llama-shaped bf16 checkpoint on cuda:0; an
agent on the same node (one CUDA worker, spare stores pre-allocated and pinned: `--keep` + 1
of them) and a reference receiver engine on the same GPU (`ckpt-receiver --cuda
--prealloc`, registered as instance R). Every step changes the weights on the GPU, then
`Publisher(direct=True).publish(step, tensors)`: a direct push (BeginPush; the GPU -> host
copies and the GPU checksums; CommitPush), the update of R, and the pruning of versions
beyond `--keep`. Each phase is timed; the median, min and max of the steady steps are
reported and the first (cold) step apart. The H2D/D2H ceilings come from the same run, and
checkpoint-engine's equivalent step (bench/ce_rl_step.py: register the GPU tensors as a new
checkpoint in its reused pinned pool, gather metadata, update, unregister) runs after ours.

`--cpu-smoke` runs the same code path on CPU (CPU agent and receiver, 72 MiB of CPU
tensors, no ceilings, no checkpoint-engine) to check the script itself:

    python -m bench.rl_step --cpu-smoke --steps 4 --out /tmp/rl_smoke.json
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
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GB = 1e9
GIB = 1 << 30
PHASES = ("step_s", "push_s", "sum_s", "begin_s", "write_s", "map_s", "copy_s", "commit_s",
          "update_s", "prune_s")  # fmt: skip


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.rl_step",
        description="The RL step end to end: trainer GPU memory -> the engine serving it, a new "
        "version every step, with checkpoint-engine's equivalent step in the same run.",
    )
    ap.add_argument("--size-gib", type=float, default=16.0, help="bf16 checkpoint size")
    ap.add_argument("--steps", type=int, default=10, help="steps (the first is reported apart)")
    ap.add_argument("--keep", type=int, default=1, help="versions the publisher keeps")
    ap.add_argument("--streams", type=int, default=4, help="D2H streams of the trainer")
    ap.add_argument(
        "--no-prealloc", action="store_true",
        help="no spares made at start and no segments pinned before step 1 (the cold path)",
    )  # fmt: skip
    ap.add_argument("--skip-ce", action="store_true", help="no checkpoint-engine step")
    ap.add_argument(
        "--sharded", type=int, default=0, metavar="N",
        help="also a sharded publisher: N torchrun ranks, each 1/N of every tensor (on one "
        "GPU they share it)",
    )  # fmt: skip
    ap.add_argument(
        "--serial", action="store_true",
        help="also run the steps unstreamed (the whole push, then the update) for comparison",
    )  # fmt: skip
    ap.add_argument(
        "--delta-frac", type=float, default=0.0, metavar="F",
        help="also a delta publisher (Publisher(delta=True)): each step changes every F-th "
        "share of each tensor's elements (0.025: the RL pattern of bench.delta_steps)",
    )  # fmt: skip
    ap.add_argument("--skip-ceilings", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of this script")
    ap.add_argument("--out", default="rl_step.json")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be at least 2 (the first is cold)")
    if a.keep < 1:
        ap.error("--keep must be at least 1")
    return a


def workload(a: argparse.Namespace) -> list[tuple[str, tuple[int, ...]]]:
    from bench.llama import specs

    if a.cpu_smoke:  # 72 MiB: a store large enough to be kept as a spare and reused
        return [(f"model.layers.{i}.w", (4096, 1024)) for i in range(9)]
    return specs(a.size_gib)


def store_bytes(sp: list[tuple[str, tuple[int, ...]]]) -> int:
    """The host store of one device holding every tensor (each 256-byte aligned)."""
    import math

    from ckpt_daemon.plan.placement import align_up

    return sum(align_up(math.prod(s) * 2) for _, s in sp)


def make_tensors(sp: list[tuple[str, tuple[int, ...]]], device: str) -> dict[str, Any]:
    import torch

    from bench.llama import fill_value

    return {
        n: torch.full(s, fill_value(i), dtype=torch.bfloat16, device=device)
        for i, (n, s) in enumerate(sp)
    }


def start_cluster(root: Path, a: argparse.Namespace, nbytes: int) -> Any:
    """ckptd, the agent (spares pre-allocated unless --no-prealloc) and receiver R."""
    from ckpt.v1 import types_pb2 as tpb
    from tests.support.cluster import Cluster, wait_for

    c = Cluster(root)
    c.start_daemon("--receiver-timeout-s", "120")
    dev = ["--device", "cpu"] if a.cpu_smoke else ["--device", "cuda"]
    stores = ["--spare-stores", str(a.keep + 1)]
    if not a.no_prealloc:
        gib = (nbytes + (64 << 20)) / GIB  # a version's store and a margin, < twice it
        stores += ["--prealloc-store-gib", f"{gib:.6f}"]
    c._spawn("agent", ["-m", "ckpt_agent.main", "--daemon", c.addr, "--node-id", "bench",
                       "--slots", "1", *dev, *stores])  # fmt: skip
    recv = ["--cuda", "--prealloc"] if not a.cpu_smoke else []
    c._spawn("recv-0", ["-m", "vllm_ext.reference", "--node-id", "bench", "--device", "0", *recv])
    c.nodes.add("bench")
    c.wait_ranks(1, 180)
    wait_for(lambda: "receiver_ready" in c.log("recv-0"), 180, "the receiver")
    c.client.register_instance(
        tpb.Instance(name="R", kind=tpb.INSTANCE_RECEIVER, tp_size=1,
                     ranks=[tpb.InstanceRank(node_id="bench", device=0)])
    )  # fmt: skip
    if not a.no_prealloc:
        wait_for(lambda: "stores_preallocated" in c.log("agent"), 600, "the agent's spares")
    return c


def one_step(pub: Any, step: int, tensors: dict[str, Any], frac: float = 0.0) -> dict[str, float]:
    """A training step's new weights (on their device), then publish: push, update, prune.
    frac: change only that share of each tensor's elements (a strided set, new each step)."""
    import torch

    every = max(1, round(1 / frac)) if frac else 1
    for t in tensors.values():
        flat = t.view(-1)
        flat[step % every :: every] += 1.0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = pub.publish(step, tensors)
    step_s = time.perf_counter() - t0
    if res.state.value != "succeeded":
        raise RuntimeError(f"step {step}: the update {res.state.value}: {res.reason}")
    lp = pub.client.last_push
    return {
        "step_s": step_s, "push_s": res.push_s, "begin_s": lp.begin_s, "write_s": lp.write_s,
        "map_s": lp.map_s, "copy_s": lp.copy_s, "commit_s": lp.commit_s,
        "update_s": res.update_s, "prune_s": res.prune_s, "sum_s": lp.sum_s,
        "streamed": res.streamed,
        "newly_pinned": lp.newly_pinned, "trainer_checksums": lp.trainer_checksums,
        "d2h_GBps": lp.bytes / lp.copy_s / GB if lp.copy_s else 0.0,
        "push_bytes": lp.bytes, "method": pub.client.job(res.job_id).method,
        "delta_s": res.delta_s,
    }  # fmt: skip


def summarize(per_step: list[dict]) -> dict:
    steady = per_step[1:]
    out: dict = {"first": per_step[0], "steps": per_step}
    for k in PHASES:
        xs = [r[k] for r in steady]
        out[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return out


def ckptd_steps(
    a: argparse.Namespace, root: Path, stream: bool = True, delta: bool = False
) -> dict:
    from ckpt_trainer.publisher import Publisher

    sp = workload(a)
    nbytes = store_bytes(sp)
    device = "cpu" if a.cpu_smoke else "cuda:0"
    tensors = make_tensors(sp, device)
    c = start_cluster(root, a, nbytes)
    res: dict = {"bytes": sum(t.numel() * 2 for t in tensors.values()), "tensors": len(sp)}
    try:
        t0 = time.perf_counter()
        res["client_pinned_segments"] = 0 if a.no_prealloc else c.client.pin_segments("bench")
        res["client_pin_s"] = time.perf_counter() - t0
        c.client.push_streams = a.streams
        pub = Publisher("rl", instances=["R"], keep=a.keep, direct=True, node_id="bench",
                        client=c.client, timeout_s=900, stream=stream, delta=delta)  # fmt: skip
        res["streamed"], res["delta_frac"] = stream and not delta, a.delta_frac if delta else 0.0
        per_step = []
        for step in range(1, a.steps + 1):
            rec = one_step(pub, step, tensors, a.delta_frac if delta else 0.0)
            shown = json.dumps({k: round(v, 4) for k, v in rec.items()})
            log("ckptd step", "streamed" if stream else "serial", step, shown)
            per_step.append(rec)
        res.update(summarize(per_step))
        res["segments"] = vars(c.client.segments.stats)  # the trainer's mappings: hits, misses
        res["agent_tail"] = c.log("agent")[-3000:]
    finally:
        c.close()
    return res


def sharded_steps(a: argparse.Namespace, root: Path, ranks: int) -> dict:
    """bench/sharded_rl_step.py under torchrun against a fresh cluster: per step the slowest
    rank's step (rank 0's includes the update), each phase's worst rank."""
    sp = workload(a)
    c = start_cluster(root, a, store_bytes(sp))
    out_dir = root / "ranks"
    out_dir.mkdir()
    try:
        env = {**c.env, "CKPTD_ADDR": c.addr, "CKPT_NODE_ID": "bench",
               "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={ranks}", str(REPO / "bench" / "sharded_rl_step.py"),
             "--size-gib", str(a.size_gib), "--steps", str(a.steps), "--keep", str(a.keep),
             "--out-dir", str(out_dir), *(["--cpu-smoke"] if a.cpu_smoke else [])],
            env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        if r.returncode != 0:
            log(r.stdout[-3000:], r.stderr[-6000:])
            return {"error": f"rc={r.returncode}", "stderr_tail": r.stderr[-2000:]}
    finally:
        c.close()
    per_rank = [
        [json.loads(x) for x in (out_dir / f"rank{k}.jsonl").read_text().splitlines()]
        for k in range(ranks)
    ]
    per_step = []
    for recs in zip(*per_rank, strict=True):
        row = {k: max(x[k] for x in recs) for k in ("step_s", "push_s", "write_s", "copy_s",
                                                   "begin_s", "commit_s")}  # fmt: skip
        row |= {"update_s": recs[0]["update_s"], "prune_s": recs[0]["prune_s"]}
        per_step.append(row)
    res: dict = {"ranks": ranks, "gpus": per_rank[0][0]["gpus"], "steps": per_step,
                 "first": per_step[0]}  # fmt: skip
    for k in per_step[0]:
        xs = [s[k] for s in per_step[1:]]
        res[k] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
    return res


def d2h_ceiling(nbytes: int = 2 * GIB, reps: int = 5) -> dict:
    """Pinned device -> host GB/s on one stream and on four (cuda:0)."""
    import torch

    from ckpt_client import d2h

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").fill_(7)
    dst = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    out = {}
    for streams in (1, 4):
        d2h.start([(src, dst)], streams).wait()  # warm-up
        t0 = time.perf_counter()
        for _ in range(reps):
            d2h.start([(src, dst)], streams).wait()
        out[f"d2h_{streams}_streams_GBps"] = nbytes * reps / (time.perf_counter() - t0) / GB
    return out


def ceilings(tmp: Path) -> dict:
    out_file = tmp / "ceilings.json"
    subprocess.run([sys.executable, "-m", "bench.ceilings", "--gpus", "1", "--out", str(out_file)],
                   cwd=REPO, check=True, timeout=300)  # fmt: skip
    return json.loads(out_file.read_text()) | d2h_ceiling()


def ce_steps(a: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
         str(REPO / "bench" / "ce_rl_step.py"), "--size-gib", str(a.size_gib),
         "--steps", str(a.steps)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        log(r.stdout[-3000:], r.stderr[-6000:])
        return {"error": f"rc={r.returncode}", "stderr_tail": r.stderr[-2000:]}
    return json.loads(lines[-1])


def print_report(out: dict) -> None:
    for key in ("ckptd_serial", "ckptd", "ckptd_delta"):
        if key in out:
            print_ckptd(out, out[key])
    print_sharded(out)
    print_ce(out)


def print_ckptd(out: dict, k: dict) -> None:
    mode = "streamed push -> update" if k.get("streamed") else "push, then update (serial)"
    if k.get("delta_frac"):
        mode = f"delta push -> delta update, {100 * k['delta_frac']:.1f} % of elements change"
    print(f"\n== RL step ({mode}): {out['device']}, {k['bytes'] / GIB:.2f} GiB bf16, "
          f"{k['tensors']} tensors, {len(k['steps'])} steps (keep {out['keep']})")  # fmt: skip
    ce = out.get("ceilings", {})
    if ce:
        print(f"ceilings: H2D {ce['h2d_alone_GBps'][0]:.1f} GB/s, D2H 1 stream "
              f"{ce['d2h_1_streams_GBps']:.1f} / 4 streams {ce['d2h_4_streams_GBps']:.1f} GB/s;"
              f" S/H2D {out['roofline_s']:.3f} s")  # fmt: skip
    print(f"run start: client pinned {k['client_pinned_segments']} spare segments in "
          f"{k['client_pin_s']:.2f} s")  # fmt: skip
    print(f"trainer segments {k['segments']}; newly pinned per step "
          f"{[r['newly_pinned'] for r in k['steps']]}")  # fmt: skip
    methods = [r["method"] for r in k["steps"]]  # ckpt.v1.UpdateMethod: 1 broadcast, 4 delta
    print(f"pushed bytes per step {[r['push_bytes'] for r in k['steps']]}; update methods "
          f"{methods} (1 broadcast, 3 sharded, 4 delta); the trainer's delta per step "
          f"{[round(r['delta_s'], 4) for r in k['steps']]} s")  # fmt: skip
    print(f"{'phase':<10}{'median':>10}{'min':>10}{'max':>10}{'first':>10}")
    for p in PHASES:
        s = k[p]
        print(f"{p:<10}{s['median']:>10.3f}{s['min']:>10.3f}{s['max']:>10.3f}"
              f"{k['first'][p]:>10.3f}")  # fmt: skip
    if "roofline_s" in out:
        print(
            f"steady step / roofline {k['step_s']['median'] / out['roofline_s']:.2f}; "
            f"first step / steady {k['first']['step_s'] / k['step_s']['median']:.2f}"
        )


def print_sharded(out: dict) -> None:
    s = out.get("ckptd_sharded")
    if not s:
        return
    if "error" in s:
        print("\nsharded publisher failed:", s["error"])
        return
    print(f"\n== RL step, sharded publisher: {s['ranks']} ranks on {s['gpus']} GPU(s), each "
          "1/N of every tensor (push of all parts, one commit, then the update)")  # fmt: skip
    print(f"{'phase':<10}{'median':>10}{'min':>10}{'max':>10}{'first':>10}")
    for p in ("step_s", "push_s", "begin_s", "write_s", "copy_s", "commit_s", "update_s"):
        print(f"{p:<10}{s[p]['median']:>10.3f}{s[p]['min']:>10.3f}{s[p]['max']:>10.3f}"
              f"{s['first'][p]:>10.3f}")  # fmt: skip


def print_ce(out: dict) -> None:
    cej = out.get("checkpoint_engine", {})
    if "step_s" in cej:
        print(f"checkpoint-engine ({cej['mode']}): step median {cej['step_s']['median']:.3f} s "
              f"(register {cej['register_s']['median']:.3f}, gather "
              f"{cej['gather_s']['median']:.3f}, update {cej['update_s']['median']:.3f}, "
              f"unregister {cej['unregister_s']['median']:.3f}); first "
              f"{cej['first']['step_s']:.3f} s; ce/ckptd {out['ce_over_ckptd']:.2f}")  # fmt: skip
    elif cej:
        print("checkpoint-engine failed:", cej.get("error"))
    else:
        print("checkpoint-engine: not run")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    gpu = not a.cpu_smoke
    if gpu and not torch.cuda.is_available():
        raise SystemExit("bench.rl_step needs a CUDA GPU (or --cpu-smoke)")
    tmp = Path(tempfile.mkdtemp(prefix="ckpt-rl-step-"))
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(0) if gpu else "cpu (smoke)",
                 "size_gib": a.size_gib, "keep": a.keep, "prealloc": not a.no_prealloc}  # fmt: skip
    if gpu and not a.skip_ceilings:
        out["ceilings"] = ceilings(tmp)
        log("ceilings", json.dumps(out["ceilings"]))
    out["ckptd"] = ckptd_steps(a, tmp / "ckptd")
    if a.serial:
        out["ckptd_serial"] = ckptd_steps(a, tmp / "ckptd-serial", stream=False)
    if a.delta_frac:
        if gpu:
            torch.cuda.empty_cache()
        out["ckptd_delta"] = ckptd_steps(a, tmp / "ckptd-delta", delta=True)
    if a.sharded:
        if gpu:
            torch.cuda.empty_cache()
        out["ckptd_sharded"] = sharded_steps(a, tmp / "ckptd-sharded", a.sharded)
        log("sharded", json.dumps(out["ckptd_sharded"])[:4000])
    if gpu and not a.skip_ce:
        torch.cuda.empty_cache()
        out["checkpoint_engine"] = ce_steps(a)
    if "ceilings" in out:
        out["roofline_s"] = out["ckptd"]["bytes"] / (out["ceilings"]["h2d_alone_GBps"][0] * GB)
    if "step_s" in out.get("checkpoint_engine", {}):
        ce_step = out["checkpoint_engine"]["step_s"]["median"]
        out["ce_over_ckptd"] = ce_step / out["ckptd"]["step_s"]["median"]
    Path(a.out).write_text(json.dumps(out, indent=1))
    print_report(out)


if __name__ == "__main__":
    main()
