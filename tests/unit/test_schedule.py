"""The bucket schedule (ckpt_agent.schedule): the invariants that keep slots and staging
safe and every rank's sends aligned, over many plan shapes."""

from __future__ import annotations

import itertools
import random

import pytest

from ckpt_agent.schedule import COPY, FORGET, LOAD, REAP, SEND, STAGE, Step, bucket_schedule


def check(owners: list[int], me: int, nslots: int, nstage: int, lag: int, target: bool) -> None:
    plan = bucket_schedule(owners, me, nslots=nslots, nstage=nstage, lag=lag, target=target)
    n = len(owners)
    at = {s: i for i, s in enumerate(plan)}
    mine = [k for k in range(n) if owners[k] == me]
    # every bucket sent once, in order, and reaped once after its send
    assert [s.bucket for s in plan if s.kind == SEND] == list(range(n))
    assert sorted(s.bucket for s in plan if s.kind == REAP) == list(range(n))
    for k in range(n):
        assert at[Step(SEND, k)] < at[Step(REAP, k)]
        # at most lag sends in flight beyond the one being reaped
        sent_before_reap = sum(1 for s in plan[: at[Step(REAP, k)]] if s.kind == SEND)
        assert sent_before_reap <= k + 1 + lag
    # my buckets are copied exactly once, before their send; others never
    kind = STAGE if nstage else COPY
    assert sorted(s.bucket for s in plan if s.kind in (STAGE, COPY)) == mine
    for k in mine:
        assert at[Step(kind, k)] < at[Step(SEND, k)]
    # a staging slot is reused only after its previous bucket was sent
    for m, k in enumerate(mine):
        if nstage and m >= nstage:
            assert at[Step(SEND, mine[m - nstage])] < at[Step(STAGE, k)]
    # a hand-off slot is written (sent into) only after the engine loaded its last bucket,
    # which was reaped (handed over) before that
    if target:
        for k in range(nslots, n):
            assert at[Step(REAP, k - nslots)] < at[Step(LOAD, k - nslots)] < at[Step(SEND, k)]
    else:
        assert not any(s.kind == LOAD for s in plan)
    # nothing is forgotten while a later step still waits on it: its reap, the staging of
    # my bucket that reuses its staging slot, the serial copy into its hand-off slot
    for s in plan:
        if s.kind != FORGET:
            continue
        k = s.bucket
        users = [Step(REAP, k)]
        if k in mine and nstage and mine.index(k) + nstage < len(mine):
            users.append(Step(STAGE, mine[mine.index(k) + nstage]))
        if not nstage and k + nslots in mine:
            users.append(Step(COPY, k + nslots))
        assert all(at[u] < at[s] for u in users), (s, users)


SHAPES = [(1, 0, 0), (2, 0, 0), (2, 1, 1), (3, 2, 2), (4, 3, 2), (2, 2, 1)]


@pytest.mark.parametrize(("nslots", "nstage", "lag"), SHAPES)
def test_schedule_invariants(nslots: int, nstage: int, lag: int) -> None:
    rng = random.Random(nslots * 100 + nstage * 10 + lag)
    for n, world in itertools.product((0, 1, 2, 5, 17), (1, 2, 3)):
        owners = [rng.randrange(world) for _ in range(n)]
        for me, target in itertools.product(range(world), (True, False)):
            check(owners, me, nslots, nstage, lag, target)


def test_schedule_of_a_cpu_update_is_serial() -> None:
    plan = bucket_schedule([0, 1, 0], 0, nslots=2, nstage=0, lag=0, target=True)
    assert plan == [
        Step(COPY, 0), Step(SEND, 0), Step(REAP, 0),
        Step(SEND, 1), Step(REAP, 1),
        Step(LOAD, 0), Step(COPY, 2), Step(SEND, 2), Step(REAP, 2),
    ]  # fmt: skip


def test_schedule_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        bucket_schedule([0], 0, nslots=0, nstage=0, lag=0, target=True)
