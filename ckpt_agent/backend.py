"""The device backend behind the pipeline: host store views, the engine hand-off buffer, the
copy into it, and the collective. CPU: shared memory + gloo. CUDA: see cuda_backend.py."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import shared_memory
from typing import Any, NamedTuple, Protocol

from ckpt_agent import shm
from ckpt_agent.host_store import Store

RENDEZVOUS_S = 10.0  # every rank of a group connects within this (they start together)
WAIT_SLICE_S = 0.05  # a collective's wait is polled this often (abort, deadline)


def free_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Copy(NamedTuple):
    """One copy of a bucket's H2D: `rows` runs of `run` bytes from the store (each `stride`
    bytes after the previous) into the bucket at `dst`, packed back to back."""

    dst: int
    src: int
    run: int
    rows: int = 1
    stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.rows * self.run


def strided(t: Any, c: Copy) -> Any:
    """The copy's source bytes in a 1-D uint8 tensor, as a (rows, run) view."""
    if c.rows <= 1:
        return t[c.src : c.src + c.run].view(1, c.run)
    if c.src < 0 or c.src + (c.rows - 1) * c.stride + c.run > t.numel():
        raise ValueError("a strided copy reaches beyond its store")
    return t[c.src :].as_strided((c.rows, c.run), (c.stride, 1))


def copy_into(dst: Any, src: Any, c: Copy, non_blocking: bool = False) -> None:
    """dst[c.dst : c.dst + c.nbytes] = the copy's bytes of src (both 1-D uint8)."""
    dst[c.dst : c.dst + c.nbytes].view(c.rows, c.run).copy_(strided(src, c), non_blocking)


class InFlight(Protocol):
    """One bucket's agreement + broadcast. wait() returns the agreed flag once delivered."""

    events: list[Any]

    def wait(self, deadline: float, abort: Any = None) -> int: ...


