"""Quantise / dequantise: formulas against a per-group loop, bounds, packing, partial blocks, NaN."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantattn_hf.config import OperandQuant
from quantattn_hf.quant import StaticQuant, pack_int4, quantize, unpack_int4

QMAX = {"int8": 127, "int4": 7, "fp8_e4m3": 448}
SPECS = [
    OperandQuant("int8", mode="channel", block_size=64, subtract_mean=True),
    OperandQuant("int8", mode="row"),
    OperandQuant("int4", mode="channel", block_size=32, subtract_mean=True),
    OperandQuant("int4", mode="row"),
    OperandQuant("int8", mode="block", block_size=16, subtract_mean=True),
    OperandQuant("fp8_e4m3", mode="channel", block_size=0),
    OperandQuant("int8", strategy="asymmetric", mode="row"),
    OperandQuant("int4", strategy="asymmetric", mode="channel", block_size=8),
    OperandQuant("int8", strategy="legacy", mode="tensor"),
]


def groups(x: torch.Tensor, spec: OperandQuant):
    """Yield (index, elements) of every group by plain loops: the independent definition."""
    b, h, s, d = x.shape
    if spec.mode == "tensor":
        yield (Ellipsis,), x
        return
    if spec.mode == "row":
        for i in range(b):
            for j in range(h):
                for t in range(s):
                    yield (i, j, t), x[i, j, t]
        return
    t_blk = spec.block_size or s
    for i in range(b):
        for j in range(h):
            for n, start in enumerate(range(0, s, t_blk)):
                blk = x[i, j, start : start + t_blk]
                if spec.mode == "block":
                    yield (i, j, n), blk
                else:
                    for c in range(d):
                        yield (i, j, n, c), blk[:, c]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.precision}-{s.strategy}-{s.mode}{s.block_size}")
@pytest.mark.parametrize("seq", [1, 37, 64, 100])
def test_scales_match_a_per_group_loop(spec, seq, gen):
    x = torch.randn(2, 3, seq, 16, generator=gen) * 3 + 0.5
    qt = quantize(x, spec)
    assert qt.data.shape[-1] == (8 if spec.precision == "int4" else 16)
    for idx, g in groups(x, spec):
        g = g.to(torch.float32)
        scale = qt.scale[idx].flatten()[0] if spec.mode != "tensor" else qt.scale.flatten()[0]
        if spec.subtract_mean:
            mean = g.mean(dim=0)
            assert torch.allclose(
                qt.mean[idx[:3]] if spec.mode == "block" else qt.mean[idx[:3]][idx[3]], mean, atol=1e-5
            )
            g = g - mean
        if spec.strategy == "asymmetric":
            lo, hi = (-128, 127) if spec.precision == "int8" else (0, 15)
            want = max(float(g.max() - g.min()), 2.0**-60) / (hi - lo)
        else:
            want = max(float(g.abs().max()), 2.0**-60) / QMAX[spec.precision]
        assert math.isclose(float(scale), float(want), rel_tol=1e-6), (idx, float(scale), float(want))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.precision}-{s.strategy}-{s.mode}{s.block_size}")
def test_round_trip_error_is_within_half_a_step(spec, gen):
    x = torch.randn(2, 3, 77, 32, generator=gen) * 2
    qt = quantize(x, spec)
    err = (qt.dequantize(torch.float32) - x).abs()
    s = x.shape[2]
    if spec.mode in ("channel", "block"):
        t = spec.block_size or s
        step = qt.scale.repeat_interleave(t, dim=2)[:, :, :s]
    else:
        step = qt.scale
    if spec.precision == "fp8_e4m3":
        bound = (x.abs() * 2.0**-4 + step * 2.0**-9) * 1.0001
    else:
        bound = step / 2 * 1.0001 + 1e-6
    assert torch.all(err <= bound.expand_as(err))


def test_groups_never_straddle_heads_batches_or_blocks(gen):
    spec = OperandQuant("int8", mode="channel", block_size=16, subtract_mean=True)
    x = torch.randn(2, 2, 40, 8, generator=gen)
    base = quantize(x, spec)
    y = x.clone()
    y[1, 0, 16:32] *= 50  # only batch 1, head 0, block 1 changes
    changed = quantize(y, spec)
    diff = (changed.scale != base.scale).any(dim=-1)
    expected = torch.zeros_like(diff)
    expected[1, 0, 1] = True
    assert torch.equal(diff, expected)


def test_partial_last_block_uses_its_own_tokens_only(gen):
    spec = OperandQuant("int8", mode="channel", block_size=32)
    x = torch.randn(1, 1, 40, 4, generator=gen)
    qt = quantize(x, spec)
    assert qt.scale.shape == (1, 1, 2, 4)
    assert torch.allclose(qt.scale[0, 0, 1], x[0, 0, 32:].abs().amax(0) / 127)


def test_int4_packing_layout_low_nibble_first():
    codes = torch.tensor([[1, -2, 7, -7, 0, 5]])
    packed = pack_int4(codes)
    assert packed.tolist() == [[0xE1, 0x97, 0x50]]
    assert torch.equal(unpack_int4(packed, signed=True), codes.to(torch.int16))
    assert torch.equal(
        unpack_int4(pack_int4(torch.tensor([[15, 0, 8, 9]])), signed=False),
        torch.tensor([[15, 0, 8, 9]], dtype=torch.int16),
    )


@given(st.lists(st.integers(-8, 7), min_size=2, max_size=64).filter(lambda c: len(c) % 2 == 0))
def test_int4_pack_unpack_round_trips(codes):
    t = torch.tensor(codes).view(1, -1)
    assert torch.equal(unpack_int4(pack_int4(t), signed=True), t.to(torch.int16))
    assert torch.equal(unpack_int4(pack_int4(t + 8), signed=False), (t + 8).to(torch.int16))


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 70),
    st.sampled_from([2, 8, 40]),
    st.sampled_from(SPECS),
    st.floats(1e-3, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_round_trip_property(b, h, s, d, spec, magnitude, seed):
    x = torch.randn(b, h, s, d, generator=torch.Generator().manual_seed(seed)) * magnitude
    qt = quantize(x, spec)
    back = qt.dequantize(torch.float32)
    assert back.shape == x.shape and torch.isfinite(back).all()
    levels = {"int8": 127, "int4": 7, "fp8_e4m3": 8}[spec.precision]
    assert float((back - x).abs().max()) <= float(x.abs().max()) * (2.0 / levels) + 1e-6
    data_bytes = qt.data.numel() * qt.data.element_size()
    assert data_bytes == (x.numel() // 2 if spec.precision == "int4" else x.numel())
    assert qt.nbytes() == data_bytes + sum(t.numel() * 4 for t in (qt.scale, qt.zero_point, qt.mean) if t is not None)


def test_non_finite_groups_dequantise_to_nan_and_others_stay_finite(gen):
    spec = OperandQuant("int8", mode="row")
    x = torch.randn(1, 2, 5, 8, generator=gen)
    x[0, 1, 3, 2] = float("nan")
    x[0, 0, 1, 0] = float("inf")
    back = quantize(x, spec).dequantize(torch.float32)
    bad = torch.zeros(1, 2, 5, dtype=torch.bool)
    bad[0, 1, 3] = bad[0, 0, 1] = True
    assert torch.isnan(back[bad]).all()
    assert torch.isfinite(back[~bad]).all()


def test_int4_needs_an_even_head_dim(gen):
    with pytest.raises(ValueError, match="even head dim"):
        quantize(torch.randn(1, 1, 4, 5, generator=gen), OperandQuant("int4", mode="row"))


def test_static_scales_equal_to_measured_ones_give_the_same_codes(gen):
    spec = OperandQuant("int8", mode="channel", block_size=0, subtract_mean=True)
    x = torch.randn(1, 2, 48, 8, generator=gen)
    dyn = quantize(x, spec)
    stat = quantize(x, spec, static=StaticQuant(dyn.scale, dyn.mean))
    assert torch.equal(stat.data, dyn.data)
    clipped = quantize(x * 4, spec, static=StaticQuant(dyn.scale, dyn.mean))
    assert int(clipped.data.abs().max()) == 127
    with pytest.raises(ValueError, match="broadcast"):
        quantize(x, spec, static=StaticQuant(torch.ones(1, 3, 1, 8), dyn.mean))
    with pytest.raises(ValueError, match="static mean: expected"):
        quantize(x, spec, static=StaticQuant(dyn.scale, dyn.mean[:, :, 0]))


@pytest.mark.parametrize("mode", ["channel", "block"])
def test_static_scale_without_a_mean_takes_each_blocks_own_mean(mode, gen):
    """No static mean: each block's mean is taken away as dynamic quantisation does, then the static scale applies."""
    spec = OperandQuant("int4", mode=mode, block_size=16, subtract_mean=True)
    x = torch.randn(2, 3, 50, 8, generator=gen) * 3 + torch.randn(1, 3, 1, 8, generator=gen) * 5
    dyn = quantize(x, spec)
    scale = dyn.scale.amax(dim=(0, 2), keepdim=True) * 0.8  # some values clip
    held = quantize(x, spec, static=StaticQuant(scale))
    assert torch.equal(held.mean, dyn.mean)
    means = torch.stack([x[:, :, i : i + 16].double().mean(dim=2) for i in range(0, 50, 16)], dim=2)
    torch.testing.assert_close(held.mean.double(), means, rtol=0, atol=1e-5)
    full_scale = scale.double().expand(2, 3, 1, -1 if mode == "channel" else 8)
    codes = torch.round((x.double() - means.repeat_interleave(16, dim=2)[:, :, :50]) / full_scale).clamp(-7, 7)
    assert (held.codes().double() != codes).double().mean() < 1e-3  # float32 vs float64 at rounding boundaries
    assert (held.codes().double() - codes).abs().max() <= 1
    assert int(held.codes().abs().max()) == 7
    with pytest.raises(ValueError, match="broadcast"):
        quantize(x, spec, static=StaticQuant(torch.ones(1, 4, 1, 1)))
