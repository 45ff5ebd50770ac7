"""Checksums at the trainer, segments kept across pushes (real processes on loopback).

A direct push sends each item's checksum, computed from the trainer's own bytes, with
CommitPush; ckptd records them and no agent reads its store again. Engines verify every
byte they receive against them: a byte flipped in a host store after the trainer computed
its checksums fails the next update before any engine resumes on it. A client without
checksums still gets its version sealed by the owners; a wrong count changes nothing. The
client keeps the segments it mapped by inode: an agent reusing a dropped (or pre-allocated)
store for the next version is a hit, not a new mapping.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import shm
from ckpt_agent.host_store import device_prefix
from ckpt_client.client import Client
from ckpt_client.d2h import schedule
from ckpt_client.direct_push import tensor_metas, whole, write_items
from ckpt_common import checksum
from ckpt_common.credentials import Credentials
from ckpt_common.errors import InvalidArgument
from tests.support.cluster import PY, REPO, Cluster, reports_hold, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors

PREALLOC_GIB = 0.07  # two spares of ~75 MB on node-r: a 66 MiB version fits them


SPEC = ClusterSpec(
    receiver_timeout_s=6,
    nodes=(
        Node(id="node-t"),
        Node(id="node-r", args=("--spare-stores", "2", "--prealloc-store-gib", str(PREALLOC_GIB))),
    ),
    receivers=(Receivers(node="node-t", instance="R"),),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "trainer_sums")


def sums_of(t: dict[str, torch.Tensor]) -> dict[str, int]:
    return {
        n: checksum.of_numpy(v.contiguous().reshape(-1).view(torch.uint8).numpy())
        for n, v in t.items()
    }


def recorded(c: Cluster, name: str, version: int) -> dict[str, int]:
    cp = c.client.get(name, version, tensors=True)
    return {m.name: m.checksum for m in cp.tensors if m.HasField("checksum")}


def update(c: Cluster, name: str, version: int) -> tpb.Job:
    job = c.client.update(name, version, instances=["R"], bucket_bytes=1 << 14)
    return c.client.wait(job.id, 60)


def serving(c: Cluster) -> tuple[bool, str, int]:
    (r,) = [i for i in c.client.instances() if i.name == "R"]
    return r.ready, r.checkpoint, r.version


def holds(c: Cluster, t: dict[str, torch.Tensor]) -> bool:
    return reports_hold(c.reports[:1], digests(t))


def begin_and_write(c: Cluster, name: str, version: int, t: dict[str, torch.Tensor]) -> list[int]:
    """A direct push up to its commit: begun, written, the trainer's checksums in hand."""
    metas, flats = tensor_metas(whole(t))
    req = cpb.BeginPushRequest(
        name=name, version=version, node_id="node-t", tensors=metas, timeout_s=30
    )
    plan = c.client._call("BeginPush", req)
    sums, _ = write_items(plan, flats, c.client.segments, threads=2)
    return sums


def commit(c: Cluster, name: str, version: int, sums: list[int]) -> tpb.Checkpoint:
    req = cpb.CommitPushRequest(name=name, version=version, checksums=sums)
    return c.client._call("CommitPush", req)


def sealed_events(c: Cluster, name: str) -> list[str]:
    return [ln for ln in c.log("ckptd").splitlines() if "push_sealed" in ln and name in ln]


# ------------------------------------------------------------------ pure


def test_d2h_schedule_balances_streams() -> None:
    plan = schedule([10, 0, 3, 7, 25], streams=3, split=8)
    pieces = sorted(p for s in plan for p in s)
    assert pieces == [(0, 0, 8), (0, 8, 2), (2, 0, 3), (3, 0, 7), (4, 0, 8), (4, 8, 8),
                      (4, 16, 8), (4, 24, 1)]  # fmt: skip
    loads = [sum(p[2] for p in s) for s in plan]
    assert sum(loads) == 45 and max(loads) - min(loads) <= 8
    with pytest.raises(ValueError):
        schedule([1], streams=0)


