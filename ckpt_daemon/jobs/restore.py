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

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from ckpt_common.errors import CkptError
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.model import Instance, Job, JobState, RankRef, UpdateSpec
from ckpt_daemon.registry.serving import overlay_of, serving
from ckpt_daemon.registry.store import Registry

if TYPE_CHECKING:
    from ckpt_daemon.jobs.runner import JobRunner

log = structlog.get_logger("ckptd.restore")

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


def untouched(inst: Instance, job: Job) -> bool:
    """Every rank of inst reported that its engine was never told to load."""
    by_owner = {r.owner: r for r in job.results}
    return all(r in by_owner and by_owner[r].engine_untouched for r in inst.ranks)


def settle(inst: Instance, job: Job, prev_pending: str) -> bool:
    """Records what a finished job left inst holding (it was pending on the job; prev_pending
    is what it was before). Returns whether inst changed."""
    if inst.pending != job.id:
        return False
    if job.state == JobState.SUCCEEDED:
        if job.spec.tensors:  # a partial update on top of what it holds: replayed on restore
            inst.overlays = [*inst.overlays, overlay_of(job)]
        else:
            inst.checkpoint, inst.version, inst.overlays = job.spec.checkpoint, job.version, []
        inst.ready, inst.reason, inst.pending = True, "", ""
    elif untouched(inst, job):  # refused before anything was loaded: as it was
        inst.pending = prev_pending
    else:
        inst.ready = False
        inst.reason = f"{job.kind.name.lower()} job {job.id} failed: {job.reason}"
    return True


def restore_steps(inst: Instance, method: str, cause: str) -> list[UpdateSpec]:
    """The updates that bring inst back to what it committed: its version, then each partial
    update it had taken on top, in order."""
    base = UpdateSpec(
        checkpoint=inst.checkpoint,
        version=inst.version,
        instances=[inst.name],
        method=method,
        rollback_of=cause,
    )
    return [base] + [
        UpdateSpec(
            checkpoint=o["checkpoint"],
            version=int(o["version"]),
            instances=[inst.name],
            method=method,
            tensors=list(o["tensors"]),
            rollback_of=cause,
        )
        for o in inst.overlays
    ]


class Restorer:
    """Drives restores: right after a failed job, and periodically for instances still
    pending (back-off per instance)."""

    def __init__(
        self,
        jobs: JobRunner,
        registry: Registry,
        hub: AgentHub,
        config: DaemonConfig,
        alive: Callable[[Instance], Awaitable[bool]] | None = None,
    ) -> None:
        self._jobs = jobs
        self._registry = registry
        self._hub = hub
        self._wait_s = config.update_timeout_s
        self._alive = alive
        self._backoff: dict[str, tuple[float, float]] = {}  # instance -> (not before, delay)
        self._busy: set[str] = set()

    async def after(self, job: Job, touched: list[Instance]) -> None:
        """Restores the instances a failed job left pending (first attempt) and says in the
        job's reason how each one ended."""
        if job.spec.rollback_of:
            return  # a failed restore is retried by the reconciler
        notes = [await self.restore(i) for i in touched if i.pending == job.id]
        covered = {r for i in self._registry.instances() for r in i.ranks}
        loose = [job.target_ranks[k] for k, r in enumerate(job.targets) if r not in covered]
        if loose:
            notes.append(f"ranks {loose} are no instance's: their engines may hold a mix")
        if notes:
            job.reason = f"{job.reason}; " + "; ".join(notes)
            log.warning("instances_restored", job=job.id, notes=notes)

    async def restore(self, inst: Instance) -> str:
        """One attempt to bring inst back to what it committed. Returns what happened."""
        if not inst.checkpoint:
            return f"{inst.name} holds no known version: not ready until updated"
        if inst.name in self._busy:
            return f"{inst.name} is being restored already"
        self._busy.add(inst.name)
        try:
            return await self._attempt(inst)
        finally:
            self._busy.discard(inst.name)

    async def _attempt(self, inst: Instance) -> str:
        target, cause = serving(inst), inst.pending or "reconcile"
        if self._alive is not None and not await self._alive(inst):
            return self._failed(inst, target, ["its engine does not answer"])
        errors: list[str] = []
        for method in ("broadcast", "p2p"):
            ids = []
            try:
                for spec in restore_steps(inst, method, cause):
                    rj = await self._jobs.run_to_end(spec, self._wait_s)
                    ids.append(rj.id)
                    if rj.state != JobState.SUCCEEDED:
                        return self._failed(inst, target, [f"job {rj.id}: {rj.reason}"])
            except CkptError as e:
                if ids:  # a later step could not start: the earlier ones changed inst
                    return self._failed(inst, target, [f"{method}: {e.message}"])
                errors.append(f"{method}: {e.message}")
                continue
            self._backoff.pop(inst.name, None)
            return f"{inst.name} restored to {target} (job {', '.join(ids)})"
        return self._failed(inst, target, errors)

    def _failed(self, inst: Instance, target: str, errors: list[str]) -> str:
        delay = next_backoff(self._backoff.get(inst.name, (0.0, 0.0))[1])
        self._backoff[inst.name] = (time.monotonic() + delay, delay)
        return (
            f"{inst.name} could not be restored to {target} ({'; '.join(errors)}): "
            "it stays paused and not ready; ckptd retries"
        )

    async def reconcile(self) -> None:
        """Restores pending instances whose turn has come (an agent attached but silent,
        frozen, counts as gone: an attempt would only fail)."""
        due, _ = due_restores(
            self._registry.instances(),
            busy=self._jobs.busy_targets(),
            attached={n for n in self._hub.attached_nodes() if self._hub.live(n)},
            now=time.monotonic(),
            not_before={k: v[0] for k, v in self._backoff.items()},
        )
        for d in due:
            inst = self._registry.instance(d.instance)
            if inst is not None and inst.pending and inst.name not in self._busy:
                log.info("instance_reconciled", instance=d.instance, note=await self.restore(inst))

    async def reconcile_forever(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reconcile()
            except Exception:  # a bug: log it, keep reconciling
                log.exception("reconcile_failed")
