"""What ckptd knows of the engines' sharding layouts: learned from a full update's answers,
forgotten after a failed shard-aware one."""

from __future__ import annotations

import structlog

from ckpt_daemon.model import LayoutMap, RankRef
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.jobs")


def layout_unknown(registry: Registry, targets: list[RankRef]) -> list[RankRef]:
    """Target ranks whose engine has not reported its sharding layout."""
    tset = set(targets)
    return [
        r
        for inst in registry.instances()
        if not inst.layout and set(inst.ranks) & tset
        for r in inst.ranks
    ]


def learn_layouts(registry: Registry, answers: dict[RankRef, LayoutMap | None]) -> None:
    """Stores the layout of each instance whose every rank's engine reported its map."""
    for inst in registry.instances():
        maps = [m for r in inst.ranks if (m := answers.get(r)) is not None]
        if inst.layout or not maps or len(maps) < len(inst.ranks):
            continue
        inst.layout = registry.put_layout(maps)
        registry.put_instance(inst)
        log.info("layout_learned", instance=inst.name, layout=inst.layout)


def forget_layouts(registry: Registry, targets: list[RankRef]) -> None:
    """After a failed shard-aware update: the layouts are learned again (an engine that
    changed its sharding refuses parts planned for the old one)."""
    tset = set(targets)
    for inst in registry.instances():
        if inst.layout and set(inst.ranks) & tset:
            inst.layout = ""
            registry.put_instance(inst)
