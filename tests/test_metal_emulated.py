"""The Metal shaders, run on CPU through the fiber harness, against quant.quantize and the reference backend.

Every kernel (quantiser channel/row, forward attention for every head dim, decode + combine) is run on
random inputs through `backend="metal-emulated"` and compared element by element with the reference
backend on the same inputs, and for accuracy with a float64 attention.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from quantattn_hf.attention import quantized_attention
from quantattn_hf.backends import get_backend
from quantattn_hf.backends.metal import EmulatedMetalBackend, MetalBackend
from quantattn_hf.config import OperandQuant, QuantConfig
from quantattn_hf.quant import SYMMETRIC_QMAX, StaticQuant, block_residual, quantize

HEAD_DIMS = (32, 40, 64, 80, 96, 128, 160, 256)


@pytest.fixture(scope="module")
def emu() -> EmulatedMetalBackend:
    backend = get_backend("metal-emulated")
    assert isinstance(backend, EmulatedMetalBackend)
    if not backend.available():
        message = "metal-emulated needs clang >= 15 (apt-get install -y clang-19)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    backend.module  # noqa: B018 - builds the harness once, outside any test's warnings filter
    return backend


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(b, hq, hkv, sq, sk, d, dtype=torch.float32, seed=0):
    g = _gen(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, sk, d, generator=g) + 0.5 * torch.randn(1, 1, 1, d, generator=g)).to(dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(dtype)
    return q, k, v


def _both(q, k, v, config, **kw):
    """(out, lse) through the shaders and through the reference backend, with fallback warnings as errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = quantized_attention(q, k, v, config=config, backend="metal-emulated", return_lse=True, **kw)
    want = quantized_attention(q, k, v, config=config, backend="reference", return_lse=True, **kw)
    return got, want


def _check_close(got, want, out_tol: float, lse_tol: float) -> None:
    (o, lse), (ro, rlse) = got, want
    assert o.shape == ro.shape and o.dtype == ro.dtype and lse.shape == rlse.shape
    o, ro = o.double(), ro.double()
    assert torch.isfinite(o).all(), "kernel left NaN (unwritten) or produced non-finite outputs"
    scale = ro.abs().max().clamp_min(1e-6)
    err = (o - ro).abs().max() / scale
    assert err <= out_tol, f"max |kernel - reference| / max|reference| = {err:.3e} > {out_tol}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse))
    fin = torch.isfinite(rlse)
    assert torch.isfinite(lse[fin]).all()
    assert (lse[fin] - rlse[fin]).abs().max() <= lse_tol


def _p32(preset: str) -> QuantConfig:
    """A preset with P kept in float32: kernel and reference then differ only by float32 rounding."""
    return QuantConfig.preset(preset).replace(p=OperandQuant("fp32"))


# ---------------------------------------------------------------- quantiser


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seq", [1, 37, 64, 100])
def test_quantiser_matches_quant_quantize(emu, preset, dtype, seq):
    cfg = QuantConfig.preset(preset)
    x = (torch.randn(2, 3, seq, 64, generator=_gen(seq)) * 2 + torch.randn(1, 1, 1, 64, generator=_gen(1))).to(dtype)
    for spec in (cfg.k, cfg.v):
        got, want = emu.quantize(x, spec), quantize(x, spec)
        _check_quantized(got, want)


