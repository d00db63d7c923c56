"""Processor-level checks of the diffusers integration: each quantised processor against the processor it mirrors.

With the fp16 preset, against the original processor (torch SDPA). With quantised presets,
against the original processor whose SDPA is replaced by an independent quantised attention
(`quant.quantize` + the reference formulas), so every projection, norm, RoPE, mask and residual
path is checked element by element.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import QwenImageTransformer2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor, FluxPosEmbed
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor, WanTransformer3DModel

from quantattn_hf.backends.base import AttentionCall
from quantattn_hf.backends.reference import attention_from_dequantized
from quantattn_hf.config import QuantConfig
from quantattn_hf.integrations.diffusers import apply, quantized_layers, remove
from quantattn_hf.integrations.diffusers_processors import (
    DispatchQuantAttnProcessor,
    FluxQuantAttnProcessor,
    JointQuantAttnProcessor,
    QuantAttnProcessor,
    QuantAttnProcessorBase,
)
from quantattn_hf.quant import quantize
from quantattn_hf.tiny import tiny_flux_pipeline

PRESETS_Q = ("kv-int8", "kv-int4", "qk-int8-pv-fp8")


def reference_sdpa(preset: str):
    """torch SDPA's signature, computing quantised attention from quant.quantize and the reference formulas."""
    cfg = QuantConfig.preset(preset)

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        assert dropout_p == 0.0 and not is_causal and not enable_gqa
        b, h, sq, d = query.shape
        sk = key.shape[2]
        operands = zip((query, key, value), (cfg.q, cfg.k, cfg.v), strict=True)
        q, k, v = (quantize(t, spec).dequantize(torch.float32) for t, spec in operands)
        mask = None if attn_mask is None else attn_mask.expand(b, h, sq, sk)
        call = AttentionCall(cfg, b, h, h, sq, sk, d, d, query.dtype, query.device, scale or d**-0.5, False, mask)
        return attention_from_dequantized(q, k, v, call, cfg.p)[0].to(query.dtype)

    return sdpa


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen)


