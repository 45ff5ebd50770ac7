"""Checksums of kept parts (shard-aware updates). The store's checksum covers a whole
tensor; a part a class of ranks receives gets its own, computed by the part's owner from
its host store (a Seal over strided ranges) the first time a version is planned for that
part, and kept while the version exists. Every engine verifies its parts against them
before loading, as it verifies whole tensors."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from ckpt.v1 import agent_pb2 as apb
from ckpt_common.dtypes import DTYPE_SIZES
from ckpt_daemon.agents import AgentHub
from ckpt_daemon.execute import Group
from ckpt_daemon.model import CheckpointVersion, RankRef, TensorInfo

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


class PartSums:
    def __init__(self, hub: AgentHub, timeout_s: float) -> None:
        self._hub = hub
        self._timeout_s = timeout_s
        self._sums: dict[Key, int] = {}

    async def fill(self, cv: CheckpointVersion, groups: list[Group]) -> None:
        """Sets the checksum of every part of the groups' plans (computing what is new)."""
        where: list[tuple[list[TensorInfo], int, Key]] = []
        for g in groups:
            for i, t in enumerate(g.plan.tensors):
                if t.piece is not None and t.checksum is None:
                    where.append(
                        (g.plan.tensors, i, (cv.name, cv.version, t.owner, *part_range(t)))
                    )
        need: dict[RankRef, list[Key]] = {}
        for _, _, k in where:
            if k not in self._sums and k not in need.get(k[2], ()):
                need.setdefault(k[2], []).append(k)
        await asyncio.gather(*(self._compute(cv, r, keys) for r, keys in need.items()))
        for tensors, i, k in where:
            tensors[i] = replace(tensors[i], checksum=self._sums[k])

    async def _compute(self, cv: CheckpointVersion, r: RankRef, keys: list[Key]) -> None:
        items = [apb.LoadItem(store_offset=k[3], nbytes=k[4], rows=k[5], stride=k[6]) for k in keys]
        cmd = apb.Command(
            seal=apb.Seal(checkpoint=cv.name, version=cv.version, device=r.device, items=items)
        )
        res = await self._hub.command(r.node_id, cmd, self._timeout_s)
        self._sums.update(zip(keys, res.store.checksums, strict=True))

    def forget(self, live: set[tuple[str, int]]) -> None:
        """Drops the sums of versions no longer held."""
        for k in [k for k in self._sums if (k[0], k[1]) not in live]:
            del self._sums[k]
