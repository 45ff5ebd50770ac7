"""Instances, jobs and tensors as JSON and rows for the registry's SQLite tables."""

from __future__ import annotations

import json
from dataclasses import asdict, astuple

from ckpt_daemon.model import (
    CheckpointVersion,
    FailureOrigin,
    Instance,
    InstanceKind,
    Job,
    JobKind,
    JobState,
    PhaseTimes,
    Probe,
    RankRef,
    RankResult,
    UpdateSpec,
)


def instance_to_json(inst: Instance) -> dict:
    d = asdict(inst)
    d["kind"] = int(inst.kind)
    d["ranks"] = [[r.node_id, r.device] for r in inst.ranks]
    return d


def instance_from_json(d: dict) -> Instance:
    d = dict(d)
    d["kind"] = InstanceKind(d["kind"])
    d["ranks"] = [RankRef(n, i) for n, i in d["ranks"]]
    return Instance(**d)


def job_to_json(job: Job) -> dict:
    d = asdict(job)
    d["kind"] = int(job.kind)
    d["state"] = int(job.state)
    d["targets"] = [[r.node_id, r.device] for r in job.targets]
    d["results"] = [{**asdict(r), "owner": [r.owner.node_id, r.owner.device]} for r in job.results]
    return d


def job_from_json(d: dict) -> Job:
    d = dict(d)
    d["kind"] = JobKind(d["kind"])
    d["state"] = JobState(d["state"])
    d["spec"] = UpdateSpec(**d["spec"])
    d["targets"] = [RankRef(n, i) for n, i in d["targets"]]
    d["results"] = [
        RankResult(
            **{
                **r,
                "owner": RankRef(*r["owner"]),
                "times": PhaseTimes(**r["times"]),
                "origin": FailureOrigin(r.get("origin", 0)),
            }
        )
        for r in d["results"]
    ]
    return Job(**d)


def probe_from_json(d: dict) -> Probe:
    return Probe(
        prompt=tuple(d["prompt"]),
        expected=tuple(d["expected"]),
        logprobs=tuple(d["logprobs"]),
        tolerance=float(d["tolerance"]),
    )


def signed(v: int | None) -> int | None:
    """A uint64 as SQLite's signed 64-bit INTEGER."""
    if v is None:
        return None
    return v - (1 << 64) if v >= 1 << 63 else v


def tensor_rows(cv: CheckpointVersion) -> list[tuple]:
    """The rows of a version's tensors (the registry's tensors table)."""
    return [
        (
            cv.name,
            cv.version,
            i,
            t.name,
            t.dtype,
            json.dumps(list(t.shape)),
            t.nbytes,
            t.owner.node_id,
            t.owner.device,
            t.store_offset,
            t.path,
            t.file_offset,
            signed(t.checksum),
            None if t.piece is None else json.dumps([list(t.piece.offset), list(t.piece.shape)]),
            None if t.delta is None else json.dumps(list(astuple(t.delta))),
        )
        for i, t in enumerate(cv.tensors)
    ]


def shard_rows(cv: CheckpointVersion) -> list[tuple]:
    """The rows of a version's shards (the registry's shards table)."""
    return [
        (
            cv.name,
            cv.version,
            s.owner.node_id,
            s.owner.device,
            s.nbytes,
            s.tensor_count,
            int(s.state),
            s.segment,
            s.reason,
            s.p2p_session,
            s.p2p_addr,
        )
        for s in cv.shards.values()
    ]
