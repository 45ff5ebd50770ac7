"""An update streamed from a push still being written (UpdateRequest.stream; real ckptd,
agent and reference receivers on loopback).

The trainer declares its checksums at BeginPush, submits the update, then writes its bytes
in store order, raising a progress mark per segment; each owner copies a bucket only once
the mark has passed it. Engines verify every tensor against the declared checksums and the
job succeeds only once the push has committed. A push that stops writing fails the job
within seconds and the engines serve their previous version; a byte that differs from the
declared checksums fails the update before any engine resumes on it.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.stream_wait import await_written, bucket_end
from ckpt_client.d2h import in_order
from ckpt_client.direct_push import item_checksums, tensor_metas, whole, write_items
from ckpt_common import progress
from ckpt_common.errors import FailedPrecondition, InvalidArgument
from ckpt_trainer.publisher import Publisher
from tests.support.cluster import Cluster, reports_hold, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors

INSTANCES = ["R", "S"]


SPEC = ClusterSpec(
    receiver_timeout_s=6,
    nodes=(Node(id="node-t", devices=2, args=("--spare-stores", "2")),),
    receivers=(
        Receivers(node="node-t", devices=(0,), instance="R"),
        Receivers(node="node-t", devices=(1,), instance="S"),
    ),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "streamed")


def holds(c: Cluster, t: dict[str, torch.Tensor]) -> bool:
    return reports_hold(c.reports, digests(t))


def serving(c: Cluster) -> set[tuple[str, int, bool]]:
    return {(i.checkpoint, i.version, i.ready) for i in c.client.instances() if i.name in INSTANCES}


def begin(c: Cluster, name: str, version: int, t: dict, *, declare: bool = True, timeout_s=30):
    """BeginPush with the trainer's checksums declared: (plan, flats, checksums)."""
    metas, flats = tensor_metas(whole(t))
    sums = item_checksums(flats, threads=2)
    if declare:
        for m, s in zip(metas, sums, strict=True):
            m.checksum = s
    req = cpb.BeginPushRequest(
        name=name, version=version, node_id="node-t", tensors=metas, timeout_s=timeout_s
    )
    return c.client._call("BeginPush", req), flats, sums


