"""POSIX shared memory without the resource tracker (which would unlink segments it did not
create when the process exits)."""

from __future__ import annotations

import os
from multiprocessing import resource_tracker, shared_memory

SHM_DIR = "/dev/shm"


def _untrack(shm: shared_memory.SharedMemory) -> None:
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:
        pass


def create(name: str, size: int) -> shared_memory.SharedMemory:
    unlink(name)
    shm = shared_memory.SharedMemory(name=name, create=True, size=max(1, size))
    _untrack(shm)
    return shm


def attach(name: str) -> shared_memory.SharedMemory:
    shm = shared_memory.SharedMemory(name=name, create=False)
    _untrack(shm)
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
