"""Integrity: per-tensor checksums from the push, verified by every engine before it loads a
bucket; one host-store segment per (checkpoint, version, rank); a failure message is never
taken for the end of an update."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from ckpt.v1 import ipc_pb2 as ipb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import shm
from ckpt_agent.host_store import device_prefix, segment_prefix, store_segment
from ckpt_common import checksum
from ckpt_common.ipc import worker_endpoint
from tests.support.cluster import Cluster, read_report
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors, write_sharded
from vllm_ext.receiver import Receiver

# ------------------------------------------------------------------ pure


@pytest.mark.parametrize("n", [0, 1, 3, 4, 1023, 1024, 1025, 4096 * 3 + 7, (1 << 20) + 13])
def test_checksum_numpy_equals_torch(n: int) -> None:
    a = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    t = torch.from_numpy(a.copy())
    assert checksum.of_numpy(a) == checksum.of_torch(t)
    assert checksum.mismatches([("x", checksum.of_numpy(a), t)]) == []


def test_checksum_unaligned_view_and_overflow() -> None:
    a = np.full((8 << 20) + 9, 0xFF, np.uint8)
    a[::4] = 0x7F  # int32 words near the top: sums that overflow int64 wrap identically
    t = torch.from_numpy(a.copy())
    assert checksum.of_numpy(a[1:]) == checksum.of_torch(t[1:])  # a view not 4-aligned
    assert checksum.of_numpy(a) == checksum.of_torch(t)


def test_checksum_sees_flips_swaps_shifts_and_length() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    base = checksum.of_numpy(a)
    flipped = a.copy()
    flipped[12345] ^= 1
    swapped = a.copy()
    swapped[0:4], swapped[4096:4100] = a[4096:4100].copy(), a[0:4].copy()
    rolled = np.roll(a, 4)
    zero = np.zeros_like(a)
    for other in (flipped, swapped, rolled, zero, a[:-1], np.append(a, np.uint8(0))):
        assert checksum.of_numpy(other) != base
    bad = torch.from_numpy(flipped)
    assert checksum.mismatches([("w", base, bad), ("ok", base, torch.from_numpy(a))]) == ["w"]


def test_segment_names_are_one_to_one() -> None:
    p = device_prefix("node", 0)
    names = {
        store_segment(p, c, v)
        for c, v in [
            ("run:a", 1),
            ("run;a", 1),
            ("run_a", 1),
            ("x" * 150 + "1", 1),
            ("x" * 150 + "2", 1),
            ("run:a", 11),
            ("s1", 1),
        ]
    }
    assert len(names) == 7
    assert all(len(n) < 255 and n.startswith(p) for n in names)
    # the device prefixes of one node never contain each other's store names
    assert not store_segment(device_prefix("n", 1), "2_x", 1).startswith(device_prefix("n", 12))
    assert segment_prefix("a:b") != segment_prefix("a;b")
    assert worker_endpoint("a:b", 0, "/d") != worker_endpoint("a;b", 0, "/d")


def test_failure_message_is_not_an_end(tmp_path: Path) -> None:
    """An End(ok=False) where the receiver waits for a bucket fails the update."""
    endpoint = f"ipc://{tmp_path}/w.sock"
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    name = f"ckpt_test_{os.getpid()}"
    mem = shm.create(name, 4096)

    def worker() -> None:
        peer, _ = router.recv_multipart()  # hello
        meta = tpb.TensorMeta(name="w", dtype="F32", shape=[4], nbytes=16)
        begin = ipb.Begin(job_id="j", checkpoint="c", version=2, buffer=f"shm:{name}")
        begin.slot_bytes, begin.nbuf = 4096, 1
        begin.tensors.append(meta)
        for m in (
            ipb.WorkerMessage(begin=begin, job_id="j"),
            ipb.WorkerMessage(proceed=ipb.Proceed(ok=True), job_id="j"),
            ipb.WorkerMessage(end=ipb.End(ok=False, reason="rank 3 died"), job_id="j"),
        ):
            if m.WhichOneof("body") == "proceed":
                router.recv_multipart()  # validated
            router.send_multipart([peer, m.SerializeToString()])
        router.recv_multipart()  # done

    th = threading.Thread(target=worker, daemon=True)
    th.start()
    r = Receiver(endpoint)
    loaded: list[str] = []
    try:
        done = r.receive(load=lambda info, it: loaded.extend(n for n, _ in it), wait_s=10)
    finally:
        r.close()
        th.join(10)
        router.close(0)
        mem.close()
        shm.unlink(name)
    assert not done.ok and "rank 3 died" in done.reason
    assert loaded == []


# ------------------------------------------------------------------ real processes


SPEC = ClusterSpec(
    receiver_timeout_s=4,
    nodes=(Node(id="node-i", devices=2),),
    receivers=(Receivers(node="node-i", devices=(0, 1), instance="R"),),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "integrity")


def _hashes(c: Cluster) -> list[dict]:
    return [read_report(r).get("tensors", {}) for r in c.reports]


def _hold(c: Cluster, t: dict) -> bool:
    """Every engine holds exactly these tensors' bytes (sha256)."""
    want = digests(t)
    return all({n: h.get(n) for n in want} == want for h in _hashes(c))


