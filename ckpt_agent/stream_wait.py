"""A streamed update's wait for the trainer's bytes: an owner copies a bucket only once the
progress mark in its store's segment (ckpt_common.progress) has passed the bucket's last
byte, and gives up when the mark stops moving or the update is aborted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from multiprocessing import shared_memory

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.group_abort import abort_reason
from ckpt_common import progress

POLL_S = 0.0005  # how often a streamed update looks at the trainer's progress mark


def bucket_end(entries: Iterable[apb.BucketEntry]) -> int:
    """The store offset just past the last byte a bucket reads."""
    end = 0
    for e in entries:
        rows = max(1, e.rows)
        span = e.nbytes if rows == 1 else (rows - 1) * e.stride + e.nbytes // rows
        end = max(end, e.store_offset + span)
    return end


def await_written(
    mem: shared_memory.SharedMemory,
    need: int,
    abort: threading.Event,
    stall_s: float,
    job_end: float,
) -> str:
    """Waits until the trainer's progress mark in a store's segment (ckpt_common.progress)
    reaches `need` bytes: "" once it has, else why not (aborted, the mark stopped moving for
    stall_s, or the job's end came)."""
    last, moved = progress.read(mem.buf), time.monotonic()
    while last < need:
        if abort.is_set():
            return abort_reason(abort)
        now = time.monotonic()
        if now - moved > stall_s:
            return (
                f"the push stopped writing: {last} of the {need} bytes this update needs "
                f"had landed, none more for {stall_s:.1f}s"
            )
        if now > job_end:
            return f"the push had written {last} of the {need} bytes by the job's deadline"
        time.sleep(POLL_S)
        mark = progress.read(mem.buf)
        if mark != last:
            last, moved = mark, time.monotonic()
    return ""
