"""The per-tensor checksum: computed once from the host store at push, verified by every
engine on the bytes that arrived (on the GPU on CUDA) before they are loaded.

The bytes are read as little-endian int64 words in rows of ROW words (the tail that fills no
whole row is read as bytes). With r_j the sum of row j and c_k the sum of column k, all in
int64 arithmetic modulo 2^64:

    checksum = mix(nbytes, Σ r_j, Σ (j+1)·r_j, Σ (k+1)·c_k, Σ (i+1)·tail_i)

Two reads of the data in wide reductions (row sums, column sums): cheap next to moving the
bytes, identical on numpy, torch CPU and torch CUDA (integer sums modulo 2^64 do not depend
on the order of the reduction), and sensitive to changed, swapped or shifted words. It is an
integrity check against wrong, stale or overwritten bytes, not a cryptographic MAC.
"""

from __future__ import annotations

from typing import Any

ROW = 128  # int64 words per row
MASK = (1 << 64) - 1
_K = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)


def _mix(nbytes: int, parts: tuple[int, int, int, int]) -> int:
    h = (nbytes * 0xFF51AFD7ED558CCD) & MASK
    for k, p in zip(_K, parts, strict=True):
        h ^= (p * k) & MASK
        h = ((h << 31) | (h >> 33)) & MASK
        h = (h * 0x94D049BB133111EB) & MASK
    return h


def _split(n: int) -> tuple[int, int]:
    """Rows and the byte length they cover."""
    rows = n // (8 * ROW)
    return rows, rows * 8 * ROW


def of_numpy(data: Any) -> int:
    """Checksum of a 1-D uint8 numpy array (or anything np.frombuffer takes)."""
    import numpy as np

    if isinstance(data, np.ndarray):
        b = (
            data
            if data.dtype == np.uint8
            else np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        )
    else:
        b = np.frombuffer(data, dtype=np.uint8)
    rows, body = _split(b.size)
    s1 = s2 = s3 = 0
    if rows:
        w = b[:body].view("<i8").reshape(rows, ROW)
        with np.errstate(over="ignore"):
            r = w.sum(axis=1, dtype=np.int64)
            c = w.sum(axis=0, dtype=np.int64)
            s1 = int(c.sum(dtype=np.int64))
            s2 = int((r * np.arange(1, rows + 1, dtype=np.int64)).sum(dtype=np.int64))
            s3 = int((c * np.arange(1, ROW + 1, dtype=np.int64)).sum(dtype=np.int64))
    tail = b[body:].astype(np.int64)
    s4 = int((tail * np.arange(1, tail.size + 1, dtype=np.int64)).sum())
    return _mix(b.size, (s1 & MASK, s2 & MASK, s3 & MASK, s4 & MASK))


_WEIGHTS: dict[Any, Any] = {}  # device -> 1, 2, 3, ... (int64), grown on demand
_GPU: list[Any] = []  # [module or None] once tried


def _gpu_kernel() -> Any:
    """ckpt_common.checksum_gpu where Triton runs, else None (torch reductions)."""
    if not _GPU:
        try:
            from ckpt_common import checksum_gpu

            _GPU.append(checksum_gpu)
        except Exception:  # no Triton (the CPU install removes it), or it cannot build
            _GPU.append(None)
    return _GPU[0]


def _weights(n: int, device: Any) -> Any:
    import torch

    w = _WEIGHTS.get(device)
    if w is None or w.numel() < n:
        w = torch.arange(1, max(n, 1 << 16) + 1, dtype=torch.int64, device=device)
        _WEIGHTS[device] = w
    return w[:n]


def _aligned(t: Any) -> Any:
    return t if t.storage_offset() % 8 == 0 else t.clone()  # an int64 view needs it


def parts_torch(t: Any) -> Any:
    """The four sums of a 1-D uint8 torch tensor, as an int64 tensor on its device (no
    synchronisation): stack several and read them back at once."""
    import torch

    t = _aligned(t)
    n = t.numel()
    rows, body = _split(n)
    dev = t.device
    gpu = _gpu_kernel() if t.is_cuda else None
    if gpu is not None:
        return gpu.batch_parts([t], ROW, _weights(8 * ROW, dev))[0]
    if rows:
        w = t[:body].view(torch.int64).view(rows, ROW)
        r = w.sum(dim=1)
        c = w.sum(dim=0)
        s1 = c.sum()
        s2 = (r * _weights(rows, dev)).sum()
        s3 = (c * _weights(ROW, dev)).sum()
    else:
        s1 = s2 = s3 = torch.zeros((), dtype=torch.int64, device=dev)
    tail = t[body:].to(torch.int64)
    s4 = (tail * _weights(tail.numel(), dev)).sum()
    return torch.stack([s1, s2, s3, s4])


def finish(nbytes: int, parts: list[int]) -> int:
    """The checksum from parts_torch's four sums (as Python ints)."""
    a, b, c, d = (p & MASK for p in parts)
    return _mix(nbytes, (a, b, c, d))


def of_torch(t: Any) -> int:
    """Checksum of a 1-D uint8 torch tensor (synchronises)."""
    return finish(t.numel(), [int(x) for x in parts_torch(t).tolist()])


def launch_parts(ts: list[Any]) -> Any:
    """The four sums of each 1-D uint8 tensor (all on one CUDA device) as an int64 [n, 4]
    tensor there, queued on the current stream: one kernel launch for all where Triton runs,
    no read-back (`finish_many` reads them)."""
    import torch

    if not ts:
        return torch.zeros((0, 4), dtype=torch.int64)
    ts = [_aligned(t) for t in ts]
    gpu = _gpu_kernel()
    if gpu is not None:
        return gpu.batch_parts(ts, ROW, _weights(8 * ROW, ts[0].device))
    return torch.stack([parts_torch(t) for t in ts])


def finish_many(nbytes: list[int], parts: Any) -> list[int]:
    """The checksums from launch_parts' sums (one read-back)."""
    return [finish(n, p) for n, p in zip(nbytes, parts.tolist(), strict=True)]


def mismatches(items: list[tuple[str, int, Any]]) -> list[str]:
    """Names whose bytes do not match: items are (name, expected checksum, 1-D uint8 torch
    tensor). On a GPU the sums are computed there and read back once for all items."""
    if not items:
        return []
    if items[0][2].device.type == "cpu":
        got = [of_numpy(t.numpy()) for _, _, t in items]
    else:
        ts = [t for _, _, t in items]
        got = finish_many([t.numel() for t in ts], launch_parts(ts))
    return [name for (name, want, _), g in zip(items, got, strict=True) if g != want]
