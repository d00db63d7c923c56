"""The CUDA backward through cuDNN: the Triton dequantiser it feeds, its chunk policy, and its gradients.

The dequantiser runs in Triton's interpreter on the CPU (outputs NaN-poisoned) and must equal
`QuantizedTensor.dequantize` bit for bit. The chunk policy is host arithmetic. The gradients (CUDA only)
are checked against float64 autograd of attention over the dequantised operands (`ref_grads`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from test_autograd import inputs, ref_grads, rel  # noqa: E402
from test_autograd_training import Block  # noqa: E402

from quantattn_hf import QuantConfig, quantize, quantized_attention  # noqa: E402
from quantattn_hf.autograd import _backward_backend, make_call  # noqa: E402
from quantattn_hf.backends import cudnn_backward, cudnn_graph, reference_backward, triton_backward  # noqa: E402
from quantattn_hf.backends.triton.backend import TritonBackend  # noqa: E402
from quantattn_hf.backends.triton.dequantize import HeadDequantizer  # noqa: E402
from quantattn_hf.config import PRESETS  # noqa: E402
from quantattn_hf.quant import StaticQuant  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_kernels = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _operands(gen, shape, dtype):
    """Random operands with a per-channel offset (so block means matter) on the test device."""
    x = torch.randn(*shape, generator=gen) + torch.randn(shape[-1], generator=gen)
    return x.to(dtype).to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("quantiser", ["quant", "triton"])
@pytest.mark.parametrize(("shape", "heads"), [((2, 3, 70, 40), slice(1, 3)), ((1, 4, 129, 64), slice(0, 4))])
def test_head_dequantizer_equals_dequantize(name, quantiser, shape, heads, gen):
    """Every element, every operand of every preset, as quantised by either quantiser (Triton stores FP8 V
    token-contiguous), a head range, a padded head dim and token counts that are no whole tile."""
    cfg = QuantConfig.preset(name)
    quant = quantize if quantiser == "quant" else TritonBackend().quantize
    q, k, v = (quant(_operands(gen, shape, torch.bfloat16), spec) for spec in (cfg.q, cfg.k, cfg.v))
    for dtype in (torch.bfloat16, torch.float32):
        for held in ([q], [k, v], [v, q]):  # one operand, two in one launch (quantised or not, in either slot)
            got = HeadDequantizer(held, dtype)(heads)
            for t, x in zip(held, got, strict=True):
                assert x.shape == (shape[0], heads.stop - heads.start, shape[2], shape[3]) and x.dtype == dtype
                assert torch.equal(x, t.dequantize(dtype)[:, heads]), (name, t.spec)


@needs_kernels
def test_head_dequantizer_static_and_asymmetric(gen):
    """Calibrated scales broadcast over batch ([1, H, 1, D], 0-strides) and asymmetric int4 with zero points."""
    x = _operands(gen, (2, 2, 96, 32), torch.float16)
    spec = QuantConfig.preset("kv-int8").k
    static = StaticQuant(scale=torch.rand(1, 2, 1, 32, generator=gen).add(0.02).to(DEVICE))
    asym = {"strategy": "asymmetric", "subtract_mean": False}
    held = [quantize(x, spec, static=static), quantize(x, dataclasses.replace(spec, **asym))]
    held.append(quantize(x, dataclasses.replace(QuantConfig.preset("kv-int4").k, **asym)))
    for t, other in zip(held, held[1:] + held[:1], strict=True):
        got = HeadDequantizer([t, other], torch.float16)(slice(0, 2))
        assert torch.equal(got[0], t.dequantize(torch.float16))
        assert torch.equal(got[1], other.dequantize(torch.float16))


def test_head_dequantizer_refuses_bad_requests(gen):
    t = quantize(torch.randn(1, 2, 8, 16, generator=gen), QuantConfig.preset("kv-int8").k)
    with pytest.raises(TypeError, match="output dtype"):
        HeadDequantizer([t], torch.int8)
    with pytest.raises(ValueError, match="step-1"):
        HeadDequantizer([t], torch.float16)(slice(0, 2, 2))
    other = quantize(torch.randn(1, 2, 9, 16, generator=gen), QuantConfig.preset("kv-int8").v)
    with pytest.raises(ValueError, match="one or two operands"):
        HeadDequantizer([t, other], torch.float16)


def _call(b=1, hq=24, hkv=24, n=4608, d=128, causal=False, dtype=torch.bfloat16, mask=None, device="cpu"):
    cfg = QuantConfig.preset("kv-int8")
    q = torch.empty((b, hq, n, d), dtype=dtype, device=device)
    return make_call(q, q.shape, (b, hkv, n, d), mask, causal, d**-0.5, cfg)


def _bytes(call, held_fraction):
    size = 2
    dense = size * (
        call.batch * call.q_heads * call.q_len * call.head_dim
        + 2 * call.batch * call.kv_heads * call.kv_len * call.head_dim
    )
    kv = 2 * size * call.batch * call.kv_heads * call.kv_len * call.head_dim
    held = dense - kv + int(kv * held_fraction)
    return dense, held, kv


def _compositions(total, widest):
    """Every way of writing `total` heads as ordered chunk widths of at most `widest` (brute force)."""
    if total == 0:
        yield []
        return
    for w in range(1, min(widest, total) + 1):
        for rest in _compositions(total - w, widest):
            yield [w, *rest]


# (B, Hq, Hkv, N), the held bytes as a fraction of the dense K/V's, SMs
POLICY_CASES = [
    ((1, 24, 24, 4608), 0.53, 132),
    ((1, 32, 8, 4096), 0.53, 132),
    ((2, 16, 4, 1024), 0.3, 108),
    ((1, 8, 1, 512), 0.5, 132),
    ((1, 12, 12, 3000), 0.4, 132),
    ((3, 10, 10, 700), 0.6, 78),
    ((3, 10, 10, 700), 0.95, 78),
    ((1, 8, 8, 512), 0.1, 132),
]


def _policy_plan(shape, held_fraction, sms, in_place):
    """(bytes: dense, held, dense K/V, accumulator; the plan's chunk widths; programs per K/V head) of a case."""
    b, hq, hkv, n = shape
    call = _call(b, hq, hkv, n)
    dense, held, kv = _bytes(call, held_fraction)
    bounds = cudnn_backward.chunk_bounds(call, held, kv, sms, in_place=in_place)
    widths = [h1 - h0 for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True)]
    assert bounds[0] == 0 and bounds[-1] == hkv and min(widths) >= 1
    programs = math.ceil(n / cudnn_backward.KEY_TILE) * b * (hq // hkv)
    return (dense, held, kv, 4 * b * hq * n * call.head_dim), widths, programs


@pytest.mark.parametrize(("shape", "held_fraction", "sms"), POLICY_CASES)
def test_chunk_bounds_keep_the_peak_at_sdpa_or_below_in_fewest_waves(shape, held_fraction, sms, monkeypatch):
    """The bounds rise from 0 to the K/V heads; the widest chunk satisfies the peak inequality of the docstring
    (one chunk whenever one fits); and no split of the heads into chunks that fit takes fewer waves, or as few
    in fewer chunks (brute force over every split where the heads are few)."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    hkv = shape[2]
    (dense, held, kv, acc), widths, programs = _policy_plan(shape, held_fraction, sms, in_place=False)

    def peak(w):  # bytes beyond what both keep (O, dO, the whole gradients) with a widest chunk of w heads
        return held + kv + acc if w == hkv else held + (kv + dense + acc) * w / hkv

    if peak(hkv) <= dense + acc:
        assert widths == [hkv]
        return
    fits = [w for w in range(1, hkv + 1) if peak(w) <= dense + acc]
    widest = max(fits) if fits else 1
    assert max(widths) <= widest

    def cost(ws):
        return sum(math.ceil(w * programs / sms) for w in ws), len(ws)

    if hkv <= 12:
        assert cost(widths) == min(cost(ws) for ws in _compositions(hkv, widest))


@pytest.mark.parametrize(("shape", "held_fraction", "sms"), POLICY_CASES)
def test_in_place_chunk_bounds_put_the_peak_below_sdpa_in_fewest_waves(shape, held_fraction, sms, monkeypatch):
    """Gradients written in place (cuDNN frontend): every chunk's peak (all held operands, its dense copies and
    its accumulator share; no gradient copies) is below SDPA's by the headroom, one chunk only where that holds;
    no split into fitting chunks takes fewer waves, or as few in fewer chunks, or those with a narrower widest."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    hkv = shape[2]
    (dense, held, kv, acc), widths, programs = _policy_plan(shape, held_fraction, sms, in_place=True)
    bound = (1 - cudnn_backward.IN_PLACE_HEADROOM) * (dense + acc)
    fits = [w for w in range(1, hkv + 1) if held + (kv + acc) * w / hkv < bound]
    widest = max(fits) if fits else 1
    assert max(widths) <= widest
    if widest == hkv:
        assert widths == [hkv]

    def cost(ws):
        return sum(math.ceil(w * programs / sms) for w in ws), len(ws), max(ws)

    if hkv <= 12:
        assert cost(widths) == min(cost(ws) for ws in _compositions(hkv, widest))


