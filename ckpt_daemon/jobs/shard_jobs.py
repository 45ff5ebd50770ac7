"""Whether an update can be shard-aware, and its groups when it can.

An update is shard-aware when every target rank sits in an instance whose engine has
reported its sharding layout (Registry.layout; it does so during its first update), the
checkpoint is stored whole (not in pieces) and some rank keeps less than every tensor whole.
Then each class of ranks keeping the same parts is one group (shard_plan.group_plans) whose
members read their parts from the owners' stores: from the shared segment where the owner
is on the reader's node, else by P2P (Mooncake) where the owner's store is registered.
Anything else makes it a broadcast (method "auto") or a refusal saying why ("sharded").
"""

from __future__ import annotations

from collections.abc import Sequence

from ckpt_daemon.model import RankRef, TensorInfo
from ckpt_daemon.plan.keeps import Keep, keeps_of
from ckpt_daemon.plan.placement import PlanError
from ckpt_daemon.plan.shard_plan import GroupPlan, group_plans
from ckpt_daemon.registry.store import Registry


class NotSharded(Exception):
    """Why this update cannot be shard-aware; relearn: the layouts known are out of date
    (a tensor an engine has not described), so the broadcast should learn them again."""

    def __init__(self, why: str, relearn: bool = False) -> None:
        super().__init__(why)
        self.relearn = relearn


def target_maps(registry: Registry, targets: Sequence[RankRef]) -> dict[RankRef, dict]:
    """Each target rank's sharding map, from its instance's stored layout."""
    tset = set(targets)
    out: dict[RankRef, dict] = {}
    for inst in registry.instances():
        mine = [r for r in inst.ranks if r in tset]
        if not mine:
            continue
        maps = registry.layout(inst.layout) if inst.layout else None
        if maps is None or len(maps) != len(inst.ranks):
            raise NotSharded(f"instance {inst.name!r} has not reported its sharding layout yet")
        out.update((r, maps[i]) for i, r in enumerate(inst.ranks) if r in tset)
    missing = sorted(str(r) for r in tset - set(out))
    if missing:
        raise NotSharded(f"ranks {missing} belong to no registered engine")
    return out


def keeps(tensors: Sequence[TensorInfo], maps: dict[RankRef, dict]) -> dict[RankRef, list[Keep]]:
    """Each rank's keeps. A tensor some engine has never seen (not in its map: a name its
    model may not have) makes it a broadcast, so the engine itself judges it."""
    if any(t.piece is not None for t in tensors):
        raise NotSharded("the checkpoint is stored in pieces (a sharded push)")
    for r, m in maps.items():
        unseen = next((t.name for t in tensors if t.name not in m), None)
        if unseen is not None:
            raise NotSharded(f"the engine on {r} has not seen tensor {unseen!r}", relearn=True)
    try:
        out = {r: keeps_of(m, tensors) for r, m in maps.items()}
    except PlanError as e:
        raise NotSharded(str(e)) from None
    n = len(tensors)
    if all(len(k) == n and all(x.dim < 0 for x in k) for k in out.values()):
        raise NotSharded("every rank keeps every tensor whole: a broadcast is the plan")
    return out


def plan(
    tensors: Sequence[TensorInfo],
    maps: dict[RankRef, list[Keep]],
    *,
    bucket_bytes: int,
    nbuf: int,
    partial: bool,
) -> list[GroupPlan]:
    """The update's groups (shard_plan.group_plans); where their readers read is ckptd's
    decision (PlanChooser.read_sources), as for a P2P join."""
    try:
        return group_plans(tensors, maps, bucket_bytes=bucket_bytes, nbuf=nbuf, partial=partial)
    except PlanError as e:
        raise NotSharded(str(e)) from None
