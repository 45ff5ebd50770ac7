"""Admission decisions (pure), linear tensor filters, and an agent that comes back holding
its shards after they were marked LOST."""

from __future__ import annotations

import time

import pytest

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import InvalidArgument
from ckpt_daemon import admission
from ckpt_daemon.model import (
    AgentInfo,
    CheckpointState,
    DeviceInfo,
    RankRef,
    ShardState,
    TensorInfo,
)
from ckpt_daemon.plan.planner import select_tensors
from ckpt_daemon.registry.store import Registry
from tests.unit.test_registry import make_cv

GiB = 1 << 30


def test_admit() -> None:
    assert admission.admit({"a": 10 * GiB}, {"a": 24 * GiB}) == ""
    why = admission.admit({"a": 4096 * GiB}, {"a": 24 * GiB})
    assert "24.0 GiB" in why and "4096.0 GiB" in why
    # what versions still loading will take counts against the free memory
    assert admission.admit({"a": 10 * GiB}, {"a": 24 * GiB}, {"a": 20 * GiB})
    assert admission.admit({"a": 1, "b": 30 * GiB}, {"a": 24 * GiB, "b": 24 * GiB})
    assert admission.admit({"a": 1}, {}) != ""  # a node that reports nothing has nothing


def test_bounded_and_shown() -> None:
    assert len(admission.bounded("x" * 100000)) <= admission.MAX_DETAIL + 3
    assert admission.bounded("a\x00\nb") == "a??b"
    assert len(admission.shown("y" * 10000)) < 100


def test_check_message_walks_every_field() -> None:
    bad = [
        cpb.PushCheckpointRequest(name="ok", sources=[tpb.Source(path="/a\x00")]),
        cpb.BeginPushRequest(tensors=[tpb.TensorMeta(name="w", nbytes=-1)]),
        cpb.UpdateRequest(checkpoint="a", timeout_s=float("inf")),
        cpb.GetCheckpointRequest(name="a", version=2**64 - 1),
        tpb.Instance(name="x", ranks=[tpb.InstanceRank(node_id="n", device=-3)]),
    ]
    for req in bad:
        with pytest.raises(InvalidArgument):
            admission.check_message(req)
    admission.check_message(cpb.UpdateRequest(checkpoint="a", version=3, ranks=[0, 1]))


def test_filters_are_linear() -> None:
    ts = [
        TensorInfo(name=f"model.layers.{i}.mlp.w{j}", dtype="F32", shape=(1,), nbytes=4,
                   owner=RankRef("a", 0), store_offset=0)
        for i in range(2000)
        for j in range(50)
    ]  # fmt: skip
    patterns = [f"model.layers.{i}.mlp.w7" for i in range(0, 4000, 5)]  # 800 patterns
    t0 = time.monotonic()
    got = select_tensors(ts, patterns)
    took = time.monotonic() - t0
    assert len(got) == 400 and {t.name.rsplit(".", 1)[1] for t in got} == {"w7"}
    assert took < 2.0, took  # was 80 million comparisons
    assert [t.name for t in select_tensors(ts[:3], ["model.layers.0.mlp.w1"])] == [
        "model.layers.0.mlp.w1"
    ]


def test_an_agent_back_with_its_shards_makes_them_ready_again(tmp_path) -> None:
    reg = Registry(str(tmp_path))
    cv = make_cv()
    reg.add_checkpoint(cv)
    for r in cv.shards:
        reg.set_shard("m", 3, r, ShardState.READY, segment=f"seg-{r.device}")

    def attach(held: dict) -> None:
        reg.agent_attached(
            AgentInfo(
                node_id="a",
                host="h",
                devices=[DeviceInfo(index=0, kind="cpu", uuid="a/0", total_bytes=1, free_bytes=1)],
                attached=True,
                last_seen=1.0,
            ),
            held,
        )

    attach({})  # e.g. an impostor that holds nothing
    assert reg.checkpoint("m", 3).shards[RankRef("a", 0)].state == ShardState.LOST
    assert reg.checkpoint("m", 3).state == CheckpointState.LOST
    attach({("m", 3, 0): (256, "h:1", 4096)})  # the node's agent, still holding it
    assert reg.checkpoint("m", 3).shards[RankRef("a", 0)].state == ShardState.READY
    assert reg.checkpoint("m", 3).state == CheckpointState.READY
    reg.flush()
    assert Registry(str(tmp_path)).checkpoint("m", 3).state == CheckpointState.READY
    assert reg.remove_agent("a") is not None
    assert reg.checkpoint("m", 3).state == CheckpointState.LOST
    reg.flush()
    assert Registry(str(tmp_path)).agent("a") is None