def _check_quantized(got, want) -> None:
    assert got.data.shape == want.data.shape and got.data.dtype == want.data.dtype
    assert got.scale.shape == want.scale.shape and got.spec == want.spec and got.shape == want.shape
    assert (got.mean is None) == (want.mean is None) and got.zero_point is None and want.zero_point is None
    # scales and means: measured max relative difference 3e-7 (torch sums a block's tokens in another order)
    torch.testing.assert_close(got.scale, want.scale, rtol=2e-6, atol=0, equal_nan=True)
    if want.mean is not None:
        torch.testing.assert_close(got.mean, want.mean, rtol=2e-6, atol=1e-7, equal_nan=True)
    # codes: equal except where a mean one ulp apart moves a value across a rounding boundary
    # (measured: 2 of 307,200 codes differ by 1 at B=2, H=4, S=300, D=128)
    diff = (got.codes().to(torch.int32) - want.codes().to(torch.int32)).abs()
    assert diff.max() <= 1 and diff.count_nonzero() <= max(1, diff.numel() // 10_000)
    torch.testing.assert_close(got.dequantize(torch.float32), want.dequantize(torch.float32), rtol=0, atol=0.2)


@pytest.mark.parametrize(
    "spec",
    [
        OperandQuant("int8", mode="channel", block_size=0, subtract_mean=True),
        OperandQuant("int8", mode="channel", block_size=16, subtract_mean=False),
        OperandQuant("int4", mode="channel", block_size=48, subtract_mean=True),
        OperandQuant("int4", mode="row"),
    ],
)
@pytest.mark.parametrize("head_dim", [40, 256])
def test_quantiser_block_sizes_head_dims_and_strided_input(emu, spec, head_dim):
    bshd = torch.randn(2, 70, 3, head_dim, generator=_gen(head_dim)).to(torch.bfloat16)
    x = bshd.transpose(1, 2)  # a [B, H, S, D] view with the BSHD layout's strides
    _check_quantized(emu.quantize(x, spec), quantize(x, spec))


@pytest.mark.parametrize("mode", ["channel", "row"])
def test_quantiser_odd_head_dim_int8(emu, mode):
    x = torch.randn(1, 2, 50, 33, generator=_gen(8)).to(torch.float16)
    spec = OperandQuant("int8", mode=mode, block_size=32, subtract_mean=mode == "channel")
    _check_quantized(emu.quantize(x, spec), quantize(x, spec))


def test_quantiser_non_finite_groups(emu):
    x = torch.randn(1, 2, 70, 32, generator=_gen(3))
    x[0, 0, 5, 3] = float("nan")
    x[0, 1, 66, 7] = float("inf")
    x[0, 1, 10, 9] = float("nan")
    cfg = QuantConfig.preset("kv-int8")
    for spec in (cfg.k, cfg.v):
        got, want = emu.quantize(x, spec), quantize(x, spec)
        assert torch.equal(got.scale.isnan(), want.scale.isnan()) and got.scale.isnan().any()
        assert torch.equal(got.data, want.data)
        torch.testing.assert_close(got.scale, want.scale, rtol=2e-6, atol=0, equal_nan=True)


def test_quantiser_falls_back_for_other_specs_and_says_so(emu):
    x = torch.randn(1, 2, 33, 64, generator=_gen(4))
    spec = OperandQuant("int8", strategy="asymmetric", mode="row")
    assert "symmetric" in emu.quantize_unsupported_reason(x, spec)
    with pytest.warns(RuntimeWarning, match="quant.quantize"):
        emu._warned.discard(f"uses quant.quantize for this operand ({emu.quantize_unsupported_reason(x, spec)})")
        got = emu.quantize(x, spec)
    want = quantize(x, spec)
    assert torch.equal(got.data, want.data) and torch.equal(got.scale, want.scale)
    assert torch.equal(got.zero_point, want.zero_point)


# ---------------------------------------------------------------- forward attention


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_forward_every_head_dim(emu, head_dim):
    # 20 query rows (forward kernel), 45 keys (a partial last key tile and K block); f32 Q, f32 P:
    # kernel vs reference measured <= 1.1e-6 of max|out|, lse <= 1e-6 (float32 summation order only)
    q, k, v = _qkv(1, 2, 2, 20, 45, head_dim, seed=head_dim)
    got, want = _both(q, k, v, _p32("kv-int8"))
    _check_close(got, want, out_tol=5e-6, lse_tol=5e-6)


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4", "kv-int4-v8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_forward_presets_and_dtypes(emu, preset, dtype):
    # presets round P to fp16 against the running max (docs/quantization.md): measured <= 1.6e-4 of
    # max|out| with f32 Q; f16 / bf16 outputs add one rounding of the output format (measured 5.4e-4, 3.5e-3)
    q, k, v = _qkv(2, 2, 2, 33, 70, 64, dtype=dtype, seed=7)
    got, want = _both(q, k, v, preset)
    tol = {torch.float32: 4e-4, torch.float16: 1e-3, torch.bfloat16: 6e-3}[dtype]
    _check_close(got, want, out_tol=tol, lse_tol=5e-6)


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4"])
def test_forward_static_scales_with_run_time_block_means(emu, preset):
    # calibrated K (static scale, each block's own mean taken at run time): K is held by quant.quantize's static
    # path for both backends, so kernel and reference differ by float32 summation order only, as above
    cfg = _p32(preset)
    q, k, v = _qkv(1, 2, 2, 20, 70, 64, seed=31)
    scale = (
        0.9 * block_residual(k, cfg.k.block_size).abs().amax(dim=(0, 2), keepdim=True) / SYMMETRIC_QMAX[cfg.k.precision]
    )
    got, want = _both(q, k, v, cfg, static_scales={"k": StaticQuant(scale)})
    _check_close(got, want, out_tol=5e-6, lse_tol=5e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float", "padding"])
def test_forward_masks_causal_gqa(emu, causal, mask_kind):
    b, hq, hkv, sq, sk, d = 2, 4, 2, 24, 53, 32
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, seed=11)
    g = _gen(12)
    mask = {
        None: None,
        "bool": torch.rand(b, 1, sq, sk, generator=g) > 0.3,
        "float": torch.where(
            torch.rand(b, hq, sq, sk, generator=g) > 0.2, torch.randn(b, hq, sq, sk, generator=g), -torch.inf
        ),
        "padding": torch.arange(sk).view(1, 1, 1, sk) < torch.tensor([sk, 29]).view(b, 1, 1, 1),
    }[mask_kind]
    got, want = _both(q, k, v, _p32("kv-int4"), attn_mask=mask, is_causal=causal, enable_gqa=True)
    _check_close(got, want, out_tol=5e-6, lse_tol=5e-6)


def test_forward_fully_masked_rows_and_bshd_layout(emu):
    b, h, sq, sk, d = 1, 2, 12, 40, 64
    q, k, v = _qkv(b, h, h, sq, sk, d, seed=21)
    mask = torch.rand(b, h, sq, sk, generator=_gen(22)) > 0.5
    mask[0, 1, 3] = False  # a query row with every key masked: SDPA's value, lse -inf
    got, want = _both(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), _p32("kv-int8"), attn_mask=mask, layout="BSHD"
    )
    assert torch.isneginf(got[1][0, 1, 3])
    _check_close(got, want, out_tol=5e-6, lse_tol=5e-6)


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4"])
def test_accuracy_against_float64(emu, preset):
    # measured at B=1, H=2, N=128, D=64, Gaussian: kv-int8 0.84%, kv-int4 14.7% relative L1 vs float64,
    # and the kernel within 1e-4 of the reference's own error (docs/accuracy.md has the core table)
    q, k, v = _qkv(1, 2, 2, 128, 128, 64, seed=31)
    (o, _), (r, _) = _both(q, k, v, preset)
    exact = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = ((o.double() - exact).abs().sum() / exact.abs().sum()).item()
    ref_err = ((r.double() - exact).abs().sum() / exact.abs().sum()).item()
    assert err <= {"kv-int8": 0.011, "kv-int4": 0.17}[preset]
    assert abs(err - ref_err) <= 2e-4


