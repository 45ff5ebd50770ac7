"""Delta updates on real processes: ckptd, an agent with two devices, reference receivers.

Each version after the first changes ~2 % of every tensor's elements (what an Adam step does
to bf16 weights); ckptd diffs it in the host stores against the version the instance serves,
and the update moves only the delta. Every engine ends byte-exact on the target; an engine
not on the base gets the full version; a corrupted delta byte fails before the engine
resumes and the previous version stays served."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import shm
from ckpt_agent.host_store import device_prefix, store_segment
from ckpt_common.delta import store_name
from tests.support.cluster import Cluster, reports_hold, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors, write_sharded

SPEC = ClusterSpec(
    receiver_timeout_s=4,
    nodes=(Node(id="node-d", devices=2),),
    receivers=(
        Receivers(node="node-d", devices=(0,), instance="R"),
        Receivers(node="node-d", devices=(1,), instance="S"),
    ),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "delta")


def stepped(t: dict[str, torch.Tensor], seed: int, frac: float = 0.02) -> dict[str, torch.Tensor]:
    """t with ~frac of each tensor's elements changed in their lowest bit."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, x in t.items():
        y = x.clone()
        flat = y.reshape(-1).view({1: torch.int8, 2: torch.int16, 4: torch.int32}[x.element_size()])
        k = max(1, int(flat.numel() * frac)) if flat.numel() else 0
        idx = torch.randperm(flat.numel(), generator=g)[:k]
        flat[idx] ^= 1
        out[name] = y
    return out


def _holds(c: Cluster, instance: str, t: dict[str, torch.Tensor]) -> bool:
    """The instance's engine holds exactly t (its report is written just after the update
    ends: waited for a while)."""
    return reports_hold([c.reports[0 if instance == "R" else 1]], digests(t))


def _push(c: Cluster, tmp: Path, version: int, t: dict[str, torch.Tensor]) -> None:
    c.client.push("dl", version, [str(write_sharded(t, tmp / f"v{version}"))])


def _update(c: Cluster, version: int, instances=("R",), **kw) -> tpb.Job:
    job = c.client.update("dl", version, instances=list(instances), bucket_bytes=1 << 14, **kw)
    return c.client.wait(job.id, 60)


def _serves(c: Cluster, name: str) -> tuple[str, int]:
    (i,) = [i for i in c.client.instances() if i.name == name]
    return i.checkpoint, i.version


