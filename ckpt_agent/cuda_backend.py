"""The CUDA backend: pinned host store, device staging and hand-off buffers, NCCL, CUDA IPC.

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

Device discovery goes through NVML (or nvidia-smi), not torch, so the agent process never
creates a CUDA context; workers pick their GPU by UUID.
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.backend import Copy
from ckpt_agent.cuda_memcpy import memcpy_2d
from ckpt_agent.host_store import Store
from ckpt_common.netif import interface_of

log = structlog.get_logger("ckpt_agent.cuda")

# NCCL errors surface as exceptions instead of killing the worker (and its host store).
ERROR_HANDLING_ENV = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
STAGING_SLOTS = 2  # owner-side H2D slots: H2D of a later bucket overlaps the broadcasts
OK, FAILED = 0, 1
FLAG_RING = 64  # pinned host slots for per-bucket agreement flags (> any pipeline lag)
HEADROOM = 256 << 20  # device bytes left free when sizing buffers


# ----------------------------------------------------------------------------- discovery


def _norm_uuid(u: str) -> str:
    u = u.strip()
    return u[4:] if u.startswith("GPU-") else u


def _visible(devs: list[tuple[int, str, int, int]]) -> list[tuple[int, str, int, int]]:
    """Applies CUDA_VISIBLE_DEVICES (indices or UUIDs) to NVML's list, in CUDA's order."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return devs
    out = []
    for item in (x.strip() for x in cvd.split(",") if x.strip()):
        if item.isdigit():
            hit = [d for d in devs if d[0] == int(item)]
        else:
            hit = [d for d in devs if _norm_uuid(d[1]).startswith(_norm_uuid(item))]
        if not hit:
            break  # CUDA stops at the first invalid entry
        out.append(hit[0])
    return out


def _nvml_query() -> list[tuple[int, str, int, int]]:
    """(physical index, uuid, total bytes, free bytes) per GPU."""
    try:
        import pynvml

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append((i, _norm_uuid(uuid), int(mem.total), int(mem.free)))
        return out
    except ImportError:
        pass
    r = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,uuid,memory.total,memory.free",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = []
    for line in r.stdout.strip().splitlines():
        i, uuid, total, free = (x.strip() for x in line.split(","))
        out.append((int(i), _norm_uuid(uuid), int(total) << 20, int(free) << 20))
    return out


def list_devices() -> list[tpb.Device]:
    """The GPUs this process may use, indexed as CUDA will index them in our workers."""
    return [
        tpb.Device(index=i, kind="cuda", uuid=uuid, total_bytes=total, free_bytes=free)
        for i, (_, uuid, total, free) in enumerate(_visible(_nvml_query()))
    ]


def free_bytes(index: int) -> int:
    devs = _visible(_nvml_query())
    return devs[index % len(devs)][3] if devs and index >= 0 else 0


def cuda_index_of(uuid: str) -> int:
    import torch

    want = _norm_uuid(uuid)
    for i in range(torch.cuda.device_count()):
        if _norm_uuid(str(torch.cuda.get_device_properties(i).uuid)) == want:
            return i
    raise LookupError(f"GPU {uuid} is not visible to this worker")


# ----------------------------------------------------------------------------- collective


@dataclass
class Step:
    """One bucket's agreement + broadcast, in flight on the GPU."""

    events: list[Any]
    flag: Any  # pinned host int32 slot the agreed flag lands in
    t_start: Any = None  # timing events on the comm stream
    t_end: Any = None

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


