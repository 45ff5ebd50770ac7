"""ckpt_daemon.agents: the commands built from plain values and the results read back into
plain values (the only place either touches the agent protocol)."""

from __future__ import annotations

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import types_pb2 as tpb
from ckpt_daemon.agents import commands, results
from ckpt_daemon.model import FailureOrigin, RankRef, TensorInfo
from ckpt_daemon.plan.planner import plan_p2p


def test_run_updates_group_rendezvous_plan_and_deadlines() -> None:
    owners = [RankRef("a", 0), RankRef("b", 0)]
    tensors = [
        TensorInfo(name=f"t{i}", dtype="U8", shape=(4096,), nbytes=4096,
                   owner=owners[i % 2], store_offset=(i // 2) * 4096)
        for i in range(6)
    ]  # fmt: skip
    targets = [RankRef("c", 0), RankRef("c", 1)]
    plan, sources = plan_p2p(tensors, targets, bucket_bytes=8192)
    run = commands.UpdateRun(
        job_id="j", checkpoint="m", version=3, plan=plan, master=("h", 1234),
        sources=[commands.P2PSource(session=f"{o.node_id}:1", addr=7) for o in sources],
        timeout_s=60.0, receiver_timeout_s=20.0,
    )  # fmt: skip
    cmds = commands.run_updates(run, [True, False])
    assert len(cmds) == 2
    for i, c in enumerate(cmds):
        u = c.run_update
        assert (u.job_id, u.checkpoint, u.version, u.device) == ("j", "m", 3, i)
        assert (u.rendezvous.group_rank, u.rendezvous.world_size) == (i, 2)
        assert (u.rendezvous.master_addr, u.rendezvous.master_port) == ("h", 1234)
        assert u.deadlines.timeout_s == 60.0 and u.deadlines.receiver_timeout_s == 20.0
        assert u.is_target and u.want_layout == (i == 0)
        assert [s.session for s in u.plan.sources] == ["a:1", "b:1"]
        entries = [e for b in u.plan.buckets for e in b.entries]
        # each entry names its source and its offset there, in fields of their own
        for e in entries:
            t = plan.tensors[e.tensor]
            assert sources[e.source] == t.owner and e.store_offset == t.store_offset
        assert {e.source for e in entries} == {0, 1}


def test_spans_become_load_items() -> None:
    span = commands.Span(store_offset=8, nbytes=16, path="/f", file_offset=4, file_size=99)
    item = commands.load("m", 1, 0, 64, [span], read_uid=5).load.items[0]
    assert (item.path, item.file_offset, item.store_offset, item.nbytes) == ("/f", 4, 8, 16)
    assert item.file_size == 99 and item.file_ino == 0


def test_a_failed_rank_reads_its_origin() -> None:
    def done(ok: bool, origin: int) -> apb.CommandResult:
        r = tpb.RankResult(ok=ok, reason="another rank failed: x" if not ok else "")
        return apb.CommandResult(ok=True, update=apb.UpdateDone(result=r, origin=origin))

    me = RankRef("n", 0)
    peer = results.rank_result(1, me, done(False, apb.ORIGIN_PEER))
    own = results.rank_result(2, me, done(False, apb.ORIGIN_SELF))
    unsaid = results.rank_result(3, me, done(False, apb.ORIGIN_UNSPECIFIED))
    aborted = results.rank_result(4, me, done(False, apb.ORIGIN_DAEMON))
    assert peer.origin == FailureOrigin.PEER and not peer.own_failure
    assert not aborted.own_failure
    assert own.own_failure and unsaid.own_failure  # an unsaid origin is the rank's own
    ok = results.rank_result(0, me, done(True, apb.ORIGIN_UNSPECIFIED))
    assert ok.ok and not ok.own_failure


def test_a_layout_travels_as_a_message_and_comes_back_a_map() -> None:
    from ckpt_common.layout_wire import from_pb, to_pb

    layout = {"a": "whole", "b": [[0, 64], [32, 64]], "c": "none", "s": [[], []]}
    msg = to_pb(layout)
    assert [t.name for t in msg.tensors] == ["a", "b", "c", "s"]
    again = apb.UpdateDone.FromString(apb.UpdateDone(layout=msg).SerializeToString())
    assert from_pb(again.layout) == layout
    res = apb.CommandResult(ok=True, update=again)
    assert results.layout(res) == layout
    assert results.layout(apb.CommandResult(ok=True, update=apb.UpdateDone())) is None
