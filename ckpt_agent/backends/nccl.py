"""The NCCL collective of the CUDA backend: per bucket, an all-reduce of the failure flag and
the broadcast on the comm stream, and the root's own copy on the side stream, ordered by
events; communicators kept across updates while a group's membership is unchanged."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckpt_agent.backends.base import Collective

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

FLAG_RING = 64  # pinned host slots for per-bucket agreement flags (> any pipeline lag)


@dataclass
class Streams:
    copy: torch.cuda.Stream
    comm: torch.cuda.Stream
    side: torch.cuda.Stream


@dataclass
class Step:
    """One bucket's agreement + broadcast, in flight on the GPU."""

    events: list[torch.cuda.Event]
    flag: torch.Tensor  # pinned host int32 slot the agreed flag lands in
    t_start: torch.cuda.Event | None = None  # timing events on the comm stream
    t_end: torch.cuda.Event | None = None

    def done(self) -> bool:
        return all(e.query() for e in self.events)

    def wait(self, deadline: float, abort: threading.Event | None = None) -> int:
        spins = 0
        while not self.done():
            if time.monotonic() > deadline:
                raise TimeoutError("a broadcast did not complete in time (a peer is gone?)")
            if abort is not None and abort.is_set():
                raise TimeoutError("aborted while a broadcast was in flight")
            spins += 1
            time.sleep(0 if spins < 200 else 0.0001)
        return int(self.flag[0])


class NcclCollective(Collective):
    def __init__(
        self,
        pg: dist.ProcessGroupNCCL | None,
        device: torch.device,
        streams: Streams,
        key: str,
        flags: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self._pg = pg
        self._device = device
        self._s = streams
        self.key = key
        # (device, pinned host) flag rings, owned by the backend: an update allocates nothing
        # that outlives it
        self._flags, self._host = flags
        self._n = 0
        self.healthy = True

    def _allreduce_max(self, t: torch.Tensor) -> None:
        if self._pg is None:  # a group of one: its own flag is the agreement
            return
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX  # pyright: ignore[reportAttributeAccessIssue]
        self._pg.allreduce([t], opts).wait()  # pyright: ignore[reportAttributeAccessIssue]

    def _broadcast(self, t: torch.Tensor, root: int) -> None:
        if self._pg is None:  # a group of one: the root's tensor is already everyone's
            return
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        self._pg.broadcast([t], opts).wait()  # pyright: ignore[reportAttributeAccessIssue]

    def agree(self, flag: int) -> int:
        import torch

        with torch.cuda.stream(self._s.comm):
            x = torch.full((1,), flag, dtype=torch.int32, device=self._device)
            self._allreduce_max(x)
            v = int(x.item())
        return v

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        import torch

        with torch.cuda.stream(self._s.comm):
            self._broadcast(tensor, root)
        self._s.comm.synchronize()

    def step(
        self,
        flag: int,
        tensor: torch.Tensor,
        root: int,
        *,
        after: torch.cuda.Event | None = None,
        side_copy: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> Step:
        """Agree on `flag` and broadcast `tensor` from `root`, all on the GPU; the flag
        comes back in the returned Step once its events complete. With side_copy=(dst, src)
        the root also copies src into dst on the side stream (its own engine's slot)."""
        import torch

        s = self._s
        i = self._n % FLAG_RING
        self._n += 1
        events = []
        if side_copy is not None:
            with torch.cuda.stream(s.side):
                if after is not None:
                    s.side.wait_event(after)
                side_copy[0].copy_(side_copy[1], non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(s.side)
                events.append(ev)
        with torch.cuda.stream(s.comm):
            f = self._flags[i : i + 1]
            f.fill_(flag)
            self._allreduce_max(f)
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(s.comm)
            if after is not None:
                s.comm.wait_event(after)
            self._broadcast(tensor, root)
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(s.comm)
            host = self._host[i]
            host.copy_(f, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(s.comm)
            events.append(ev)
        return Step(events=events, flag=host, t_start=t0, t_end=t1)

    def mark_failed(self) -> None:
        self.healthy = False

    def close(self) -> None:
        """Called after every update: the communicator stays cached unless it failed."""
        if not self.healthy:
            Groups.evict(self.key)


class Groups:
    """NCCL communicators kept across updates, by membership (ordered GPU UUIDs) and the
    job that created them. Creating one costs far more than an update's setup."""

    _pgs: dict[str, tuple[str, dist.ProcessGroupNCCL]] = {}

    @classmethod
    def get(cls, key: str) -> tuple[str, dist.ProcessGroupNCCL] | None:
        return cls._pgs.get(key)

    @classmethod
    def put(cls, key: str, creator: str, pg: dist.ProcessGroupNCCL) -> None:
        for k in list(cls._pgs):
            if k != key:
                cls.evict(k)
        cls._pgs[key] = (creator, pg)

    @classmethod
    def evict_all(cls) -> None:
        for k in list(cls._pgs):
            cls.evict(k)

    @classmethod
    def evict(cls, key: str) -> None:
        item = cls._pgs.pop(key, None)
        if item is not None:
            try:
                item[1].abort()
            except Exception:
                pass
