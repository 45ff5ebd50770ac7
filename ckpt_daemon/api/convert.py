"""Wire types <-> core dataclasses. The only place in ckptd that builds _pb2 objects for
the public API."""

from __future__ import annotations

from collections.abc import Sequence

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import InvalidArgument
from ckpt_daemon import admission
from ckpt_daemon.agents.wire import tensor_meta
from ckpt_daemon.model import (
    AgentInfo,
    CheckpointVersion,
    Instance,
    InstanceKind,
    Job,
    Probe,
    RankRef,
    SourceFile,
    UpdateSpec,
)
from ckpt_daemon.plan.deltas import DeltaDecl
from ckpt_daemon.registry.serving import serving

_METHODS = {
    tpb.UPDATE_METHOD_UNSPECIFIED: "auto",
    tpb.UPDATE_BROADCAST: "broadcast",
    tpb.UPDATE_P2P: "p2p",
    tpb.UPDATE_SHARDED: "sharded",
    tpb.UPDATE_DELTA: "delta",
}
_METHOD_PB = {v: k for k, v in _METHODS.items()}


def sources_from_pb(sources: list[tpb.Source]) -> list[SourceFile]:
    return [SourceFile(path=s.path, node_id=s.node_id) for s in sources]


def checkpoint_to_pb(
    cv: CheckpointVersion,
    order: dict[RankRef, int],
    *,
    include_tensors: bool = False,
    mirror: CheckpointVersion | None = None,
) -> tpb.Checkpoint:
    out = tpb.Checkpoint(
        name=cv.name,
        version=cv.version,
        state=int(cv.state),
        reason=cv.reason,
        total_bytes=cv.total_bytes,
        tensor_count=len({t.name for t in cv.tensors}),  # pieces of one tensor count once
        created_unix=cv.created,
        ready_unix=cv.ready,
        shards=[
            tpb.Shard(
                node_id=s.owner.node_id,
                device=s.owner.device,
                rank=order.get(s.owner, -1),
                nbytes=s.nbytes,
                tensor_count=s.tensor_count,
                state=int(s.state),
                reason=s.reason,
            )
            for s in sorted(cv.shards.values(), key=lambda s: s.owner)
        ],
    )
    if cv.probe is not None:
        out.probe.CopyFrom(probe_to_pb(cv.probe))
    out.replicas = 2 if mirror is not None else 1
    if mirror is not None:
        out.mirrors.extend(checkpoint_to_pb(mirror, order).shards)
    if include_tensors:
        out.tensors.extend(tensor_meta(t) for t in cv.tensors)
    return out


def probe_from_pb(p: tpb.Probe) -> Probe | None:
    """None when the request carries no probe."""
    if not (p.prompt_token_ids or p.expected_token_ids or p.expected_logprobs):
        return None
    return Probe(
        prompt=tuple(p.prompt_token_ids),
        expected=tuple(p.expected_token_ids),
        logprobs=tuple(p.expected_logprobs),
        tolerance=p.logprob_tolerance,
    )


def probe_to_pb(p: Probe) -> tpb.Probe:
    return tpb.Probe(
        prompt_token_ids=list(p.prompt),
        expected_token_ids=list(p.expected),
        expected_logprobs=list(p.logprobs),
        logprob_tolerance=p.tolerance,
    )


def update_spec_from_pb(req: cpb.UpdateRequest) -> UpdateSpec:
    if req.method not in _METHODS:
        raise InvalidArgument(f"unknown update method {req.method}")
    if req.bucket_bytes < 0 or req.timeout_s < 0:
        raise InvalidArgument("bucket_bytes and timeout_s must not be negative")
    admission.check_name("checkpoint", req.checkpoint)
    admission.check_version(req.version, zero=True)
    admission.check_list("ranks", list(req.ranks))
    admission.check_list("instances", list(req.instances))
    for name in req.instances:
        admission.check_name("an instance name", name)
    admission.check_patterns(list(req.tensors))
    admission.check_bucket(req.bucket_bytes)
    return UpdateSpec(
        checkpoint=req.checkpoint,
        version=req.version,
        ranks=sorted(set(req.ranks)),
        instances=list(req.instances),
        method=_METHODS[req.method],
        bucket_bytes=req.bucket_bytes,
        tensors=list(req.tensors),
        timeout_s=req.timeout_s,
        stream=req.stream,
    )


