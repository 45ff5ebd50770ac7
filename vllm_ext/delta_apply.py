"""An engine's side of a delta update: base + delta = target, proven at both ends.

For the delta tensors of a bucket, together (one checksum launch and read-back each way on
a GPU): the engine's current bytes of each tensor (what `base` returns) must carry the
delta's base checksum, or nothing is changed and the update fails (the engine does not
serve the version the delta was taken from). Each delta is then applied in place, into the
engine's own tensor (a scatter of the changed elements), and the results must carry the
target checksums before the loader sees them; a mismatch fails the update with the engine
on a mix, which ckptd restores to what it committed, as after any failed update."""

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


def _flat(meta: tpb.TensorMeta, base: Base | None, device: Any) -> Any:
    cur = base(meta.name) if base is not None else None
    if cur is None:
        raise DeltaRefused(f"tensor {meta.name!r} came as a delta: this engine has no base")
    import torch

    flat = cur.detach().reshape(-1).view(torch.uint8) if cur.is_contiguous() else None
    if flat is None or flat.device != device:  # the loader copies the result in
        flat = cur.detach().contiguous().reshape(-1).view(torch.uint8).to(device, copy=True)
    if flat.numel() != meta.delta.target_nbytes:
        raise DeltaRefused(f"tensor {meta.name!r}: the engine holds {flat.numel()} bytes, "
                           f"the delta is of {meta.delta.target_nbytes}")  # fmt: skip
    return flat


def apply_all(items: list[tuple[tpb.TensorMeta, Any]], base: Base | None) -> list[Any]:
    """items: (meta with TensorMeta.delta, payload) of one bucket. Returns each target's
    bytes (1-D uint8; the engine's own tensor where it is contiguous on the payload's
    device). Raises DeltaRefused."""
    if not items:
        return []
    flats = [_flat(m, base, p.device) for m, p in items]
    bad = checksum.mismatches(
        [(m.name, m.delta.base_checksum, f) for (m, _), f in zip(items, flats, strict=True)]
    )
    if bad:
        m = next(m for m, _ in items if m.name == bad[0])
        raise DeltaRefused(
            f"tensor {m.name!r}: the engine does not hold version {m.delta.base_version} of it "
            f"(its checksum differs; {len(bad)} tensors): a delta from it does not apply"
        )
    for (m, payload), f in zip(items, flats, strict=True):
        d = m.delta
        try:
            delta.apply(f, d.encoding, d.count, payload, nbytes_of(m.dtype, (1,)))
        except delta.DeltaError as e:
            raise DeltaRefused(f"tensor {m.name!r}: {e}") from None
    bad = checksum.mismatches(
        [(m.name, m.delta.target_checksum, f) for (m, _), f in zip(items, flats, strict=True)]
    )
    if bad:
        raise DeltaRefused(
            f"tensor {bad[0]!r}: base + delta is not the target's bytes ({len(bad)} tensors)"
        )
    return flats
