"""P2P reads behind the pipeline's Backend interface, so the broadcast pipeline runs a join
unchanged: a bucket's "owner" is a reader in the receiving group, its "store" is remote.

Reads a bucket needs are queued by `copy` and issued in one batch right before the bucket's
broadcast; then every rank agrees whether all reads succeeded, so no rank ever broadcasts
(or hands its engine) bytes that did not arrive.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.backend import Backend, Collective
from ckpt_agent.p2p import P2PEngine, P2PError
from ckpt_agent.pipeline import PEER_FAILED, UpdateFailed
from ckpt_common.p2p import decode

# Fault injection for tests: "p2p_delay:<seconds>" slows every bucket's reads, so a test
# can kill or freeze an owner while a join is surely under way.
_FAULT = os.environ.get("CKPT_FAULT", "")
_DELAY_S = float(_FAULT.split(":", 1)[1]) if _FAULT.startswith("p2p_delay:") else 0.0


@dataclass(frozen=True)
class _RemoteSlice:
    source: int
    offset: int
    nbytes: int


class _RemoteStore:
    """Stands in for a host store tensor: slicing it names remote bytes."""

    def __getitem__(self, s: slice) -> _RemoteSlice:
        start, stop = s.start or 0, s.stop
        source, offset = decode(start)
        return _RemoteSlice(source, offset, stop - start)


class RemoteStores:
    def get(self, checkpoint: str, version: int) -> Any:
        return _RemoteStore()


class _AgreeingCollective:
    def __init__(self, inner: Collective, backend: P2PReadBackend) -> None:
        self._inner = inner
        self._backend = backend

    def broadcast(self, tensor: Any, root: int) -> None:
        problem = self._backend.flush()
        if self._inner.agree(1 if problem else 0):
            raise UpdateFailed(problem or f"{PEER_FAILED}: a P2P read failed")
        self._inner.broadcast(tensor, root)

    def agree(self, flag: int) -> int:
        return self._inner.agree(flag)

    def bind(self, abort: Any, op_s: float) -> None:
        bind = getattr(self._inner, "bind", None)
        if bind is not None:
            bind(abort, op_s)

    def close(self) -> None:
        self._inner.close()


class P2PReadBackend:
    def __init__(self, inner: Backend, engine: P2PEngine, sources: list[apb.P2PSource]) -> None:
        self.kind = inner.kind
        self._inner = inner
        self._engine = engine
        self._sources = list(sources)
        self._queue: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def store_tensor(self, store: Any) -> Any:
        return store if isinstance(store, _RemoteStore) else self._inner.store_tensor(store)

    def ipc_buffer(self, nbytes: int) -> tuple[str, Any]:
        name, buf = self._inner.ipc_buffer(nbytes)
        self._engine.register(buf.data_ptr(), buf.numel() * buf.element_size())
        return name, buf

    def copy(self, dst: Any, src: Any) -> None:
        if not isinstance(src, _RemoteSlice):
            self._inner.copy(dst, src)
            return
        if src.source >= len(self._sources):
            raise P2PError(f"no P2P source {src.source}")
        loc, rem, lens = self._queue.setdefault(src.source, ([], [], []))
        loc.append(dst.data_ptr())
        rem.append(self._sources[src.source].addr + src.offset)
        lens.append(src.nbytes)

    def flush(self) -> str:
        """Issues the queued reads; returns why they failed, or ""."""
        queue, self._queue = self._queue, {}
        if queue and _DELAY_S:
            time.sleep(_DELAY_S)
        try:
            for idx, (loc, rem, lens) in queue.items():
                self._engine.read(self._sources[idx].session, loc, rem, lens)
        except P2PError as e:
            return str(e)
        return ""

    def new_group(self, store: Any, rank: int, world: int, timeout_s: float) -> Collective:
        return _AgreeingCollective(self._inner.new_group(store, rank, world, timeout_s), self)

    def sync(self) -> None:
        self._inner.sync()

    def close(self) -> None:
        self._queue.clear()
