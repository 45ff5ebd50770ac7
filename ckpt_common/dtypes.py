"""safetensors dtype names, their sizes, and (lazily) the torch dtypes."""

from __future__ import annotations

from typing import Any

DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}

_TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
}


def nbytes_of(dtype: str, shape: list[int] | tuple[int, ...]) -> int:
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    n = DTYPE_SIZES[dtype]
    for d in shape:
        if d < 0:
            raise ValueError(f"negative dimension in shape {list(shape)}")
        n *= d
    return n


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, _TORCH_NAMES[dtype])


def dtype_name(torch_dt: Any) -> str:
    text = str(torch_dt).removeprefix("torch.")
    for name, tname in _TORCH_NAMES.items():
        if tname == text:
            return name
    raise ValueError(f"unsupported torch dtype {torch_dt}")