def serve_base(c: Cluster, name: str, seed: int) -> dict[str, torch.Tensor]:
    """Version 1 of name pushed (unstreamed) and served by every instance: its tensors."""
    base = mixed_tensors(seed, layers=3)
    c.client.push_direct(name, 1, base, node_id="node-t")
    job = c.client.wait(c.client.update(name, 1, instances=INSTANCES).id, 60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    return base


def streamed_update(c: Cluster, name: str, version: int) -> tpb.Job:
    return c.client.update(name, version, instances=INSTANCES, stream=True, bucket_bytes=1 << 13)


# ------------------------------------------------------------------ pure


def test_marks_rise_with_the_longest_complete_prefix() -> None:
    put: list[tuple[int, int]] = []
    m = progress.Marks([(0, 10), (0, 20), (1, 5), (0, 30)], lambda s, v: put.append((s, v)))
    m.complete(1)  # out of order: nothing yet
    assert put == []
    m.complete(0)
    assert put == [(0, 20)]
    m.complete(2)  # segment 1's only piece: done
    m.complete(3)
    assert put == [(0, 20), (1, progress.DONE), (0, progress.DONE)]
    m.finish(3)
    assert put[-3:] == [(0, progress.DONE), (1, progress.DONE), (2, progress.DONE)]


def test_ordered_d2h_keeps_each_streams_pieces_in_order() -> None:
    plan = in_order([10, 0, 3, 7, 25], streams=3, split=8)
    pieces = sorted(p for s in plan for p in s)
    assert pieces == [(0, 0, 8), (0, 8, 2), (2, 0, 3), (3, 0, 7), (4, 0, 8), (4, 8, 8),
                      (4, 16, 8), (4, 24, 1)]  # fmt: skip
    for s in plan:
        assert s == sorted(s)


def test_a_worker_waits_for_the_mark_and_gives_up_when_it_stops() -> None:
    buf = np.zeros(4096 + progress.TRAILER, dtype=np.uint8)

    class Mem:
        pass

    mem = Mem()
    mem.buf = memoryview(buf)  # type: ignore[attr-defined]
    abort = threading.Event()
    far = time.monotonic() + 60
    progress.write(buf, 100)
    assert await_written(mem, 100, abort, 1.0, far) == ""

    def later() -> None:
        time.sleep(0.3)
        progress.write(buf, 2000)

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    assert await_written(mem, 1500, abort, 1.0, far) == ""
    assert 0.25 < time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    why = await_written(mem, 3000, abort, 0.5, far)
    assert "stopped writing" in why and 0.45 < time.monotonic() - t0 < 2.0
    abort.set()
    assert await_written(mem, 3000, abort, 5.0, far) == "aborted by ckptd"


def test_bucket_end_covers_strided_reads() -> None:
    e = [
        apb.BucketEntry(store_offset=100, nbytes=50),
        apb.BucketEntry(store_offset=0, nbytes=40, rows=4, stride=100),
    ]
    assert bucket_end(e) == max(150, 0 + 3 * 100 + 10)


# ------------------------------------------------------------------ real processes


def test_publish_streams_and_every_engine_holds_the_pushed_bytes(cluster: Cluster) -> None:
    c = cluster
    pub = Publisher(
        "pub", instances=INSTANCES, node_id="node-t", direct=True, keep=1, client=c.client
    )
    for step in (1, 2, 3):
        t = mixed_tensors(100 + step, layers=3)
        res = pub.publish(step, t)
        assert res.state.value == "succeeded", res.reason
        assert res.streamed and c.client.last_push.streamed
        assert holds(c, t)
        assert serving(c) == {("pub", step, True)}
        job = c.client.job(res.job_id)
        assert job.method == tpb.UPDATE_BROADCAST and "streamed" in job.method_reason
    assert [cp.version for cp in c.client.checkpoints("pub")] == [3]


def test_the_update_waits_for_the_bytes_then_streams_them(cluster: Cluster) -> None:
    c = cluster
    t = mixed_tensors(7, layers=3)
    plan, flats, _ = begin(c, "wait", 1, t)
    job = streamed_update(c, "wait", 1)
    time.sleep(1.5)  # the job runs; the owners wait at the mark (still 0)
    job = c.client.job(job.id)
    assert job.state == tpb.JOB_RUNNING and job.buckets_done == 0, job
    assert c.client.get("wait", 1).state == tpb.CHECKPOINT_LOADING
    write_items(plan, flats, c.client.segments, threads=2, sums=False, marked=True)
    time.sleep(0.5)  # all landed, not committed: the job may not succeed yet
    assert c.client.job(job.id).state == tpb.JOB_RUNNING
    cp = c.client._call("CommitPush", cpb.CommitPushRequest(name="wait", version=1))
    assert cp.state == tpb.CHECKPOINT_READY
    job = c.client.wait(job.id, 30)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert holds(c, t) and serving(c) == {("wait", 1, True)}


def test_a_push_that_stops_writing_fails_the_job_and_engines_keep_their_version(
    cluster: Cluster,
) -> None:
    c = cluster
    base = serve_base(c, "stop", 11)
    t = mixed_tensors(12, layers=3)
    _plan, _flats, _ = begin(c, "stop", 2, t, timeout_s=60)  # the trainer dies here
    t0 = time.monotonic()
    job = c.client.wait(streamed_update(c, "stop", 2).id, 60)
    took = time.monotonic() - t0
    assert job.state == tpb.JOB_FAILED and "stopped writing" in job.reason, job.reason
    assert took < 10, took
    wait_for(lambda: serving(c) == {("stop", 1, True)}, 30, "the engines on version 1")
    assert holds(c, base)


def test_a_push_that_expires_fails_its_streamed_job_at_once(cluster: Cluster) -> None:
    c = cluster
    t = mixed_tensors(13, layers=3)
    plan, flats, _ = begin(c, "exp", 1, t, timeout_s=2)
    t0 = time.monotonic()
    job = c.client.wait(streamed_update(c, "exp", 1).id, 30)
    assert job.state == tpb.JOB_FAILED and "exp@1" in job.reason, job.reason
    assert time.monotonic() - t0 < 5
    wait_for(lambda: not c.client.checkpoints("exp"), 20, "the expired push to be gone")


def test_bytes_unlike_the_declared_checksums_fail_before_any_engine_resumes(
    cluster: Cluster,
) -> None:
    c = cluster
    base = serve_base(c, "lie", 21)
    t = mixed_tensors(22, layers=3)
    plan, flats, _ = begin(c, "lie", 2, t)
    job = streamed_update(c, "lie", 2)
    victim = list(t).index("model.layers.2.self_attn.qkv_proj.weight")
    flats[victim] = flats[victim].clone()
    flats[victim][flats[victim].numel() // 2] ^= 1  # one bit, after the checksums
    write_items(plan, flats, c.client.segments, threads=2, sums=False, marked=True)
    c.client._call("CommitPush", cpb.CommitPushRequest(name="lie", version=2))
    job = c.client.wait(job.id, 60)
    assert job.state == tpb.JOB_FAILED and "checksum" in job.reason, job.reason
    wait_for(lambda: serving(c) == {("lie", 1, True)}, 30, "the engines on version 1")
    assert holds(c, base)


def test_streaming_is_refused_where_it_cannot_be_proven(cluster: Cluster) -> None:
    c = cluster
    t = mixed_tensors(31, layers=1)
    plan, flats, sums = begin(c, "nodecl", 1, t, declare=False)
    with pytest.raises(FailedPrecondition):  # no declared checksums: nothing to verify by
        streamed_update(c, "nodecl", 1)
    write_items(plan, flats, c.client.segments, threads=2, sums=False)
    c.client._call("CommitPush", cpb.CommitPushRequest(name="nodecl", version=1, checksums=sums))
    plan, flats, sums = begin(c, "decl", 1, t)
    with pytest.raises(FailedPrecondition):
        c.client.update("decl", 1, instances=INSTANCES, stream=True, method=tpb.UPDATE_SHARDED)
    write_items(plan, flats, c.client.segments, threads=2, sums=False, marked=True)
    wrong = [s ^ 1 for s in sums]
    with pytest.raises(InvalidArgument):  # other checksums than declared: nothing changes
        c.client._call("CommitPush", cpb.CommitPushRequest(name="decl", version=1, checksums=wrong))
    cp = c.client._call("CommitPush", cpb.CommitPushRequest(name="decl", version=1, checksums=sums))
    assert cp.state == tpb.CHECKPOINT_READY
    metas, _ = tensor_metas(whole(t))
    metas[0].checksum = 1  # some tensors only
    req = cpb.BeginPushRequest(name="some", version=1, node_id="node-t", tensors=metas)
    with pytest.raises(InvalidArgument):
        c.client._call("BeginPush", req)
    assert not c.client.checkpoints("some")
