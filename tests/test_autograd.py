"""Backward of quantised attention against float64 autograd over the dequantised operands.

The reference is float64 autograd of explicit attention over `quantize(x).dequantize(float64)`
of each quantised operand (straight-through: `x + (x' - x).detach()`). The backward treats P's
rounding as straight-through as well: dQ and dK are the gradients of the forward as computed
(P rounded in the forward, exact in the backward: `delta = rowsum(dO * O)` uses the op's output),
dV is `P^T dO` with the exact probabilities, so it is checked against the unrounded-P attention.
"""

from __future__ import annotations

import math

import pytest
import torch

from quantattn_hf import OperandQuant, QuantConfig, quantize, quantized_attention
from quantattn_hf.backends.reference import round_p
from quantattn_hf.config import PRESETS
from quantattn_hf.quant import StaticQuant

PRESET_NAMES = sorted(PRESETS)


def ste(x: torch.Tensor, spec, static: StaticQuant | None = None) -> torch.Tensor:
    """float64 `x` with its quantisation applied forward and passed straight through backward."""
    x64 = x.to(torch.float64)
    if not spec.quantized:
        return x64
    return x64 + (quantize(x.detach(), spec, static=static).dequantize(torch.float64) - x64).detach()


def attention64(q, k, v, cfg, attn_mask=None, is_causal=False, scale=None, rounded_p=True, static=None):
    """Returns (out, lse) of float64 attention over STE-dequantised operands, P rounded as the op does."""
    static = static or {}
    q, k, v = (ste(t, getattr(cfg, n), static.get(n)) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    if is_causal:
        sq, sk = q.shape[2], k.shape[2]
        keep = torch.arange(sk).unsqueeze(0) <= torch.arange(sq).unsqueeze(1) + (sk - sq)
        s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True).detach()
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(s - m)
    e_held = e + (round_p(e.detach().float(), cfg.p).double() - e).detach() if rounded_p else e
    denom = e.sum(dim=-1, keepdim=True)
    out = torch.where(denom > 0, (e_held @ v) / denom.clamp_min(1e-300), 0.0)
    return out, (m + torch.log(denom)).squeeze(-1)


def inputs(gen, b=2, hq=4, hkv=2, sq=37, sk=53, d=64, dv=None, dtype=torch.float32):
    """Random leaf Q, K, V (requires_grad) and a random upstream gradient."""
    dv = dv or d
    q = torch.randn(b, hq, sq, d, generator=gen).to(dtype).requires_grad_()
    k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype).requires_grad_()
    v = torch.randn(b, hkv, sk, dv, generator=gen).to(dtype).requires_grad_()
    return q, k, v, torch.randn(b, hq, sq, dv, generator=gen)


def grads(q, k, v, dout, fn):
    """Gradients of sum(fn(q, k, v) * dout) w.r.t. q, k, v."""
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


def ref_grads(q, k, v, dout, cfg, **kw):
    """(dQ, dK) of the forward with P rounded, dV with exact P: what the straight-through backward computes."""
    dq, dk, _ = grads(q, k, v, dout, lambda q, k, v: attention64(q, k, v, cfg, **kw)[0])
    dv = grads(q, k, v, dout, lambda q, k, v: attention64(q, k, v, cfg, rounded_p=False, **kw)[0])[2]
    return dq, dk, dv


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Worst elementwise error relative to the reference's largest magnitude."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return float((a - b).abs().max() / b.abs().max())


def masks(kind: str, gen, b, hq, sq, sk):
    if kind == "bool":
        keep = torch.rand(b, 1, sq, sk, generator=gen) > 0.3
        keep[..., 0] = True
        return keep
    if kind == "additive":
        return torch.randn(b, hq, sq, sk, generator=gen) * 2
    return None


# Measured worst errors relative to the largest reference gradient, float32 inputs (B=2, Hq=4, Hkv=2,
# Sq=37, Sk=53, D=64): dQ, dK up to 2e-5 with fp16 P (P's fp16 rounding of float32 vs float64 scores
# differs by an ulp at ties), < 1.5e-5 otherwise; dV < 6e-7.
TOL = 5e-5


@pytest.mark.parametrize("name", PRESET_NAMES)
@pytest.mark.parametrize("mask", ["none", "bool", "additive", "causal"])
def test_grads_match_float64_autograd(name, mask, gen):
    cfg = QuantConfig.preset(name)
    q, k, v, dout = inputs(gen)
    attn_mask = masks(mask, gen, 2, 4, 37, 53)
    kw = {"attn_mask": attn_mask, "is_causal": mask == "causal"}
    got = grads(q, k, v, dout, lambda q, k, v: quantized_attention(q, k, v, config=cfg, enable_gqa=True, **kw))
    ref = ref_grads(q, k, v, dout, cfg, **kw)
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert rel(a, b) < TOL, (name, mask, "qkv"[i], rel(a, b))


