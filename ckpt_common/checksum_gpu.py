"""The checksum's two wide reductions in one pass over the bytes, on a CUDA GPU (Triton).

Same arithmetic as ckpt_common.checksum (int64 words in rows of ROW, sums modulo 2^64): the
three sums over whole rows are linear in the words, so each program sums a run of rows of
one tensor and adds its share into that tensor's sums with atomics. One launch covers every
tensor of a bucket (a program finds its tensor in a small table by binary search): a bucket
costs one launch and one small copy whatever its tensor count. Imported only where Triton
and a GPU are there.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK_R = 16  # rows per step of a program


@triton.jit
def _sums(tensors, out, ROWS: tl.constexpr, BLOCK: tl.constexpr, ROW: tl.constexpr,
          LOG: tl.constexpr):  # fmt: skip
    """One program: ROWS rows of one tensor. tensors: (address, rows, first program) per
    tensor, then a sentinel whose first program is the total; the program finds its tensor
    by binary search and adds its share of the tensor's three sums (all linear in the words)
    into out[tensor, 0:3] with atomics: every tensor of a bucket in one launch."""
    pid = tl.program_id(0).to(tl.int64)
    hi = tl.load(tensors - 1)  # the tensor count sits just before the table
    lo = hi * 0
    for _ in tl.static_range(LOG):  # first[lo] <= pid < first[hi]
        mid = (lo + hi) // 2
        go = tl.load(tensors + mid * 3 + 2) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    addr = tl.load(tensors + lo * 3)
    rows = tl.load(tensors + lo * 3 + 1)
    start = (pid - tl.load(tensors + lo * 3 + 2)) * ROWS
    end = tl.minimum(start + ROWS, rows)
    x = addr.to(tl.pointer_type(tl.int64))
    cols = tl.arange(0, ROW)
    acc_c = tl.zeros([BLOCK, ROW], dtype=tl.int64)
    acc_r = tl.zeros([BLOCK, ROW], dtype=tl.int64)
    for r0 in range(start, end, BLOCK):
        r = r0 + tl.arange(0, BLOCK)
        keep = r < end
        w = tl.load(x + r[:, None].to(tl.int64) * ROW + cols[None, :], mask=keep[:, None], other=0)
        acc_c += w
        acc_r += w * (r.to(tl.int64) + 1)[:, None]
    c = tl.sum(acc_c, axis=0)
    tl.atomic_add(out + lo * 4, tl.sum(c, axis=0), sem="relaxed")
    tl.atomic_add(out + lo * 4 + 1, tl.sum(tl.sum(acc_r, axis=1), axis=0), sem="relaxed")
    tl.atomic_add(out + lo * 4 + 2, tl.sum(c * (cols.to(tl.int64) + 1), axis=0), sem="relaxed")


ROWS_PER_PROGRAM = 256  # 256 KiB of one tensor per program: thousands per bucket


def _table(ts: list[Any], row: int) -> tuple[list[int], int, list[int]]:
    """[tensor count, then (address, rows, first program) per tensor with whole rows, then a
    sentinel (0, 0, program count)], the program count, and which tensors are in it."""
    table: list[int] = [0]
    which: list[int] = []
    first = 0
    for i, t in enumerate(ts):
        rows = t.numel() // (8 * row)
        if rows:
            table += [t.data_ptr(), rows, first]
            which.append(i)
            first += -(-rows // ROWS_PER_PROGRAM)
    table[0] = len(which)
    table += [0, 0, first]
    return table, first, which


def batch_parts(ts: list[Any], row: int, weights: Any) -> Any:
    """The four sums of each 1-D uint8 CUDA tensor (8-byte aligned) as an int64 [n, 4]
    tensor: one kernel launch for all of them, no read-back. weights: 1, 2, 3, ... on the
    device, at least 8 * row long (a tail is shorter than a row)."""
    dev = ts[0].device
    n = len(ts)
    table, programs, which = _table(ts, row)
    out = torch.zeros((n, 4), dtype=torch.int64, device=dev)
    if programs:
        meta = torch.tensor(table, dtype=torch.int64).pin_memory().to(dev, non_blocking=True)
        sums = out if len(which) == n else torch.zeros_like(out[: len(which)])
        _sums[(programs,)](
            meta[1:], sums, ROWS=ROWS_PER_PROGRAM, BLOCK=BLOCK_R, ROW=row,
            LOG=max(1, len(which).bit_length()), num_warps=4,
        )  # fmt: skip
        if sums is not out:
            index = torch.tensor(which, dtype=torch.int64).pin_memory().to(dev, non_blocking=True)
            out.index_copy_(0, index, sums)
    for i, t in enumerate(ts):
        body = t.numel() // (8 * row) * 8 * row
        if body < t.numel():  # bytes after the last whole row: few, and few tensors have them
            tail = t[body:].to(torch.int64)
            out[i, 3] = (tail * weights[: tail.numel()]).sum()
    return out