# ------------------------------------------------------------------ real processes


def test_trainer_checksums_are_recorded_and_no_store_is_read(cluster: Cluster) -> None:
    c = cluster
    t = mixed_tensors(41, layers=2)
    cp = c.client.push_direct("sums", 1, t, node_id="node-t")
    assert cp.state == tpb.CHECKPOINT_READY
    assert c.client.last_push is not None and c.client.last_push.trainer_checksums
    assert recorded(c, "sums", 1) == sums_of(t)
    wait_for(lambda: sealed_events(c, '"sums"'), 10, "the seal's log line")
    (ev,) = sealed_events(c, '"sums"')
    assert '"trainer_ranks": 1' in ev and '"store_ranks": 0' in ev, ev
    job = update(c, "sums", 1)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert holds(c, t)


def test_byte_flipped_after_the_trainers_checksums_fails_before_any_engine_resumes(
    cluster: Cluster,
) -> None:
    c = cluster
    t1 = mixed_tensors(51, layers=2)
    c.client.push_direct("flip", 1, t1, node_id="node-t")
    assert update(c, "flip", 1).state == tpb.JOB_SUCCEEDED
    victim = "model.layers.1.self_attn.qkv_proj.weight"

    def corrupted_update(version: int, between: bool) -> tpb.Job:
        t = mixed_tensors(51 + version, layers=2)
        data = t[victim].reshape(-1).view(torch.uint8).numpy().tobytes()
        if between:  # after the trainer's checksums, before its commit: no owner re-reads
            sums = begin_and_write(c, "flip", version, t)
            c.corrupt_store("flip", version, data)
            assert commit(c, "flip", version, sums).state == tpb.CHECKPOINT_READY
        else:  # after the commit
            c.client.push_direct("flip", version, t, node_id="node-t")
            c.corrupt_store("flip", version, data)
        return update(c, "flip", version)

    for version, between in ((2, False), (3, True)):
        job = corrupted_update(version, between)
        assert job.state == tpb.JOB_FAILED
        assert "checksum mismatch" in job.reason and victim in job.reason, job.reason
        assert "R restored to flip@1" in job.reason, job.reason
        assert serving(c) == (True, "flip", 1), job.reason
        assert holds(c, t1)


def test_commit_checks_the_count_and_old_clients_are_sealed(cluster: Cluster) -> None:
    c = cluster
    t = mixed_tensors(61, layers=1)
    sums = begin_and_write(c, "count", 1, t)
    for bad in (sums[:-1], [*sums, 7]):
        with pytest.raises(InvalidArgument, match=f"{len(bad)} checksums for {len(t)} tensors"):
            commit(c, "count", 1, bad)
        assert c.client.get("count", 1).state == tpb.CHECKPOINT_LOADING  # nothing changed
    assert commit(c, "count", 1, sums).state == tpb.CHECKPOINT_READY
    assert recorded(c, "count", 1) == sums_of(t)
    # a client that sends none (an older one): the owners checksum their stores
    cp = c.client.push_direct("count", 2, t, node_id="node-t", checksums=False)
    assert cp.state == tpb.CHECKPOINT_READY and not c.client.last_push.trainer_checksums
    assert recorded(c, "count", 2) == sums_of(t)
    wait_for(lambda: len(sealed_events(c, '"count"')) == 2, 10, "the seals' log lines")
    assert '"store_ranks": 1' in sealed_events(c, '"count"')[1]
    job = update(c, "count", 2)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert holds(c, t)


def spare_inodes(node: str) -> set[int]:
    prefix = device_prefix(node, 0) + "s"
    return {e.inode() for e in os.scandir(shm.SHM_DIR) if e.name.startswith(prefix)}


def store_inode(c: Cluster, name: str, version: int) -> int:
    (s,) = c.client.get(name, version).shards
    from ckpt_agent.host_store import store_segment

    seg = store_segment(device_prefix(s.node_id, s.device), name, version)
    return os.stat(os.path.join(shm.SHM_DIR, seg)).st_ino


