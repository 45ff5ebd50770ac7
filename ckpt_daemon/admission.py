"""What ckptd accepts from a caller (pure): names, numbers, lists, sizes; and whether a push
fits in the host memory its agents report. Every refusal is an InvalidArgument (or
ResourceExhausted for memory) that names the field and never echoes unbounded input."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sized
from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from ckpt_common.errors import InvalidArgument, ResourceExhausted
from ckpt_daemon.engines import http as engine_http

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


def check_list(field: str, items: Sized, limit: int = MAX_LIST) -> None:
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
_INTS = frozenset(
    getattr(FieldDescriptor, f"TYPE_{k}")
    for k in ("INT32", "INT64", "UINT32", "UINT64", "SINT32", "SINT64")
    + ("FIXED32", "FIXED64", "SFIXED32", "SFIXED64", "ENUM")
)


def check_message(msg: Any, path: str = "") -> None:
    """Checks every field of a request, whatever the RPC: strings printable and bounded,
    lists bounded, versions within int64, timeouts finite and bounded, counts and indexes
    not negative. The handlers then check what each field means. Each field's check is
    built once per field descriptor: a request of a million tensors is checked in a second."""
    for fd, value in msg.ListFields():
        _checker(fd)(path, value)


Check = Callable[[str, Any], None]


@functools.cache
def _checker(fd: Any) -> Check:
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; label before
    if repeated is None:
        repeated = fd.label == fd.LABEL_REPEATED
    name = fd.name
    one = _one(fd)
    if not repeated:
        return lambda path, v: one(path + name, v)
    if fd.type in _INTS and name in _NON_NEGATIVE:  # a whole list at once: shapes

        def ints(path: str, values: Any) -> None:
            check_list(path + name, values, MAX_TENSORS)
            if values and min(values) < 0:
                raise InvalidArgument(f"{path + name} must not be negative")

        return ints

    def each(path: str, values: Any) -> None:
        where = path + name
        check_list(where, values, MAX_TENSORS)
        for v in values:
            one(where, v)

    return each


def _one(fd: Any) -> Check:
    """The check of one value of a field, given where it is."""
    if fd.type == fd.TYPE_MESSAGE:
        return lambda where, v: check_message(v, where + ".")
    if fd.type == fd.TYPE_STRING:
        return check_text
    if fd.type in (fd.TYPE_DOUBLE, fd.TYPE_FLOAT):
        timeout = fd.name.endswith("timeout_s")

        def number(where: str, v: float) -> None:
            if not math.isfinite(v):
                raise InvalidArgument(f"{where} must be a finite number")
            if timeout:
                check_timeout(where, v)

        return number
    if fd.name == "version":

        def version(where: str, v: int) -> None:
            if v > MAX_VERSION:
                raise InvalidArgument(f"{where} must be at most {MAX_VERSION}")

        return version
    if fd.name in _NON_NEGATIVE and fd.type in _INTS:

        def non_negative(where: str, v: int) -> None:
            if v < 0:
                raise InvalidArgument(f"{where} must not be negative")

        return non_negative
    return _nothing


def _nothing(where: str, v: Any) -> None:
    return None
