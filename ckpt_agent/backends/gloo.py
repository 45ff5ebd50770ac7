"""The gloo collective (CPU backends): a deadline on every operation and an abort that ends
a wait at once."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from ckpt_agent.backends.base import RENDEZVOUS_S, Collective, Done

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from ckpt_agent.group_abort import Abort

WAIT_SLICE_S = 0.05  # a collective's wait is polled this often (abort, deadline)


class CollectiveAborted(Exception):
    """A collective was given up because the update was aborted (the reason says why)."""


class GlooCollective(Collective):
    """gloo, with a deadline on every operation and an abort that ends a wait at once.

    An operation runs on gloo's threads; the caller polls it (`WAIT_SLICE_S`), so it can
    give up when `abort` is set or the step's deadline passes. A group whose operation was
    given up is never waited on again: it is released on a daemon thread (gloo joins its
    threads, which end when the operation's own timeout fires) once that operation is over:
    destroying a group joins gloo's threads while holding the GIL."""

    def __init__(
        self, store: dist.Store, rank: int, world: int, timeout_s: float, host: str = ""
    ) -> None:
        import torch.distributed as dist

        self._dist = dist
        # the rendezvous (every rank connecting) is bounded by RENDEZVOUS_S, not the job
        setup = timedelta(seconds=max(1.0, min(timeout_s, RENDEZVOUS_S)))
        self._pg: dist.ProcessGroupGloo | None
        if host:  # gloo listens on the agent's --host only, not on every interface
            opts = dist.ProcessGroupGloo._Options()  # pyright: ignore[reportAttributeAccessIssue]
            opts._timeout = setup
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self._pg = dist.ProcessGroupGloo(store, rank, world, opts)
        else:
            self._pg = dist.ProcessGroupGloo(store, rank, world, setup)
        self.op_s = max(1.0, timeout_s)  # the next operation's deadline (set per step)
        self.abort: Abort | None = None  # ends any wait
        self._abandoned: dist.Work | None = None  # the operation given up on

    def bind(self, abort: Abort, op_s: float) -> None:
        self.abort, self.op_s = abort, max(0.1, op_s)

    def _group(self) -> dist.ProcessGroupGloo:
        if self._pg is None:
            raise RuntimeError("the gloo group is closed")
        return self._pg

    def _wait(self, work: dist.Work, what: str) -> None:
        deadline = time.monotonic() + self.op_s
        while True:
            try:
                work.wait(timedelta(seconds=WAIT_SLICE_S))
                return
            except RuntimeError as e:
                if "timed out" not in str(e).lower() or "operation" not in str(e).lower():
                    raise  # gloo's own error: a peer closed its connection, or its timeout
            if self.abort is not None and self.abort.is_set():
                self._abandoned = work
                raise CollectiveAborted(self.abort.reason or "aborted")
            if time.monotonic() > deadline:
                self._abandoned = work
                raise TimeoutError(f"{what} did not complete within {self.op_s:.1f}s")

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        opts = self._dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        opts.timeout = timedelta(seconds=self.op_s)
        # the stubs omit ProcessGroupGloo's collectives (they are on its C++ base)
        work = self._group().broadcast([tensor], opts)  # pyright: ignore[reportAttributeAccessIssue]
        self._wait(work, f"broadcast from group rank {root}")

    def agree(self, flag: int) -> int:
        import torch

        x = torch.tensor([flag], dtype=torch.int64)
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.MAX  # pyright: ignore[reportAttributeAccessIssue]
        opts.timeout = timedelta(seconds=self.op_s)
        work = self._group().allreduce([x], opts)  # pyright: ignore[reportAttributeAccessIssue]
        self._wait(work, "agreement of all ranks")
        return int(x.item())

    def step(
        self,
        flag: int,
        tensor: torch.Tensor,
        root: int,
        *,
        after: torch.cuda.Event | None = None,
        side_copy: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Done:
        worst = self.agree(flag)
        if worst == 0:
            self.broadcast(tensor, root)
            if side_copy is not None:
                side_copy[0].copy_(side_copy[1])
        return Done(worst)

    def close(self) -> None:
        pg, self._pg = self._pg, None
        work, self._abandoned = self._abandoned, None
        if pg is not None and work is not None:
            held = _Held(pg, work)
            del pg, work
            threading.Thread(
                target=_release, args=(held,), name="gloo-release", daemon=True
            ).start()


@dataclass
class _Held:
    """A group given up on and its operation still running."""

    pg: dist.ProcessGroupGloo | None
    work: dist.Work | None


def _release(held: _Held) -> None:
    """Drops the group and its operation once the operation is over (its own timeout at
    the latest): only then is destroying the group quick."""
    while held.work is not None and not held.work.is_completed():
        time.sleep(0.5)
    held.pg = held.work = None
