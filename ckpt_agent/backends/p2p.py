"""P2P reads behind the pipeline's Backend interface, so the broadcast pipeline runs a join
(and each class of a shard-aware update) unchanged: a bucket's "owner" is a reader in the
receiving group, its "store" another rank's. A source on the reader's own node is read from
its shared segment directly; any other through the transfer engine (Mooncake).

Reads a bucket needs are queued by `h2d` and issued in one batch right before the bucket's
broadcast; then every rank agrees whether all reads succeeded, so no rank ever broadcasts
(or hands its engine) bytes that did not arrive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.backends.base import Backend, Collective, Copy, Done, InFlight
from ckpt_agent.group_abort import UpdateFailed
from ckpt_agent.host_store import Store
from ckpt_agent.p2p import P2PEngine, P2PError
from ckpt_agent.siblings import SiblingError, SiblingStores

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from ckpt_agent.group_abort import Abort


class _AgreeingCollective(Collective):
    """Before each bucket's agreement the reader issues the bucket's queued reads; a failed
    read is this rank's failure flag, so no rank broadcasts (or hands its engine) bytes that
    did not arrive. Host-synchronous: every step is done when it returns."""

    def __init__(self, inner: Collective, backend: P2PReadBackend) -> None:
        self._inner = inner
        self._backend = backend

    def broadcast(self, tensor: torch.Tensor, root: int) -> None:
        self._inner.broadcast(tensor, root)

    def agree(self, flag: int) -> int:
        return self._inner.agree(flag)

    def step(
        self,
        flag: int,
        tensor: torch.Tensor,
        root: int,
        *,
        after: torch.cuda.Event | None = None,
        side_copy: tuple[torch.Tensor, torch.Tensor] | None = None,
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

    def bind(self, abort: Abort, op_s: float) -> None:
        self._inner.bind(abort, op_s)

    def mark_failed(self) -> None:
        """A failed P2P update's group is not reused either (a cached NCCL communicator
        that may hold a half-done collective is evicted)."""
        self._inner.mark_failed()

    # mark_failed stays the default no-op: the pipeline never marked the wrapped group
    # (before the typed interface it probed this wrapper for `healthy`, which it lacks)

    def close(self) -> None:
        self._inner.close()


class P2PReadBackend(Backend):
    """The staged backend interface over reads of other ranks' stores: a reader's "H2D" of
    a bucket copies from same-node sources at once and queues the remote reads (one per
    run), issued in one batch right before the bucket's agreement; there is no staging.
    Its copies name their sources (Copy.source), not this rank's store: the
    pipeline hands it no store (`h2d`'s src is None)."""

    def __init__(
        self,
        inner: Backend,
        engine: P2PEngine | None,
        sources: list[apb.P2PSource],
        siblings: SiblingStores | None = None,
    ) -> None:
        """siblings: this node's stores, this rank's own included (ckpt_agent.siblings)."""
        self.kind = inner.kind
        self._inner = inner
        self._engine = engine
        self._sources = list(sources)
        self._siblings = siblings
        self._local: dict[int, torch.Tensor] = {}  # source -> its store (1-D uint8)
        self._queue: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def store_tensor(self, store: Store) -> torch.Tensor:
        raise NotImplementedError("P2P reads copy from other ranks' stores, never this one's")

    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        return nbuf, 0

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, torch.Tensor]:
        name, buf = self._inner.ipc_buffer(nbytes)
        if self._engine is not None:
            self._engine.register(buf.data_ptr(), buf.numel() * buf.element_size())
        return name, buf

    def device_buffer(self, nbytes: int) -> torch.Tensor:
        raise NotImplementedError("P2P reads need no staging")

    def h2d(
        self,
        dst: torch.Tensor,
        src: torch.Tensor | None,
        copies: list[Copy],
        after: list[torch.cuda.Event],
    ) -> tuple[None, None]:
        local = []
        for c in copies:
            source = c.source
            if not 0 <= source < len(self._sources):
                raise P2PError(f"no P2P source {source}")
            if self._sources[source].local_segment:
                local.append((source, c))
            else:
                self._queue_reads(dst, source, c)
        for source, c in local:
            done, _ = self._inner.h2d(dst, self._mapped(source), [c], [])
            if done is not None:  # CUDA: the broadcast comes next, on another stream
                done.synchronize()
        return None, None

    def _mapped(self, source: int) -> torch.Tensor:
        """A same-node source's store (only this node's store segments can be named)."""
        got = self._local.get(source)
        if got is None:
            name = self._sources[source].local_segment
            if self._siblings is None:
                raise P2PError(f"source {source}: no access to this node's stores")
            else:
                try:
                    got = self._siblings.get(name)
                except SiblingError as e:
                    raise P2PError(f"source {source}: {e}") from None
            self._local[source] = got
        return got

    def _queue_reads(self, dst: torch.Tensor, source: int, c: Copy) -> None:
        if self._engine is None:
            raise P2PError(f"source {source} is on another node and P2P is off here")
        loc, rem, lens = self._queue.setdefault(source, ([], [], []))
        base, addr = dst.data_ptr() + c.dst, self._sources[source].addr + c.src
        for r in range(c.rows):
            loc.append(base + r * c.run)
            rem.append(addr + r * c.stride)
            lens.append(c.run)

    def flush(self) -> str:
        """Issues the queued reads; returns why they failed, or ""."""
        queue, self._queue = self._queue, {}
        try:
            for idx, (loc, rem, lens) in queue.items():
                assert self._engine is not None
                self._engine.read(self._sources[idx].session, loc, rem, lens)
        except P2PError as e:
            return str(e)
        return ""

    def end_update(self, shared_never_opened: bool = False) -> None:
        self._queue.clear()
        self._local.clear()
        self._inner.end_update(shared_never_opened)

    def new_group(
        self, store: dist.Store, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective:
        return _AgreeingCollective(self._inner.new_group(store, rank, world, timeout_s), self)

    def sync(self) -> None:
        self._inner.sync()

    def close(self) -> None:
        self._queue.clear()
        self._local.clear()
