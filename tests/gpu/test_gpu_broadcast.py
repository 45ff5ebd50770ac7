"""GPU tests (run on the accelerator machine): CUDA IPC across processes with different
CUDA_VISIBLE_DEVICES, and end-to-end broadcast updates over NCCL with byte-exact delivery of
mixed dtypes (fp8 included), rank subsets, 1/2/4 GPUs, and device memory that returns to its
level after each update."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from tests.support.cluster import REPO, Cluster, read_report, start, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors, write_sharded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
MEM_SLACK = 64 << 20  # bytes a GPU's free memory may drift between updates


def test_ipc_handle_maps_by_uuid_in_another_process() -> None:
    from ckpt_agent.backends import cuda_ipc

    dev = NGPU - 1  # the last GPU: in the child it is index 0
    src = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8, device=f"cuda:{dev}")
    name = cuda_ipc.encode(src)
    want = int(src.to(torch.int64).sum())
    child = textwrap.dedent(
        f"""
        import torch
        from ckpt_agent.backends.cuda_ipc import open_handle
        t, h = open_handle({name!r})
        assert t.device.index == 0, t.device
        print(int(t.to(torch.int64).sum()))
        t[:16].fill_(7)
        torch.cuda.synchronize()
        del t
        h.close()
        """
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(dev)}
    r = subprocess.run(
        [sys.executable, "-c", child], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == want
    torch.cuda.synchronize()
    assert int(src[:16].to(torch.int64).sum()) == 7 * 16  # same memory, written back


def _gpu_free() -> list[int]:
    from ckpt_agent.backends.cuda_devices import list_devices

    return [d.free_bytes for d in list_devices()]


def _cuda_cluster(root: Path, ngpu: int) -> Cluster:
    """ckptd, one agent on node g serving ngpu CUDA devices, a reference receiver on each
    (seeing only its GPU: index 0 locally, mapped by UUID), preallocated; the caller closes."""
    spec = ClusterSpec(
        receiver_timeout_s=20,
        nodes=(Node(id="g", devices=ngpu, args=("--device", "cuda")),),
        receivers=(
            Receivers(
                node="g",
                devices=tuple(range(ngpu)),
                args=("--cuda", "--prealloc"),
                env=(("CUDA_VISIBLE_DEVICES", "{device}"),),
            ),
        ),
        start_timeout_s=120,
    )
    return start(spec, root)


@pytest.mark.parametrize("ngpu", [n for n in (1, 2, 4) if n <= NGPU] or [1])
def test_broadcast_update_on_gpus(ngpu: int, tmp_path: Path) -> None:
    if ngpu > NGPU:
        pytest.skip(f"needs {ngpu} GPUs")
    c = _cuda_cluster(tmp_path, ngpu)
    try:
        ranks = list(range(ngpu))
        t1 = mixed_tensors(1, layers=4)
        c.client.push("g", 1, [str(write_sharded(t1, tmp_path / "v1"))])
        # small buckets: many buckets, chunked tensors, every owner in turn
        job = c.client.wait(c.client.update("g", 1, ranks=ranks, bucket_bytes=4096 * 4).id, 300)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason + c.log("agent-g")[-3000:]
        for r in ranks:
            assert read_report(c.reports[r])["tensors"] == digests(t1)
        # each worker measured its GPU's pinned H2D at start (PCIe 4/5: 20-60 GB/s)
        ceilings = [d.ceilings["copy"] for a in c.client.agents() for d in a.devices]
        assert len(ceilings) == ngpu and all(5e9 < x < 1e12 for x in ceilings), ceilings
        print(f"copy ceilings: {[round(x / 1e9, 1) for x in ceilings]} GB/s")

        t2 = mixed_tensors(2, layers=4)
        c.client.push("g", 2, [str(write_sharded(t2, tmp_path / "v2"))])
        free0 = _gpu_free()
        # planned buffers (small: this update is small), then real-size ones: 256 MiB slots,
        # triple-buffered, double staging, ~1.25 GiB a GPU while the update runs
        for i, bucket in enumerate((0, 0, 256 << 20, 256 << 20)):
            job = c.client.update("g", 2, ranks=ranks, bucket_bytes=bucket)
            job = c.client.wait(job.id, 300)
            assert job.state == tpb.JOB_SUCCEEDED, job.reason
            free = _gpu_free()
            drift = [abs(a - b) for a, b in zip(free0, free, strict=True)]
            assert max(drift) <= MEM_SLACK, f"update {i}: free memory moved by {drift}"
        for r in ranks:
            assert read_report(c.reports[r])["tensors"] == digests(t2)

        if ngpu > 1:  # a subset: the other ranks own bytes but keep their version
            sub = ranks[1::2]
            t3 = mixed_tensors(3, layers=4)
            c.client.push("g", 3, [str(write_sharded(t3, tmp_path / "v3"))])
            job = c.client.wait(c.client.update("g", 3, ranks=sub, bucket_bytes=1 << 20).id, 300)
            assert job.state == tpb.JOB_SUCCEEDED, job.reason
            for r in ranks:
                want = digests(t3) if r in sub else digests(t2)
                assert read_report(c.reports[r])["tensors"] == want
    finally:
        c.close()


def test_direct_push_of_cuda_pieces_in_two_parts(tmp_path: Path) -> None:
    """Two parts of one version from GPU tensors (row pieces of a bf16 weight, a whole fp32
    bias): each part's bytes go device -> host store without a .cpu() copy of the whole; the
    engine gets the assembled tensors byte for byte."""
    import threading

    from ckpt_client.direct_push import Item
    from ckpt_common.pieces import Piece

    c = _cuda_cluster(tmp_path, 1)
    try:
        c.client.register_instance(
            tpb.Instance(name="G", kind=tpb.INSTANCE_RECEIVER, tp_size=1,
                         ranks=[tpb.InstanceRank(node_id="g", device=0)])
        )  # fmt: skip
        w = torch.randn(4096, 2048, device="cuda").to(torch.bfloat16)
        b = torch.randn(2048, device="cuda")
        cut = 1536
        parts = [
            [Item("w", w[:cut], tuple(w.shape), Piece((0, 0), (cut, 2048))),
             Item("b", b, tuple(b.shape))],
            [Item("w", w[cut:], tuple(w.shape), Piece((cut, 0), (4096 - cut, 2048)))],
        ]  # fmt: skip
        out: list = [None, None]

        def one(i: int) -> None:
            try:
                out[i] = c.client.push_part("cw", 1, parts[i], node_id="g", part=i, parts=2)
            except Exception as e:
                out[i] = e

        ths = [threading.Thread(target=one, args=(i,)) for i in range(2)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(120)
        assert all(getattr(o, "state", None) == tpb.CHECKPOINT_READY for o in out), out
        job = c.client.wait(c.client.update("cw", 1, instances=["G"]).id, 120)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        want = digests({"w": w.cpu(), "b": b.cpu()})
        wait_for(lambda: read_report(c.reports[0]).get("tensors") == want, 30, "the bytes")
    finally:
        c.close()


def test_direct_push_from_the_gpu_reuses_pinned_segments(tmp_path: Path) -> None:
    """GPU tensors pushed version after version, the version before dropped once the engine
    serves the new one: the checksums computed on the GPU are numpy's; from the third push
    on, the version lands in a store (a renamed spare) the client pinned already; the engine
    gets every byte."""
    from ckpt_common import checksum

    c = _cuda_cluster(tmp_path, 1)
    try:
        c.client.register_instance(
            tpb.Instance(name="G", kind=tpb.INSTANCE_RECEIVER, tp_size=1,
                         ranks=[tpb.InstanceRank(node_id="g", device=0)])
        )  # fmt: skip
        base = {
            "w": torch.randn(8192, 4096, device="cuda").to(torch.bfloat16),  # 64 MiB
            "b": torch.randn(4097, device="cuda"),
            "odd": torch.randn(3, 5, 7, device="cuda").to(torch.float16),
        }
        for v in (1, 2, 3, 4):
            t = {n: x + v for n, x in base.items()}
            c.client.push_direct("gp", v, t, node_id="g")
            lp = c.client.last_push
            assert lp is not None and lp.trainer_checksums
            assert lp.newly_pinned == (1 if v <= 2 else 0), (v, lp)
            cpu = {n: x.cpu() for n, x in t.items()}
            want = {n: checksum.of_numpy(x.reshape(-1).view(torch.uint8).numpy())
                    for n, x in cpu.items()}  # fmt: skip
            got = c.client.get("gp", v, tensors=True).tensors
            assert {m.name: m.checksum for m in got} == want
            job = c.client.wait(c.client.update("gp", v, instances=["G"]).id, 120)
            assert job.state == tpb.JOB_SUCCEEDED, job.reason
            wait_for(lambda cpu=cpu: read_report(c.reports[0]).get("tensors") == digests(cpu),
                     30, "the bytes")  # fmt: skip
            if v > 1:
                c.client.delete("gp", v - 1)
    finally:
        c.close()


def test_strided_h2d_is_one_exact_2d_copy() -> None:
    """A kept part of a row-parallel weight (one run per row) copied from pinned host memory
    by cudaMemcpy2DAsync on the copy stream, next to plain runs: byte-exact."""
    from ckpt_agent.backends.base import Copy
    from ckpt_agent.backends.cuda import CudaBackend
    from ckpt_agent.backends.cuda_memcpy import _cudart

    be = CudaBackend.open(0)
    assert _cudart() is not None, "the CUDA runtime torch loaded was not found"
    src = torch.randint(0, 255, (1 << 20,), dtype=torch.uint8).pin_memory()
    dst = torch.zeros(1 << 19, dtype=torch.uint8, device=be.device)
    copies = [Copy(0, 4096, 1000), Copy(1024, 8192, 300, rows=700, stride=1024)]
    done, _ = be.h2d(dst, src, copies, [])
    done.synchronize()
    want = torch.zeros_like(dst, device="cpu")
    want[:1000] = src[4096:5096]
    want[1024 : 1024 + 700 * 300] = src[8192:].as_strided((700, 300), (1024, 1)).reshape(-1)
    assert torch.equal(dst.cpu(), want)
