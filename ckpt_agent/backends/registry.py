"""Which backend a worker runs, by kind: a table of kind -> factory. A factory imports its
backend when called, so choosing "cpu" never imports the CUDA code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ckpt_agent.backends.base import Backend
from ckpt_agent.host_store import device_prefix


@dataclass(frozen=True, kw_only=True)
class BackendArgs:
    """What every backend is made from: the worker's node, device index and --host."""

    node_id: str
    device: int
    host: str


def _cpu(a: BackendArgs) -> Backend:
    from ckpt_agent.backends.cpu import CpuBackend

    return CpuBackend(device_prefix(a.node_id, a.device), a.host)


def _cuda(a: BackendArgs) -> Backend:
    from ckpt_agent.backends.cuda import CudaBackend

    return CudaBackend.open(a.device, host=a.host)


BACKENDS: dict[str, Callable[[BackendArgs], Backend]] = {"cpu": _cpu, "cuda": _cuda}


def make_backend(kind: str, *, node_id: str, device: int, host: str) -> Backend:
    """The backend of `kind` for one worker (CUDA: sets its device; see CudaBackend.open)."""
    factory = BACKENDS.get(kind)
    if factory is None:
        raise ValueError(f"no backend of kind {kind!r} (known: {', '.join(sorted(BACKENDS))})")
    return factory(BackendArgs(node_id=node_id, device=device, host=host))
