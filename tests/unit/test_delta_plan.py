"""The pure decisions of delta updates (ckpt_daemon.plan.deltas) and an engine's proof of
one (vllm_ext.delta_apply): what is diffed, the payloads as tensors, the common base, when a
delta pays; a base the engine does not hold, or a result that is not the target, refused."""

from __future__ import annotations

import pytest
import torch

from ckpt_common import delta
from ckpt_common.pieces import Piece
from ckpt_daemon.model import Instance, InstanceKind, RankRef, TensorInfo
from ckpt_daemon.plan import deltas
from ckpt_daemon.plan.deltas import Payload
from tests.support.tensors import delta_meta
from vllm_ext.delta_apply import DeltaRefused, apply_all

A, B = RankRef("a", 0), RankRef("b", 0)


def _t(name: str, owner: RankRef = A, *, dtype: str = "BF16", off: int = 0, **kw) -> TensorInfo:
    kw.setdefault("checksum", 7)
    return TensorInfo(name=name, dtype=dtype, shape=(4, 4), nbytes=32, owner=owner,
                      store_offset=off, **kw)  # fmt: skip


def test_diff_tasks_pair_only_what_can_be_diffed() -> None:
    base = [_t("w"), _t("moved", B), _t("retyped", dtype="F16"), _t("piece"),
            _t("unsummed", checksum=None)]  # fmt: skip
    target = [_t("w", off=512), _t("moved"), _t("retyped"), _t("new"),
              _t("piece", piece=Piece((0, 0), (2, 4))), _t("unsummed")]  # fmt: skip
    tasks = deltas.diff_tasks(base, target)
    assert list(tasks) == [A]
    got = {t.target.name: t.base for t in tasks[A]}
    assert got["w"] is base[0]
    assert all(got[n] is None for n in ("moved", "retyped", "new", "piece", "unsummed"))
    assert [t.target.name for t in tasks[A]] == [t.name for t in target]  # target's order
    assert tasks[A][0].itemsize == 2


def test_payload_tensors_carry_the_proof() -> None:
    b, t = _t("w", checksum=1), _t("w", checksum=2)
    tasks = [deltas.DiffTask(t, b), deltas.DiffTask(_t("new", checksum=3), None)]
    made = [Payload(1, 3, 0, 24, 99), Payload(0, 16, 256, 32, 3)]
    out = deltas.payload_tensors(tasks, made, base=5)
    assert out[0].nbytes == 24 and out[0].checksum == 99 and out[0].store_offset == 0
    d = out[0].delta
    assert d is not None
    assert (d.base_version, d.encoding, d.count, d.base_checksum, d.target_checksum) == (
        5, 1, 3, 1, 2,
    )  # fmt: skip
    assert out[1].delta is None and out[1].store_offset == 256  # dense: the tensor itself
    with pytest.raises(ValueError, match="not its bytes"):  # a dense payload must be the tensor
        deltas.payload_tensors(tasks, [made[0], Payload(0, 16, 256, 32, 4)], base=5)
    with pytest.raises(ValueError, match="payloads for"):
        deltas.payload_tensors(tasks, made[:1], base=5)


def _inst(name: str, version: int, **kw) -> Instance:
    kw.setdefault("checkpoint", "m")
    return Instance(name=name, kind=InstanceKind.RECEIVER, endpoint="", tp_size=1, ranks=[A],
                    version=version, ready=True, **kw)  # fmt: skip


def test_common_base() -> None:
    assert deltas.common_base("m", [_inst("r", 3), _inst("s", 3)]) == (3, "")
    for insts, why in [
        ([], "not known"),
        ([_inst("r", 3), _inst("s", 2)], "different versions"),
        ([_inst("r", 3, checkpoint="other")], "serves no version"),
        ([_inst("r", 0)], "serves no version"),
        ([_inst("r", 3, overlays=[{"checkpoint": "m", "version": 4, "tensors": ["x"]}])],
         "exactly"),
        ([_inst("r", 3, pending="job")], "exactly"),
    ]:  # fmt: skip
        base, reason = deltas.common_base("m", insts)
        assert base == 0 and why in reason


def test_which_engines_take_deltas() -> None:
    assert deltas.no_delta_engines([_inst("r", 3)]) == ""
    vllm = Instance(name="v", kind=InstanceKind.VLLM, endpoint="", tp_size=1, ranks=[A])
    assert "vLLM" in deltas.no_delta_engines([_inst("r", 3), vllm])


def test_pays() -> None:
    assert deltas.pays(10, 100)
    assert not deltas.pays(60, 100)
    assert not deltas.pays(0, 0)


def test_an_engine_applies_only_onto_its_base_and_only_into_the_target() -> None:
    base = torch.randn(64, 64).to(torch.bfloat16)
    target = base.clone()
    target.view(-1)[::97] += 1
    enc = delta.encode(base.view(-1).view(torch.uint8), target.view(-1).view(torch.uint8), 2)
    assert enc.encoding == delta.Encoding.SPARSE
    meta = delta_meta("w", base, target, enc)
    kept = base.clone()
    with pytest.raises(DeltaRefused, match="no base"):
        apply_all([(meta, enc.payload)], None)
    other = base.clone()
    other.view(-1)[5] += 1  # the engine holds another version: nothing changes
    before = other.clone()
    with pytest.raises(DeltaRefused, match="does not hold version 1"):
        apply_all([(meta, enc.payload)], {"w": other}.get)
    assert torch.equal(other, before)
    broken = enc.payload.clone()
    broken[:4].view(torch.int32)[0] = 1 << 20  # an index out of range: refused, unchanged
    with pytest.raises(DeltaRefused, match="outside"):
        apply_all([(meta, broken)], {"w": base}.get)
    assert torch.equal(base, kept)
    engine = {"w": base}
    (out,) = apply_all([(meta, enc.payload)], engine.get)
    assert torch.equal(out, target.reshape(-1).view(torch.uint8))
    assert torch.equal(engine["w"], target)  # applied in place, into the engine's tensor
    bad = meta.__deepcopy__()
    bad.delta.base_checksum = meta.delta.target_checksum
    bad.delta.target_checksum ^= 1  # a delta that is not the target's (a bug, a forgery)
    with pytest.raises(DeltaRefused, match="not the target"):
        apply_all([(bad, enc.payload)], engine.get)
