"""Scanning push sources on this node: safetensors headers only, no tensor bytes."""

from __future__ import annotations

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.host_store import StoreError
from ckpt_common.safetensors_header import SafetensorsError, expand_source, read_header


def scan_paths(paths: list[str]) -> apb.ScanResult:
    out = apb.ScanResult()
    for path in paths:
        try:
            files = expand_source(path)
            for f in files:
                tensors, size = read_header(f)
                out.files.append(
                    apb.ScannedFile(
                        path=f,
                        size=size,
                        tensors=[
                            apb.ScannedTensor(
                                meta=tpb.TensorMeta(
                                    name=t.name, dtype=t.dtype, shape=list(t.shape), nbytes=t.nbytes
                                ),
                                data_offset=t.data_offset,
                            )
                            for t in tensors
                        ],
                    )
                )
        except FileNotFoundError as e:
            raise StoreError("NOT_FOUND", str(e).strip("'\"") or f"{path}: not found") from None
        except SafetensorsError as e:
            raise StoreError("INVALID_ARGUMENT", str(e)) from None
        except PermissionError as e:
            raise StoreError("FAILED_PRECONDITION", f"{path}: {e.strerror}") from None
    return out
