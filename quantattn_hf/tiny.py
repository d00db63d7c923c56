"""Tiny random diffusers pipelines (Flux, SD3, SD 1.5, SDXL) built from configs in code: no download.

For tests, the demo and smoke benchmarks. Tokenizers are byte-level BPE tokenizers made with the
`tokenizers` library (every byte is a token, no merges), wrapped in transformers'
`PreTrainedTokenizerFast`, so any prompt tokenises offline.
"""

from __future__ import annotations

import torch

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def byte_tokenizer(model_max_length: int = 77):
    """An offline byte-level tokenizer (259 ids: pad, bos, eos, then the 256 bytes) that appends EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {PAD: 0, BOS: 1, EOS: 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=model_max_length
    )


def _ready(pipe, dtype: torch.dtype):
    """Eval mode (as `from_pretrained` leaves models: no dropout) and the dtype."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _clip_config(hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=300,
        max_position_embeddings=77,
        projection_dim=projection,
        hidden_act="gelu",
    )


def _t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=300, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4, pad_token_id=0
    )
    return T5EncoderModel(config)


def _vae(latent_channels: int, blocks: int = 2, scaling_factor: float = 1.0, shift_factor: float | None = None):
    from diffusers import AutoencoderKL

    channels = tuple(16 * 2**i for i in range(blocks))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=shift_factor is None,
        use_post_quant_conv=shift_factor is None,
    )


def tiny_flux_pipeline(
    *,
    num_layers: int = 1,
    num_single_layers: int = 1,
    heads: int = 2,
    head_dim: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random FluxPipeline (transformer, VAE, CLIP + T5 encoders, byte tokenizers); head_dim multiple of 4."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    rope_t = head_dim // 4
    rope_hw = (head_dim - rope_t) // 2
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(head_dim - 2 * rope_hw, rope_hw, rope_hw),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(latent_channels=4, shift_factor=0.0),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=byte_tokenizer(77),
        text_encoder_2=_t5(32),
        tokenizer_2=byte_tokenizer(512),
        transformer=transformer,
    )
    return _ready(pipe, dtype)


def tiny_sd3_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random StableDiffusion3Pipeline (joint attention, two CLIPs with projection and a T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(latent_channels=4, shift_factor=0.0),
        text_encoder=CLIPTextModelWithProjection(_clip_config()),
        tokenizer=byte_tokenizer(77),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer_2=byte_tokenizer(77),
        text_encoder_3=_t5(64),
        tokenizer_3=byte_tokenizer(512),
        transformer=transformer,
    )
    return _ready(pipe, dtype)


def _unet(xl: bool):
    from diffusers import UNet2DConditionModel

    extra = (
        {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32,
            "transformer_layers_per_block": (1, 2),
            "use_linear_projection": True,
        }
        if xl
        else {}
    )
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=64 if xl else 32,
        norm_num_groups=8,
        **extra,
    )


def tiny_sd_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random StableDiffusionPipeline (SD 1.5 layout: UNet with self and cross attention)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=byte_tokenizer(77),
        unet=_unet(xl=False),
        scheduler=DDIMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _ready(pipe, dtype)


def tiny_sdxl_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random StableDiffusionXLPipeline (two CLIP encoders, added text/time conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
        tokenizer=byte_tokenizer(77),
        tokenizer_2=byte_tokenizer(77),
        unet=_unet(xl=True),
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        add_watermarker=False,
    )
    return _ready(pipe, dtype)


__all__ = ["byte_tokenizer", "tiny_flux_pipeline", "tiny_sd3_pipeline", "tiny_sd_pipeline", "tiny_sdxl_pipeline"]
