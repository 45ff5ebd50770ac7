"""The bucket schedule of one rank's update (pure): the order in which it stages, sends,
reaps and waits, as a list of steps the pipeline executes.

    stage k   H2D of my bucket k into its staging slot (its slot's previous bucket, my
              bucket nstage earlier, must have been sent: the copy waits on that send)
    copy k    H2D of my bucket k straight into its hand-off slot (no staging: serial)
    send k    the agreement + broadcast of bucket k (from staging, the slot, or nothing)
    reap k    wait for bucket k's send; hand it to the engine
    load k    wait until the engine has loaded bucket k (its slot is reused next)
    forget k  drop the record of bucket k's send (no later step waits on it)

With nslots hand-off slots and `lag` sends in flight, bucket k goes into slot k % nslots,
so before sending k the engine must have loaded k - nslots; k is reaped after k + lag is
sent. With staging, my bucket k is copied (stage k) while earlier buckets are sent: up to
nstage of mine ahead. Every rank derives its schedule from the same plan, so all ranks issue
the same sends in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

STAGE, COPY, SEND, REAP, LOAD, FORGET = "stage", "copy", "send", "reap", "load", "forget"


class Step(NamedTuple):
    kind: str
    bucket: int


def bucket_schedule(
    owners: Sequence[int], me: int, *, nslots: int, nstage: int, lag: int, target: bool
) -> list[Step]:
    """owners[k]: the group rank that sends bucket k."""
    if nslots < 1 or nstage < 0 or lag < 0:
        raise ValueError("nslots must be >= 1, nstage and lag >= 0")
    n = len(owners)
    mine = [k for k in range(n) if owners[k] == me]
    out: list[Step] = []
    staged = 0  # my buckets staged so far

    def stage_up_to(sent: int) -> None:
        """Stage my buckets whose staging slot's previous bucket is below `sent`."""
        nonlocal staged
        while staged < len(mine):
            prev = mine[staged - nstage] if staged >= nstage else -1
            if prev >= sent:
                return
            out.append(Step(STAGE, mine[staged]))
            staged += 1

    for k in range(n):
        if target and k >= nslots:
            out.append(Step(LOAD, k - nslots))
        if owners[k] == me:
            if nstage:
                stage_up_to(k)
            else:
                out.append(Step(COPY, k))
        out.append(Step(SEND, k))
        if nstage:
            stage_up_to(k + 1)
        if k - lag >= 0:
            out.append(Step(REAP, k - lag))
        if k - lag - nslots - nstage - 1 >= 0:
            out.append(Step(FORGET, k - lag - nslots - nstage - 1))
    out.extend(Step(REAP, j) for j in range(max(0, n - lag), n))
    return out
