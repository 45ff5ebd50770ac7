"""Pure placement: where a pushed checkpoint's tensors live. Nothing here does I/O.

``place`` spreads a checkpoint's tensors over the holding ranks by bytes, keeping each
decoder layer's tensors on one rank so update buckets can respect layers; a mirrored
checkpoint (replicas=2) keeps a second copy of each rank's store on another node.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ckpt_common.layers import layer_key
from ckpt_common.pieces import entry_key
from ckpt_daemon.model import RankRef, TensorInfo, TensorSpec

ALIGN = 256  # bytes; keeps every tensor view aligned for any dtype and for CUDA copies


class PlanError(ValueError):
    """The request cannot be planned; the message says why."""


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def rank_order(devices: Iterable[RankRef]) -> list[RankRef]:
    """Global rank order: agents by node id, then device index."""
    return sorted(set(devices))


@dataclass(frozen=True, kw_only=True, slots=True)
class Placement:
    tensors: list[TensorInfo]  # every tensor, with its owner and offset in the owner's store
    store_bytes: dict[RankRef, int]


_Unit = tuple[int, list[int]]  # (bytes, tensor indexes)


def _groups(specs: Sequence[TensorSpec], layers: Sequence[str]) -> list[list[int]]:
    by_key: dict[tuple[str, str], list[int]] = {}
    for i, s in enumerate(specs):
        by_key.setdefault((s.node_id, layers[i]), []).append(i)
    return list(by_key.values())


def _check_unique(specs: Sequence[TensorSpec]) -> None:
    seen: set[tuple[str, tuple[int, ...] | None]] = set()
    for s in specs:
        k = entry_key(s.name, s.piece)
        if k in seen:
            what = "tensor" if s.piece is None else f"piece {list(s.piece.offset)} of"
            raise PlanError(f"{what} {s.name!r} appears more than once")
        seen.add(k)


def place(specs: Sequence[TensorSpec], ranks: Sequence[RankRef]) -> Placement:
    """Largest group first onto the least-loaded eligible rank (a node-pinned source only
    onto that node's ranks). A group larger than a fair share is placed tensor by tensor.
    A tensor's pieces (ckpt_common.pieces) are placed like tensors, each on its own node."""
    if not ranks:
        raise PlanError("no ranks to hold the checkpoint")
    _check_unique(specs)
    ranks = rank_order(ranks)
    nodes = {r.node_id for r in ranks}
    for node in {s.node_id for s in specs}:
        if node and node not in nodes:
            raise PlanError(f"source pinned to node {node!r}, which has no attached ranks")
    layers = [layer_key(s.name) for s in specs]
    owner_of = _owners(specs, layers, ranks)
    return _offsets(specs, layers, owner_of, ranks)


def _units(specs: Sequence[TensorSpec], layers: Sequence[str], nranks: int) -> list[_Unit]:
    """What is placed as one: a layer's tensors on a node, or a tensor of a layer larger
    than a fair share; largest first."""
    sizes = [s.nbytes for s in specs]
    fair = max(1, sum(sizes) // nranks)
    units: list[_Unit] = []
    for g in _groups(specs, layers):
        n = sum(sizes[i] for i in g)
        if n > fair and len(g) > 1:
            units.extend((sizes[i], [i]) for i in g)
        else:
            units.append((n, g))
    units.sort(key=lambda u: (-u[0], specs[u[1][0]].name, u[1][0]))
    return units


def _owners(
    specs: Sequence[TensorSpec], layers: Sequence[str], ranks: list[RankRef]
) -> list[RankRef]:
    """Each tensor's owner: each unit onto the least-loaded rank it may go to. Loads are
    tracked per heap; a shared rank in two heaps is rare (mixed pinned and unpinned
    sources) and only makes the spread less even, never wrong."""
    heaps: dict[str, list[tuple[int, int, RankRef]]] = {}
    owner_of: list[RankRef] = [ranks[0]] * len(specs)
    for n, unit in _units(specs, layers, len(ranks)):
        node = specs[unit[0]].node_id
        if node not in heaps:
            members = [r for r in ranks if not node or r.node_id == node]
            heaps[node] = [(0, i, r) for i, r in enumerate(members)]
        load, k, r = heapq.heappop(heaps[node])
        for i in unit:
            owner_of[i] = r
        heapq.heappush(heaps[node], (load + n, k, r))
    return owner_of


def _offsets(
    specs: Sequence[TensorSpec],
    layers: Sequence[str],
    owner_of: list[RankRef],
    ranks: list[RankRef],
) -> Placement:
    """Offsets: per owner, in source order (layers stay contiguous), aligned."""
    cursor: dict[RankRef, int] = {r: 0 for r in ranks}
    out: list[TensorInfo] = []
    for i in sorted(range(len(specs)), key=lambda i: (layers[i], specs[i].name, i)):
        s, r = specs[i], owner_of[i]
        off = cursor[r]
        cursor[r] = align_up(off + s.nbytes)
        out.append(
            TensorInfo(
                name=s.name,
                dtype=s.dtype,
                shape=s.shape,
                nbytes=s.nbytes,
                owner=r,
                store_offset=off,
                path=s.path,
                file_offset=s.file_offset,
                piece=s.piece,
            )
        )
    return Placement(tensors=out, store_bytes={r: n for r, n in cursor.items() if n})


HIDDEN_PREFIX = "~"  # ckptd's own versions (mirrors, delta stores) start so
MIRROR_PREFIX = "~mirror/"  # user names cannot contain "/": no clash


def mirror_name(name: str) -> str:
    """The hidden checkpoint that holds the mirror shards of `name` (replicas=2)."""
    return MIRROR_PREFIX + name


def mirror_map(holders: Sequence[RankRef]) -> dict[RankRef, RankRef]:
    """Each holder's mirror: a rotation of the rank order by the smallest shift that puts
    every mirror on another node (else by one rank). A rotation is a bijection, so every
    rank mirrors exactly one shard and a mirror store has its primary's layout."""
    ranks = rank_order(holders)
    n = len(ranks)
    if n < 2:
        raise PlanError("a mirrored checkpoint needs at least 2 ranks")
    shift = next(
        (
            k
            for k in range(1, n)
            if all(ranks[i].node_id != ranks[(i + k) % n].node_id for i in range(n))
        ),
        1,
    )
    return {ranks[i]: ranks[(i + shift) % n] for i in range(n)}


def mirrored(tensors: Sequence[TensorInfo], mapping: dict[RankRef, RankRef]) -> list[TensorInfo]:
    return [replace(t, owner=mapping[t.owner]) for t in tensors]