class NcclCollective:
    def __init__(
        self, pg: Any, device: Any, streams: _Streams, key: str, flags: tuple[Any, Any]
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

    def _allreduce_max(self, t: Any) -> None:
        if self._pg is None:  # a group of one: its own flag is the agreement
            return
        import torch.distributed as dist

        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self._pg.allreduce([t], opts).wait()

    def _broadcast(self, t: Any, root: int) -> None:
        if self._pg is None:  # a group of one: the root's tensor is already everyone's
            return
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        self._pg.broadcast([t], opts).wait()

    def agree(self, flag: int) -> int:
        import torch

        with torch.cuda.stream(self._s.comm):
            x = torch.full((1,), flag, dtype=torch.int32, device=self._device)
            self._allreduce_max(x)
            v = int(x.item())
        return v

    def broadcast(self, tensor: Any, root: int) -> None:
        import torch

        with torch.cuda.stream(self._s.comm):
            self._broadcast(tensor, root)
        self._s.comm.synchronize()

    def step(
        self,
        flag: int,
        tensor: Any,
        root: int,
        *,
        after: Any = None,
        side_copy: tuple[Any, Any] | None = None,
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

    def close(self) -> None:
        """Called after every update: the communicator stays cached unless it failed."""
        if not self.healthy:
            _Groups.evict(self.key)


class _Groups:
    """NCCL communicators kept across updates, by membership (ordered GPU UUIDs) and the
    job that created them. Creating one costs far more than an update's setup."""

    _pgs: dict[str, tuple[str, Any]] = {}

    @classmethod
    def get(cls, key: str) -> tuple[str, Any] | None:
        return cls._pgs.get(key)

    @classmethod
    def put(cls, key: str, creator: str, pg: Any) -> None:
        for k in list(cls._pgs):
            if k != key:
                cls.evict(k)
        cls._pgs[key] = (creator, pg)

    @classmethod
    def evict(cls, key: str) -> None:
        item = cls._pgs.pop(key, None)
        if item is not None:
            try:
                item[1].abort()
            except Exception:
                pass


@dataclass
class _Streams:
    copy: Any
    comm: Any
    side: Any


@dataclass
class _Update:
    buffers: list[Any] = field(default_factory=list)
    shared: list[tuple[str, int]] = field(default_factory=list)  # IPC ref counters
    reserved0: int = -1  # the allocator's reserved bytes when the update began


# ----------------------------------------------------------------------------- backend


class CudaBackend:
    kind = "cuda"

    def __init__(self, device: int, uuid: str = "", host: str = "") -> None:
        os.environ.setdefault(ERROR_HANDLING_ENV, "2")  # CleanUpOnly: raise, don't exit
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        iface = interface_of(host) if host else None
        if iface:  # NCCL's bootstrap sockets on the agent's --host, unless the operator chose
            os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
        import torch

        torch.cuda.init()
        if not uuid:
            devs = list_devices()
            uuid = devs[device % len(devs)].uuid if devs else ""  # more slots than GPUs: shared
        idx = cuda_index_of(uuid) if uuid else device
        self.device = torch.device("cuda", idx)
        torch.cuda.set_device(self.device)
        self.uuid = _norm_uuid(str(torch.cuda.get_device_properties(idx).uuid))
        self._s = _Streams(
            copy=torch.cuda.Stream(self.device),
            comm=torch.cuda.Stream(self.device, priority=-1),
            side=torch.cuda.Stream(self.device),
        )
        self._flags = (
            torch.zeros(FLAG_RING, dtype=torch.int32, device=self.device),
            torch.zeros((FLAG_RING, 1), dtype=torch.int32).pin_memory(),
        )
        # id(store.mem) -> (pointer, tensor, mem): keyed by the mapping, which a spare store
        # keeps when it is reused under another segment name (it stays pinned)
        self._pinned: dict[int, tuple[int, Any, Any]] = {}
        self._upd = _Update()
        self._lock = threading.Lock()
        log.info("cuda_backend", index=idx, uuid=self.uuid)

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
            err = torch.cuda.cudart().cudaHostRegister(ptr, store.nbytes, 0)
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
                torch.cuda.cudart().cudaHostUnregister(item[0])

    def store_tensor(self, store: Store) -> Any:
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

    def device_buffer(self, nbytes: int) -> Any:
        import torch

        t = torch.empty(max(1, nbytes), dtype=torch.uint8, device=self.device)
        self._upd.buffers.append(t)
        return t

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, Any]:
        from ckpt_agent import cuda_ipc

        t = self.device_buffer(nbytes)
        if not share:
            return "", t
        enc = cuda_ipc.encode(t)
        doc = cuda_ipc.decode(enc)
        self._upd.shared.append((doc["ref_handle"], doc["ref_offset"]))
        return "cuda:" + enc, t

    def h2d(self, dst: Any, src: Any, copies: list[Copy], after: list[Any]) -> Any:
        """Copies each Copy of src into dst on the copy stream once `after` events fired
        (a strided one as one 2-D DMA); returns (done event, start timing event)."""
        import torch

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

    def copy(self, dst: Any, src: Any) -> None:
        """Legacy one-copy interface (wrapping backends): synchronous on the comm stream."""
        import torch

        with torch.cuda.stream(self._s.comm):
            dst.copy_(src, non_blocking=True)

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
        self, store: Any, rank: int, world: int, timeout_s: float, job_id: str = ""
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
        cached = _Groups.get(key)
        store.set(f"cached/{rank}", cached[0] if cached else "")
        creators = {store.get(f"cached/{r}").decode() for r in range(world)}
        if cached and len(creators) == 1 and "" not in creators:
            log.info("nccl_reused", key=key[:12], world=world)
            return NcclCollective(cached[1], self.device, self._s, key, self._flags)
        _Groups.evict(key)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timedelta(seconds=max(10.0, timeout_s))
        opts.is_high_priority_stream = True
        pg = dist.ProcessGroupNCCL(store, rank, world, opts)
        _Groups.put(key, job_id or key, pg)
        log.info("nccl_created", key=key[:12], world=world, rank=rank)
        return NcclCollective(pg, self.device, self._s, key, self._flags)

    def close(self) -> None:
        for key in list(self._pinned):
            self._unpin(key)
        for k in list(_Groups._pgs):
            _Groups.evict(k)


def _release_unopened(ref: tuple[str, int], device: Any) -> None:
    """A shared buffer nobody mapped keeps torch's IPC counter at 1; release it ourselves so
    the memory is not parked in torch's IPC limbo for the life of the process."""
    import base64

    import torch

    try:
        torch.UntypedStorage._release_ipc_counter(base64.b64decode(ref[0]), ref[1], device=device)
    except Exception as e:
        log.warning("ipc_release_failed", error=repr(e))
