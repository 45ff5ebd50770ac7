"""The lives of jobs, versions, shards and instances (registry/transitions.py), and the
registry refusing an illegal change before it records anything."""

from __future__ import annotations

import pytest

from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    Instance,
    InstanceKind,
    Job,
    JobKind,
    JobState,
    RankRef,
    Shard,
    ShardState,
    UpdateSpec,
)
from ckpt_daemon.registry.store import Registry
from ckpt_daemon.registry.transitions import (
    JOB,
    SHARD,
    VERSION,
    IllegalTransition,
    InstanceState,
    check,
    check_instance,
    instance_state,
    version_state,
)


@pytest.mark.parametrize("table", [JOB, SHARD, VERSION])
def test_every_state_has_a_row_and_ends_are_final(table) -> None:
    states = set(type(next(iter(table))))
    assert set(table) == states
    for old, allowed in table.items():
        assert allowed <= states
        for new in states:
            if new == old or new in allowed:
                check(table, "x", old, new)
            else:
                with pytest.raises(IllegalTransition, match=f"{old.name} -> {new.name}"):
                    check(table, "x", old, new)


def test_the_ends() -> None:
    for done in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED):
        assert JOB[done] == frozenset() and done.done
    assert SHARD[ShardState.FAILED] == frozenset()
    assert VERSION[CheckpointState.FAILED] == frozenset()
    assert CheckpointState.LOADING not in VERSION[CheckpointState.READY]


@pytest.mark.parametrize(
    ("shards", "state"),
    [
        ([], CheckpointState.READY),
        ([ShardState.READY, ShardState.READY], CheckpointState.READY),
        ([ShardState.READY, ShardState.LOADING], CheckpointState.LOADING),
        ([ShardState.READY, ShardState.LOST], CheckpointState.LOST),
        ([ShardState.LOST, ShardState.FAILED], CheckpointState.FAILED),
    ],
)
def test_a_versions_state_follows_its_shards(shards, state) -> None:
    assert version_state(shards) == state


def _inst(**kw) -> Instance:
    base = dict(name="i", kind=InstanceKind.VLLM, endpoint="http://x", tp_size=1, ranks=[])
    return Instance(**{**base, **kw})


def test_what_a_serving_instance_holds_changes_only_through_a_job() -> None:
    serving = _inst(checkpoint="m", version=1, ready=True)
    assert instance_state(serving) == InstanceState.SERVING
    assert instance_state(_inst(pending="j")) == InstanceState.UPDATING
    assert instance_state(_inst()) == InstanceState.NOT_SERVING
    with pytest.raises(IllegalTransition, match="without a job"):
        check_instance(serving, _inst(checkpoint="m", version=2, ready=True))
    check_instance(serving, _inst(checkpoint="m", version=1, ready=True, endpoint="http://y"))
    check_instance(serving, _inst(checkpoint="m", version=1, pending="j", ready=True))
    check_instance(serving, _inst(ready=False, reason="joining"))  # a join starts over
    updating = _inst(checkpoint="m", version=1, ready=True, pending="j")
    check_instance(updating, _inst(checkpoint="m", version=2, ready=True))  # the job settled


def test_the_registry_refuses_an_illegal_change_and_records_nothing(tmp_path) -> None:
    reg = Registry(str(tmp_path))
    job = Job(
        id="j", kind=JobKind.UPDATE, state=JobState.PENDING, spec=UpdateSpec(checkpoint="m"),
        created=1.0,
    )  # fmt: skip
    reg.put_job(job)
    with pytest.raises(IllegalTransition):
        reg.move_job(job, JobState.SUCCEEDED)  # never ran
    assert job.state == JobState.PENDING
    reg.move_job(job, JobState.RUNNING)
    assert job.started > 0
    reg.move_job(job, JobState.FAILED, "boom")
    with pytest.raises(IllegalTransition):
        reg.move_job(job, JobState.RUNNING)
    assert (job.state, job.reason) == (JobState.FAILED, "boom") and job.finished > 0

    r = RankRef("a", 0)
    cv = CheckpointVersion(
        name="m", version=1, state=CheckpointState.LOADING, tensors=[],
        shards={r: Shard(owner=r, nbytes=8, tensor_count=0)}, created=1.0,
    )  # fmt: skip
    reg.add_checkpoint(cv)
    reg.set_shard("m", 1, r, ShardState.READY)
    assert cv.state == CheckpointState.READY
    with pytest.raises(IllegalTransition):
        reg.set_shard("m", 1, r, ShardState.LOADING)
    assert cv.shards[r].state == ShardState.READY and cv.state == CheckpointState.READY
    reg.remove_agent("a")  # no agent recorded: nothing
    reg.fail_checkpoint("m", 1, "bad bytes")
    with pytest.raises(IllegalTransition):
        reg.set_shard("m", 1, r, ShardState.LOADING)
    reg.set_shard("m", 1, r, ShardState.LOST)
    assert cv.state == CheckpointState.FAILED  # failed by name: the end

    reg.put_instance(_inst(checkpoint="m", version=1, ready=True))
    with pytest.raises(IllegalTransition):
        reg.put_instance(_inst(checkpoint="m", version=2, ready=True))
    assert reg.instance("i").version == 1
    got = reg.instance("i")
    got.version = 7  # a copy: the registry's record is unchanged
    assert reg.instance("i").version == 1
    reg.close()
    again = Registry(str(tmp_path))
    assert again.job("j").state == JobState.FAILED and again.instance("i").version == 1
    again.close()
