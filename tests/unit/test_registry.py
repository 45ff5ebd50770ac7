"""Registry round trip through a restart, and proto <-> dataclass conversion."""

from __future__ import annotations

import pytest

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import InvalidArgument
from ckpt_daemon.api import convert
from ckpt_daemon.model import (
    AgentInfo,
    CheckpointState,
    CheckpointVersion,
    DeltaRef,
    DeviceInfo,
    Instance,
    InstanceKind,
    Job,
    JobKind,
    JobState,
    PhaseTimes,
    RankRef,
    RankResult,
    Shard,
    ShardState,
    TensorInfo,
    UpdateSpec,
)
from ckpt_daemon.registry.store import Registry


def make_cv() -> CheckpointVersion:
    r0, r1 = RankRef("a", 0), RankRef("b", 1)
    tensors = [
        TensorInfo(
            name="w0",
            dtype="BF16",
            shape=(2, 3),
            nbytes=12,
            owner=r0,
            store_offset=0,
            path="/x",
            file_offset=100,
        ),
        TensorInfo(
            name="w1",
            dtype="F8_E4M3",
            shape=(),
            nbytes=1,
            owner=r1,
            store_offset=0,
            delta=DeltaRef(2, 1, 1, (1 << 64) - 1, 12345, 1),
        ),  # fmt: skip
    ]
    return CheckpointVersion(
        name="m",
        version=3,
        state=CheckpointState.LOADING,
        tensors=tensors,
        shards={
            r0: Shard(owner=r0, nbytes=256, tensor_count=1),
            r1: Shard(owner=r1, nbytes=256, tensor_count=1),
        },
        created=1.0,
    )


def test_round_trip_through_restart(tmp_path) -> None:
    reg = Registry(str(tmp_path))
    cv = make_cv()
    reg.add_checkpoint(cv)
    for r in cv.shards:
        reg.set_shard("m", 3, r, ShardState.READY, segment=f"seg-{r.device}")
    reg.agent_attached(
        AgentInfo(
            node_id="a",
            host="h",
            devices=[DeviceInfo(index=0, kind="cpu", uuid="a/0", total_bytes=10, free_bytes=5)],
            attached=True,
            last_seen=2.0,
        ),
        {("m", 3, 0): (256, "h:1", 4096)},
    )
    reg.put_instance(
        Instance(
            name="i",
            kind=InstanceKind.VLLM,
            endpoint="http://x",
            tp_size=1,
            ranks=[RankRef("a", 0)],
            checkpoint="m",
            version=3,
            ready=True,
        )
    )
    done = Job(
        id="j1",
        kind=JobKind.UPDATE,
        state=JobState.SUCCEEDED,
        spec=UpdateSpec(checkpoint="m", ranks=[0]),
        created=1.0,
        version=3,
        targets=[RankRef("a", 0)],
        target_ranks=[0],
        results=[RankResult(rank=0, owner=RankRef("a", 0), ok=True, times=PhaseTimes(total_s=1.5))],
    )
    running = Job(
        id="j2",
        kind=JobKind.UPDATE,
        state=JobState.RUNNING,
        spec=UpdateSpec(checkpoint="m"),
        created=2.0,
    )
    reg.put_job(done)
    reg.put_job(running)
    assert reg.get_checkpoint("m").version == 3
    reg.close()

    reg2 = Registry(str(tmp_path))
    cv2 = reg2.get_checkpoint("m", 3)
    assert cv2 is not None and cv2.state == CheckpointState.READY
    assert [t.name for t in cv2.tensors] == ["w0", "w1"]
    assert cv2.tensors[0].shape == (2, 3) and cv2.tensors[0].file_offset == 100
    assert cv2.tensors[0].delta is None  # a delta store's payload keeps its proof
    assert cv2.tensors[1].delta == DeltaRef(2, 1, 1, (1 << 64) - 1, 12345, 1)
    assert cv2.shards[RankRef("b", 1)].segment == "seg-1"
    assert reg2.agent("a").attached is False  # until it re-attaches
    assert reg2.instance("i").ranks == [RankRef("a", 0)] and reg2.instance("i").ready
    assert reg2.job("j1").results[0].times.total_s == 1.5
    assert reg2.job("j2").state == JobState.FAILED and "restarted" in reg2.job("j2").reason
    # An agent that comes back without the bytes: its shard is lost, the checkpoint too.
    reg2.agent_attached(
        AgentInfo(node_id="b", host="h", devices=[], attached=True, last_seen=3.0), {}
    )
    assert cv2.shards[RankRef("b", 1)].state == ShardState.LOST
    assert cv2.state == CheckpointState.LOST
    reg2.close()
    assert Registry(str(tmp_path)).get_checkpoint("m", 3).state == CheckpointState.LOST


def test_newest_ready_version(tmp_path) -> None:
    reg = Registry(str(tmp_path))
    for v in (1, 2):
        cv = make_cv()
        cv.version = v
        reg.add_checkpoint(cv)
        if v == 1:
            for r in cv.shards:
                reg.set_shard("m", 1, r, ShardState.READY)
    assert reg.get_checkpoint("m").version == 1  # 2 is still loading
    dup = make_cv()
    dup.version = 1
    with pytest.raises(KeyError):
        reg.add_checkpoint(dup)


