"""Reading safetensors headers without torch: the tensor list and each tensor's byte range."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from ckpt_common.dtypes import DTYPE_SIZES, nbytes_of

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file."""


@dataclass(frozen=True, kw_only=True)
class FileTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data_offset: int  # absolute offset in the file


def read_header(path: str) -> tuple[list[FileTensor], int]:
    """Returns the tensors of one safetensors file (in file order) and the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:
            raise SafetensorsError(f"{path}: header length {hlen} exceeds the file")
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    base = 8 + hlen
    out: list[FileTensor] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: bad header entry for {name!r}") from None
        if dtype not in DTYPE_SIZES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        want = nbytes_of(dtype, shape)
        if end - start != want or start < 0 or base + end > size:
            raise SafetensorsError(
                f"{path}: tensor {name!r} byte range [{start},{end}) does not fit "
                f"its shape {list(shape)} {dtype} ({want} bytes) or the file ({size} bytes)"
            )
        out.append(
            FileTensor(name=name, dtype=dtype, shape=shape, nbytes=want, data_offset=base + start)
        )
    out.sort(key=lambda t: t.data_offset)
    return out, size


def expand_source(path: str) -> list[str]:
    """A file, or a directory with model.safetensors.index.json (or *.safetensors files)."""
    if os.path.isdir(path):
        index = os.path.join(path, INDEX_FILE)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{index}: bad index file: {e}") from None
            files = sorted(set(weight_map.values()))
            return [os.path.join(path, name) for name in files]
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no safetensors files in directory")
        return [os.path.join(path, n) for n in files]
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return [path]