@pytest.mark.parametrize(
    ("k_spec", "v_spec"),
    [
        (OperandQuant("int4", "asymmetric", "block", 16), OperandQuant("int8", "legacy", "tensor")),
        (OperandQuant("int8", "asymmetric", "row"), OperandQuant("int4", "asymmetric", "channel", 8)),
        (OperandQuant("int8", "symmetric", "block", 16, True), OperandQuant("int4", "symmetric", "channel", 0, True)),
    ],
)
@pytest.mark.parametrize("q_len", [1, 19])
def test_other_int_layouts_through_the_attention_kernels(emu, k_spec, v_spec, q_len):
    # the kernels dequantise any int8/int4 strategy and mode (zero points, block means, per-tensor scales);
    # the quantiser kernels serve only the symmetric channel/row modes, so K/V come from quant.quantize here
    cfg = QuantConfig(k=k_spec, v=v_spec, p=OperandQuant("fp32"))
    q, k, v = _qkv(1, 4, 2, q_len, 41, 64, seed=71 + q_len)
    assert emu.unsupported_reason(_call_for(cfg, q, k)) is None
    kq, vq = quantize(k, k_spec), quantize(v, v_spec)
    got = quantized_attention(q, kq, vq, config=cfg, backend="metal-emulated", return_lse=True, enable_gqa=True)
    want = quantized_attention(q, kq, vq, config=cfg, backend="reference", return_lse=True, enable_gqa=True)
    _check_close(got, want, out_tol=5e-6, lse_tol=5e-6)


# ---------------------------------------------------------------- decode


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_decode_every_head_dim(emu, head_dim):
    # GQA 4/2 with one query token: 2 rows per K/V head -> the split-K decode kernel and combine
    q, k, v = _qkv(2, 4, 2, 1, 77, head_dim, seed=head_dim + 1)
    got, want = _both(q, k, v, _p32("kv-int8"), enable_gqa=True)
    _check_close(got, want, out_tol=5e-6, lse_tol=5e-6)


