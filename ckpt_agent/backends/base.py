"""The interfaces behind the update pipeline: a device `Backend` (host store views, the engine
hand-off buffer, the copy into it) and the `Collective` group it makes for an update. Every
method the pipeline, the worker and the sibling stores call is declared here; capabilities
only some backends have (pinning a store, binding an abort, marking a group failed) are real
methods with no-op defaults, so nothing probes with hasattr.

Imports no torch at run time: tensors and events are named for the type checker only."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from ckpt_agent.host_store import Store

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    from ckpt_agent.group_abort import Abort

    Tensor = torch.Tensor
    Event = torch.cuda.Event
    GroupStore = dist.Store

RENDEZVOUS_S = 10.0  # every rank of a group connects within this (they start together)


class Copy(NamedTuple):
    """One copy of a bucket's H2D: `rows` runs of `run` bytes from the store (each `stride`
    bytes after the previous) into the bucket at `dst`, packed back to back."""

    dst: int
    src: int
    run: int
    rows: int = 1
    stride: int = 0
    source: int = 0  # reading backends (P2P): which source's store `src` is in

    @property
    def nbytes(self) -> int:
        return self.rows * self.run


def strided(t: Tensor, c: Copy) -> Tensor:
    """The copy's source bytes in a 1-D uint8 tensor, as a (rows, run) view."""
    if c.rows <= 1:
        return t[c.src : c.src + c.run].view(1, c.run)
    if c.src < 0 or c.src + (c.rows - 1) * c.stride + c.run > t.numel():
        raise ValueError("a strided copy reaches beyond its store")
    return t[c.src :].as_strided((c.rows, c.run), (c.stride, 1))


def copy_into(dst: Tensor, src: Tensor, c: Copy, non_blocking: bool = False) -> None:
    """dst[c.dst : c.dst + c.nbytes] = the copy's bytes of src (both 1-D uint8)."""
    dst[c.dst : c.dst + c.nbytes].view(c.rows, c.run).copy_(strided(src, c), non_blocking)


class InFlight(Protocol):
    """One bucket's agreement + broadcast. wait() returns the agreed flag once delivered;
    t_start/t_end time the broadcast on a device stream (None where it is synchronous)."""

    @property
    def events(self) -> list[Event]: ...
    @property
    def t_start(self) -> Event | None: ...
    @property
    def t_end(self) -> Event | None: ...

    def wait(self, deadline: float, abort: Abort | None = None) -> int: ...


@dataclass
class Done:
    """A step that completed synchronously."""

    flag: int
    events: list[Event] = field(default_factory=list)
    t_start: Event | None = None
    t_end: Event | None = None

    def wait(self, deadline: float, abort: Abort | None = None) -> int:
        return self.flag


class Collective(ABC):
    """An update's group: agreement on a failure flag and the broadcast of buckets."""

    @abstractmethod
    def broadcast(self, tensor: Tensor, root: int) -> None: ...

    @abstractmethod
    def agree(self, flag: int) -> int:
        """All-reduce MAX of a small int over the group: everyone learns the worst."""

    @abstractmethod
    def step(
        self,
        flag: int,
        tensor: Tensor,
        root: int,
        *,
        after: Event | None = None,
        side_copy: tuple[Tensor, Tensor] | None = None,
    ) -> InFlight:
        """agree(flag), then broadcast(tensor, root) unless someone failed; asynchronous on
        devices with streams. `after`: an event the broadcast waits for (the root's H2D);
        side_copy=(dst, src): the root's own copy into its engine's slot."""

    @abstractmethod
    def close(self) -> None: ...

    def bind(self, abort: Abort, op_s: float) -> None:
        """Gives the group the update's abort and the deadline of its next operations, where
        it takes them (gloo; NCCL steps are bounded by the waits on their events)."""
        return None

    def mark_failed(self) -> None:
        """An operation of this group failed or never finished: do not reuse it."""
        return None


class Backend(ABC):
    """One device's side of an update: views of its host stores, the hand-off buffer the
    engine maps, staging, the copy (H2D) of a bucket, and the group of an update."""

    kind: str  # "cpu" or "cuda": what the engine maps, whether steps are synchronous
    pins_stores = False  # whether pin_store does anything (CUDA: page-locks host stores)

    @abstractmethod
    def store_tensor(self, store: Store) -> Tensor:
        """The store's bytes as a 1-D uint8 tensor the backend copies from."""

    @abstractmethod
    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        """(hand-off slots, owner staging slots); staging 0 = copy straight into the slot."""

    @abstractmethod
    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, Tensor]:
        """The engine's hand-off buffer: (the name the engine maps it by, the tensor)."""

    @abstractmethod
    def device_buffer(self, nbytes: int) -> Tensor:
        """A staging buffer on the device, released at the update's end."""

    @abstractmethod
    def h2d(
        self, dst: Tensor, src: Tensor | None, copies: list[Copy], after: list[Event]
    ) -> tuple[Event | None, Event | None]:
        """Copies each Copy of src into dst; returns (done, start) events (None on CPU,
        where it is synchronous). src None: the backend reads its own sources (P2P)."""

    @abstractmethod
    def new_group(
        self, store: GroupStore, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective: ...

    @abstractmethod
    def close(self) -> None: ...

    def end_update(self, shared_never_opened: bool = False) -> None:
        """An update is over: release what it allocated (its buffers)."""
        return None

    def sync(self) -> None:
        """Waits until the collective's work issued so far is done (CUDA: its stream)."""
        return None

    def pin_store(self, store: Store) -> float:
        """Page-locks a host store so copies from it run at DMA speed; the seconds it took."""
        return 0.0

    def unpin_store(self, store: Store) -> None:
        """Undoes pin_store; called before the store's memory goes."""
        return None

    def torch_device(self) -> torch.device:
        """The torch device the backend stages on (its copy rate is measured there)."""
        import torch

        return torch.device("cpu")


def need_src(src: Tensor | None) -> Tensor:
    """The store an H2D reads, which a device backend cannot do without."""
    if src is None:
        raise ValueError("this backend copies from a host store and was given none")
    return src


def drain(steps: Iterable[InFlight], coll: Collective, deadline: float) -> None:
    """Lets collectives already issued finish (by `deadline`, monotonic) before their
    buffers go; a group whose collectives never finish (a peer died) is marked failed."""
    for st in steps:
        try:
            st.wait(deadline)
        except Exception:
            coll.mark_failed()
            return
