"""Where a P2P reader finds a shard's bytes: its owner's host store, or its mirror's."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from ckpt_daemon.model import CheckpointVersion, RankRef, ShardState
from ckpt_daemon.plan.placement import mirror_name
from ckpt_daemon.registry.store import Registry

log = structlog.get_logger("ckptd.sources")


def p2p_sources(
    registry: Registry, attached: Callable[[str], bool], cv: CheckpointVersion
) -> dict[RankRef, tuple[str, int]] | None:
    """For each shard owner of cv, where its store can be read now: (session, address)
    of the owner's store while it is READY and its agent attached, else of its mirror
    store (replicas=2) if that is. None when some shard can be read from nowhere."""
    mirror = registry.checkpoint(mirror_name(cv.name), cv.version)
    to_mirror = (
        {p.owner: q.owner for p, q in zip(cv.tensors, mirror.tensors, strict=True)}
        if mirror is not None
        else {}
    )
    out: dict[RankRef, tuple[str, int]] = {}
    for r, sh in cv.shards.items():
        if sh.state == ShardState.READY and sh.p2p_session and attached(r.node_id):
            out[r] = (sh.p2p_session, sh.p2p_addr)
            continue
        m = to_mirror.get(r)
        ms = mirror.shards.get(m) if (mirror is not None and m is not None) else None
        if (
            ms is not None
            and ms.state == ShardState.READY
            and ms.p2p_session
            and attached(m.node_id)
        ):
            out[r] = (ms.p2p_session, ms.p2p_addr)
            log.info(
                "reading_mirror",
                checkpoint=cv.name,
                version=cv.version,
                owner=str(r),
                mirror=str(m),
            )
        else:
            return None
    return out
