"""POSIX shared memory without the resource tracker (which would unlink segments it did not
create when the process exits).

A segment is created by its owner alone (O_EXCL, mode 0600). One is attached only when a
trusted uid (ckpt_common.rendezvous: ours, root's, the operator's CKPT_IPC_PEER_UIDS) owns it
and nobody else can write it: /dev/shm is everyone's, so a name says nothing about who made
the segment (shm_open never follows a link)."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterable
from multiprocessing import resource_tracker, shared_memory

from ckpt_common.rendezvous import stat_refusal, trusted_uids

SHM_DIR = "/dev/shm"
# Python < 3.13 registers every mapping with the resource tracker, by name; two threads
# mapping one segment at once would register it twice and unregister it twice (a KeyError
# the tracker prints). Each mapping is registered and unregistered under this lock.
_TRACKED = threading.Lock()


class UntrustedSegment(PermissionError):
    """A segment someone untrusted owns or can write: never mapped."""


def _untrack(shm: shared_memory.SharedMemory) -> None:
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass


def buffer(mem: shared_memory.SharedMemory) -> memoryview:
    """The mapping's bytes (a closed mapping has none)."""
    buf = mem.buf
    if buf is None:
        raise ValueError(f"shared memory {mem.name} is closed")
    return buf


def create(name: str, size: int) -> shared_memory.SharedMemory:
    unlink(name)
    with _TRACKED:
        shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, size))
        _untrack(shm)
    return shm


def attach(name: str, trusted: Iterable[int] | None = None) -> shared_memory.SharedMemory:
    """Maps an existing segment; UntrustedSegment if it is not a regular file a trusted uid
    owns and nobody else can write (checked on the opened descriptor)."""
    with _TRACKED:
        shm = shared_memory.SharedMemory(name=name, create=False)
        _untrack(shm)
    st = os.fstat(shm._fd)  # type: ignore[attr-defined]
    why = stat_refusal(st, trusted_uids() if trusted is None else trusted, f"segment {name}")
    if not why and not stat.S_ISREG(st.st_mode):
        why = f"segment {name} is not a regular file"
    if why:
        shm.close()
        raise UntrustedSegment(why)
    return shm


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name.lstrip("/")))
    except FileNotFoundError:
        pass


def remove_prefix(prefix: str) -> int:
    """Unlinks every segment whose name starts with prefix (left by a dead agent)."""
    n = 0
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return 0
    for name in names:
        if name.startswith(prefix):
            unlink(name)
            n += 1
    return n
