"""Direct push: a trainer's tensors written straight into the agents' host stores of its own
node, in one or several parts.

A version pushed by one process is one part. A sharded trainer (FSDP2/DTensor, Megatron)
pushes one part per rank: each rank declares its node and the tensors or pieces of tensors
(ckpt_common.pieces) it holds (BeginPush with part/parts). Every declaration waits until all
parts are in; then the version is checked (the pieces of every tensor tile it exactly, in one
dtype and shape), placed (every part's bytes on its own node's ranks), admitted and allocated,
and each part gets the targets of its own tensors. Each part writes and commits, with the
checksums of its tensors as the trainer computed them where the bytes were (its GPU) or
without them (an older client). Once every part has committed, an owner all of whose
tensors came with checksums has them recorded as they are (no pass over its store); the
others checksum their stores (Seal). The version is READY, and every waiting call returns
it. A part that never begins or never commits fails the whole push when its timeout passes;
nothing of it is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import structlog

from ckpt_common.dtypes import nbytes_of
from ckpt_common.errors import (
    AlreadyExists,
    CkptError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ckpt_common.pieces import Piece, check_piece, entry_key, tiling_problem
from ckpt_daemon import admission
from ckpt_daemon.engines import probes
from ckpt_daemon.model import CheckpointVersion, Probe, RankRef, Shard, TensorInfo, TensorSpec
from ckpt_daemon.plan.keeps import Keep
from ckpt_daemon.plan.placement import PlanError, place

log = structlog.get_logger("ckptd.push")
MAX_PARTS = 65536
# (name, dtype, whole shape, nbytes, piece or None) as a part declares it
Meta = tuple[str, str, tuple[int, ...], int, Piece | None]
# what a part gets back: the version, the shards it writes, per tensor (shard index, offset),
# and the parts of its tensors (index among them, keep) whose checksums ckptd asks for
Targets = tuple[CheckpointVersion, list[Shard], list[tuple[int, int]], list[tuple[int, Keep]]]
# the trainer's checksum of each entry (entry_key: name and piece) its part committed with
Known = dict[tuple, int]
# the parts (index among the given tensors, keep) the engines' layouts keep of them
Wanted = Callable[[list[TensorInfo]], list[tuple[int, Keep]]]


def part_specs(node_id: str, metas: Sequence[Meta]) -> list[TensorSpec]:
    """A part's tensors as specs pinned to its node. InvalidArgument on a bad one."""
    admission.check_list("tensors", metas, admission.MAX_TENSORS)
    out = []
    for name, dtype, shape, nbytes, piece in metas:
        admission.check_text("a tensor name", name, 1024, empty=False)
        if len(shape) > 16:
            raise InvalidArgument(f"tensor {admission.shown(name)}: over 16 dimensions")
        try:
            want = nbytes_of(dtype, shape)
            if piece is not None:
                check_piece(shape, piece)
                want = nbytes_of(dtype, piece.shape)
        except ValueError as e:
            raise InvalidArgument(f"tensor {admission.shown(name)}: {e}") from None
        if want != nbytes:
            box = list(shape) if piece is None else f"{list(piece.shape)} of {list(shape)}"
            raise InvalidArgument(
                f"tensor {admission.shown(name)}: {admission.shown(dtype)} {box} is {want} "
                f"bytes, not {nbytes}"
            )
        if piece is not None and piece.is_whole(shape):
            piece = None
        out.append(
            TensorSpec(
                name=name,
                dtype=dtype,
                shape=tuple(shape),
                nbytes=nbytes,
                path="",
                file_offset=0,
                node_id=node_id,
                piece=piece,
            )  # fmt: skip
        )
    return out


def check_whole(specs: Sequence[TensorSpec]) -> None:
    """Every tensor pushed in pieces is whole once its parts are in (INVALID_ARGUMENT says
    which is not); tensors named twice are refused when they are placed."""
    pieced = {s.name for s in specs if s.piece is not None}
    if not pieced:
        return  # whole tensors only: duplicates are the placement's to refuse
    bad = tiling_problem((s.name, s.dtype, s.shape, s.piece) for s in specs if s.name in pieced)
    if bad is not None:
        raise InvalidArgument(f"tensor {admission.shown(bad[0])}: {bad[1]}")


