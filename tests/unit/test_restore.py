"""Pure decisions about restoring instances a failed job may have left on a mix."""

from __future__ import annotations

from ckpt_daemon.jobs.restore import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    due_restores,
    next_backoff,
    restore_steps,
    settle,
    split_instance,
)
from ckpt_daemon.model import (
    Instance,
    InstanceKind,
    Job,
    JobKind,
    JobState,
    RankRef,
    RankResult,
    UpdateSpec,
)
from ckpt_daemon.registry.serving import serving, serving_after

A0, A1, B0 = RankRef("a", 0), RankRef("a", 1), RankRef("b", 0)


def inst(name: str, ranks: list[RankRef], **kw) -> Instance:
    return Instance(
        name=name, kind=InstanceKind.VLLM, endpoint="", tp_size=len(ranks), ranks=ranks, **kw
    )


def test_due_restores_and_the_reason_each_other_waits() -> None:
    fleet = [
        inst("ok", [A0], checkpoint="m", version=1),
        inst("pending", [A1], checkpoint="m", version=3, pending="j1"),
        inst("never", [B0], pending="j2"),
        inst("busy", [A0], checkpoint="m", version=1, pending="j3"),
        inst("gone", [A1, B0], checkpoint="m", version=1, pending="j4"),
        inst("later", [A1], checkpoint="m", version=2, pending="j5"),
    ]
    due, waiting = due_restores(
        fleet, busy={A0}, attached={"a"}, now=10.0, not_before={"later": 11.0}
    )
    assert [(d.instance, d.checkpoint, d.version) for d in due] == [("pending", "m", 3)]
    assert set(waiting) == {"never", "busy", "gone", "later"}
    assert "never committed" in waiting["never"]
    assert "job runs" in waiting["busy"]
    assert "['b']" in waiting["gone"]
    assert "backing off" in waiting["later"]
    due, _ = due_restores(fleet, busy=set(), attached={"a", "b"}, now=12.0, not_before={})
    assert {d.instance for d in due} == {"pending", "busy", "gone", "later"}


def test_backoff_doubles_up_to_a_cap() -> None:
    d, seen = 0.0, []
    for _ in range(10):
        d = next_backoff(d)
        seen.append(d)
    assert seen[0] == FIRST_BACKOFF_S and seen[1] == 2 * FIRST_BACKOFF_S
    assert max(seen) == MAX_BACKOFF_S and seen == sorted(seen)


def test_an_update_may_not_split_an_instance() -> None:
    fleet = [inst("tp2", [A0, A1]), inst("one", [B0])]
    assert split_instance(fleet, {A0}) == "tp2"
    assert split_instance(fleet, {A0, A1}) is None
    assert split_instance(fleet, {B0}) is None
    assert split_instance(fleet, {A1, B0}) == "tp2"


def _job(state: JobState, *, tensors=(), results=()) -> Job:
    return Job(
        id="j9",
        kind=JobKind.UPDATE,
        state=state,
        spec=UpdateSpec(checkpoint="m", version=2, tensors=list(tensors)),
        created=0.0,
        version=2,
        reason="boom",
        results=list(results),
    )


def _res(r: RankRef, untouched: bool) -> RankResult:
    return RankResult(rank=0, owner=r, ok=False, engine_untouched=untouched)


def test_settle_success_full_partial_and_failures() -> None:
    i = inst("I", [A0, A1], checkpoint="m", version=1, ready=True, pending="j9")
    assert settle(i, _job(JobState.SUCCEEDED, tensors=["model.layers.1."]), "")
    assert (i.version, i.ready, i.pending) == (1, True, "")
    assert i.overlays == [{"checkpoint": "m", "version": 2, "tensors": ["model.layers.1."]}]
    steps = restore_steps(i, "broadcast", "j9")
    assert [(s.version, s.tensors) for s in steps] == [(1, []), (2, ["model.layers.1."])]
    i.pending = "j9"
    assert settle(i, _job(JobState.SUCCEEDED), "")
    assert (i.version, i.overlays) == (2, [])

    # refused on every rank before loading: as it was (and still pending if it was)
    i.pending = "j9"
    refused = _job(JobState.FAILED, results=[_res(A0, True), _res(A1, True)])
    assert settle(i, refused, "j7")
    assert (i.pending, i.ready) == ("j7", True)
    # one rank unknown (no result) or touched: not ready, pending on this job
    for results in ([_res(A0, True)], [_res(A0, True), _res(A1, False)]):
        i.pending, i.ready = "j9", True
        assert settle(i, _job(JobState.FAILED, results=results), "")
        assert (i.pending, i.ready) == ("j9", False) and "boom" in i.reason
    # a job the instance was not pending on changes nothing
    i.pending = "other"
    assert not settle(i, _job(JobState.FAILED), "")


def test_what_an_instance_serves_is_named_with_its_overlays() -> None:
    """The label ckptd stores, reports and sends to the engine (its weight version): the
    base version, then each partial update on top; a whole version clears them."""
    i = inst("I", [A0], checkpoint="m", version=1, ready=True, pending="j9")
    assert serving(i) == "m@1"
    part = _job(JobState.SUCCEEDED, tensors=["model.layers.1."])
    after = serving_after(i, part)
    assert after.startswith("m@1+m@2[partial:") and after.endswith("]")
    assert settle(i, part, "")
    assert serving(i) == after  # what the engine was told is what the registry says
    other = _job(JobState.SUCCEEDED, tensors=["model.layers.0."])
    assert serving_after(i, other).startswith(after + "+m@2[partial:")
    assert serving_after(i, other) != after + "+" + after.split("+")[1]  # selections differ
    assert serving_after(i, _job(JobState.SUCCEEDED)) == "m@2"
    # weights ckptd never sent (an engine's own start-up weights): named unknown, not m@0
    fresh = inst("F", [A1])
    assert serving(fresh) == ""
    assert serving_after(fresh, part).startswith("unknown+m@2[partial:")
