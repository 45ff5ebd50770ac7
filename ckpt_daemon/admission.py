"""What ckptd accepts from a caller (pure): names, numbers, lists, sizes; and whether a push
fits in the host memory its agents report. Every refusal is an InvalidArgument (or
ResourceExhausted for memory) that names the field and never echoes unbounded input."""

from __future__ import annotations

import math
from typing import Any

from ckpt_common.errors import InvalidArgument, ResourceExhausted
from ckpt_daemon import engine_http

MAX_NAME = 200
MAX_TEXT = 4096  # paths, endpoints, tensor names
MAX_VERSION = (1 << 63) - 1  # the registry stores int64
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_LIST = 65536  # ranks, instances, sources
MAX_PATTERNS = 4096
MAX_PATTERN = 1024
MAX_TENSORS = 1 << 20
MAX_BUCKET = 16 << 30
MIN_BUCKET = 4096
MAX_DETAIL = 1000  # characters of a status message


def shown(text: str, limit: int = 80) -> str:
    """Client input as it may appear in a message: repr'd and cut."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def bounded(message: str) -> str:
    """A status message: printable and at most MAX_DETAIL characters."""
    return engine_http.bounded(message, MAX_DETAIL)


def check_text(field: str, text: str, limit: int = MAX_TEXT, *, empty: bool = True) -> None:
    if (not text and not empty) or len(text) > limit or not text.isprintable():
        raise InvalidArgument(
            f"{field} must be {'1' if not empty else '0'}-{limit} printable characters, "
            f"not {shown(text)}"
        )


def check_name(field: str, name: str) -> None:
    """Checkpoint, instance and node names: no separators, no spaces, no control characters."""
    check_text(field, name, MAX_NAME, empty=False)
    if any(c in name for c in "/@ \t"):
        raise InvalidArgument(f"{field} {shown(name)} must not contain '/', '@' or spaces")


def check_version(version: int, *, zero: bool = False) -> None:
    if version > MAX_VERSION or (version == 0 and not zero):
        raise InvalidArgument(f"version must be 1-{MAX_VERSION}, not {version}")


def check_timeout(field: str, seconds: float) -> None:
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_TIMEOUT_S):
        raise InvalidArgument(f"{field} must be 0-{MAX_TIMEOUT_S:g} seconds, not {seconds}")


def check_list(field: str, items: list, limit: int = MAX_LIST) -> None:
    if len(items) > limit:
        raise InvalidArgument(f"{field}: at most {limit} entries, not {len(items)}")


def check_patterns(patterns: list[str]) -> None:
    check_list("tensors", patterns, MAX_PATTERNS)
    for p in patterns:
        check_text("a tensor pattern", p, MAX_PATTERN, empty=False)


def check_bucket(nbytes: int) -> None:
    if nbytes and not MIN_BUCKET <= nbytes <= MAX_BUCKET:
        raise InvalidArgument(f"bucket_bytes must be 0 or {MIN_BUCKET}-{MAX_BUCKET}")


def check_device(index: int) -> None:
    if not 0 <= index < 1 << 16:
        raise InvalidArgument(f"device index must be 0-65535, not {index}")


def admit(
    need: dict[str, int], free: dict[str, int], reserved: dict[str, int] | None = None
) -> str:
    """Why a push of `need` bytes per node does not fit the host memory its agents report
    (`free`, less what pushes in flight already `reserved`); "" when it fits."""
    reserved = reserved or {}
    for node in sorted(need):
        have = free.get(node, 0) - reserved.get(node, 0)
        if need[node] > have:
            return (
                f"node {shown(node)} has {max(0, have) / 2**30:.1f} GiB of host memory free "
                f"for stores, the push needs {need[node] / 2**30:.1f} GiB there"
            )
    return ""


def require_admitted(need: dict[str, int], free: dict[str, int], reserved: dict[str, int]) -> None:
    why = admit(need, free, reserved)
    if why:
        raise ResourceExhausted(why)


_NON_NEGATIVE = {
    "device", "tp_size", "limit", "replicas", "bucket_bytes", "nbytes", "rank", "part", "parts",
    "shape", "piece_offset", "piece_shape",
}  # fmt: skip


def check_message(msg: Any, path: str = "") -> None:
    """Checks every field of a request, whatever the RPC: strings printable and bounded,
    lists bounded, versions within int64, timeouts finite and bounded, counts and indexes
    not negative. The handlers then check what each field means."""
    for fd, value in msg.ListFields():
        where = f"{path}{fd.name}"
        repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; label before
        if repeated is None:
            repeated = fd.label == fd.LABEL_REPEATED
        if repeated:
            check_list(where, value, MAX_TENSORS)
            items = value
        else:
            items = [value]
        for v in items:
            _check_field(fd, where, v)


def _check_field(fd: Any, where: str, v: Any) -> None:
    if fd.type == fd.TYPE_MESSAGE:
        check_message(v, where + ".")
    elif fd.type == fd.TYPE_STRING:
        check_text(where, v)
    elif fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        if not math.isfinite(v):
            raise InvalidArgument(f"{where} must be a finite number")
        if fd.name.endswith("timeout_s"):
            check_timeout(where, v)
    elif fd.name == "version" and v > MAX_VERSION:
        raise InvalidArgument(f"{where} must be at most {MAX_VERSION}")
    elif fd.name in _NON_NEGATIVE and isinstance(v, int) and v < 0:
        raise InvalidArgument(f"{where} must not be negative")
