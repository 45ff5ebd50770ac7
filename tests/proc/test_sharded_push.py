"""A version pushed in parts: a two-process FSDP2 job (gloo) whose ranks each write their
local shards (DTensor pieces) into their own node's host store, committed once; engines get
the whole tensors, byte for byte. Parts that disagree, overlap, leave a gap or never come
fail the push for every part, and nothing of it is kept."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.direct_push import Item
from ckpt_common.errors import AlreadyExists, DeadlineExceeded, InvalidArgument
from ckpt_common.pieces import Piece
from demo.models import save_model
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.sharded_job import run_fsdp2
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests

pytestmark = pytest.mark.slow


SPEC = ClusterSpec(
    receiver_timeout_s=10,
    nodes=(Node(id="n1"), Node(id="n2")),
    receivers=(Receivers(node="n1", instance="R"),),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "sharded")


@pytest.fixture(scope="module")
def model(cluster: Cluster) -> Path:
    """A tiny llama's checkpoint directory (the FSDP2 job's --model)."""
    return save_model("llama", 3, cluster.root / "llama")


def segments(node: str) -> list[str]:
    from ckpt_agent import shm
    from ckpt_agent.host_store import segment_prefix

    return [n for n in Path(shm.SHM_DIR).iterdir() if n.name.startswith(segment_prefix(node))]


def test_fsdp2_ranks_on_two_nodes_push_one_version(cluster: Cluster, model: Path) -> None:
    c = cluster
    res = run_fsdp2(c, ["n1", "n2"], "--model", str(model), "--name", "fsdp", "--version",
                    "1", "--instances", "R")  # fmt: skip
    assert [r["state"] for r in res] == ["succeeded", "succeeded"], res
    want = load_file(str(Path(model) / "model.safetensors"))
    cp = c.client.get("fsdp", 1, tensors=True)
    assert cp.state == tpb.CHECKPOINT_READY
    assert sorted(s.node_id for s in cp.shards) == ["n1", "n2"]  # each rank's bytes at home
    assert cp.tensor_count == len(want) and res[0]["tensors"] == len(want)
    assert cp.total_bytes == sum(t.numel() * t.element_size() for t in want.values())
    assert any(len(t.piece_shape) for t in cp.tensors)
    wait_for(lambda: read_report(c.reports[0]).get("tensors") == digests(want), 30, "the bytes")
    res = run_fsdp2(c, ["n2", "n1"], "--model", str(model), "--name", "fsdp", "--version",
                    "2", "--dtype", "bf16", "--instances", "R")  # fmt: skip
    assert res[1]["state"] == "succeeded", res
    half = {k: v.to(torch.bfloat16) for k, v in want.items()}
    wait_for(lambda: read_report(c.reports[0]).get("tensors") == digests(half), 30, "bf16 bytes")
    # the same job written for vLLM's trainer-side API, switched to ckptd by its init info
    res = run_fsdp2(c, ["n1", "n2"], "--model", str(model), "--name", "fsdp", "--version",
                    "3", "--instances", "R", "--vllm-api")  # fmt: skip
    assert [r["state"] for r in res] == ["succeeded", "succeeded"], res
    assert sorted(s.node_id for s in c.client.get("fsdp", 3).shards) == ["n1", "n2"]
    wait_for(lambda: read_report(c.reports[0]).get("tensors") == digests(want), 30, "v3's bytes")


def parts(c: Cluster, name: str, calls: list[tuple[str, list[Item]]], **kw) -> list:
    """Each (node, items) pushed as one part from its own thread; results or errors."""
    out: list = [None] * len(calls)

    def one(i: int, node: str, items: list[Item]) -> None:
        try:
            out[i] = c.client.push_part(
                name, 1, items, node_id=node, part=i, parts=kw.get("parts", len(calls)),
                timeout_s=kw.get("timeout_s", 20),
            )  # fmt: skip
        except Exception as e:
            out[i] = e

    ths = [threading.Thread(target=one, args=(i, n, it)) for i, (n, it) in enumerate(calls)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    return out


def rows(w: torch.Tensor, a: int, b: int) -> Item:
    return Item("w", w[a:b], tuple(w.shape), Piece((a, 0), (b - a, w.shape[1])))


def test_bad_parts_fail_every_part_and_keep_nothing(cluster: Cluster) -> None:
    c = cluster
    w = torch.randn(8, 4)
    before = {n: segments(n) for n in ("n1", "n2")}
    cases = {
        "gap": ([("n1", [rows(w, 0, 3)]), ("n2", [rows(w, 4, 8)])], InvalidArgument, "fewer"),
        "overlap": ([("n1", [rows(w, 0, 5)]), ("n2", [rows(w, 3, 8)])], InvalidArgument, "more"),
        "dtype": (
            [("n1", [rows(w, 0, 4)]), ("n2", [rows(w.double(), 4, 8)])],
            InvalidArgument,
            "disagree",
        ),
    }
    for name, (calls, err, why) in cases.items():
        got = parts(c, name, calls)
        assert all(isinstance(g, err) and why in str(g) for g in got), (name, got)
        assert not c.client.checkpoints(name)
    # a part that never comes: the others fail within the push's timeout, nothing kept
    got = parts(c, "late", [("n1", [rows(w, 0, 4)])], parts=2, timeout_s=2)
    assert isinstance(got[0], DeadlineExceeded) and "[1]" in str(got[0]), got
    assert not c.client.checkpoints("late")
    wait_for(lambda: {n: segments(n) for n in ("n1", "n2")} == before, 10, "stores freed")
    ok = parts(c, "good", [("n1", [rows(w, 0, 4)]), ("n2", [rows(w, 4, 8)])])
    assert all(g.state == tpb.CHECKPOINT_READY for g in ok), ok
    again = parts(c, "good", [("n1", [rows(w, 0, 4)])], parts=2)
    assert isinstance(again[0], AlreadyExists), again
