"""The checksum's two wide reductions in one pass over the bytes, on a CUDA GPU (Triton).

Same arithmetic as ckpt_common.checksum (int64 words in rows of ROW, sums modulo 2^64): each
program sums a run of rows into ROW column sums and one row-weighted sum; torch then adds
the programs' partial results. Imported only where Triton and a GPU are there.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK_R = 16  # rows per step of a program
PROGRAMS = 1024  # at most, per tensor


@triton.jit
def _partials(x, rows, rows_per_prog, cols_out, rows_out, BLOCK: tl.constexpr, ROW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, ROW)
    acc_c = tl.zeros([ROW], dtype=tl.int64)
    acc_r = tl.zeros([BLOCK], dtype=tl.int64)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, rows)
    for r0 in range(start, end, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        keep = r < end
        w = tl.load(x + r[:, None].to(tl.int64) * ROW + cols[None, :], mask=keep[:, None], other=0)
        acc_c += tl.sum(w, axis=0)
        acc_r += tl.sum(w, axis=1) * (r.to(tl.int64) + 1)
    tl.store(cols_out + pid * ROW + cols, acc_c)
    tl.store(rows_out + pid, tl.sum(acc_r, axis=0))


def _split_programs(rows: int) -> tuple[int, int]:
    """(programs, rows per program) for a tensor of `rows` rows."""
    nprog = min(PROGRAMS, triton.cdiv(rows, BLOCK_R))
    per = triton.cdiv(triton.cdiv(rows, nprog), BLOCK_R) * BLOCK_R
    return triton.cdiv(rows, per), per


def batch_parts(ts: list[Any], row: int, weights: Any) -> Any:
    """The four sums of each 1-D uint8 CUDA tensor (8-byte aligned) as an int64 [n, 4]
    tensor: one kernel launch per tensor into shared partial buffers, then one reduction
    for all of them (the Python cost per tensor is what bounds small tensors). weights:
    1, 2, 3, ... on the device, at least 8 * row long (a tail is shorter than a row)."""
    dev = ts[0].device
    launches, seg = [], []
    for i, t in enumerate(ts):
        rows = t.numel() // (8 * row)
        if rows:
            nprog, per = _split_programs(rows)
            launches.append((t[: rows * 8 * row].view(torch.int64), rows, per, nprog, len(seg)))
            seg += [i] * nprog
    n = len(ts)
    cols_out = torch.empty((max(1, len(seg)), row), dtype=torch.int64, device=dev)
    rows_out = torch.empty((max(1, len(seg)),), dtype=torch.int64, device=dev)
    for w, rows, per, nprog, first in launches:
        _partials[(nprog,)](
            w, rows, per, cols_out[first:], rows_out[first:], BLOCK=BLOCK_R, ROW=row, num_warps=4
        )
    c = torch.zeros((n, row), dtype=torch.int64, device=dev)
    s2 = torch.zeros((n,), dtype=torch.int64, device=dev)
    if seg:
        index = torch.tensor(seg, dtype=torch.int64).to(dev, non_blocking=True)
        c.index_add_(0, index, cols_out[: len(seg)])
        s2.index_add_(0, index, rows_out[: len(seg)])
    s4 = torch.zeros((n,), dtype=torch.int64, device=dev)
    for i, t in enumerate(ts):
        body = t.numel() // (8 * row) * 8 * row
        if body < t.numel():  # bytes after the last whole row: few, and few tensors have them
            tail = t[body:].to(torch.int64)
            s4[i] = (tail * weights[: tail.numel()]).sum()
    return torch.stack([c.sum(dim=1), s2, (c * weights[:row]).sum(dim=1), s4], dim=1)
