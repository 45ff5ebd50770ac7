"""No engine is left on a mix: a job that fails after it started sending bytes restores every
instance it touched to the version that instance last committed, before the job ends, also
when the agent that owned the new (and old) bytes is gone: the restore then reads the old
version by P2P from the owners still there and from the mirrors (push --replicas 2)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import Unavailable
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests

pytestmark = pytest.mark.slow
A, B = "rs-a", "rs-b"


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.w": torch.randn(96, 96, generator=g) for i in range(16)}


SPEC = ClusterSpec(
    receiver_timeout_s=10,
    env=(("MC_LOG_LEVEL", "ERROR"),),
    nodes=(Node(id=A, devices=2), Node(id=B, devices=2)),
    receivers=(Receivers(node=A, devices=(0, 1), instance="R"),),
)


@pytest.fixture
def cluster(make_cluster) -> Cluster:
    """A fresh cluster per test: each kills or restarts part of it."""
    return make_cluster(SPEC)


def holds(c: Cluster, t: dict) -> bool:
    return all(read_report(r).get("tensors") == digests(t) for r in c.reports)


def instance_r(c: Cluster) -> tpb.Instance:
    return {i.name: i for i in c.client.instances()}["R"]


def flowing(c: Cluster, job_id: str) -> None:
    """Waits until the job's engines have loaded a bucket (they are touched)."""
    wait_for(lambda: c.client.job(job_id).buckets_done >= 1, 30, "buckets to flow", 0.01)


