"""Evidence that deltas are real: a tiny Llama built here (fp32 master weights, Adam), trained
on synthetic tokens, served in bf16. After every optimizer step: the share of bf16 elements
that changed and the bytes of its delta (ckpt_common.delta's encodings) against dense.

    python -m bench.delta_steps --steps 10 --lrs 1e-6 1e-5 --out delta_steps.json

With `--cluster` every step is also pushed to a real ckptd (CPU agent with two devices,
two reference receivers): instance R is updated with `auto` (a delta from the version it
serves, which ckptd diffs in the host store) and instance S with a broadcast of the same
version, each job timed; both must end byte-identical to the trainer's bf16 weights.
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


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def tiny_llama(hidden: int, layers: int, seed: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=2048, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers, num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def served(model: Any) -> dict[str, Any]:
    """The bf16 weights an engine serves (what a Publisher(dtype="bf16") pushes)."""
    import torch

    return {n: p.detach().to(torch.bfloat16).contiguous() for n, p in model.state_dict().items()}


def delta_size(prev: dict[str, Any], cur: dict[str, Any]) -> tuple[int, int, int, int]:
    """(changed elements, elements, delta bytes, dense bytes) from prev to cur: elements
    compared as bit patterns, as ckpt_common.delta's encoder does."""
    import torch

    from ckpt_common import delta

    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    changed = total = dbytes = dense = 0
    for n, t in cur.items():
        size = t.element_size()
        a, b = (x.reshape(-1).view(ints[size]) for x in (prev[n], t))
        count = int((a != b).sum())
        enc = delta.choose(count, t.numel(), size)
        n_sent = count if enc != delta.Encoding.DENSE else t.numel()
        dbytes += delta.payload_nbytes(enc, n_sent, t.numel(), size)
        changed, total, dense = changed + count, total + t.numel(), dense + t.numel() * size
    return changed, total, dbytes, dense


def train(lr: float, steps: int, hidden: int, layers: int, seed: int, on_step: Any = None) -> list:
    import torch

    model = tiny_llama(hidden, layers, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    prev = served(model)
    if on_step is not None:
        on_step(0, prev)
    rows = []
    for step in range(1, steps + 1):
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
        loss = model(input_ids=ids, labels=ids).loss.float()
        opt.zero_grad()
        loss.backward()
        opt.step()
        cur = served(model)
        changed, total, dbytes, dense = delta_size(prev, cur)
        row = {"lr": lr, "step": step, "loss": loss.item(), "changed": changed,
               "elements": total, "changed_pct": 100.0 * changed / total,
               "delta_bytes": dbytes, "dense_bytes": dense,
               "delta_pct": 100.0 * dbytes / dense}  # fmt: skip
        if on_step is not None:
            row.update(on_step(step, cur))
        log(
            json.dumps(
                {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in row.items()}
            )
        )
        rows.append(row)
        prev = cur
    return rows


def start_cluster(root: Path) -> Any:
    from ckpt.v1 import types_pb2 as tpb
    from tests.support.cluster import Cluster, wait_for

    c = Cluster(root)
    c.start_daemon("--receiver-timeout-s", "120")
    c._spawn("agent", ["-m", "ckpt_agent.main", "--daemon", c.addr, "--node-id", "dbench",
                       "--slots", "2", "--device", "cpu"])  # fmt: skip
    for d, name in ((0, "R"), (1, "S")):
        rep = root / f"recv-{d}.json"
        c._spawn(f"recv-{d}", ["-m", "vllm_ext.reference", "--node-id", "dbench",
                               "--device", str(d), "--report", str(rep)])  # fmt: skip
        c.nodes.add("dbench")
        c.wait_ranks(2, 180)
        wait_for(lambda d=d: "receiver_ready" in c.log(f"recv-{d}"), 180, "a receiver")
        c.client.register_instance(
            tpb.Instance(name=name, kind=tpb.INSTANCE_RECEIVER, tp_size=1,
                         ranks=[tpb.InstanceRank(node_id="dbench", device=d)])
        )  # fmt: skip
    return c


def made(c: Any, version: int) -> bool:
    """ckptd logged the delta store of `version` as made."""
    return any(
        '"delta_made"' in line and f'"version": {version},' in line
        for line in c.log("ckptd").splitlines()
    )


def cluster_step(c: Any, root: Path, name: str) -> Any:
    """A step's callback: push the bf16 weights, update R (auto) and S (broadcast)."""
    from ckpt.v1 import types_pb2 as tpb
    from tests.support.cluster import read_report, wait_for
    from tests.support.tensors import digests

    def timed(version: int, instance: str, method: int) -> tuple[float, Any]:
        t0 = time.perf_counter()
        job = c.client.update(name, version, instances=[instance], method=method)
        job = c.client.wait(job.id, 300)
        if job.state != tpb.JOB_SUCCEEDED:
            raise RuntimeError(f"{instance} v{version}: {job.reason}")
        return time.perf_counter() - t0, job

    def step(i: int, weights: dict[str, Any]) -> dict:
        version = i + 1
        c.client.push_direct(name, version, weights, node_id="dbench")
        t0 = time.perf_counter()
        if version > 1:  # ckptd diffs the new version in the host store, then the update
            wait_for(lambda: made(c, version), 60, "the delta")
        diff_s = time.perf_counter() - t0
        delta_s, jd = timed(version, "R", tpb.UPDATE_METHOD_UNSPECIFIED)
        dense_s, jb = timed(version, "S", tpb.UPDATE_BROADCAST)
        want = digests({n: t for n, t in weights.items()})
        for rep in ("recv-0.json", "recv-1.json"):
            got = read_report(root / rep)["tensors"]
            if {n: got.get(n) for n in want} != want:
                raise RuntimeError(f"v{version}: {rep} does not hold the pushed bytes")
        for old in (version - 2,):
            if old > 0:
                c.client.delete(name, old)
        return {"diff_s": diff_s, "update_delta_s": delta_s, "update_dense_s": dense_s,
                "method": tpb.UpdateMethod.Name(jd.method), "why": jd.method_reason,
                "delta_moved": jd.results[0].bytes, "dense_moved": jb.results[0].bytes}  # fmt: skip

    return step


def summary(rows: list[dict]) -> dict:
    out = {}
    for lr in sorted({r["lr"] for r in rows}):
        rs = [r for r in rows if r["lr"] == lr]
        out[str(lr)] = {
            k: {"median": statistics.median(r[k] for r in rs), "min": min(r[k] for r in rs),
                "max": max(r[k] for r in rs)}
            for k in ("changed_pct", "delta_pct", "diff_s", "update_delta_s", "update_dense_s")
            if k in rs[0]
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.delta_steps", description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-6, 1e-5])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cluster", action="store_true", help="also push and update real engines")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    rows: list[dict] = []
    for k, lr in enumerate(a.lrs):
        if not a.cluster:
            rows += train(lr, a.steps, a.hidden, a.layers, a.seed)
            continue
        with tempfile.TemporaryDirectory(prefix="ckpt-delta-") as tmp:
            c = start_cluster(Path(tmp))
            try:
                hook = cluster_step(c, Path(tmp), f"tiny{k}")
                rows += train(lr, a.steps, a.hidden, a.layers, a.seed, hook)
            finally:
                c.close()
    out = {"args": vars(a), "summary": summary(rows), "steps": rows,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    print(json.dumps(out["summary"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
