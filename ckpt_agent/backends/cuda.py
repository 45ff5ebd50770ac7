"""The CUDA backend: pinned host store, device staging and hand-off buffers, NCCL (nccl.py),
CUDA IPC (cuda_ipc.py).

Streams (one worker = one GPU):
  copy  - H2D of the owner's buckets from the pinned host store into staging slots
  comm  - per bucket: all-reduce of the failure flag, then the broadcast (NCCL runs on its
          own stream, ordered after and before this one through work.wait())
  side  - the root's own copy, staging slot -> its hand-off slot, beside the broadcast
Ordering is by events; the host waits only on a bucket's "delivered" event, to tell the
engine (pipeline.py decides when).

Memory: staging and hand-off buffers are allocated per update and released at its end
(`end_update`), so device memory returns to where it was; the NCCL communicator is kept
while the group's membership is unchanged (`new_group`) and is the one thing that stays.

Device discovery is in cuda_devices.py (NVML, never torch, in the agent process).
"""

from __future__ import annotations

import gc
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing import shared_memory
from types import ModuleType
from typing import TYPE_CHECKING

import structlog

from ckpt_agent.backends.base import Backend, Copy, need_src
from ckpt_agent.backends.cuda_devices import cuda_index_of, list_devices, norm_uuid
from ckpt_agent.backends.cuda_memcpy import memcpy_2d
from ckpt_agent.backends.nccl import FLAG_RING, Groups, NcclCollective, Streams
from ckpt_agent.host_store import Store
from ckpt_common.netif import interface_of

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

log = structlog.get_logger("ckpt_agent.cuda")

# NCCL errors surface as exceptions instead of killing the worker (and its host store).
ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
NVLS_ENV = "NCCL_NVLS_ENABLE"
SOCKET_IFNAME_ENV = "NCCL_SOCKET_IFNAME"
STAGING_SLOTS = 2  # owner-side H2D slots: H2D of a later bucket overlaps the broadcasts
OK, FAILED = 0, 1
HEADROOM = 256 << 20  # device bytes left free when sizing buffers


def set_nccl_env(host: str) -> None:
    """NCCL's settings for a worker, unless the operator chose them: errors raise rather
    than exit, no NVLink SHARP, bootstrap sockets on the agent's --host."""
    os.environ.setdefault(ERROR_HANDLING_ENV, "2")  # CleanUpOnly: raise, don't exit
    os.environ.setdefault(NVLS_ENV, "0")
    iface = interface_of(host) if host else None
    if iface:
        os.environ.setdefault(SOCKET_IFNAME_ENV, iface)


@dataclass
class _Update:
    buffers: list[torch.Tensor] = field(default_factory=list)
    shared: list[tuple[str, int]] = field(default_factory=list)  # IPC ref counters
    reserved0: int = -1  # the allocator's reserved bytes when the update began


