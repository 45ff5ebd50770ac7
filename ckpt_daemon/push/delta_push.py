"""A trainer's delta push: it computed, on its GPU, the delta from a version it published
(the base) to the new one, and writes only the payloads (BeginPush with delta_base).

BeginPush checks every declaration against the base (each of its tensors once, dtypes and
shapes, payload sizes by encoding, none larger than its tensor), places each payload with
its base tensor's owner, records the delta store (the hidden version
`ckpt_common.delta.store_name(name, base)` @ version, push/deltas.py) and allocates it.
CommitPush takes the payloads' checksums (required: the trainer's, from its own bytes), and
has each owner make the full version from the base's store and the delta store (Patch),
every tensor checked against the target checksum the trainer declared; the version is then
READY, its delta store too, and an update of engines serving the base moves only the
payloads. A push that is never committed, or whose Patch fails, leaves nothing behind."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from ckpt_common.delta import store_name, store_of
from ckpt_common.dtypes import nbytes_of
from ckpt_common.errors import (
    AlreadyExists,
    CkptError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ckpt_daemon import admission
from ckpt_daemon.agents import commands
from ckpt_daemon.agents.results import store_ready
from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    Probe,
    RankRef,
    Shard,
    ShardState,
    with_checksum,
)
from ckpt_daemon.plan.deltas import DENSE, DeltaDecl, delta_placement
from ckpt_daemon.plan.placement import HIDDEN_PREFIX
from ckpt_daemon.push.deltas import delta_names

if TYPE_CHECKING:
    from ckpt_daemon.push.pusher import Pusher

log = structlog.get_logger("ckptd.push")
# what BeginPush answers: the delta store, its shards on the trainer's node, and where each
# payload goes (shard index, offset)
Begun = tuple[CheckpointVersion, list[Shard], list[tuple[int, int]]]


@dataclass
class _Open:
    name: str
    version: int
    base: int
    hidden: CheckpointVersion
    decls: list[DeltaDecl]
    probe: Probe | None
    keys: list[tuple[str, int]]
    expiry: asyncio.Task[None] | None = None
    finishing: asyncio.Task[CheckpointVersion] | None = None
    closed: bool = field(default=False)


class DeltaPushes:
    def __init__(self, pusher: Pusher) -> None:
        self._p = pusher
        self._open: dict[tuple[str, int], _Open] = {}
        self._patching: dict[tuple[str, int], asyncio.Task[CheckpointVersion]] = {}

    def is_open(self, name: str, version: int) -> bool:
        """A delta push of name@version awaits its commit (or is committing)."""
        return (name, version) in self._open

    def _base(self, name: str, version: int, base: int, node_id: str) -> CheckpointVersion:
        if base >= version:
            raise InvalidArgument(f"the base of a delta ({base}) must be older than {version}")
        key = (name, version)
        if self._p.registry.has_checkpoint(*key) or key in self._p.inflight:
            raise AlreadyExists(f"checkpoint {name}@{version} already exists")
        b = self._p.registry.checkpoint(name, base)
        if b is None:
            raise NotFound(f"the delta's base {name}@{base} does not exist")
        if b.state != CheckpointState.READY or any(t.checksum is None for t in b.tensors):
            raise FailedPrecondition(f"the delta's base {name}@{base} is not READY")
        if (name, base) in self._p.inflight:
            raise FailedPrecondition(f"the delta's base {name}@{base} is in use by a push")
        away = sorted(str(r) for r in b.shards if r.node_id != node_id)
        if away:
            raise FailedPrecondition(
                f"the base's stores on {away} are not on the trainer's node {node_id!r}"
            )
        return b

    async def begin(
        self, name: str, version: int, base: int, node_id: str, decls: Sequence[DeltaDecl],
        *, timeout_s: float, probe: Probe | None = None,
    ) -> Begun:  # fmt: skip
        admission.check_name("checkpoint name", name)
        admission.check_version(version)
        admission.check_version(base)
        admission.check_timeout("timeout_s", timeout_s)
        admission.check_list("tensors", decls, admission.MAX_TENSORS)
        made = self.patching(name, base)  # the base is itself still being made: wait for it
        if made is not None:
            with contextlib.suppress(CkptError, TimeoutError):
                await asyncio.wait_for(made, self._p.config.load_timeout_s)
        b = self._base(name, version, base, node_id)
        try:
            tensors, sizes = await asyncio.to_thread(delta_placement, b.tensors, decls, base)
        except ValueError as e:
            raise InvalidArgument(f"delta push of {name}@{version}: {e}") from None
        counts: dict[RankRef, int] = {}
        for t in tensors:
            counts[t.owner] = counts.get(t.owner, 0) + 1
        hidden = CheckpointVersion(
            name=store_name(name, base), version=version, state=CheckpointState.LOADING,
            tensors=tensors, created=time.time(),
            shards={r: Shard(owner=r, nbytes=n, tensor_count=counts[r])
                    for r, n in sizes.items()},
        )  # fmt: skip
        o = _Open(name, version, base, hidden, list(decls), probe,
                  [(name, version), (hidden.name, version), (name, base)])  # fmt: skip
        self._p.admit([hidden])
        self._open[(name, version)] = o
        self._p.inflight.update(o.keys)
        try:
            await self._p.add(hidden)
            await asyncio.gather(*(self._p.allocate(hidden, r) for r in hidden.shards))
        except BaseException:
            await self._close(o, forget=True)
            raise
        timeout = timeout_s or self._p.config.load_timeout_s
        o.expiry = asyncio.create_task(self._expire(o, timeout))
        mine = sorted(hidden.shards)
        index = {r: i for i, r in enumerate(mine)}
        return (
            hidden,
            [hidden.shards[r] for r in mine],
            [(index[t.owner], t.store_offset) for t in tensors],
        )

    async def commit(
        self, name: str, version: int, checksums: Sequence[int], early: bool = False
    ) -> CheckpointVersion:
        """early: return once the delta store is READY (the version is made meanwhile)."""
        o = self._open.get((name, version))
        if o is None:
            raise NotFound(f"no delta push of {name}@{version} awaits a commit")
        if o.finishing is None:
            sums = [int(c) for c in checksums]
            if len(sums) != len(o.decls):
                raise InvalidArgument(
                    f"a delta push commits one checksum per payload: {len(sums)} for {len(o.decls)}"
                )
            for d, c in zip(o.decls, sums, strict=True):
                if d.encoding == DENSE and c != d.target_checksum:
                    raise InvalidArgument(
                        f"tensor {d.name!r}: its dense payload is not the target's bytes"
                    )
            o.finishing = asyncio.create_task(self._finish(o, sums))
        target = await asyncio.shield(o.finishing)
        made = None if early else self.patching(name, version)
        return target if made is None else await made

    async def _finish(self, o: _Open, sums: list[int]) -> CheckpointVersion:
        """The payloads' checksums recorded and the delta store READY; the version recorded
        (LOADING) and made in the background (`patching`): an update of engines serving
        the base reads only the delta store and need not wait for it."""
        try:
            if o.expiry is not None:
                o.expiry.cancel()
            hidden = o.hidden
            pairs = enumerate(zip(hidden.tensors, sums, strict=True))
            self._p.registry.put_checksums(
                hidden, [(i, with_checksum(t, c)) for i, (t, c) in pairs]
            )
            for r in hidden.shards:
                self._p.registry.set_shard(hidden.name, hidden.version, r, ShardState.READY)
            target = await self._record_target(o)
        except BaseException:
            await self._close(o, forget=True)
            raise
        self._start_patch(o, target)
        return target

    def _start_patch(self, o: _Open, target: CheckpointVersion) -> asyncio.Task[CheckpointVersion]:
        """Makes target in the background (`patching` finds it meanwhile); a failure is
        logged by _patch_all and retrieved here, whether or not anyone awaits it."""
        key = (o.name, o.version)
        task = asyncio.create_task(self._patch_all(o, target))
        self._patching[key] = task

        def ended(t: asyncio.Task[CheckpointVersion]) -> None:
            self._patching.pop(key, None)
            if not t.cancelled():
                t.exception()

        task.add_done_callback(ended)
        return task

    def is_patching(self, name: str, version: int) -> bool:
        return (name, version) in self._patching

    def patching(self, name: str, version: int) -> Awaitable[CheckpointVersion] | None:
        """What to await for a delta-pushed version still being made to be READY (raises
        its failure), or None when none is being made."""
        task = self._patching.get((name, version))
        return None if task is None else asyncio.shield(task)

    async def _record_target(self, o: _Open) -> CheckpointVersion:
        """The new version, LOADING: the base's layout, the trainer's target checksums."""
        b = self._p.registry.checkpoint(o.name, o.base)
        if b is None:
            raise FailedPrecondition(f"the delta's base {o.name}@{o.base} is gone")
        sums = {d.name: d.target_checksum for d in o.decls}
        target = CheckpointVersion(
            name=o.name, version=o.version, state=CheckpointState.LOADING,
            tensors=[with_checksum(t, sums[t.name]) for t in b.tensors],
            shards={r: Shard(owner=r, nbytes=sh.nbytes, tensor_count=sh.tensor_count)
                    for r, sh in b.shards.items()},
            created=time.time(), probe=o.probe,
        )  # fmt: skip
        await self._p.add(target)
        return target

    def _spans(
        self, o: _Open, target: CheckpointVersion
    ) -> dict[RankRef, list[commands.PatchSpan]]:
        by_name = {t.name: t for t in target.tensors}
        spans: dict[RankRef, list[commands.PatchSpan]] = {}
        for t, d in zip(o.hidden.tensors, o.decls, strict=True):
            bt = by_name[t.name]
            spans.setdefault(t.owner, []).append(
                commands.PatchSpan(
                    offset=bt.store_offset, nbytes=bt.nbytes, itemsize=nbytes_of(t.dtype, (1,)),
                    encoding=d.encoding, count=d.count, delta_offset=t.store_offset,
                    delta_nbytes=t.nbytes, target_checksum=d.target_checksum,
                )
            )  # fmt: skip
        return spans

    async def _patch_all(self, o: _Open, target: CheckpointVersion) -> CheckpointVersion:
        """Each owner makes the version from the base's store and the delta store; READY,
        or FAILED with its stores (and the delta store) dropped."""
        spans = {  # an owner that made its part before a ckptd restart has it (resume)
            r: sp
            for r, sp in self._spans(o, target).items()
            if target.shards[r].state != ShardState.READY
        }

        async def one(r: RankRef) -> None:
            cmd = commands.patch(o.name, o.version, o.base, r.device, spans[r])
            res = store_ready(
                await self._p.hub.command(r.node_id, cmd, self._p.config.load_timeout_s)
            )
            self._p.record_store(target, r, ShardState.READY, res)

        got = await asyncio.gather(*(one(r) for r in spans), return_exceptions=True)
        failed = [g for g in got if isinstance(g, BaseException)]
        if failed:
            why = failed[0].message if isinstance(failed[0], CkptError) else repr(failed[0])
            log.warning("delta_push_failed", checkpoint=o.name, version=o.version, reason=why)
            served = any(
                (i.checkpoint, i.version) == (o.name, o.version)
                for i in self._p.registry.instances()
            )
            if served:  # what engines serve stays on record (FAILED), its stores go
                self._p.registry.fail_checkpoint(o.name, o.version, f"made from its delta: {why}")
                await self._p.drop(target)
            else:  # nothing of it is left
                await self._p.forget(target)
            await self._close(o, forget=True)
            self._p.done(target, False)
            raise failed[0]
        await self._close(o, forget=False)
        log.info("delta_push_ready", checkpoint=o.name, version=o.version, base=o.base,
                 bytes=o.hidden.total_bytes, dense=target.total_bytes)  # fmt: skip
        self._p.done(target, True)
        return target

    def resumable(self, cv: CheckpointVersion) -> CheckpointVersion | None:
        """The READY delta store a LOADING version was being made from when ckptd stopped
        (its base READY), or None."""
        if cv.state != CheckpointState.LOADING or cv.name.startswith(HIDDEN_PREFIX):
            return None
        reg = self._p.registry
        for n, v, base in sorted(delta_names(cv.name, reg.checkpoint_keys())):
            hidden, b = reg.checkpoint(n, v), reg.checkpoint(cv.name, base)
            if v != cv.version or hidden is None or b is None:
                continue
            if hidden.state == CheckpointState.READY and b.state == CheckpointState.READY:
                return hidden
        return None

    async def resume(self, target: CheckpointVersion, hidden: CheckpointVersion) -> None:
        """Makes a delta push's version that a ckptd restart interrupted, again from its
        base and its (READY) delta store; as at the push, it goes if that fails."""
        of = store_of(hidden.name)
        assert of is not None, hidden.name  # resumable() found it by that name
        base = of[1]
        sums = {t.name: t.checksum for t in target.tensors}
        decls = [
            DeltaDecl(
                name=t.name, dtype=t.dtype, shape=t.shape, nbytes=t.nbytes,
                encoding=t.delta.encoding if t.delta else DENSE,
                count=t.delta.count if t.delta else t.nbytes // nbytes_of(t.dtype, (1,)),
                target_checksum=sums[t.name] or 0,
                target_nbytes=t.delta.target_nbytes if t.delta else t.nbytes,
            )
            for t in hidden.tensors
        ]  # fmt: skip
        o = _Open(target.name, target.version, base, hidden, decls, target.probe,
                  [(target.name, target.version), (hidden.name, hidden.version),
                   (target.name, base)])  # fmt: skip
        self._open[(o.name, o.version)] = o
        self._p.inflight.update(o.keys)
        task = self._start_patch(o, target)
        log.info("delta_push_resumed", checkpoint=o.name, version=o.version, base=base)
        with contextlib.suppress(CkptError):
            await asyncio.shield(task)

    async def _expire(self, o: _Open, timeout: float) -> None:
        await asyncio.sleep(timeout)
        why = f"the delta push of {o.name}@{o.version} was not committed within {timeout:.0f}s"
        log.warning("delta_push_expired", checkpoint=o.name, version=o.version, reason=why)
        await self._close(o, forget=True)

    async def _close(self, o: _Open, *, forget: bool) -> None:
        if o.closed:
            return
        o.closed = True
        self._open.pop((o.name, o.version), None)
        self._p.inflight.difference_update(o.keys)
        if o.expiry is not None and o.expiry is not asyncio.current_task():
            o.expiry.cancel()
        if forget:
            with contextlib.suppress(CkptError):
                await self._p.forget(o.hidden)
