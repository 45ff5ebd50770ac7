"""The job runner: validates an update, plans it (pure), drives agents and engines, and
records the outcome. Every wait has a deadline; the first failure aborts the others."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog

from ckpt_common.errors import (
    CkptError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.engines.alive import check_engines
from ckpt_daemon.jobs import resolve
from ckpt_daemon.jobs.choose import PlanChooser
from ckpt_daemon.jobs.execute import EngineTrigger, Executor, Group, no_trigger
from ckpt_daemon.jobs.restore import Restorer, settle
from ckpt_daemon.jobs.streamed import await_commit
from ckpt_daemon.model import (
    CheckpointState,
    Instance,
    Job,
    JobKind,
    JobState,
    LayoutMap,
    RankRef,
    UpdateSpec,
)
from ckpt_daemon.plan.placement import PlanError
from ckpt_daemon.plan.planner import (
    select_tensors,
)
from ckpt_daemon.push.deltas import DeltaMaker
from ckpt_daemon.push.direct import DirectPushes
from ckpt_daemon.push.part_sums import PartSums
from ckpt_daemon.registry.layouts import forget_layouts, layout_unknown, learn_layouts
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.jobs")


METHODS = ("auto", "broadcast", "sharded", "p2p", "delta", "")


class JobRunner:
    def __init__(
        self,
        registry: Registry,
        hub: AgentHub,
        config: DaemonConfig,
        trigger: EngineTrigger = no_trigger,
        on_finished: Callable[[Job], None] | None = None,
        alive: Callable[[Instance], Awaitable[bool]] | None = None,
        pushes: DirectPushes | None = None,
        deltas: DeltaMaker | None = None,
    ) -> None:
        """pushes: the direct pushes in flight, which a streamed update may read."""
        self._registry = registry
        self._pushes = pushes
        self._push_failed: dict[str, str] = {}  # streamed job -> why the push it read failed
        self._hub = hub
        self._config = config
        self._exec = Executor(registry, hub, config, trigger)
        self._on_finished = on_finished
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._busy_targets: dict[RankRef, str] = {}
        self._busy_participants: dict[RankRef, str] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._participants_freed = asyncio.Event()
        self._prev_pending: dict[tuple[str, str], str] = {}  # (job, instance) -> before it
        self._closing = False
        self._draining = False
        self._alive = alive
        self.restorer = Restorer(self, registry, hub, config, alive)
        self.part_sums = PartSums(hub, config.load_timeout_s)
        self._chooser = PlanChooser(registry, hub, config, self.part_sums, deltas)
        self._patching = deltas.is_patching if deltas is not None else None

    # ---------------------------------------------------------------- queries

    def running_nodes(self) -> set[str]:
        """Nodes a running job sends bytes to or reads them from."""
        return {r.node_id for r in (*self._busy_targets, *self._busy_participants)}

    def busy_checkpoints(self) -> set[tuple[str, int]]:
        return {(j.spec.checkpoint, j.version) for j in self._registry.jobs() if not j.state.done}

    def get(self, job_id: str) -> Job:
        job = self._registry.job(job_id)
        if not job:
            raise NotFound(f"job {job_id} not found")
        return job

    async def watch(self, job_id: str):  # -> AsyncIterator[Job]
        job = self.get(job_id)
        while True:
            ev = self._changed.setdefault(job_id, asyncio.Event())
            ev.clear()
            yield job
            if job.state.done:
                return
            await ev.wait()

    def _notify(self, job: Job) -> None:
        ev = self._changed.get(job.id)
        if ev:
            ev.set()

    # ---------------------------------------------------------------- submit

    async def submit_update(self, spec: UpdateSpec, kind: JobKind = JobKind.UPDATE) -> Job:
        if self._draining:
            raise Unavailable("ckptd is shutting down: it takes no new job")
        if spec.method not in METHODS:
            raise InvalidArgument(f"unknown update method {spec.method!r}")
        cv = resolve.version(self._registry, self._pushes, self._hub.live, spec, self._patching)
        try:  # off the event loop: thousands of patterns over a million tensors take a while
            tensors = (
                await asyncio.to_thread(select_tensors, cv.tensors, spec.tensors)
                if spec.tensors
                else list(cv.tensors)
            )
        except PlanError as e:
            raise InvalidArgument(str(e)) from None  # bounded at the API edge
        targets, target_ranks = resolve.targets(self._registry, spec)
        clash = sorted({self._busy_targets[r] for r in targets if r in self._busy_targets})
        if clash:
            raise FailedPrecondition(f"an update to some of these ranks is running: job {clash[0]}")
        await check_engines(self._registry.instances(), targets, self._alive)
        streamed = cv.state != CheckpointState.READY and spec.stream
        groups, method, why = await self._chooser.choose(spec, cv, tensors, targets, streamed)
        job = Job(
            id=uuid.uuid4().hex[:12],
            kind=kind,
            state=JobState.PENDING,
            spec=spec,
            created=time.time(),
            version=cv.version,
            targets=targets,
            target_ranks=target_ranks,
            buckets_total=sum(len(g.plan.buckets) for g in groups),
            # a delta job moves its payloads, any other the version's tensors
            bytes_total=(
                sum(g.plan.total_bytes for g in groups)
                if method == "delta"
                else sum(t.nbytes for t in tensors)
            ),
            bucket_bytes=groups[0].plan.bucket_bytes,
            method=method,
            method_reason=why,
            streamed=streamed,
        )
        for r in targets:
            self._busy_targets[r] = job.id
        self._registry.put_job(job)
        self._changed[job.id] = asyncio.Event()
        self._tasks[job.id] = asyncio.create_task(self._run(job, groups))
        log.info(
            "job_submitted", job=job.id, checkpoint=cv.name, version=cv.version,
            ranks=target_ranks, buckets=job.buckets_total, bucket_bytes=job.bucket_bytes,
            groups=len(groups), sharded=groups[0].plan.kept,
        )  # fmt: skip
        return job

    async def submit_join(
        self, inst: Instance, checkpoint: str, version: int, timeout_s: float
    ) -> Job:
        """Registers inst (not ready) and brings it to a version by P2P reads from the
        owners' host memory; the instances already serving are not touched."""
        if not checkpoint:
            checkpoint, version = resolve.fleet_version(self._registry)
        spec = UpdateSpec(
            checkpoint=checkpoint,
            version=version,
            instances=[inst.name],
            method="p2p",
            timeout_s=timeout_s,
        )
        resolve.version(self._registry, self._pushes, self._hub.live, spec)
        order = set(self._registry.rank_order())
        missing = [str(r) for r in inst.ranks if r not in order]
        if missing:
            raise FailedPrecondition(f"devices {missing} have no attached agent")
        resolve.check_instance_devices(self._registry, inst)
        old = self._registry.instance(inst.name)
        inst.ready, inst.reason = False, "joining"
        self._registry.put_instance(inst)
        try:
            return await self.submit_update(spec, kind=JobKind.JOIN)
        except BaseException:
            if old is not None:
                self._registry.put_instance(old)
            else:
                self._registry.remove_instance(inst.name)
            raise

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        task = self._tasks.get(job_id)
        if job.state.done or not task:
            raise FailedPrecondition(f"job {job_id} is {job.state.name}")
        task.cancel()
        return job

    # ---------------------------------------------------------------- run

    async def _acquire_participants(
        self, job: Job, participants: list[RankRef], deadline: float
    ) -> None:
        while any(r in self._busy_participants for r in participants):
            left = deadline - time.monotonic()
            if left <= 0:
                raise Unavailable("timed out waiting for another job on the same ranks")
            self._participants_freed.clear()
            try:
                await asyncio.wait_for(self._participants_freed.wait(), left)
            except TimeoutError:
                pass
        for r in participants:
            self._busy_participants[r] = job.id

    def _release(self, job: Job, participants: list[RankRef]) -> None:
        for r in participants:
            if self._busy_participants.get(r) == job.id:
                del self._busy_participants[r]
        for r in job.targets:
            if self._busy_targets.get(r) == job.id:
                del self._busy_targets[r]
        self._participants_freed.set()

    async def _run(self, job: Job, groups: list[Group]) -> None:
        timeout = job.spec.timeout_s or self._config.update_timeout_s
        deadline = time.monotonic() + timeout
        bind = structlog.contextvars.bound_contextvars(job=job.id, checkpoint=job.spec.checkpoint)
        bind.__enter__()
        participants = [r for g in groups for r in g.plan.participants]
        # a full update's engines describe every tensor: only those teach ckptd a layout
        learn = not job.spec.tensors
        asked = layout_unknown(self._registry, job.targets) if learn else []
        layouts: dict[RankRef, LayoutMap | None] = dict.fromkeys(asked)
        end, why = JobState.FAILED, "internal error: the job ended without a verdict"
        try:
            await self._acquire_participants(job, participants, deadline)
            self._mark_pending(job)
            self._registry.move_job(job, JobState.RUNNING)
            self._notify(job)
            await self._exec.run(job, groups, deadline, self._notify, layouts)
            if job.streamed:
                await await_commit(
                    self._pushes, self._registry, job.spec.checkpoint, job.version, deadline
                )
            learn_layouts(self._registry, layouts)
            end, why = JobState.SUCCEEDED, ""
            log.info(
                "job_succeeded", seconds=round(time.time() - job.started, 4), bytes=job.bytes_total
            )
        except asyncio.CancelledError:
            end, why = (
                JobState.CANCELLED,
                ("ckptd stopped while the job ran" if self._closing else "cancelled"),
            )
            if job.id in self._push_failed:
                end, why = JobState.FAILED, self._push_failed[job.id]
            self._exec.abort(job, participants, why)
        except CkptError as e:
            end, why = JobState.FAILED, e.message
            log.warning("job_failed", reason=e.message)
        except Exception as e:  # a bug: still a failed job with a reason, never a hang
            end, why = JobState.FAILED, f"internal error: {e!r}"
            log.exception("job_crashed")
        finally:
            self._registry.move_job(job, end, why or None)
            self._hub.on_progress(job.id, None)
            self._release(job, participants)
            self._settle_instances(job)
            if job.state != JobState.SUCCEEDED and groups[0].plan.kept:
                forget_layouts(self._registry, job.targets)
            if job.state != JobState.SUCCEEDED and not self._closing:
                await self.restorer.after(job, self._touched(job))
            self._registry.put_job(job)
            if self._on_finished is not None:
                try:
                    self._on_finished(job)
                except Exception:
                    log.exception("job_hook_failed")
            self._notify(job)
            self._tasks.pop(job.id, None)
            self._push_failed.pop(job.id, None)
            bind.__exit__(None, None, None)

    async def push_failed(self, name: str, version: int, why: str, wait_s: float = 10.0) -> None:
        """A push that streamed jobs read has failed: they fail now (their engines are
        restored), and are waited for (bounded) before its stores may go."""
        ended = []
        for job_id, task in list(self._tasks.items()):
            job = self._registry.job(job_id)
            if job is None or not job.streamed or job.state.done:
                continue
            if (job.spec.checkpoint, job.version) == (name, version):
                self._push_failed[job_id] = f"the push of {name}@{version} failed: {why}"
                task.cancel()
                ended.append(task)
        if ended:
            await asyncio.wait(ended, timeout=wait_s)

    def _touched(self, job: Job) -> list[Instance]:
        tset = set(job.targets)
        return [i for i in self._registry.instances() if set(i.ranks) & tset]

    def _mark_pending(self, job: Job) -> None:
        """From here on the job may change what these instances hold."""
        for inst in self._touched(job):
            self._prev_pending[(job.id, inst.name)] = inst.pending
            inst.pending = job.id
            self._registry.put_instance(inst)

    def _settle_instances(self, job: Job) -> None:
        for inst in self._touched(job):
            prev = self._prev_pending.pop((job.id, inst.name), None)
            if prev is not None and settle(inst, job, prev):
                self._registry.put_instance(inst)

    async def drain(self, timeout_s: float) -> None:
        """Refuses new jobs; waits (bounded) for the running ones to end on their own."""
        self._draining = True
        tasks = list(self._tasks.values())
        if tasks and timeout_s > 0:
            log.info("draining", jobs=len(tasks), seconds=timeout_s)
            await asyncio.wait(tasks, timeout=timeout_s)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Cancels the running jobs and waits for them to record their end."""
        self._closing = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def run_to_end(self, spec: UpdateSpec, wait_s: float) -> Job:
        """Submits an update and waits (bounded) for it to end."""
        job = await self.submit_update(spec)
        task = self._tasks.get(job.id)
        if task is not None:
            await asyncio.wait([task], timeout=wait_s)
        return job

    def busy_targets(self) -> set[RankRef]:
        return set(self._busy_targets)
