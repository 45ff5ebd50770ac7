"""The core's types as the wire types agents (and clients) read: one conversion each."""

from __future__ import annotations

from ckpt.v1 import types_pb2 as tpb
from ckpt_daemon.model import TensorInfo


def tensor_meta(t: TensorInfo) -> tpb.TensorMeta:
    m = tpb.TensorMeta(name=t.name, dtype=t.dtype, shape=list(t.shape), nbytes=t.nbytes)
    if t.checksum is not None:
        m.checksum = t.checksum
    if t.piece is not None:
        m.piece_offset.extend(t.piece.offset)
        m.piece_shape.extend(t.piece.shape)
    return m
