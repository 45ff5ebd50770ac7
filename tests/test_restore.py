"""Pure decisions about restoring instances a failed job may have left on a mix."""

from __future__ import annotations

from ckpt_daemon.model import Instance, InstanceKind, RankRef
from ckpt_daemon.restore import (
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    due_restores,
    next_backoff,
    split_instance,
)

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