def job_to_pb(job: Job) -> tpb.Job:
    return tpb.Job(
        id=job.id,
        kind=int(job.kind),
        state=int(job.state),
        reason=job.reason,
        checkpoint=job.spec.checkpoint,
        version=job.version,
        ranks=job.target_ranks,
        instances=job.spec.instances,
        buckets_total=job.buckets_total,
        buckets_done=job.buckets_done,
        bytes_total=job.bytes_total,
        bucket_bytes=job.bucket_bytes,
        created_unix=job.created,
        started_unix=job.started,
        finished_unix=job.finished,
        method=_METHOD_PB.get(job.method, tpb.UPDATE_METHOD_UNSPECIFIED),
        requested_method=_METHOD_PB.get(job.spec.method, tpb.UPDATE_METHOD_UNSPECIFIED),
        method_reason=job.method_reason,
        first_bucket_s=job.first_bucket_s,
        results=[
            tpb.RankResult(
                rank=r.rank,
                node_id=r.owner.node_id,
                device=r.owner.device,
                ok=r.ok,
                reason=r.reason,
                bytes=r.bytes,
                copy_bytes=r.copy_bytes,
                engine_untouched=r.engine_untouched,
                times=tpb.PhaseTimes(
                    copy_s=r.times.copy_s,
                    broadcast_s=r.times.broadcast_s,
                    reload_s=r.times.reload_s,
                    setup_s=r.times.setup_s,
                    total_s=r.times.total_s,
                ),
            )
            for r in job.results
        ],
    )


def agent_to_pb(a: AgentInfo, order: dict[RankRef, int]) -> tpb.Agent:
    return tpb.Agent(
        node_id=a.node_id,
        host=a.host,
        state=tpb.AGENT_ATTACHED if a.attached else tpb.AGENT_DETACHED,
        last_seen_unix=a.last_seen,
        version=a.version,
        pid=a.pid,
        ipc_dir=a.ipc_dir,
        devices=[
            tpb.Device(
                index=d.index,
                kind=d.kind,
                uuid=d.uuid,
                total_bytes=d.total_bytes,
                free_bytes=d.free_bytes,
                rank=order.get(RankRef(a.node_id, d.index), -1),
                ceilings=d.ceilings,
            )
            for d in a.devices
        ],
    )


def instance_from_pb(p: tpb.Instance) -> Instance:
    if not p.name:
        raise InvalidArgument("instance name is required")
    admission.check_name("instance name", p.name)
    admission.check_list("ranks", list(p.ranks), 4096)
    for r in p.ranks:
        admission.check_name("a rank's node_id", r.node_id)
        admission.check_device(r.device)
    kind = p.kind or tpb.INSTANCE_VLLM
    if kind not in (tpb.INSTANCE_VLLM, tpb.INSTANCE_RECEIVER):
        raise InvalidArgument(f"unknown instance kind {p.kind}")
    if kind == tpb.INSTANCE_VLLM and not p.endpoint.startswith(("http://", "https://")):
        raise InvalidArgument("a vLLM instance needs an http(s):// endpoint")
    if not p.ranks:
        raise InvalidArgument("an instance needs at least one rank (node_id, device)")
    ranks = [RankRef(r.node_id, r.device) for r in p.ranks]
    if len(set(ranks)) != len(ranks):
        raise InvalidArgument("an instance lists the same device twice")
    tp = p.tp_size or len(ranks)
    if tp <= 0 or len(ranks) % tp:
        raise InvalidArgument(f"{len(ranks)} ranks do not divide into tensor-parallel size {tp}")
    if p.weight_transfer not in ("", "extension", "ckptd"):
        raise InvalidArgument("weight_transfer must be 'ckptd' (native) or 'extension'")
    return Instance(
        name=p.name,
        kind=InstanceKind(kind),
        endpoint=p.endpoint,
        tp_size=tp,
        ranks=ranks,
        weight_transfer="" if p.weight_transfer == "extension" else p.weight_transfer,
    )


def instance_to_pb(i: Instance, order: dict[RankRef, int]) -> tpb.Instance:
    return tpb.Instance(
        name=i.name,
        kind=int(i.kind),
        endpoint=i.endpoint,
        weight_transfer=i.weight_transfer,
        tp_size=i.tp_size,
        ranks=[tpb.InstanceRank(node_id=r.node_id, device=r.device) for r in i.ranks],
        checkpoint=i.checkpoint,
        version=i.version,
        ready=i.ready,
        reason=i.reason,
        global_ranks=[order.get(r, -1) for r in i.ranks],
        overlays=[
            tpb.Overlay(checkpoint=o["checkpoint"], version=int(o["version"]), tensors=o["tensors"])
            for o in i.overlays
        ],
        serving=serving(i),
    )


def delta_decls(metas: Sequence[tpb.TensorMeta]) -> list[DeltaDecl]:
    """A delta push's declarations: every tensor must carry TensorMeta.delta."""
    out = []
    for m in metas:
        if not m.HasField("delta"):
            raise InvalidArgument(f"tensor {m.name!r} of a delta push carries no TensorMeta.delta")
        d = m.delta
        out.append(
            DeltaDecl(
                name=m.name, dtype=m.dtype, shape=tuple(m.shape), nbytes=m.nbytes,
                encoding=d.encoding, count=d.count, target_checksum=d.target_checksum,
                target_nbytes=d.target_nbytes,
            )
        )  # fmt: skip
    return out