def serving_v1(c: Cluster, tmp: Path, name: str, seed: int, replicas: int = 1) -> tuple:
    """Pushes versions 1 and 2 of `name` and brings R to version 1; returns their tensors."""
    t1, t2 = tensors(seed), tensors(seed + 1)
    for v, t in ((1, t1), (2, t2)):
        save_file(t, str(tmp / f"{name}{v}.safetensors"))
        cp = c.client.push(name, v, [str(tmp / f"{name}{v}.safetensors")], replicas=replicas)
        assert {s.node_id for s in cp.shards} == {A, B} and cp.replicas == replicas
    job = c.client.wait(c.client.update(name, 1, instances=["R"]).id, 60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert holds(c, t1)
    return t1, t2


def test_owner_killed_mid_update_instance_restored_from_mirrors(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    t1, t2 = serving_v1(c, tmp_path, "m", 1, replicas=2)

    job = c.client.update("m", 2, instances=["R"], bucket_bytes=16 << 10)
    flowing(c, job.id)  # the engines have begun loading v2: R must be restored
    c.stop(f"agent-{B}", signal.SIGKILL)  # owner of half of v1 and v2, and of mirrors
    t0 = time.monotonic()
    done = c.client.wait(job.id, 60)
    took = time.monotonic() - t0
    assert done.state == tpb.JOB_FAILED, done.reason
    assert "R restored to m@1" in done.reason, done.reason
    assert took < 30, (took, done.reason)
    assert holds(c, t1), done.reason
    r = instance_r(c)
    assert (r.ready, r.checkpoint, r.version, r.reason) == (True, "m", 1, "")

    # with B gone, a broadcast of v2 cannot run; P2P from the mirrors can
    with pytest.raises(Unavailable):
        c.client.update("m", 2, instances=["R"])
    job = c.client.wait(c.client.update("m", 2, instances=["R"], method=tpb.UPDATE_P2P).id, 60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert holds(c, t2)
    assert instance_r(c).version == 2


def test_unrestorable_instance_is_named_and_restored_when_possible(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Without mirrors, a dead owner makes the old version unreadable: the instance is named,
    marked not ready, and restored by ckptd once a source is back (a new push of the same
    version is not possible, so the owner's agent must come back with the bytes: here the
    agent is frozen, not killed, and thawed)."""
    c = cluster
    t1, _ = serving_v1(c, tmp_path, "n", 3)

    job = c.client.update("n", 2, instances=["R"], bucket_bytes=16 << 10)
    flowing(c, job.id)
    agent_b = c.procs[f"agent-{B}"]
    os.killpg(agent_b.pid, signal.SIGSTOP)
    try:
        done = c.client.wait(job.id, 90)
        assert done.state == tpb.JOB_FAILED, done.reason
        assert "R could not be restored to n@1" in done.reason, done.reason
        r = instance_r(c)
        assert not r.ready and r.checkpoint == "n" and r.version == 1
    finally:
        os.killpg(agent_b.pid, signal.SIGCONT)
    # the agent re-attaches with its stores: ckptd restores R by itself
    wait_for(lambda: instance_r(c).ready, 60, "R restored by the reconciler")
    r = instance_r(c)
    assert (r.checkpoint, r.version) == ("n", 1)
    assert holds(c, t1)


def test_ckptd_killed_mid_update_restores_after_restart(cluster: Cluster, tmp_path: Path) -> None:
    """What a job cut short by a ckptd crash left on the engines is unknown: after the
    restart the instance is not ready until the reconciler has brought it back to the
    version it committed, and then it holds exactly those bytes."""
    c = cluster
    t1, t2 = serving_v1(c, tmp_path, "k", 5)

    job = c.client.update("k", 2, instances=["R"], bucket_bytes=16 << 10)
    time.sleep(0.05)
    c.stop("ckptd", signal.SIGKILL)
    c.start_daemon("--receiver-timeout-s", "10")
    c.wait_ranks(4)
    j = c.client.job(job.id)
    assert j.state in (tpb.JOB_FAILED, tpb.JOB_SUCCEEDED), j
    if j.state == tpb.JOB_FAILED:  # it had started: R is restored by the reconciler
        assert "ckptd restarted" in j.reason, j.reason
    wait_for(lambda: instance_r(c).ready, 60, "R ready again")
    r = instance_r(c)
    want = t2 if (r.checkpoint, r.version) == ("k", 2) else t1
    assert (r.checkpoint, r.version) in (("k", 1), ("k", 2))
    wait_for(lambda: holds(c, want), 10, "R's engines to hold what the registry says")


def _ended(c: Cluster, job_id: str) -> tpb.Job | None:
    j = c.client.job(job_id)
    return j if j.state in (tpb.JOB_FAILED, tpb.JOB_SUCCEEDED, tpb.JOB_CANCELLED) else None


def test_owner_node_frozen_mid_update_ends_within_bound(cluster: Cluster, tmp_path: Path) -> None:
    """The node owning half the bytes is frozen for 12 s mid-update: the update ends within
    10 s of the freeze, its restore attempts end within the freeze too (none stays RUNNING),
    and once the node is thawed R is back on v1 within seconds, byte-exact."""
    c = cluster
    t1, _ = serving_v1(c, tmp_path, "z", 11)
    job = c.client.update("z", 2, instances=["R"], bucket_bytes=16 << 10)
    agent_b = c.procs[f"agent-{B}"]
    os.killpg(agent_b.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        done = wait_for(lambda: _ended(c, job.id), 15, "the update to end", 0.05)
        assert time.monotonic() - t0 <= 10, done.reason
        assert done.state == tpb.JOB_FAILED, done.reason
        time.sleep(max(0.0, 12 - (time.monotonic() - t0)))
    finally:
        os.killpg(agent_b.pid, signal.SIGCONT)
    t1_thaw = time.monotonic()
    wait_for(lambda: instance_r(c).ready, 20, "R restored once B is back")
    assert time.monotonic() - t1_thaw < 20
    assert (instance_r(c).checkpoint, instance_r(c).version) == ("z", 1)
    wait_for(lambda: holds(c, t1), 10, "R's engines to hold v1")
    wait_for(lambda: all(_ended(c, j.id) for j in c.client.jobs(1000)), 10, "every job to end")
    slow = [j for j in c.client.jobs(1000) if j.finished_unix - j.created_unix > 10]
    assert not slow, slow  # the restores tried while B was frozen ended within bound too
