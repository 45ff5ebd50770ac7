"""Running a planned job: the group rendezvous, one RunUpdate per participant, the engine
triggers, progress, and the first failure aborting everyone else. Every wait has a
deadline, and a participant's agent that goes silent (frozen, cut off) fails the job within
the hub's silence limit (seconds), not the job's deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt_common.errors import Aborted, CkptError
from ckpt_daemon.agents import AgentHub
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.convert import tensor_meta
from ckpt_daemon.model import Instance, InstanceKind, Job, PhaseTimes, RankRef, RankResult
from ckpt_daemon.planner import Plan
from ckpt_daemon.registry import Registry

log = structlog.get_logger("ckptd.execute")
PEER_FAILED = "another rank failed"  # how a worker says the failure was not its own
REPORT_GRACE_S = 3.0  # after the first failure, how long the others get to report theirs

EngineTrigger = Callable[[Instance, Job, float], Awaitable[None]]


async def no_trigger(instance: Instance, job: Job, timeout: float) -> None:
    return None


class Executor:
    def __init__(
        self, registry: Registry, hub: AgentHub, config: DaemonConfig, trigger: EngineTrigger
    ) -> None:
        self._registry = registry
        self._hub = hub
        self._config = config
        self._trigger = trigger

    def abort(self, job: Job, plan: Plan, reason: str) -> None:
        for r in plan.participants:
            self._hub.send(r.node_id, apb.Command(abort=apb.Abort(job_id=job.id, reason=reason)))

    async def run(
        self,
        job: Job,
        plan: Plan,
        deadline: float,
        sources: list[apb.P2PSource],
        notify: Callable[[Job], None],
    ) -> None:
        """Runs a planned job on the agents (and triggers the engines); raises on failure."""
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        master = plan.participants[0]
        res = await self._hub.command(
            master.node_id,
            apb.Command(
                prepare_group=apb.PrepareGroup(
                    job_id=job.id, device=master.device, world_size=len(plan.participants)
                )
            ),
            min(self._config.command_timeout_s, left()),
        )
        addr, port = res.group.addr, res.group.port

        done_per_target: dict[RankRef, int] = {r: 0 for r in plan.targets}

        def progress(node_id: str, p: apb.Progress) -> None:
            r = RankRef(node_id, p.device)
            if r in done_per_target:
                done_per_target[r] = max(done_per_target[r], p.bucket + 1)
                new = min(done_per_target.values())
                if job.first_bucket_s == 0.0 and p.bucket == 0:
                    job.first_bucket_s = time.time() - job.created
                if new != job.buckets_done:
                    job.buckets_done = new
                    notify(job)

        self._hub.on_progress(job.id, progress)
        tensors = [tensor_meta(t) for t in plan.tensors]
        buckets = [
            apb.Bucket(
                owner=b.owner,
                nbytes=b.nbytes,
                entries=[
                    apb.BucketEntry(
                        tensor=e.tensor,
                        bucket_offset=e.bucket_offset,
                        store_offset=e.store_offset,
                        nbytes=e.nbytes,
                        chunk_offset=e.chunk_offset,
                    )
                    for e in b.entries
                ],
            )
            for b in plan.buckets
        ]
        order = {r: i for i, r in enumerate(self._registry.rank_order())}

        async def run_rank(g: int, r: RankRef) -> RankResult:
            cmd = apb.Command(
                run_update=apb.RunUpdate(
                    job_id=job.id,
                    device=r.device,
                    group_rank=g,
                    world_size=len(plan.participants),
                    master_addr=addr,
                    master_port=port,
                    is_target=plan.is_target(g),
                    checkpoint=job.spec.checkpoint,
                    version=job.version,
                    bucket_bytes=plan.bucket_bytes,
                    nbuf=plan.nbuf,
                    tensors=tensors,
                    buckets=buckets,
                    timeout_s=left(),
                    receiver_timeout_s=min(self._config.receiver_timeout_s, left()),
                    partial=plan.partial,
                    p2p_sources=sources,
                )
            )
            try:
                res = await self._hub.command(r.node_id, cmd, left() + 5.0)
            except CkptError as e:
                raise type(e)(f"rank {order.get(r, -1)} ({r}): {e.message}") from None
            u = res.update
            return RankResult(
                rank=order.get(r, -1),
                owner=r,
                ok=u.ok,
                reason=u.reason,
                bytes=u.bytes,
                engine_untouched=u.engine_untouched,
                times=PhaseTimes(
                    copy_s=u.times.copy_s,
                    broadcast_s=u.times.broadcast_s,
                    reload_s=u.times.reload_s,
                    setup_s=u.times.setup_s,
                    total_s=u.times.total_s,
                ),
            )

        instances = [
            inst
            for inst in self._registry.instances.values()
            if inst.kind == InstanceKind.VLLM and set(inst.ranks) & set(plan.targets)
        ]
        rank_tasks = [
            asyncio.ensure_future(run_rank(g, r)) for g, r in enumerate(plan.participants)
        ]
        engine_tasks = [asyncio.ensure_future(self._trigger(i, job, left())) for i in instances]
        watchdog = asyncio.ensure_future(
            self._hub.watch({r.node_id for r in plan.participants}, f"job {job.id}")
        )
        everything = rank_tasks + engine_tasks + [watchdog]
        try:
            work = set(rank_tasks + engine_tasks)
            while work:
                done, _ = await asyncio.wait(work | {watchdog}, return_when=asyncio.FIRST_COMPLETED)
                work -= done
                failed = [t for t in done if t.exception() is not None]
                if failed:
                    err = failed[0].exception()
                    self.abort(job, plan, str(getattr(err, "message", err)))
                    # Give the others a bounded moment to report their own view.
                    if work:
                        await asyncio.wait(work, timeout=min(REPORT_GRACE_S, left()))
                    raise err  # type: ignore[misc]
        finally:
            for t in everything:
                if not t.done():
                    t.cancel()
            job.results = [
                t.result()
                for t in rank_tasks
                if t.done() and not t.cancelled() and t.exception() is None
            ]
        bad = sorted(
            (r for r in job.results if not r.ok),
            key=lambda r: (r.reason.startswith(PEER_FAILED), r.rank),
        )
        if bad:
            raise Aborted(f"rank {bad[0].rank} ({bad[0].owner}): {bad[0].reason}")
