"""What an instance serves, named the same way everywhere (registry, API, the engine's own
weight version): its base version, and each partial update taken on top of it.

    m@1                               the whole of m@1
    m@1+m@2[partial:3f2a9c1b]         m@1, then the tensors of m@2 a partial update selected

The bracket names the selection (a digest of its patterns): two partial updates of the same
version with different tensors are two labels. A restore replays the overlays in order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from ckpt_daemon.model import Instance, Job


def selection_digest(patterns: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(patterns).encode()).hexdigest()[:8]


def overlay_of(job: Job) -> dict:
    """The overlay a successful partial update leaves on its instances."""
    return {
        "checkpoint": job.spec.checkpoint,
        "version": job.version,
        "tensors": list(job.spec.tensors),
    }


def label(checkpoint: str, version: int, overlays: Sequence[dict] = ()) -> str:
    """The name of checkpoint@version with overlays on top ("" for nothing known; a base
    ckptd never sent, such as the weights an engine started with, is "unknown")."""
    if not checkpoint and not overlays:
        return ""
    parts = [f"{checkpoint}@{version}" if checkpoint else "unknown"]
    parts += [
        f"{o['checkpoint']}@{o['version']}[partial:{selection_digest(o['tensors'])}]"
        for o in overlays
    ]
    return "+".join(parts)


def serving(inst: Instance) -> str:
    """What inst serves now, as far as ckptd knows ("" before its first update)."""
    return label(inst.checkpoint, inst.version, inst.overlays)


def serving_after(inst: Instance, job: Job) -> str:
    """What inst serves once `job` commits on it: a whole version replaces everything, a
    partial update adds an overlay on what it served."""
    if not job.spec.tensors:
        return label(job.spec.checkpoint, job.version)
    return label(inst.checkpoint, inst.version, [*inst.overlays, overlay_of(job)])
