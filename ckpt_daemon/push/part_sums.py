"""Checksums of kept parts (shard-aware updates). The store's checksum covers a whole
tensor; a part a class of ranks receives gets its own, computed by the part's owner from
its host store (a Seal over strided ranges) the first time a version is planned for that
part, and kept while the version exists. Every engine verifies its parts against them
before loading, as it verifies whole tensors.

A direct push learns at BeginPush which parts the registered engines' layouts will want
(`wanted`) and its trainer sends their checksums with CommitPush, taken where the bytes
are (its GPU); they are recorded here (`record`) and no owner reads its store for them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

import structlog

from ckpt_common.dtypes import DTYPE_SIZES
from ckpt_daemon.agents import commands
from ckpt_daemon.agents.commands import Span
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.agents.results import store_ready
from ckpt_daemon.model import CheckpointVersion, RankRef, TensorInfo
from ckpt_daemon.plan.keeps import Keep, keeps_of, part_of
from ckpt_daemon.plan.placement import PlanError
from ckpt_daemon.plan.planner import Plan

log = structlog.get_logger("ckptd.part_sums")
MAX_WANTED = 1 << 20  # parts a push is asked for at most (beyond: the owners take them)

Key = tuple[str, int, RankRef, int, int, int, int]  # name, version, owner, src, bytes, rows, stride


def part_range(t: TensorInfo) -> tuple[int, int, int, int]:
    """(store offset, bytes, rows, stride) of a kept part narrowed on one dimension."""
    assert t.piece is not None
    dims = [d for d, (o, s) in enumerate(zip(t.piece.offset, t.piece.shape, strict=True))
            if o != 0 or s != t.shape[d]]  # fmt: skip
    if not dims:
        return t.store_offset, t.nbytes, 1, 0
    (d,) = dims
    inner = DTYPE_SIZES[t.dtype]
    for x in t.shape[d + 1 :]:
        inner *= x
    rows = 1
    for x in t.shape[:d]:
        rows *= x
    src = t.store_offset + t.piece.offset[d] * inner
    return src, t.nbytes, rows, t.shape[d] * inner


def wanted(layouts: Sequence[Sequence[dict]], tensors: list[TensorInfo]) -> list[tuple[int, Keep]]:
    """The distinct parts (index into tensors, keep) that these layouts (the registered
    engines', Registry.engine_layouts) keep of these tensors: what a shard-aware update of
    them will send. Pure (a thread's). Whole
    tensors only (a push in pieces is never shard-aware); a layout that does not fit is
    skipped (that update will be a broadcast)."""
    if any(t.piece is not None for t in tensors):
        return []
    index = {t.name: i for i, t in enumerate(tensors)}
    seen: dict[Keep, int] = {}
    for maps in layouts:
        for m in maps:
            try:
                keeps = keeps_of(m, tensors)
            except PlanError:
                continue
            for k in keeps:
                if k.dim >= 0 and k not in seen:
                    seen[k] = index[k.name]
            if len(seen) > MAX_WANTED:
                return []
    return [(i, k) for k, i in seen.items()]


class PartSums:
    def __init__(self, hub: AgentHub, timeout_s: float) -> None:
        self._hub = hub
        self._timeout_s = timeout_s
        self._sums: dict[Key, int] = {}

    async def fill(self, cv: CheckpointVersion, plans: list[Plan]) -> None:
        """Sets the checksum of every part of the plans (computing what is new)."""
        where: list[tuple[list[TensorInfo], int, Key]] = []
        for plan in plans:
            for i, t in enumerate(plan.tensors):
                if t.piece is not None and t.checksum is None:
                    where.append((plan.tensors, i, (cv.name, cv.version, t.owner, *part_range(t))))
        need: dict[RankRef, list[Key]] = {}
        for _, _, k in where:
            if k not in self._sums and k not in need.get(k[2], ()):
                need.setdefault(k[2], []).append(k)
        await asyncio.gather(*(self._compute(cv, r, keys) for r, keys in need.items()))
        for tensors, i, k in where:
            tensors[i] = replace(tensors[i], checksum=self._sums[k])

    async def _compute(self, cv: CheckpointVersion, r: RankRef, keys: list[Key]) -> None:
        spans = [Span(store_offset=k[3], nbytes=k[4], rows=k[5], stride=k[6]) for k in keys]
        cmd = commands.seal(cv.name, cv.version, r.device, spans)
        res = store_ready(await self._hub.command(r.node_id, cmd, self._timeout_s))
        self._sums.update(zip(keys, res.checksums, strict=True))
        log.info(
            "part_sums_from_store", checkpoint=cv.name, version=cv.version, owner=str(r),
            parts=len(keys), seconds=round(res.seconds, 4),
        )  # fmt: skip

    def record(self, cv: CheckpointVersion, parts: list[tuple[TensorInfo, Keep, int]]) -> None:
        """The trainer's checksums of parts of cv's tensors: (stored tensor, keep, checksum)."""
        for t, k, c in parts:
            self._sums[(cv.name, cv.version, t.owner, *part_range(part_of(t, k)))] = int(c)

    def forget(self, live: set[tuple[str, int]]) -> None:
        """Drops the sums of versions no longer held."""
        for k in [k for k in self._sums if (k[0], k[1]) not in live]:
            del self._sums[k]
