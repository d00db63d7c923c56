"""Calibration statistics and the static-scale methods, against torch reductions and `quant.quantize` itself."""

import pytest
import torch

from quantattn_hf import OperandQuant, QuantConfig
from quantattn_hf.calibration import (
    CalibrationStats,
    Method,
    OperandStats,
    compute_calibration,
    operand_static,
    span_for,
)
from quantattn_hf.calibration.stats import quantile
from quantattn_hf.quant import StaticQuant, quantize


def _data(seed: int, b: int = 2, h: int = 3, s: int = 50, d: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.rand(1, h, 1, d, generator=g) * 4
    return torch.randn(b, h, s, d, generator=g) * spread + torch.randn(1, h, 1, d, generator=g)


def _tokens(xs: list[torch.Tensor]) -> torch.Tensor:
    """[H, N, D] of every token of every call, in order."""
    return torch.cat([x.permute(1, 0, 2, 3).reshape(x.shape[1], -1, x.shape[3]) for x in xs], dim=1)


def _block_residual64(x: torch.Tensor, block: int) -> torch.Tensor:
    """x less the float64 mean of its own block of `block` tokens (0: the whole sequence), blocks from token 0."""
    x = x.double()
    out = torch.empty_like(x)
    step = block or x.shape[2]
    for start in range(0, x.shape[2], step):
        part = x[:, :, start : start + step]
        out[:, :, start : start + step] = part - part.mean(dim=2, keepdim=True)
    return out


def test_stats_match_torch_reductions_and_sample_holds_recorded_spans():
    xs = [_data(i) for i in range(3)]
    xs[1][0, 1, 7, 2] = float("nan")
    st = OperandStats(max_samples=160, seed=3, span=16)
    for x in xs:
        st.record(x)
    all_tokens = _tokens(xs)
    finite = torch.isfinite(all_tokens).all(dim=2).all(dim=0)
    tokens = all_tokens[:, finite]
    assert st.count == tokens.shape[1] == 299
    torch.testing.assert_close(st.amax, tokens.amax(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(st.amin, tokens.amin(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(st.mean, tokens.double().mean(dim=1).float(), rtol=1e-6, atol=1e-6)
    assert st.block_sizes == (0, 1, 2, 4, 8, 16)
    # the spans of 16 tokens of the 5 sequences without NaN: 20 candidates, 160 // 16 = 10 kept, each once
    sequences = [x[i] for x in xs for i in range(2) if torch.isfinite(x[i]).all()]
    candidates = [(j, p) for j in range(len(sequences)) for p in range(4)]
    assert st.spans.shape == (3, 10, 16, 8) and st.seq_means.shape == (3, 10, 8)
    kept = []
    for n in range(10):
        span, length = st.spans[:, n], int(st.lengths[n])
        hits = [
            (j, p) for j, p in candidates if torch.equal(sequences[j][:, 16 * p : 16 * p + length], span[:, :length])
        ]
        assert len(hits) == 1 and length == min(16, 50 - 16 * hits[0][1])
        assert (span[:, length:] == 0).all()
        torch.testing.assert_close(st.seq_means[:, n], sequences[hits[0][0]].double().mean(dim=1).float())
        kept.append(hits[0])
    assert len(set(kept)) == 10
    valid = torch.arange(16) < st.lengths[:, None]
    torch.testing.assert_close(st.sample, st.spans[:, valid], rtol=0, atol=0)
    assert st.sample.shape == (3, int(st.lengths.sum()), 8)
    for block in st.block_sizes:
        # exact max |x - its block mean| over every block without NaN, and the sampled tokens' residuals
        res = [_block_residual64(x, block) for x in xs]
        mags = torch.cat([r.abs().nan_to_num(nan=0.0).amax(dim=2) for r in res]).amax(dim=0)
        absmax, sample = st.residuals(block)
        torch.testing.assert_close(absmax, mags.float(), rtol=1e-5, atol=1e-6)
        seq_res = [r[i] for r, x in zip(res, xs, strict=True) for i in range(2) if torch.isfinite(x[i]).all()]
        want = torch.cat([seq_res[j][:, 16 * p : 16 * p + 16] for j, p in kept], dim=1)
        assert sample.shape == want.shape
        got, ref = sample.double().sort(dim=1).values, want.sort(dim=1).values  # order: grouped by span length
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="block size 12: the statistics hold spans of 16 tokens, which it does not"):
        st.residuals(12)


def test_sample_keeps_everything_below_the_cap():
    x = _data(5)
    st = OperandStats(max_samples=1000)
    st.record(x)
    torch.testing.assert_close(st.sample, _tokens([x]), rtol=0, atol=0)


def test_stats_reject_changed_shapes():
    st = CalibrationStats()
    st.record("layer", _data(0), _data(1), _data(2))
    with pytest.raises(ValueError, match="layer 'layer' operand 'q'.*shape changed"):
        st.record("layer", _data(0, h=4), _data(1), _data(2))


def test_quantile_matches_torch():
    v = torch.randn(4, 3, 257, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.5, 0.9, 0.999, 1.0):
        # interpolation rounds differently from torch's: measured up to 7e-6 over 300 seeds
        torch.testing.assert_close(quantile(v, q), torch.quantile(v, q, dim=-1), rtol=0, atol=2e-5)


WHOLE = {
    "symmetric channel + mean": OperandQuant("int8", mode="channel", block_size=0, subtract_mean=True),
    "symmetric channel": OperandQuant("int4", mode="channel", block_size=0),
    "asymmetric channel": OperandQuant("int4", strategy="asymmetric", mode="channel", block_size=0),
    "asymmetric tensor": OperandQuant("int8", strategy="asymmetric", mode="tensor"),
    "legacy": OperandQuant("int8", strategy="legacy", mode="tensor"),
    "fp8 channel": OperandQuant("fp8_e4m3", mode="channel", block_size=0),
}


@pytest.mark.parametrize("name", list(WHOLE))
def test_absmax_equals_dynamic_when_one_group_covers_all_data(name):
    """One sequence, one batch, a group over the whole sequence: the static absmax scale is the dynamic one."""
    spec = WHOLE[name]
    x = _data(7, b=1)
    st = OperandStats()
    st.record(x)
    static = operand_static(st, spec, "absmax")
    dyn = quantize(x, spec)
    torch.testing.assert_close(static.scale, dyn.scale, rtol=2e-6, atol=0)
    assert static.mean is None  # a mean-subtracting spec takes each block's own mean at run time
    if spec.strategy == "asymmetric":
        torch.testing.assert_close(static.zero_point, dyn.zero_point, rtol=0, atol=0)
    held = quantize(x, spec, static=static)
    assert torch.equal(held.codes(), dyn.codes())
    assert (held.mean is None) == (dyn.mean is None) and (held.mean is None or torch.equal(held.mean, dyn.mean))


@pytest.mark.parametrize("mode", ["channel", "block", "tensor"])
def test_percentile_clips_at_the_group_percentile(mode):
    """With `subtract_mean`, at the percentile of |x - its own 16-token block's mean| (blocks of each sequence)."""
    spec = OperandQuant("int4", mode=mode, block_size=16, subtract_mean=mode in ("channel", "block"))
    x = _data(8)
    st = OperandStats()
    st.record(x)
    static = operand_static(st, spec, Method("percentile", percentile=99.0))
    centered = _block_residual64(x, 16).float() if spec.subtract_mean else x
    mag = _tokens([centered]).abs()
    groups = {
        "channel": mag.transpose(1, 2),
        "block": mag.reshape(3, 1, -1),
        "tensor": mag.reshape(1, 1, -1),
    }[mode]
    want = torch.quantile(groups, 0.99, dim=-1) / 7.0
    torch.testing.assert_close(static.scale.flatten(), want.flatten(), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "spec",
    [
        OperandQuant("int4", mode="channel", block_size=32, subtract_mean=True),
        OperandQuant("int4", mode="block", block_size=16),
        OperandQuant("int4", strategy="asymmetric", mode="block", block_size=32),
        OperandQuant("int8", mode="block", block_size=64),
        OperandQuant("fp8_e4m3", mode="channel", block_size=0),
    ],
    ids=["int4-channel-mean", "int4-block", "int4-asym-block", "int8-block", "fp8-channel"],
)
def test_mse_is_the_best_candidate_of_its_grid(spec):
    """Per group, the mse scale's error (measured with quant.quantize) is the least over the grid."""
    x = _data(9)
    st = OperandStats()
    st.record(x)
    method = Method("mse", grid=12, min_ratio=0.3)
    best = operand_static(st, spec, method)
    absmax = operand_static(st, spec, "absmax")
    assert torch.equal(st.sample, _tokens([x]))  # every token sampled: the error on x is the searched one

    def group_err(static: StaticQuant) -> torch.Tensor:
        """Per group, the squared error of the recorded sequences as the kernels quantise them (block means too)."""
        err = (quantize(x, spec, static=static).dequantize(torch.float32) - x).square()
        return err.sum(dim=(0, 2)) if spec.mode == "channel" else err.sum(dim=(0, 2, 3))

    e_best = group_err(best)
    ratios = [1.0 - i * (0.7 / 11) for i in range(12)]
    for r in ratios:
        if spec.strategy == "asymmetric":
            lo, hi = st.amin.amin(dim=1), st.amax.amax(dim=1)
            c, w = (hi + lo) / 2, (hi - lo) / 2
            scale = (2 * r * w).clamp_min(2**-60) / 15.0
            zero = torch.round(0.0 - (c - r * w) / scale)
            cand = StaticQuant(scale.view(1, 3, 1, 1), None, zero.view(1, 3, 1, 1))
        else:
            cand = StaticQuant(absmax.scale * r)
        assert (e_best <= group_err(cand) * (1 + 1e-6)).all(), r
    if spec.precision == "int4":  # with 4 bits clipping pays: measured total error 0.65-0.88x of absmax's
        assert e_best.sum() < 0.92 * group_err(absmax).sum()


def test_compute_calibration_covers_each_quantised_operand():
    st = CalibrationStats()
    st.record("a", _data(0, h=4), _data(1, h=2), _data(2, h=2))
    cal = compute_calibration(st, QuantConfig.preset("kv-int8"), "absmax", {"class": "X", "models": {}})
    assert set(cal.layers["a"]) == {"k"}  # V is per token (row): it stays dynamic
    assert cal.layers["a"]["k"].scale.shape == (1, 2, 1, 8)
    assert cal.layers["a"]["k"].mean is None  # K's block means are taken at run time
    assert cal.fingerprint["layers"] == {"a": {"q": [4, 8], "k": [2, 8], "v": [2, 8]}}
    cal = compute_calibration(st, QuantConfig.preset("qk-int8-pv-fp8"), "absmax")
    assert cal.layers["a"]["q"].scale.shape == (1, 4, 1, 1)
    assert {op: cal.layers["a"][op].scale.shape for op in "qkv"} == {
        "q": (1, 4, 1, 1),
        "k": (1, 2, 1, 1),
        "v": (1, 2, 1, 8),
    }
    with pytest.raises(ValueError, match="nothing to calibrate"):
        compute_calibration(CalibrationStats(), QuantConfig.preset("kv-int8"))
    per_token = QuantConfig.preset("kv-int8").replace(k=OperandQuant("int8", mode="row"))
    with pytest.raises(ValueError, match="per-token, mode 'row', operands stay dynamic.; nothing to calibrate"):
        compute_calibration(st, per_token)
    with pytest.raises(ValueError, match="per-token .mode 'row'. operand takes dynamic scales"):
        operand_static(st.layers["a"]["v"], OperandQuant("int8", mode="row"), "absmax")


def test_block_size_the_span_does_not_divide_needs_another_span():
    """A mean-subtracting operand's scale covers residuals about its own blocks: the sampled spans must hold whole
    blocks. `calibrate` collects with `span_for(config)`; statistics in spans of 64 cannot serve 48-token blocks."""
    config = QuantConfig.preset("kv-int8").replace(
        k=OperandQuant("int8", mode="channel", block_size=48, subtract_mean=True)
    )
    assert span_for(config) == 192 and span_for(QuantConfig.preset("kv-int4")) == 64
    assert span_for(QuantConfig.preset("kv-int8").replace(k=OperandQuant("int8", mode="channel", block_size=0))) == 64
    calls = [(_data(i, h=4, s=200), _data(i + 10, h=2, s=200), _data(i + 20, h=2, s=200)) for i in range(2)]
    default, wide = CalibrationStats(), CalibrationStats(span=span_for(config))
    for call in calls:
        default.record("a", *call)
        wide.record("a", *call)
    with pytest.raises(ValueError, match="block size 48: the statistics hold spans of 64 tokens"):
        compute_calibration(default, config, "absmax")
    got = compute_calibration(wide, config, "absmax").layers["a"]["k"]
    want = torch.cat([_block_residual64(k, 48) for _, k, _ in calls]).abs().amax(dim=(0, 2), keepdim=True) / 127
    torch.testing.assert_close(got.scale, want.float(), rtol=1e-5, atol=0)
