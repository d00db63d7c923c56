"""Triton backward kernels against float64 autograd over the dequantised operands.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET is read when kernels are
defined, so it is set before anything imports them) at small sizes; the interpreter path allocates
outputs NaN-poisoned, so an element a kernel fails to write shows up as NaN.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

# triton.language's own @jit helpers (tl.sum, ...) must be made under the interpreter too: setting
# TRITON_INTERPRET after something imported triton (importing quantattn_hf does, through torch.library)
# gives kernels that cannot run, so that case is skipped (tests/conftest.py should set it first).
LATE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from test_autograd import attention64, inputs, masks, ref_grads, rel  # noqa: E402

from quantattn_hf import OperandQuant, QuantConfig, quantize, quantized_attention  # noqa: E402
from quantattn_hf.autograd import make_call  # noqa: E402
from quantattn_hf.backends import triton_backward  # noqa: E402
from quantattn_hf.config import PRESETS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and (LATE or os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs CUDA, or TRITON_INTERPRET=1 set before triton is first imported",
)


def _on_device(*ts):
    return [t.detach().to(DEVICE).requires_grad_(t.requires_grad) for t in ts]


def triton_grads(q, k, v, dout, cfg, **kw):
    """Gradients through quantized_attention with the Triton forward and backward."""
    q, k, v = _on_device(q, k, v)
    out = quantized_attention(q, k, v, config=cfg, enable_gqa=True, backend="triton", **kw)
    return [g.cpu() for g in torch.autograd.grad(out, (q, k, v), dout.to(out.dtype).to(DEVICE))]


def kernel_grads(q, k, v, dout, cfg, attn_mask=None, is_causal=False):
    """The backward kernels alone, given the reference forward's output and lse."""
    q, k, v, dout = (t.detach().to(DEVICE) for t in (q, k, v, dout))
    attn_mask = None if attn_mask is None else attn_mask.to(DEVICE)
    kw = {"attn_mask": attn_mask, "is_causal": is_causal, "enable_gqa": True}
    out, lse = quantized_attention(q, k, v, config=cfg, backend="reference", return_lse=True, **kw)
    held = (quantize(t, spec) for t, spec in ((q, cfg.q), (k, cfg.k), (v, cfg.v)))
    call = make_call(q, q.shape, v.shape, attn_mask, is_causal, q.shape[-1] ** -0.5, cfg)
    return [g.cpu() for g in triton_backward.attention_backward(*held, out, lse, dout, None, call)]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "causal"])
def test_kernels_match_float64_autograd(name, mask, gen):
    cfg = QuantConfig.preset(name)
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=37, sk=45, d=32)
    attn_mask = masks(mask, gen, 1, 4, 37, 45)
    got = kernel_grads(q, k, v, dout, cfg, attn_mask, mask == "causal")
    ref = ref_grads(q, k, v, dout, cfg, attn_mask=attn_mask, is_causal=mask == "causal")
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert rel(a, b) < 5e-5, (name, mask, "qkv"[i], rel(a, b))  # measured < 2e-5 (float32 inputs)


# Forward and backward both Triton, float32 inputs: the Triton forward computes in fp16 for float32
# inputs (docs/quantization.md), so its output and lse, and through them the gradients, differ from
# the float32 reference's by fp16 roundings: measured < 1e-3; with fp8 P (rounded against the running
# row maximum) dQ/dK up to 9e-3.
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_triton_forward_and_backward(name, gen, monkeypatch):
    calls = []
    kernels = triton_backward.attention_backward
    monkeypatch.setattr(triton_backward, "attention_backward", lambda *a, **k: calls.append(1) or kernels(*a, **k))
    cfg = QuantConfig.preset(name)
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=37, sk=45, d=32, dv=64)
    got = triton_grads(q, k, v, dout, cfg, is_causal=True)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)
    assert calls == [1]
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert rel(a, b) < (2e-2 if name == "qk-int8-pv-fp8" else 3e-3), (name, "qkv"[i], rel(a, b))


@pytest.mark.parametrize(
    ("b", "sq", "sk", "d", "dv", "hq", "hkv"),
    [
        (1, 5, 70, 32, 32, 8, 2),
        (2, 50, 20, 32, 32, 2, 2),
        (1, 33, 33, 40, 40, 3, 1),
        (2, 20, 36, 80, 48, 2, 1),
        (1, 64, 96, 32, 64, 4, 2),  # lengths that are whole tiles: the unpredicated path
    ],
)
def test_triton_shapes_causal(b, sq, sk, d, dv, hq, hkv, gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = inputs(gen, b=b, hq=hq, hkv=hkv, sq=sq, sk=sk, d=d, dv=dv)
    got = kernel_grads(q, k, v, dout, cfg, is_causal=True)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < 5e-5  # measured < 2e-5
    if sq > sk:  # queries 0 .. sq-sk-1 see no key: zero gradient
        assert torch.equal(got[0][:, :, : sq - sk], torch.zeros_like(got[0][:, :, : sq - sk]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_16_bit(dtype, gen, monkeypatch):
    monkeypatch.setenv("QUANTATTN_CUDNN_BACKWARD", "0")  # on CUDA cuDNN's backward would take this call
    cfg = QuantConfig.preset("kv-int4")
    q, k, v, dout = inputs(gen, b=1, hq=2, hkv=2, sq=40, sk=40, d=64, dtype=dtype)
    got = triton_grads(q, k, v, dout, cfg, is_causal=True)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == dtype
        # P, dS and the operands are rounded to the 16-bit format for the dots (FlashAttention-2
        # practice): measured < 8e-4 (fp16), < 9e-3 (bf16)
        assert rel(a, b) < (3e-3 if dtype == torch.float16 else 2.5e-2)


def test_triton_lse_gradient(gen):
    cfg = QuantConfig.preset("kv-int8").replace(p=OperandQuant("fp32"))
    q, k, v, dout = inputs(gen, b=1, hq=2, hkv=1, sq=24, sk=40, d=32)
    w = torch.randn(1, 2, 24, generator=gen)

    def loss(fn, dev):
        q2, k2, v2 = (t.detach().to(dev).requires_grad_() for t in (q, k, v))
        out, lse = fn(q2, k2, v2)
        total = (out * dout.to(dev)).sum() + (lse * w.to(dev)).sum()
        return [g.cpu() for g in torch.autograd.grad(total, (q2, k2, v2))]

    kw = {"config": cfg, "enable_gqa": True, "return_lse": True, "backend": "triton"}
    got = loss(lambda q, k, v: quantized_attention(q, k, v, **kw), DEVICE)
    ref = loss(lambda q, k, v: attention64(q, k, v, cfg), "cpu")
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < 1e-3  # the Triton forward computes in fp16 for float32 inputs: measured 2.4e-4


def test_triton_held_kv_query_gradient(gen):
    cfg = QuantConfig.preset("kv-int4")
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=21, sk=40, d=32)
    kq, vq = (quantize(t.detach().to(DEVICE), spec) for t, spec in ((k, cfg.k), (v, cfg.v)))
    qd = q.detach().to(DEVICE).requires_grad_()
    out = quantized_attention(qd, kq, vq, config=cfg, enable_gqa=True, is_causal=True, backend="triton")
    (dq,) = torch.autograd.grad(out, (qd,), dout.to(DEVICE))
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)[0]
    assert rel(dq.cpu(), ref) < 1.5e-3  # the Triton forward computes in fp16 for float32 inputs: measured 4.6e-4
