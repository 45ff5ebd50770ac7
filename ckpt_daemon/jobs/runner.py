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
    ResourceExhausted,
    Unavailable,
)
from ckpt_daemon import admission
from ckpt_daemon.agents.commands import P2PSource
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.engines.alive import check_engines
from ckpt_daemon.jobs import shard_jobs
from ckpt_daemon.jobs.execute import EngineTrigger, Executor, Group, no_trigger
from ckpt_daemon.jobs.restore import Restorer, settle, split_instance
from ckpt_daemon.jobs.sources import p2p_sources
from ckpt_daemon.jobs.streamed import NOT_STREAMED, await_commit, streamable
from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    Instance,
    Job,
    JobKind,
    JobState,
    LayoutMap,
    RankRef,
    ShardState,
    TensorInfo,
    UpdateSpec,
)
from ckpt_daemon.plan.keeps import Keep, part_nbytes
from ckpt_daemon.plan.placement import PlanError, align_up
from ckpt_daemon.plan.planner import (
    choose_bucket_bytes,
    choose_nbuf,
    plan_p2p,
    plan_update,
    readers_near,
    select_tensors,
)
from ckpt_daemon.push.direct import DirectPushes
from ckpt_daemon.push.part_sums import PartSums
from ckpt_daemon.registry.layouts import forget_layouts, layout_unknown, learn_layouts
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.jobs")


METHODS = ("auto", "broadcast", "sharded", "p2p", "")


def owner_bytes(tensors: list[TensorInfo]) -> int:
    """The most bytes one owner sends (aligned)."""
    per: dict[RankRef, int] = {}
    for t in tensors:
        per[t.owner] = per.get(t.owner, 0) + align_up(t.nbytes)
    return max(per.values(), default=0)