def test_chained_deltas_then_rollback(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    versions = {1: mixed_tensors(41)}
    _push(c, tmp_path, 1, versions[1])
    job = _update(c, 1, ("R", "S"))
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.method == tpb.UPDATE_BROADCAST
    dense = sum(t.numel() * t.element_size() for t in versions[1].values())
    for v in range(2, 22):  # 20 chained: each a step from the version the engines serve
        versions[v] = stepped(versions[v - 1], v)
        _push(c, tmp_path, v, versions[v])
        job = _update(c, v, ("R", "S"))
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert job.method == tpb.UPDATE_DELTA, job.method_reason
        assert f"since version {v - 1}" in job.method_reason
        assert _holds(c, "R", versions[v]) and _holds(c, "S", versions[v])
        moved = sum(r.bytes for r in job.results) / len(job.results)
        assert 0 < moved < 0.35 * dense, (moved, dense)
        assert job.bytes_total < 0.35 * dense  # the job reports the bytes it moved
        # the hidden delta store is no version a user lists
        assert all(not cp.name.startswith("~") for cp in c.client.checkpoints())
    # a rollback: the instances serve a newer version than the target: the full version
    job = _update(c, 1, ("R", "S"))
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.method == tpb.UPDATE_BROADCAST, job.method_reason
    assert "not a delta" in job.method_reason
    assert _holds(c, "R", versions[1]) and _holds(c, "S", versions[1])
    # unrelated weights: the delta would not pay, none is made, the update is a broadcast
    _push(c, tmp_path, 30, mixed_tensors(999))
    wait_for(lambda: "delta_not_made" in c.log("ckptd"), 30, "the diff to be given up")
    job = _update(c, 30, ("R", "S"))
    assert job.method == tpb.UPDATE_BROADCAST and "no delta store" in job.method_reason
    assert not [k for k in os.listdir(shm.SHM_DIR) if "_delta_1_dl_30" in k]
    for v in (*range(2, 22), 30):
        c.client.delete("dl", v)
    assert not [k for k in os.listdir(shm.SHM_DIR) if "delta" in k]


def test_an_engine_off_the_base_gets_the_full_version(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t1 = mixed_tensors(51)
    t2, t3 = stepped(t1, 2), None
    _push(c, tmp_path, 11, t1)
    assert _update(c, 11, ("R", "S")).state == tpb.JOB_SUCCEEDED
    _push(c, tmp_path, 12, t2)
    job = _update(c, 12, ("R",))  # R moves on, S stays on 11
    assert job.method == tpb.UPDATE_DELTA, job.method_reason
    t3 = stepped(t2, 3)
    _push(c, tmp_path, 13, t3)
    job = _update(c, 13, ("R", "S"))
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.method == tpb.UPDATE_BROADCAST
    assert "different versions" in job.method_reason, job.method_reason
    assert _holds(c, "R", t3) and _holds(c, "S", t3)
    # asked for a delta where there is none: refused, nothing changes
    with pytest.raises(Exception, match="no delta update"):
        _update(c, 11, ("R", "S"), method=tpb.UPDATE_DELTA)
    assert _serves(c, "R") == ("dl", 13)


def _corrupt_delta(c: Cluster, version: int, base: int) -> None:
    seg = store_segment(device_prefix("node-d", 0), store_name("dl", base), version)
    wait_for(lambda: os.path.exists(os.path.join(shm.SHM_DIR, seg)), 30, "the delta store")
    mem = shm.attach(seg)
    try:
        mem.buf[300] ^= 0x5A  # inside the first payloads (indices or values)
    finally:
        mem.close()


def _served_then_pushed(c: Cluster, tmp: Path, seed: int, base: int, version: int) -> tuple:
    """Both instances serve `base`; `version`, a step from it, is pushed and its delta made."""
    t1 = mixed_tensors(seed)
    _push(c, tmp, base, t1)
    assert _update(c, base, ("R", "S")).state == tpb.JOB_SUCCEEDED
    t2 = stepped(t1, seed)
    _push(c, tmp, version, t2)
    wait_for(lambda: _made(c, version, base), 30, "the delta to be made")
    return t1, t2


def test_a_corrupted_delta_fails_before_resume(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t1, t2 = _served_then_pushed(c, tmp_path, 61, 21, 22)
    _corrupt_delta(c, 22, 21)
    job = _update(c, 22, ("R", "S"))
    assert job.state == tpb.JOB_FAILED
    assert "checksum mismatch" in job.reason, job.reason
    assert _holds(c, "R", t1) and _holds(c, "S", t1)
    assert _serves(c, "R") == ("dl", 21)
    # the full version still goes through
    job = _update(c, 22, ("R", "S"), method=tpb.UPDATE_BROADCAST)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert _holds(c, "R", t2) and _holds(c, "S", t2)


def _made(c: Cluster, version: int, base: int) -> bool:
    """ckptd recorded the delta store of dl@version from base (its log says so)."""
    return any(
        '"delta_made"' in line and f'"version": {version},' in line and f'"base": {base},' in line
        for line in c.log("ckptd").splitlines()
    )


def test_trainer_pushes_deltas_computed_where_its_tensors_are(cluster: Cluster) -> None:
    """Publisher(delta=True): from the second version on only the payloads are written;
    ckptd makes the full version in the host stores and the engines take the delta."""
    from ckpt_trainer.publisher import JobOutcome, Publisher

    c = cluster
    t = mixed_tensors(71)
    dense = sum(x.numel() * x.element_size() for x in t.values())
    pub = Publisher("tr", instances=["R", "S"], keep=1, direct=True, delta=True,
                    node_id="node-d", client=c.client, timeout_s=60)  # fmt: skip
    for step in range(1, 7):
        if step > 1:
            t = stepped(t, 100 + step)
        res = pub.publish(step, t)
        assert res.state == JobOutcome.SUCCEEDED, res.reason
        job = c.client.job(res.job_id)
        if step == 1:
            assert job.method == tpb.UPDATE_BROADCAST
            continue
        assert job.method == tpb.UPDATE_DELTA, job.method_reason
        assert c.client.last_push.bytes < 0.35 * dense, (c.client.last_push.bytes, dense)
        assert reports_hold(c.reports, digests(t))  # byte-exact on both engines
        # the full version is made in the host stores too, after the update (a join or a
        # restore reads it)
        wait_for(lambda s=step: c.client.get("tr", s).state == tpb.CHECKPOINT_READY, 30, "made")
        cp = c.client.get("tr", step, tensors=True)
        assert len(cp.tensors) == len(t)
        assert len(c.client.checkpoints("tr")) <= 2  # keep=1: the base goes once it is made
    # a broadcast of the delta-made version is byte-exact too (its stores are whole)
    job = _update_named(c, "tr", 6, tpb.UPDATE_BROADCAST)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason


def _update_named(c: Cluster, name: str, version: int, method: int) -> tpb.Job:
    job = c.client.update(name, version, instances=["R", "S"], method=method)
    return c.client.wait(job.id, 60)


def _raw_delta_push(
    c: Cluster, name: str, version: int, base: int, metas, payloads=None, early: bool = False
):
    """BeginPush (delta) as a hostile or broken trainer would send it; with payloads, they
    are written and committed with their own checksums."""
    from ckpt.v1 import ckptd_pb2 as cpb
    from ckpt_client.direct_push import write_items

    req = cpb.BeginPushRequest(name=name, version=version, node_id="node-d", tensors=metas,
                               timeout_s=30, delta_base=base)  # fmt: skip
    plan = c.client._call("BeginPush", req)
    if payloads is None:
        return plan
    sums, _ = write_items(plan, payloads, c.client.segments)
    return c.client._call(
        "CommitPush",
        cpb.CommitPushRequest(name=name, version=version, checksums=sums, early=early),
    )


def test_bad_delta_pushes_change_nothing(cluster: Cluster) -> None:
    from ckpt_common import checksum, delta
    from ckpt_common.errors import AlreadyExists, DataLoss, InvalidArgument, NotFound
    from ckpt_trainer.deltas import DeltaTracker

    c = cluster
    t1 = {"a": torch.arange(64, dtype=torch.int16), "b": torch.ones(3, 4)}
    c.client.push_direct("bad", 1, t1, node_id="node-d")
    tracker = DeltaTracker()
    tracker.remember(1, t1)
    t2 = {"a": t1["a"].clone(), "b": t1["b"].clone()}
    t2["a"][5] = 99
    items = tracker.deltas(t2)
    assert items is not None
    good = [d.meta(1) for d in items]

    def metas(**change):
        out = [m.__deepcopy__() for m in good]
        for field, value in change.items():
            target, _, attr = field.partition("__")
            m = out[0]
            setattr(m.delta if target == "delta" else m, attr or target, value)
        return out

    cases = [
        (NotFound, 1, good, "does not exist"),  # a base that never existed (other name)
        (InvalidArgument, 1, good[:1], "leaves out"),
        (InvalidArgument, 1, good + good[:1], "declared twice"),
        (InvalidArgument, 1, metas(name="zz"), "no such tensor"),
        (InvalidArgument, 1, metas(dtype="F32"), "holds it as"),
        (InvalidArgument, 1, metas(delta__encoding=9), "encoding"),
        (InvalidArgument, 1, metas(delta__count=65), "changed elements"),
        (InvalidArgument, 1, metas(nbytes=good[0].nbytes + 8), "needs"),
        # a sparse delta of 40 of 64 elements: 40 * 6 bytes, larger than the tensor
        (InvalidArgument, 1, metas(delta__count=40, nbytes=160 + 80), "larger than"),
    ]
    for k, (err, base, ms, why) in enumerate(cases):
        with pytest.raises(err, match=why):
            _raw_delta_push(c, "bad" if k else "never", 2, base, ms)
    with pytest.raises(InvalidArgument, match="older"):
        _raw_delta_push(c, "bad", 2, 3, good)
    assert [v.version for v in c.client.checkpoints("bad")] == [1]
    # well-formed sizes, hostile content: an index out of range is caught when the full
    # version is made; nothing is kept and version 2 can be pushed again
    bad = items[0].payload.clone()
    bad[:4].view(torch.int32)[0] = 1000
    with pytest.raises(DataLoss, match="outside"):
        _raw_delta_push(c, "bad", 2, 1, good, [bad, items[1].payload])
    # committed early (the version made in the background): it goes again once that fails
    cp = _raw_delta_push(c, "bad", 2, 1, good, [bad, items[1].payload], early=True)
    assert cp.state == tpb.CHECKPOINT_LOADING
    wait_for(lambda: [v.version for v in c.client.checkpoints("bad")] == [1], 30, "it to go")
    # a target checksum that the result does not have (a wrong delta): refused the same way
    lie = [m.__deepcopy__() for m in good]
    lie[0].delta.target_checksum ^= 1
    with pytest.raises(DataLoss, match="not the target"):
        _raw_delta_push(c, "bad", 2, 1, lie, [d.payload for d in items])
    assert [v.version for v in c.client.checkpoints("bad")] == [1]
    assert not [k for k in os.listdir(shm.SHM_DIR) if "_delta_1_bad" in k]
    cp = _raw_delta_push(c, "bad", 2, 1, good, [d.payload for d in items])
    assert cp.state == tpb.CHECKPOINT_READY
    got = c.client.get("bad", 2, tensors=True)
    want = checksum.of_torch(t2["a"].view(torch.uint8))
    assert {m.name: m.checksum for m in got.tensors}["a"] == want
    with pytest.raises(AlreadyExists, match="already exists"):
        _raw_delta_push(c, "bad", 2, 1, good)
    c.client.delete("bad", 1)  # the base may go: version 2 is whole in the host stores
    with pytest.raises(NotFound, match="does not exist"):
        _raw_delta_push(c, "bad", 3, 1, good)
    assert delta.Encoding(items[0].encoded.encoding) == delta.Encoding.SPARSE


def test_delta_stores_survive_a_ckptd_restart(cluster: Cluster, tmp_path: Path) -> None:
    """Delta stores are versions of the registry: after ckptd restarts (the agents keep the
    segments and re-attach), the next update still moves only the delta. Last in the
    module: it restarts ckptd."""
    c = cluster
    t1, t2 = _served_then_pushed(c, tmp_path, 81, 31, 32)
    c.stop("ckptd")
    c.start_daemon("--receiver-timeout-s", "4")
    c.wait_ranks(2)
    wait_for(lambda: all(i.ready for i in c.client.instances()), 30, "instances ready")
    job = _update(c, 32, ("R", "S"))
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.method == tpb.UPDATE_DELTA, job.method_reason
    assert _holds(c, "R", t2) and _holds(c, "S", t2)
    # deleting the target deletes its delta store, segments included
    assert _update(c, 31, ("R", "S")).state == tpb.JOB_SUCCEEDED
    c.client.delete("dl", 32)
    assert not [k for k in os.listdir(shm.SHM_DIR) if "_delta_31_dl_32" in k]


RESUME = ClusterSpec(
    receiver_timeout_s=4,
    nodes=(Node(id="node-r", env=(("CKPT_FAULT", "patch_delay:4"),)),),
    receivers=(Receivers(node="node-r", devices=(0,), instance="Q"),),
)


def test_a_ckptd_crash_while_a_version_is_made_from_its_delta(make_cluster) -> None:
    """A delta push committed early; ckptd is killed while the owner makes the version
    (slowed by the fault hook); the restarted ckptd makes it again from its base and delta
    store, and the version serves exactly the trainer's bytes."""
    from ckpt_trainer.deltas import DeltaTracker

    c = make_cluster(RESUME, "resume")
    t1 = mixed_tensors(91)
    c.client.push_direct("rs", 1, t1, node_id="node-r")
    tracker = DeltaTracker()
    tracker.remember(1, t1)
    t2 = stepped(t1, 3)
    items = tracker.deltas(t2)
    assert items is not None
    cp = c.client.push_delta("rs", 2, 1, items, node_id="node-r", early=True)
    assert cp.state == tpb.CHECKPOINT_LOADING
    c.stop("ckptd", signal.SIGKILL)
    c.start_daemon("--receiver-timeout-s", "4")
    c.wait_ranks(1)
    wait_for(lambda: c.client.get("rs", 2).state == tpb.CHECKPOINT_READY, 60, "made again")
    assert "delta_push_resumed" in c.log("ckptd")
    job = c.client.wait(c.client.update("rs", 2, instances=["Q"]).id, 60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert reports_hold(c.reports, digests(t2))
