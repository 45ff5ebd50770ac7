"""How a P2P plan names remote bytes: store_offset = (source index << 40) | offset."""

from __future__ import annotations

SOURCE_SHIFT = 40
OFFSET_MASK = (1 << SOURCE_SHIFT) - 1


def encode(source: int, offset: int) -> int:
    if offset > OFFSET_MASK:
        raise ValueError(f"offset {offset} too large for a P2P source (1 TiB per store)")
    return (source << SOURCE_SHIFT) | offset


def decode(value: int) -> tuple[int, int]:
    return value >> SOURCE_SHIFT, value & OFFSET_MASK
