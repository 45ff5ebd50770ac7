"""Delta encoding of a tensor: what changed between a base version's bytes and a target's,
element by element, and applying it back exactly.

Elements are compared as integers of the element's width (bit patterns: -0.0, NaN payloads
and every other float stay exact). Three encodings, chosen by density (`encode`):

- SPARSE: the changed elements' indices (int32, int64 from 2**31 elements on), ascending,
  then their new values;
- BITMAP: one bit per element (bit i % 8 of byte i // 8, set where it changed), then the
  new values of the set bits in order;
- DENSE: the target's bytes (a delta would not pay).

The values start at an 8-byte boundary of the payload (zero padding after the indices or
the bitmap), so both parts are read as typed views. `apply` checks everything a hostile or
corrupted payload could get wrong (its size, indices in range and strictly ascending, the
bitmap's count and padding) before it writes a byte. Works on CPU and CUDA tensors alike
(torch ops only: a gather on encode, a scatter on apply).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

ALIGN = 8
INT32_MAX_ELEMENTS = 1 << 31


class Encoding(enum.IntEnum):
    DENSE = 0
    SPARSE = 1
    BITMAP = 2


class DeltaError(ValueError):
    """A payload that does not describe a delta of a tensor of this size."""


@dataclass(frozen=True, slots=True)
class Encoded:
    encoding: Encoding
    count: int  # changed elements (DENSE: every element)
    payload: Any  # 1-D uint8 tensor


def _int_dtype(itemsize: int) -> Any:
    import torch

    try:
        return {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    except KeyError:
        raise DeltaError(f"no delta for elements of {itemsize} bytes") from None


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def index_width(elements: int) -> int:
    return 4 if elements < INT32_MAX_ELEMENTS else 8


def payload_nbytes(encoding: Encoding, count: int, elements: int, itemsize: int) -> int:
    """The payload's size for `count` changed elements of a tensor of `elements`."""
    if encoding == Encoding.DENSE:
        return elements * itemsize
    if encoding == Encoding.SPARSE:
        return _align(count * index_width(elements)) + count * itemsize
    if encoding == Encoding.BITMAP:
        return _align(-(-elements // 8)) + count * itemsize
    raise DeltaError(f"unknown delta encoding {int(encoding)}")


def choose(count: int, elements: int, itemsize: int) -> Encoding:
    """The smallest encoding for count changed elements (DENSE when nothing is smaller)."""
    best = Encoding.DENSE
    for enc in (Encoding.SPARSE, Encoding.BITMAP):
        if payload_nbytes(enc, count, elements, itemsize) < payload_nbytes(
            best, count, elements, itemsize
        ):
            best = enc
    return best


def _typed(raw: Any, dtype: Any) -> Any:
    """A 1-D uint8 tensor as dtype (a copy where its offset is not aligned for dtype)."""
    try:
        return raw.view(dtype)
    except RuntimeError:
        return raw.clone().view(dtype)


def _pack_bits(mask: Any) -> Any:
    import torch

    n = mask.numel()
    padded = torch.zeros(_align(-(-n // 8)) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.to(torch.uint8)
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _unpack_bits(bits: Any) -> Any:
    import torch

    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(1) >> shifts) & 1).view(-1).bool()


def encode(base: Any, target: Any, itemsize: int) -> Encoded:
    """The delta that turns base into target (both 1-D uint8 tensors of one size)."""
    import torch

    if base.numel() != target.numel():
        raise DeltaError(f"base has {base.numel()} bytes, target {target.numel()}")
    if target.numel() % itemsize:
        raise DeltaError(f"{target.numel()} bytes are no whole number of {itemsize}-byte elements")
    dt = _int_dtype(itemsize)
    b, t = _typed(base, dt), _typed(target, dt)
    changed = b != t
    count, n = int(changed.sum()), t.numel()
    enc = choose(count, n, itemsize)
    if enc == Encoding.DENSE:
        return Encoded(Encoding.DENSE, n, target)  # the caller copies it
    values = t[changed].view(torch.uint8)
    if enc == Encoding.SPARSE:
        idx = changed.nonzero().view(-1).to(torch.int32 if index_width(n) == 4 else torch.int64)
        head = idx.view(torch.uint8)
    else:
        head = _pack_bits(changed)
    payload = torch.zeros(payload_nbytes(enc, count, n, itemsize), dtype=torch.uint8,
                          device=target.device)  # fmt: skip
    payload[: head.numel()] = head
    payload[payload.numel() - values.numel() :] = values
    return Encoded(enc, count, payload)


def _changed_indices(encoding: Encoding, count: int, head: Any, n: int) -> Any:
    """The indices (SPARSE) or the mask (BITMAP) a payload names, checked."""
    import torch

    if encoding == Encoding.SPARSE:
        width = index_width(n)
        idx = _typed(head[: count * width], torch.int32 if width == 4 else torch.int64).long()
        if count and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise DeltaError(f"a delta index lies outside the tensor's {n} elements")
        if count > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise DeltaError("delta indices are not strictly ascending (repeated or unordered)")
        return idx
    mask = _unpack_bits(head[: -(-n // 8)])
    if bool(mask[n:].any()) or bool(head[-(-n // 8) :].any()):
        raise DeltaError("the delta's bitmap has bits set beyond the tensor")
    mask = mask[:n]
    if int(mask.sum()) != count:
        raise DeltaError(f"the delta's bitmap sets {int(mask.sum())} elements, it says {count}")
    return mask


def apply(base: Any, encoding: int, count: int, payload: Any, itemsize: int) -> None:
    """Writes the delta into base (a 1-D uint8 tensor holding the base version's bytes),
    in place. Raises DeltaError, with base untouched, if the payload is not a well-formed
    delta of a tensor of base's size."""
    try:
        enc = Encoding(encoding)
    except ValueError:
        raise DeltaError(f"unknown delta encoding {encoding}") from None
    if base.numel() % itemsize:
        raise DeltaError(f"{base.numel()} bytes are no whole number of {itemsize}-byte elements")
    n = base.numel() // itemsize
    if count < 0 or count > n:
        raise DeltaError(f"a delta of {count} elements for a tensor of {n}")
    want = payload_nbytes(enc, count, n, itemsize)
    if payload.numel() != want:
        raise DeltaError(f"the delta has {payload.numel()} bytes, its encoding needs {want}")
    if enc == Encoding.DENSE:
        if count != n:
            raise DeltaError(f"a dense delta of {count} elements for a tensor of {n}")
        base.copy_(payload)
        return
    dt = _int_dtype(itemsize)
    where = _changed_indices(enc, count, payload[: want - count * itemsize], n)
    values = _typed(payload[want - count * itemsize :], dt)
    try:
        into = base.view(dt)
    except RuntimeError:
        raise DeltaError(f"the tensor is not aligned for {itemsize}-byte elements") from None
    into[where] = values


STORE_PREFIX = "~delta/"


def store_name(checkpoint: str, base: int) -> str:
    """The host-store key of the deltas of `checkpoint`'s versions from version `base` (user
    names cannot hold '/': no clash with a checkpoint)."""
    return f"{STORE_PREFIX}{base}/{checkpoint}"


def store_of(name: str) -> tuple[str, int] | None:
    """(checkpoint, base) of a store_name, or None for any other name."""
    if not name.startswith(STORE_PREFIX):
        return None
    base, _, checkpoint = name.removeprefix(STORE_PREFIX).partition("/")
    return (checkpoint, int(base)) if base.isdigit() and checkpoint else None
