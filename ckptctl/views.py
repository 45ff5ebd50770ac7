"""How each resource prints as a table row (`-o table`, and `-o wide` with more columns), and
the one-line summary of a job that progress and `--wait` print."""

from __future__ import annotations

import time
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.ranks import format_ranks
from ckptctl.term import age, size, styled


def enum_name(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix)


def job_state(j: tpb.Job) -> str:
    return enum_name(tpb.JobState, j.state, "JOB_")


def took_s(j: tpb.Job) -> float:
    return (j.finished_unix - j.started_unix) if j.finished_unix and j.started_unix else 0.0


def delivered(j: tpb.Job) -> int:
    """Bytes delivered so far (by buckets)."""
    return j.bytes_total * j.buckets_done // j.buckets_total if j.buckets_total else 0


def job_line(j: tpb.Job, state: str | None = None) -> str:
    took = took_s(j)
    extra = f"  {took:.3f}s {j.bytes_total / took / 1e9:.2f} GB/s" if took else ""
    if not took and j.state == tpb.JOB_RUNNING and j.started_unix and j.buckets_total:
        done = delivered(j)
        rate = done / max(1e-3, time.time() - j.started_unix)
        extra = f"  {size(done)}/{size(j.bytes_total)} {rate / 1e9:.2f} GB/s"
        if done:
            extra += f" ETA {(j.bytes_total - done) / rate:.1f}s"
    reason = f"  reason: {j.reason}" if j.reason else ""
    return (
        f"job {j.id} {state or job_state(j)} {j.checkpoint}@{j.version} "
        f"ranks {format_ranks(list(j.ranks))} buckets {j.buckets_done}/{j.buckets_total} "
        f"({size(j.bytes_total)}){extra}{reason}"
    )


def _jobs(jobs: list[tpb.Job], wide: bool, now: float) -> tuple[list[str], list[list[Any]]]:
    header = ["ID", "KIND", "STATE", "CHECKPOINT", "RANKS", "BUCKETS", "BYTES", "TIME", "AGE"]
    if wide:
        header += ["METHOD", "GB/S", "FIRST-BUCKET", "INSTANCES"]
    header.append("REASON")
    rows = []
    for j in jobs:
        took = took_s(j)
        row: list[Any] = [
            j.id,
            enum_name(tpb.JobKind, j.kind, "JOB_"),
            styled(job_state(j)),
            f"{j.checkpoint}@{j.version}",
            format_ranks(list(j.ranks)) if j.ranks else "-",
            f"{j.buckets_done}/{j.buckets_total}",
            size(j.bytes_total),
            f"{took:.3f}s" if took else "-",
            age(j.created_unix, now),
        ]
        if wide:
            row += [
                enum_name(tpb.UpdateMethod, j.method, "UPDATE_")
                .lower()
                .replace("method_unspecified", "-"),
                f"{j.bytes_total / took / 1e9:.2f}" if took else "-",
                f"{j.first_bucket_s:.3f}s" if j.first_bucket_s else "-",
                ",".join(j.instances) or "-",
            ]
        rows.append([*row, j.reason if wide else j.reason[:60]])
    return header, rows


def _checkpoints(cps: list[tpb.Checkpoint], wide: bool, now: float) -> tuple[list, list]:
    header = ["NAME", "VERSION", "STATE", "TENSORS", "BYTES", "RANKS", "AGE"]
    if wide:
        header += ["NODES", "REPLICAS", "PROBE", "LOAD-TIME"]
    header.append("REASON")
    rows = []
    for cp in cps:
        row: list[Any] = [
            cp.name,
            str(cp.version),
            styled(enum_name(tpb.CheckpointState, cp.state, "CHECKPOINT_")),
            str(cp.tensor_count),
            size(cp.total_bytes),
            format_ranks([s.rank for s in cp.shards if s.rank >= 0]) or "-",
            age(cp.created_unix, now),
        ]
        if wide:
            load = cp.ready_unix - cp.created_unix if cp.ready_unix else 0
            row += [
                ",".join(sorted({s.node_id for s in cp.shards})) or "-",
                str(cp.replicas or 1),
                "yes" if cp.probe.expected_token_ids else "no",
                f"{load:.2f}s" if load else "-",
            ]
        rows.append([*row, cp.reason if wide else cp.reason[:60]])
    return header, rows


def _agents(agents: list[tpb.Agent], wide: bool, now: float) -> tuple[list, list]:
    header = ["RANK", "NODE", "DEVICE", "KIND", "STATE", "HOST"]
    if wide:
        header += ["FREE", "TOTAL", "COPY-CEILING", "HEARD", "PID", "VERSION", "UUID"]
    rows = []
    for ag in agents:
        for d in ag.devices:
            row: list[Any] = [
                str(d.rank) if d.rank >= 0 else "-",
                ag.node_id,
                str(d.index),
                d.kind,
                styled(enum_name(tpb.AgentState, ag.state, "AGENT_")),
                ag.host,
            ]
            if wide:
                copy = d.ceilings.get("copy", 0.0)
                row += [size(d.free_bytes), size(d.total_bytes),
                        f"{copy / 1e9:.1f} GB/s" if copy else "-", age(ag.last_seen_unix, now),
                        str(ag.pid), ag.version or "-", d.uuid]  # fmt: skip
            rows.append(row)
    return header, rows


def _instances(insts: list[tpb.Instance], wide: bool, now: float) -> tuple[list, list]:
    header = ["NAME", "KIND", "TP", "RANKS", "SERVES", "READY"]
    if wide:
        header += ["ENDPOINT", "DEVICES", "WEIGHT-TRANSFER"]
    header.append("REASON")
    rows = []
    for i in insts:
        row: list[Any] = [
            i.name,
            enum_name(tpb.InstanceKind, i.kind, "INSTANCE_"),
            str(i.tp_size),
            format_ranks([r for r in i.global_ranks if r >= 0]) or "-",
            i.serving or (f"{i.checkpoint}@{i.version}" if i.checkpoint else "-"),
            styled("yes" if i.ready else "no"),
        ]
        if wide:
            row += [i.endpoint or "-", ",".join(f"{r.node_id}/{r.device}" for r in i.ranks),
                    i.weight_transfer or "extension"]  # fmt: skip
        rows.append([*row, i.reason if wide else i.reason[:60]])
    return header, rows


ROWS = {"jobs": _jobs, "checkpoints": _checkpoints, "agents": _agents, "instances": _instances}


def rows(kind: str, items: list[Any], wide: bool) -> tuple[list[str], list[list[Any]]]:
    """(header, rows) of a list of one resource kind."""
    return ROWS[kind](items, wide, time.time())
