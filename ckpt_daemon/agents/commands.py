"""The only builder of agent commands: plain values in, `ckpt.v1.Command` out (the core
hands it to `AgentHub.command` / `send` without looking inside)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckpt.v1 import agent_pb2 as apb
from ckpt_daemon.agents.wire import tensor_meta
from ckpt_daemon.plan.deltas import DiffTask
from ckpt_daemon.plan.planner import Plan

Command = apb.Command  # opaque outside agents/


@dataclass(frozen=True, kw_only=True, slots=True)
class Span:
    """A byte range of a host store a Load fills from a file, or a Seal checksums:
    `rows` runs of nbytes / rows bytes, each `stride` bytes after the previous (Seal only).
    file_*: the file as scanned (0: unchecked)."""

    store_offset: int
    nbytes: int
    path: str = ""
    file_offset: int = 0
    file_size: int = 0
    file_dev: int = 0
    file_ino: int = 0
    file_ctime_ns: int = 0
    rows: int = 0
    stride: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class P2PSource:
    """Where readers of a P2P or shard-aware plan read one owner's store: its shared segment
    (a reader on its node), or its transfer-engine session and address."""

    session: str = ""
    addr: int = 0
    local_segment: str = ""


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateRun:
    """What every participant of one group of a job gets besides its own rank."""

    job_id: str
    checkpoint: str
    version: int
    plan: Plan
    master: tuple[str, int]  # the group's store (PrepareGroup's answer)
    sources: Sequence[P2PSource] = ()
    timeout_s: float
    receiver_timeout_s: float
    streamed: bool = False


def _items(spans: Sequence[Span]) -> list[apb.LoadItem]:
    return [
        apb.LoadItem(
            path=s.path,
            file_offset=s.file_offset,
            nbytes=s.nbytes,
            store_offset=s.store_offset,
            file_size=s.file_size,
            file_dev=s.file_dev,
            file_ino=s.file_ino,
            file_ctime_ns=s.file_ctime_ns,
            rows=s.rows,
            stride=s.stride,
        )
        for s in spans
    ]


def scan(paths: Sequence[str], read_uid: int | None) -> Command:
    return apb.Command(scan=apb.Scan(paths=list(paths), read_uid=read_uid))


def load(
    checkpoint: str,
    version: int,
    device: int,
    nbytes: int,
    spans: Sequence[Span] = (),
    read_uid: int | None = None,
) -> Command:
    """Allocates a store of nbytes on the device and fills the spans from their files."""
    return apb.Command(
        load=apb.Load(
            checkpoint=checkpoint,
            version=version,
            device=device,
            nbytes=nbytes,
            items=_items(spans),
            read_uid=read_uid,
        )
    )


def seal(checkpoint: str, version: int, device: int, spans: Sequence[Span]) -> Command:
    return apb.Command(
        seal=apb.Seal(checkpoint=checkpoint, version=version, device=device, items=_items(spans))
    )


def drop(checkpoint: str, version: int, device: int) -> Command:
    return apb.Command(drop=apb.Drop(checkpoint=checkpoint, version=version, device=device))


def diff(
    checkpoint: str, version: int, base: int, device: int, tasks: Sequence[DiffTask],
    max_nbytes: int = 0,
) -> Command:  # fmt: skip
    """Makes the device's delta store of version from base: one payload per task, in order
    (only if they come to at most max_nbytes; 0: any size)."""
    return apb.Command(
        diff=apb.Diff(
            checkpoint=checkpoint, version=version, base=base, device=device,
            max_nbytes=max_nbytes,
            items=[
                apb.DiffItem(
                    base_offset=t.base.store_offset if t.base is not None else -1,
                    target_offset=t.target.store_offset, nbytes=t.target.nbytes,
                    itemsize=t.itemsize,
                )
                for t in tasks
            ],
        )
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True, slots=True)
class PatchSpan:
    """One tensor a Patch makes: its bytes in the base's (and the new) store, its payload in
    the delta store, and the checksum the result must have."""

    offset: int
    nbytes: int
    itemsize: int
    encoding: int
    count: int
    delta_offset: int
    delta_nbytes: int
    target_checksum: int


def patch(
    checkpoint: str, version: int, base: int, device: int, spans: Sequence[PatchSpan]
) -> Command:
    """Makes version from base's store and the delta store of version from base."""
    return apb.Command(
        patch=apb.Patch(
            checkpoint=checkpoint, version=version, base=base, device=device,
            items=[
                apb.PatchItem(
                    offset=s.offset, nbytes=s.nbytes, itemsize=s.itemsize, encoding=s.encoding,
                    count=s.count, delta_offset=s.delta_offset, delta_nbytes=s.delta_nbytes,
                    target_checksum=s.target_checksum,
                )
                for s in spans
            ],
        )
    )  # fmt: skip


def abort(job_id: str, reason: str) -> Command:
    return apb.Command(abort=apb.Abort(job_id=job_id, reason=reason))


def prepare_group(job_id: str, device: int, world_size: int, group: str) -> Command:
    return apb.Command(
        prepare_group=apb.PrepareGroup(
            job_id=job_id, device=device, world_size=world_size, group=group
        )
    )


def _buckets(plan: Plan) -> list[apb.Bucket]:
    """The plan's buckets on the wire (planner.Entry's fields are BucketEntry's)."""
    return [
        apb.Bucket(
            owner=b.owner,
            nbytes=b.nbytes,
            entries=[apb.BucketEntry(**e._asdict()) for e in b.entries],
        )
        for b in plan.buckets
    ]


def run_updates(u: UpdateRun, want_layout: Sequence[bool]) -> list[Command]:
    """One RunUpdate per participant of u.plan, in group-rank order; want_layout[i]: ask
    participant i's engine for its sharding map (targets only)."""
    plan = u.plan
    what = apb.UpdatePlan(
        tensors=[tensor_meta(t) for t in plan.tensors],
        buckets=_buckets(plan),
        bucket_bytes=plan.bucket_bytes,
        nbuf=plan.nbuf,
        sources=[
            apb.P2PSource(session=s.session, addr=s.addr, local_segment=s.local_segment)
            for s in u.sources
        ],
        partial=plan.partial,
        kept=plan.kept,
        streamed=u.streamed,
        delta_base=plan.delta_base,
    )
    deadlines = apb.Deadlines(timeout_s=u.timeout_s, receiver_timeout_s=u.receiver_timeout_s)
    world = len(plan.participants)
    return [
        apb.Command(
            run_update=apb.RunUpdate(
                job_id=u.job_id,
                device=r.device,
                checkpoint=u.checkpoint,
                version=u.version,
                is_target=plan.is_target(i),
                want_layout=want_layout[i] and plan.is_target(i),
                rendezvous=apb.Rendezvous(
                    group=plan.group,
                    group_rank=i,
                    world_size=world,
                    master_addr=u.master[0],
                    master_port=u.master[1],
                ),
                plan=what,
                deadlines=deadlines,
            )
        )
        for i, r in enumerate(plan.participants)
    ]
