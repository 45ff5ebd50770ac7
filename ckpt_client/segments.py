"""The agents' host-store segments a trainer process writes into, mapped once and kept.

A direct push names the segments of its version's stores. Each is mapped (after the trust
check of ckpt_agent.shm.attach) and, when GPU tensors are copied into it, registered with
CUDA (page-locked) the first time this process sees it, and kept for the next push: agents
reuse a dropped version's store for the next one (renamed to the new version's segment name,
same memory), so a trainer pushing version after version maps and pins each store once, not
on every push (cudaHostRegister costs about 0.14 s per GiB).

Entries are keyed by the segment file's identity (device, inode), not by its name, which
changes with each version. An entry is held by the pushes using it (never unmapped under a
copy); one whose file no longer exists under any name (the agent freed the store: link count
0) is released at the next acquire, and at most `max_segments` unused entries are kept (least
recently used released first). `close()` releases everything.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("ckpt_client.segments")
# idle mappings kept while their files exist: a node's rings (a few stores per device, 8
# devices) fit many times; an idle mapping holds no memory of its own (the agent's store
# exists anyway), only its registration with CUDA
MAX_SEGMENTS = 256
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


@dataclass(eq=False)
class Mapped:
    """One mapped segment: its bytes as a 1-D uint8 CPU tensor (`host`)."""

    key: tuple[int, int]
    name: str
    mem: Any  # multiprocessing.shared_memory.SharedMemory
    host: Any
    pinned: bool = False
    users: int = 0
    pin_s: float = 0.0  # seconds its registration took (0: not pinned by this process)

    @property
    def size(self) -> int:
        return int(self.mem.size)

    def gone(self) -> bool:
        """Its file was unlinked (the agent freed the store): no later push can name it."""
        try:
            return os.fstat(self.mem._fd).st_nlink == 0
        except OSError:
            return True


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    pinned: int = 0  # registrations made
    released: int = 0


def _identity(name: str) -> tuple[tuple[int, int], int] | None:
    from ckpt_agent import shm

    try:
        st = os.stat(os.path.join(shm.SHM_DIR, name), follow_symlinks=False)
    except OSError:
        return None
    return (st.st_dev, st.st_ino), st.st_size


class SegmentCache:
    def __init__(self, max_segments: int = MAX_SEGMENTS) -> None:
        if max_segments < 0:
            raise ValueError("max_segments must not be negative")
        self._max = max_segments
        self._lock = threading.Lock()
        self._maps: OrderedDict[tuple[int, int], Mapped] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._maps)

    def acquire(self, names: Sequence[str], *, pin: bool) -> list[Mapped]:
        """The segments, mapped (and with pin, page-locked), held until `release`."""
        got: list[Mapped] = []
        with self._lock:
            self._prune()
            try:
                for name in names:
                    m = self._get(name)
                    m.users += 1
                    got.append(m)
                    if pin and not m.pinned:
                        _pin(m)
                        self.stats.pinned += int(m.pinned)
            except BaseException:
                self._unhold(got)
                raise
            self._evict()
        return got

    def release(self, maps: Sequence[Mapped]) -> None:
        with self._lock:
            self._unhold(maps)
            self._evict()

    def pin_all(self, names: Sequence[str]) -> int:
        """Maps and (where CUDA runs) page-locks these segments ahead of a push: a run's first
        push then finds them ready. Returns how many were newly mapped; ones that vanish
        meanwhile, or that this user may not map, are skipped."""
        before = self.stats.misses
        for name in names:
            try:
                self.release(self.acquire([name], pin=True))
            except (FileNotFoundError, PermissionError):
                continue
        return self.stats.misses - before

    def close(self) -> None:
        """Unregisters and unmaps every segment (pushes in flight must have returned)."""
        with self._lock:
            for m in list(self._maps.values()):
                self._drop(m)
            self._maps.clear()

    # -- under the lock ------------------------------------------------------------

    def _get(self, name: str) -> Mapped:
        from ckpt_agent import shm

        ident = _identity(name)
        if ident is not None:
            m = self._maps.get(ident[0])
            if m is not None and m.size == ident[1] and not m.gone():
                m.name = name
                self._maps.move_to_end(ident[0])
                self.stats.hits += 1
                return m
        mem = shm.attach(name)  # trust-checked on the opened descriptor
        st = os.fstat(mem._fd)  # type: ignore[attr-defined]
        key = (st.st_dev, st.st_ino)
        old = self._maps.pop(key, None)
        if old is not None:  # the same file, resized: the old mapping is stale
            self._drop(old)
        m = Mapped(key=key, name=name, mem=mem, host=_host_tensor(mem))
        self._maps[key] = m
        self.stats.misses += 1
        return m

    def _unhold(self, maps: Sequence[Mapped]) -> None:
        for m in maps:
            m.users = max(0, m.users - 1)

    def _prune(self) -> None:
        for key in [k for k, m in self._maps.items() if m.users == 0 and m.gone()]:
            self._drop(self._maps.pop(key))

    def _evict(self) -> None:
        idle = [k for k, m in self._maps.items() if m.users == 0]
        for key in idle[: max(0, len(idle) - self._max)]:
            self._drop(self._maps.pop(key))

    def _drop(self, m: Mapped) -> None:
        if m.pinned:
            _unpin(m)
        m.host = None
        try:
            m.mem.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            log.info("segment_view_alive", segment=m.name)
        self.stats.released += 1


def _host_tensor(mem: Any) -> Any:
    import torch

    if not mem.size:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mem.buf, dtype=torch.uint8, count=mem.size)


def _pin(m: Mapped) -> None:
    """Registers the mapping with CUDA; a refusal leaves it pageable (copies still work, at
    the speed of staged copies)."""
    import time

    import torch

    if not m.size or not torch.cuda.is_available():
        return
    t0 = time.monotonic()
    err = torch.cuda.cudart().cudaHostRegister(m.host.data_ptr(), m.size, HOST_REGISTER_PORTABLE)
    code = int(getattr(err, "value", err))
    if code != 0:
        log.warning("segment_pin_failed", segment=m.name, error=code)
        return
    m.pinned, m.pin_s = True, time.monotonic() - t0
    log.debug("segment_pinned", segment=m.name, bytes=m.size, seconds=round(m.pin_s, 4))


def _unpin(m: Mapped) -> None:
    import torch

    torch.cuda.synchronize()  # nothing still copies into it
    torch.cuda.cudart().cudaHostUnregister(m.host.data_ptr())
    m.pinned = False
