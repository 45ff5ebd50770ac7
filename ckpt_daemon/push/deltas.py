"""Delta stores: once a version is READY, its owners compute the delta from each version the
instances of its checkpoint serve (ckpt_agent.diff, in host memory), and ckptd records it as
a hidden version (`ckpt_common.delta.store_name(name, base)` @ version) whose tensors are the
payloads (TensorInfo.delta). A delta update (jobs/choose.py) reads only that store.

A delta store is self-contained (tensors that do not diff go in dense): deleting its base
does not break it; it goes with its target version. One that would not pay (plan.deltas.pays)
is dropped at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

import structlog

from ckpt_common.delta import store_name, store_of
from ckpt_common.errors import CkptError, FailedPrecondition
from ckpt_daemon.agents import commands
from ckpt_daemon.agents.results import diff_done
from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    RankRef,
    Shard,
    ShardState,
    TensorInfo,
)
from ckpt_daemon.plan.deltas import (
    PAYS_BELOW,
    DiffTask,
    common_base,
    diff_tasks,
    no_delta_engines,
    payload_tensors,
    pays,
)
from ckpt_daemon.plan.placement import HIDDEN_PREFIX

if TYPE_CHECKING:
    from ckpt_daemon.push.pusher import Pusher

log = structlog.get_logger("ckptd.push")


def delta_names(name: str, keys: set[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """The delta stores (hidden name, version, base) of checkpoint `name` among registry
    keys."""
    return [(n, v, of[1]) for n, v in keys if (of := store_of(n)) is not None and of[0] == name]


class DeltaMaker:
    def __init__(self, pusher: Pusher) -> None:
        self._p = pusher
        self._making: dict[tuple[str, int, int], asyncio.Task[CheckpointVersion | None]] = {}
        self.enabled = pusher.config.host_deltas

    def start(self, cv: CheckpointVersion) -> None:
        """cv is READY: makes its deltas from the version its instances serve (in the
        background; an update awaits one being made: `made`)."""
        if not self.enabled or cv.name.startswith(HIDDEN_PREFIX):
            return
        insts = [i for i in self._p.registry.instances() if i.checkpoint == cv.name]
        if no_delta_engines(insts):
            return  # nothing would take it
        base, _ = common_base(cv.name, insts)
        if not base or base >= cv.version or not self._p.registry.has_checkpoint(cv.name, base):
            return
        key = (cv.name, cv.version, base)
        if key in self._making or self._p.registry.has_checkpoint(
            store_name(cv.name, base), cv.version
        ):
            return
        task = asyncio.create_task(self._make(cv.name, cv.version, base))
        self._making[key] = task
        task.add_done_callback(lambda _: self._making.pop(key, None))

    def patching(self, name: str, version: int) -> Awaitable[CheckpointVersion] | None:
        """A delta-pushed version still being made from its base (push/delta_push.py)."""
        return self._p.delta_pushes.patching(name, version)

    def is_patching(self, name: str, version: int) -> bool:
        return self._p.delta_pushes.is_patching(name, version)

    async def made(
        self, name: str, version: int, base: int, wait_s: float
    ) -> CheckpointVersion | None:
        """The READY delta store of name@version from base, awaiting one being made (up to
        wait_s); None where there is none."""
        task = self._making.get((name, version, base))
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), wait_s)
            except (TimeoutError, CkptError):
                return None
        dv = self._p.registry.checkpoint(store_name(name, base), version)
        return dv if dv is not None and dv.state == CheckpointState.READY else None

    async def _make(self, name: str, version: int, base: int) -> CheckpointVersion | None:
        reg = self._p.registry
        target, b = reg.checkpoint(name, version), reg.checkpoint(name, base)
        if target is None or b is None:
            return None
        keys = [(name, version), (name, base)]
        busy = [k for k in keys if k not in self._p.inflight]
        self._p.inflight.update(busy)  # neither is deleted meanwhile
        t0 = time.monotonic()
        try:
            return await self._diff_all(target, base, diff_tasks(b.tensors, target.tensors), t0)
        except Exception as e:  # a delta is an optimisation: the update goes dense
            level = log.info if isinstance(e, FailedPrecondition) else log.warning
            level("delta_not_made", checkpoint=name, version=version, base=base, why=str(e))
            return None
        finally:
            self._p.inflight.difference_update(busy)

    async def _diff_all(
        self, target: CheckpointVersion, base: int, tasks: dict[RankRef, list[DiffTask]], t0: float
    ) -> CheckpointVersion | None:
        name, version = target.name, target.version
        hidden = store_name(name, base)
        timeout = self._p.config.load_timeout_s

        async def one(r: RankRef) -> tuple[RankRef, str, int, list[TensorInfo]]:
            dense = sum(t.target.nbytes for t in tasks[r])
            cmd = commands.diff(name, version, base, r.device, tasks[r], int(PAYS_BELOW * dense))
            segment, nbytes, made, _ = diff_done(await self._p.hub.command(r.node_id, cmd, timeout))
            return r, segment, nbytes, payload_tensors(tasks[r], made, base)

        got = await asyncio.gather(*(one(r) for r in tasks), return_exceptions=True)
        ok = [g for g in got if not isinstance(g, BaseException)]
        dv = CheckpointVersion(
            name=hidden, version=version, state=CheckpointState.READY,
            tensors=[t for g in ok for t in g[3]],
            shards={
                r: Shard(owner=r, nbytes=n, tensor_count=len(ts), state=ShardState.READY,
                         segment=seg)
                for r, seg, n, ts in ok
            },
            created=time.time(), ready=time.time(),
        )  # fmt: skip
        failed = [g for g in got if isinstance(g, BaseException)]
        if failed or not pays(dv.total_bytes, target.total_bytes):
            await self._p.drop(dv)  # what was made (or would not pay) goes
            if failed:
                raise failed[0]
            log.info("delta_not_kept", checkpoint=name, version=version, base=base,
                     bytes=dv.total_bytes, dense=target.total_bytes)  # fmt: skip
            return None
        if self._p.registry.checkpoint(name, version) is not target:
            await self._p.drop(dv)  # the target went meanwhile
            return None
        await self._p.add(dv)
        log.info(
            "delta_made", checkpoint=name, version=version, base=base, bytes=dv.total_bytes,
            dense=target.total_bytes, seconds=round(time.monotonic() - t0, 4),
        )  # fmt: skip
        return dv

    async def forget(self, name: str, version: int) -> None:
        """Drops the delta stores whose target is name@version (it is being deleted)."""
        for hidden, v, _ in delta_names(name, self._p.registry.checkpoint_keys()):
            if v == version:
                dv = self._p.registry.checkpoint(hidden, v)
                if dv is not None:
                    await self._p.forget(dv)