@pytest.mark.parametrize("d", [40, 80, 128])
def test_head_dims_gqa_causal(d, gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = inputs(gen, b=1, hq=6, hkv=2, sq=29, sk=29, d=d)
    got = grads(q, k, v, dout, lambda q, k, v: quantized_attention(q, k, v, enable_gqa=True, is_causal=True))
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < TOL


@pytest.mark.parametrize("sq", [1, 5])
def test_decode_like_shorter_queries(sq, gen):
    cfg = QuantConfig.preset("kv-int4")
    q, k, v, dout = inputs(gen, b=1, hq=8, hkv=2, sq=sq, sk=77, d=32, dv=48)
    fn = lambda q, k, v: quantized_attention(q, k, v, config=cfg, enable_gqa=True, is_causal=True)  # noqa: E731
    got = grads(q, k, v, dout, fn)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < TOL


def test_fully_masked_rows_get_zero_gradients(gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = inputs(gen, b=1, hq=2, hkv=2, sq=40, sk=24, d=32)
    keep = torch.rand(1, 2, 40, 24, generator=gen) > 0.5
    keep[:, :, 30:] = False
    fn = lambda q, k, v: quantized_attention(q, k, v, attn_mask=keep, is_causal=True)  # noqa: E731
    got = grads(q, k, v, dout, fn)
    ref = ref_grads(q, k, v, dout, cfg, attn_mask=keep, is_causal=True)
    # causal with Sq > Sk: rows 0..15 see no key; the mask empties rows 30..39.
    assert torch.equal(got[0][:, :, :16], torch.zeros_like(got[0][:, :, :16]))
    assert torch.equal(got[0][:, :, 30:], torch.zeros_like(got[0][:, :, 30:]))
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < TOL


def test_lse_gradient(gen):
    cfg = QuantConfig.preset("kv-int8").replace(p=OperandQuant("fp32"))
    q, k, v, dout = inputs(gen, b=1, hq=2, hkv=2, sq=19, sk=33, d=32)
    w = torch.randn(1, 2, 19, generator=gen)

    def loss(fn):
        out, lse = fn(q, k, v)
        return torch.autograd.grad((out * dout).sum() + (lse * w).sum(), (q, k, v))

    got = loss(lambda q, k, v: quantized_attention(q, k, v, config=cfg, return_lse=True))
    ref = loss(lambda q, k, v: attention64(q, k, v, cfg))
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < 2e-5  # measured < 1e-6


def test_bfloat16_inputs(gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=4, sq=33, sk=47, d=64, dtype=torch.bfloat16)
    got = grads(q, k, v, dout, lambda q, k, v: quantized_attention(q, k, v, config=cfg))
    ref = ref_grads(q, k, v, dout, cfg)
    for a, b in zip(got, ref, strict=True):
        assert a.dtype == torch.bfloat16
        assert rel(a, b) < 2e-2  # measured < 8e-3 (bf16 rounding of the inputs' grads and of dO)


def test_held_kv_gives_query_gradient(gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=21, sk=40, d=32)
    kq, vq = quantize(k.detach(), cfg.k), quantize(v.detach(), cfg.v)
    out = quantized_attention(q, kq, vq, config=cfg, enable_gqa=True, is_causal=True)
    (dq,) = torch.autograd.grad(out, (q,), dout)
    ref = ref_grads(q, k, v, dout, cfg, is_causal=True)[0]
    assert rel(dq, ref) < TOL


def test_static_scales_pass_straight_through(gen):
    cfg = QuantConfig.preset("qk-int8-pv-fp8")
    q, k, v, dout = inputs(gen, b=1, hq=2, hkv=2, sq=30, sk=50, d=32)
    # calibrated scales a little too small: values beyond them are clipped, gradients still pass straight through
    static = {
        "q": StaticQuant(q.detach().abs().amax(dim=(2, 3), keepdim=True) / 127 * 0.8),
        "k": StaticQuant(k.detach().abs().amax(dim=(2, 3), keepdim=True) / 127, mean=k.detach().mean(2, keepdim=True)),
    }
    fn = lambda q, k, v: quantized_attention(q, k, v, config=cfg, static_scales=static)  # noqa: E731
    got = grads(q, k, v, dout, fn)
    ref = ref_grads(q, k, v, dout, cfg, static=static)
    for a, b in zip(got, ref, strict=True):
        assert rel(a, b) < TOL


def test_saved_for_backward_is_the_held_kv_not_the_full_precision_kv(gen):
    cfg = QuantConfig.preset("kv-int8")
    q, k, v, _ = inputs(gen, b=1, hq=2, hkv=2, sq=64, sk=128, d=64, dtype=torch.bfloat16)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quantized_attention(q, k, v, config=cfg)
    ptrs = {k.data_ptr(), v.data_ptr()}
    assert not any(t.data_ptr() in ptrs for t in saved)
    assert not any(t.dtype == torch.bfloat16 and t.shape == k.shape for t in saved if t is not q)
    held = sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.int8)
    assert held == 2 * k.numel()  # K and V codes: one byte per element
    # bf16 Q and O, int8 K/V codes, and in float32 the lse (B*H*Sq), K's scales and means (2 x B*H*NB*D) and
    # V's scales (B*H*Sk): 69120 bytes, where SDPA keeps 98304 (bf16 Q, K, V, O)
    total = sum(t.numel() * t.element_size() for t in saved)
    assert total == 2 * q.numel() * 2 + 2 * k.numel() + 4 * (q.numel() // 64 + 2 * 2 * 2 * 64 + 2 * 128)


def test_no_grad_and_detached_inputs_take_the_plain_op(gen):
    q, k, v, _ = inputs(gen, b=1, hq=2, hkv=2, sq=8, sk=8, d=16)
    with torch.no_grad():
        out = quantized_attention(q, k, v)
    assert out.grad_fn is None
    assert torch.equal(out, quantized_attention(q, k, v).detach())


def test_unused_outputs_reach_the_backward_as_none(gen, monkeypatch):
    """Without return_lse the lse's gradient is None, not zeros (the cuDNN backward takes no lse gradient)."""
    from quantattn_hf import autograd

    seen = []
    backward = autograd.attention_backward
    monkeypatch.setattr(autograd, "attention_backward", lambda *a: seen.append(a[6]) or backward(*a))
    q, k, v, dout = inputs(gen, b=1, hq=2, hkv=2, sq=8, sk=8, d=16)
    cfg = QuantConfig.preset("kv-int8")
    torch.autograd.grad(quantized_attention(q, k, v, config=cfg), (q, k, v), dout)
    kq, vq = (quantize(t.detach(), s) for t, s in ((k, cfg.k), (v, cfg.v)))
    torch.autograd.grad(quantized_attention(q, kq, vq, config=cfg), (q,), dout)
    assert seen == [None, None]


def test_eager_training_skips_the_dispatcher_and_recorded_backward_goes_through_it(gen, monkeypatch):
    """Eager training runs the forward and backward functions through an autograd.Function and calls the
    backward's function directly (host time); a backward that records a graph (create_graph) calls the backward
    op, as torch.compile's tracing does; the ops' own autograd gives the same gradients, bit for bit."""
    from quantattn_hf import autograd

    calls = []
    op = autograd._attention_bwd_op
    monkeypatch.setattr(autograd, "_attention_bwd_op", lambda *a: calls.append("op") or op(*a))
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=12, sk=12, d=16)
    out = quantized_attention(q, k, v, config="kv-int4", enable_gqa=True)
    assert type(out.grad_fn).__name__ == "_TrainAttentionBackward"
    direct = torch.autograd.grad(out, (q, k, v), dout)
    assert calls == []
    recorded = torch.autograd.grad(
        quantized_attention(q, k, v, config="kv-int4", enable_gqa=True), (q, k, v), dout, create_graph=True
    )
    assert calls == ["op"]
    cfg = QuantConfig.preset("kv-int4").to_json()
    through_ops = torch.ops.quantattn.attention_train(q, k, v, None, False, 0.25, cfg, "", [None] * 9)[0]
    assert "quantattn" in type(through_ops.grad_fn).__name__
    for a, b, c in zip(direct, recorded, torch.autograd.grad(through_ops, (q, k, v), dout), strict=True):
        assert torch.equal(a, b.detach()) and torch.equal(a, c)


def test_backward_releases_the_held_parts_only_when_it_runs_once_on_its_own_operands(gen, monkeypatch):
    """The train route lets the kernels free the held parts (they are the forward's own) in a backward that does
    not keep its graph; retain_graph, a recorded backward (create_graph, the op's) and held K/V (the caller's
    cache) never do. The gradients are the same either way."""
    from quantattn_hf import autograd

    seen = []
    backward = autograd.attention_backward
    monkeypatch.setattr(autograd, "attention_backward", lambda *a: seen.append(a[10]) or backward(*a))
    q, k, v, dout = inputs(gen, b=1, hq=4, hkv=2, sq=12, sk=12, d=16)
    kw = {"config": "kv-int8", "enable_gqa": True}
    once = torch.autograd.grad(quantized_attention(q, k, v, **kw), (q, k, v), dout)
    out = quantized_attention(q, k, v, **kw)
    kept = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), dout)
    torch.autograd.grad(quantized_attention(q, k, v, **kw), (q, k, v), dout, create_graph=True)
    cfg = QuantConfig.preset("kv-int8")
    kq, vq = (quantize(t.detach(), s) for t, s in ((k, cfg.k), (v, cfg.v)))
    torch.autograd.grad(quantized_attention(q, kq, vq, **kw), (q,), dout)
    assert seen == [True, False, True, False, False]
    for a, b, c in zip(once, kept, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
