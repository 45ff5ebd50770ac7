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
from ckpt_agent.backend import Backend, Collective, Done, InFlight
from ckpt_agent.p2p import P2PEngine, P2PError
from ckpt_agent.pipeline import UpdateFailed
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
    """Before each bucket's agreement the reader issues the bucket's queued reads; a failed
    read is this rank's failure flag, so no rank broadcasts (or hands its engine) bytes that
    did not arrive. Host-synchronous: every step is done when it returns."""

    def __init__(self, inner: Collective, backend: P2PReadBackend) -> None:
        self._inner = inner
        self._backend = backend

    def broadcast(self, tensor: Any, root: int) -> None:
        self._inner.broadcast(tensor, root)

    def agree(self, flag: int) -> int:
        return self._inner.agree(flag)

    def step(
        self,
        flag: int,
        tensor: Any,
        root: int,
        *,
        after: Any = None,
        side_copy: tuple[Any, Any] | None = None,
    ) -> InFlight:
        problem = self._backend.flush()
        worst = self._inner.agree(1 if (flag or problem) else 0)
        if worst:
            if problem:
                raise UpdateFailed(problem)
            return Done(worst)
        self._inner.broadcast(tensor, root)
        self._backend.sync()
        return Done(0)

    def bind(self, abort: Any, op_s: float) -> None:
        bind = getattr(self._inner, "bind", None)
        if bind is not None:
            bind(abort, op_s)

    def close(self) -> None:
        self._inner.close()


class P2PReadBackend:
    """The staged backend interface over one-sided reads: a reader's "H2D" of a bucket
    queues the reads of its ranges (remote host memory -> this rank's hand-off slot), issued
    in one batch right before the bucket's agreement; there is no staging."""

    def __init__(self, inner: Backend, engine: P2PEngine, sources: list[apb.P2PSource]) -> None:
        self.kind = inner.kind
        self._inner = inner
        self._engine = engine
        self._sources = list(sources)
        self._queue: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def store_tensor(self, store: Any) -> Any:
        return store if isinstance(store, _RemoteStore) else self._inner.store_tensor(store)

    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        return nbuf, 0

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, Any]:
        name, buf = self._inner.ipc_buffer(nbytes)
        self._engine.register(buf.data_ptr(), buf.numel() * buf.element_size())
        return name, buf

    def device_buffer(self, nbytes: int) -> Any:
        raise NotImplementedError("P2P reads need no staging")

    def h2d(self, dst: Any, src: Any, ranges: list[tuple[int, int, int]], after: list[Any]) -> Any:
        for d, o, n in ranges:
            self._read(dst[d : d + n], src[o : o + n])
        return None, None

    def _read(self, dst: Any, src: Any) -> None:
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

    def end_update(self, shared_never_opened: bool = False) -> None:
        self._queue.clear()
        fn = getattr(self._inner, "end_update", None)
        if fn is not None:
            fn(shared_never_opened)

    def new_group(
        self, store: Any, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective:
        return _AgreeingCollective(self._inner.new_group(store, rank, world, timeout_s), self)

    def sync(self) -> None:
        self._inner.sync()

    def close(self) -> None:
        self._queue.clear()
