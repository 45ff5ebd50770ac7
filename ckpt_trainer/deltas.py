"""The trainer's side of delta pushes: what it published last, kept where its tensors are,
and the delta from it to the next version, computed there (its GPU for GPU tensors).

Memory: one copy of the served weights (the last version published) on the trainer's
device, plus each step's payloads (a few % of the weights at RL learning rates)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_common import delta
from ckpt_common.dtypes import dtype_name


@dataclass(frozen=True, slots=True)
class DeltaItem:
    """One tensor of a delta push: its payload (a 1-D uint8 tensor on the trainer's
    device) and what the engines check it against."""

    name: str
    dtype: Any  # torch dtype
    shape: tuple[int, ...]
    encoded: delta.Encoded
    target_checksum: int
    target_nbytes: int

    @property
    def payload(self) -> Any:
        return self.encoded.payload

    def meta(self, base: int) -> tpb.TensorMeta:
        m = tpb.TensorMeta(name=self.name, dtype=dtype_name(self.dtype), shape=list(self.shape))
        m.nbytes = self.encoded.payload.numel()
        m.delta.CopyFrom(
            tpb.DeltaMeta(
                base_version=base, encoding=int(self.encoded.encoding), count=self.encoded.count,
                target_checksum=self.target_checksum, target_nbytes=self.target_nbytes,
            )
        )  # fmt: skip
        return m


class DeltaTracker:
    """The last version published (its number and a copy of its tensors)."""

    def __init__(self) -> None:
        self.version = 0
        self._last: dict[str, Any] = {}  # name -> its bytes (1-D uint8), as published
        self._dtypes: dict[str, tuple[Any, tuple[int, ...]]] = {}

    def deltas(self, tensors: Mapping[str, Any]) -> list[DeltaItem] | None:
        """The delta from the last version to `tensors`, or None when there is no last
        version or the tensors differ from it in names, dtypes or shapes."""
        from ckpt_client.direct_push import item_checksums

        if not self.version or set(tensors) != set(self._last):
            return None
        if any(self._dtypes[n] != (t.dtype, tuple(t.shape)) for n, t in tensors.items()):
            return None
        flats = {}
        for n, t in tensors.items():
            prev = self._last[n]
            nbytes = t.numel() * t.element_size()
            if prev.numel() != nbytes or prev.device != t.device or t.element_size() > 8:
                return None
            flats[n] = t.detach().contiguous().reshape(-1).view(_uint8())
        names = list(flats)
        sums = item_checksums([flats[n] for n in names])
        out = []
        for n, c in zip(names, sums, strict=True):
            t, flat = tensors[n], flats[n]
            enc = delta.encode(self._last[n], flat, t.element_size())
            out.append(DeltaItem(n, t.dtype, tuple(t.shape), enc, c, flat.numel()))
        return out

    def remember(self, version: int, tensors: Mapping[str, Any]) -> None:
        """`tensors` were published as `version`: kept (copied) as the next delta's base."""
        self._dtypes = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
        self._last = {
            n: t.detach().contiguous().reshape(-1).view(_uint8()).clone()
            for n, t in tensors.items()
        }
        self.version = version

    def forget(self) -> None:
        self._last, self.version = {}, 0


def _uint8() -> Any:
    import torch

    return torch.uint8
