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
    if t.delta is not None:
        d = t.delta
        m.delta.CopyFrom(
            tpb.DeltaMeta(
                base_version=d.base_version, encoding=d.encoding, count=d.count,
                base_checksum=d.base_checksum or 0, target_checksum=d.target_checksum,
                target_nbytes=d.target_nbytes,
            )
        )  # fmt: skip
    return m
