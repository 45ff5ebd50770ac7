"""The device backend behind the pipeline: host store views, the engine hand-off buffer, the
copy into it, and the collective. CPU: shared memory + gloo. CUDA: see cuda_backend.py."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import shared_memory
from typing import Any, Protocol

from ckpt_agent import shm
from ckpt_agent.host_store import Store


def free_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    def h2d(self, dst: Any, src: Any, ranges: list[tuple[int, int, int]], after: list[Any]) -> Any:
        """Copies src[o:o+n] into dst[d:d+n] for each (d, o, n); returns (done, start) events
        (None on CPU, where it is synchronous)."""
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
    def __init__(self, store: Any, rank: int, world: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self._dist = dist
        self._timeout = timedelta(seconds=timeout_s)
        self._pg = dist.ProcessGroupGloo(store, rank, world, self._timeout)

    def broadcast(self, tensor: Any, root: int) -> None:
        self._pg.broadcast(tensor, root).wait()

    def agree(self, flag: int) -> int:
        import torch

        x = torch.tensor([flag], dtype=torch.int64)
        opts = self._dist.AllreduceOptions()
        opts.reduceOp = self._dist.ReduceOp.MAX
        self._pg.allreduce([x], opts).wait()
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
        self._pg = None


@dataclass
class _Ipc:
    name: str
    mem: shared_memory.SharedMemory
    tensor: Any


class CpuBackend:
    """Host store and hand-off buffer in POSIX shared memory; gloo for the collective."""

    kind = "cpu"

    def __init__(self, segment_prefix: str) -> None:
        self._prefix = segment_prefix
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

    def h2d(self, dst: Any, src: Any, ranges: list[tuple[int, int, int]], after: list[Any]) -> Any:
        for d, o, n in ranges:
            dst[d : d + n].copy_(src[o : o + n])
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
        return GlooCollective(store, rank, world, timeout_s)

    def close(self) -> None:
        self._views.clear()
        self._release_ipc()