def test_segments_are_mapped_once_and_stores_reused(cluster: Cluster) -> None:
    """node-r pre-allocated two spares: the trainer maps them before its first push, and
    every later version lands in memory it already holds (a renamed spare)."""
    c = cluster
    wait_for(lambda: len(spare_inodes("node-r")) == 2, 30, "node-r's pre-allocated spares")
    spares = spare_inodes("node-r")
    big = {"w": torch.randn(33, 1 << 20).to(torch.bfloat16)}  # 66 MiB: a store kept as spare
    with Client(c.addr, credentials=Credentials(token_file=str(c.token_file))) as trainer:
        assert trainer.pin_segments("node-r") == 2
        st = trainer.segments.stats
        for v in (1, 2):
            trainer.push_direct("ring", v, big, node_id="node-r")
            assert store_inode(c, "ring", v) in spares
        assert (st.hits, st.misses) == (2, 2)  # both pushes found their segment mapped
        trainer.delete("ring", 1)  # its store becomes a spare
        trainer.push_direct("ring", 3, big, node_id="node-r")
        assert store_inode(c, "ring", 3) in spares
        assert (st.hits, st.misses) == (3, 2) and len(trainer.segments) == 2
        assert recorded(c, "ring", 3) == sums_of(big)
        trainer.delete("ring", 0)
        c.stop("agent-node-r")  # its segments are unlinked: the trainer lets them go
        assert trainer.segments.acquire([], pin=False) == [] and len(trainer.segments) == 0
        assert st.released == 2
    assert len(trainer.segments) == 0


def test_parts_in_one_process_map_a_segment_once(cluster: Cluster) -> None:
    """Eight parts pushed from threads of one process write into the same segment: it is
    mapped once, and the resource tracker never sees it registered or unregistered twice
    (before, such a run printed the tracker's KeyError now and then)."""
    c = cluster
    script = textwrap.dedent(
        f"""
        import threading
        import torch
        from ckpt_common.credentials import Credentials
        from ckpt_common.pieces import Piece
        from ckpt_client.client import Client
        from ckpt_client.direct_push import Item

        c = Client({c.addr!r}, credentials=Credentials(token_file={str(c.token_file)!r}))
        w = torch.randn(64, 32)
        K = 8
        parts = [[Item("w", w[8 * i : 8 * i + 8], (64, 32), Piece((8 * i, 0), (8, 32)))]
                 for i in range(K)]
        out = [None] * K

        def one(i):
            out[i] = c.push_part("parts", 1, parts[i], node_id="node-t", part=i, parts=K,
                                 timeout_s=30).state

        ths = [threading.Thread(target=one, args=(i,)) for i in range(K)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(60)
        print(sorted(set(out)), len(c.segments), c.segments.stats.misses)
        c.close()
        """
    )
    r = subprocess.run(
        [PY, "-c", script], env=c.env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"[{tpb.CHECKPOINT_READY}]", "1", "1"], r.stdout
    assert "KeyError" not in r.stderr and "resource_tracker" not in r.stderr, r.stderr
    job = update(c, "parts", 1)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason


@pytest.mark.slow
def test_rl_step_bench_runs_on_cpu(tmp_path) -> None:
    """bench.rl_step's CPU smoke mode: the GPU benchmark's code path, end to end."""
    import json

    out = tmp_path / "rl.json"
    r = subprocess.run(
        [PY, "-m", "bench.rl_step", "--cpu-smoke", "--steps", "3", "--delta-frac", "0.025",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    k = json.loads(out.read_text())["ckptd"]
    assert len(k["steps"]) == 3 and all(s["trainer_checksums"] for s in k["steps"])
    assert k["segments"]["hits"] == 3 and k["segments"]["misses"] == 2, k["segments"]
    d = json.loads(out.read_text())["ckptd_delta"]["steps"]
    assert [s["method"] for s in d] == [1, 4, 4]  # a broadcast, then delta updates
    assert all(s["push_bytes"] < 0.1 * d[0]["push_bytes"] for s in d[1:])
