"""Pieces: part of a checkpoint tensor held apart from the rest.

A sharded trainer holds each tensor as boxes (a DTensor's local shard: an offset and a shape
per dimension) on different ranks and nodes. A piece is such a box of a tensor whose full
shape is known; its bytes are the box, contiguous, in row-major order. A tensor pushed whole
has no piece (None). The pieces of one tensor must tile it: inside it, disjoint, and
together covering every element (`check_tiling`). Engines assemble the pieces of a tensor
before loading it (`region` gives the box's index in the full tensor).

Pure: no torch, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from ckpt_common.dtypes import nbytes_of


@dataclass(frozen=True, slots=True)
class Piece:
    offset: tuple[int, ...]  # first index of the box in each dimension
    shape: tuple[int, ...]  # the box's extent in each dimension

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def nbytes(self, dtype: str) -> int:
        return nbytes_of(dtype, self.shape)

    def is_whole(self, shape: Sequence[int]) -> bool:
        return all(o == 0 for o in self.offset) and tuple(self.shape) == tuple(shape)


def piece_of(offset: Sequence[int], shape: Sequence[int]) -> Piece | None:
    """The wire form (two lists, both empty for a whole tensor) as a Piece or None."""
    if not offset and not shape:
        return None
    return Piece(tuple(int(o) for o in offset), tuple(int(s) for s in shape))


def check_piece(full: Sequence[int], p: Piece) -> None:
    """The box lies inside a tensor of shape `full` (ValueError says why not)."""
    if len(p.offset) != len(full) or len(p.shape) != len(full):
        raise ValueError(
            f"piece {list(p.offset)}+{list(p.shape)} has not the tensor's {len(full)} dimensions"
        )
    for o, s, f in zip(p.offset, p.shape, full, strict=True):
        if o < 0 or s < 0 or o + s > f:
            raise ValueError(f"piece {list(p.offset)}+{list(p.shape)} lies outside {list(full)}")


def _overlap(a: Piece, b: Piece) -> bool:
    return all(
        ao < bo + bs and bo < ao + as_
        for ao, as_, bo, bs in zip(a.offset, a.shape, b.offset, b.shape, strict=True)
    )


def check_tiling(full: Sequence[int], pieces: Sequence[Piece]) -> None:
    """The pieces cover a tensor of shape `full` exactly once (ValueError says how not).
    Disjoint boxes whose volumes sum to the tensor's cover it. Pieces that differ in one
    dimension only (the usual sharding) are checked in O(n log n); others pairwise."""
    total = 1
    for f in full:
        total *= f
    for p in pieces:
        check_piece(full, p)
    boxes = [p for p in pieces if p.numel()]
    covered = sum(p.numel() for p in boxes)
    if covered != total:
        what = "more" if covered > total else "fewer"
        raise ValueError(f"pieces hold {covered} elements, {what} than the {total} of {list(full)}")
    varying = [d for d in range(len(full)) if len({(p.offset[d], p.shape[d]) for p in boxes}) > 1]
    if len(varying) <= 1:
        d = varying[0] if varying else 0
        ordered = sorted(boxes, key=lambda p: p.offset[d] if full else 0)
        for a, b in pairwise(ordered):
            if a.offset[d] + a.shape[d] > b.offset[d]:
                raise ValueError(f"pieces {list(a.offset)} and {list(b.offset)} overlap")
        return
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            if _overlap(a, b):
                raise ValueError(f"pieces {list(a.offset)} and {list(b.offset)} overlap")


def entry_key(name: str, piece: Piece | None) -> tuple[str, tuple[int, ...] | None]:
    """What names one entry of a version: the tensor, and its piece's offset."""
    return name, None if piece is None else piece.offset


def tiling_problem(
    entries: Iterable[tuple[str, str, Sequence[int], Piece | None]],
) -> tuple[str, str] | None:
    """(tensor, why) for the first tensor whose pieces do not make it whole, or None.
    entries: (name, dtype, whole shape, piece or None). A tensor with any piece must come
    only in pieces, agreeing on dtype and shape, that tile it (check_tiling)."""
    groups: dict[str, list[tuple[str, tuple[int, ...], Piece | None]]] = {}
    for name, dtype, shape, piece in entries:
        groups.setdefault(name, []).append((dtype, tuple(shape), piece))
    for name, group in groups.items():
        if all(p is None for _, _, p in group):
            continue
        if len({(d, s) for d, s, _ in group}) > 1:
            return name, "its pieces disagree on its dtype or shape"
        if any(p is None for _, _, p in group):
            return name, "it comes whole and in pieces"
        try:
            check_tiling(group[0][1], [p for _, _, p in group if p is not None])
        except ValueError as e:
            return name, str(e)
    return None


def region(p: Piece) -> tuple[slice, ...]:
    """The box as an index into the full tensor (full[region(p)] is the piece)."""
    return tuple(slice(o, o + s) for o, s in zip(p.offset, p.shape, strict=True))
