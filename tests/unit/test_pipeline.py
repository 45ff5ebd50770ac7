"""Pure pieces of the pipeline: copy-range coalescing."""

from __future__ import annotations

from ckpt.v1.agent_pb2 import BucketEntry as E
from ckpt_agent.bucket_copies import coalesce


def test_coalesce_merges_ranges_laid_out_alike() -> None:
    es = [
        E(bucket_offset=0, store_offset=1000, nbytes=100, rows=1),
        E(bucket_offset=256, store_offset=1256, nbytes=10, rows=1),  # same displacement: merged
        E(bucket_offset=512, store_offset=5000, nbytes=8, rows=0),  # elsewhere in the store
        E(bucket_offset=768, store_offset=0, nbytes=0, rows=1),  # empty: skipped
    ]
    assert coalesce(es) == [(0, 1000, 266, 1, 0, 0), (512, 5000, 8, 1, 0, 0)]


def test_coalesce_keeps_far_apart_entries_separate() -> None:
    es = [
        E(bucket_offset=0, store_offset=0, nbytes=8, rows=1),
        E(bucket_offset=1 << 20, store_offset=1 << 20, nbytes=8, rows=1),
    ]
    assert coalesce(es) == [(0, 0, 8, 1, 0, 0), (1 << 20, 1 << 20, 8, 1, 0, 0)]


def test_strided_reads_stay_whole_and_copy_exact_rows() -> None:
    import torch

    from ckpt_agent.backends.base import copy_into

    es = [
        E(bucket_offset=0, store_offset=0, nbytes=8, rows=1),
        E(bucket_offset=8, store_offset=8, nbytes=12, rows=3, stride=10),  # 3 rows of 4
        E(bucket_offset=20, store_offset=40, nbytes=4, rows=1),
    ]
    copies = coalesce(es)
    assert copies == [(0, 0, 8, 1, 0, 0), (8, 8, 4, 3, 10, 0), (20, 40, 4, 1, 0, 0)]
    src = torch.arange(64, dtype=torch.uint8)
    dst = torch.zeros(24, dtype=torch.uint8)
    for c in copies:
        copy_into(dst, src, c)
    want = list(range(8)) + [8, 9, 10, 11, 18, 19, 20, 21, 28, 29, 30, 31] + [40, 41, 42, 43]
    assert dst.tolist() == want