@pytest.mark.parametrize("preset", ["kv-int8", "kv-int4", "kv-int4-v8"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_splits_masks_causal(emu, monkeypatch, preset, dtype):
    monkeypatch.setattr(emu, "decode_split_tokens", 24)  # 150 keys -> 7 splits x 4 SIMD-groups
    b, hq, hkv, sq, sk, d = 1, 8, 2, 2, 150, 64  # 4 query heads x 2 positions = 8 rows per K/V head
    q, k, v = _qkv(b, hq, hkv, sq, sk, d, dtype=dtype, seed=41)
    mask = torch.rand(b, hq, sq, sk, generator=_gen(42)) > 0.25
    got, want = _both(q, k, v, preset, attn_mask=mask, is_causal=True, enable_gqa=True)
    _check_close(got, want, out_tol={torch.float16: 1e-3, torch.bfloat16: 6e-3}[dtype], lse_tol=5e-6)


def test_decode_routing(emu):
    cfg = QuantConfig.preset("kv-int8")
    call = _call(cfg, q_len=1, q_heads=32, kv_heads=4)
    assert emu.uses_decode(call)
    assert not emu.uses_decode(_call(cfg, q_len=1, q_heads=32, kv_heads=2))  # 16 rows: forward kernel
    assert not emu.uses_decode(_call(cfg, q_len=9, q_heads=4, kv_heads=4))


def _call(cfg, q_len, q_heads, kv_heads, head_dim=64):
    from quantattn_hf.backends.base import AttentionCall

    return AttentionCall(
        cfg,
        1,
        q_heads,
        kv_heads,
        q_len,
        100,
        head_dim,
        head_dim,
        torch.float16,
        torch.device("cpu"),
        0.125,
        False,
        None,
    )


# ---------------------------------------------------------------- what falls back


@pytest.mark.parametrize(
    ("config", "head_dim", "dtype", "why"),
    [
        ("kv-int8", 48, torch.float16, "head dim 48"),
        ("qk-int8-pv-fp8", 64, torch.float16, "Q as a float format"),
        ("kv-int8", 64, torch.float64, "query dtype"),
        (QuantConfig.preset("kv-int8").replace(v=OperandQuant("fp8_e4m3", mode="row")), 64, torch.float16, "V held"),
    ],
)
def test_unsupported_calls_fall_back_to_the_reference(emu, config, head_dim, dtype, why):
    q, k, v = _qkv(1, 2, 2, 9, 20, head_dim, dtype=dtype, seed=51)
    cfg = config if isinstance(config, QuantConfig) else QuantConfig.preset(config)
    assert why in emu.unsupported_reason(_call_for(cfg, q, k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = quantized_attention(q, k, v, config=config, backend="metal-emulated", return_lse=True)
    want = quantized_attention(q, k, v, config=config, backend="reference", return_lse=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_metal_backend_unavailable_off_macos():
    backend = get_backend("metal")
    assert isinstance(backend, MetalBackend)
    assert not backend.available()
    assert "MPS" in backend._device_reason(torch.device("cpu"))


class _ShaderLibraryOnHarness:
    """Stands in for torch.mps.compile_shader's library: `lib.name(*tensors, threads=, group_size=)`."""

    def __init__(self, emu: EmulatedMetalBackend) -> None:
        self.emu = emu
        self.calls: list[str] = []

    def __getattr__(self, name: str):
        def dispatch(*tensors: torch.Tensor, threads: int, group_size: int) -> None:
            assert threads % group_size == 0
            self.calls.append(name)
            ptrs = [t.data_ptr() for t in tensors]
            self.emu.module.launch(name, ptrs, threads // group_size, group_size, 1, 0)

        return dispatch


def test_metal_backend_dispatch_through_a_stand_in_library(emu, monkeypatch):
    # MetalBackend's own quantise / attention code, with its compiled library replaced by the harness:
    # checks the buffers, threads and group sizes it would hand to torch.mps.compile_shader's kernels
    backend = MetalBackend()
    lib = _ShaderLibraryOnHarness(emu)
    backend._lib = lib
    monkeypatch.setattr(backend, "_device_reason", lambda device: None)
    cfg = QuantConfig.preset("kv-int4-v8")
    for sq in (1, 30):
        q, k, v = _qkv(1, 4, 2, sq, 60, 128, dtype=torch.float16, seed=61 + sq)
        call = _call_for(cfg, q, k)
        kq, vq = backend.quantize(k, cfg.k), backend.quantize(v, cfg.v)
        out, lse = backend.attention(quantize(q, cfg.q), kq, vq, call)
        want = get_backend("reference").attention(quantize(q, cfg.q), quantize(k, cfg.k), quantize(v, cfg.v), call)
        _check_close((out, lse), (want[0].to(out.dtype), want[1]), out_tol=1e-3, lse_tol=5e-6)
    assert {"qa_quant_channel", "qa_quant_row", "qa_attn_fwd_d128", "qa_attn_decode_d128", "qa_attn_combine"} <= set(
        lib.calls
    )


def _call_for(cfg, q, k):
    from quantattn_hf.backends.base import AttentionCall

    b, hq, sq, d = q.shape
    return AttentionCall(cfg, b, hq, k.shape[1], sq, k.shape[2], d, d, q.dtype, q.device, d**-0.5, False, None)
