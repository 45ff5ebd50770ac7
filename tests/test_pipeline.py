"""Pure pieces of the pipeline: copy-range coalescing."""

from __future__ import annotations

from types import SimpleNamespace as E

from ckpt_agent.pipeline import coalesce


def test_coalesce_merges_ranges_laid_out_alike() -> None:
    es = [
        E(bucket_offset=0, store_offset=1000, nbytes=100),
        E(bucket_offset=256, store_offset=1256, nbytes=10),  # same displacement: merged
        E(bucket_offset=512, store_offset=5000, nbytes=8),  # elsewhere in the store
        E(bucket_offset=768, store_offset=0, nbytes=0),  # empty: skipped
    ]
    assert coalesce(es) == [(0, 1000, 266), (512, 5000, 8)]


def test_coalesce_keeps_far_apart_entries_separate() -> None:
    es = [
        E(bucket_offset=0, store_offset=0, nbytes=8),
        E(bucket_offset=1 << 20, store_offset=1 << 20, nbytes=8),
    ]
    assert coalesce(es) == [(0, 0, 8), (1 << 20, 1 << 20, 8)]
