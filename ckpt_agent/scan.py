"""Scanning push sources on this node: safetensors headers only, no tensor bytes. Only
regular files under the agent's source roots (ckpt_common.sources) that the pushing
principal's uid may read (ckpt_common.read_as: the Scan's read_uid; unset: only what everyone
may read); each file's identity goes back with its tensors so that the load reads the very
file that was scanned."""

from __future__ import annotations

import os

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.host_store import StoreError
from ckpt_common import sources
from ckpt_common.read_as import Reader
from ckpt_common.safetensors_header import SafetensorsError, expand_source, read_header

MAX_TENSORS = 1 << 20  # per push


def reader_of(cmd: apb.Scan | apb.Load) -> Reader:
    """Whose permissions the command's reads follow (unset: nobody in particular)."""
    return Reader.of_uid(cmd.read_uid if cmd.HasField("read_uid") else None)


def _scan_file(f: str, reader: Reader) -> apb.ScannedFile:
    fd, st = sources.open_regular(f, reader)
    try:
        tensors, size = read_header(f, fd)
    finally:
        os.close(fd)
    return apb.ScannedFile(
        path=f,
        size=size,
        dev=st.st_dev,
        ino=st.st_ino,
        ctime_ns=st.st_ctime_ns,
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


def scan_paths(cmd: apb.Scan, roots: tuple[str, ...]) -> apb.ScanResult:
    out = apb.ScanResult()
    count = 0
    reader = reader_of(cmd)
    for path in cmd.paths:
        try:
            for f in expand_source(path, roots, reader):
                out.files.append(_scan_file(f, reader))
                count += len(out.files[-1].tensors)
                if count > MAX_TENSORS:
                    raise StoreError("INVALID_ARGUMENT", f"more than {MAX_TENSORS} tensors")
        except sources.SourceError as e:
            raise StoreError(e.code, e.message) from None
        except FileNotFoundError:
            raise StoreError("NOT_FOUND", f"{sources.shown(path)}: not found") from None
        except SafetensorsError as e:
            raise StoreError("INVALID_ARGUMENT", str(e)) from None
        except OSError as e:  # never the file's bytes: the error's name only
            raise StoreError(
                "FAILED_PRECONDITION", f"{sources.shown(path)}: {e.strerror}"
            ) from None
    return out
