"""The lives of jobs, versions, shards and instances: which state may follow which, and the
rules that derive one state from others. Pure; the registry applies them on every change and
an illegal change raises before anything is recorded."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TypeVar

from ckpt_daemon.model import CheckpointState, Instance, JobState, ShardState

S = TypeVar("S", bound=enum.Enum)


class IllegalTransition(RuntimeError):
    """A change the life of a job, version, shard or instance does not allow: a bug in ckptd
    (the registry refuses it; nothing is recorded)."""


JOB: Mapping[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.RUNNING, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset(),
    JobState.CANCELLED: frozenset(),
}

# A shard is written (LOADING), then READY; its agent may lose it (LOST) and come back with
# it (READY again). FAILED is the end: a failed push, or a store whose bytes went wrong.
SHARD: Mapping[ShardState, frozenset[ShardState]] = {
    ShardState.LOADING: frozenset({ShardState.READY, ShardState.FAILED, ShardState.LOST}),
    ShardState.READY: frozenset({ShardState.LOST, ShardState.FAILED}),
    ShardState.LOST: frozenset({ShardState.READY, ShardState.FAILED}),
    ShardState.FAILED: frozenset(),
}

# A version follows its shards (version_state); a READY one never goes back to LOADING.
VERSION: Mapping[CheckpointState, frozenset[CheckpointState]] = {
    CheckpointState.LOADING: frozenset(
        {CheckpointState.READY, CheckpointState.FAILED, CheckpointState.LOST}
    ),
    CheckpointState.READY: frozenset({CheckpointState.LOST, CheckpointState.FAILED}),
    CheckpointState.LOST: frozenset({CheckpointState.READY, CheckpointState.FAILED}),
    CheckpointState.FAILED: frozenset(),
}


class InstanceState(enum.Enum):
    """What an instance is doing, derived from its record (instance_state)."""

    SERVING = "serving"  # ready, on checkpoint@version (+ overlays)
    UPDATING = "updating"  # a job may be changing what it holds (pending)
    NOT_SERVING = "not_serving"  # not ready, no job on it: joining, or a failed restore


def instance_state(inst: Instance) -> InstanceState:
    if inst.pending:
        return InstanceState.UPDATING
    return InstanceState.SERVING if inst.ready else InstanceState.NOT_SERVING


def check(table: Mapping[S, frozenset[S]], what: str, old: S, new: S) -> None:
    """Raises IllegalTransition unless new may follow old (staying put is always allowed)."""
    if old != new and new not in table[old]:
        raise IllegalTransition(f"{what}: {old.name} -> {new.name} is not a legal transition")


def version_state(shards: Iterable[ShardState]) -> CheckpointState:
    """A version's state from its shards': any failed → FAILED, any lost → LOST, all ready →
    READY (a version of no shards too), else LOADING."""
    states = set(shards)
    if ShardState.FAILED in states:
        return CheckpointState.FAILED
    if ShardState.LOST in states:
        return CheckpointState.LOST
    if states <= {ShardState.READY}:
        return CheckpointState.READY
    return CheckpointState.LOADING


def check_instance(old: Instance | None, new: Instance) -> None:
    """What an instance serves (checkpoint, version, overlays) changes only through a job
    that was pending on it, or while it does not serve (a join, a failed restore): a record
    that swaps the weights of a serving instance behind its jobs' back is refused."""
    if old is None or instance_state(old) != InstanceState.SERVING:
        return
    held = (old.checkpoint, old.version, old.overlays)
    if (new.checkpoint, new.version, new.overlays) != held and new.ready:
        raise IllegalTransition(
            f"instance {new.name!r}: serving {old.checkpoint}@{old.version} cannot become "
            f"{new.checkpoint}@{new.version} without a job"
        )
