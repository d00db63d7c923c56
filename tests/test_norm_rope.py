"""The fused RMS norm + rotary embedding kernel against diffusers' own `RMSNorm` and `apply_rotary_emb`.

Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set by conftest).
"""

import os

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("diffusers")

from diffusers.models.embeddings import apply_rotary_emb  # noqa: E402
from diffusers.models.normalization import RMSNorm  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxPosEmbed  # noqa: E402

from quantattn_hf.backends.triton.backend import TritonBackend  # noqa: E402
from quantattn_hf.backends.triton.norm_rope import rms_norm_rope  # noqa: E402
from quantattn_hf.integrations.diffusers_processors import FluxQuantAttnProcessor  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs CUDA or TRITON_INTERPRET=1 set before triton kernels load",
)
TritonBackend()  # patches the interpreter for numpy >= 2.4 when interpreting


def _operand(batch, seq, heads, dim, dtype, gen):
    """A [B, S, H, D] view into a wider fused-projection output (strided like a real Q or K)."""
    wide = torch.randn(batch, seq, 3 * heads * dim, generator=gen) * 3 + 0.5
    return wide.to(DEVICE, dtype)[..., heads * dim : 2 * heads * dim].unflatten(-1, (heads, dim))


def _norm(dim, dtype, gen, weight=True, kind=RMSNorm):
    norm = kind(dim, eps=1e-6, elementwise_affine=weight).to(DEVICE, dtype)
    if weight:
        norm.weight.data = (torch.rand(dim, generator=gen) + 0.5).to(DEVICE, dtype)
    return norm


def _rope(seq, dim, gen):
    return tuple(torch.randn(seq, dim, generator=gen).to(DEVICE) for _ in range(2))


def _check_close(got, expected, dtype, magnitude=None):
    """Equal up to one rounding: `magnitude` bounds the terms summed into each element (|expected| by default)."""
    assert not torch.isnan(got).any()
    diff = (got.float() - expected.float()).abs()
    magnitude = expected.float().abs() if magnitude is None else magnitude
    if dtype == torch.float32:
        # measured max |diff| 1.4e-6 .. 1.9e-6 on values up to ~30 (fused multiply-adds, rsqrt vs 1/sqrt)
        assert (diff <= 1e-6 * magnitude + 1e-5).all()
    else:
        # the same roundings as diffusers; where x·rsqrt lands next to a rounding boundary the normalised value
        # can round the other way (rsqrt vs 1/sqrt), then the result: at most two 16-bit ulps of the terms.
        # Measured on the CPU: 0 to 3e-4 of elements differ
        ulp = 2**-7 if dtype == torch.bfloat16 else 2**-10
        assert (diff <= 2 * ulp * magnitude + 1e-6).all()
        assert (diff > 0).float().mean() < 2e-3


def _rope_magnitude(normed, cos, sin):
    """|x|·|cos| + |rotated x|·|sin| per element: the size of the two terms the rotation sums."""
    x = normed.float()
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).flatten(3)
    return x.abs() * cos.abs()[None, :, None] + rotated.abs() * sin.abs()[None, :, None]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [16, 64, 96, 128])
def test_matches_diffusers_norm_then_rope(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    x = _operand(2, 37, 3, dim, dtype, gen)
    norm = _norm(dim, dtype, gen)
    cos, sin = _rope(37, dim, gen)
    expected = apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)
    out = torch.full(x.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = rms_norm_rope(x, norm.weight, norm.eps, cos, sin, out=out)
    assert got is out
    _check_close(got, expected, dtype, _rope_magnitude(norm(x), cos, sin))


@pytest.mark.parametrize("kind", [RMSNorm, torch.nn.RMSNorm])
@pytest.mark.parametrize("weight", [True, False])
def test_norm_only_and_weightless_norm(weight, kind):
    gen = torch.Generator().manual_seed(5)
    x = _operand(1, 19, 2, 64, torch.bfloat16, gen)
    norm = _norm(64, torch.bfloat16, gen, weight=weight, kind=kind)
    diffusers_norm = kind is RMSNorm  # rounds x·rsqrt before the weight; torch.nn.RMSNorm rounds once
    got = rms_norm_rope(x, norm.weight, norm.eps, round_normed=diffusers_norm)
    _check_close(got, norm(x), torch.bfloat16)
    cos, sin = _rope(19, 64, gen)
    expected = apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)
    got = rms_norm_rope(x, norm.weight, norm.eps, cos, sin, round_normed=diffusers_norm)
    _check_close(got, expected, torch.bfloat16, _rope_magnitude(norm(x), cos, sin))


