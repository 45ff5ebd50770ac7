"""ckpt_common.delta: exact round trips at every density and width, the encoding chosen by
size, and every malformed payload refused before a byte of the base changes."""

from __future__ import annotations

import pytest
import torch

from ckpt_common import delta
from ckpt_common.delta import DeltaError, Encoding


def _pair(n: int, dtype: torch.dtype, frac: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    base = (
        torch.randn(n, generator=g).to(dtype)
        if dtype.is_floating_point
        else (torch.randint(-100, 100, (n,), generator=g).to(dtype))
    )
    target = base.clone()
    k = int(n * frac)
    idx = torch.randperm(n, generator=g)[:k]
    if dtype.is_floating_point:
        target[idx] = (target[idx].float() + 0.5).to(dtype)
    else:
        target[idx] += 1
    return base.view(torch.uint8), target.view(torch.uint8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int8, torch.float64])
@pytest.mark.parametrize("frac", [0.0, 0.001, 0.025, 0.2, 0.9])
def test_round_trip_is_exact(dtype: torch.dtype, frac: float) -> None:
    base, target = _pair(4099, dtype, frac)
    size = torch.empty(0, dtype=dtype).element_size()
    e = delta.encode(base, target, size)
    out = base.clone()
    delta.apply(out, e.encoding, e.count, e.payload, size)
    assert torch.equal(out, target)
    assert e.payload.numel() == delta.payload_nbytes(e.encoding, e.count, 4099, size)
    assert e.payload.numel() <= target.numel()


def test_encoding_follows_density() -> None:
    n = 1 << 16
    base, t1 = _pair(n, torch.bfloat16, 0.01)
    assert delta.encode(base, t1, 2).encoding == Encoding.SPARSE
    _, t2 = _pair(n, torch.bfloat16, 0.2)
    assert delta.encode(base, t2, 2).encoding == Encoding.BITMAP
    _, t3 = _pair(n, torch.bfloat16, 0.95)
    assert delta.encode(base, t3, 2).encoding == Encoding.DENSE
    e = delta.encode(base, t1, 2)  # 1 % of elements: 6 bytes each, a few % of dense
    assert e.payload.numel() < 0.04 * t1.numel()


def test_bit_patterns_not_values_are_compared() -> None:
    base = torch.ones(1000, dtype=torch.float32)
    base[:2] = torch.tensor([0.0, float("nan")])
    target = base.clone()
    target[0] = -0.0
    target.view(torch.int32)[1] += 1  # another NaN payload
    e = delta.encode(base.view(torch.uint8), target.view(torch.uint8), 4)
    assert e.count == 2
    out = base.clone().view(torch.uint8)
    delta.apply(out, e.encoding, e.count, e.payload, 4)
    assert torch.equal(out, target.view(torch.uint8))


def _sparse(n: int, idx: list[int], values: list[int]) -> torch.Tensor:
    head = torch.tensor(idx, dtype=torch.int32).view(torch.uint8)
    body = torch.tensor(values, dtype=torch.int16).view(torch.uint8)
    pad = torch.zeros((-head.numel()) % 8, dtype=torch.uint8)
    return torch.cat([head, pad, body])


@pytest.mark.parametrize(
    ("idx", "why"),
    [
        ([1, 1], "ascending"),  # overlapping indices
        ([3, 2], "ascending"),
        ([0, 64], "outside"),  # out of range
        ([-1, 2], "outside"),
    ],
)
def test_bad_indices_are_refused_untouched(idx: list[int], why: str) -> None:
    base = torch.zeros(64, dtype=torch.int16).view(torch.uint8)
    with pytest.raises(DeltaError, match=why):
        delta.apply(base, Encoding.SPARSE, 2, _sparse(64, idx, [5, 6]), 2)
    assert not base.any()


def test_malformed_payloads_are_refused_untouched() -> None:
    base = torch.zeros(64, dtype=torch.int16).view(torch.uint8)
    good = _sparse(64, [1, 2], [5, 6])
    for enc, count, payload, why in [
        (Encoding.SPARSE, 3, good, "needs"),  # count disagrees with the size
        (Encoding.SPARSE, 2, good[:-1], "needs"),  # truncated
        (Encoding.SPARSE, 99, good, "a delta of 99"),
        (7, 2, good, "unknown"),
        (Encoding.DENSE, 2, torch.zeros(128, dtype=torch.uint8), "dense"),
        (Encoding.DENSE, 64, torch.zeros(256, dtype=torch.uint8), "needs"),  # larger than dense
    ]:
        with pytest.raises(DeltaError, match=why):
            delta.apply(base, enc, count, payload, 2)
    bits = torch.zeros(8 + 4, dtype=torch.uint8)
    bits[0] = 0b11  # two set
    with pytest.raises(DeltaError, match="sets 2"):
        delta.apply(
            base, Encoding.BITMAP, 3, torch.cat([bits[:8], torch.zeros(6, dtype=torch.uint8)]), 2
        )
    short = torch.zeros(60, dtype=torch.int16).view(torch.uint8)
    bits[7] = 0x80  # element 63 of a tensor of 60
    bits[0] = 0b1
    with pytest.raises(DeltaError, match="beyond"):
        delta.apply(short, Encoding.BITMAP, 2, bits[:12], 2)
    assert not short.any()
    assert not base.any()


def test_odd_sizes() -> None:
    base = torch.zeros(6, dtype=torch.uint8)
    with pytest.raises(DeltaError, match="whole number"):
        delta.encode(base, base, 4)
    with pytest.raises(DeltaError, match="no delta"):
        delta.encode(base, base, 3)


def test_store_names_round_trip() -> None:
    assert delta.store_of(delta.store_name("run:a", 12)) == ("run:a", 12)
    for other in ("run", "~mirror/run", "~delta/x/run", "~delta/3/", "~delta/"):
        assert delta.store_of(other) is None
