"""Updates streamed from a push in flight (UpdateRequest.stream): which version an update
may read before it is READY, and the wait for its commit before such a job may succeed.

Engines verify every tensor against the checksums the trainer declared at BeginPush, as the
bytes land; the job succeeds only once the push has committed (the version is READY). A
push that fails instead fails the job, and its engines are restored like after any failed
update."""

from __future__ import annotations

import asyncio
import time

from ckpt_common.errors import CkptError, DeadlineExceeded, FailedPrecondition
from ckpt_daemon.model import CheckpointState, CheckpointVersion, UpdateSpec
from ckpt_daemon.push.direct import DirectPushes
from ckpt_daemon.registry.store import Registry

NOT_STREAMED = "the bytes are still being written: only a broadcast streams from a push"


def streamable(pushes: DirectPushes | None, spec: UpdateSpec, cv: CheckpointVersion) -> bool:
    """Whether this update reads cv while its push writes it."""
    return (
        spec.stream
        and cv.state == CheckpointState.LOADING
        and pushes is not None
        and pushes.streamable(cv.name, cv.version)
    )


async def await_commit(
    pushes: DirectPushes | None, registry: Registry, name: str, version: int, deadline: float
) -> None:
    """Returns once the version a streamed job read is READY; raises (the job fails) when
    its push failed or the job's deadline came first."""
    wait = pushes.committed(name, version) if pushes is not None else None
    if wait is not None:
        try:
            await asyncio.wait_for(wait, max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            raise DeadlineExceeded(
                f"the push of {name}@{version} had not committed by the job's deadline"
            ) from None
        except CkptError as e:
            raise FailedPrecondition(f"the push of {name}@{version} failed: {e.message}") from None
    cv = registry.get_checkpoint(name, version)
    if cv is None or cv.state != CheckpointState.READY:
        state = "gone" if cv is None else cv.state.name
        raise FailedPrecondition(f"the push of {name}@{version} did not commit (it is {state})")
