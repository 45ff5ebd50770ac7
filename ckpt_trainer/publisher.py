"""Publisher: push a state dict (or a module's), update the fleet's instances, keep the last
K versions. Names and dtypes go through hooks on the way (FSDP/DDP/compile wrapper
prefixes dropped by default; an optional dtype cast, e.g. fp32 -> bf16)."""

from __future__ import annotations

import asyncio
import enum
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.config import NODE_ID_ENV
from ckpt_client.client import DEFAULT_ADDR, Client
from ckpt_common.credentials import Credentials
from ckpt_common.errors import CkptError
from ckpt_trainer.deltas import DeltaTracker

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
    update_s: float = 0.0  # the update job, until every instance serves the version (streamed:
    # from the push's commit on; the rest of the update overlapped the push)
    streamed: bool = False  # the update was submitted before the push wrote its bytes
    prune_s: float = 0.0  # deleting the versions beyond `keep` (their stores become spares)
    tensors: int = 0
    bytes: int = 0
    pruned: list[int] = field(default_factory=list)  # versions deleted by retention
    delta_s: float = 0.0  # of push_s: computing the delta from the last version (delta=True)


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


def _cast(dtype: str | None) -> Any:
    import torch

    return getattr(torch, DTYPES.get(dtype, dtype)) if dtype else None


def renamed(
    state: Mapping[str, Any], rename: Callable[[str], str | None]
) -> Iterator[tuple[str, Any]]:
    """(new name, tensor) for each tensor the hook keeps (None drops one); two tensors
    mapping to one name raise ValueError."""
    seen: set[str] = set()
    for name, t in state.items():
        new = rename(name)
        if new is None:
            continue
        if new in seen:
            raise ValueError(f"two tensors map to {new!r}")
        seen.add(new)
        yield new, t


def cast_to(t: Any, cast: Any) -> Any:
    """t contiguous, floating tensors cast (cast None: as they are)."""
    if cast is not None and t.is_floating_point():
        t = t.to(cast)
    return t.contiguous()


