"""Pure parts of P2P: NIC choice per device, the P2P plan, copies naming their sources."""

from __future__ import annotations

import pytest

from ckpt_agent.nic import nics_for_device, parse_explicit, parse_nccl_hca
from ckpt_daemon.model import RankRef, TensorSpec
from ckpt_daemon.plan.placement import place
from ckpt_daemon.plan.planner import plan_p2p

HCAS = ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "mlx5_bond_0"]


def test_explicit_map() -> None:
    assert parse_explicit("0=mlx5_0,1=mlx5_0+mlx5_1") == {0: ["mlx5_0"], 1: ["mlx5_0", "mlx5_1"]}
    env = {"CKPT_P2P_NICS": "0=mlx5_2,1=mlx5_3", "NCCL_IB_HCA": "mlx5_0"}
    assert nics_for_device(1, env, HCAS) == ["mlx5_3"]  # the explicit map wins
    with pytest.raises(ValueError, match="no NIC for device 2"):
        nics_for_device(2, env, HCAS)
    for bad in ("0:mlx5_0", "x=mlx5_0", "0="):
        with pytest.raises(ValueError):
            parse_explicit(bad)


def test_nccl_ib_hca_semantics() -> None:
    assert parse_nccl_hca("mlx5_0:1,mlx5_1:1", HCAS) == ["mlx5_0", "mlx5_1"]
    assert parse_nccl_hca("mlx5", HCAS) == HCAS  # prefix match, as NCCL does
    assert parse_nccl_hca("=mlx5_0", HCAS) == ["mlx5_0"]  # exact
    assert parse_nccl_hca("^mlx5_bond", HCAS) == ["mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3"]
    assert parse_nccl_hca("^=mlx5_0,mlx5_1", HCAS) == ["mlx5_2", "mlx5_3", "mlx5_bond_0"]
    assert parse_nccl_hca("", HCAS) == HCAS
    env = {"NCCL_IB_HCA": "=mlx5_0,mlx5_1"}
    assert [nics_for_device(d, env, HCAS) for d in range(4)] == [
        ["mlx5_0"],
        ["mlx5_1"],
        ["mlx5_0"],
        ["mlx5_1"],
    ]
    assert nics_for_device(0, {}, []) == []  # no NIC: Mooncake falls back to TCP


def test_copies_keep_their_source() -> None:
    """Entries of different sources are never merged into one copy, however they lie."""
    from ckpt.v1 import agent_pb2 as apb
    from ckpt_agent.bucket_copies import coalesce

    E = apb.BucketEntry
    got = coalesce([
        E(bucket_offset=0, store_offset=1 << 41, nbytes=100, source=3),
        E(bucket_offset=100, store_offset=(1 << 41) + 100, nbytes=100, source=3),
        E(bucket_offset=200, store_offset=(1 << 41) + 200, nbytes=100, source=4),
    ])  # fmt: skip
    assert [(c.src, c.run, c.source) for c in got] == [(1 << 41, 200, 3), ((1 << 41) + 200, 100, 4)]


def test_plan_p2p_only_targets_take_part_and_reads_are_spread() -> None:
    owners = [RankRef("a", 0), RankRef("a", 1), RankRef("b", 0)]
    specs = [
        TensorSpec(
            name=f"model.layers.{i}.w",
            dtype="U8",
            shape=(4096,),
            nbytes=4096,
            path="/f",
            file_offset=0,
        )
        for i in range(24)
    ]
    p = place(specs, owners)
    targets = [RankRef("c", 1), RankRef("c", 0)]
    plan, sources = plan_p2p(p.tensors, targets, bucket_bytes=8192)
    assert plan.participants == [RankRef("c", 0), RankRef("c", 1)]
    assert sources == owners
    readers = [b.owner for b in plan.buckets]
    assert set(readers) == {0, 1} and abs(readers.count(0) - readers.count(1)) <= 1
    seen = set()
    for b in plan.buckets:
        for e in b.entries:
            src, off = e.source, e.store_offset
            t = plan.tensors[e.tensor]
            assert sources[src] == t.owner and off == t.store_offset + e.chunk_offset
            seen.add(src)
    assert seen == {0, 1, 2}  # every owner is read from


def test_mirror_map_puts_mirrors_on_other_nodes() -> None:
    from ckpt_daemon.plan.placement import PlanError, mirror_map

    rs = [RankRef("a", 0), RankRef("a", 1), RankRef("b", 0), RankRef("b", 1)]
    m = mirror_map(rs)
    assert sorted(m.values()) == sorted(rs)  # a bijection
    assert all(m[r].node_id != r.node_id for r in rs)
    one_node = [RankRef("a", 0), RankRef("a", 1)]
    assert mirror_map(one_node) == {one_node[0]: one_node[1], one_node[1]: one_node[0]}
    with pytest.raises(PlanError):
        mirror_map([RankRef("a", 0)])


def test_sibling_stores_map_this_nodes_stores_once_and_refuse_others(tmp_path) -> None:
    import os

    import pytest

    from ckpt_agent import shm
    from ckpt_agent.backends.cpu import CpuBackend
    from ckpt_agent.host_store import segment_prefix
    from ckpt_agent.siblings import SiblingError, SiblingStores

    node = f"sib-{os.getpid()}"
    prefix = segment_prefix(node)
    name, renamed = f"{prefix}1_va", f"{prefix}1_vb"
    mem = shm.create(name, 4096)
    mem.buf[:4] = b"abcd"
    sib = SiblingStores(node, CpuBackend(f"{prefix}9_", "127.0.0.1"))
    try:
        t = sib.get(name)
        assert bytes(t[:4].numpy()) == b"abcd"
        os.rename(os.path.join(shm.SHM_DIR, name), os.path.join(shm.SHM_DIR, renamed))
        assert sib.get(renamed) is t  # a spare reused under a new name: the same mapping
        for bad in ("ckpt_other_1_v", f"{prefix}../x", "..", f"{prefix}1_nope"):
            with pytest.raises(SiblingError):
                sib.get(bad)
        shm.unlink(renamed)
        sib.prune()
        assert not sib._maps
        # the worker's own store is read where it is: no second mapping
        from ckpt.v1 import agent_pb2 as apb
        from ckpt_agent.host_store import HostStore

        own = HostStore(node, 3)
        held = own.load(apb.Load(checkpoint="c", version=1, device=3, nbytes=4096))
        mine = SiblingStores(node, CpuBackend(f"{prefix}8_", "127.0.0.1"), own)
        t = mine.get(held.segment)
        assert t.numel() >= 4096 and not mine._maps
        own.close()
    finally:
        sib.close()
        mem.close()
        shm.unlink(renamed)
        shm.unlink(name)
