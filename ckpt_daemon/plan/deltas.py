"""Pure decisions about delta updates (ckpt_common.delta): what each owner diffs, the
payloads it made as a version's tensors, which base a delta update starts from, and
whether it pays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ckpt_common import delta
from ckpt_common.dtypes import nbytes_of
from ckpt_daemon.model import DeltaRef, Instance, InstanceKind, RankRef, TensorInfo
from ckpt_daemon.plan.placement import ALIGN, align_up

DENSE = int(delta.Encoding.DENSE)
PAYS_BELOW = 0.5  # a delta update pays when it moves less than this share of the bytes


@dataclass(frozen=True, slots=True)
class DiffTask:
    """One tensor an owner puts in its delta store: from `base` (None: it goes dense)."""

    target: TensorInfo
    base: TensorInfo | None

    @property
    def itemsize(self) -> int:
        return nbytes_of(self.target.dtype, (1,))


@dataclass(frozen=True, slots=True)
class Payload:
    """What an owner's Diff made of one task (agents/results.py reads it)."""

    encoding: int
    count: int
    offset: int
    nbytes: int
    checksum: int


def _diffable(t: TensorInfo, b: TensorInfo | None) -> bool:
    return (
        b is not None
        and t.piece is None
        and b.piece is None
        and (b.owner, b.dtype, b.shape, b.nbytes) == (t.owner, t.dtype, t.shape, t.nbytes)
        and b.checksum is not None
        and t.checksum is not None
    )


def diff_tasks(
    base: Sequence[TensorInfo], target: Sequence[TensorInfo]
) -> dict[RankRef, list[DiffTask]]:
    """Per owner of the target, every tensor it holds, in the target's order, with the base
    tensor it is diffed against (same name, owner, dtype and shape, both whole and
    checksummed), else None: then it goes dense and the delta store alone feeds an update."""
    by_name = {b.name: b for b in base if b.piece is None}
    out: dict[RankRef, list[DiffTask]] = {}
    for t in target:
        b = by_name.get(t.name)
        out.setdefault(t.owner, []).append(DiffTask(t, b if _diffable(t, b) else None))
    return out


def payload_tensors(
    tasks: Sequence[DiffTask], made: Sequence[Payload], base: int
) -> list[TensorInfo]:
    """The delta store's tensors: each target tensor's payload, with the proof it carries."""
    if len(tasks) != len(made):
        raise ValueError(f"{len(made)} payloads for {len(tasks)} tensors")
    out = []
    for task, p in zip(tasks, made, strict=True):
        t = task.target
        if p.encoding == DENSE and (p.nbytes != t.nbytes or p.checksum != t.checksum):
            raise ValueError(f"tensor {t.name!r}: its dense payload is not its bytes")
        out.append(
            TensorInfo(
                name=t.name, dtype=t.dtype, shape=t.shape, nbytes=p.nbytes, owner=t.owner,
                store_offset=p.offset, checksum=p.checksum,
                delta=None if p.encoding == DENSE else DeltaRef(
                    base_version=base, encoding=p.encoding, count=p.count,
                    base_checksum=task.base.checksum if task.base else None,
                    target_checksum=t.checksum or 0, target_nbytes=t.nbytes,
                ),
            )
        )  # fmt: skip
    return out


def common_base(name: str, instances: Sequence[Instance]) -> tuple[int, str]:
    """(the version every instance serves of checkpoint `name`, or 0, and why not)."""
    if not instances:
        return 0, "the targets are ranks, not instances: what they serve is not known"
    served = set()
    for i in instances:
        if i.checkpoint != name or not i.version:
            return 0, f"instance {i.name} serves no version of {name}"
        if i.overlays or i.pending or not i.ready:
            return 0, f"instance {i.name} may not serve {name}@{i.version} exactly"
        served.add(i.version)
    if len(served) > 1:
        return 0, f"the instances serve different versions {sorted(served)}"
    return served.pop(), ""


def no_delta_engines(instances: Sequence[Instance]) -> str:
    """Why these instances' engines cannot take a delta, or "" (reference receivers and
    other Receiver engines with a base can; vLLM engines do not yet)."""
    vllm = sorted(i.name for i in instances if i.kind == InstanceKind.VLLM)
    return f"vLLM engines take no deltas yet ({', '.join(vllm[:4])})" if vllm else ""


def pays(delta_bytes: int, dense_bytes: int) -> bool:
    return dense_bytes > 0 and delta_bytes < PAYS_BELOW * dense_bytes


@dataclass(frozen=True, slots=True)
class DeltaDecl:
    """One tensor of a delta push as the trainer declares it (BeginPush, delta_base)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # the payload's
    encoding: int
    count: int
    target_checksum: int
    target_nbytes: int


def _decl_problem(d: DeltaDecl, b: TensorInfo | None) -> str:
    if b is None:
        return "the base has no such tensor"
    if (d.dtype, tuple(d.shape)) != (b.dtype, tuple(b.shape)) or d.target_nbytes != b.nbytes:
        return (
            f"the base holds it as {b.dtype}{list(b.shape)}, "
            f"the delta says {d.dtype}{list(d.shape)}"
        )
    size = nbytes_of(d.dtype, (1,))
    n = b.nbytes // size if size else 0
    try:
        want = delta.payload_nbytes(delta.Encoding(d.encoding), d.count, n, size)
    except (ValueError, delta.DeltaError):
        return f"unknown delta encoding {d.encoding}"
    if not 0 <= d.count <= n or (d.encoding == DENSE and d.count != n):
        return f"{d.count} changed elements of {n}"
    if d.nbytes != want:
        return f"a payload of {d.nbytes} bytes, its encoding needs {want}"
    if d.nbytes > b.nbytes:
        return f"a delta of {d.nbytes} bytes is larger than the tensor ({b.nbytes})"
    return ""


def delta_placement(
    base: Sequence[TensorInfo], decls: Sequence[DeltaDecl], base_version: int
) -> tuple[list[TensorInfo], dict[RankRef, int]]:
    """Where a delta push's payloads go: each with its base tensor's owner, packed in the
    declarations' order (every tensor of the base once, none other). ValueError says what
    is wrong with a declaration."""
    if any(b.piece is not None for b in base):
        raise ValueError("the base was pushed in pieces: it takes no delta push")
    by_name = {b.name: b for b in base}
    seen: set[str] = set()
    out: list[TensorInfo] = []
    used: dict[RankRef, int] = {}
    for d in decls:
        if d.name in seen:
            raise ValueError(f"tensor {d.name!r} is declared twice")
        seen.add(d.name)
        b = by_name.get(d.name)
        why = _decl_problem(d, b)
        if why or b is None:
            raise ValueError(f"tensor {d.name!r}: {why}")
        at = used.get(b.owner, 0)
        used[b.owner] = at + align_up(d.nbytes)
        out.append(
            TensorInfo(
                name=d.name, dtype=d.dtype, shape=tuple(d.shape), nbytes=d.nbytes,
                owner=b.owner, store_offset=at,
                delta=None if d.encoding == DENSE else DeltaRef(
                    base_version=base_version, encoding=d.encoding, count=d.count,
                    base_checksum=b.checksum, target_checksum=d.target_checksum,
                    target_nbytes=d.target_nbytes,
                ),
            )
        )  # fmt: skip
    missing = sorted(set(by_name) - seen)
    if missing:
        raise ValueError(
            f"the delta leaves out {len(missing)} tensors of the base, e.g. {missing[0]!r}"
        )
    return out, {r: max(n, ALIGN) for r, n in used.items()}
