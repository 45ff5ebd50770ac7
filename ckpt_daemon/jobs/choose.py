"""A job's plan, chosen: shard-aware where every target's layout is known (method auto or
sharded), a P2P read for a join, else a broadcast; sized to the participants' free memory,
with where each owner's store is read from, the method and why."""

from __future__ import annotations

import asyncio
import dataclasses

import structlog

from ckpt_common.errors import (
    CkptError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from ckpt_daemon.agents.commands import P2PSource
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.jobs import shard_jobs
from ckpt_daemon.jobs.execute import Group
from ckpt_daemon.jobs.sources import p2p_sources
from ckpt_daemon.jobs.streamed import NOT_STREAMED
from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    Instance,
    RankRef,
    ShardState,
    TensorInfo,
    UpdateSpec,
)
from ckpt_daemon.plan import deltas
from ckpt_daemon.plan.keeps import Keep, part_nbytes
from ckpt_daemon.plan.placement import PlanError, align_up
from ckpt_daemon.plan.planner import (
    choose_bucket_bytes,
    choose_nbuf,
    plan_p2p,
    plan_update,
    readers_near,
)
from ckpt_daemon.push.deltas import DeltaMaker
from ckpt_daemon.push.part_sums import PartSums
from ckpt_daemon.registry.layouts import forget_layouts
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.jobs")

Chosen = tuple[list[Group], str, str]  # the job's groups, its method, why


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


class NotDelta(Exception):
    pass


class PlanChooser:
    def __init__(
        self,
        registry: Registry,
        hub: AgentHub,
        config: DaemonConfig,
        sums: PartSums,
        deltas: DeltaMaker | None = None,
    ) -> None:
        self._registry = registry
        self._hub = hub
        self._config = config
        self._sums = sums
        self._deltas = deltas

    async def choose(
        self,
        spec: UpdateSpec,
        cv: CheckpointVersion,
        tensors: list[TensorInfo],
        targets: list[RankRef],
        streamed: bool = False,
    ) -> Chosen:
        """The job's groups: shard-aware where it can be (method auto/sharded), a P2P join,
        or a broadcast; with the method chosen and why."""
        partial = len(tensors) != len(cv.tensors)
        why = f"{spec.method}: requested" + (", streamed from the push" if streamed else "")
        not_delta = ""
        if spec.method in ("auto", "delta"):
            try:
                return await self._delta(spec, cv, targets, partial or streamed)
            except NotDelta as e:
                if spec.method == "delta":
                    raise FailedPrecondition(f"no delta update: {e}") from None
                not_delta = f" (not a delta: {e})"
        if cv.state == CheckpointState.LOADING and not streamed:
            await self._await_made(cv)  # a delta push's version, still being made
        if streamed and spec.method == "auto":
            why = f"auto: streamed: {NOT_STREAMED}"
        elif spec.method in ("auto", "sharded"):
            try:
                groups, method, why_sharded = await self._sharded(
                    spec, cv, tensors, targets, partial
                )
                return groups, method, why_sharded + not_delta
            except shard_jobs.NotSharded as e:
                if spec.method == "sharded":
                    raise FailedPrecondition(f"no shard-aware plan: {e}") from None
                log.info("broadcast_not_sharded", why=str(e))
                why = f"auto: not shard-aware: {e}"
                if e.relearn and not partial:  # this broadcast learns the layouts again
                    forget_layouts(self._registry, targets)
        if spec.method == "p2p":
            return await self._p2p(spec, cv, tensors, targets, partial, why + not_delta)
        return await self._broadcast(spec, tensors, targets, partial, why + not_delta)

    async def _await_made(self, cv: CheckpointVersion) -> None:
        """Waits (bounded) for a delta-pushed version to be made in the host stores."""
        made = self._deltas.patching(cv.name, cv.version) if self._deltas else None
        if made is not None:
            try:
                await asyncio.wait_for(made, self._config.load_timeout_s)
            except (CkptError, TimeoutError):
                pass
        if cv.state != CheckpointState.READY:
            raise FailedPrecondition(f"checkpoint {cv.name}@{cv.version} is {cv.state.name}")

    def _whole_instances(self, targets: list[RankRef]) -> list[Instance]:
        mine = set(targets)
        insts = [i for i in self._registry.instances() if mine & set(i.ranks)]
        if {r for i in insts for r in i.ranks} != mine:
            raise NotDelta("the targets are not whole instances")
        return insts

    async def _delta(
        self, spec: UpdateSpec, cv: CheckpointVersion, targets: list[RankRef], partial: bool
    ) -> Chosen:
        """Only what changed since the version every target serves, read from the delta
        store ckptd made for it (push/deltas.py); NotDelta says why not."""
        if self._deltas is None or partial:
            raise NotDelta("a partial or streamed update" if partial else "deltas are off")
        insts = self._whole_instances(targets)
        base, why = deltas.common_base(cv.name, insts)
        if not base:
            raise NotDelta(why)
        if base >= cv.version:
            raise NotDelta(f"the instances serve {cv.name}@{base}, not an older version")
        why = deltas.no_delta_engines(insts)
        if why:
            raise NotDelta(why)
        dv = await self._deltas.made(cv.name, cv.version, base, self._config.command_timeout_s)
        if dv is None:
            raise NotDelta(f"no delta store of {cv.name}@{cv.version} from version {base}")
        tp = max(i.tp_size for i in insts)
        if not deltas.pays(dv.total_bytes, cv.total_bytes // max(1, tp)):
            raise NotDelta(f"the delta ({dv.total_bytes} bytes) would not pay")
        try:
            (groups, _, _) = await self._broadcast(spec, dv.tensors, targets, False, "")
        except Unavailable as e:
            raise NotDelta(e.message) from None
        plan = dataclasses.replace(groups[0].plan, delta_base=base)
        share = 100.0 * dv.total_bytes / max(1, cv.total_bytes)
        why = (
            f"{spec.method}: {dv.total_bytes} bytes ({share:.2f} % of the version) changed "
            f"since version {base}, which every target serves"
        )
        return [dataclasses.replace(groups[0], plan=plan)], "delta", why

    async def _sharded(
        self,
        spec: UpdateSpec,
        cv: CheckpointVersion,
        tensors: list[TensorInfo],
        targets: list[RankRef],
        partial: bool,
    ) -> Chosen:
        """One group per class of ranks that keep the same parts; NotSharded where a
        layout is unknown, a store cannot be read, or a part's checksum cannot be had."""
        maps = shard_jobs.keeps(tensors, shard_jobs.target_maps(self._registry, targets))
        bucket_bytes, nbuf = self._buckets(spec, set(targets), maps_bytes(tensors, maps))
        plans = await asyncio.to_thread(
            shard_jobs.plan, tensors, maps, bucket_bytes=bucket_bytes, nbuf=nbuf, partial=partial
        )
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

    async def _p2p(
        self,
        spec: UpdateSpec,
        cv: CheckpointVersion,
        tensors: list[TensorInfo],
        targets: list[RankRef],
        partial: bool,
        why: str,
    ) -> Chosen:
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

    async def _broadcast(
        self,
        spec: UpdateSpec,
        tensors: list[TensorInfo],
        targets: list[RankRef],
        partial: bool,
        why: str,
    ) -> Chosen:
        owners = {t.owner for t in tensors}
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
        live = p2p_sources(self._registry, self._hub.live, cv) or {}
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
