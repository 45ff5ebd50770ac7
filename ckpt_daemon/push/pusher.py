"""Push: scan the sources through agents, place tensors over ranks, load host stores.

Scans and loads are watched: an agent that goes silent (frozen) fails the push within the
hub's silence limit, and its stores are dropped when it wakes up (the Drop is queued behind
the Load). A push that a ckptd restart interrupted is completed from what the agents report
holding when they re-attach, or dropped and removed (`recover`)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable

import structlog

from ckpt_common.errors import (
    AlreadyExists,
    CkptError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from ckpt_common.pieces import entry_key
from ckpt_daemon import admission
from ckpt_daemon.agents import commands
from ckpt_daemon.agents.commands import Span
from ckpt_daemon.agents.hub import AgentHub
from ckpt_daemon.agents.results import StoreReady, scanned, store_ready
from ckpt_daemon.config import DaemonConfig
from ckpt_daemon.engines import probes
from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    Probe,
    RankRef,
    Shard,
    ShardState,
    SourceFile,
    TensorInfo,
    TensorSpec,
)
from ckpt_daemon.plan.keeps import Keep
from ckpt_daemon.plan.placement import (
    Placement,
    PlanError,
    mirror_map,
    mirror_name,
    mirrored,
    place,
)
from ckpt_daemon.push import part_sums
from ckpt_daemon.push.direct import DirectPushes, Known, StoreOps
from ckpt_daemon.push.part_sums import PartSums
from ckpt_daemon.registry.serialize import tensor_rows
from ckpt_daemon.registry.store import Registry, checksummed

log = structlog.get_logger("ckptd.push")
# path -> (scanning node, size, dev, inode, ctime_ns)
FileIds = dict[str, tuple[str, int, int, int, int]]
MAX_NAME = 200
RECOVER_S = 15.0  # after a restart, how long agents get to re-attach before a push is judged


def validate_name(name: str) -> None:
    admission.check_name("checkpoint name", name)


def new_version(
    name: str, version: int, placement: Placement, probe: Probe | None = None
) -> CheckpointVersion:
    """A LOADING version with a shard per owner of the placement."""
    shards: dict[RankRef, Shard] = {}
    for t in placement.tensors:
        sh = shards.setdefault(t.owner, Shard(owner=t.owner, nbytes=0, tensor_count=0))
        sh.tensor_count += 1
    for r, n in placement.store_bytes.items():
        shards[r].nbytes = n
    return CheckpointVersion(
        name=name,
        version=version,
        state=CheckpointState.LOADING,
        tensors=placement.tensors,
        shards=shards,
        created=time.time(),
        probe=probe,
    )


class Pusher:
    def __init__(self, registry: Registry, hub: AgentHub, config: DaemonConfig) -> None:
        self._registry = registry
        self._hub = hub
        self._config = config
        self._inflight: set[tuple[str, int]] = set()
        self.direct = DirectPushes(self._direct_ops(), config.load_timeout_s)
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
        validate_name(name)
        if probe is not None:
            probes.validate(probe)
        admission.check_version(version)
        admission.check_timeout("timeout_s", timeout_s)
        if not sources:
            raise InvalidArgument("no sources")
        admission.check_list("sources", sources, 4096)
        admission.check_list("ranks", ranks)
        for src in sources:
            admission.check_text("a source path", src.path, empty=False)
            admission.check_text("a source node", src.node_id, admission.MAX_NAME)
        if replicas not in (0, 1, 2):
            raise InvalidArgument("replicas must be 1 or 2")
        if replicas == 2 and any(s.node_id for s in sources):
            raise InvalidArgument("replicas=2 needs sources every node can read (no node pin)")
        key = (name, version)
        if self._registry.has_checkpoint(*key) or key in self._inflight:
            raise AlreadyExists(f"checkpoint {name}@{version} already exists")
        order = self._registry.rank_order()
        if not order:
            raise FailedPrecondition("no agents attached")
        if ranks:
            bad = [r for r in ranks if r < 0 or r >= len(order)]
            if bad:
                raise InvalidArgument(f"ranks {bad} out of range 0-{len(order) - 1}")
            holders = [order[r] for r in sorted(set(ranks))]
        else:
            holders = order
        self._inflight.add(key)
        try:
            specs, files = await self._scan(sources, holders, read_uid)
            try:
                placement = await asyncio.to_thread(place, specs, holders)
            except PlanError as e:
                raise InvalidArgument(str(e)) from None
            cv = new_version(name, version, placement, probe)
            shards = cv.shards
            mirror = None
            if replicas == 2:
                try:
                    mapping = mirror_map(holders)
                except PlanError as e:
                    raise InvalidArgument(str(e)) from None
                mirror = CheckpointVersion(
                    name=mirror_name(name),
                    version=version,
                    state=CheckpointState.LOADING,
                    tensors=mirrored(placement.tensors, mapping),
                    shards={
                        mapping[r]: Shard(
                            owner=mapping[r], nbytes=sh.nbytes, tensor_count=sh.tensor_count
                        )
                        for r, sh in shards.items()
                    },
                    created=cv.created,
                )
            self._admit([cv] if mirror is None else [cv, mirror])
            await self._add(cv)
            if mirror is not None:
                await self._add(mirror)
        except BaseException:
            self._inflight.discard(key)
            raise
        log.info(
            "push_started",
            checkpoint=name,
            version=version,
            tensors=len(cv.tensors),
            bytes=cv.total_bytes,
            shards=len(shards),
        )
        timeout = timeout_s or self._config.load_timeout_s
        versions = [cv] if mirror is None else [cv, mirror]
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
                    if self._registry.has_checkpoint(v.name, v.version):
                        await self._forget(v)
            raise errors[0]

    def _load_ended(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self._inflight.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved: the caller (if still there) raised it already

    async def _load_bg(
        self, versions: list[CheckpointVersion], timeout: float, files: FileIds, uid: int | None
    ) -> None:
        try:
            await self._load_all(versions, timeout, remove_on_failure=False, files=files, uid=uid)
        except CkptError:
            pass

    def _admit(self, versions: list[CheckpointVersion]) -> None:
        """RESOURCE_EXHAUSTED when the stores do not fit the host memory their nodes report,
        less what versions still loading will take."""
        need: dict[str, int] = {}
        for v in versions:
            for r, sh in v.shards.items():
                need[r.node_id] = need.get(r.node_id, 0) + sh.nbytes
        free: dict[str, int] = {}
        for a in self._registry.agents():
            cpu = sum(d.free_bytes for d in a.devices if d.kind == "cpu")
            if a.host_free_bytes or cpu:
                free[a.node_id] = a.host_free_bytes or cpu
        reserved: dict[str, int] = {}
        for cv in self._registry.checkpoints():
            if cv.state == CheckpointState.LOADING:
                for r, sh in cv.shards.items():
                    reserved[r.node_id] = reserved.get(r.node_id, 0) + sh.nbytes
        known = {n: b for n, b in need.items() if n in free}  # nodes that report no memory
        admission.require_admitted(known, free, reserved)

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
        results = await self._hub.watched(
            asyncio.gather(
                *(
                    self._hub.command(
                        node, commands.scan(paths, uid), self._config.command_timeout_s
                    )
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
        by_owner = _spans(cv, files or {})

        async def load_one(r: RankRef) -> None:
            nbytes = cv.shards[r].nbytes
            cmd = commands.load(cv.name, cv.version, r.device, nbytes, by_owner[r], uid)
            try:
                res = store_ready(await self._hub.command(r.node_id, cmd, timeout))
            except CkptError as e:
                self._registry.set_shard(
                    cv.name, cv.version, r, ShardState.FAILED, reason=f"{r}: {e.message}"
                )
                raise
            await self._set_sums(cv, r, list(res.checksums))
            self._record_store(cv, r, ShardState.READY, res)

        try:
            results = await self._hub.watched(
                asyncio.gather(*(load_one(r) for r in by_owner), return_exceptions=True),
                {r.node_id for r in by_owner},
                f"the push of {cv.name}@{cv.version}",
            )
        except CkptError as e:
            results = [e]
        errors = [e for e in results if isinstance(e, BaseException)]
        if not errors:
            log.info("push_ready", checkpoint=cv.name, version=cv.version)
            self._done(cv, True)
            return
        first = errors[0]
        log.warning("push_failed", checkpoint=cv.name, version=cv.version, error=str(first))
        self._done(cv, False)
        if remove_on_failure:
            await self._forget(cv)
        else:
            self._registry.fail_checkpoint(cv.name, cv.version, str(first))
        if isinstance(first, CkptError):
            raise first
        raise first

    # ------------------------------------------------------------------ direct push

    def _direct_ops(self) -> StoreOps:
        def taken(key: tuple[str, int]) -> bool:
            return self._registry.has_checkpoint(*key) or key in self._inflight

        return StoreOps(
            ranks=self._registry.rank_order,
            taken=taken,
            hold=self._inflight.add,
            release=self._inflight.discard,
            create=self._create_direct,
            seal=self._seal_direct,
            declare=self._declare_direct,
            wanted=lambda: functools.partial(part_sums.wanted, self._registry.engine_layouts()),
            record_parts=self._record_parts,
            forget=self._forget,
        )

    async def _create_direct(
        self, name: str, version: int, placement: Placement, probe: Probe | None
    ) -> CheckpointVersion:
        """A LOADING version of a direct push, admitted, recorded, its stores allocated."""
        cv = new_version(name, version, placement, probe)
        self._admit([cv])
        await self._add(cv)
        try:
            await asyncio.gather(*(self._allocate(cv, r) for r in cv.shards))
        except BaseException:
            await self._forget(cv)
            raise
        return cv

    async def _allocate(self, cv: CheckpointVersion, r: RankRef) -> None:
        cmd = commands.load(cv.name, cv.version, r.device, cv.shards[r].nbytes)
        res = await self._hub.command(r.node_id, cmd, self._config.load_timeout_s)
        self._record_store(cv, r, ShardState.LOADING, store_ready(res))

    def _done(self, cv: CheckpointVersion, ok: bool) -> None:
        if self.on_done is not None:
            try:
                self.on_done(cv, ok)
            except Exception:
                log.exception("push_hook_failed")

    async def _seal_direct(self, cv: CheckpointVersion, known: Known) -> None:
        """READY once every owner's checksums are recorded: the trainer's (`known`, by entry)
        where it sent one for every tensor of the owner (the owner is only asked whether it
        holds the store: a Seal of no range), else what the owner computes from its store
        (Seal). A seal that fails drops the version."""
        given = owner_sums(cv, known)
        try:
            await self._hub.watched(
                asyncio.gather(*(self._seal(cv, r, given.get(r)) for r in cv.shards)),
                {r.node_id for r in cv.shards},
                f"the commit of {cv.name}@{cv.version}",
            )
        except BaseException:
            self._done(cv, False)
            await self._forget(cv)
            raise
        for r in cv.shards:
            self._registry.set_shard(cv.name, cv.version, r, ShardState.READY)
        log.info(
            "push_sealed", checkpoint=cv.name, version=cv.version,
            trainer_ranks=len(given), store_ranks=len(cv.shards) - len(given),
        )  # fmt: skip
        self._done(cv, True)

    def _record_parts(
        self, cv: CheckpointVersion, parts: list[tuple[TensorInfo, Keep, int]]
    ) -> None:
        if self.part_sums is not None and parts:
            self.part_sums.record(cv, parts)

    async def _declare_direct(self, cv: CheckpointVersion, known: Known) -> None:
        """Records the checksums a trainer declared at BeginPush, before any byte is
        written: the tensors of a version still LOADING carry them, for a streamed update."""
        for r, sums in owner_sums(cv, known).items():
            await self._set_sums(cv, r, sums)

    async def _seal(self, cv: CheckpointVersion, r: RankRef, sums: list[int] | None) -> None:
        """Records r's checksums: `sums` (the trainer's) once r says it holds the store, or
        (None) the ones r computes over its store."""
        items = (
            []
            if sums is not None
            else [
                Span(store_offset=t.store_offset, nbytes=t.nbytes)
                for t in cv.tensors
                if t.owner == r
            ]
        )
        cmd = commands.seal(cv.name, cv.version, r.device, items)
        res = store_ready(await self._hub.command(r.node_id, cmd, self._config.load_timeout_s))
        got = sums if sums is not None else list(res.checksums)
        await self._set_sums(cv, r, got)

    async def _add(self, cv: CheckpointVersion) -> None:
        """Records a new version; its rows are made off the loop (100k tensors)."""
        self._registry.add_checkpoint(cv, await asyncio.to_thread(tensor_rows, cv))

    async def _set_sums(self, cv: CheckpointVersion, r: RankRef, sums: list[int]) -> None:
        """Records r's checksums of cv's tensors (matched to them off the loop)."""
        self._registry.put_checksums(cv, await asyncio.to_thread(checksummed, cv.tensors, r, sums))

    def _record_store(
        self, cv: CheckpointVersion, r: RankRef, state: ShardState, store: StoreReady
    ) -> None:
        """A shard's store as its agent reported it: segment and P2P address."""
        self._registry.set_shard(
            cv.name,
            cv.version,
            r,
            state,
            segment=store.segment,
            p2p=store.p2p,
        )

    async def _forget(self, cv: CheckpointVersion) -> None:
        """Frees a version's host memory and removes it from the registry."""
        if self.before_forget is not None:
            await self.before_forget(cv.name, cv.version, "its stores are being freed")
        await self.drop(cv)
        self._registry.remove_checkpoint(cv.name, cv.version)

    async def drop(self, cv: CheckpointVersion) -> None:
        """Frees the host memory of every shard whose agent is attached (best effort)."""

        async def drop_one(r: RankRef) -> None:
            if not self._hub.attached(r.node_id):
                return
            cmd = commands.drop(cv.name, cv.version, r.device)
            if self._hub.silence(r.node_id) > self._hub.silence_limit:
                self._hub.send(r.node_id, cmd)  # frozen: it drops the store when it wakes up
                return
            try:
                await self._hub.command(r.node_id, cmd, self._config.command_timeout_s)
            except CkptError as e:
                log.warning(
                    "drop_failed",
                    checkpoint=cv.name,
                    version=cv.version,
                    rank=str(r),
                    error=e.message,
                )

        await asyncio.gather(*(drop_one(r) for r in cv.shards))

    # ------------------------------------------------------------------ restart

    def start_recovery(self) -> None:
        task = asyncio.create_task(self.recover())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def recover(self, wait_s: float = RECOVER_S) -> None:
        """Versions LOADING when ckptd started: a restart interrupted their push. Once their
        agents re-attached (or wait_s passed), each is completed from the stores the agents
        report holding, or its stores are dropped and it is removed."""
        stale = [cv for cv in self._registry.checkpoints() if cv.state == CheckpointState.LOADING]
        if not stale:
            return
        keys = [(cv.name, cv.version) for cv in stale]
        self._inflight.update(keys)  # no delete, no push of the same version meanwhile
        try:
            nodes = {r.node_id for cv in stale for r in cv.shards}
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and not all(map(self._hub.attached, nodes)):
                await asyncio.sleep(0.2)
            for cv in stale:
                await self._recover_one(cv)
        finally:
            self._inflight.difference_update(keys)

    async def _recover_one(self, cv: CheckpointVersion) -> None:
        held = {
            r: self._hub.held.get(r.node_id, {}).get((cv.name, cv.version, r.device))
            for r in cv.shards
        }
        missing = sorted(
            str(r)
            for r, h in held.items()
            if h is None or h.nbytes != cv.shards[r].nbytes or not self._hub.attached(r.node_id)
        )
        direct = any(not t.path for t in cv.tensors)
        if direct or missing:
            why = (
                "a direct push cannot be committed after a ckptd restart"
                if direct
                else f"ranks {missing} do not hold their shard"
            )
            log.warning("push_abandoned", checkpoint=cv.name, version=cv.version, reason=why)
            await self._forget(cv)
            return
        for r, h in held.items():
            assert h is not None
            self._registry.set_shard(
                cv.name,
                cv.version,
                r,
                ShardState.READY,
                segment=h.segment,
                p2p=(h.p2p.session, h.p2p.addr),
            )
        log.info("push_recovered", checkpoint=cv.name, version=cv.version, shards=len(held))

    async def delete(
        self, name: str, version: int, busy: set[tuple[str, int]]
    ) -> list[CheckpointVersion]:
        targets = (
            [self._registry.checkpoint(name, version)] if version else self._registry.versions(name)
        )
        targets = [cv for cv in targets if cv]
        if not targets:
            raise NotFound(f"checkpoint {name}@{version or '*'} not found")
        for cv in targets:
            if (cv.name, cv.version) in busy or (cv.name, cv.version) in self._inflight:
                raise FailedPrecondition(
                    f"checkpoint {cv.name}@{cv.version} is in use by a running push or update"
                )
        for cv in targets:
            mirror = self._registry.checkpoint(mirror_name(cv.name), cv.version)
            for v in [cv] if mirror is None else [cv, mirror]:
                await self._forget(v)
            log.info("checkpoint_deleted", checkpoint=cv.name, version=cv.version)
        return targets