def flux_double(gen):
    torch.manual_seed(1)
    attn = FluxAttention(32, heads=2, dim_head=16, added_kv_proj_dim=32, context_pre_only=False, bias=True, eps=1e-6)
    ids = torch.cat([torch.zeros(8, 3), torch.stack([torch.zeros(24), torch.arange(24) // 6, torch.arange(24) % 6], 1)])
    rope = FluxPosEmbed(theta=10000, axes_dim=(4, 6, 6))(ids)
    args = (_randn(2, 24, 32, gen=gen), _randn(2, 8, 32, gen=gen))
    return attn, args, {"image_rotary_emb": rope}


def flux_double_masked(gen):
    attn, args, kwargs = flux_double(gen)
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[0, 5:8] = False
    mask[1, 0:3] = False
    return attn, args, dict(kwargs, attention_mask=mask)


def flux_single(gen):
    torch.manual_seed(2)
    attn = FluxAttention(32, heads=2, dim_head=16, bias=True, eps=1e-6, pre_only=True)
    ids = torch.stack([torch.zeros(20), torch.arange(20) // 5, torch.arange(20) % 5], 1)
    rope = FluxPosEmbed(theta=10000, axes_dim=(4, 6, 6))(ids)
    return attn, (_randn(2, 20, 32, gen=gen),), {"image_rotary_emb": rope}


def sd3_joint(gen, context_pre_only=False):
    torch.manual_seed(3)
    attn = Attention(
        query_dim=32,
        added_kv_proj_dim=32,
        dim_head=8,
        heads=4,
        out_dim=32,
        context_pre_only=context_pre_only,
        bias=True,
        qk_norm="rms_norm",
        eps=1e-6,
        processor=JointAttnProcessor2_0(),
    )
    return attn, (_randn(2, 20, 32, gen=gen),), {"encoder_hidden_states": _randn(2, 7, 32, gen=gen)}


def sd35_self(gen):
    """SD3.5's second (self-only) attention of a dual-attention block: joint processor, no context."""
    torch.manual_seed(7)
    attn = Attention(
        query_dim=32,
        dim_head=8,
        heads=4,
        out_dim=32,
        bias=True,
        qk_norm="rms_norm",
        eps=1e-6,
        processor=JointAttnProcessor2_0(),
    )
    return attn, (_randn(2, 20, 32, gen=gen),), {}


def unet_self_4d(gen):
    """VAE mid-block style: 4-d input, group norm, residual connection, rescale factor."""
    torch.manual_seed(4)
    attn = Attention(
        32,
        heads=2,
        dim_head=16,
        rescale_output_factor=2.0,
        eps=1e-6,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    return attn, (_randn(2, 32, 4, 5, gen=gen),), {}


def unet_cross_masked(gen):
    """UNet cross-attention with an additive [B, 1, Sk] encoder mask."""
    torch.manual_seed(5)
    attn = Attention(32, cross_attention_dim=24, heads=4, dim_head=8)
    mask = torch.zeros(2, 1, 9)
    mask[0, :, 6:] = -10000.0
    mask[1, :, :2] = -10000.0
    kwargs = {"encoder_hidden_states": _randn(2, 9, 24, gen=gen), "attention_mask": mask}
    return attn, (_randn(2, 18, 32, gen=gen),), kwargs


def wan_cross_masked(gen):
    """A processor served by the generic route (WanAttnProcessor calls dispatch_attention_fn), with a bool mask."""
    torch.manual_seed(6)
    attn = WanAttention(32, heads=2, dim_head=16, eps=1e-6, processor=WanAttnProcessor())
    mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    mask[1, ..., 7:] = False
    kwargs = {"encoder_hidden_states": _randn(2, 11, 32, gen=gen), "attention_mask": mask}
    return attn, (_randn(2, 15, 32, gen=gen),), kwargs


CASES = {
    "flux-double": (flux_double, FluxQuantAttnProcessor),
    "flux-double-mask": (flux_double_masked, FluxQuantAttnProcessor),
    "flux-single": (flux_single, FluxQuantAttnProcessor),
    "sd3-joint": (sd3_joint, JointQuantAttnProcessor),
    "sd3-joint-pre-only": (lambda gen: sd3_joint(gen, True), JointQuantAttnProcessor),
    "sd35-self": (sd35_self, JointQuantAttnProcessor),
    "unet-self-4d": (unet_self_4d, QuantAttnProcessor),
    "unet-cross-mask": (unet_cross_masked, QuantAttnProcessor),
    "wan-cross-mask": (wan_cross_masked, DispatchQuantAttnProcessor),
}


def _run(attn, args, kwargs):
    with torch.no_grad():
        out = attn(*args, **kwargs)
    return out if isinstance(out, tuple) else (out,)


def _swap(attn, kind, preset, name="layer"):
    original = attn.get_processor()
    if kind is DispatchQuantAttnProcessor:
        proc = DispatchQuantAttnProcessor(original, preset, layer_name=name)
    else:
        proc = kind(preset, layer_name=name, original=original)
    attn.set_processor(proc)
    return proc, original


def _build(case):
    make, kind = CASES[case]
    attn, args, kwargs = make(torch.Generator().manual_seed(list(CASES).index(case)))
    return attn.eval(), args, kwargs, kind


@pytest.mark.parametrize("case", list(CASES))
def test_fp16_preset_matches_original_processor(case):
    attn, args, kwargs, kind = _build(case)
    expected = _run(attn, args, kwargs)
    proc, original = _swap(attn, kind, "fp16")
    assert isinstance(proc, QuantAttnProcessorBase) and proc.config.name == "fp16"
    got = _run(attn, args, kwargs)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape and torch.isfinite(g).all()
        # measured max |diff| <= 1.2e-7 on outputs of size ~0.4-1.7 (float32 rounding, other summation order)
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
    attn.set_processor(original)
    for g, e in zip(_run(attn, args, kwargs), expected, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("preset", PRESETS_Q)
@pytest.mark.parametrize("case", list(CASES))
def test_quantised_processor_matches_independent_reference(case, preset, monkeypatch):
    attn, args, kwargs, kind = _build(case)
    exact = _run(attn, args, kwargs)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "scaled_dot_product_attention", reference_sdpa(preset))
        expected = _run(attn, args, kwargs)
    _swap(attn, kind, preset)
    got = _run(attn, args, kwargs)
    for g, e, x in zip(got, expected, exact, strict=True):
        # measured: bit-identical (the same quantised numbers through the same float32 formulas)
        torch.testing.assert_close(g, e, rtol=0, atol=1e-6)
        # and quantisation really happened: measured max |diff| to exact attention 6.3e-4 .. 8.1e-2
        assert (g - x).abs().max() > 3e-4


def test_dispatch_processor_keeps_wrapped_signature_and_pickles():
    attn, args, kwargs, kind = _build("wan-cross-mask")
    proc, original = _swap(attn, kind, "kv-int8", name="blocks.0.attn2")
    assert inspect.signature(proc.__call__) == inspect.signature(original.__call__)
    assert type(proc).__name__ == "DispatchQuantAttnProcessor[WanAttnProcessor]"
    expected = _run(attn, args, kwargs)
    for clone in (pickle.loads(pickle.dumps(proc)), copy.deepcopy(proc)):
        assert type(clone) is type(proc)
        assert clone.config == proc.config and clone.layer_name == "blocks.0.attn2"
        assert type(clone.original) is WanAttnProcessor
        attn.set_processor(clone)
        for g, e in zip(_run(attn, args, kwargs), expected, strict=True):
            assert torch.equal(g, e)


@pytest.mark.parametrize("kind", [FluxQuantAttnProcessor, JointQuantAttnProcessor, QuantAttnProcessor])
def test_processors_pickle_with_config_and_name(kind):
    proc = kind("qk-int8-pv-fp8", layer_name="a.b", backend="reference")
    for clone in (pickle.loads(pickle.dumps(proc)), copy.deepcopy(proc)):
        assert type(clone) is kind
        assert clone.config == QuantConfig.preset("qk-int8-pv-fp8")
        assert (clone.layer_name, clone.backend) == ("a.b", "reference")
    assert type(proc.restored()) is kind.mirrors


def test_set_attn_processor_by_hand_then_remove():
    transformer = tiny_flux_pipeline().transformer
    inputs = _flux_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        transformer.set_attn_processor(FluxQuantAttnProcessor("kv-int4"))
        quantised = transformer(**inputs)[0]
        assert sorted(quantized_layers(transformer)) == [
            "single_transformer_blocks.0.attn",
            "transformer_blocks.0.attn",
        ]
        assert remove(transformer) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]
        assert all(type(p) is FluxAttnProcessor for p in transformer.attn_processors.values())
        assert torch.equal(transformer(**inputs)[0], expected)
    assert (quantised - expected).abs().max() > 3e-3  # measured 7.0e-3 (outputs up to 1.9)


def _flux_inputs(transformer, batch=2, side=4, text=8):
    gen = torch.Generator().manual_seed(0)
    n = side * side
    img_ids = torch.stack([torch.zeros(n), torch.arange(n) // side, torch.arange(n) % side], 1)
    return {
        "hidden_states": torch.randn(batch, n, transformer.config.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, transformer.config.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, transformer.config.pooled_projection_dim, generator=gen),
        "timestep": torch.rand(batch, generator=gen),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 3.5),
        "return_dict": False,
    }


def test_observer_sees_every_layer():
    transformer = tiny_flux_pipeline().transformer
    seen = []
    for proc in apply(transformer, "kv-int8").values():
        proc.observer = lambda p, q, k, v, layout: seen.append((p.layer_name, tuple(q.shape), layout))
    with torch.no_grad():
        transformer(**_flux_inputs(transformer))
    assert seen == [
        ("transformer_blocks.0.attn", (2, 24, 2, 16), "BSHD"),
        ("single_transformer_blocks.0.attn", (2, 24, 2, 16), "BSHD"),
    ]


def test_unsupported_processor_kind_is_left_alone_with_a_warning():
    attn = _build("unet-cross-mask")[0]
    attn.set_processor(AttnProcessor())
    with pytest.warns(RuntimeWarning, match=r"1 attention layer\(s\) left unquantised.*\(AttnProcessor\)"):
        assert apply(torch.nn.ModuleDict({"attn": attn}), "kv-int8") == {}
    assert type(attn.get_processor()) is AttnProcessor


def test_torch_compile_fullgraph_flux_transformer():
    transformer = tiny_flux_pipeline().transformer
    apply(transformer, "qk-int8-pv-fp8")
    inputs = _flux_inputs(transformer)
    with torch.no_grad():
        eager = transformer(**inputs)[0]
        compiled = torch.compile(transformer, fullgraph=True, backend="aot_eager")(**inputs)[0]
    # measured max |diff| 0 with aot_eager (no fusion); the op is traced as one custom op
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_torch_compile_fullgraph_dispatch_route():
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    ).eval()
    gen = torch.Generator().manual_seed(0)
    x, t, enc = torch.randn(2, 4, 2, 4, 4, generator=gen), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=gen)
    with torch.no_grad():
        exact = model(x, t, enc, return_dict=False)[0]
        assert len(apply(model, "kv-int8")) == 2
        eager = model(x, t, enc, return_dict=False)[0]
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, enc, return_dict=False)[0]
    # measured: compiled == eager exactly; quantised vs exact max |diff| 1.3e-3
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert (eager - exact).abs().max() > 5e-4


def test_generic_route_qwenimage_with_text_mask():
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    inputs = {
        "hidden_states": torch.randn(2, 16, 16, generator=gen),
        "encoder_hidden_states": torch.randn(2, 7, 16, generator=gen),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.tensor([0.3, 0.6]),
        "img_shapes": [[(1, 4, 4)]] * 2,
        "return_dict": False,
    }
    with torch.no_grad():
        expected = model(**inputs)[0]
        assert len(apply(model, "fp16")) == 2
        # measured max |diff| 3.6e-7 (outputs up to 1.8)
        torch.testing.assert_close(model(**inputs)[0], expected, rtol=0, atol=2e-6)
        apply(model, "kv-int8")
        assert (model(**inputs)[0] - expected).abs().max() > 1e-4  # measured 3.4e-4
        remove(model)
        assert torch.equal(model(**inputs)[0], expected)