def prepare(
    weights: Any,
    rename: Callable[[str], str | None] = strip_wrappers,
    dtype: str | None = None,
) -> dict[str, Any]:
    """The tensors to push: renamed (None drops a tensor), floating tensors cast to dtype,
    full (a DTensor is gathered), contiguous."""
    cast = _cast(dtype)
    out: dict[str, Any] = {}
    for new, t in renamed(_state_dict(weights), rename):
        full = getattr(t, "full_tensor", None)
        out[new] = cast_to((full() if callable(full) else t).detach(), cast)
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
        sharded: bool = False,
        group: Any = None,
        timeout_s: float = 600.0,
        client: Client | None = None,
        stream: bool = True,
        delta: bool = False,
    ) -> None:
        """keep: versions to keep (>= 1; the ones instances serve are always kept);
        direct: copy straight into the agents' host stores on node_id (same node, same user)
        instead of through a staging file; sharded: every rank of a torch.distributed job
        (group: its process group, default the world) calls publish with its own shards
        (DTensor/FSDP2 local shards, ckpt_trainer.sharded) and writes them into its own
        node's host stores (node_id, default $CKPT_NODE_ID or the host name); one version,
        committed once every rank is in; rank 0 updates the instances and prunes.
        stream (direct, one part, with instances): the update starts before the bytes are
        written and each bucket flows to the engines as soon as it has landed
        (Client.push_streamed); engines still verify every tensor and resume only on the
        whole version.
        delta (direct, one part): from the second version on, push only what changed since
        the last version published, computed where the tensors are (ckpt_trainer.deltas;
        it keeps a copy of the last version there); ckptd makes the full version in the host
        stores and updates engines serving the last version with the delta alone. A base
        ckptd no longer holds means a full push."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.name = name
        self.instances = list(instances or [])
        self.keep, self.dtype, self.rename = keep, dtype, rename
        self.node_id, self.direct, self.timeout_s = node_id, direct or sharded, timeout_s
        self.sharded, self.group = sharded, group
        self.stream = stream and direct and not sharded and not delta
        self.deltas = DeltaTracker() if delta and direct and not sharded else None
        if sharded and not node_id:
            self.node_id = os.environ.get(NODE_ID_ENV) or socket.gethostname()
        self.client = client or Client(addr, credentials=credentials)

    def publish(self, step: int, weights: Any, *, probe: tpb.Probe | None = None) -> PublishResult:
        """Pushes weights as version `step`, updates the instances, prunes old versions."""
        if self.sharded:
            return self._publish_sharded(step, weights, probe)
        tensors = prepare(weights, self.rename, self.dtype)
        t0 = time.monotonic()
        if self.deltas is not None:
            cp, delta_s = self._push_delta(step, tensors, probe)
            return self._update(step, cp, time.monotonic() - t0, delta_s=delta_s)
        if self.stream and self.instances:
            cp, job = self.client.push_streamed(
                self.name, step, tensors, node_id=self.node_id, instances=self.instances,
                timeout_s=self.timeout_s, probe=probe,
            )  # fmt: skip
            return self._update(step, cp, time.monotonic() - t0, job)
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
        return self._update(step, cp, time.monotonic() - t0)

    def _push_delta(
        self, step: int, tensors: dict[str, Any], probe: tpb.Probe | None
    ) -> tuple[Any, float]:
        """A delta push from the last version published, or a full one where there is none
        (or ckptd no longer holds it); either way remembered as the next one's base."""
        assert self.deltas is not None
        t0 = time.monotonic()
        items = self.deltas.deltas(tensors)
        delta_s = time.monotonic() - t0
        cp = None
        if items is not None:
            try:
                cp = self.client.push_delta(
                    self.name, step, self.deltas.version, items, node_id=self.node_id,
                    timeout_s=self.timeout_s, probe=probe, early=bool(self.instances),
                )  # fmt: skip
            except CkptError as e:
                if e.code not in ("NOT_FOUND", "FAILED_PRECONDITION"):
                    raise
        if cp is None:
            cp = self.client.push_direct(
                self.name, step, tensors, node_id=self.node_id, timeout_s=self.timeout_s,
                probe=probe,
            )  # fmt: skip
        self.deltas.remember(step, tensors)
        return cp, delta_s

    def _publish_sharded(self, step: int, weights: Any, probe: tpb.Probe | None) -> PublishResult:
        import torch.distributed as dist

        from ckpt_trainer.sharded import local_items, share

        items = local_items(_state_dict(weights), self.rename, _cast(self.dtype), self.group)
        rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        t0 = time.monotonic()
        cp = self.client.push_part(
            self.name, step, items, node_id=self.node_id, part=rank, parts=world,
            timeout_s=self.timeout_s, probe=probe,
        )  # fmt: skip
        push_s = time.monotonic() - t0
        if rank != 0:
            told = share(None, self.group)
            if "error" in told:
                raise RuntimeError(f"rank 0 could not update the instances: {told['error']}")
            return PublishResult(
                checkpoint=self.name, version=step, state=JobOutcome(told["state"]),
                reason=told["reason"], job_id=told["job_id"], push_s=push_s,
                update_s=told["update_s"], tensors=cp.tensor_count, bytes=cp.total_bytes,
                pruned=told["pruned"],
            )  # fmt: skip
        try:
            res = self._update(step, cp, push_s)
        except Exception as e:
            share({"error": f"{type(e).__name__}: {str(e)[:2000]}"}, self.group)
            raise
        share(
            {"state": res.state.value, "reason": res.reason[:2000], "job_id": res.job_id,
             "update_s": res.update_s, "pruned": res.pruned},
            self.group,
        )  # fmt: skip
        return res

    def _update(
        self,
        step: int,
        cp: tpb.Checkpoint,
        push_s: float,
        job: tpb.Job | None = None,
        delta_s: float = 0.0,
    ) -> PublishResult:
        """Updates the instances to the pushed version (or waits for the job streamed from
        the push), prunes once they serve it."""
        base = {"checkpoint": self.name, "version": step, "push_s": push_s,
                "tensors": cp.tensor_count, "bytes": cp.total_bytes,
                "streamed": job is not None, "delta_s": delta_s}  # fmt: skip
        if not self.instances:
            return PublishResult(state=JobOutcome.NOT_RUN, pruned=self.prune(), **base)
        t1 = time.monotonic()
        if job is None:
            job = self.client.update(self.name, step, instances=self.instances)
        job = self.client.wait(job.id, self.timeout_s)
        outcome = {
            tpb.JOB_SUCCEEDED: JobOutcome.SUCCEEDED,
            tpb.JOB_CANCELLED: JobOutcome.CANCELLED,
        }.get(job.state, JobOutcome.FAILED)
        t2 = time.monotonic()
        pruned = self.prune() if outcome is JobOutcome.SUCCEEDED else []
        return PublishResult(
            state=outcome, reason=job.reason, job_id=job.id, update_s=t2 - t1,
            prune_s=time.monotonic() - t2, pruned=pruned, **base,
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
        gone = []
        for v in doomed:
            try:
                self.client.delete(self.name, v)
            except CkptError as e:  # in use (a job reads it, a delta push's base): next time
                if e.code != "FAILED_PRECONDITION":
                    raise
                continue
            gone.append(v)
        return gone

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
