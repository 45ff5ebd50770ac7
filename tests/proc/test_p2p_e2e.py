"""P2P join over Mooncake (TCP on loopback): a new instance reads the owners' host memory,
broadcasts inside itself, and its engines load; failures of owners are bounded."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.errors import CkptError, FailedPrecondition, InvalidArgument
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors, write_sharded

pytestmark = pytest.mark.slow
OWNER, NEW = "a-own", "b-new"  # ranks 0-1 hold the bytes, ranks 2-3 join


SPEC = ClusterSpec(  # NEW's receivers unregistered: each test joins them as instance B
    receiver_timeout_s=10,
    env=(("MC_LOG_LEVEL", "ERROR"),),
    nodes=(
        Node(id=OWNER, devices=2),
        # readers: every bucket takes >= 0.6 s
        Node(id=NEW, devices=2, env=(("CKPT_FAULT", "p2p_delay:0.6"),)),
    ),
    receivers=(Receivers(node=NEW, devices=(0, 1)),),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "p2p")


def instance_b() -> tpb.Instance:
    return tpb.Instance(
        name="B",
        kind=tpb.INSTANCE_RECEIVER,
        tp_size=2,
        ranks=[tpb.InstanceRank(node_id=NEW, device=d) for d in (0, 1)],
    )


def big(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.w": torch.randn(128, 128, generator=g) for i in range(24)}


def join(c: Cluster, *args, timeout: float = 120) -> tpb.Job:
    return c.client.wait(c.client.join(instance_b(), *args).id, timeout)


def test_join_two_owners_tp2_byte_exact(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t = mixed_tensors(21)
    cp = c.client.push("m", 1, [str(write_sharded(t, tmp_path / "m"))], ranks=[0, 1])
    assert sorted(s.rank for s in cp.shards) == [0, 1]
    job = join(c, "m", 1)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.kind == tpb.JOB_JOIN and list(job.ranks) == [2, 3]
    assert {r.rank for r in job.results} == {2, 3}  # the owners took no part in the collective
    for r in c.reports:
        assert read_report(r)["tensors"] == digests(t)
    inst = {i.name: i for i in c.client.instances()}["B"]
    assert inst.ready and inst.checkpoint == "m" and inst.version == 1

    # update --method p2p works the same way; it never updates part of an instance
    t2 = mixed_tensors(22)
    c.client.push("m", 2, [str(write_sharded(t2, tmp_path / "m2"))], ranks=[0, 1])
    with pytest.raises(InvalidArgument, match="only some ranks of instance 'B'"):
        c.client.update("m", 2, ranks=[3], method=tpb.UPDATE_P2P)
    assert read_report(c.reports[1])["tensors"] == digests(t)
    job = c.client.wait(c.client.update("m", 2, ranks=[2, 3], method=tpb.UPDATE_P2P).id, 120)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    for r in c.reports:
        assert read_report(r)["tensors"] == digests(t2)


def test_join_defaults_to_what_the_fleet_serves(cluster: Cluster) -> None:
    job = join(cluster)  # B serves m@2 (ready); the fleet version is m@2
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.checkpoint == "m" and job.version == 2


def test_ckptctl_join(cluster: Cluster) -> None:
    import json
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptctl.cli",
            "--addr",
            cluster.addr,
            "-o",
            "json",
            "join",
            "B",
            "--devices",
            f"{NEW}/0,{NEW}/1",
            "--kind",
            "receiver",
            "--checkpoint",
            "m@1",
            "--wait",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env,
    )
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "JOB_SUCCEEDED" and job["kind"] == "JOB_JOIN"


def test_frozen_owner_fails_the_join_in_bounded_time_then_retry(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    t = big(5)
    save_file(t, str(tmp_path / "big.safetensors"))
    c.client.push("big", 1, [str(tmp_path / "big.safetensors")], ranks=[0, 1])
    job = join(c, "big", 1)  # warms the connections
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    owner = c.procs[f"agent-{OWNER}"]
    job = c.client.join(instance_b(), "big", 1)
    time.sleep(0.3)
    os.killpg(owner.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        done = c.client.wait(job.id, 120)
        took = time.monotonic() - t0
    finally:
        os.killpg(owner.pid, signal.SIGCONT)
    print(f"\nfrozen owner: join failed after {took:.1f}s: {done.reason}")
    assert done.state == tpb.JOB_FAILED
    assert took < 30
    inst = {i.name: i for i in c.client.instances()}["B"]
    assert not inst.ready and "failed" in inst.reason
    # the owner thaws, re-attaches; a retry succeeds
    wait_for(lambda: c.client.get("big", 1).state == tpb.CHECKPOINT_READY, 60, "ready again")
    c.wait_ranks(4)
    job = join(c, "big", 1)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    for r in c.reports:
        got = read_report(r)["tensors"]
        assert {k: got[k] for k in t} == digests(t)


def test_killed_owner_fails_the_join_in_bounded_time(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t = big(6)
    save_file(t, str(tmp_path / "big2.safetensors"))
    c.client.push("big", 2, [str(tmp_path / "big2.safetensors")], ranks=[0, 1])
    owner = c.procs[f"agent-{OWNER}"]
    job = c.client.join(instance_b(), "big", 2)
    time.sleep(0.3)
    t0 = time.monotonic()
    os.killpg(owner.pid, signal.SIGKILL)
    done = c.client.wait(job.id, 120)
    took = time.monotonic() - t0
    print(f"\nkilled owner: join failed after {took:.1f}s: {done.reason}")
    assert done.state == tpb.JOB_FAILED and took < 30
    # while the owner is gone a retry is refused at once with the reason
    with pytest.raises(CkptError, match="read from nowhere"):
        c.client.join(instance_b(), "big", 2)
    # it comes back without the bytes: the version is LOST, a new push serves the join
    c.start_agent(OWNER, 2)
    wait_for(lambda: c.client.get("big", 2).state == tpb.CHECKPOINT_LOST, 60, "LOST")
    with pytest.raises(FailedPrecondition, match="LOST"):
        c.client.join(instance_b(), "big", 2)
    c.client.push("big", 3, [str(tmp_path / "big2.safetensors")], ranks=[0, 1])
    job = join(c, "big", 3)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    got = read_report(c.reports[0])["tensors"]
    assert {k: got[k] for k in t} == digests(t)


def test_killed_owner_retry_reads_the_mirrors(cluster: Cluster, tmp_path: Path) -> None:
    """replicas=2: every shard also lives on a rank of the other node, so a join retried
    after an owner node died reads the mirrors and succeeds."""
    c = cluster
    c.wait_ranks(4)
    t = big(8)
    save_file(t, str(tmp_path / "rep.safetensors"))
    cp = c.client.push("rep", 1, [str(tmp_path / "rep.safetensors")], replicas=2)
    assert cp.replicas == 2 and len(cp.mirrors) == len(cp.shards) == 4
    assert {(s.node_id, s.device) for s in cp.mirrors} == {(s.node_id, s.device) for s in cp.shards}
    assert not [x for x in c.client.checkpoints() if x.name.startswith("~")]  # hidden
    job = join(c, "rep", 1)  # warm connections to every owner
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    owner = c.procs[f"agent-{OWNER}"]
    job = c.client.join(instance_b(), "rep", 1)
    time.sleep(0.3)
    os.killpg(owner.pid, signal.SIGKILL)
    done = c.client.wait(job.id, 120)
    assert done.state == tpb.JOB_FAILED
    wait_for(
        lambda: not any(a.node_id == OWNER and a.state == 1 for a in c.client.agents()),
        30,
        "owner detached",
    )
    job = join(c, "rep", 1)  # the owner node is gone: its shards come from the mirrors
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    for r in c.reports:
        got = read_report(r)["tensors"]
        assert {k: got[k] for k in t} == digests(t)
    assert [d.version for d in c.client.delete("rep")] == [1]
    c.start_agent(OWNER, 2)


def test_bytes_changed_in_an_owners_store_are_refused_on_p2p(
    cluster: Cluster, tmp_path: Path
) -> None:
    """P2P readers deliver what the owner's memory holds now; the engines check it against
    the checksums taken at push, refuse it, and B is restored to what it served."""
    c = cluster
    t1, t2 = mixed_tensors(31), mixed_tensors(32)
    c.client.push("cx", 1, [str(write_sharded(t1, tmp_path / "c1"))], ranks=[0, 1])
    c.client.push("cx", 2, [str(write_sharded(t2, tmp_path / "c2"))], ranks=[0, 1])
    assert join(c, "cx", 1).state == tpb.JOB_SUCCEEDED
    victim = t2["model.layers.1.odd"].reshape(-1).view(torch.uint8).numpy().tobytes()
    c.corrupt_store("cx", 2, victim)
    job = c.client.wait(c.client.update("cx", 2, instances=["B"], method=tpb.UPDATE_P2P).id, 120)
    assert job.state == tpb.JOB_FAILED
    assert "checksum mismatch" in job.reason and "B restored to cx@1" in job.reason, job.reason
    want = digests(t1)
    for r in c.reports:  # (a report also lists names of earlier checkpoints)
        got = read_report(r)["tensors"]
        assert {k: got.get(k) for k in want} == want


def test_cold_join_whose_owner_is_frozen_ends_within_bound(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The owner's agent restarted (its transfer sessions are new: a first contact blocks in
    Mooncake's handshake) and frozen just before a join: ckptd watches the nodes a job
    reads from, so the join fails within 10 s, not when the owner is thawed; after the thaw
    a retry succeeds byte-exact."""
    c = cluster
    c.stop(f"agent-{OWNER}")
    c.start_agent(OWNER, 2)
    c.wait_ranks(4)
    t = big(9)
    save_file(t, str(tmp_path / "cold.safetensors"))
    c.client.push("cold", 1, [str(tmp_path / "cold.safetensors")], ranks=[0, 1])
    owner = c.procs[f"agent-{OWNER}"]
    os.killpg(owner.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        job = c.client.join(instance_b(), "cold", 1)
        done = wait_for(
            lambda: (j := c.client.job(job.id)).state in (tpb.JOB_FAILED, tpb.JOB_SUCCEEDED) and j,
            30,
            "the join to end",
            0.05,
        )
        took = time.monotonic() - t0
    finally:
        os.killpg(owner.pid, signal.SIGCONT)
    print(f"\ncold join, frozen owner: ended after {took:.1f}s: {done.reason}")
    assert done.state == tpb.JOB_FAILED, done.reason
    assert took <= 10, (took, done.reason)
    assert OWNER in done.reason, done.reason
    c.wait_ranks(4)
    job = wait_for(lambda: _join_accepted(c, "cold"), 30, "a join to be accepted")
    job = c.client.wait(job.id, 60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    for r in c.reports:
        got = read_report(r)["tensors"]
        assert {k: got[k] for k in t} == digests(t)


def _join_accepted(c: Cluster, name: str) -> tpb.Job | None:
    try:
        return c.client.join(instance_b(), name, 1)
    except CkptError:
        return None
