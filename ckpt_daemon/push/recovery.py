"""After a ckptd restart: versions LOADING when it started (a push it interrupted) are
completed from the stores their agents report holding once they re-attach, made again from
their base and delta store (a delta push committed early), or their stores are dropped and
they are removed."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import structlog

from ckpt_daemon.model import CheckpointState, CheckpointVersion, ShardState

if TYPE_CHECKING:
    from ckpt_daemon.push.pusher import Pusher

log = structlog.get_logger("ckptd.push")
RECOVER_S = 15.0  # after a restart, how long agents get to re-attach before a push is judged


async def recover(p: Pusher, wait_s: float = RECOVER_S) -> None:
    """Versions LOADING when ckptd started: a restart interrupted their push. Once their
    agents re-attached (or wait_s passed), each is completed from the stores the agents
    report holding, or its stores are dropped and it is removed."""
    stale = [cv for cv in p.registry.checkpoints() if cv.state == CheckpointState.LOADING]
    if not stale:
        return
    keys = [(cv.name, cv.version) for cv in stale]
    p.inflight.update(keys)  # no delete, no push of the same version meanwhile
    try:
        nodes = {r.node_id for cv in stale for r in cv.shards}
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and not all(map(p.hub.attached, nodes)):
            await asyncio.sleep(0.2)
        for cv in stale:
            await _recover_one(p, cv)
    finally:
        p.inflight.difference_update(keys)


async def _recover_one(p: Pusher, cv: CheckpointVersion) -> None:
    held = {
        r: p.hub.held.get(r.node_id, {}).get((cv.name, cv.version, r.device)) for r in cv.shards
    }
    missing = sorted(
        str(r)
        for r, h in held.items()
        if h is None or h.nbytes != cv.shards[r].nbytes or not p.hub.attached(r.node_id)
    )
    direct = any(not t.path for t in cv.tensors)
    hidden = p.delta_pushes.resumable(cv) if direct else None
    if hidden is not None:  # a delta push's version, being made from its base: again
        await p.delta_pushes.resume(cv, hidden)
        return
    if direct or missing:
        why = (
            "a direct push cannot be committed after a ckptd restart"
            if direct
            else f"ranks {missing} do not hold their shard"
        )
        log.warning("push_abandoned", checkpoint=cv.name, version=cv.version, reason=why)
        await p.forget(cv)
        return
    for r, h in held.items():
        assert h is not None
        p.registry.set_shard(
            cv.name,
            cv.version,
            r,
            ShardState.READY,
            segment=h.segment,
            p2p=(h.p2p.session, h.p2p.addr),
        )
    log.info("push_recovered", checkpoint=cv.name, version=cv.version, shards=len(held))