def test_in_place_chunk_bounds_of_flux_and_llama_on_an_h100(monkeypatch):
    """kv-int8 (codes a byte, K's scales and means per 64 tokens): Flux splits into two chunks that take the 7
    waves of one, the widest 13 heads; Llama (causal GQA 32/8) into 4+4 K/V heads, the 8 waves of one."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    for shape, want in (((1, 24, 24, 4608), [0, 13, 24]), ((1, 32, 8, 4096), [0, 4, 8])):
        call = _call(*shape)
        b, hq, hkv, n = shape
        q_bytes, kv_codes = 2 * b * hq * n * 128, 2 * b * hkv * n * 128
        stats = 2 * 4 * b * hkv * (n // 64) * 128 + 4 * b * hkv * n  # K's scales and means, V's row scales
        dequant = 2 * kv_codes
        assert cudnn_backward.chunk_bounds(call, q_bytes + kv_codes + stats, dequant, 132, in_place=True) == want


@pytest.mark.parametrize("name", ["kv-int8", "kv-int4", "qk-int8-pv-fp8"])
def test_backward_plan_dequantises_kv_once_where_that_plans_as_few_waves(name, monkeypatch):
    """In place, K/V are dequantised once where their whole dense copies plan as few waves and chunks as copies
    by chunk: at the Llama shape always (GQA 32/8: K/V are a quarter of Q's bytes), at the Flux shape where
    the codes are released (or small: kv-int4's), as 13+11 heads either way; torch's op path never (its
    released backward runs one chunk)."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    for (b, hq, hkv, n), bounds in (((1, 24, 24, 4608), [0, 13, 24]), ((1, 32, 8, 4096), [0, 4, 8])):
        meta = [torch.empty(b, h, n, 128, dtype=torch.bfloat16, device="meta") for h in (hq, hkv, hkv)]
        cfg = QuantConfig.preset(name)
        held = [quantize(t, spec) for t, spec in zip(meta, (cfg.q, cfg.k, cfg.v), strict=True)]
        call = make_call(meta[0], meta[0].shape, meta[2].shape, None, hq != hkv, 128**-0.5, cfg)
        for release in (True, False):
            once = release or hq != hkv or name == "kv-int4"
            assert cudnn_backward.backward_plan(*held, call, release, True, 132) == (bounds, once), (hkv, release)
            assert not cudnn_backward.backward_plan(*held, call, release, False, 132)[1]


def test_chunk_bounds_one_chunk_when_the_dense_copy_fits_and_uneven_to_fill_waves(monkeypatch):
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    call = _call()
    dense, _, kv = _bytes(call, 0.5)
    assert cudnn_backward.chunk_bounds(call, dense - kv, kv, 132) == [0, 24]  # nothing saved by quantising
    # Flux kv-int8 on an H100 (36 programs of 128 keys per head, 132 SMs): chunks of at most 10 heads fit; 10, 7
    # and 7 heads take 3, 2 and 2 waves, the 7 of one chunk over all heads (even chunks of 6 heads take 8)
    assert cudnn_backward.chunk_bounds(call, dense - kv + int(0.53 * kv), kv, 132) == [0, 10, 17, 24]
    monkeypatch.setenv(cudnn_backward.ENV, "7")
    assert cudnn_backward.chunk_bounds(call, 0, kv, 132) == [0, 3, 6, 10, 13, 17, 20, 24]
    monkeypatch.setenv(cudnn_backward.ENV, "99")
    assert cudnn_backward.chunk_bounds(call, 0, kv, 132) == list(range(25))


def test_unsupported_reasons(monkeypatch):
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    assert "tensors on cpu" in cudnn_backward.unsupported_reason(_call(), None)
    monkeypatch.setenv(cudnn_backward.ENV, "0")
    assert cudnn_backward.unsupported_reason(_call(), None) == f"{cudnn_backward.ENV}=0"
    monkeypatch.setenv(cudnn_backward.ENV, "fast")
    with pytest.raises(ValueError, match=cudnn_backward.ENV):
        cudnn_backward.unsupported_reason(_call(), None)


@needs_cuda
@gpu
def test_unsupported_reasons_on_cuda(monkeypatch):
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    reason = cudnn_backward.unsupported_reason
    assert reason(_call(n=64, device="cuda"), None) is None
    assert "dtype" in reason(_call(n=64, dtype=torch.float32, device="cuda"), None)
    assert "head dims" in reason(_call(n=64, d=256, device="cuda"), None)
    assert "mask" in reason(
        _call(n=64, mask=torch.ones(1, 1, 64, 64, dtype=torch.bool, device="cuda"), device="cuda"), None
    )
    assert "log-sum-exp" in reason(_call(n=64, device="cuda"), torch.zeros(1))
    call = dataclasses.replace(_call(n=64, causal=True, device="cuda"), q_len=32)
    assert "causal" in reason(call, None)
    # the autograd's choice: cuDNN where it serves, the Triton kernels where it does not
    assert _backward_backend("triton", torch.device("cuda"), _call(n=64, device="cuda"), None) is cudnn_backward
    assert _backward_backend("triton", torch.device("cuda"), _call(n=64, d=256, device="cuda"), None) is triton_backward


def _reference_dense(cfg):
    """Stand-in for cuDNN's backward on the CPU: the reference backward in float64, given out and lse."""

    def dense(grad_out, q, k, v, out, lse, is_causal, scale):
        call = make_call(q, q.shape, v.shape, None, is_causal, scale, cfg)
        grads = reference_backward.attention_backward(
            q.double(), k.double(), v.double(), out, lse, grad_out, None, call
        )
        return tuple(g.to(q.dtype) for g in grads)

    return dense


def _bookkeeping_case(gen, cfg):
    """(leaves, held Q/K/V, out, lse, upstream gradient, call) of the CPU bookkeeping tests: GQA 8:4, two batch
    elements, causal, the forward by the reference."""
    leaves = inputs(gen, b=2, hq=8, hkv=4, sq=40, sk=40, d=32)
    q, k, v, dout = (t.detach().to(DEVICE) for t in leaves)
    kw = {"config": cfg, "backend": "reference", "return_lse": True, "is_causal": True, "enable_gqa": True}
    out, lse = quantized_attention(q, k, v, **kw)
    held = [quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v))]
    return leaves, held, out, lse, dout, make_call(q, q.shape, v.shape, None, True, 32**-0.5, cfg)


