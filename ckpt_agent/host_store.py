"""One device's host store: the checkpoint bytes it owns, one shared segment per version."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import shared_memory

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent import shm, tunables
from ckpt_common import checksum, progress, sources
from ckpt_common.ipc import safe
from ckpt_common.read_as import Reader

CHUNK = 64 << 20  # bytes one read covers
PARALLEL_MIN = 128 << 20  # bytes per extra reading thread
SPARE_MIN = 64 << 20  # smaller stores are not kept as spares


class StoreError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def load_threads() -> int:
    """Threads one store load reads with (CKPT_LOAD_THREADS; default up to 8)."""
    return tunables.current().threads()


def _read(
    mem: shared_memory.SharedMemory, path: str, fd: int, at: int, file_offset: int, n: int
) -> None:
    """Reads n bytes of a file into the store at `at`."""
    with shm.buffer(mem)[at : at + n] as view:
        got = 0
        while got < n:
            k = os.preadv(fd, [view[got:]], file_offset + got)
            if k <= 0:
                raise StoreError("DATA_LOSS", f"{path}: short read at offset {file_offset + got}")
            got += k


@dataclass
class Store:
    checkpoint: str
    version: int
    segment: str
    nbytes: int
    mem: shared_memory.SharedMemory


def segment_prefix(node_id: str) -> str:
    """Every segment of a node starts with this (fixed length: no node's prefix is a prefix
    of another's)."""
    return f"ckpt_{hashlib.sha256(node_id.encode()).hexdigest()[:12]}_"


def device_prefix(node_id: str, device: int) -> str:
    return f"{segment_prefix(node_id)}{device}_"


def store_segment(prefix: str, checkpoint: str, version: int) -> str:
    """A store's segment name, one-to-one with (checkpoint, version) for a device prefix: a
    digest of both (names that differ only in characters a segment name cannot hold stay
    apart), then a readable hint. Other segments of the device (spares "s", hand-off buffers
    "i") use other kind letters, so no checkpoint name can produce one of theirs."""
    digest = hashlib.sha256(f"{checkpoint}\0{version}".encode()).hexdigest()[:24]
    return f"{prefix}v{digest}_{safe(checkpoint)[:40]}_{version}"


def _strided_range(it: apb.LoadItem, size: int) -> tuple[int, int, int, int]:
    """(offset, bytes, rows, stride) of a checksum item, checked to lie inside the store."""
    off, n = int(it.store_offset), int(it.nbytes)
    rows, stride = max(1, int(it.rows)), int(it.stride)
    run = n // rows
    bad = off < 0 or n < 0 or run * rows != n
    if rows > 1:
        bad = bad or stride < run or off + (rows - 1) * stride + run > size
    if bad or off + n > size and rows == 1:
        raise StoreError("INVALID_ARGUMENT", "a checksum range lies beyond the store")
    return off, n, rows, stride


class HostStore:
    """With spares > 0, a dropped store's segment is kept (still pinned, its pages in place)
    for the next load that fits it: each version of one model is the same size, so a trainer
    pushing version after version skips allocating, faulting in and pinning fresh memory
    (and the trainer, which keeps the segments it mapped by inode, skips mapping and pinning
    them again: the spare is renamed, not copied). A store engines serve is never a spare:
    only a dropped version's store becomes one. `preallocate` makes spares at start.
    `release` is called with a store just before its memory really goes (CUDA: to unpin
    it)."""

    def __init__(
        self,
        node_id: str,
        device: int,
        *,
        spares: int = 0,
        release: Callable[[Store], None] | None = None,
        roots: tuple[str, ...] = (),
    ) -> None:
        self._prefix = device_prefix(node_id, device)
        self._roots = roots or sources.DEFAULT_ROOTS
        self._stores: dict[tuple[str, int], Store] = {}
        self._spares: list[Store] = []
        self._max_spares = spares
        self._release = release
        self._nspare = 0

    def get(self, checkpoint: str, version: int) -> Store:
        s = self._stores.get((checkpoint, version))
        if s is None:
            raise StoreError("NOT_FOUND", f"this device holds no bytes of {checkpoint}@{version}")
        return s

    def by_segment(self, segment: str) -> Store | None:
        """The store held in that segment, if this device holds it."""
        return next((s for s in list(self._stores.values()) if s.segment == segment), None)

    def load(self, cmd: apb.Load) -> apb.StoreReady:
        key = (cmd.checkpoint, cmd.version)
        if key in self._stores:
            self.drop(cmd.checkpoint, cmd.version)
        t0 = time.monotonic()
        name = store_segment(self._prefix, cmd.checkpoint, cmd.version)
        size = cmd.nbytes + progress.TRAILER  # the store, then its progress mark
        spare = self._take_spare(size, name)
        mem = spare.mem if spare is not None else shm.create(name, size)
        try:
            progress.write(mem.buf, 0)  # a reused segment's mark is the last version's
            files: dict[str, int] = {}
            reader = Reader.of_uid(cmd.read_uid if cmd.HasField("read_uid") else None)
            try:
                chunks = []
                for it in cmd.items:
                    if it.store_offset + it.nbytes > cmd.nbytes:
                        raise StoreError("INVALID_ARGUMENT", f"item beyond the store: {it}")
                    fd = files.get(it.path)
                    if fd is None:
                        fd = files[it.path] = self._open_source(it, reader)
                    for o in range(0, it.nbytes, CHUNK):
                        n = min(CHUNK, it.nbytes - o)
                        chunks.append((it.path, fd, it.store_offset + o, it.file_offset + o, n))
                total = sum(c[4] for c in chunks)
                nthreads = min(load_threads(), max(1, total // PARALLEL_MIN))
                if nthreads > 1:  # page faults and copies of a large store, in parallel
                    with ThreadPoolExecutor(nthreads, thread_name_prefix="store-read") as ex:
                        list(ex.map(lambda c: _read(mem, *c), chunks))
                else:
                    for c in chunks:
                        _read(mem, *c)
            finally:
                for fd in files.values():
                    os.close(fd)
        except sources.SourceError as e:
            self._free(Store(cmd.checkpoint, cmd.version, name, cmd.nbytes, mem))
            raise StoreError(e.code, e.message) from None
        except OSError as e:
            self._free(Store(cmd.checkpoint, cmd.version, name, cmd.nbytes, mem))
            raise StoreError(
                "FAILED_PRECONDITION", f"reading the sources failed: {e.strerror}"
            ) from None
        except BaseException:
            self._free(Store(cmd.checkpoint, cmd.version, name, cmd.nbytes, mem))
            raise
        self._stores[key] = Store(cmd.checkpoint, cmd.version, name, cmd.nbytes, mem)
        return apb.StoreReady(segment=name, nbytes=cmd.nbytes, seconds=time.monotonic() - t0)

    def _open_source(self, it: apb.LoadItem, reader: Reader) -> int:
        """The scanned file again: confined, no links, regular, readable by the pushing
        principal (`reader`), the same size (and inode on the scanning node)."""
        real = sources.confine(it.path, self._roots)
        fd, st = sources.open_regular(real, reader)
        try:
            sources.check_identity(
                real, st, it.file_size, it.file_dev, it.file_ino, it.file_ctime_ns
            )
        except sources.SourceError:
            os.close(fd)
            raise
        return fd

    def checksums(self, checkpoint: str, version: int, items: Iterable[apb.LoadItem]) -> list[int]:
        """ckpt_common.checksum of each item's range (store_offset, nbytes) of a store, in
        parallel (numpy releases the GIL)."""
        import numpy as np

        s = self.get(checkpoint, version)
        whole = np.frombuffer(shm.buffer(s.mem), dtype=np.uint8)
        ranges = [_strided_range(it, s.nbytes) for it in items]

        def one(r: tuple[int, int, int, int]) -> int:
            off, n, rows, stride = r
            if rows <= 1:
                return checksum.of_numpy(whole[off : off + n])
            run = n // rows
            part = np.lib.stride_tricks.as_strided(
                whole[off:], shape=(rows, run), strides=(stride, 1), writeable=False
            )
            return checksum.of_numpy(np.ascontiguousarray(part).reshape(-1))

        total = sum(r[1] for r in ranges)
        nthreads = min(load_threads(), max(1, total // PARALLEL_MIN))
        if nthreads > 1:
            with ThreadPoolExecutor(nthreads, thread_name_prefix="store-sum") as ex:
                return list(ex.map(one, ranges))
        return [one(r) for r in ranges]

    def _take_spare(self, nbytes: int, name: str) -> Store | None:
        """The spare that fits best: the smallest holding nbytes, at most twice as large (a
        dropped store of the model is exactly its size; a pre-allocated one a bit larger)."""
        fits = [(s.mem.size, i) for i, s in enumerate(self._spares) if s.mem.size >= nbytes]
        fits = [f for f in fits if f[0] <= 2 * nbytes]
        if not fits:
            return None
        s = self._spares.pop(min(fits)[1])
        return s if self._rename(s, name) else None

    def preallocate(self, nbytes: int, pin: Callable[[Store], object] | None = None) -> int:
        """Fills the spares (up to the number kept) with stores of nbytes, their pages
        allocated and, with pin (CUDA), page-locked: the first loads of a run then cost what
        a steady one does. Returns how many were made; stops at the first that fails."""
        made = 0
        while len(self._spares) < self._max_spares and nbytes >= SPARE_MIN:
            self._nspare += 1
            name = f"{self._prefix}s{self._nspare}"
            size = nbytes + progress.TRAILER  # a store of nbytes fits, with its mark
            mem = shm.create(name, size)
            s = Store("", 0, name, nbytes, mem)
            try:
                os.posix_fallocate(mem._fd, 0, size)  # type: ignore[attr-defined]
                if pin is not None:
                    pin(s)
            except OSError as e:
                self._free(s)
                raise StoreError(
                    "RESOURCE_EXHAUSTED", f"pre-allocating a {nbytes}-byte store: {e.strerror}"
                ) from None
            self._spares.append(s)
            made += 1
        return made

    def _rename(self, s: Store, name: str) -> bool:
        """Renames a store's segment (memory, pins and pages stay); frees it on failure."""
        try:
            os.rename(os.path.join(shm.SHM_DIR, s.segment), os.path.join(shm.SHM_DIR, name))
        except OSError:
            self._free(s)
            return False
        s.segment = name
        return True

    def _free(self, s: Store) -> None:
        if self._release is not None:
            self._release(s)
        self._discard(s.mem, s.segment)

    @staticmethod
    def _discard(mem: shared_memory.SharedMemory, name: str) -> None:
        try:
            mem.close()
        except BufferError:
            pass
        shm.unlink(name)

    def drop(self, checkpoint: str, version: int) -> bool:
        s = self._stores.pop((checkpoint, version), None)
        if s is None:
            return False
        if self._max_spares > 0 and s.mem.size >= SPARE_MIN:
            self._nspare += 1
            if not self._rename(s, f"{self._prefix}s{self._nspare}"):
                return True
            self._spares.append(s)
            while len(self._spares) > self._max_spares:
                self._free(self._spares.pop(0))
            return True
        self._free(s)
        return True

    def close(self) -> None:
        self._max_spares = 0
        for checkpoint, version in list(self._stores):
            self.drop(checkpoint, version)
        while self._spares:
            self._free(self._spares.pop())
