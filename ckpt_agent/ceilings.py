"""What a device can do, measured once by its worker at start and reported with the device
(ckpt.v1.Device.ceilings): ckptd exports each phase's achieved rate against it.

- "copy": host memory to the device the update stages in (pinned H2D on CUDA: the host
  store is page-locked the same way; memcpy on CPU), the best of a few copies."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("ckpt_agent")
CUDA_BYTES = 256 << 20
CPU_BYTES = 16 << 20  # CPU hosts touch new memory slowly: small, still past the caches
TRIES = 3


def _best(copy: Callable[[], object], nbytes: int) -> float:
    best = 0.0
    for _ in range(TRIES):
        t = time.perf_counter()
        copy()
        best = max(best, nbytes / max(1e-9, time.perf_counter() - t))
    return best


def _cpu(nbytes: int) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    return _best(lambda: dst.copy_(src), nbytes)


def _cuda(device: torch.device, nbytes: int) -> float:
    import torch

    from ckpt_agent.backends.cuda import cudart as runtime

    host = torch.ones(nbytes, dtype=torch.uint8)
    cudart = runtime()
    err = cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister: {err}")
    dst: torch.Tensor | None = None
    try:
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device)

        def copy() -> None:
            with torch.cuda.stream(stream):
                if dst is not None:  # the closure reads the variable `finally` clears
                    dst.copy_(host, non_blocking=True)
            stream.synchronize()

        copy()  # warm-up: the first copy maps the pages
        return _best(copy, nbytes)
    finally:
        cudart.cudaHostUnregister(host.data_ptr())
        dst = None
        torch.cuda.empty_cache()  # the device buffer goes back, not to torch's cache


def measure(kind: str, device: torch.device) -> dict[str, float]:
    """Bytes/s per phase of a worker's backend (its kind and torch device); empty when the
    measurement failed (the worker serves anyway)."""
    try:
        rate = _cuda(device, CUDA_BYTES) if kind == "cuda" else _cpu(CPU_BYTES)
    except Exception as e:
        log.warning("ceiling_not_measured", kind=kind, error=str(e))
        return {}
    log.info("ceiling_measured", phase="copy", gbps=round(rate / 1e9, 2))
    return {"copy": rate}