def _assert_float64_grads(got, leaves, cfg, need_dkv):
    """Gradients against float64 autograd over the dequantised operands (dK/dV empty without need_dkv)."""
    ref = ref_grads(*leaves, cfg, is_causal=True)
    assert rel(got[0].cpu(), ref[0]) < 5e-5
    if need_dkv:
        for a, b in zip(got[1:], ref[1:], strict=True):
            assert a.shape == b.shape and rel(a.cpu(), b) < 5e-5
    else:
        assert got[1].shape == got[2].shape == (0,)


@needs_kernels
@pytest.mark.parametrize("name", ["kv-int4", "qk-int8-pv-fp8"])
@pytest.mark.parametrize("chunks", ["1", "2", "3"])
@pytest.mark.parametrize("need_dkv", [True, False])
def test_chunked_backward_bookkeeping_against_float64_autograd(name, chunks, need_dkv, gen, monkeypatch):
    """The head-range loop with cuDNN's kernel replaced by the float64 reference backward (on the CPU): every
    chunk's query heads, output, lse and upstream gradient slices and every gradient copy land on the right heads
    (GQA 8:4, two batch elements, 3 chunks uneven over 4 K/V heads), against float64 autograd over the
    dequantised operands."""
    monkeypatch.setenv(cudnn_backward.ENV, chunks)
    monkeypatch.setenv(cudnn_graph.ENV, "0")  # torch's op (the cuDNN frontend's path: the test below)
    slices = []
    cfg = QuantConfig.preset(name)
    dense = _reference_dense(cfg)
    monkeypatch.setattr(cudnn_backward, "dense_backward", lambda *a: slices.append(a[1].shape[1]) or dense(*a))
    leaves, held, out, lse, dout, call = _bookkeeping_case(gen, cfg)
    got = cudnn_backward.attention_backward(*held, out, lse, dout, None, call, need_dkv)
    assert slices == {"1": [8], "2": [4, 4], "3": [2, 2, 4]}[chunks]  # query heads of 1, 2 or 1+1+2 K/V heads
    _assert_float64_grads(got, leaves, cfg, need_dkv)


