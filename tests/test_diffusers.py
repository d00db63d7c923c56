"""End-to-end image generation with `apply` / `remove` on tiny random Flux, SD3, SD 1.5 and SDXL pipelines.

Every pipeline runs with a batch of two prompts (Flux with guidance embedding; SD3, SD 1.5 and
SDXL with classifier-free guidance, so the denoiser sees a batch of four). PSNR is against the
same pipeline's unquantised image; bounds sit near the values measured on CPU (commented).
"""

from __future__ import annotations

import sys
import types
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from quantattn_hf.integrations.diffusers import apply, attention_layers, quantized_layers, remove
from quantattn_hf.integrations.diffusers_processors import QuantAttnProcessorBase
from quantattn_hf.tiny import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a photo of a cat", "a red car in the snow"]
COMMON = {"height": 32, "width": 32, "num_inference_steps": 2}

# name: (builder, call kwargs, {preset: measured PSNR dB}, quantised layer count)
PIPELINES = {
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 16}, {"kv-int8": 91.5, "kv-int4": 66.3, "qk": 72.4}, 4),
    "sd3": (tiny_sd3_pipeline, {"max_sequence_length": 16}, {"kv-int8": 93.2, "kv-int4": 68.7, "qk": 72.6}, 4),
    "sd15": (tiny_sd_pipeline, {}, {"kv-int8": 77.6, "kv-int4": 47.7, "qk": 56.6}, 10),
    "sdxl": (tiny_sdxl_pipeline, {}, {"kv-int8": 80.2, "kv-int4": 55.4, "qk": 62.1}, 18),
}


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (float64)."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def generate(pipe, extra, **kwargs) -> np.ndarray:
    out = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", **COMMON, **extra, **kwargs)
    return out.images


@pytest.fixture(scope="module", params=list(PIPELINES))
def case(request):
    build, extra, measured, count = PIPELINES[request.param]
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    return request.param, pipe, extra, measured, count, generate(pipe, extra)


def test_generation_with_each_preset_then_remove(case):
    name, pipe, extra, measured, count, baseline = case
    assert baseline.shape == (2, 32, 32, 3) and np.isfinite(baseline).all()
    assert baseline.std() > 0.1  # a non-constant image (measured std 0.16)
    scores = {}
    for preset in ("fp16", "kv-int8", "kv-int4", "qk-int8-pv-fp8"):
        swapped = apply(pipe, preset)
        assert len(swapped) == count
        image = generate(pipe, extra)
        assert image.shape == baseline.shape and np.isfinite(image).all()
        scores[preset.replace("qk-int8-pv-fp8", "qk")] = psnr(image, baseline)
    assert scores["fp16"] > 115, scores  # float rounding only (measured 125-137 dB)
    for preset, value in measured.items():
        assert value - 4 < scores[preset] < value + 4, (preset, scores)
    assert scores["kv-int4"] < scores["qk"] < scores["kv-int8"], scores
    assert len(remove(pipe)) == count
    assert not quantized_layers(pipe)
    assert not any(isinstance(m.get_processor(), QuantAttnProcessorBase) for _, m in attention_layers(pipe))
    np.testing.assert_array_equal(generate(pipe, extra), baseline)


def test_layer_names_flux():
    pipe = tiny_flux_pipeline()
    assert sorted(apply(pipe, "kv-int8")) == [
        "transformer.single_transformer_blocks.0.attn",
        "transformer.transformer_blocks.0.attn",
        "vae.decoder.mid_block.attentions.0",
        "vae.encoder.mid_block.attentions.0",
    ]
    again = apply(pipe, "kv-int4", include="transformer.*")
    assert sorted(again) == ["transformer.single_transformer_blocks.0.attn", "transformer.transformer_blocks.0.attn"]
    layers = quantized_layers(pipe)
    assert {n: p.config.name for n, p in layers.items()} == {
        "transformer.single_transformer_blocks.0.attn": "kv-int4",
        "transformer.transformer_blocks.0.attn": "kv-int4",
        "vae.decoder.mid_block.attentions.0": "kv-int8",
        "vae.encoder.mid_block.attentions.0": "kv-int8",
    }
    # applying twice keeps the original processors: remove restores diffusers' own
    remove(pipe)
    kinds = {type(m.get_processor()).__name__ for _, m in attention_layers(pipe)}
    assert kinds == {"FluxAttnProcessor", "AttnProcessor2_0"}


def test_include_exclude_keep_cross_attention_unquantised():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    baseline = generate(pipe, {})
    swapped = apply(pipe, "kv-int4", exclude=["*attn2", "vae.*"])
    assert sorted(swapped) == [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1",
        "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1",
        "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1",
    ]
    self_only = psnr(generate(pipe, {}), baseline)
    apply(pipe, "kv-int4", include="*attn2")
    assert len(quantized_layers(pipe)) == 8
    both = psnr(generate(pipe, {}), baseline)
    # measured 55.6 dB with self-attention only (VAE excluded), 49.8 dB with cross-attention too
    assert 52 < self_only < 59 and 46 < both < 53 and both < self_only - 3
    with pytest.raises(TypeError, match="include"):
        apply(pipe, "kv-int8", include=[1])


def test_model_cpu_offload_and_larger_batch():
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    apply(pipe.unet, "kv-int8")
    expected = generate(pipe, {}, num_images_per_prompt=2)
    pipe.enable_model_cpu_offload(device="cpu")
    got = generate(pipe, {}, num_images_per_prompt=2)
    assert got.shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(got, expected)
    assert len(quantized_layers(pipe)) == 8


def test_calibration_hook(monkeypatch):
    pipe = tiny_flux_pipeline()
    monkeypatch.setitem(sys.modules, "quantattn_hf.calibration", types.ModuleType("quantattn_hf.calibration"))
    with pytest.raises(NotImplementedError, match="load_layer_calibration"):
        apply(pipe, "kv-int8", calibration="scales.safetensors")

    calls = []

    class Entry:
        def attention(self, processor, query, key, value, attn_mask=None, layout="BHSD"):
            calls.append((processor.layer_name, layout))
            return torch.nn.functional.scaled_dot_product_attention(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            ).transpose(1, 2)

    fake = types.ModuleType("quantattn_hf.calibration")
    fake.load_layer_calibration = lambda source, target: {"transformer.transformer_blocks.0.attn": Entry()}
    monkeypatch.setitem(sys.modules, "quantattn_hf.calibration", fake)
    layers = apply(pipe, "kv-int8", calibration="scales.safetensors", include="transformer.*")
    assert [n for n, p in layers.items() if p.calibration is not None] == ["transformer.transformer_blocks.0.attn"]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.set_progress_bar_config(disable=True)
        pipe("x", num_inference_steps=1, height=32, width=32, max_sequence_length=8, output_type="latent")
    assert calls == [("transformer.transformer_blocks.0.attn", "BSHD")]


def test_compiled_transformer_keeps_layer_names():
    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, fullgraph=True)
    names = sorted(apply(pipe, "kv-int8", include="transformer.*"))
    assert names == ["transformer.single_transformer_blocks.0.attn", "transformer.transformer_blocks.0.attn"]
    assert remove(pipe.transformer) == ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"]


def test_rejects_non_pipeline():
    with pytest.raises(TypeError, match="diffusers pipeline or a torch.nn.Module"):
        apply(object(), "kv-int8")
