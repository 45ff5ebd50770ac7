"""Shard-aware updates end to end on real processes without vLLM: ckptd, two agents x 2
slots, reference receivers emulating two TP=2 engines (`ckpt-receiver --tp 2/r`). Each rank
receives exactly the parts its layout keeps (sha256 of every part), a fraction of the
checkpoint; an engine whose layout changed refuses the parts planned for the old one before
loading anything, and the next update learns the new layout."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_client.direct_push import tensor_metas, whole, write_items
from ckpt_common.errors import FailedPrecondition, InvalidArgument
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers

pytestmark = pytest.mark.slow
INSTANCES = {"T1": "na", "T2": "nb"}


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(3):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = torch.randn(64, 48, generator=g).bfloat16()
        out[p + "self_attn.o_proj.weight"] = torch.randn(48, 64, generator=g)  # dim 1
        out[p + "mlp.down_proj.weight"] = torch.randn(40, 96, generator=g).bfloat16()
        out[p + "input_layernorm.weight"] = torch.randn(48, generator=g)  # whole
        out[p + "odd.weight"] = torch.randn(7, 5, generator=g)  # indivisible: whole
    out["model.embed_tokens.weight"] = torch.randn(200, 48, generator=g).bfloat16()
    return out


def part(name: str, t: torch.Tensor, rank: int) -> torch.Tensor:
    """What a `--tp 2/rank` receiver keeps (vllm_ext.reference.ReferenceEngine.layout)."""
    d = 1 if name.endswith(("o_proj.weight", "down_proj.weight")) else 0
    if t.dim() != 2 or t.shape[d] % 2:
        return t
    n = t.shape[d] // 2
    return t.narrow(d, rank * n, n)


def sha(t: torch.Tensor) -> str:
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


SPEC = ClusterSpec(  # each instance TP=2 on one node, device d keeping TP rank d's parts
    receiver_timeout_s=10,
    nodes=(Node(id="na", devices=2), Node(id="nb", devices=2)),
    receivers=tuple(
        Receivers(node=node, devices=(0, 1), instance=name, args=("--tp", "2/{device}"))
        for name, node in INSTANCES.items()
    ),
)
W: dict[int, dict[str, torch.Tensor]] = {}  # the tensors of each version of "m" pushed


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    """Versions 1 and 2 of "m" pushed."""
    c = module_cluster(SPEC, "sharded-recv")
    W.clear()
    for v in (1, 2):
        W[v] = weights(v)
        path = c.root / f"w{v}.safetensors"
        save_file(W[v], str(path))
        c.client.push("m", v, [str(path)])
    return c


def update(c: Cluster, version: int, method: int) -> tpb.Job:
    job = c.client.update("m", version, instances=list(INSTANCES), method=method)
    return c.client.wait(job.id, 60)


def held(c: Cluster, node: str, d: int) -> dict:
    return read_report(c.report(node, d))


def assert_parts(c: Cluster, version: int, layout: dict[tuple[str, int], int]) -> None:
    for (node, d), rank in layout.items():
        rep = held(c, node, d)
        assert rep["version"] == version
        want = {n: sha(part(n, t, rank)) for n, t in W[version].items()}
        assert rep["tensors"] == want, f"{node}/{d} (TP rank {rank}) after v{version}"


def test_each_rank_receives_exactly_its_parts(cluster: Cluster) -> None:
    c = cluster
    with pytest.raises(FailedPrecondition, match="sharding layout"):
        update(c, 2, tpb.UPDATE_SHARDED)
    job = update(c, 1, tpb.UPDATE_METHOD_UNSPECIFIED)  # a broadcast; layouts reported
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.method == tpb.UPDATE_BROADCAST and "has not reported" in job.method_reason, job
    full = job.bytes_total
    assert all(r.bytes >= full for r in job.results)
    ranks = {(n, d): d for n in INSTANCES.values() for d in (0, 1)}
    for v in (2, 1):
        job = update(c, v, tpb.UPDATE_SHARDED if v == 2 else tpb.UPDATE_METHOD_UNSPECIFIED)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert job.method == tpb.UPDATE_SHARDED and "layout is known" in job.method_reason, job
        assert all(0 < r.bytes <= 0.55 * full for r in job.results), [r.bytes for r in job.results]
        assert_parts(c, v, ranks)


def test_a_changed_layout_is_refused_untouched_then_learned(cluster: Cluster) -> None:
    c = cluster
    c.stop("recv-na-1")
    c.report("na", 1).unlink()
    c.start_receiver("na", 1, "--tp", "2/0")  # now keeps rank 0's parts
    wait_for(c.report("na", 1).exists, 60, "the receiver to restart")
    job = update(c, 2, tpb.UPDATE_SHARDED)
    assert job.state == tpb.JOB_FAILED
    assert "this rank keeps" in job.reason, job.reason
    # the rank whose engine refused (its peers' reasons quote it: "aborted by ckptd: ...")
    refused = [r for r in job.results if r.reason.startswith("engine refused")]
    assert refused and all(r.engine_untouched for r in refused)
    # refused before any engine loaded (every rank waits for the others to begin): nobody
    # serves v2; the others still serve v1 (a restore, if one ran, brought them back to it).
    # The restarted receiver holds what it started with (nothing) unless a restore ran.
    wait_for(lambda: all(i.ready for i in c.client.instances()), 60, "the instances")
    held_now = {(n, d): held(c, n, d)["version"] for n in INSTANCES.values() for d in (0, 1)}
    assert 2 not in held_now.values(), held_now
    assert all(v == 1 for k, v in held_now.items() if k != ("na", 1)), held_now
    # the layouts were forgotten: the next update (auto) learns them again, and the ones
    # after it give each rank the parts of its new layout
    assert update(c, 1, tpb.UPDATE_METHOD_UNSPECIFIED).state == tpb.JOB_SUCCEEDED
    now = {("na", 0): 0, ("na", 1): 0, ("nb", 0): 0, ("nb", 1): 1}
    for v in (2, 1):
        job = update(c, v, tpb.UPDATE_SHARDED)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert_parts(c, v, now)


def test_each_part_is_verified_against_its_own_checksum(cluster: Cluster) -> None:
    """Parts carry checksums taken from the owners' stores when first planned: a byte
    changed in a store afterwards fails the rank whose part holds it, before it loads."""
    c = cluster
    name = "model.layers.1.self_attn.o_proj.weight"  # split on dim 1: strided parts
    t = W[2][name]
    c.corrupt_store("m", 2, t.contiguous().view(torch.uint8).numpy().tobytes())
    job = update(c, 2, tpb.UPDATE_SHARDED)
    assert job.state == tpb.JOB_FAILED
    assert "checksum mismatch" in job.reason and name in job.reason, job.reason
    wait_for(lambda: all(i.ready for i in c.client.instances()), 60, "the restore")
    assert {held(c, n, d)["version"] for n in INSTANCES.values() for d in (0, 1)} == {1}


def test_a_trainers_part_checksums_spare_the_stores_and_are_verified(cluster: Cluster) -> None:
    """The engines' layouts are known (the updates above): a direct push is asked for the
    parts they keep, sends their checksums with its commit, and the shard-aware update of
    the new version uses them (no owner reads its store for parts); a part checksum that
    does not match what was pushed fails the rank that receives the part."""
    c = cluster
    layout = {("na", 0): 0, ("na", 1): 0, ("nb", 0): 0, ("nb", 1): 1}  # as the test above left
    W[5] = weights(5)
    cp = c.client.push_direct("m", 5, W[5], node_id="na")
    assert cp.state == tpb.CHECKPOINT_READY
    asked = c.client.last_push.part_checksums
    assert asked > 0  # both halves of every split tensor, on dim 0 or 1
    job = update(c, 5, tpb.UPDATE_SHARDED)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert_parts(c, 5, layout)
    store_sums = [
        ln for ln in c.log("ckptd").splitlines() if "part_sums_from_store" in ln and '"m"' in ln
    ]
    assert not [ln for ln in store_sums if '"version": 5' in ln], store_sums

    W[6] = weights(6)
    metas, flats = tensor_metas(whole(W[6]))
    req = cpb.BeginPushRequest(name="m", version=6, node_id="na", tensors=metas)
    plan = c.client._call("BeginPush", req)
    assert len(plan.parts) == asked
    shapes = [tuple(m.shape) for m in metas]
    sums, stats = write_items(plan, flats, c.client.segments, threads=2, shapes=shapes)
    lied = list(stats.part_sums)
    victim = next(i for i, p in enumerate(plan.parts) if p.dim == 1)  # a strided part
    lied[victim] ^= 1
    with pytest.raises(InvalidArgument):  # a wrong count changes nothing
        c.client._call("CommitPush", cpb.CommitPushRequest(
            name="m", version=6, checksums=sums, part_checksums=lied[:-1]))  # fmt: skip
    c.client._call("CommitPush", cpb.CommitPushRequest(
        name="m", version=6, checksums=sums, part_checksums=lied))  # fmt: skip
    job = update(c, 6, tpb.UPDATE_SHARDED)
    assert job.state == tpb.JOB_FAILED and "checksum mismatch" in job.reason, job.reason
    name = metas[plan.parts[victim].tensor].name
    assert name in job.reason, job.reason
    wait_for(lambda: all(i.ready for i in c.client.instances()), 60, "the restore")
    assert {held(c, n, d)["version"] for n in INSTANCES.values() for d in (0, 1)} == {5}
