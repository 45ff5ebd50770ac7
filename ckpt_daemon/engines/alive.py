"""Engines are known alive before an update is planned onto them: each vLLM instance the
update targets answers its health check (`alive`, EngineTrigger.alive: a bounded GET
/health) or the update is refused (UNAVAILABLE) before anything changes. A reference
receiver has no HTTP side: its worker notices a dead one (receiver_link)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import structlog

from ckpt_common.errors import Unavailable
from ckpt_daemon.model import Instance, InstanceKind, RankRef

log = structlog.get_logger("ckptd.engine_alive")

Alive = Callable[[Instance], Awaitable[bool]]


async def check_engines(
    instances: Iterable[Instance], targets: Iterable[RankRef], alive: Alive | None
) -> None:
    """Raises Unavailable naming the targeted vLLM instances whose engine does not answer."""
    if alive is None:
        return
    tset = set(targets)
    hit = [i for i in instances if i.kind == InstanceKind.VLLM and set(i.ranks) & tset]
    if not hit:
        return
    answers = await asyncio.gather(*(alive(i) for i in hit))
    dead = sorted(i.name for i, ok in zip(hit, answers, strict=True) if not ok)
    if dead:
        log.warning("engines_not_alive", instances=dead)
        raise Unavailable(
            f"the engines of instances {dead} do not answer their health check: "
            "no update is planned onto them"
        )