def test_convert_round_trips() -> None:
    cv = make_cv()
    order = {RankRef("a", 0): 0, RankRef("b", 1): 1}
    pb = convert.checkpoint_to_pb(cv, order, include_tensors=True)
    assert pb.tensor_count == 2 and pb.total_bytes == 13
    assert [s.rank for s in pb.shards] == [0, 1]
    assert list(pb.tensors[0].shape) == [2, 3]

    spec = convert.update_spec_from_pb(
        cpb.UpdateRequest(
            checkpoint="m", version=2, ranks=[3, 1, 3], tensors=["model.layers.0."], timeout_s=5
        )
    )
    assert spec.ranks == [1, 3] and spec.method == "auto" and spec.version == 2
    with pytest.raises(InvalidArgument):
        convert.update_spec_from_pb(cpb.UpdateRequest(checkpoint="m", bucket_bytes=-1))

    inst = convert.instance_from_pb(
        tpb.Instance(
            name="x",
            endpoint="http://h:1",
            tp_size=2,
            ranks=[
                tpb.InstanceRank(node_id="a", device=0),
                tpb.InstanceRank(node_id="a", device=1),
            ],
        )
    )
    assert inst.kind == InstanceKind.VLLM and inst.ranks[1] == RankRef("a", 1)
    back = convert.instance_to_pb(inst, {RankRef("a", 0): 4, RankRef("a", 1): 5})
    assert list(back.global_ranks) == [4, 5]
    for bad in (
        tpb.Instance(name="x", endpoint="http://h"),
        tpb.Instance(name="x", endpoint="nope", ranks=[tpb.InstanceRank(node_id="a")]),
        tpb.Instance(
            name="x", endpoint="http://h", tp_size=2, ranks=[tpb.InstanceRank(node_id="a")]
        ),
    ):
        with pytest.raises(InvalidArgument):
            convert.instance_from_pb(bad)

    job = Job(
        id="j",
        kind=JobKind.UPDATE,
        state=JobState.FAILED,
        spec=UpdateSpec(checkpoint="m", instances=["x"]),
        created=1.0,
        reason="boom",
        target_ranks=[0, 2],
        results=[RankResult(rank=2, owner=RankRef("a", 1), ok=False, reason="r")],
    )
    jp = convert.job_to_pb(job)
    assert jp.state == tpb.JOB_FAILED and list(jp.ranks) == [0, 2] and jp.results[0].device == 1


def test_layouts_are_stored_by_digest_and_survive_a_restart(tmp_path) -> None:
    reg = Registry(str(tmp_path))
    maps = [{"a.weight": [[0, 0], [2, 4]], "n.weight": "whole"}, {"a.weight": [[2, 0], [2, 4]]}]
    lid = reg.put_layout(maps)
    assert reg.put_layout([dict(m) for m in maps]) == lid  # same layout, same id
    assert reg.put_layout(maps[::-1]) != lid
    reg.close()
    again = Registry(str(tmp_path))
    assert again.layout(lid) == maps and again.layout("nope") is None
    again.close()


def test_writes_never_wait_for_the_disk_and_land_in_order(tmp_path) -> None:
    """The database is stalled (its writer thread held): a write on the registry's loop
    changes memory and returns at once; synced() waits until the disk has it; a write from
    any other thread is refused; threads read the published view. Released, the writes land
    in the order memory changed: a restart finds the last one."""
    import asyncio
    import threading
    import time

    def inst(endpoint: str) -> Instance:
        return Instance(name="i", kind=InstanceKind.VLLM, endpoint=endpoint, tp_size=1,
                        ranks=[RankRef("a", 0)])  # fmt: skip

    async def case() -> None:
        reg = Registry(str(tmp_path))
        stall, held = threading.Event(), threading.Event()
        threading.Thread(
            target=reg._writer.call, args=(lambda db: (held.set(), stall.wait(30)),), daemon=True
        ).start()
        assert held.wait(10)
        t0 = time.monotonic()
        for k in range(3):
            reg.put_instance(inst(f"http://x{k}"))
        assert reg.instance("i").endpoint == "http://x2"  # memory changed at once
        assert reg.rank_order() == [] and reg.counts() == (0, 0)
        assert time.monotonic() - t0 < 0.5
        seen: list[object] = []
        other = threading.Thread(
            target=lambda: seen.extend([reg.view.instances_not_ready, _raises(reg.put_instance)])
        )
        other.start()
        other.join(10)
        assert seen == [1, RuntimeError]  # the view was published; the write was refused
        waiting = asyncio.ensure_future(reg.synced())
        await asyncio.sleep(0.3)
        assert not waiting.done()  # the disk is stalled
        stall.set()
        await asyncio.wait_for(waiting, 10)
        reg.close()

    asyncio.run(case())
    assert Registry(str(tmp_path)).instance("i").endpoint == "http://x2"


def _raises(fn) -> type[BaseException] | None:
    try:
        fn(Instance(name="j", kind=InstanceKind.VLLM, endpoint="http://y", tp_size=1, ranks=[]))
    except BaseException as e:  # noqa: BLE001 - the test wants the type
        return type(e)
    return None
