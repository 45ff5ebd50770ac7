"""Readers of the agents' answers: each turns a `ckpt.v1.CommandResult` (or a progress
message) into plain values, so the core never looks inside a wire message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt_common.layout_wire import from_pb
from ckpt_daemon.model import FailureOrigin, PhaseTimes, RankRef, RankResult
from ckpt_daemon.plan.deltas import Payload

log = structlog.get_logger("ckptd.agents")


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannedTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data_offset: int  # of the tensor's bytes in the file


@dataclass(frozen=True, kw_only=True, slots=True)
class ScannedFile:
    path: str  # the real path (links resolved)
    size: int
    dev: int
    ino: int
    ctime_ns: int
    tensors: tuple[ScannedTensor, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class StoreReady:
    segment: str
    nbytes: int
    seconds: float
    p2p: tuple[str, int]  # (session, address); ("", 0): not registered for P2P
    checksums: tuple[int, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class BucketProgress:
    job_id: str
    device: int
    bucket: int  # the bucket just delivered to the engine
    bytes: int


def scanned(res: apb.CommandResult) -> list[ScannedFile]:
    return [
        ScannedFile(
            path=f.path,
            size=f.size,
            dev=f.dev,
            ino=f.ino,
            ctime_ns=f.ctime_ns,
            tensors=tuple(
                ScannedTensor(
                    name=t.meta.name,
                    dtype=t.meta.dtype,
                    shape=tuple(t.meta.shape),
                    nbytes=t.meta.nbytes,
                    data_offset=t.data_offset,
                )
                for t in f.tensors
            ),
        )
        for f in res.scan.files
    ]


def store_ready(res: apb.CommandResult) -> StoreReady:
    s = res.store
    return StoreReady(
        segment=s.segment,
        nbytes=s.nbytes,
        seconds=s.seconds,
        p2p=(s.p2p.session, s.p2p.addr),
        checksums=tuple(s.checksums),
    )


def diff_done(res: apb.CommandResult) -> tuple[str, int, list[Payload], float]:
    """A Diff's answer: (segment, bytes, the payloads in its items' order, seconds)."""
    d = res.diff
    made = [Payload(e.encoding, e.count, e.offset, e.nbytes, e.checksum) for e in d.entries]
    return d.segment, d.nbytes, made, d.seconds


def group_ready(res: apb.CommandResult) -> tuple[str, int]:
    """Where the group's store listens (PrepareGroup's answer)."""
    return res.group.addr, res.group.port


def progress(p: apb.Progress) -> BucketProgress:
    return BucketProgress(job_id=p.job_id, device=p.device, bucket=p.bucket, bytes=p.bytes)


def _origin(value: int) -> FailureOrigin:
    try:
        return FailureOrigin(value)
    except ValueError:  # a newer agent's: the rank's own, as an unsaid one
        return FailureOrigin.UNSPECIFIED


def rank_result(rank: int, owner: RankRef, res: apb.CommandResult) -> RankResult:
    u = res.update.result
    return RankResult(
        rank=rank,
        owner=owner,
        ok=u.ok,
        reason=u.reason,
        bytes=u.bytes,
        copy_bytes=u.copy_bytes,
        engine_untouched=u.engine_untouched,
        times=PhaseTimes(
            copy_s=u.times.copy_s,
            broadcast_s=u.times.broadcast_s,
            reload_s=u.times.reload_s,
            setup_s=u.times.setup_s,
            total_s=u.times.total_s,
        ),
        origin=_origin(res.update.origin) if not u.ok else FailureOrigin.UNSPECIFIED,
    )


def layout(res: apb.CommandResult) -> dict[str, Any] | None:
    """The engine's sharding map the update asked for, {name: "whole" | [offset, shape] |
    "none"} (vllm_ext.layout); None: it did not tell, or told what cannot be read."""
    if not res.update.HasField("layout"):
        return None
    try:
        return from_pb(res.update.layout)
    except ValueError as e:
        log.warning("layout_unreadable", error=str(e))
        return None
