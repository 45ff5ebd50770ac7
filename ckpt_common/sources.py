"""Which files an agent reads for a push, and how it opens them.

A client names paths; the agent is the one that reads them, so it must not become a way to
read what the client could not: every path must resolve (links followed) to a regular file
under one of the agent's source roots (`ckpt-agent --source-root`, env CKPT_SOURCE_ROOTS);
the file is then opened again from `/` one component at a time without following any link
(a component swapped for a link after the check fails the open), never blocking (a FIFO or
device is refused, not waited on). The scan records the file's identity (device, inode,
size); the load checks that the file it opened is that one.

The agent reads as root (or its own user) on a principal's behalf: every directory on the
way and the file itself are checked, on the opened inodes and before a byte is read, against
what the pushing principal's local uid may do (ckpt_common.read_as), so a push reads only
what its principal could read itself. Errors name the path and the rule, never file bytes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import TypeVar

from ckpt_common.read_as import R, Reader, X

T = TypeVar("T")

SOURCE_ROOTS_ENV = "CKPT_SOURCE_ROOTS"
DEFAULT_ROOTS = ("/dev/shm",)  # where Client.push_tensors stages its files
MAX_PATH = 4096


class SourceError(Exception):
    """A source the agent will not read; code is a gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def roots_from_env() -> tuple[str, ...]:
    raw = os.environ.get(SOURCE_ROOTS_ENV, "")
    return tuple(r for r in raw.split(":") if r) or DEFAULT_ROOTS


def shown(path: str) -> str:
    """A client-given path as it may appear in a message: repr'd, bounded."""
    return repr(path if len(path) <= 200 else path[:200] + "...")


def confine(path: str, roots: tuple[str, ...]) -> str:
    """The real path of `path` when it lies under one of `roots`; SourceError otherwise."""
    if not path or len(path) > MAX_PATH or not path.isprintable() or not os.path.isabs(path):
        raise SourceError("INVALID_ARGUMENT", f"source {shown(path)}: want an absolute path")
    real = os.path.realpath(path)
    for root in roots:
        base = os.path.realpath(root)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return real
    raise SourceError(
        "PERMISSION_DENIED",
        f"source {shown(path)} is outside this agent's source roots {list(roots)}",
    )


def _opened(real: str, final_flags: int, reader: Reader) -> int:
    """real opened from `/` one component at a time, never following a link; every directory
    on the way must be one `reader` may search (checked on the opened inode)."""
    parts = real.strip("/").split("/")
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _require(reader, fd, X, "/")
        for i, p in enumerate(parts[:-1]):
            flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            nxt = os.open(p, flags, dir_fd=fd)
            os.close(fd)
            fd = nxt
            _require(reader, fd, X, "/" + "/".join(parts[: i + 1]))
        return os.open(parts[-1], final_flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _require(reader: Reader, fd: int, want: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    why = reader.refusal(st, want, shown(path))
    if why:
        raise SourceError("PERMISSION_DENIED", why)
    return st


def _os_error(real: str, e: OSError) -> SourceError:
    if e.errno == errno.ENOENT:
        return SourceError("NOT_FOUND", f"{shown(real)}: no such file")
    if e.errno in (errno.ELOOP, errno.ENOTDIR):
        return SourceError("FAILED_PRECONDITION", f"{shown(real)} changed into a link")
    if e.errno == errno.EACCES:
        return SourceError("PERMISSION_DENIED", f"{shown(real)}: permission denied")
    return SourceError("FAILED_PRECONDITION", f"{shown(real)}: {e.strerror}")


def _closing(fd: int, f: Callable[[], T]) -> T:
    try:
        return f()
    except BaseException:
        os.close(fd)
        raise


def open_regular(real: str, reader: Reader) -> tuple[int, os.stat_result]:
    """Opens a confined real path read-only without following links, never blocking;
    returns the descriptor and its stat. Only regular files `reader` may read (every
    directory on the way searchable by it), before a byte of it is read."""
    try:
        fd = _opened(real, os.O_RDONLY | os.O_NONBLOCK, reader)
    except OSError as e:
        raise _os_error(real, e) from None

    def check() -> os.stat_result:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError("INVALID_ARGUMENT", f"{shown(real)} is not a regular file")
        return _require(reader, fd, R, real)

    return fd, _closing(fd, check)


def list_dir(real: str, reader: Reader) -> list[str] | None:
    """The names in a confined directory that `reader` may search and list; None when real
    is not a directory."""
    try:
        fd = _opened(real, os.O_RDONLY | os.O_DIRECTORY, reader)
    except OSError as e:
        if e.errno == errno.ENOTDIR:
            return None
        raise _os_error(real, e) from None
    try:
        _require(reader, fd, R | X, real)
        return os.listdir(fd)
    finally:
        os.close(fd)


def read_all(real: str, limit: int, reader: Reader) -> bytes:
    """A small regular file's bytes (an index), at most `limit`."""
    fd, st = open_regular(real, reader)
    try:
        if st.st_size > limit:
            raise SourceError("INVALID_ARGUMENT", f"{shown(real)} is over {limit} bytes")
        return os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)


def check_identity(
    real: str, st: os.stat_result, size: int, dev: int, ino: int, ctime_ns: int = 0
) -> None:
    """The file opened for a load is the one the scan saw (device, inode and its change time
    where known: an inode number is reused by the next file created)."""
    same = (st.st_dev, st.st_ino, st.st_ctime_ns if ctime_ns else 0) == (dev, ino, ctime_ns)
    if (size and st.st_size != size) or (ino and not same):
        raise SourceError("FAILED_PRECONDITION", f"{shown(real)} changed since it was scanned")