def _poison_new_empty(monkeypatch):
    """Tensor.new_empty fills floating-point tensors with NaN: a gradient slice nobody writes shows."""
    empty = torch.Tensor.new_empty

    def poisoned(t, *a, **kw):
        x = empty(t, *a, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch.Tensor, "new_empty", poisoned)


@needs_kernels
@pytest.mark.parametrize("name", ["kv-int4", "qk-int8-pv-fp8"])
@pytest.mark.parametrize("bounds", [[0, 4], [0, 1, 2, 4]])
@pytest.mark.parametrize("kv_once", [False, True])
@pytest.mark.parametrize("need_dkv", [True, False])
def test_in_place_backward_bookkeeping_against_float64_autograd(name, bounds, kv_once, need_dkv, gen, monkeypatch):
    """The cuDNN frontend's path with its graph replaced by the float64 reference backward (on the CPU) reading
    and writing the head ranges it is given, as `cudnn_graph.backward_into` documents: every chunk writes its
    gradients into its own heads of the whole ones (NaN before, so heads left unwritten show); K/V are
    dequantised by chunk, or once with their codes released before the first chunk; every code is released
    by the last."""
    monkeypatch.setattr(cudnn_graph, "available", lambda: True)
    cfg = QuantConfig.preset(name)
    dense = _reference_dense(cfg)
    leaves, held, out, lse, dout, call = _bookkeeping_case(gen, cfg)
    seen = []

    def into(dq, dk, dv, grad_out, q, k, v, out, lse, is_causal, scale, kv_heads, groups):
        h0, h1 = kv_heads
        ranged = []
        tensors = (dq, dk, dv, grad_out, q, k, v, out, lse)
        for t, query_side in zip(tensors, (True, False, False, True, True, False, False, True, True), strict=True):
            start, width = (h0 * groups, (h1 - h0) * groups) if query_side else (h0, h1 - h0)
            ranged.append(t if t.shape[1] == width else t.narrow(1, start, width))
        seen.append((ranged[0].shape[1], ranged[1].shape[1], held[1].data.untyped_storage().nbytes() > 0))
        for got, want in zip(ranged[:3], dense(*ranged[3:], is_causal, scale), strict=True):
            got.copy_(want)

    monkeypatch.setattr(cudnn_graph, "backward_into", into)
    _poison_new_empty(monkeypatch)
    got = cudnn_backward.backward_in_chunks(
        *held, out, lse, dout, call, bounds, need_dkv, release_held=True, kv_once=kv_once
    )  # fmt: skip
    widths = [(2 * (h1 - h0), h1 - h0) for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True)]
    assert [s[:2] for s in seen] == widths
    assert [s[2] for s in seen] == [not kv_once] * (len(widths) - 1) + [False]  # K's codes, when each chunk ran
    assert all(t.data.untyped_storage().nbytes() == 0 for t in held if t.spec.quantized)
    _assert_float64_grads(got, leaves, cfg, need_dkv)


