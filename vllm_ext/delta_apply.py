"""An engine's side of a delta update: base + delta = target, proven at both ends.

The engine's current bytes of a tensor (what `base` returns) must carry the delta's base
checksum: the engine provably serves the version the delta was taken from. The result must
carry the target's checksum before the loader sees it. Either failing fails the update
before this tensor reaches the engine's weights (ckptd then restores what the engine
committed)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common import checksum, delta
from ckpt_common.dtypes import nbytes_of

# the engine's current tensor of a checkpoint name, in checkpoint format, or None
Base = Callable[[str], Any]


class DeltaRefused(Exception):
    pass


def applied(meta: tpb.TensorMeta, payload: Any, base: Base | None) -> Any:
    """The target's bytes (a new 1-D uint8 tensor on the payload's device)."""
    d = meta.delta
    cur = base(meta.name) if base is not None else None
    if cur is None:
        raise DeltaRefused(f"tensor {meta.name!r} came as a delta: this engine has no base")
    flat = cur.detach().contiguous().reshape(-1).view(_uint8()).to(payload.device)
    if flat.numel() != d.target_nbytes:
        raise DeltaRefused(f"tensor {meta.name!r}: the engine holds {flat.numel()} bytes, "
                           f"the delta is of {d.target_nbytes}")  # fmt: skip
    if checksum.of_torch(flat) != d.base_checksum:
        raise DeltaRefused(
            f"tensor {meta.name!r}: the engine does not hold version {d.base_version} of it "
            "(its checksum differs): a delta from it does not apply"
        )
    out = flat.clone()
    try:
        delta.apply(out, d.encoding, d.count, payload, nbytes_of(meta.dtype, (1,)))
    except delta.DeltaError as e:
        raise DeltaRefused(f"tensor {meta.name!r}: {e}") from None
    if checksum.of_torch(out) != d.target_checksum:
        raise DeltaRefused(f"tensor {meta.name!r}: base + delta is not the target's bytes")
    return out


def _uint8() -> Any:
    import torch

    return torch.uint8
