"""Strided host-to-device copies as one 2-D DMA (cudaMemcpy2DAsync): a kept part of a
row-parallel weight is one run per row, and torch would first gather the rows on the host
(a synchronous copy through pageable memory). The CUDA runtime torch already loaded is used
through ctypes; where it cannot be found, torch's copy does the same work more slowly."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ckpt_agent.backends.base import Copy, strided

if TYPE_CHECKING:
    import torch

log = structlog.get_logger("ckpt_agent.cuda_memcpy")
MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: direction from the pointers (unified addressing)


@functools.cache
def _cudart() -> Callable[..., int] | None:
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart.so" in line}
    except OSError:
        paths = set()
    for p in sorted(paths):
        try:
            lib = ctypes.CDLL(p)
            fn = lib.cudaMemcpy2DAsync
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                       ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]  # fmt: skip
        return fn
    log.info("cudart_not_found", fallback="torch copy of a gathered view")
    return None


def memcpy_2d(dst: torch.Tensor, src: torch.Tensor, c: Copy, stream: torch.cuda.Stream) -> None:
    """dst[c.dst : c.dst + c.nbytes] (device) = c's rows of src (pinned host), on stream."""
    view = strided(src, c)  # checks the copy stays inside src
    fn = _cudart()
    if fn is None:
        with stream_of(stream):
            dst[c.dst : c.dst + c.nbytes].view(c.rows, c.run).copy_(view, non_blocking=True)
        return
    err = fn(dst.data_ptr() + c.dst, c.run, view.data_ptr(), c.stride, c.run, c.rows,
             MEMCPY_DEFAULT, stream.cuda_stream)  # fmt: skip
    if err:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with error {err}")


def stream_of(stream: torch.cuda.Stream) -> torch.cuda.StreamContext:
    import torch

    return torch.cuda.stream(stream)