def test_first_head_of_a_range():
    """`first_head`: a whole tensor's range starts at its start, a tensor of exactly the range's heads at 0 (the
    range's own); a range beyond a tensor's heads is refused."""
    whole, own = torch.empty(2, 8, 5, 16), torch.empty(2, 3, 5, 16)
    assert [cudnn_graph.first_head(whole, s, w) for s, w in ((0, 8), (0, 3), (3, 4), (7, 1))] == [0, 0, 3, 7]
    assert cudnn_graph.first_head(own, 5, 3) == 0
    with pytest.raises(ValueError, match="heads"):
        cudnn_graph.first_head(whole, 6, 3)


@needs_kernels
@pytest.mark.parametrize("name", ["kv-int8", "qk-int8-pv-fp8"])
@pytest.mark.parametrize("chunks", ["1", "3"])
def test_released_operands_are_freed_after_their_last_dequantisation(name, chunks, gen, monkeypatch):
    """With `release_held`, the quantised operands' storage is freed after the last chunk's dequantisation and
    before its cuDNN call (every earlier call sees it whole); unquantised ones (kv's Q) are untouched; the
    gradients are bit-identical to those of a backward that keeps them (cuDNN replaced by the float64 reference
    on the CPU)."""
    monkeypatch.setenv(cudnn_backward.ENV, chunks)
    monkeypatch.setenv(cudnn_graph.ENV, "0")
    cfg = QuantConfig.preset(name)
    dense = _reference_dense(cfg)
    q, k, v, dout = (t.detach().to(DEVICE) for t in inputs(gen, b=1, hq=8, hkv=4, sq=40, sk=40, d=32))
    out, lse = quantized_attention(q, k, v, config=cfg, backend="reference", return_lse=True, enable_gqa=True)
    call = make_call(q, q.shape, v.shape, None, False, 32**-0.5, cfg)
    grads = []
    for release in (False, True):
        held = [quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v))]
        parts = [p for t in held if t.spec.quantized for p in (t.data, t.scale, t.zero_point, t.mean) if p is not None]
        sizes = []
        monkeypatch.setattr(
            cudnn_backward,
            "dense_backward",
            lambda *a, _p=parts, _s=sizes: _s.append([x.untyped_storage().nbytes() for x in _p]) or dense(*a),
        )
        grads.append(cudnn_backward.attention_backward(*held, out, lse, dout, None, call, True, release))
        freed = [x.untyped_storage().nbytes() == 0 for x in parts]
        assert freed == [release] * len(parts)
        assert all(n > 0 for step in sizes[:-1] for n in step)
        assert all((n == 0) == release for n in sizes[-1])
        assert held[0].spec.quantized or held[0].data.untyped_storage().nbytes() > 0
    assert len(sizes) == int(chunks)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_released_operands_give_one_chunk(monkeypatch):
    """Where the quantised operands are released once dequantised, only the unquantised ones stay beside the
    dense copies while cuDNN runs, as many bytes as SDPA keeps: one chunk, at every preset, where keeping them
    needs several at the Flux shape (fp16 quantises nothing: one chunk either way)."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    meta = [torch.empty(1, 24, 4608, 128, dtype=torch.bfloat16, device="meta") for _ in range(3)]
    for name in sorted(PRESETS):
        cfg = QuantConfig.preset(name)
        held = [quantize(t, spec) for t, spec in zip(meta, (cfg.q, cfg.k, cfg.v), strict=True)]
        call = make_call(meta[0], meta[0].shape, meta[2].shape, None, False, 128**-0.5, cfg)
        assert cudnn_backward.backward_plan(*held, call, release_held=True) == ([0, 24], False), name
        if any(t.spec.quantized for t in held):
            assert len(cudnn_backward.backward_plan(*held, call)[0]) > 2, name


def _cuda_grads(q, k, v, dout, cfg, layout="bhsd", **kw):
    """Gradients through quantized_attention on CUDA (Triton forward, the backward under test), float32 out."""
    leaves = [t.detach().to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v)]
    if layout == "bshd":  # Q/K/V as views of [B, S, H, D] projections, as diffusers and transformers make them
        ops = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in leaves]
    else:
        ops = leaves
    out = quantized_attention(*ops, config=cfg, enable_gqa=True, backend="triton", **kw)
    return [g.float().cpu() for g in torch.autograd.grad(out, leaves, dout.to("cuda", out.dtype))]


@needs_cuda
@gpu
@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize(
    ("chunks", "causal", "layout"), [("1", False, "bhsd"), ("2", True, "bshd"), ("auto", True, "bhsd")]
)
def test_cudnn_backward_matches_float64_autograd(name, chunks, causal, layout, gen, monkeypatch):
    """Every preset, GQA 8:2, two batch elements, 1 or 2 head chunks (or the policy's), causal or not, BHSD
    tensors or BSHD views: against float64 autograd over the dequantised bf16-rounded operands."""
    monkeypatch.setenv(cudnn_backward.ENV, chunks)
    calls = []
    kernels = cudnn_backward.attention_backward
    monkeypatch.setattr(cudnn_backward, "attention_backward", lambda *a, **k: calls.append(1) or kernels(*a, **k))
    cfg = QuantConfig.preset(name)
    q, k, v, dout = inputs(gen, b=2, hq=8, hkv=2, sq=200, sk=200, d=64, dtype=torch.bfloat16)
    got = _cuda_grads(q, k, v, dout, cfg, layout, is_causal=causal)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=causal)
    assert calls == [1]
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        # bf16 operands, gradients and dense copies; qk's forward rounds P to FP8 against its running maximum
        assert rel(a, b) < (2e-2 if name == "qk-int8-pv-fp8" else 1e-2), (name, "qkv"[i], rel(a, b))


def _peak_bytes(attn, shape, layers, retain, gen):
    """Peak CUDA memory of `layers` chained attention layers' forward+backward above what was allocated before
    (each layer's Q, K, V from a projection stand-in that only attention keeps alive, as in a model)."""
    b, hq, hkv, n, d = shape
    leaves = [
        torch.randn(b, h, n, d, generator=gen).to("cuda", torch.bfloat16).requires_grad_() for h in (hq, hkv, hkv)
    ]
    dout = torch.randn(b, hq, n, d, generator=gen).to("cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q = leaves[0]
    for _ in range(layers):
        q = attn(q * 1, leaves[1] * 1, leaves[2] * 1)
    q.backward(dout, retain_graph=retain)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@needs_cuda
@gpu
@pytest.mark.parametrize("name", ["kv-int8", "kv-int4", "qk-int8-pv-fp8"])
@pytest.mark.parametrize(("hq", "hkv", "causal"), [(8, 8, False), (8, 2, True)])
def test_backward_peak_is_sdpas_or_below(name, hq, hkv, causal, gen, monkeypatch):
    """One layer's forward+backward peaks at SDPA's or below, whether the backward releases the held operands
    or keeps them (retain_graph), and strictly below through the cuDNN frontend (head chunks without gradient
    copies); over 3 chained layers it peaks below SDPA's (each layer saves its quantised K/V where SDPA saves
    dense ones)."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    shape = (1, hq, hkv, 2048, 128)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    def ours(q, k, v):
        return quantized_attention(q, k, v, config=name, is_causal=causal, enable_gqa=True, backend="triton")

    for attn in (sdpa, ours):  # compiled, tuned and cached before anything is measured
        _peak_bytes(attn, shape, 2, False, gen)
    for retain in (False, True):
        peak, base = _peak_bytes(ours, shape, 1, retain, gen), _peak_bytes(sdpa, shape, 1, retain, gen)
        assert peak < base if cudnn_graph.available() else peak <= base, (retain, peak, base)
    assert _peak_bytes(ours, shape, 3, False, gen) < _peak_bytes(sdpa, shape, 3, False, gen)


@needs_cuda
@gpu
def test_cudnn_backward_query_only_and_fallback_for_masks(gen, monkeypatch):
    """Held K/V: dQ only. A boolean mask: the Triton kernels take the call, with the same gradients' quality."""
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=96, sk=96, d=128, dtype=torch.bfloat16)
    kq, vq = (quantize(t.detach().to("cuda"), s) for t, s in ((k, cfg.k), (v, cfg.v)))
    qd = q.detach().to("cuda").requires_grad_()
    out = quantized_attention(qd, kq, vq, config=cfg, enable_gqa=True, backend="triton")
    (dq,) = torch.autograd.grad(out, (qd,), dout.to("cuda", out.dtype))
    assert rel(dq.float().cpu(), ref_grads(q, k, v, dout, cfg)[0]) < 1e-2
    used = []
    for mod in (cudnn_backward, triton_backward):
        kernels = mod.attention_backward
        monkeypatch.setattr(
            mod, "attention_backward", lambda *a, _k=kernels, _m=mod, **kw: used.append(_m) or _k(*a, **kw)
        )
    keep = torch.rand(1, 1, 96, 96, generator=gen) > 0.3
    keep[..., 0] = True
    got = _cuda_grads(q, k, v, dout, cfg, attn_mask=keep.to("cuda"))
    ref = ref_grads(q, k, v, dout, cfg, attn_mask=keep)
    assert used == [triton_backward]
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < 1e-2


@needs_cuda
@gpu
def test_cudnn_backward_chunks_give_the_one_chunk_gradients(gen, monkeypatch):
    """Chunking is bookkeeping: 1, 3 and 4 head chunks (3 uneven over 4 K/V heads), through torch's op or the
    cuDNN frontend, give the same gradients, to the ordering of cuDNN's fp32 dQ accumulation (a misplaced head
    would be off by the gradients' own size)."""
    cfg = QuantConfig.preset("kv-int4")
    q, k, v, dout = inputs(gen, b=2, hq=8, hkv=4, sq=256, sk=256, d=128, dtype=torch.bfloat16)
    results = []
    for chunks, graph in (("1", "0"), ("3", "0"), ("4", "0"), ("1", "1"), ("3", "1")):
        monkeypatch.setenv(cudnn_backward.ENV, chunks)
        monkeypatch.setenv(cudnn_graph.ENV, graph)  # torch's op, or the cuDNN frontend where installed
        results.append(_cuda_grads(q, k, v, dout, cfg, is_causal=True))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert rel(b, a) < 5e-3


@needs_cuda
@gpu
@pytest.mark.parametrize("name", ["kv-int8", "qk-int8-pv-fp8"])
def test_frontend_chunks_read_and_write_whole_tensors_by_head_range(name, gen, monkeypatch):
    """Through the cuDNN frontend, head ranges of whole tensors (Q in place for kv presets, K/V dequantised once,
    the gradients) by pointer offset: 1 or 3 uneven ranges, K/V once or by range, dK/dV or dQ alone, on
    NaN-poisoned gradients, against float64 autograd over the dequantised operands."""
    if not cudnn_graph.available():
        pytest.skip("needs the cuDNN frontend (the optional 'cuda' extra)")
    monkeypatch.delenv(cudnn_backward.ENV, raising=False)
    cfg = QuantConfig.preset(name)
    q, k, v, dout = inputs(gen, b=2, hq=8, hkv=4, sq=256, sk=256, d=128, dtype=torch.bfloat16)
    qc, kc, vc, dc = (t.detach().to("cuda", torch.bfloat16) for t in (q, k, v, dout))
    kw = {"config": cfg, "is_causal": True, "enable_gqa": True, "backend": "triton", "return_lse": True}
    out, lse = quantized_attention(qc, kc, vc, **kw)
    call = make_call(qc, qc.shape, vc.shape, None, True, 128**-0.5, cfg)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)
    _poison_new_empty(monkeypatch)
    for bounds in ([0, 4], [0, 1, 2, 4]):
        for kv_once in (False, True):
            for need_dkv in (True, False):
                held = [quantize(t, spec) for t, spec in ((qc, cfg.q), (kc, cfg.k), (vc, cfg.v))]
                got = cudnn_backward.backward_in_chunks(
                    *held, out, lse, dc, call, bounds, need_dkv, release_held=True, kv_once=kv_once
                )  # fmt: skip
                for i, (a, b) in enumerate(zip(got if need_dkv else got[:1], ref, strict=False)):
                    assert rel(a.float().cpu(), b) < (2e-2 if name == "qk-int8-pv-fp8" else 1e-2), (bounds, kv_once, i)
                assert need_dkv or got[1].shape == got[2].shape == (0,)


@needs_cuda
@gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_cudnn_backward_under_torch_compile(backend, gen, monkeypatch):
    """A bf16 block on BSHD projections, compiled: the same parameter gradients as eager, cuDNN's backward in both."""
    monkeypatch.setenv(cudnn_backward.ENV, "1")
    calls = []
    kernels = cudnn_backward.attention_backward
    monkeypatch.setattr(cudnn_backward, "attention_backward", lambda *a, **k: calls.append(1) or kernels(*a, **k))
    torch.manual_seed(0)
    model = Block(dim=256, heads=4, kv_heads=2).to("cuda", torch.bfloat16)
    x = torch.randn(2, 128, 256, generator=gen).to("cuda", torch.bfloat16)
    target = torch.randn(2, 128, 256, generator=gen).to("cuda", torch.bfloat16)

    def param_grads(fn):
        model.zero_grad()
        torch.nn.functional.mse_loss(fn(x).float(), target.float()).backward()
        return [p.grad.float().clone() for p in model.parameters()]

    eager = param_grads(model)
    compiled = param_grads(torch.compile(model, backend=backend, fullgraph=True))
    assert len(calls) == 2
    for a, b in zip(compiled, eager, strict=True):
        assert rel(a, b) < 2e-2  # bf16 graphs: the compiled one fuses and rounds its elementwise ops differently


def test_backward_in_chunks_refuses_bounds_that_do_not_cover_the_heads(gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = (t.detach() for t in inputs(gen, b=1, hq=4, hkv=2, sq=8, sk=8, d=16))
    held = [quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v))]
    call = make_call(q, q.shape, v.shape, None, False, 0.25, cfg)
    for bounds in ([0, 1], [1, 2], [0, 1, 1, 2], [0, 2, 1, 2]):
        with pytest.raises(ValueError, match="chunk bounds"):
            cudnn_backward.backward_in_chunks(*held, dout, torch.zeros(1, 4, 8), dout, call, bounds)


@pytest.mark.skipif(CUDA, reason="checks the message a machine without CUDA gets")
def test_bench_backward_chunks_says_it_needs_cuda():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_backward_chunks.py"
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "needs CUDA" in run.stderr
