"""CUDA IPC of one device buffer, encoded as plain data (never pickle).

The exporting process shares a uint8 CUDA tensor through torch's own IPC machinery
(`UntypedStorage._share_cuda_`, what torch.multiprocessing uses) and sends the fields as a
base64 JSON string. The importing process finds the exporting GPU by UUID, not by index, so
the two processes may see different CUDA_VISIBLE_DEVICES.

    name = "cuda:" + encode(tensor)           # in the agent worker
    t, handle = open_handle(name[5:], None)   # in the engine; handle.close() unmaps
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

VERSION = 1


def device_uuid(index: int) -> str:
    import torch

    return str(torch.cuda.get_device_properties(index).uuid)


def local_index(uuid: str) -> int:
    """The index, in this process, of the GPU with this UUID."""
    import torch

    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise LookupError(f"GPU {uuid} is not visible in this process")


def _b(x: bytes) -> str:
    return base64.b64encode(x).decode()


def encode(tensor: torch.Tensor) -> str:
    """The IPC handle of the storage under a contiguous uint8 CUDA tensor."""
    if not tensor.is_cuda or tensor.storage_offset() != 0:
        raise ValueError("only a whole CUDA storage can be shared")
    st = tensor.untyped_storage()
    (dev, handle, size, offset, ref_handle, ref_offset, event, event_sync) = st._share_cuda_()
    doc = {
        "v": VERSION,
        "uuid": device_uuid(dev),
        "handle": _b(handle),
        "size": int(size),
        "offset": int(offset),
        "ref_handle": _b(ref_handle),
        "ref_offset": int(ref_offset),
        "event": _b(event) if event else "",
        "event_sync": bool(event_sync),
        "nbytes": int(tensor.numel()),
    }
    return base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode()


def decode(encoded: str) -> dict[str, Any]:
    doc = json.loads(base64.urlsafe_b64decode(encoded.encode()))
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ValueError("not a ckptd CUDA IPC handle of a known version")
    return doc


class Mapping:
    """Holds the imported storage; close() drops it (torch unmaps once nothing refers to it)."""

    def __init__(self, storage: torch.UntypedStorage | None, device: int) -> None:
        self.storage = storage
        self.device = device

    def close(self) -> None:
        import torch

        if self.storage is None:
            return
        self.storage = None
        with torch.cuda.device(self.device):
            torch.cuda.synchronize()
            torch.cuda.ipc_collect()


def open_handle(
    encoded: str, device: torch.device | str | int | None = None
) -> tuple[torch.Tensor, Mapping]:
    """Maps the buffer. `device` is ignored except as a check: the UUID decides."""
    import torch

    doc = decode(encoded)
    idx = local_index(doc["uuid"])
    if device is not None:
        want = torch.device(device)
        if want.type == "cuda" and want.index is not None and want.index != idx:
            raise ValueError(
                f"buffer lives on GPU {doc['uuid']} (local index {idx}), not on {want}"
            )
    d = base64.b64decode
    with torch.cuda.device(idx):
        storage = torch.UntypedStorage._new_shared_cuda(
            idx,
            d(doc["handle"]),
            doc["size"],
            doc["offset"],
            d(doc["ref_handle"]),
            doc["ref_offset"],
            d(doc["event"]) if doc["event"] else b"",
            doc["event_sync"],
        )
        t = torch.empty((0,), dtype=torch.uint8, device=torch.device("cuda", idx))
        t.set_(storage, 0, (doc["nbytes"],), (1,))
    return t, Mapping(storage, idx)
