"""Deltas on the GPU (run on the accelerator machine): encoded on the device as a trainer
does, applied in place into device tensors as an engine does, exact for every width, and
refused without a change when the engine does not hold the base."""

from __future__ import annotations

import pytest
import torch

from ckpt_common import delta
from tests.support.tensors import delta_meta
from vllm_ext.delta_apply import DeltaRefused, apply_all

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _step(t: torch.Tensor, every: int) -> torch.Tensor:
    out = t.clone()
    flat = out.view(-1).view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])
    flat[::every] ^= 1
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("every", [40, 4, 1])  # sparse, bitmap, dense
def test_device_deltas_are_exact_and_in_place(dtype: torch.dtype, every: int) -> None:
    dev = torch.device("cuda")
    base = torch.randn(1024, 4097, device=dev).to(dtype)
    target = _step(base, every)
    enc = delta.encode(base.view(-1).view(torch.uint8), target.view(-1).view(torch.uint8),
                       base.element_size())  # fmt: skip
    assert enc.payload.is_cuda
    meta = delta_meta("w", base, target, enc)
    engine = {"w": base.clone()}
    other = {"w": _step(base, 7)}
    before = other["w"].clone()
    with pytest.raises(DeltaRefused, match="does not hold"):
        apply_all([(meta, enc.payload)], other.get)
    assert torch.equal(other["w"].view(torch.uint8), before.view(torch.uint8))
    (out,) = apply_all([(meta, enc.payload)], engine.get)
    assert out.data_ptr() == engine["w"].data_ptr()  # into the engine's own tensor
    assert torch.equal(engine["w"].view(torch.uint8), target.view(torch.uint8))
