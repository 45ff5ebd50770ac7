"""A push's pure decisions: its request checked, the ranks that hold it, the new version
(and its mirror) from a placement, whether the stores fit the hosts' memory, each owner's
ranges to load, the trainer's checksums per owner. No I/O."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from ckpt_common.errors import FailedPrecondition, InvalidArgument
from ckpt_common.pieces import entry_key
from ckpt_daemon import admission
from ckpt_daemon.agents.commands import Span
from ckpt_daemon.engines import probes
from ckpt_daemon.model import (
    AgentInfo,
    CheckpointState,
    CheckpointVersion,
    Probe,
    RankRef,
    Shard,
    SourceFile,
)
from ckpt_daemon.plan.placement import Placement, PlanError, mirror_map, mirror_name, mirrored
from ckpt_daemon.push.direct import Known

# path -> (scanning node, size, dev, inode, ctime_ns)
FileIds = dict[str, tuple[str, int, int, int, int]]


def validate_name(name: str) -> None:
    admission.check_name("checkpoint name", name)


def check_request(
    name: str,
    version: int,
    sources: Sequence[SourceFile],
    ranks: Sequence[int],
    *,
    timeout_s: float,
    replicas: int,
    probe: Probe | None,
) -> None:
    """INVALID_ARGUMENT (precise) for a push request that cannot be taken."""
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


def holders(order: Sequence[RankRef], ranks: Sequence[int]) -> list[RankRef]:
    """The ranks that hold the push: those asked for (global rank numbers), else all."""
    if not order:
        raise FailedPrecondition("no agents attached")
    if not ranks:
        return list(order)
    bad = [r for r in ranks if r < 0 or r >= len(order)]
    if bad:
        raise InvalidArgument(f"ranks {bad} out of range 0-{len(order) - 1}")
    return [order[r] for r in sorted(set(ranks))]


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


def mirror_version(cv: CheckpointVersion, holders: Sequence[RankRef]) -> CheckpointVersion:
    """The hidden version that keeps a second copy of each of cv's stores on another node
    (replicas=2), LOADING."""
    try:
        mapping = mirror_map(holders)
    except PlanError as e:
        raise InvalidArgument(str(e)) from None
    return CheckpointVersion(
        name=mirror_name(cv.name),
        version=cv.version,
        state=CheckpointState.LOADING,
        tensors=mirrored(cv.tensors, mapping),
        shards={
            mapping[r]: Shard(owner=mapping[r], nbytes=sh.nbytes, tensor_count=sh.tensor_count)
            for r, sh in cv.shards.items()
        },
        created=cv.created,
    )


def admit(
    versions: Iterable[CheckpointVersion],
    agents: Iterable[AgentInfo],
    recorded: Iterable[CheckpointVersion],
) -> None:
    """RESOURCE_EXHAUSTED when the stores do not fit the host memory their nodes report,
    less what versions still loading (among those recorded) will take."""
    need: dict[str, int] = {}
    for v in versions:
        for r, sh in v.shards.items():
            need[r.node_id] = need.get(r.node_id, 0) + sh.nbytes
    free: dict[str, int] = {}
    for a in agents:
        cpu = sum(d.free_bytes for d in a.devices if d.kind == "cpu")
        if a.host_free_bytes or cpu:
            free[a.node_id] = a.host_free_bytes or cpu
    reserved: dict[str, int] = {}
    for cv in recorded:
        if cv.state == CheckpointState.LOADING:
            for r, sh in cv.shards.items():
                reserved[r.node_id] = reserved.get(r.node_id, 0) + sh.nbytes
    known = {n: b for n, b in need.items() if n in free}  # nodes that report no memory
    admission.require_admitted(known, free, reserved)


def owner_sums(cv: CheckpointVersion, known: Known) -> dict[RankRef, list[int]]:
    """The trainer's checksums of each owner all of whose tensors came with one, in the
    order of the version's tensor list."""
    owned: dict[RankRef, list[tuple]] = {r: [] for r in cv.shards}
    for t in cv.tensors:
        owned[t.owner].append(entry_key(t.name, t.piece))
    return {
        r: [known[k] for k in keys] for r, keys in owned.items() if all(k in known for k in keys)
    }


def spans(cv: CheckpointVersion, files: FileIds) -> dict[RankRef, list[Span]]:
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
