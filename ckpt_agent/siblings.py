"""Other devices' host stores on this node, as a reader of a shard-aware or P2P update sees
them: mapped once and kept (on CUDA page-locked, so reads run at DMA speed), by the
segment's inode, so a store reused as a spare under a new version's name stays mapped and
pinned. Only this node's store segments can be named; mappings of stores that are gone are
dropped at the next update."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import structlog

from ckpt_agent import shm
from ckpt_agent.host_store import HostStore, Store, segment_prefix

if TYPE_CHECKING:
    import torch

    from ckpt_agent.backends.base import Backend

log = structlog.get_logger("ckpt_agent.siblings")


class SiblingError(Exception):
    pass


class SiblingStores:
    def __init__(self, node_id: str, backend: Backend, own: HostStore | None = None) -> None:
        """own: this worker's HostStore; a segment it holds is read in place (already
        mapped, and pinned on CUDA), not mapped again."""
        self._prefix = segment_prefix(node_id)
        self._backend = backend
        self._own = own
        self._lock = threading.Lock()
        # (dev, inode) -> the mapping and its tensor
        self._maps: dict[tuple[int, int], tuple[Store, torch.Tensor]] = {}

    def get(self, name: str) -> torch.Tensor:
        """The store segment `name` of this node as a 1-D uint8 tensor."""
        if not name.startswith(self._prefix) or "/" in name or name in (".", ".."):
            raise SiblingError(f"{name!r} is not a store of this node")
        mine = self._own.by_segment(name) if self._own is not None else None
        if mine is not None:
            return self._backend.store_tensor(mine)
        try:
            st = os.stat(os.path.join(shm.SHM_DIR, name))
        except OSError as e:
            raise SiblingError(f"store {name} is gone ({e.strerror})") from None
        key = (st.st_dev, st.st_ino)
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None and hit[0].nbytes == st.st_size:
                return hit[1]
            try:
                mem = shm.attach(name)
            except OSError as e:
                raise SiblingError(f"store {name} is gone ({e})") from None
            store = Store(checkpoint="", version=0, segment=name, nbytes=mem.size, mem=mem)
            t = self._backend.store_tensor(store)  # CUDA: pinned
            self._maps[key] = (store, t)
            return t

    def prune(self) -> None:
        """Drops the mappings of stores that no longer exist under any name."""
        try:
            live = {
                (e.stat().st_dev, e.inode())
                for e in os.scandir(shm.SHM_DIR)
                if e.name.startswith(self._prefix)
            }
        except OSError:
            return
        with self._lock:
            for key in [k for k in self._maps if k not in live]:
                self._drop(self._maps.pop(key)[0])

    def close(self) -> None:
        with self._lock:
            for store, _ in self._maps.values():
                self._drop(store)
            self._maps.clear()

    def _drop(self, store: Store) -> None:
        self._backend.unpin_store(store)
        try:
            store.mem.close()
        except BufferError:  # a view is alive somewhere: the mapping goes with it
            log.info("sibling_view_alive", segment=store.segment)
