"""The pure planner: placement and update plans."""

from __future__ import annotations

import time

import pytest

from ckpt_common.layers import layer_key
from ckpt_daemon.model import RankRef, TensorInfo, TensorSpec
from ckpt_daemon.plan.placement import ALIGN, PlanError, align_up, place, rank_order
from ckpt_daemon.plan.planner import choose_bucket_bytes, plan_update, select_tensors

MIB = 1 << 20


def spec(name: str, nbytes: int, node: str = "") -> TensorSpec:
    return TensorSpec(
        name=name,
        dtype="U8",
        shape=(nbytes,),
        nbytes=nbytes,
        path="/f",
        file_offset=0,
        node_id=node,
    )


def llama_specs(layers: int, per: int = 1000) -> list[TensorSpec]:
    out = [
        spec("model.embed_tokens.weight", 5 * per),
        spec("lm_head.weight", 5 * per),
        spec("model.norm.weight", 10),
    ]
    for i in range(layers):
        for t in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append(spec(f"model.layers.{i}.self_attn.{t}.weight", per))
        out.append(spec(f"model.layers.{i}.input_layernorm.weight", 10))
    return out


def ranks(n: int, nodes: int = 1) -> list[RankRef]:
    return [RankRef(f"n{i % nodes}", i // nodes) for i in range(n)]


def covered(plan) -> dict[int, int]:
    got: dict[int, int] = {}
    for b in plan.buckets:
        for e in b.entries:
            got[e.tensor] = got.get(e.tensor, 0) + e.nbytes
    return got


def test_layer_key() -> None:
    assert layer_key("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_key("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_key("model.norm.weight") == "model.norm"
    assert layer_key("lm_head.weight") == "lm_head"
    assert layer_key("scalar") == "scalar"


def test_rank_order_is_node_then_device() -> None:
    rs = [RankRef("b", 0), RankRef("a", 1), RankRef("a", 0), RankRef("b", 1)]
    assert rank_order(rs) == [RankRef("a", 0), RankRef("a", 1), RankRef("b", 0), RankRef("b", 1)]


def test_place_spreads_by_bytes_and_keeps_layers_together() -> None:
    p = place(llama_specs(16), ranks(4))
    loads = sorted(p.store_bytes.values())
    assert loads[-1] - loads[0] <= 5 * 1000 + ALIGN * 10
    owners: dict[str, set[RankRef]] = {}
    for t in p.tensors:
        owners.setdefault(layer_key(t.name), set()).add(t.owner)
    assert all(len(o) == 1 for k, o in owners.items() if ".layers." in k)
    # offsets are aligned and disjoint per owner
    for r in p.store_bytes:
        mine = sorted((t.store_offset, t.nbytes) for t in p.tensors if t.owner == r)
        for (o1, n1), (o2, _) in zip(mine, mine[1:], strict=False):
            assert o1 % ALIGN == 0 and o1 + n1 <= o2


def test_place_respects_node_pins() -> None:
    specs = [spec(f"a.{i}.w", 100, node="n1") for i in range(8)] + [spec("b.w", 100, node="n0")]
    p = place(specs, ranks(4, nodes=2))
    for t in p.tensors:
        assert t.owner.node_id == ("n0" if t.name == "b.w" else "n1")


def test_place_errors() -> None:
    with pytest.raises(PlanError, match="no ranks"):
        place([spec("a", 1)], [])
    with pytest.raises(PlanError, match="appears more than once"):
        place([spec("a", 1), spec("a", 2)], ranks(1))
    with pytest.raises(PlanError, match="node 'zz'"):
        place([spec("a", 1, node="zz")], ranks(2))


def test_plan_covers_every_byte_once_within_buckets() -> None:
    p = place(llama_specs(10, per=3000), ranks(3))
    plan = plan_update(p.tensors, ranks(3), bucket_bytes=8192)
    assert covered(plan) == {i: t.nbytes for i, t in enumerate(plan.tensors)}
    for b in plan.buckets:
        assert 0 < b.nbytes <= 8192
        owner = plan.participants[b.owner]
        for e in b.entries:
            assert plan.tensors[e.tensor].owner == owner
            assert e.bucket_offset % ALIGN == 0 and e.bucket_offset + e.nbytes <= b.nbytes


def test_plan_keeps_layers_in_one_bucket_when_they_fit() -> None:
    p = place(llama_specs(12, per=1000), ranks(2))
    plan = plan_update(p.tensors, ranks(2), bucket_bytes=align_up(4 * 1000 + 10) * 2)
    where: dict[str, set[int]] = {}
    for k, b in enumerate(plan.buckets):
        for e in b.entries:
            where.setdefault(layer_key(plan.tensors[e.tensor].name), set()).add(k)
    assert all(len(v) == 1 for v in where.values())


def test_plan_splits_a_layer_larger_than_a_bucket_and_chunks_huge_tensors() -> None:
    specs = [
        spec("model.layers.0.a", 3000),
        spec("model.layers.0.b", 3000),
        spec("huge", 10_000),
        spec("empty", 0),
    ]
    p = place(specs, ranks(1))
    plan = plan_update(p.tensors, ranks(1), bucket_bytes=4096)
    assert covered(plan)[[t.name for t in plan.tensors].index("huge")] == 10_000
    huge = [e for b in plan.buckets for e in b.entries if plan.tensors[e.tensor].name == "huge"]
    assert len(huge) == 3 and sorted(e.chunk_offset for e in huge) == [0, 4096, 8192]
    assert any(plan.tensors[e.tensor].name == "empty" for b in plan.buckets for e in b.entries)


def test_plan_interleaves_owners_and_orders_participants() -> None:
    p = place(llama_specs(8), ranks(4))
    plan = plan_update(p.tensors, [RankRef("n0", 3), RankRef("n0", 1)], bucket_bytes=4096)
    assert plan.participants[:2] == [RankRef("n0", 1), RankRef("n0", 3)]
    assert set(plan.participants) == set(ranks(4))
    assert plan.is_target(1) and not plan.is_target(2)
    owners = [b.owner for b in plan.buckets[:4]]
    assert len(set(owners)) == 4


def test_subset_and_select() -> None:
    p = place(llama_specs(3), ranks(2))
    sel = select_tensors(p.tensors, ["model.layers.1."])
    assert sel and all(t.name.startswith("model.layers.1.") for t in sel)
    with pytest.raises(PlanError, match="no tensor matches"):
        select_tensors(p.tensors, ["nope"])


def test_choose_bucket_bytes() -> None:
    assert choose_bucket_bytes([300 * MIB, 900 * MIB], nbuf=2, cap=64 * MIB) == 64 * MIB
    assert choose_bucket_bytes([30 * MIB], nbuf=2, cap=64 * MIB) == 10 * MIB
    assert choose_bucket_bytes([], nbuf=2, cap=1, requested=3 * MIB) == 3 * MIB
    with pytest.raises(PlanError, match="too little free memory"):
        choose_bucket_bytes([MIB], nbuf=2, cap=64 * MIB)
    with pytest.raises(PlanError, match="below the minimum"):
        choose_bucket_bytes([MIB], nbuf=2, cap=64 * MIB, requested=100)


def test_plan_errors() -> None:
    p = place(llama_specs(1), ranks(1))
    with pytest.raises(PlanError):
        plan_update(p.tensors, [], bucket_bytes=4096)
    with pytest.raises(PlanError):
        plan_update(p.tensors, ranks(1), bucket_bytes=1000)


def test_plan_100k_tensors_1024_ranks_is_fast() -> None:
    nr = 1024
    rs = ranks(nr, nodes=128)
    tensors = [
        TensorInfo(
            name=f"model.layers.{i // 10}.t{i % 10}.weight",
            dtype="BF16",
            shape=(4096,),
            nbytes=8192,
            owner=rs[(i // 10) % nr],
            store_offset=(i % 10) * 8192,
        )
        for i in range(100_000)
    ]
    t0 = time.perf_counter()
    plan = plan_update(tensors, rs, bucket_bytes=64 * MIB)
    took = time.perf_counter() - t0
    assert len(plan.participants) == nr
    assert sum(len(b.entries) for b in plan.buckets) == 100_000
    print(f"plan_update 100k tensors x {nr} ranks: {took:.3f}s, {len(plan.buckets)} buckets")
    assert took < 1.0


def test_small_updates_get_small_buffers_and_gpus_triple_buffer() -> None:
    from ckpt_daemon.plan.planner import choose_nbuf

    big = 80 << 30

    def pick(largest: int) -> int:
        return choose_bucket_bytes([big], nbuf=2, cap=512 * MIB, largest_owner_bytes=largest)

    assert pick(300_000) == MIB
    assert pick(5 * MIB) == 5 * MIB
    assert pick(9 << 30) == 512 * MIB
    assert choose_nbuf({"cuda"}, [big], 2) == 3
    assert choose_nbuf({"cuda"}, [100 * MIB], 2) == 2
    assert choose_nbuf({"cpu"}, [big], 2) == 2
