"""What a bucket's H2D copies (pipeline.py): its entries coalesced into runs, and which
entries' layers continue in a later bucket."""

from __future__ import annotations

from collections.abc import Iterable

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.backends.base import Copy
from ckpt_common.layers import layer_key

MERGE_GAP = 4096  # entries this close, laid out alike, are copied as one range


def copy_flags(plan: apb.UpdatePlan) -> list[list[bool]]:
    """Per bucket entry: does the tensor's layer continue in a later bucket?"""
    last: dict[str, int] = {}
    for k, b in enumerate(plan.buckets):
        for e in b.entries:
            last[layer_key(plan.tensors[e.tensor].name)] = k
    return [
        [last[layer_key(plan.tensors[e.tensor].name)] > k for e in b.entries]
        for k, b in enumerate(plan.buckets)
    ]


def coalesce(entries: Iterable[apb.BucketEntry]) -> list[Copy]:
    """The bucket's copies: consecutive entries laid out the same way in the store and the
    bucket become one copy (the padding between them rides along); strided reads (kept
    parts, rows > 1) stay as they are."""
    out: list[Copy] = []
    for e in sorted(entries, key=lambda e: e.bucket_offset):
        if e.nbytes == 0:
            continue
        rows = max(1, e.rows)
        if rows > 1:
            run = e.nbytes // rows
            out.append(Copy(e.bucket_offset, e.store_offset, run, rows, e.stride, e.source))
            continue
        if out and out[-1].rows == 1 and out[-1].source == e.source:
            d, o, n = out[-1][:3]
            gap = e.bucket_offset - (d + n)
            if 0 <= gap < MERGE_GAP and e.store_offset - o == e.bucket_offset - d:
                out[-1] = Copy(d, o, e.bucket_offset + e.nbytes - d, source=e.source)
                continue
        out.append(Copy(e.bucket_offset, e.store_offset, e.nbytes, source=e.source))
    return out