class Collective(Protocol):
    def broadcast(self, tensor: Any, root: int) -> None: ...
    def agree(self, flag: int) -> int:
        """All-reduce MAX of a small int over the group: everyone learns the worst."""
        ...

    def step(
        self,
        flag: int,
        tensor: Any,
        root: int,
        *,
        after: Any = None,
        side_copy: tuple[Any, Any] | None = None,
    ) -> InFlight:
        """agree(flag), then broadcast(tensor, root) unless someone failed; asynchronous on
        devices with streams. `after`: an event the broadcast waits for (the root's H2D);
        side_copy=(dst, src): the root's own copy into its engine's slot."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    kind: str

    def store_tensor(self, store: Store) -> Any: ...
    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        """(hand-off slots, owner staging slots); staging 0 = copy straight into the slot."""
        ...

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, Any]: ...
    def device_buffer(self, nbytes: int) -> Any: ...
    def h2d(self, dst: Any, src: Any, copies: list[Copy], after: list[Any]) -> Any:
        """Copies each Copy of src into dst; returns (done, start) events (None on CPU,
        where it is synchronous)."""
        ...

    def end_update(self, shared_never_opened: bool = False) -> None: ...
    def new_group(
        self, store: Any, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective: ...
    def close(self) -> None: ...


@dataclass
class Done:
    """A step that completed synchronously."""

    flag: int
    events: list[Any] = field(default_factory=list)
    t_start: Any = None
    t_end: Any = None

    def wait(self, deadline: float, abort: Any = None) -> int:
        return self.flag


class GlooCollective:
    """gloo, with a deadline on every operation and an abort that ends a wait at once.

    An operation runs on gloo's threads; the caller polls it (`WAIT_SLICE_S`), so it can
    give up when `abort` is set or the step's deadline passes. A group whose operation was
    given up is never waited on again: it is released on a daemon thread (gloo joins its
    threads, which end when the operation's own timeout fires) once that operation is over:
    destroying a group joins gloo's threads while holding the GIL."""

    def __init__(self, store: Any, rank: int, world: int, timeout_s: float, host: str = "") -> None:
        import torch.distributed as dist

        self._dist = dist
        # the rendezvous (every rank connecting) is bounded by RENDEZVOUS_S, not the job
        setup = timedelta(seconds=max(1.0, min(timeout_s, RENDEZVOUS_S)))
        if host:  # gloo listens on the agent's --host only, not on every interface
            opts = dist.ProcessGroupGloo._Options()
            opts._timeout = setup
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
            self._pg: Any = dist.ProcessGroupGloo(store, rank, world, opts)
        else:
            self._pg = dist.ProcessGroupGloo(store, rank, world, setup)
        self.op_s = max(1.0, timeout_s)  # the next operation's deadline (set per step)
        self.abort: Any = None  # an Event (group_abort.Abort) that ends any wait
        self._abandoned: Any = None  # the operation given up on

    def bind(self, abort: Any, op_s: float) -> None:
        self.abort, self.op_s = abort, max(0.1, op_s)

    def _wait(self, work: Any, what: str) -> None:
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

    def broadcast(self, tensor: Any, root: int) -> None:
        opts = self._dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root, 0
        opts.timeout = timedelta(seconds=self.op_s)
        self._wait(self._pg.broadcast([tensor], opts), f"broadcast from group rank {root}")

    def agree(self, flag: int) -> int:
        import torch

        x = torch.tensor([flag], dtype=torch.int64)
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.MAX
        opts.timeout = timedelta(seconds=self.op_s)
        self._wait(self._pg.allreduce([x], opts), "agreement of all ranks")
        return int(x.item())

    def step(
        self,
        flag: int,
        tensor: Any,
        root: int,
        *,
        after: Any = None,
        side_copy: tuple[Any, Any] | None = None,
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
            holder = [pg, work]
            del pg, work
            threading.Thread(
                target=_release, args=(holder,), name="gloo-release", daemon=True
            ).start()


class CollectiveAborted(Exception):
    """A collective was given up because the update was aborted (the reason says why)."""


def _release(holder: list[Any]) -> None:
    """Drops [group, operation] once the operation is over (its own timeout at the latest):
    only then is destroying the group quick."""
    while not holder[1].is_completed():
        time.sleep(0.5)
    holder.clear()


@dataclass
class _Ipc:
    name: str
    mem: shared_memory.SharedMemory
    tensor: Any


class CpuBackend:
    """Host store and hand-off buffer in POSIX shared memory; gloo for the collective."""

    kind = "cpu"

    def __init__(self, segment_prefix: str, host: str = "") -> None:
        self._prefix = segment_prefix
        self._host = host
        self._ipc: _Ipc | None = None
        self._views: dict[str, Any] = {}

    def store_tensor(self, store: Store) -> Any:
        import torch

        t = self._views.get(store.segment)
        if t is None:
            t = torch.frombuffer(store.mem.buf, dtype=torch.uint8, count=max(1, store.nbytes))
            self._views = {store.segment: t}  # keep one: stores come and go
        return t

    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        return nbuf, 0

    def device_buffer(self, nbytes: int) -> Any:
        import torch

        return torch.empty(max(1, nbytes), dtype=torch.uint8)

    def h2d(self, dst: Any, src: Any, copies: list[Copy], after: list[Any]) -> Any:
        for c in copies:
            copy_into(dst, src, c)
        return None, None

    def end_update(self, shared_never_opened: bool = False) -> None:
        return None  # the shared segment is kept: engines map it once

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, Any]:
        import torch

        if self._ipc is None or self._ipc.mem.size < nbytes:
            self._release_ipc()
            name = f"{self._prefix}i{os.getpid()}_{int(time.time() * 1000) % 10**9}"
            mem = shm.create(name, nbytes)
            self._ipc = _Ipc(name, mem, torch.frombuffer(mem.buf, dtype=torch.uint8))
        return f"shm:{self._ipc.name}", self._ipc.tensor

    def _release_ipc(self) -> None:
        if self._ipc is not None:
            name = self._ipc.name
            self._ipc.tensor = None
            try:
                self._ipc.mem.close()
            except BufferError:
                pass
            shm.unlink(name)
            self._ipc = None

    def copy(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def sync(self) -> None:
        return None

    def new_group(
        self, store: Any, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective:
        return GlooCollective(store, rank, world, timeout_s, self._host)

    def close(self) -> None:
        self._views.clear()
        self._release_ipc()
