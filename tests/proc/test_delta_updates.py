"""Delta updates on real processes: ckptd, an agent with two devices, reference receivers.

Each version after the first changes ~2 % of every tensor's elements (what an Adam step does
to bf16 weights); ckptd diffs it in the host stores against the version the instance serves,
and the update moves only the delta. Every engine ends byte-exact on the target; an engine
not on the base gets the full version; a corrupted delta byte fails before the engine
resumes and the previous version stays served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import shm
from ckpt_agent.host_store import device_prefix, store_segment
from ckpt_common.delta import store_name
from tests.support.cluster import Cluster, read_report, wait_for
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
    path = c.reports[0 if instance == "R" else 1]
    got = read_report(path).get("tensors", {})
    want = digests(t)
    return {n: got.get(n) for n in want} == want


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
    for v in range(2, 7):
        versions[v] = stepped(versions[v - 1], v)
        _push(c, tmp_path, v, versions[v])
        job = _update(c, v, ("R", "S"))
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert job.method == tpb.UPDATE_DELTA, job.method_reason
        assert f"since version {v - 1}" in job.method_reason
        assert _holds(c, "R", versions[v]) and _holds(c, "S", versions[v])
        moved = sum(r.bytes for r in job.results) / len(job.results)
        assert 0 < moved < 0.35 * dense, (moved, dense)
        # the hidden delta store is no version a user lists
        assert all(not cp.name.startswith("~") for cp in c.client.checkpoints())
    # a rollback: the instances serve a newer version than the target: the full version
    job = _update(c, 1, ("R", "S"))
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.method == tpb.UPDATE_BROADCAST, job.method_reason
    assert "not a delta" in job.method_reason
    assert _holds(c, "R", versions[1]) and _holds(c, "S", versions[1])
    for v in range(2, 7):
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


def test_a_corrupted_delta_fails_before_resume(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t1 = mixed_tensors(61)
    _push(c, tmp_path, 21, t1)
    assert _update(c, 21, ("R", "S")).state == tpb.JOB_SUCCEEDED
    t2 = stepped(t1, 5)
    _push(c, tmp_path, 22, t2)
    wait_for(lambda: _made(c, 22, 21), 30, "the delta to be made")
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