def owner_sums(cv: CheckpointVersion, known: Known) -> dict[RankRef, list[int]]:
    """The trainer's checksums of each owner all of whose tensors came with one, in the
    order of the version's tensor list."""
    owned: dict[RankRef, list[tuple]] = {r: [] for r in cv.shards}
    for t in cv.tensors:
        owned[t.owner].append(entry_key(t.name, t.piece))
    return {
        r: [known[k] for k in keys] for r, keys in owned.items() if all(k in known for k in keys)
    }


def _spans(cv: CheckpointVersion, files: FileIds) -> dict[RankRef, list[Span]]:
    """Each owner's ranges to load: its tensors' bytes in their files, as scanned."""
    by_owner: dict[RankRef, list[Span]] = {}
    for t in cv.tensors:
        scanner, size, dev, ino, ctime = files.get(t.path, ("", 0, 0, 0, 0))
        if scanner != t.owner.node_id:  # inodes mean something on the scanning node only
            dev, ino, ctime = 0, 0, 0
        by_owner.setdefault(t.owner, []).append(
            Span(
                store_offset=t.store_offset,
                nbytes=t.nbytes,
                path=t.path,
                file_offset=t.file_offset,
                file_size=size,
                file_dev=dev,
                file_ino=ino,
                file_ctime_ns=ctime,
            )
        )
    return by_owner