class CudaBackend(Backend):
    """Made by `open` (it sets NCCL's environment and the device); the constructor only
    keeps what open made."""

    kind = "cuda"
    pins_stores = True

    def __init__(
        self,
        device: torch.device,
        uuid: str,
        streams: Streams,
        flags: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        self.device = device
        self.uuid = uuid
        self._s = streams
        self._flags = flags
        # id(store.mem) -> (pointer, tensor, mem): keyed by the mapping, which a spare store
        # keeps when it is reused under another segment name (it stays pinned)
        self._pinned: dict[int, tuple[int, torch.Tensor, shared_memory.SharedMemory]] = {}
        self._upd = _Update()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, device: int, uuid: str = "", host: str = "") -> CudaBackend:
        """Sets NCCL's environment, makes this process's device current and its streams."""
        set_nccl_env(host)
        import torch

        torch.cuda.init()
        if not uuid:
            devs = list_devices()
            uuid = devs[device % len(devs)].uuid if devs else ""  # more slots than GPUs: shared
        idx = cuda_index_of(uuid) if uuid else device
        dev = torch.device("cuda", idx)
        torch.cuda.set_device(dev)
        uuid = norm_uuid(str(torch.cuda.get_device_properties(idx).uuid))
        streams = Streams(
            copy=torch.cuda.Stream(dev),
            comm=torch.cuda.Stream(dev, priority=-1),
            side=torch.cuda.Stream(dev),
        )
        flags = (
            torch.zeros(FLAG_RING, dtype=torch.int32, device=dev),
            torch.zeros((FLAG_RING, 1), dtype=torch.int32).pin_memory(),
        )
        backend = cls(dev, uuid, streams, flags)
        log.info("cuda_backend", index=idx, uuid=uuid)
        return backend

    def torch_device(self) -> torch.device:
        return self.device

    # --- host store ------------------------------------------------------------------

    def pin_store(self, store: Store) -> float:
        """Page-locks a host store in place (cudaHostRegister) so H2D runs at DMA speed."""
        import torch

        torch.cuda.set_device(self.device)
        with self._lock:
            if id(store.mem) in self._pinned or store.nbytes == 0:
                return 0.0
            t0 = time.monotonic()
            t = torch.frombuffer(store.mem.buf, dtype=torch.uint8, count=store.nbytes)
            ptr = t.data_ptr()
            err = cudart().cudaHostRegister(ptr, store.nbytes, 0)
            if int(getattr(err, "value", err)) != 0:
                log.warning("pin_failed", segment=store.segment, error=str(err))
                torch.cuda.synchronize()  # clears nothing sticky: registration errors aren't
                return 0.0
            self._pinned[id(store.mem)] = (ptr, t, store.mem)
            dt = time.monotonic() - t0
            log.info("store_pinned", segment=store.segment, bytes=store.nbytes, seconds=dt)
            return dt

    def unpin_store(self, store: Store) -> None:
        """Unlocks a store's pages; called before its memory goes (not when kept as a spare)."""
        self._unpin(id(store.mem))

    def _unpin(self, key: int) -> None:
        import torch

        with self._lock:
            item = self._pinned.pop(key, None)
            if item is not None:
                torch.cuda.synchronize(self.device)  # no H2D may still read it
                cudart().cudaHostUnregister(item[0])

    def store_tensor(self, store: Store) -> torch.Tensor:
        self.pin_store(store)
        item = self._pinned.get(id(store.mem))
        if item is not None:
            return item[1][: store.nbytes]
        import torch

        return torch.frombuffer(store.mem.buf, dtype=torch.uint8, count=max(1, store.nbytes))

    # --- device buffers ---------------------------------------------------------------

    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        """(hand-off slots, staging slots) that fit in free memory: triple-buffered hand-off
        and double staging when they fit, then fewer, then serial (staging 0)."""
        import torch

        torch.cuda.set_device(self.device)  # each update runs in a thread of its own
        if self._upd.reserved0 < 0:
            self._upd.reserved0 = torch.cuda.memory_reserved(self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        avail = max(0, free - HEADROOM)
        for slots, stage in ((max(nbuf, 3), STAGING_SLOTS), (nbuf, STAGING_SLOTS), (nbuf, 1)):
            if (slots + (stage if owns else 0)) * bucket_bytes <= avail:
                return slots, stage if owns else 0
        return nbuf, 0

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        import torch

        t = torch.empty(max(1, nbytes), dtype=torch.uint8, device=self.device)
        self._upd.buffers.append(t)
        return t

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, torch.Tensor]:
        from ckpt_agent.backends import cuda_ipc

        t = self.device_buffer(nbytes)
        if not share:
            return "", t
        enc = cuda_ipc.encode(t)
        doc = cuda_ipc.decode(enc)
        self._upd.shared.append((doc["ref_handle"], doc["ref_offset"]))
        return "cuda:" + enc, t

    def h2d(
        self,
        dst: torch.Tensor,
        src: torch.Tensor | None,
        copies: list[Copy],
        after: list[torch.cuda.Event],
    ) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        """Copies each Copy of src into dst on the copy stream once `after` events fired
        (a strided one as one 2-D DMA); returns (done event, start timing event)."""
        import torch

        src = need_src(src)
        s = self._s.copy
        with torch.cuda.stream(s):
            for ev in after:
                if ev is not None:
                    s.wait_event(ev)
            t0 = torch.cuda.Event(enable_timing=True)
            t0.record(s)
            for c in copies:
                if c.rows <= 1:
                    dst[c.dst : c.dst + c.run].copy_(src[c.src : c.src + c.run], non_blocking=True)
                else:
                    memcpy_2d(dst, src, c, s)
            t1 = torch.cuda.Event(enable_timing=True)
            t1.record(s)
        return t1, t0

    def sync(self) -> None:
        self._s.comm.synchronize()

    def end_update(self, shared_never_opened: bool = False) -> None:
        """Waits for the streams, frees this update's buffers; memory returns to the driver."""
        import torch

        torch.cuda.synchronize(self.device)
        upd, self._upd = self._upd, _Update()
        if shared_never_opened:
            for ref in upd.shared:
                _release_unopened(ref, self.device)
        upd.buffers.clear()
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()
        kept = torch.cuda.memory_reserved(self.device) - max(0, upd.reserved0)
        if upd.reserved0 >= 0 and kept > 0:
            gc.collect()  # a reference cycle (a traceback, say) may still hold a buffer
            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()
            kept = torch.cuda.memory_reserved(self.device) - upd.reserved0
            if kept > 0:
                log.warning("device_memory_kept", bytes=kept)

    # --- collective -------------------------------------------------------------------

    def new_group(
        self, store: dist.Store, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> NcclCollective:
        """The NCCL group of this update, reused when every member still holds the
        communicator a previous update created with the same membership (decided through
        the update's TCPStore, so ranks never disagree)."""
        import torch.distributed as dist

        if world == 1:  # no communicator to create (NCCL's set-up was most of a first update)
            return NcclCollective(None, self.device, self._s, "", self._flags)
        store.set(f"member/{rank}", self.uuid)
        members = [store.get(f"member/{r}").decode() for r in range(world)]
        key = hashlib.sha1("|".join(members).encode()).hexdigest()
        cached = Groups.get(key)
        store.set(f"cached/{rank}", cached[0] if cached else "")
        creators = {store.get(f"cached/{r}").decode() for r in range(world)}
        if cached and len(creators) == 1 and "" not in creators:
            log.info("nccl_reused", key=key[:12], world=world)
            return NcclCollective(cached[1], self.device, self._s, key, self._flags)
        Groups.evict(key)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=max(10.0, timeout_s))
        opts.is_high_priority_stream = True
        pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        Groups.put(key, job_id or key, pg)
        log.info("nccl_created", key=key[:12], world=world, rank=rank)
        return NcclCollective(pg, self.device, self._s, key, self._flags)

    def close(self) -> None:
        for key in list(self._pinned):
            self._unpin(key)
        Groups.evict_all()


def cudart() -> ModuleType:
    """torch's CUDA runtime bindings (a CUDA build always has them)."""
    import torch

    rt = torch.cuda.cudart()
    if rt is None:
        raise RuntimeError("this torch has no CUDA runtime")
    return rt


def _release_unopened(ref: tuple[str, int], device: torch.device) -> None:
    """A shared buffer nobody mapped keeps torch's IPC counter at 1; release it ourselves so
    the memory is not parked in torch's IPC limbo for the life of the process."""
    import base64

    import torch

    try:
        torch.UntypedStorage._release_ipc_counter(base64.b64decode(ref[0]), ref[1], device=device)
    except Exception as e:
        log.warning("ipc_release_failed", error=repr(e))
