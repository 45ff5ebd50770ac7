"""Publisher: push a state dict (or a module's), update the fleet's instances, keep the last
K versions. Names and dtypes go through hooks on the way (FSDP/DDP/compile wrapper
prefixes dropped by default; an optional dtype cast, e.g. fp32 -> bf16)."""

from __future__ import annotations

import asyncio
import enum
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.credentials import Credentials
from ckptctl.client import DEFAULT_ADDR, Client

# wrapper prefixes that training frameworks add to parameter names
WRAPPERS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod|module)\.")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class JobOutcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    NOT_RUN = "not run"  # pushed only (no instances)


@dataclass(frozen=True, kw_only=True)
class PublishResult:
    checkpoint: str
    version: int
    state: JobOutcome
    reason: str = ""
    job_id: str = ""
    push_s: float = 0.0
    update_s: float = 0.0
    tensors: int = 0
    bytes: int = 0
    pruned: list[int] = field(default_factory=list)  # versions deleted by retention


def strip_wrappers(name: str) -> str:
    """model.layers.0... from _orig_mod.module._fsdp_wrapped_module.model.layers.0..."""
    while True:
        new = WRAPPERS.sub(lambda m: m.group(1), name)
        if new == name:
            return name
        name = new


def _state_dict(weights: Any) -> Mapping[str, Any]:
    sd = weights.state_dict() if hasattr(weights, "state_dict") else weights
    if not isinstance(sd, Mapping):
        raise TypeError("publish takes a state dict (name -> tensor) or a torch module")
    return sd


def prepare(
    weights: Any,
    rename: Callable[[str], str | None] = strip_wrappers,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The tensors to push: renamed (None drops a tensor), floating tensors cast to dtype,
    full (a DTensor is gathered), contiguous."""
    import torch

    cast = getattr(torch, DTYPES.get(dtype, dtype)) if dtype else None
    out: dict[str, Any] = {}
    for name, t in _state_dict(weights).items():
        new = rename(name)
        if new is None:
            continue
        full = getattr(t, "full_tensor", None)
        t = (full() if callable(full) else t).detach()
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        if new in out:
            raise ValueError(f"two tensors map to {new!r}")
        out[new] = t.contiguous()
    return out


class Publisher:
    def __init__(
        self,
        name: str,
        *,
        addr: str = DEFAULT_ADDR,
        credentials: Credentials | None = None,
        instances: list[str] | None = None,
        keep: int = 2,
        dtype: str | None = None,
        rename: Callable[[str], str | None] = strip_wrappers,
        node_id: str = "",
        direct: bool = False,
        timeout_s: float = 600.0,
        client: Client | None = None,
    ) -> None:
        """keep: versions to keep (>= 1; the ones instances serve are always kept);
        direct: copy straight into the agents' host stores on node_id (same node, same user)
        instead of through a staging file."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.name = name
        self.instances = list(instances or [])
        self.keep, self.dtype, self.rename = keep, dtype, rename
        self.node_id, self.direct, self.timeout_s = node_id, direct, timeout_s
        self.client = client or Client(addr, credentials=credentials)

    def publish(self, step: int, weights: Any, *, probe: tpb.Probe | None = None) -> PublishResult:
        """Pushes weights as version `step`, updates the instances, prunes old versions."""
        tensors = prepare(weights, self.rename, self.dtype)
        t0 = time.monotonic()
        if self.direct:
            cp = self.client.push_direct(
                self.name, step, tensors, node_id=self.node_id, timeout_s=self.timeout_s,
                probe=probe,
            )  # fmt: skip
        else:
            cp = self.client.push_tensors(
                self.name, step, tensors, node_id=self.node_id, timeout_s=self.timeout_s,
                probe=probe,
            )  # fmt: skip
        push_s = time.monotonic() - t0
        base = {"checkpoint": self.name, "version": step, "push_s": push_s,
                "tensors": cp.tensor_count, "bytes": cp.total_bytes}  # fmt: skip
        if not self.instances:
            return PublishResult(state=JobOutcome.NOT_RUN, pruned=self.prune(), **base)
        t1 = time.monotonic()
        job = self.client.update(self.name, step, instances=self.instances)
        job = self.client.wait(job.id, self.timeout_s)
        outcome = {
            tpb.JOB_SUCCEEDED: JobOutcome.SUCCEEDED,
            tpb.JOB_CANCELLED: JobOutcome.CANCELLED,
        }.get(job.state, JobOutcome.FAILED)
        pruned = self.prune() if outcome is JobOutcome.SUCCEEDED else []
        return PublishResult(
            state=outcome, reason=job.reason, job_id=job.id,
            update_s=time.monotonic() - t1, pruned=pruned, **base,
        )  # fmt: skip

    def prune(self) -> list[int]:
        """Deletes all but the newest `keep` READY versions, never one an instance serves."""
        served = {i.version for i in self.client.instances() if i.checkpoint == self.name}
        ready = sorted(
            cp.version
            for cp in self.client.checkpoints(self.name)
            if cp.state == tpb.CHECKPOINT_READY
        )
        doomed = [v for v in ready[: max(0, len(ready) - self.keep)] if v not in served]
        for v in doomed:
            self.client.delete(self.name, v)
        return doomed

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher:
    """Publisher for asyncio trainers: the same calls, awaited (run in a worker thread)."""

    def __init__(self, name: str, **kw: Any) -> None:
        self._pub = Publisher(name, **kw)

    async def publish(self, step: int, weights: Any, **kw: Any) -> PublishResult:
        return await asyncio.to_thread(self._pub.publish, step, weights, **kw)

    async def prune(self) -> list[int]:
        return await asyncio.to_thread(self._pub.prune)

    async def close(self) -> None:
        await asyncio.to_thread(self._pub.close)
