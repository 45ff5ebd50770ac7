"""Every rank of a group has begun (its engine validated the update) before the first
collective: the wait is on the group's store, polled, so an abort ends it at once and no
rank is left in a gloo/NCCL operation it must abandon (an abandoned operation keeps its
group, and the group's listening sockets, until the operation's own timeout)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.group_abort import PEER_FAILED, abort_origin, abort_reason

if TYPE_CHECKING:
    import torch.distributed as dist

BEGUN_KEY = "begun"
POLL_S = 0.1  # the longest pause between two looks (the first ones are shorter)


def all_begun(
    store: dist.Store, world: int, abort: threading.Event, timeout_s: float
) -> tuple[str, apb.FailureOrigin]:
    """Counts this rank in and waits for the others: ("", ORIGIN_UNSPECIFIED) once all are
    in; else why not and where that began (apb.FailureOrigin: the abort's, the deadline's
    here, a gone store's with its host rank)."""
    deadline = time.monotonic() + timeout_s
    pause, n = 0.005, 0
    try:
        n = int(store.add(BEGUN_KEY, 1))
        while n < world:
            if abort.is_set():
                break
            if time.monotonic() > deadline:
                why = f"{world - n} of {world} ranks did not begin within {timeout_s:.0f}s"
                return why, apb.ORIGIN_SELF
            time.sleep(pause)
            pause = min(POLL_S, pause * 1.5)
            n = int(store.add(BEGUN_KEY, 0))
    except Exception as e:  # the store's host rank ended: it failed (and says why itself)
        if not abort.is_set():
            why = f"{PEER_FAILED}: the group's store is gone (its host rank ended): {e}"
            return why, apb.ORIGIN_PEER
    if abort.is_set():
        return abort_reason(abort), abort_origin(abort)
    return "", apb.ORIGIN_UNSPECIFIED
