"""ckpt-receiver: the reference engine. Keeps every received tensor in memory and writes a
report (version and sha256 per tensor) after each update. It stands in for vLLM in data-plane
tests and GPU benchmarks.

Its devices: --node-id and --device name the agent worker it receives from (CPU: the slot;
CUDA: the GPU index on that node)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

import structlog

from ckpt_common.ipc import worker_endpoint
from ckpt_common.logs import setup_logging
from vllm_ext.receiver import Receiver, UpdateInfo

log = structlog.get_logger("ckpt_receiver")
STEP_TIMEOUT_S = 10.0  # a worker gone mid-update is given up after this (it cannot say so)


def tensor_sha256(t: Any) -> str:
    import torch

    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()


class ReferenceEngine:
    """Holds tensors like an engine holds parameters. With preallocate, a tensor first seen
    is allocated once and later updates copy into it (as vLLM's loader does)."""

    def __init__(
        self,
        *,
        device: Any = None,
        expect: dict[str, tuple] | None = None,
        prealloc: bool = False,
    ) -> None:
        self.tensors: dict[str, Any] = {}
        self.checkpoint = ""
        self.version = 0
        self.job_id = ""
        self.updates = 0
        self.device = device
        self.expect = expect  # name -> shape; validates like a real model would
        self.prealloc = prealloc  # allocate every tensor of an update before its first bucket
        self.tp: tuple[int, int] | None = None  # (size, rank): emulate a TP engine's layout

    def validate(self, info: UpdateInfo) -> str | None:
        if self.prealloc:
            self._allocate(info)
        if self.expect is None:
            return None
        for t in info.tensors:
            if t.name not in self.expect:
                return f"unknown tensor {t.name!r}"
            if tuple(t.shape) != tuple(self.expect[t.name]):
                want = list(self.expect[t.name])
                return f"tensor {t.name!r} has shape {list(t.shape)}, model wants {want}"
        return None

    def layout(self, info: UpdateInfo) -> dict[str, Any]:
        """An emulated tensor-parallel engine's sharding map (benchmarks on fewer GPUs than
        ranks): row-parallel weights (o_proj, down_proj) split on dimension 1, other
        matrices on dimension 0 where it divides, anything else whole."""
        assert self.tp is not None
        n, r = self.tp
        out: dict[str, Any] = {}
        for t in info.tensors:
            shape = [int(d) for d in t.shape]
            d = 1 if t.name.endswith(("o_proj.weight", "down_proj.weight")) else 0
            if len(shape) != 2 or shape[d] % n:
                out[t.name] = "whole"
                continue
            off = [0, 0]
            off[d], shape[d] = r * shape[d] // n, shape[d] // n
            out[t.name] = [off, shape]
        return out

    def _allocate(self, info: UpdateInfo) -> None:
        """Parameters exist before weights arrive, as in an engine (vLLM loads into them)."""
        import torch

        from ckpt_common.dtypes import torch_dtype

        for t in info.tensors:
            shape, dt = tuple(t.piece_shape or t.shape), torch_dtype(t.dtype)
            cur = self.tensors.get(t.name)
            if cur is None or tuple(cur.shape) != shape or cur.dtype != dt:
                self.tensors[t.name] = torch.empty(shape, dtype=dt, device=self.device)
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def load(self, info: UpdateInfo, tensors: Iterator[tuple[str, Any]]) -> None:
        for name, t in tensors:
            cur = self.tensors.get(name)
            if cur is not None and cur.shape == t.shape and cur.dtype == t.dtype:
                cur.copy_(t)
            else:
                self.tensors[name] = (
                    t.clone() if self.device is None else t.to(self.device, copy=True)
                )
        self.checkpoint, self.version, self.job_id = info.checkpoint, info.version, info.job_id
        self.updates += 1

    def base(self, name: str) -> Any:
        """What this engine holds of a tensor (a delta update's base), or None."""
        return self.tensors.get(name)

    def report(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "version": self.version,
            "job_id": self.job_id,
            "updates": self.updates,
            "tensors": {n: tensor_sha256(t) for n, t in sorted(self.tensors.items())},
        }


def write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt-receiver", description=__doc__)
    p.add_argument("--node-id", required=True)
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--ipc-dir", default="")
    p.add_argument("--report", default="", help="write version + sha256 per tensor here")
    p.add_argument("--once", action="store_true", help="exit after one update")
    p.add_argument("--cuda", action="store_true", help="keep tensors on the GPU")
    p.add_argument(
        "--cuda-index",
        type=int,
        default=-1,
        help="this process's index of that GPU (default: --device, or 0 if only one is visible)",
    )
    p.add_argument(
        "--prealloc", action="store_true", help="allocate all parameters before the first bucket"
    )
    p.add_argument(
        "--tp",
        default="",
        metavar="SIZE/RANK",
        help="emulate rank RANK of a SIZE-way tensor-parallel engine: report its layout and "
        "keep only its parts (benchmarks on fewer GPUs than ranks)",
    )
    p.add_argument(
        "--step-timeout-s",
        type=float,
        default=STEP_TIMEOUT_S,
        help="give an update up when its worker sends nothing for this long (it died)",
    )
    return p


def _device(a: argparse.Namespace):  # -> torch.device | None
    """The GPU this receiver keeps tensors on (set as current), or None (CPU). Imports torch
    either way: before announcing readiness, not during the first update."""
    import torch

    if not a.cuda:
        return None
    idx = a.cuda_index
    if idx < 0:
        idx = a.device if a.device < torch.cuda.device_count() else 0
    device = torch.device("cuda", idx)
    torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> None:
    a = _parser().parse_args(argv)
    setup_logging(json=True, service="ckpt-receiver", node=a.node_id, device=a.device)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    device = _device(a)
    engine = ReferenceEngine(device=device, prealloc=a.prealloc)
    if a.tp:
        size, _, rank = a.tp.partition("/")
        engine.tp = (int(size), int(rank))
    endpoint = worker_endpoint(a.node_id, a.device, a.ipc_dir or None)
    r = Receiver(endpoint, device=device, parts=engine.tp is not None)
    log.info("receiver_ready", endpoint=r.endpoint)
    if a.report:
        write_json(a.report, engine.report())
    while True:
        try:
            t0 = time.monotonic()
            done = r.receive(
                load=engine.load,
                validate=engine.validate,
                layout=engine.layout if engine.tp else None,
                base=None if engine.tp else engine.base,
                wait_s=3600.0,
                step_timeout_s=a.step_timeout_s,
            )
        except TimeoutError:
            continue
        except Exception as e:  # never die: the next update may work
            log.error("receive_failed", error=repr(e))
            r.reset()
            time.sleep(0.5)  # a refused rendezvous refuses again at once: no busy loop
            continue
        log.info(
            "update_received",
            ok=done.ok,
            reason=done.reason,
            version=done.version,
            seconds=round(time.monotonic() - t0, 4),
        )
        if device is not None:  # copies made while loading go back to the driver
            import torch

            torch.cuda.empty_cache()
        if done.ok and a.report:
            write_json(a.report, engine.report())
        if a.once:
            return


if __name__ == "__main__":
    main()
