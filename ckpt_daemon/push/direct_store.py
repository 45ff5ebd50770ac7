"""What a direct push needs from the Pusher (StoreOps): a version's stores allocated on its
owners, the trainer's checksums declared and recorded, a seal that makes it READY."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

import structlog

from ckpt_daemon.agents import commands
from ckpt_daemon.agents.commands import Span
from ckpt_daemon.agents.results import store_ready
from ckpt_daemon.model import CheckpointVersion, Probe, RankRef, ShardState, TensorInfo
from ckpt_daemon.plan.keeps import Keep
from ckpt_daemon.plan.placement import Placement
from ckpt_daemon.push import part_sums
from ckpt_daemon.push.direct import Known, StoreOps
from ckpt_daemon.push.versions import new_version, owner_sums

if TYPE_CHECKING:
    from ckpt_daemon.push.pusher import Pusher

log = structlog.get_logger("ckptd.push")


class DirectStore:
    def __init__(self, pusher: Pusher) -> None:
        self._p = pusher

    def ops(self) -> StoreOps:
        def taken(key: tuple[str, int]) -> bool:
            return self._p.registry.has_checkpoint(*key) or key in self._p.inflight

        return StoreOps(
            ranks=self._p.registry.rank_order,
            taken=taken,
            hold=self._p.inflight.add,
            release=self._p.inflight.discard,
            create=self._create_direct,
            seal=self._seal_direct,
            declare=self._declare_direct,
            wanted=lambda: functools.partial(part_sums.wanted, self._p.registry.engine_layouts()),
            record_parts=self._record_parts,
            forget=self._p.forget,
        )

    async def _create_direct(
        self, name: str, version: int, placement: Placement, probe: Probe | None
    ) -> CheckpointVersion:
        """A LOADING version of a direct push, admitted, recorded, its stores allocated."""
        cv = new_version(name, version, placement, probe)
        self._p.admit([cv])
        await self._p.add(cv)
        try:
            await asyncio.gather(*(self._p.allocate(cv, r) for r in cv.shards))
        except BaseException:
            await self._p.forget(cv)
            raise
        return cv

    async def _seal_direct(self, cv: CheckpointVersion, known: Known) -> None:
        """READY once every owner's checksums are recorded: the trainer's (`known`, by entry)
        where it sent one for every tensor of the owner (the owner is only asked whether it
        holds the store: a Seal of no range), else what the owner computes from its store
        (Seal). A seal that fails drops the version."""
        given = owner_sums(cv, known)
        try:
            await self._p.hub.watched(
                asyncio.gather(*(self._seal(cv, r, given.get(r)) for r in cv.shards)),
                {r.node_id for r in cv.shards},
                f"the commit of {cv.name}@{cv.version}",
            )
        except BaseException:
            self._p.done(cv, False)
            await self._p.forget(cv)
            raise
        for r in cv.shards:
            self._p.registry.set_shard(cv.name, cv.version, r, ShardState.READY)
        log.info(
            "push_sealed", checkpoint=cv.name, version=cv.version,
            trainer_ranks=len(given), store_ranks=len(cv.shards) - len(given),
        )  # fmt: skip
        self._p.done(cv, True)

    def _record_parts(
        self, cv: CheckpointVersion, parts: list[tuple[TensorInfo, Keep, int]]
    ) -> None:
        if self._p.part_sums is not None and parts:
            self._p.part_sums.record(cv, parts)

    async def _declare_direct(self, cv: CheckpointVersion, known: Known) -> None:
        """Records the checksums a trainer declared at BeginPush, before any byte is
        written: the tensors of a version still LOADING carry them, for a streamed update."""
        for r, sums in owner_sums(cv, known).items():
            await self._p.set_sums(cv, r, sums)

    async def _seal(self, cv: CheckpointVersion, r: RankRef, sums: list[int] | None) -> None:
        """Records r's checksums: `sums` (the trainer's) once r says it holds the store, or
        (None) the ones r computes over its store."""
        items = (
            []
            if sums is not None
            else [
                Span(store_offset=t.store_offset, nbytes=t.nbytes)
                for t in cv.tensors
                if t.owner == r
            ]
        )
        cmd = commands.seal(cv.name, cv.version, r.device, items)
        res = store_ready(await self._p.hub.command(r.node_id, cmd, self._p.config.load_timeout_s))
        got = sums if sums is not None else list(res.checksums)
        await self._p.set_sums(cv, r, got)
