"""The CPU backend: host store and hand-off buffer in POSIX shared memory, gloo for the
collective (gloo.py)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TYPE_CHECKING

from ckpt_agent import shm
from ckpt_agent.backends.base import Backend, Collective, Copy, copy_into, need_src
from ckpt_agent.host_store import Store

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist


def free_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class _Ipc:
    name: str
    mem: shared_memory.SharedMemory
    tensor: torch.Tensor | None


class CpuBackend(Backend):
    """Host store and hand-off buffer in POSIX shared memory; gloo for the collective."""

    kind = "cpu"

    def __init__(self, segment_prefix: str, host: str = "") -> None:
        self._prefix = segment_prefix
        self._host = host
        self._ipc: _Ipc | None = None
        self._views: dict[str, torch.Tensor] = {}

    def store_tensor(self, store: Store) -> torch.Tensor:
        import torch

        t = self._views.get(store.segment)
        if t is None:
            t = torch.frombuffer(store.mem.buf, dtype=torch.uint8, count=max(1, store.nbytes))
            self._views = {store.segment: t}  # keep one: stores come and go
        return t

    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        return nbuf, 0

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        import torch

        return torch.empty(max(1, nbytes), dtype=torch.uint8)

    def h2d(
        self,
        dst: torch.Tensor,
        src: torch.Tensor | None,
        copies: list[Copy],
        after: list[torch.cuda.Event],
    ) -> tuple[None, None]:
        store = need_src(src)
        for c in copies:
            copy_into(dst, store, c)
        return None, None

    def end_update(self, shared_never_opened: bool = False) -> None:
        return None  # the shared segment is kept: engines map it once

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, torch.Tensor]:
        import torch

        if self._ipc is None or self._ipc.mem.size < nbytes:
            self._release_ipc()
            name = f"{self._prefix}i{os.getpid()}_{int(time.time() * 1000) % 10**9}"
            mem = shm.create(name, nbytes)
            self._ipc = _Ipc(name, mem, torch.frombuffer(mem.buf, dtype=torch.uint8))
        assert self._ipc.tensor is not None  # only _release_ipc drops it
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

    def new_group(
        self, store: dist.Store, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective:
        from ckpt_agent.backends.gloo import GlooCollective

        return GlooCollective(store, rank, world, timeout_s, self._host)

    def close(self) -> None:
        self._views.clear()
        self._release_ipc()
