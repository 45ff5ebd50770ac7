"""Push: scan the sources through agents, place tensors over ranks, load host stores.

Scans and loads are watched: an agent that goes silent (frozen) fails the push within the
hub's silence limit, and its stores are dropped when it wakes up (the Drop is queued behind
the Load). A push that a ckptd restart interrupted is completed from what the agents report
holding when they re-attach, or dropped and removed (`recover`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from ckpt_common.errors import (
    AlreadyExists,
    CkptError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ckpt_daemon.agents import commands
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.agents.results import StoreReady, scanned, store_ready
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.model import (
    CheckpointVersion,
    Probe,
    RankRef,
    ShardState,
    SourceFile,
    TensorSpec,
)
from ckpt_daemon.plan.placement import HIDDEN_PREFIX, PlanError, mirror_name, place
from ckpt_daemon.push.delta_push import DeltaPushes
from ckpt_daemon.push.deltas import DeltaMaker
from ckpt_daemon.push.direct import DirectPushes
from ckpt_daemon.push.direct_store import DirectStore
from ckpt_daemon.push.part_sums import PartSums
from ckpt_daemon.push.recovery import recover
from ckpt_daemon.push.versions import (
    FileIds,
    admit,
    check_request,
    holders,
    mirror_version,
    new_version,
    spans,
)
from ckpt_daemon.registry.serialize import tensor_rows
from ckpt_daemon.registry.store import Registry, checksummed

log = structlog.get_logger("ckptd.push")


class Pusher:
    def __init__(self, registry: Registry, hub: AgentHub, config: DaemonConfig) -> None:
        self.registry = registry
        self.hub = hub
        self.config = config
        self.inflight: set[tuple[str, int]] = set()
        self.direct = DirectPushes(DirectStore(self).ops(), config.load_timeout_s)
        self.deltas = DeltaMaker(self)
        self.delta_pushes = DeltaPushes(self)
        self._tasks: set[asyncio.Task[None]] = set()
        # told of every push that ends: (version, ok); metrics
        self.on_done: Callable[[CheckpointVersion, bool], None] | None = None
        # the part checksums shard-aware updates use (JobRunner's), given trainers' ones
        self.part_sums: PartSums | None = None
        # told before a version's stores go: streamed updates still reading them end first
        self.before_forget: Callable[[str, int, str], Awaitable[None]] | None = None

    async def push(
        self,
        name: str,
        version: int,
        sources: list[SourceFile],
        ranks: list[int],
        *,
        timeout_s: float,
        wait: bool,
        replicas: int = 1,
        probe: Probe | None = None,
        read_uid: int | None = None,
    ) -> CheckpointVersion:
        """read_uid: the pushing principal's local uid; agents read only the files it could
        (None: only files everyone may read)."""
        check_request(
            name, version, sources, ranks, timeout_s=timeout_s, replicas=replicas, probe=probe
        )
        key = (name, version)
        if self.registry.has_checkpoint(*key) or key in self.inflight:
            raise AlreadyExists(f"checkpoint {name}@{version} already exists")
        where = holders(self.registry.rank_order(), ranks)
        self.inflight.add(key)
        try:
            versions, files = await self._prepare(key, sources, where, replicas, probe, read_uid)
        except BaseException:
            self.inflight.discard(key)
            raise
        cv = versions[0]
        log.info(
            "push_started", checkpoint=name, version=version, tensors=len(cv.tensors),
            bytes=cv.total_bytes, shards=len(cv.shards),
        )  # fmt: skip
        timeout = timeout_s or self.config.load_timeout_s
        # The load outlives the call: a client that goes away (Ctrl-C) leaves it to finish
        # (and, with wait, to be removed on failure), never half-loaded and LOADING forever.
        load = (
            self._load_all(versions, timeout, remove_on_failure=True, files=files, uid=read_uid)
            if wait
            else self._load_bg(versions, timeout, files, read_uid)
        )
        task = asyncio.create_task(load)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: self._load_ended(key, t))
        if wait:
            await asyncio.shield(task)
        return cv

    async def _prepare(
        self,
        key: tuple[str, int],
        sources: list[SourceFile],
        where: list[RankRef],
        replicas: int,
        probe: Probe | None,
        uid: int | None,
    ) -> tuple[list[CheckpointVersion], FileIds]:
        """Scans the sources, places their tensors on the holders, admits and records the
        new version (and its mirror): [version, mirror?] and the files as scanned."""
        specs, files = await self._scan(sources, where, uid)
        try:
            placement = await asyncio.to_thread(place, specs, where)
        except PlanError as e:
            raise InvalidArgument(str(e)) from None
        cv = new_version(*key, placement, probe)
        versions = [cv] if replicas != 2 else [cv, mirror_version(cv, where)]
        self.admit(versions)
        for v in versions:
            await self.add(v)
        return versions, files

    async def _load_all(
        self,
        versions: list[CheckpointVersion],
        timeout: float,
        *,
        remove_on_failure: bool,
        files: FileIds | None = None,
        uid: int | None = None,
    ) -> None:
        results = await asyncio.gather(
            *(
                self._load(v, timeout, remove_on_failure=remove_on_failure, files=files, uid=uid)
                for v in versions
            ),
            return_exceptions=True,
        )
        errors = [e for e in results if isinstance(e, BaseException)]
        if errors:
            if remove_on_failure:  # all or nothing: a half-mirrored push is no push
                for v in versions:
                    if self.registry.has_checkpoint(v.name, v.version):
                        await self.forget(v)
            raise errors[0]

    def _load_ended(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self.inflight.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved: the caller (if still there) raised it already

    async def _load_bg(
        self, versions: list[CheckpointVersion], timeout: float, files: FileIds, uid: int | None
    ) -> None:
        try:
            await self._load_all(versions, timeout, remove_on_failure=False, files=files, uid=uid)
        except CkptError:
            pass

    def admit(self, versions: list[CheckpointVersion]) -> None:
        """RESOURCE_EXHAUSTED when the stores do not fit the hosts' memory (versions.admit)."""
        admit(versions, self.registry.agents(), self.registry.checkpoints())

    async def _scan(
        self, sources: list[SourceFile], holders: list[RankRef], uid: int | None
    ) -> tuple[list[TensorSpec], FileIds]:
        """The tensors of the sources, and each file's identity as its scanning node saw it."""
        holder_nodes = sorted({r.node_id for r in holders})
        by_node: dict[str, list[str]] = {}
        for s in sources:
            if not s.path:
                raise InvalidArgument("a source has an empty path")
            node = s.node_id or holder_nodes[0]
            if s.node_id and s.node_id not in holder_nodes:
                raise InvalidArgument(
                    f"source {s.path} names node {s.node_id!r}, which holds none of the ranks"
                )
            by_node.setdefault(node, []).append(s.path)
        pinned = {s.path: s.node_id for s in sources}
        results = await self.hub.watched(
            asyncio.gather(
                *(
                    self.hub.command(node, commands.scan(paths, uid), self.config.command_timeout_s)
                    for node, paths in by_node.items()
                )
            ),
            by_node,
            "the scan of the push's sources",
        )
        specs: list[TensorSpec] = []
        files: FileIds = {}
        for res, (scanner, paths) in zip(results, by_node.items(), strict=True):
            for f in scanned(res):
                files[f.path] = (scanner, f.size, f.dev, f.ino, f.ctime_ns)
                node = next((pinned[p] for p in paths if f.path.startswith(p)), "")
                for t in f.tensors:
                    specs.append(
                        TensorSpec(
                            name=t.name,
                            dtype=t.dtype,
                            shape=t.shape,
                            nbytes=t.nbytes,
                            path=f.path,
                            file_offset=t.data_offset,
                            node_id=node,
                        )
                    )
        if not specs:
            raise InvalidArgument("the sources hold no tensors")
        return specs, files

    async def _load(
        self,
        cv: CheckpointVersion,
        timeout: float,
        *,
        remove_on_failure: bool,
        files: FileIds | None = None,
        uid: int | None = None,
    ) -> None:
        by_owner = spans(cv, files or {})

        async def load_one(r: RankRef) -> None:
            nbytes = cv.shards[r].nbytes
            cmd = commands.load(cv.name, cv.version, r.device, nbytes, by_owner[r], uid)
            try:
                res = store_ready(await self.hub.command(r.node_id, cmd, timeout))
            except CkptError as e:
                self.registry.set_shard(
                    cv.name, cv.version, r, ShardState.FAILED, reason=f"{r}: {e.message}"
                )
                raise
            await self.set_sums(cv, r, list(res.checksums))
            self.record_store(cv, r, ShardState.READY, res)

        try:
            results = await self.hub.watched(
                asyncio.gather(*(load_one(r) for r in by_owner), return_exceptions=True),
                {r.node_id for r in by_owner},
                f"the push of {cv.name}@{cv.version}",
            )
        except CkptError as e:
            results = [e]
        errors = [e for e in results if isinstance(e, BaseException)]
        if not errors:
            log.info("push_ready", checkpoint=cv.name, version=cv.version)
            self.done(cv, True)
            return
        first = errors[0]
        log.warning("push_failed", checkpoint=cv.name, version=cv.version, error=str(first))
        self.done(cv, False)
        if remove_on_failure:
            await self.forget(cv)
        else:
            self.registry.fail_checkpoint(cv.name, cv.version, str(first))
        if isinstance(first, CkptError):
            raise first
        raise first

    def done(self, cv: CheckpointVersion, ok: bool) -> None:
        if ok:
            self.deltas.start(cv)
        if self.on_done is not None:
            try:
                self.on_done(cv, ok)
            except Exception:
                log.exception("push_hook_failed")

    async def add(self, cv: CheckpointVersion) -> None:
        """Records a new version; its rows are made off the loop (100k tensors)."""
        self.registry.add_checkpoint(cv, await asyncio.to_thread(tensor_rows, cv))

    async def set_sums(self, cv: CheckpointVersion, r: RankRef, sums: list[int]) -> None:
        """Records r's checksums of cv's tensors (matched to them off the loop)."""
        self.registry.put_checksums(cv, await asyncio.to_thread(checksummed, cv.tensors, r, sums))

    async def allocate(self, cv: CheckpointVersion, r: RankRef) -> None:
        """An empty store for r's shard of cv (a direct or delta push writes it)."""
        cmd = commands.load(cv.name, cv.version, r.device, cv.shards[r].nbytes)
        res = await self.hub.command(r.node_id, cmd, self.config.load_timeout_s)
        self.record_store(cv, r, ShardState.LOADING, store_ready(res))

    def record_store(
        self, cv: CheckpointVersion, r: RankRef, state: ShardState, store: StoreReady
    ) -> None:
        """A shard's store as its agent reported it: segment and P2P address."""
        self.registry.set_shard(
            cv.name,
            cv.version,
            r,
            state,
            segment=store.segment,
            p2p=store.p2p,
        )

    async def forget(self, cv: CheckpointVersion) -> None:
        """Frees a version's host memory and removes it from the registry."""
        if self.before_forget is not None:
            await self.before_forget(cv.name, cv.version, "its stores are being freed")
        await self.drop(cv)
        self.registry.remove_checkpoint(cv.name, cv.version)
        if not cv.name.startswith(HIDDEN_PREFIX):  # its delta stores go with it
            await self.deltas.forget(cv.name, cv.version)

    async def drop(self, cv: CheckpointVersion) -> None:
        """Frees the host memory of every shard whose agent is attached (best effort)."""

        async def drop_one(r: RankRef) -> None:
            if not self.hub.attached(r.node_id):
                return
            cmd = commands.drop(cv.name, cv.version, r.device)
            if self.hub.silence(r.node_id) > self.hub.silence_limit:
                self.hub.send(r.node_id, cmd)  # frozen: it drops the store when it wakes up
                return
            try:
                await self.hub.command(r.node_id, cmd, self.config.command_timeout_s)
            except CkptError as e:
                log.warning(
                    "drop_failed",
                    checkpoint=cv.name,
                    version=cv.version,
                    rank=str(r),
                    error=e.message,
                )

        await asyncio.gather(*(drop_one(r) for r in cv.shards))

    def start_recovery(self) -> None:
        """Versions a restart interrupted: completed or removed (push/recovery.py)."""
        task = asyncio.create_task(recover(self))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def delete(
        self, name: str, version: int, busy: set[tuple[str, int]]
    ) -> list[CheckpointVersion]:
        targets = (
            [self.registry.checkpoint(name, version)] if version else self.registry.versions(name)
        )
        targets = [cv for cv in targets if cv]
        if not targets:
            raise NotFound(f"checkpoint {name}@{version or '*'} not found")
        for cv in targets:
            if (cv.name, cv.version) in busy or (cv.name, cv.version) in self.inflight:
                raise FailedPrecondition(
                    f"checkpoint {cv.name}@{cv.version} is in use by a running push or update"
                )
        for cv in targets:
            mirror = self.registry.checkpoint(mirror_name(cv.name), cv.version)
            for v in [cv] if mirror is None else [cv, mirror]:
                await self.forget(v)
            log.info("checkpoint_deleted", checkpoint=cv.name, version=cv.version)
        return targets
