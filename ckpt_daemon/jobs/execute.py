"""Running a planned job: the group rendezvous, one RunUpdate per participant, the engine
triggers, progress, and the first failure aborting everyone else. Every wait has a
deadline, and a participant's agent that goes silent (frozen, cut off) fails the job within
the hub's silence limit (seconds), not the job's deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

from ckpt_common.errors import Aborted, CkptError
from ckpt_daemon.agents import commands, results
from ckpt_daemon.agents.commands import Command, P2PSource
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.agents.results import BucketProgress
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.model import Instance, InstanceKind, Job, LayoutMap, RankRef, RankResult
from ckpt_daemon.plan.planner import Plan
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.execute")
REPORT_GRACE_S = 3.0  # after the first failure, how long the others get to report theirs

EngineTrigger = Callable[[Instance, Job, float], Awaitable[None]]


async def no_trigger(instance: Instance, job: Job, timeout: float) -> None:
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Group:
    """One group of a job: its plan (participants, buckets) and the stores its readers
    read from (P2P and shard-aware plans; empty: owners take part and send)."""

    plan: Plan
    sources: list[P2PSource] = field(default_factory=list)


def _raised(t: asyncio.Future) -> BaseException | None:
    return t.exception() if t.done() and not t.cancelled() else None


class RankFailed(Aborted):
    """A rank reported its failure (a result with ok=False)."""

    def __init__(self, result: RankResult) -> None:
        super().__init__(f"rank {result.rank} ({result.owner}): {result.reason}")
        self.result = result


class _Progress:
    """Buckets each target has handed its engine; the job's count is, per group, what its
    slowest target has, summed over the groups."""

    def __init__(self, job: Job, groups: list[Group], notify: Callable[[Job], None]) -> None:
        self.job, self.notify = job, notify
        self.group_of = {r: i for i, g in enumerate(groups) for r in g.plan.targets}
        self.done: dict[RankRef, int] = dict.fromkeys(self.group_of, 0)
        self.ngroups = len(groups)

    def __call__(self, node_id: str, p: BucketProgress) -> None:
        r = RankRef(node_id, p.device)
        if r not in self.done:
            return
        job = self.job
        self.done[r] = max(self.done[r], p.bucket + 1)
        low = [min((n for q, n in self.done.items() if self.group_of[q] == g), default=0)
               for g in range(self.ngroups)]  # fmt: skip
        if job.first_bucket_s == 0.0 and p.bucket == 0:
            job.first_bucket_s = time.time() - job.created
        if sum(low) != job.buckets_done:
            job.buckets_done = sum(low)
            self.notify(job)


class Executor:
    def __init__(
        self, registry: Registry, hub: AgentHub, config: DaemonConfig, trigger: EngineTrigger
    ) -> None:
        self._registry = registry
        self._hub = hub
        self._config = config
        self._trigger = trigger

    def abort(self, job: Job, participants: list[RankRef], reason: str) -> None:
        for node in sorted({r.node_id for r in participants}):
            self._hub.send(node, commands.abort(job.id, reason))

    async def _prepare(self, job: Job, plan: Plan, left: Callable[[], float]) -> tuple[str, int]:
        master = plan.participants[0]
        cmd = commands.prepare_group(job.id, master.device, len(plan.participants), plan.group)
        res = await self._hub.command(
            master.node_id, cmd, min(self._config.command_timeout_s, left())
        )
        return results.group_ready(res)

    async def _commands(
        self, job: Job, g: Group, left: Callable[[], float], want_layout: set[RankRef]
    ) -> list[tuple[RankRef, Command]]:
        """One RunUpdate per participant of the group (its rendezvous prepared first)."""
        plan = g.plan
        master = await self._prepare(job, plan, left)
        run = commands.UpdateRun(
            job_id=job.id, checkpoint=job.spec.checkpoint, version=job.version, plan=plan,
            master=master, sources=g.sources, timeout_s=left(),
            receiver_timeout_s=min(self._config.receiver_timeout_s, left()),
            streamed=job.streamed,
        )  # fmt: skip
        cmds = commands.run_updates(run, [r in want_layout for r in plan.participants])
        return list(zip(plan.participants, cmds, strict=True))

    async def run(
        self,
        job: Job,
        groups: list[Group],
        deadline: float,
        notify: Callable[[Job], None],
        layouts: dict[RankRef, LayoutMap | None] | None = None,
    ) -> None:
        """Runs a planned job on the agents (and triggers the engines); raises on failure.
        `layouts`: the ranks whose engines are asked for their sharding map, filled with
        what they answer."""
        left = lambda: max(1.0, deadline - time.monotonic())  # noqa: E731
        asked = set(layouts or {})
        cmds = [c for g in groups for c in await self._commands(job, g, left, asked)]
        participants = [r for r, _ in cmds]
        targets = {r for g in groups for r in g.plan.targets}
        self._hub.on_progress(job.id, _Progress(job, groups, notify))
        order = {r: i for i, r in enumerate(self._registry.rank_order())}

        done: dict[RankRef, RankResult] = {}

        async def run_rank(r: RankRef, cmd: Command) -> RankResult:
            try:
                res = await self._hub.command(r.node_id, cmd, left() + 5.0)
            except CkptError as e:
                raise type(e)(f"rank {order.get(r, -1)} ({r}): {e.message}") from None
            if layouts is not None and r in asked and (mine := results.layout(res)) is not None:
                layouts[r] = mine
            got = done[r] = results.rank_result(order.get(r, -1), r, res)
            if not got.ok:  # a reported failure aborts the peers at once, as a raised one
                raise RankFailed(got)
            return got

        instances = [
            inst
            for inst in self._registry.instances()
            if inst.kind == InstanceKind.VLLM and set(inst.ranks) & targets
        ]
        rank_tasks = [asyncio.ensure_future(run_rank(r, c)) for r, c in cmds]
        engine_tasks = [asyncio.ensure_future(self._trigger(i, job, left())) for i in instances]
        try:
            watched = {r.node_id for r in participants} | self._source_nodes(groups)
            node_of = {t: r.node_id for t, (r, _) in zip(rank_tasks, cmds, strict=True)}
            await self._wait(job, participants, watched, rank_tasks + engine_tasks, left, node_of)
        except RankFailed:  # the most telling failure is raised below: a rank's own end
            raised = [e for t in rank_tasks if (e := _raised(t)) and not isinstance(e, RankFailed)]
            if raised:  # (its worker died, its agent left) first: peers saw only its absence
                raise raised[0] from None
        finally:
            job.results = [done[r] for r in participants if r in done]
        bad = sorted(
            (r for r in job.results if not r.ok),
            key=lambda r: (not r.own_failure, r.rank),  # a rank's own failure first
        )
        if bad:
            raise Aborted(f"rank {bad[0].rank} ({bad[0].owner}): {bad[0].reason}")

    async def _grace(
        self, work: set[asyncio.Future], node_of: dict[asyncio.Future, str], grace_s: float
    ) -> None:
        """Waits (at most grace_s) for the tasks still running to report, except those of
        ranks whose agent is silent or gone: they will not report."""
        end = time.monotonic() + grace_s
        while True:
            waiting = {
                t for t in work
                if not t.done() and (t not in node_of or self._hub.live(node_of[t]))
            }  # fmt: skip
            rest = end - time.monotonic()
            if not waiting or rest <= 0:
                return
            await asyncio.wait(waiting, timeout=min(rest, 0.25))

    def _source_nodes(self, groups: list[Group]) -> set[str]:
        """The nodes whose stores the job's readers read by P2P: one that goes silent
        (frozen) fails the job, as a participant's does (a read of it may block)."""
        sessions = {s.session for g in groups for s in g.sources if s.session}
        if not sessions:
            return set()
        return {
            r.node_id
            for cv in self._registry.checkpoints()
            for r, sh in cv.shards.items()
            if sh.p2p_session in sessions
        }

    async def _wait(
        self,
        job: Job,
        participants: list[RankRef],
        watched: set[str],
        tasks: list[asyncio.Future],
        left: Callable[[], float],
        node_of: dict[asyncio.Future, str],
    ) -> None:
        """Until every task is done; the first failure aborts the others (who get a bounded
        moment to report their own view) and is raised."""
        watchdog = asyncio.ensure_future(self._hub.watch(watched, f"job {job.id}"))
        try:
            work = set(tasks)
            while work:
                done, _ = await asyncio.wait(work | {watchdog}, return_when=asyncio.FIRST_COMPLETED)
                work -= done
                failed = [t for t in done if t.exception() is not None]
                if failed:
                    err = failed[0].exception()
                    self.abort(job, participants, str(getattr(err, "message", err)))
                    if work:
                        await self._grace(work, node_of, min(REPORT_GRACE_S, left()))
                    raise err  # type: ignore[misc]
        finally:
            for t in [*tasks, watchdog]:
                if not t.done():
                    t.cancel()
