"""Reading safetensors headers without torch: the tensor list and each tensor's byte range.

Headers come from files a client named, so they are hostile input: every field is checked
(types, dimensions, offsets against the file), errors say what is wrong without quoting the
file's bytes, and nothing here can raise anything but SafetensorsError for a bad file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from ckpt_common import sources
from ckpt_common.dtypes import DTYPE_SIZES, nbytes_of
from ckpt_common.read_as import ANYONE, Reader

INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_INDEX_BYTES = 64 << 20
MAX_DIMS = 16
MAX_DIM = 1 << 48
MAX_NAME = 1024


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file."""


@dataclass(frozen=True, kw_only=True)
class FileTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    data_offset: int  # absolute offset in the file


def _int(x: object) -> int:
    if type(x) is not int:  # bool is an int subclass; floats and strings are not ints
        raise ValueError
    return x


def _entry(path: str, name: object, info: object, base: int, size: int) -> FileTensor:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
        raise SafetensorsError(f"{path}: a tensor name is empty, too long or not printable")
    try:
        if not isinstance(info, dict):
            raise ValueError
        dtype = info["dtype"]
        shape = tuple(_int(d) for d in info["shape"])
        start, end = (_int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{path}: bad header entry for {name!r}") from None
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SafetensorsError(f"{path}: tensor {name!r} has an unsupported dtype")
    if len(shape) > MAX_DIMS or any(not 0 <= d <= MAX_DIM for d in shape):
        raise SafetensorsError(f"{path}: tensor {name!r} has a bad shape")
    want = nbytes_of(dtype, shape)
    if not 0 <= start <= end or end - start != want or base + end > size:
        raise SafetensorsError(
            f"{path}: tensor {name!r} byte range [{start},{end}) does not fit "
            f"its shape {list(shape)} {dtype} ({want} bytes) or the file ({size} bytes)"
        )
    return FileTensor(name=name, dtype=dtype, shape=shape, nbytes=want, data_offset=base + start)


def read_header(path: str, fd: int | None = None) -> tuple[list[FileTensor], int]:
    """The tensors of one safetensors file (in file order) and the file size. fd: the file,
    already opened (sources.open_regular); else `path` is opened here."""
    own = fd is None
    if fd is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        if len(head) != 8:
            raise SafetensorsError(f"{path}: too short for a safetensors file")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > MAX_HEADER_BYTES or 8 + hlen > size:  # never the length: it is file bytes
            raise SafetensorsError(
                f"{path}: not a safetensors file (its header length does not fit the file)"
            )
        raw = os.pread(fd, hlen, 8)
    finally:
        if own:
            os.close(fd)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique)
    except _DuplicateKey as e:
        raise SafetensorsError(f"{path}: the header has key {e.name!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError):  # never the parser's excerpt
        raise SafetensorsError(
            f"{path}: not a safetensors file (its header is not UTF-8 JSON)"
        ) from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    base = 8 + hlen
    out = [_entry(path, n, i, base, size) for n, i in header.items() if n != "__metadata__"]
    out.sort(key=lambda t: (t.data_offset, t.nbytes))
    _check_disjoint(path, out)
    return out, size


class _DuplicateKey(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose keys are all different (json.loads keeps the last one silently)."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k if len(k) <= MAX_NAME and k.isprintable() else "?")
        out[k] = v
    return out


def _check_disjoint(path: str, tensors: list[FileTensor]) -> None:
    """No two tensors share a byte (tensors sorted by offset; empty ones share none)."""
    end, last = 0, ""
    for t in tensors:
        if t.nbytes == 0:
            continue
        if t.data_offset < end:
            raise SafetensorsError(f"{path}: tensors {last!r} and {t.name!r} overlap")
        end, last = t.data_offset + t.nbytes, t.name


def _index_files(path: str, roots: tuple[str, ...] | None, reader: Reader) -> list[str]:
    index = os.path.join(path, INDEX_FILE)
    try:
        if roots is None:
            with open(index, "rb") as f:
                raw = f.read(MAX_INDEX_BYTES + 1)
        else:
            raw = sources.read_all(index, MAX_INDEX_BYTES, reader)
        weight_map = json.loads(raw.decode("utf-8"))["weight_map"]
        names = set(weight_map.values())
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise SafetensorsError(f"{index}: not an index (want a JSON weight_map)") from None
    files = []
    for name in sorted(names, key=str):
        if not isinstance(name, str) or not name or name.startswith("/") or ".." in name.split("/"):
            raise SafetensorsError(f"{index}: an entry points outside its directory")
        f = os.path.join(path, name)
        files.append(sources.confine(f, roots) if roots is not None else f)  # links: in roots
    return files


def expand_source(
    path: str, roots: tuple[str, ...] | None = None, reader: Reader = ANYONE
) -> list[str]:
    """A file, or a directory with model.safetensors.index.json (or *.safetensors files).
    roots: confine every path to them (sources.confine: returns real paths) and read only
    what `reader` may (ckpt_common.read_as); None: the caller's own files, unchecked."""
    if roots is not None:
        path = sources.confine(path, roots)
        names = sources.list_dir(path, reader)
    else:
        names = os.listdir(path) if os.path.isdir(path) else None
    if names is not None:
        if INDEX_FILE in names:
            return _index_files(path, roots, reader)
        files = sorted(n for n in names if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no safetensors files in directory")
        out = [os.path.join(path, n) for n in files]
        return [sources.confine(f, roots) for f in out] if roots is not None else out
    if roots is None and not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    return [path]