def test_writes_only_its_slice_of_a_joint_buffer():
    gen = torch.Generator().manual_seed(6)
    text, image = _operand(2, 8, 4, 32, torch.bfloat16, gen), _operand(2, 24, 4, 32, torch.bfloat16, gen)
    norms = [_norm(32, torch.bfloat16, gen) for _ in range(2)]
    cos, sin = _rope(32, 32, gen)
    joint = torch.full((2, 32, 4, 32), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    rms_norm_rope(image, norms[1].weight, norms[1].eps, cos[8:], sin[8:], out=joint[:, 8:])
    assert torch.isnan(joint[:, :8]).all()
    rms_norm_rope(text, norms[0].weight, norms[0].eps, cos[:8], sin[:8], out=joint[:, :8])
    normed = torch.cat([norms[0](text), norms[1](image)], dim=1)
    expected = apply_rotary_emb(normed, (cos, sin), sequence_dim=1)
    _check_close(joint, expected, torch.bfloat16, _rope_magnitude(normed, cos, sin))


def test_bad_inputs_are_refused():
    x = torch.randn(1, 4, 2, 8, device=DEVICE)
    w = torch.ones(8, device=DEVICE)
    cos = torch.ones(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"\[B, S, H, D\]"):
        rms_norm_rope(x[0], w, 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_rope(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match="both cos and sin"):
        rms_norm_rope(x, w, 1e-6, cos, None)
    with pytest.raises(ValueError, match=r"cos/sin must be \[S, D\]"):
        rms_norm_rope(x, w, 1e-6, cos[:3], cos[:3])
    with pytest.raises(ValueError, match="even head dim"):
        rms_norm_rope(x[..., :7], w[:7], 1e-6, cos[:, :7], cos[:, :7])
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_rope(x, w, 1e-6, out=torch.empty(1, 4, 2, 8, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        rms_norm_rope(x.double(), None, 1e-6)


def _flux_attention(joint: bool, dtype: torch.dtype):
    torch.manual_seed(7)
    if joint:
        attn = FluxAttention(64, heads=2, dim_head=32, added_kv_proj_dim=64, context_pre_only=False, bias=True)
        ids = torch.cat(
            [torch.zeros(8, 3), torch.stack([torch.zeros(24), torch.arange(24) // 6, torch.arange(24) % 6], 1)]
        )
    else:
        attn = FluxAttention(64, heads=2, dim_head=32, bias=True, pre_only=True)
        ids = torch.stack([torch.zeros(32), torch.arange(32) // 8, torch.arange(32) % 8], 1)
    for module in attn.modules():  # norm weights away from 1, so that the weighted path is exercised
        if isinstance(module, torch.nn.RMSNorm):
            module.weight.data.uniform_(0.5, 1.5)
    rope = FluxPosEmbed(theta=10000, axes_dim=(8, 12, 12))(ids)
    gen = torch.Generator().manual_seed(8)
    args = (torch.randn(2, 24 if joint else 32, 64, generator=gen).to(DEVICE, dtype),)
    if joint:
        args += (torch.randn(2, 8, 64, generator=gen).to(DEVICE, dtype),)
    return attn.to(DEVICE, dtype).eval(), args, {"image_rotary_emb": tuple(t.to(DEVICE) for t in rope)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("preset", ["fp16", "kv-int8"])
def test_flux_processor_fused_prologue_matches_diffusers_modules(joint, dtype, preset):
    attn, args, kwargs = _flux_attention(joint, dtype)
    outputs = {}
    for fused in (False, True):
        attn.set_processor(FluxQuantAttnProcessor(preset, backend="reference", fuse_prologue=fused))
        seen: list = []
        attn.processor.observer = lambda proc, q, k, v, layout, seen=seen: seen.append(
            (q.clone(), k.clone(), v.clone())
        )
        with torch.no_grad():
            out = attn(*args, **kwargs)
        outputs[fused] = ((out,) if torch.is_tensor(out) else out), seen[0]
    (plain, plain_qkv), (fused, fused_qkv) = outputs[False], outputs[True]
    for got, expected in zip(fused_qkv, plain_qkv, strict=True):  # the operands attention receives
        _check_close(got, expected, dtype)
    for got, expected in zip(fused, plain, strict=True):
        assert got.shape == expected.shape and torch.isfinite(got).all()
        diff = (got.float() - expected.float()).abs().max().item()
        # measured max |diff| on outputs of size ~1: float32 fp16 1.8e-7, float32 kv-int8 1.6e-5 (a code flipped by a
        # one-ulp operand difference), bf16 0; bounds allow one more rounding step (bf16: one ulp at 1)
        assert diff <= {torch.float32: 1e-5 if preset == "fp16" else 1e-4, torch.bfloat16: 8e-3}[dtype]


def test_flux_processor_falls_back_for_norms_it_does_not_cover():
    attn, args, kwargs = _flux_attention(True, torch.float32)
    proc = FluxQuantAttnProcessor("fp16", backend="reference", fuse_prologue=True)
    query = torch.empty(1, 1, 2, 32, device=DEVICE)
    assert proc._fuses(attn, query, True, kwargs["image_rotary_emb"])
    attn.norm_q.weight.data = attn.norm_q.weight.data.double()  # weight dtype differs from the activations
    assert not proc._fuses(attn, query, True, kwargs["image_rotary_emb"])
    attn.norm_q.weight.data = attn.norm_q.weight.data.float()
    attn.norm_added_k = torch.nn.LayerNorm(32)  # a norm the kernel does not compute
    assert not proc._fuses(attn, query, True, kwargs["image_rotary_emb"])
    assert not proc._fuses(attn, query, True, None)
    assert not FluxQuantAttnProcessor("fp16", fuse_prologue=False)._fuses(attn, query, True, kwargs["image_rotary_emb"])
