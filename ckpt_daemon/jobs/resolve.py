"""A job's first stage: what it updates. The version (a READY one; a version still being
pushed only for a streamed update; a LOST one only for a P2P read that can reach its
bytes), the target ranks (an instance's, never part of one), the version a join takes."""

from __future__ import annotations

from collections.abc import Callable

from ckpt_common.errors import FailedPrecondition, InvalidArgument, NotFound
from ckpt_daemon.jobs.restore import split_instance
from ckpt_daemon.jobs.sources import p2p_sources
from ckpt_daemon.jobs.streamed import NOT_STREAMED, streamable
from ckpt_daemon.model import CheckpointState, CheckpointVersion, Instance, RankRef, UpdateSpec
from ckpt_daemon.push.direct import DirectPushes
from ckpt_daemon.registry.store import Registry

Live = Callable[[str], bool]  # is a node's agent attached and heard from


def targets(registry: Registry, spec: UpdateSpec) -> tuple[list[RankRef], list[int]]:
    order = registry.rank_order()
    index = {r: i for i, r in enumerate(order)}
    targets: set[RankRef] = set()
    if spec.ranks:
        bad = [r for r in spec.ranks if r < 0 or r >= len(order)]
        if bad:
            raise InvalidArgument(
                f"ranks {bad} out of range: {len(order)} ranks attached"
                + (f" (0-{len(order) - 1})" if order else "")
            )
        targets.update(order[r] for r in spec.ranks)
    for name in spec.instances:
        inst = registry.instance(name)
        if not inst:
            raise NotFound(f"instance {name!r} not found")
        missing = [str(r) for r in inst.ranks if r not in index]
        if missing:
            raise FailedPrecondition(
                f"instance {name!r} sits on devices whose agent is not attached: {missing}"
            )
        targets.update(inst.ranks)
    if not targets:
        raise InvalidArgument("no target: give ranks or instances")
    split = split_instance(registry.instances(), targets)
    if split:
        raise InvalidArgument(
            f"the update covers only some ranks of instance {split!r}: its engine would "
            "serve a mix of versions; give all of its ranks (or the instance)"
        )
    tl = sorted(targets)
    return tl, [index[r] for r in tl]


def version(
    registry: Registry,
    pushes: DirectPushes | None,
    live: Live,
    spec: UpdateSpec,
    patching: Callable[[str, int], bool] | None = None,
) -> CheckpointVersion:
    """patching: whether a version is being made from its delta (push/delta_push.py): an
    update may take it (a delta update reads only the delta store; another waits for it,
    jobs/choose.py)."""
    cv = registry.get_checkpoint(spec.checkpoint, spec.version)
    if cv is None:
        if not registry.versions(spec.checkpoint):
            raise NotFound(f"checkpoint {spec.checkpoint!r} not found")
        raise NotFound(
            f"checkpoint {spec.checkpoint}@{spec.version or 'latest'} not found"
            + ("" if spec.version else " (no READY version)")
        )
    if streamable(pushes, spec, cv):
        if spec.method in ("p2p", "sharded"):
            raise FailedPrecondition(f"{cv.name}@{cv.version}: {NOT_STREAMED}")
        return cv
    if cv.state == CheckpointState.LOADING and patching and patching(cv.name, cv.version):
        if spec.method in ("p2p", "sharded", "broadcast"):
            raise FailedPrecondition(
                f"{cv.name}@{cv.version} is still being made from its delta: only a delta "
                "update (auto or delta) takes it now"
            )
        return cv
    if cv.state != CheckpointState.READY and not (
        spec.method == "p2p"
        and cv.state == CheckpointState.LOST
        and p2p_sources(registry, live, cv) is not None
    ):
        raise FailedPrecondition(
            f"checkpoint {cv.name}@{cv.version} is {cv.state.name}"
            + (f": {cv.reason}" if cv.reason else "")
        )
    return cv


def fleet_version(registry: Registry) -> tuple[str, int]:
    """What most ready instances serve."""
    counts: dict[tuple[str, int], int] = {}
    for inst in registry.instances():
        if inst.ready and inst.checkpoint:
            key = (inst.checkpoint, inst.version)
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        raise FailedPrecondition("no instance serves a checkpoint yet: name one to join at")
    return max(counts, key=lambda k: (counts[k], k[1]))


def check_instance_devices(registry: Registry, inst: Instance) -> None:
    for other in registry.instances():
        shared = set(other.ranks) & set(inst.ranks)
        if other.name != inst.name and shared:
            raise FailedPrecondition(
                f"instance {other.name!r} already uses devices {sorted(map(str, shared))}"
            )