@dataclass(eq=False)
class Gathering:
    """A version whose parts are being declared, written and committed."""

    name: str
    version: int
    parts: int
    probe: Probe | None
    declared: dict[int, tuple[str, list[TensorSpec]]] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)
    sums: dict[int, list[int]] = field(default_factory=dict)  # part -> its trainer checksums
    upfront: set[int] = field(default_factory=set)  # parts that declared them at BeginPush
    wanted: dict[int, list[tuple[int, Keep]]] = field(default_factory=dict)  # part -> asked
    part_sums: dict[int, list[int]] = field(default_factory=dict)  # part -> their checksums
    placed: asyncio.Future[CheckpointVersion] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    sealed: asyncio.Future[CheckpointVersion] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    expiry: asyncio.Task[None] | None = None
    work: asyncio.Task[None] | None = None  # placing or sealing

    def fail(self, error: BaseException) -> None:
        for f in (self.placed, self.sealed):
            if not f.done():
                f.set_exception(error)
                f.exception()  # retrieved: a part no longer waiting must not log it


class DirectPushes:
    """The direct pushes in progress. `store` is the Pusher's half: admit, allocate, seal,
    forget and the set of versions in flight (no second push or delete meanwhile)."""

    def __init__(self, store: StoreOps, load_timeout_s: float) -> None:
        self._store = store
        self._timeout = load_timeout_s
        self._open: dict[tuple[str, int], Gathering] = {}

    async def begin(
        self, name: str, version: int, node_id: str, metas: Sequence[Meta], *,
        timeout_s: float, probe: Probe | None = None, part: int = 0, parts: int = 1,
        checksums: Sequence[int] = (),
    ) -> Targets:  # fmt: skip
        """checksums: the trainer's, one per tensor in metas' order, declared up front (an
        update can then stream from the push), or none."""
        admission.check_name("checkpoint name", name)
        admission.check_version(version)
        admission.check_timeout("timeout_s", timeout_s)
        admission.check_text("node_id", node_id, admission.MAX_NAME, empty=False)
        parts = max(1, parts)
        if parts > MAX_PARTS or not 0 <= part < parts:
            raise InvalidArgument(
                f"part {part} of {parts}: parts must be 1-{MAX_PARTS}, part below it"
            )
        if not metas and parts == 1:
            raise InvalidArgument("no tensors")
        if probe is not None:
            probes.validate(probe)
        if checksums and len(checksums) != len(metas):
            raise InvalidArgument(
                f"{len(checksums)} of {len(metas)} tensors carry a checksum: all or none"
            )
        specs = await asyncio.to_thread(part_specs, node_id, metas)  # 100k: off the loop
        if not any(r.node_id == node_id for r in self._store.ranks()):
            raise FailedPrecondition(f"no agent is attached on node {node_id!r}")
        g = self._gathering(name, version, parts, probe, timeout_s)
        if part in g.declared:
            raise AlreadyExists(f"part {part} of {name}@{version} has already begun")
        if g.placed.done():
            raise FailedPrecondition(f"{name}@{version} is no longer taking parts")
        g.probe = g.probe or probe
        g.declared[part] = (node_id, specs)
        if checksums:
            g.sums[part] = [int(c) for c in checksums]
            g.upfront.add(part)
        if len(g.declared) == parts:
            g.work = asyncio.create_task(self._place(g))  # held: a task must be referenced
        cv = await asyncio.shield(g.placed)
        return await asyncio.to_thread(self._targets, cv, g, part, self._store.wanted())

    def _gathering(
        self, name: str, version: int, parts: int, probe: Probe | None, timeout_s: float
    ) -> Gathering:
        key = (name, version)
        g = self._open.get(key)
        if g is None:
            if self._store.taken(key):
                raise AlreadyExists(f"checkpoint {name}@{version} already exists")
            g = Gathering(name=name, version=version, parts=parts, probe=probe)
            self._open[key] = g
            self._store.hold(key)
            g.expiry = asyncio.create_task(self._expire(g, timeout_s or self._timeout))
        elif g.parts != parts:
            raise InvalidArgument(f"{name}@{version} is pushed in {g.parts} parts, not {parts}")
        elif probe is not None and g.probe is not None and probe != g.probe:
            raise InvalidArgument(f"parts of {name}@{version} carry different probes")
        return g

    async def _place(self, g: Gathering) -> None:
        specs = [s for p in sorted(g.declared) for s in g.declared[p][1]]
        holders = [
            r for r in self._store.ranks() if r.node_id in {n for n, _ in g.declared.values()}
        ]
        try:
            check_whole(specs)
            try:
                placement = await asyncio.to_thread(place, specs, holders)
            except PlanError as e:
                raise InvalidArgument(str(e)) from None
            cv = await self._store.create(g.name, g.version, placement, g.probe)
            if len(g.upfront) == g.parts:  # an update may read it before the commit
                await self._store.declare(cv, await asyncio.to_thread(self._known, g))
        except BaseException as e:
            self._close(g)
            g.fail(e)
            return
        if g.placed.done():  # expired while the stores were allocated
            with contextlib.suppress(CkptError):
                await self._store.forget(cv)
            return
        g.placed.set_result(cv)
        log.info(
            "direct_push_begun", checkpoint=g.name, version=g.version, parts=g.parts,
            tensors=len(cv.tensors), shards=len(cv.shards),
        )  # fmt: skip

    @staticmethod
    def _targets(cv: CheckpointVersion, g: Gathering, part: int, wanted: Wanted) -> Targets:
        """The shards this part writes (its node's), where each of its tensors goes, and the
        parts of them the engines' known layouts keep (their checksums are asked for)."""
        node, specs = g.declared[part]
        mine = sorted(r for r in cv.shards if r.node_id == node)
        index = {r: i for i, r in enumerate(mine)}
        stored = {entry_key(t.name, t.piece): t for t in cv.tensors if t.owner in index}
        mine_t = [stored[entry_key(s.name, s.piece)] for s in specs]
        g.wanted[part] = wanted(mine_t)
        return (
            cv,
            [cv.shards[r] for r in mine],
            [(index[t.owner], t.store_offset) for t in mine_t],
            g.wanted[part],
        )

    async def commit(
        self, name: str, version: int, part: int = 0, checksums: Sequence[int] = (),
        part_checksums: Sequence[int] = (),
    ) -> CheckpointVersion:  # fmt: skip
        """checksums: the trainer's, one per tensor of the part's BeginPush in its order, or
        none (its owners then checksum their stores); part_checksums: one per part its
        BeginPush asked for (Targets), or none. A wrong count is INVALID_ARGUMENT and
        changes nothing."""
        key = (name, version)
        g = self._open.get(key)
        if g is None:
            if self._store.taken(key):
                raise FailedPrecondition(f"{name}@{version} is not a direct push awaiting commit")
            raise NotFound(f"checkpoint {name}@{version} not found (or its push expired)")
        if part not in g.declared:
            raise FailedPrecondition(f"part {part} of {name}@{version} has not begun")
        if not g.placed.done():
            raise FailedPrecondition(f"not every part of {name}@{version} has begun")
        if part in g.upfront:
            if checksums and [int(c) for c in checksums] != g.sums[part]:
                raise InvalidArgument(
                    f"part {part} of {name}@{version} commits other checksums than it declared "
                    "at BeginPush"
                )
        elif checksums:
            want = len(g.declared[part][1])
            if len(checksums) != want:
                raise InvalidArgument(
                    f"part {part} of {name}@{version} sent {len(checksums)} checksums for "
                    f"{want} tensors"
                )
            if part not in g.committed:
                g.sums[part] = [int(c) for c in checksums]
        if part_checksums:
            asked = len(g.wanted.get(part, ()))
            if len(part_checksums) != asked:
                raise InvalidArgument(
                    f"part {part} of {name}@{version} sent {len(part_checksums)} part checksums "
                    f"for the {asked} parts asked for"
                )
            g.part_sums.setdefault(part, [int(c) for c in part_checksums])
        g.committed.add(part)
        if len(g.committed) == g.parts and g.expiry is not None and not g.expiry.done():
            g.expiry.cancel()
            g.work = asyncio.create_task(self._seal(g))
        return await asyncio.shield(g.sealed)

    def streamable(self, name: str, version: int) -> bool:
        """Whether an update may read the version while it is written: a one-part push,
        placed, whose checksums were declared at BeginPush (the engines verify against
        them) and that has not committed yet."""
        g = self._open.get((name, version))
        return (
            g is not None
            and g.parts == 1
            and len(g.upfront) == 1
            and g.placed.done()
            and g.placed.exception() is None
            and not g.sealed.done()
        )

    def committed(self, name: str, version: int) -> Awaitable[CheckpointVersion] | None:
        """What to await for the push of a version still in flight to be READY (raises its
        failure), or None when it is not in flight."""
        g = self._open.get((name, version))
        return None if g is None else asyncio.shield(g.sealed)

    @staticmethod
    def _parts(cv: CheckpointVersion, g: Gathering) -> list[tuple[TensorInfo, Keep, int]]:
        """The trainer's part checksums: (stored tensor, keep, checksum)."""
        stored = {entry_key(t.name, t.piece): t for t in cv.tensors}
        out = []
        for p, sums in g.part_sums.items():
            specs = g.declared[p][1]
            for (i, k), c in zip(g.wanted[p], sums, strict=True):
                out.append((stored[entry_key(specs[i].name, specs[i].piece)], k, c))
        return out

    @staticmethod
    def _known(g: Gathering) -> Known:
        """The trainer's checksum of every entry whose part committed with checksums."""
        return {
            entry_key(s.name, s.piece): c
            for p, sums in g.sums.items()
            for s, c in zip(g.declared[p][1], sums, strict=True)
        }

    async def _seal(self, g: Gathering) -> None:
        cv = g.placed.result()
        try:
            known = await asyncio.to_thread(self._known, g)
            await self._store.seal(cv, known)
        except BaseException as e:
            self._close(g)
            g.fail(e)
            return
        self._store.record_parts(cv, self._parts(cv, g))
        self._close(g)
        g.sealed.set_result(cv)
        log.info(
            "push_ready", checkpoint=g.name, version=g.version, direct=True, parts=g.parts,
            trainer_checksums=len(known),
        )  # fmt: skip

    async def _expire(self, g: Gathering, timeout: float) -> None:
        await asyncio.sleep(timeout)
        stage = "begun" if not g.placed.done() else "committed"
        seen = g.declared if stage == "begun" else g.committed
        missing = [p for p in range(g.parts) if p not in seen]
        why = f"parts {missing[:8]} of {g.name}@{g.version} had not {stage} within {timeout:.0f}s"
        log.warning("direct_push_expired", checkpoint=g.name, version=g.version, reason=why)
        self._close(g)
        g.fail(DeadlineExceeded(why))
        if g.placed.done() and g.placed.exception() is None:
            with contextlib.suppress(CkptError):
                await self._store.forget(g.placed.result())

    def _close(self, g: Gathering) -> None:
        key = (g.name, g.version)
        if self._open.get(key) is g:
            del self._open[key]
            self._store.release(key)
        if g.expiry is not None and g.expiry is not asyncio.current_task():
            g.expiry.cancel()


@dataclass(frozen=True)
class StoreOps:
    """What a direct push needs from the Pusher."""

    ranks: Callable[[], list[RankRef]]
    taken: Callable[[tuple[str, int]], bool]
    hold: Callable[[tuple[str, int]], None]
    release: Callable[[tuple[str, int]], None]
    create: Callable[..., Awaitable[CheckpointVersion]]  # (name, version, placement, probe)
    seal: Callable[[CheckpointVersion, Known], Awaitable[None]]  # Known: the trainer's sums
    declare: Callable[[CheckpointVersion, Known], Awaitable[None]]  # sums given at BeginPush
    # on the loop: what the engines' known layouts keep of a part's tensors (run in a thread)
    wanted: Callable[[], Wanted]
    record_parts: Callable[[CheckpointVersion, list[tuple[TensorInfo, Keep, int]]], None]
    forget: Callable[[CheckpointVersion], Awaitable[None]]