def _update(c: Cluster, name: str, version: int = 0, **kw) -> tpb.Job:
    job = c.client.update(name, version, instances=["R"], bucket_bytes=1 << 14, **kw)
    return c.client.wait(job.id, 60)


def test_checksums_recorded_and_verified(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t1, t2 = mixed_tensors(11), mixed_tensors(12)
    c.client.push("integ", 1, [str(write_sharded(t1, tmp_path / "v1"))])
    c.client.push("integ", 2, [str(write_sharded(t2, tmp_path / "v2"))])
    cp = c.client.get("integ", 1, tensors=True)
    want = {
        n: checksum.of_numpy(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        for n, t in t1.items()
    }
    assert {m.name: m.checksum for m in cp.tensors if m.HasField("checksum")} == want

    job = _update(c, "integ", 1)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert _hold(c, t1)

    # bytes changed in a store after the push: the bucket holding them is refused before
    # it is loaded; buckets loaded before it are undone by restoring integ@1 in the same job
    for version, victim in ((2, "lm_head.weight"), (3, "model.layers.2.odd")):
        t = mixed_tensors(10 + version)
        if version == 3:
            c.client.push("integ", 3, [str(write_sharded(t, tmp_path / "v3"))])
        c.corrupt_store("integ", version, t[victim].reshape(-1).view(torch.uint8).numpy().tobytes())
        job = _update(c, "integ", version)
        assert job.state == tpb.JOB_FAILED
        assert "checksum mismatch" in job.reason, job.reason
        assert "R restored to integ@1" in job.reason, job.reason
        assert _hold(c, t1), job.reason
        (r,) = [i for i in c.client.instances() if i.name == "R"]
        assert (r.ready, r.checkpoint, r.version) == (True, "integ", 1), (r, job.reason)


def test_names_that_sanitise_alike_stay_apart(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    ta, tb = mixed_tensors(21, layers=1), mixed_tensors(22, layers=1)
    c.client.push("run:a", 1, [str(write_sharded(ta, tmp_path / "a"))])
    c.client.push("run;a", 1, [str(write_sharded(tb, tmp_path / "b"))])
    for name, t in (("run:a", ta), ("run;a", tb)):
        job = _update(c, name, 1)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert _hold(c, t)


def test_direct_push_is_sealed_with_checksums(cluster: Cluster) -> None:
    c = cluster
    t = mixed_tensors(31, layers=2)
    c.client.push_direct("direct", 1, t, node_id="node-i")
    cp = c.client.get("direct", 1, tensors=True)
    assert cp.state == tpb.CHECKPOINT_READY
    assert all(m.HasField("checksum") for m in cp.tensors)
    job = _update(c, "direct", 1)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert _hold(c, t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_checksum_on_the_gpu_equals_numpy() -> None:
    """The fused GPU kernel (where Triton runs) and torch's reductions give numpy's value."""
    kernel = checksum._gpu_kernel()
    for n in [5, 1024, 8192 * 64 - 3, (64 << 20) + 13, 300 << 20]:
        a = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        t = torch.from_numpy(a).cuda()
        want = checksum.of_numpy(a)
        assert checksum.of_torch(t) == want, (n, kernel)
        checksum._GPU[:] = [None]  # the torch path on the same bytes
        try:
            assert checksum.of_torch(t) == want, n
        finally:
            checksum._GPU[:] = [kernel]
    # a bucket's worth at once: empty, tiny, tailed, unaligned and large tensors, one bad
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 256, n, dtype=np.uint8) for n in (0, 3, 8191, 4 << 20, 9 << 20)]
    buf = torch.from_numpy(np.concatenate(arrays)).cuda()
    items, at = [], 0
    for i, a in enumerate(arrays):
        items.append((f"t{i}", checksum.of_numpy(a), buf[at : at + a.size]))
        at += a.size
    assert checksum.mismatches(items) == []
    buf[3 + 8191 + 100] ^= 1  # inside t3
    assert checksum.mismatches(items) == ["t3"]
