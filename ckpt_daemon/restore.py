"""Bringing instances back to one known version after a job that did not succeed.

An instance is *pending* from the moment a job starts sending it bytes until that job
succeeds: a job that fails, is cancelled, or is cut short by a ckptd restart leaves it
pending, not ready, and (vLLM) paused. Restoring runs an update back to the version the
instance last committed, from host memory: broadcast from the owners, or P2P reads from
owners or mirrors when an owner is gone. The failed job waits for the first attempt and
names the outcome; ckptd keeps retrying (with back-off) an instance that could not be
restored, e.g. until the agents of its ranks are back. Decisions are pure functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ckpt_daemon.model import Instance, RankRef

FIRST_BACKOFF_S = 2.0
MAX_BACKOFF_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Due:
    instance: str
    checkpoint: str
    version: int


def due_restores(
    instances: Iterable[Instance],
    *,
    busy: set[RankRef],
    attached: set[str],
    now: float,
    not_before: dict[str, float],
) -> tuple[list[Due], dict[str, str]]:
    """Which pending instances to restore now, and why each other pending one waits."""
    due: list[Due] = []
    waiting: dict[str, str] = {}
    for inst in instances:
        if not inst.pending:
            continue
        if not inst.checkpoint:
            waiting[inst.name] = "it never committed a version through ckptd: update it"
        elif set(inst.ranks) & busy:
            waiting[inst.name] = "a job runs on its ranks"
        elif any(r.node_id not in attached for r in inst.ranks):
            gone = sorted({r.node_id for r in inst.ranks if r.node_id not in attached})
            waiting[inst.name] = f"the agents of {gone} are not attached"
        elif now < not_before.get(inst.name, 0.0):
            waiting[inst.name] = "backing off after a failed attempt"
        else:
            due.append(Due(instance=inst.name, checkpoint=inst.checkpoint, version=inst.version))
    return due, waiting


def next_backoff(previous: float) -> float:
    return min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, previous * 2))


def split_instance(instances: Iterable[Instance], targets: set[RankRef]) -> str | None:
    """The first instance an update would leave with some ranks updated and others not."""
    for inst in instances:
        hit = set(inst.ranks) & targets
        if hit and hit != set(inst.ranks):
            return inst.name
    return None
