"""A sharded trainer's part of a version: what this rank holds of each tensor.

A DTensor (FSDP2, tensor parallel) contributes its local shard as a piece (its box in the
whole tensor, ckpt_common.pieces) from the ranks that hold it first: where the shard is
replicated over a mesh dimension, only the rank at coordinate 0 of that dimension pushes it,
and an empty shard (uneven sharding) is not pushed. Partial (unreduced) values are reduced
first. A plain tensor is taken as replicated: group rank 0 pushes it whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from ckpt_client.direct_push import Item
from ckpt_common.pieces import Piece
from ckpt_trainer.publisher import cast_to, renamed

SHARE_BYTES = 8192  # what rank 0 tells the others of the outcome, as JSON


def local_items(
    state: Mapping[str, Any],
    rename: Callable[[str], str | None],
    cast: Any,
    group: Any = None,
) -> list[Item]:
    import torch.distributed as dist

    rank = dist.get_rank(group)
    out: list[Item] = []
    for name, t in renamed(state, rename):
        item = _item(name, t.detach(), rank)
        if item is not None:
            out.append(item._replace(tensor=cast_to(item.tensor, cast)))
    return out


def _item(name: str, t: Any, rank: int) -> Item | None:
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return Item(name, t, tuple(t.shape)) if rank == 0 else None
    if any(p.is_partial() for p in t.placements):
        t = t.redistribute(placements=[Replicate() if p.is_partial() else p for p in t.placements])
    mesh = t.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:  # this rank is not in the tensor's mesh
        return None
    if any(isinstance(p, Replicate) and c != 0 for p, c in zip(t.placements, coord, strict=True)):
        return None
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    local = t.to_local()
    if tuple(local.shape) != tuple(shape):
        raise ValueError(f"{name}: local shard {list(local.shape)}, expected {list(shape)}")
    if local.numel() == 0 and t.numel() != 0:
        return None
    return Item(name, local, tuple(t.shape), Piece(tuple(offset), tuple(shape)))


def share(outcome: dict | None, group: Any = None) -> dict:
    """Rank 0's outcome (a JSON-able dict) on every rank of the group, as bytes (no pickle)."""
    import torch
    import torch.distributed as dist

    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = f"cuda:{torch.cuda.current_device()}"
    buf = torch.zeros(SHARE_BYTES, dtype=torch.uint8, device=device)
    if dist.get_rank(group) == 0:
        data = json.dumps(outcome).encode()[:SHARE_BYTES]
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    src = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast(buf, src=src, group=group)
    raw = bytes(buf.cpu().numpy()).rstrip(b"\0")
    return json.loads(raw)