def maps_bytes(tensors: list[TensorInfo], maps: dict[RankRef, list[Keep]]) -> int:
    """The most bytes one rank keeps (a bound on one class's stream from one owner)."""
    by = {t.name: t for t in tensors}
    return max(
        (sum(align_up(part_nbytes(by[k.name], k)) for k in ks) for ks in maps.values()),
        default=0,
    )


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
        self.part_sums = self._sums = PartSums(hub, config.load_timeout_s)

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

    def resolve_targets(self, spec: UpdateSpec) -> tuple[list[RankRef], list[int]]:
        order = self._registry.rank_order()
        index = {r: i for i, r in enumerate(order)}
        targets: set[RankRef] = set()
        if spec.ranks:
            bad = [r for r in spec.ranks if r < 0 or r >= len(order)]
            if bad:
                raise InvalidArgument(
                    f"ranks {bad} out of range: {len(order)} ranks attached"
                    + (f" (0-{len(order) - 1})" if order else "")
                )
            targets.update(order[r] for r in spec.ranks)
        for name in spec.instances:
            inst = self._registry.instance(name)
            if not inst:
                raise NotFound(f"instance {name!r} not found")
            missing = [str(r) for r in inst.ranks if r not in index]
            if missing:
                raise FailedPrecondition(
                    f"instance {name!r} sits on devices whose agent is not attached: {missing}"
                )
            targets.update(inst.ranks)
        if not targets:
            raise InvalidArgument("no target: give ranks or instances")
        split = split_instance(self._registry.instances(), targets)
        if split:
            raise InvalidArgument(
                f"the update covers only some ranks of instance {split!r}: its engine would "
                "serve a mix of versions; give all of its ranks (or the instance)"
            )
        tl = sorted(targets)
        return tl, [index[r] for r in tl]

    def resolve_checkpoint(self, spec: UpdateSpec) -> CheckpointVersion:
        cv = self._registry.get_checkpoint(spec.checkpoint, spec.version)
        if cv is None:
            if not self._registry.versions(spec.checkpoint):
                raise NotFound(f"checkpoint {spec.checkpoint!r} not found")
            raise NotFound(
                f"checkpoint {spec.checkpoint}@{spec.version or 'latest'} not found"
                + ("" if spec.version else " (no READY version)")
            )
        if streamable(self._pushes, spec, cv):
            if spec.method in ("p2p", "sharded"):
                raise FailedPrecondition(f"{cv.name}@{cv.version}: {NOT_STREAMED}")
            return cv
        if cv.state != CheckpointState.READY and not (
            spec.method == "p2p"
            and cv.state == CheckpointState.LOST
            and self._p2p_sources(cv) is not None
        ):
            raise FailedPrecondition(
                f"checkpoint {cv.name}@{cv.version} is {cv.state.name}"
                + (f": {cv.reason}" if cv.reason else "")
            )
        return cv

    async def submit_update(self, spec: UpdateSpec, kind: JobKind = JobKind.UPDATE) -> Job:
        if self._draining:
            raise Unavailable("ckptd is shutting down: it takes no new job")
        if spec.method not in METHODS:
            raise InvalidArgument(f"unknown update method {spec.method!r}")
        cv = self.resolve_checkpoint(spec)
        try:  # off the event loop: thousands of patterns over a million tensors take a while
            tensors = (
                await asyncio.to_thread(select_tensors, cv.tensors, spec.tensors)
                if spec.tensors
                else list(cv.tensors)
            )
        except PlanError as e:
            raise InvalidArgument(admission.bounded(str(e))) from None
        targets, target_ranks = self.resolve_targets(spec)
        clash = sorted({self._busy_targets[r] for r in targets if r in self._busy_targets})
        if clash:
            raise FailedPrecondition(f"an update to some of these ranks is running: job {clash[0]}")
        await check_engines(self._registry.instances(), targets, self._alive)
        streamed = cv.state != CheckpointState.READY and spec.stream
        groups, method, why = await self._plan(spec, cv, tensors, targets, streamed)
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
            bytes_total=sum(t.nbytes for t in tensors),
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

    async def _plan(
        self,
        spec: UpdateSpec,
        cv: CheckpointVersion,
        tensors: list[TensorInfo],
        targets: list[RankRef],
        streamed: bool = False,
    ) -> tuple[list[Group], str, str]:
        """The job's groups: shard-aware where it can be (method auto/sharded), a P2P join,
        or a broadcast; with the method chosen and why."""
        partial = len(tensors) != len(cv.tensors)
        why = f"{spec.method}: requested" + (", streamed from the push" if streamed else "")
        if streamed and spec.method == "auto":
            why = f"auto: streamed: {NOT_STREAMED}"
        elif spec.method in ("auto", "sharded"):
            try:
                maps = shard_jobs.keeps(tensors, shard_jobs.target_maps(self._registry, targets))
                bucket_bytes, nbuf = self._buckets(spec, set(targets), maps_bytes(tensors, maps))
                plans = await asyncio.to_thread(
                    shard_jobs.plan, tensors, maps, bucket_bytes=bucket_bytes, nbuf=nbuf,
                    partial=partial,
                )  # fmt: skip
                groups = []
                for gp in plans:
                    sources, missing = self.read_sources(cv, gp.sources, gp.local)
                    if missing:
                        raise shard_jobs.NotSharded(
                            f"the stores of {missing} are on no node of the ranks that keep "
                            "their parts, and cannot be read by P2P"
                        )
                    groups.append(Group(plan=gp.plan, sources=sources))
                self._sums.forget(self._registry.checkpoint_keys())
                try:
                    await self._sums.fill(cv, [g.plan for g in groups])
                except CkptError as e:
                    raise shard_jobs.NotSharded(f"checksums of the parts: {e.message}") from None
                return groups, "sharded", f"{spec.method}: every target engine's layout is known"
            except shard_jobs.NotSharded as e:
                if spec.method == "sharded":
                    raise FailedPrecondition(f"no shard-aware plan: {e}") from None
                log.info("broadcast_not_sharded", why=str(e))
                why = f"auto: not shard-aware: {e}"
                if e.relearn and not partial:  # this broadcast learns the layouts again
                    forget_layouts(self._registry, targets)
        owners = {t.owner for t in tensors}
        if spec.method == "p2p":
            bucket_bytes, nbuf = self._buckets(spec, set(targets), owner_bytes(tensors))
            plan, order = await asyncio.to_thread(
                plan_p2p, tensors, targets, bucket_bytes=bucket_bytes, nbuf=nbuf, partial=partial
            )
            sources, missing = self.read_sources(cv, order, readers_near(plan, len(order), order))
            if missing:
                raise FailedPrecondition(
                    f"shards of {missing} can be read from nowhere: their agents are gone (and "
                    "no mirror holds them) or are not registered for P2P (no Mooncake, --p2p off)"
                )
            return [Group(plan=plan, sources=sources)], "p2p", why
        gone = sorted(str(o) for o in owners if not self._hub.live(o.node_id))
        if gone:
            raise Unavailable(f"agents holding checkpoint bytes are detached or silent: {gone}")
        bucket_bytes, nbuf = self._buckets(spec, set(targets) | owners, owner_bytes(tensors))
        plan = await asyncio.to_thread(
            plan_update, tensors, targets, bucket_bytes=bucket_bytes, nbuf=nbuf, partial=partial
        )
        return [Group(plan=plan)], "broadcast", why

    def read_sources(
        self, cv: CheckpointVersion, owners: list[RankRef], near: list[bool]
    ) -> tuple[list[P2PSource], list[str]]:
        """Where readers read each owner's store (near: all its readers are on its node):
        its shared segment where it is READY and its agent attached, else by P2P from the
        owner (or its mirror, replicas=2). Returns the sources and the owners read from
        nowhere."""
        live = self._p2p_sources(cv) or {}
        out, missing = [], []
        for o, n in zip(owners, near, strict=True):
            sh = cv.shards.get(o)
            here = sh is not None and sh.state == ShardState.READY and sh.segment
            if n and here and self._hub.attached(o.node_id):
                out.append(P2PSource(local_segment=sh.segment))
            elif live.get(o, ("", 0))[0]:
                out.append(P2PSource(session=live[o][0], addr=live[o][1]))
            else:
                missing.append(str(o))
        return out, missing

    def _buckets(
        self, spec: UpdateSpec, participants: set[RankRef], largest_stream: int
    ) -> tuple[int, int]:
        """(bucket bytes, buffers per participant) for these participants' free memory."""
        kinds = {self._registry.device_kind(r) for r in participants}
        cap = (
            self._config.max_bucket_bytes_cuda
            if "cuda" in kinds
            else self._config.max_bucket_bytes_cpu
        )
        free = [self._registry.free_bytes(r) for r in participants]
        nbuf = choose_nbuf(kinds, free, self._config.nbuf)
        try:
            size = choose_bucket_bytes(
                free, nbuf=nbuf, cap=cap, requested=spec.bucket_bytes,
                largest_owner_bytes=largest_stream,
            )  # fmt: skip
        except PlanError as e:
            cls = InvalidArgument if spec.bucket_bytes else ResourceExhausted
            raise cls(str(e)) from None
        return size, nbuf

    def _p2p_sources(self, cv: CheckpointVersion) -> dict[RankRef, tuple[str, int]] | None:
        return p2p_sources(self._registry, self._hub.live, cv)

    def fleet_version(self) -> tuple[str, int]:
        """What most ready instances serve."""
        counts: dict[tuple[str, int], int] = {}
        for inst in self._registry.instances():
            if inst.ready and inst.checkpoint:
                key = (inst.checkpoint, inst.version)
                counts[key] = counts.get(key, 0) + 1
        if not counts:
            raise FailedPrecondition("no instance serves a checkpoint yet: name one to join at")
        return max(counts, key=lambda k: (counts[k], k[1]))

    async def submit_join(
        self, inst: Instance, checkpoint: str, version: int, timeout_s: float
    ) -> Job:
        """Registers inst (not ready) and brings it to a version by P2P reads from the
        owners' host memory; the instances already serving are not touched."""
        if not checkpoint:
            checkpoint, version = self.fleet_version()
        spec = UpdateSpec(
            checkpoint=checkpoint,
            version=version,
            instances=[inst.name],
            method="p2p",
            timeout_s=timeout_s,
        )
        self.resolve_checkpoint(spec)
        order = set(self._registry.rank_order())
        missing = [str(r) for r in inst.ranks if r not in order]
        if missing:
            raise FailedPrecondition(f"devices {missing} have no attached agent")
        self.check_instance_devices(inst)
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

    def check_instance_devices(self, inst: Instance) -> None:
        for other in self._registry.instances():
            shared = set(other.ranks) & set(inst.ranks)
            if other.name != inst.name and shared:
                raise FailedPrecondition(
                    f"instance {other.name!r} already uses devices {sorted(map(str, shared))}"
                )

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
