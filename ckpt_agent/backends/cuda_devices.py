"""GPU discovery through NVML (or nvidia-smi), not torch, so the agent process never creates
a CUDA context; workers pick their GPU by UUID."""

from __future__ import annotations

import os
import subprocess

from ckpt.v1 import types_pb2 as tpb


def norm_uuid(u: str) -> str:
    u = u.strip()
    return u[4:] if u.startswith("GPU-") else u


def _visible(devs: list[tuple[int, str, int, int]]) -> list[tuple[int, str, int, int]]:
    """Applies CUDA_VISIBLE_DEVICES (indices or UUIDs) to NVML's list, in CUDA's order."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is None:
        return devs
    out = []
    for item in (x.strip() for x in cvd.split(",") if x.strip()):
        if item.isdigit():
            hit = [d for d in devs if d[0] == int(item)]
        else:
            hit = [d for d in devs if norm_uuid(d[1]).startswith(norm_uuid(item))]
        if not hit:
            break  # CUDA stops at the first invalid entry
        out.append(hit[0])
    return out


def _nvml_query() -> list[tuple[int, str, int, int]]:
    """(physical index, uuid, total bytes, free bytes) per GPU."""
    try:
        import pynvml  # pyright: ignore[reportMissingImports]  (optional: nvidia-ml-py)

        pynvml.nvmlInit()
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append((i, norm_uuid(uuid), int(mem.total), int(mem.free)))
        return out
    except ImportError:
        pass
    r = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,uuid,memory.total,memory.free",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    out = []
    for line in r.stdout.strip().splitlines():
        i, uuid, total, free = (x.strip() for x in line.split(","))
        out.append((int(i), norm_uuid(uuid), int(total) << 20, int(free) << 20))
    return out


def list_devices() -> list[tpb.Device]:
    """The GPUs this process may use, indexed as CUDA will index them in our workers."""
    return [
        tpb.Device(index=i, kind="cuda", uuid=uuid, total_bytes=total, free_bytes=free)
        for i, (_, uuid, total, free) in enumerate(_visible(_nvml_query()))
    ]


def free_bytes(index: int) -> int:
    devs = _visible(_nvml_query())
    return devs[index % len(devs)][3] if devs and index >= 0 else 0


def cuda_index_of(uuid: str) -> int:
    import torch

    want = norm_uuid(uuid)
    for i in range(torch.cuda.device_count()):
        if norm_uuid(str(torch.cuda.get_device_properties(i).uuid)) == want:
            return i
    raise LookupError(f"GPU {uuid} is not visible to this worker")
