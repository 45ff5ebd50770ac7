"""Pieces of tensors (ckpt_common.pieces): tiling checks, the daemon's whole-version check,
and the engine-side assembly (vllm_ext.assembly.Assembly)."""

from __future__ import annotations

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import InvalidArgument
from ckpt_common.pieces import Piece, check_tiling, region
from ckpt_daemon.push.direct import check_whole, part_specs
from vllm_ext.assembly import Assembly, pieces_problem


def rows(n: int, k: int, cols: int = 4) -> list[Piece]:
    """n rows cut into k row blocks (the last may be shorter or empty), FSDP-style."""
    step = -(-n // k)
    return [Piece((i * step, 0), (max(0, min(step, n - i * step)), cols)) for i in range(k)]


def test_tiling_accepts_exact_covers() -> None:
    check_tiling((10, 4), rows(10, 3))
    check_tiling((10, 4), rows(10, 4))  # uneven; no empty piece
    check_tiling((3, 4), rows(3, 4))  # an empty last piece
    grid = [Piece((r, c), (2, 2)) for r in (0, 2) for c in (0, 2)]
    check_tiling((4, 4), grid)  # 2-D mesh (pairwise check)
    check_tiling((), [Piece((), ())])


@pytest.mark.parametrize(
    ("pieces", "why"),
    [
        ([Piece((0, 0), (5, 4))], "fewer"),
        ([Piece((0, 0), (6, 4)), Piece((5, 0), (6, 4))], "outside"),
        ([Piece((0, 0), (6, 4)), Piece((4, 0), (6, 4))], "more"),
        ([Piece((0, 0), (6, 4)), Piece((4, 0), (4, 4))], "overlap"),
        ([Piece((0, 0), (5, 4)), Piece((0, 0), (5, 4))], "overlap"),
        ([Piece((0, 0), (5, 4)), Piece((0, 2), (10, 2))], "overlap"),
        ([Piece((0,), (10,))], "dimensions"),
        ([Piece((-1, 0), (10, 4))], "outside"),
    ],
)
def test_tiling_refuses(pieces: list[Piece], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_tiling((10, 4), pieces)


def test_whole_version_check() -> None:
    a = part_specs("n1", [("w", "F32", (4, 2), 16, Piece((0, 0), (2, 2)))])
    b = part_specs("n2", [("w", "F32", (4, 2), 16, Piece((2, 0), (2, 2)))])
    check_whole(a + b)
    whole = part_specs("n1", [("v", "F32", (3,), 12, Piece((0,), (3,)))])
    assert whole[0].piece is None  # a piece that is the whole tensor is the tensor
    with pytest.raises(InvalidArgument, match="fewer"):
        check_whole(a)
    with pytest.raises(InvalidArgument, match="disagree"):
        check_whole(a + part_specs("n2", [("w", "BF16", (4, 2), 8, Piece((2, 0), (2, 2)))]))
    with pytest.raises(InvalidArgument, match="whole and in pieces"):
        check_whole(a + part_specs("n2", [("w", "F32", (4, 2), 32, None)]))
    with pytest.raises(InvalidArgument, match="not 12"):
        part_specs("n1", [("w", "F32", (4, 2), 12, Piece((0, 0), (2, 2)))])
    with pytest.raises(InvalidArgument, match="outside"):
        part_specs("n1", [("w", "F32", (4, 2), 16, Piece((3, 0), (2, 2)))])


def meta(name: str, full: torch.Tensor, p: Piece | None) -> tpb.TensorMeta:
    box = full if p is None else full[region(p)]
    m = tpb.TensorMeta(name=name, dtype="F32", shape=list(full.shape), nbytes=box.numel() * 4)
    if p is not None:
        m.piece_offset.extend(p.offset)
        m.piece_shape.extend(p.shape)
    return m


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_assembly_hands_over_each_tensor_once_complete() -> None:
    w = torch.randn(7, 3)
    g = torch.randn(4, 4)
    cuts = rows(7, 3, 3)
    grid = [Piece((r, c), (2, 2)) for r in (0, 2) for c in (0, 2)]
    metas = [meta("w", w, p) for p in cuts] + [meta("g", g, p) for p in grid]
    metas.append(meta("b", w[0], None))
    assert pieces_problem(metas) is None
    asm = Assembly(metas)
    got: dict[str, torch.Tensor] = {}
    order = [(m, p, w) for m, p in zip(metas[:3], cuts, strict=True)]
    order += [(m, p, g) for m, p in zip(metas[3:7], grid, strict=True)]
    for m, p, full in reversed(order):  # any arrival order
        for m2, data, copy in asm.add(m, raw(full[region(p)]), True):
            assert not copy and m2.name not in got
            got[m2.name] = data.view(torch.float32).reshape(tuple(m2.shape))
    assert asm.waiting == 0
    assert torch.equal(got["w"], w) and torch.equal(got["g"], g)
    assert asm.add(metas[-1], raw(w[0]), True)[0][2] is True  # a whole tensor passes through


def test_receiver_refuses_pieces_that_do_not_tile() -> None:
    w = torch.randn(6, 2)
    half = [Piece((0, 0), (3, 2)), Piece((3, 0), (3, 2))]
    assert "fewer" in (pieces_problem([meta("w", w, half[0])]) or "")
    assert "whole and in pieces" in (
        pieces_problem([meta("w", w, half[0]), meta("w", w, None)]) or ""
    )
