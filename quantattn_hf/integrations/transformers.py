"""transformers integration: the `quantattn` attention implementation and per-model configuration.

`register()` adds an attention function named "quantattn" to transformers' `AttentionInterface`
(and the sdpa mask builder under the same name to `AttentionMaskInterface`, so padding, causal and
sliding-window masks reach it as boolean [B, 1, Sq, Sk] masks). Then
`from_pretrained(..., attn_implementation="quantattn")` or `model.set_attn_implementation("quantattn")`
runs every attention layer through `quantized_attention`; `configure(model, config)` picks the
QuantConfig (default kv-int8). With a `QuantizedKVCache` the attention reads the quantised cache
in place; with any other cache (or none) K and V are quantised on the fly on every call.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention import quantized_attention
from ..backends import get_backend
from ..config import QuantConfig, resolve_config
from ..quant import StaticQuant

ATTN_NAME = "quantattn"
CONFIG_ATTR = "quantattn_config"
BACKEND_ATTR = "quantattn_backend"
STATIC_ATTR = "quantattn_static_scales"  # set by quantattn_hf.calibration.attach_static_scales


def register() -> bool:
    """Register the "quantattn" attention and mask functions with transformers; False if it is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTN_NAME, quantattn_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return True


def _head_dim(config: Any) -> int | None:
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None and heads and getattr(config, "hidden_size", None):
        head_dim = config.hidden_size // heads
    return head_dim


def configure(
    model: torch.nn.Module, config: QuantConfig | str | None = None, *, backend: str | None = None
) -> torch.nn.Module:
    """Use quantised attention in `model` with `config` (a QuantConfig or preset, default kv-int8); returns it.

    `backend` names a backend for every call (default: the device's, see quantattn_hf.backends).
    """
    cfg = resolve_config(config)
    if backend is not None:
        get_backend(backend)
    model_config = getattr(model, "config", None)
    text = model_config.get_text_config(decoder=True) if model_config is not None else None
    head_dim = _head_dim(text) if text is not None else None
    for name, spec in (("query", cfg.q), ("key", cfg.k), ("value", cfg.v)):
        if spec.precision == "int4" and head_dim is not None and head_dim % 2:
            raise ValueError(f"configure: int4 {name}s need an even head dim, this model's is {head_dim}")
    register()
    for module in model.modules():
        setattr(module, CONFIG_ATTR, cfg)
        setattr(module, BACKEND_ATTR, backend)
    if model_config is not None and getattr(model_config, "_attn_implementation", None) != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    return model


def module_config(module: torch.nn.Module) -> QuantConfig:
    """The QuantConfig `configure` set on this attention module, else kv-int8."""
    cfg = getattr(module, CONFIG_ATTR, None)
    return cfg if cfg is not None else resolve_config(None)


def module_static(module: torch.nn.Module, config: QuantConfig) -> dict[str, StaticQuant] | None:
    """Calibrated static scales attached to this attention module (quantattn_hf.calibration), checked against config."""
    if getattr(module, STATIC_ATTR, None) is None:
        return None
    from ..calibration.use import module_static_scales

    return module_static_scales(module, config)


def _check_cache_fits(module: torch.nn.Module, layer: Any) -> None:
    layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
    if layers is not None and layers != layer.num_layers:
        raise ValueError(
            f"QuantizedKVCache: made for a model with {layer.num_layers} layers, used by one with {layers}; "
            "make the cache for this model"
        )


def quantattn_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (BHSD in, BSHD out) computing attention with quantised operands."""
    from .kv_cache import CacheHandle

    if kwargs.get("softcap") is not None:
        raise ValueError("quantattn: attention logit soft-capping (softcap) is not supported")
    if dropout and module.training:
        raise ValueError("quantattn: attention dropout is not supported; set the model's attention_dropout to 0")
    if kwargs.get("position_bias") is not None:
        raise ValueError("quantattn: additive position bias is not supported")
    cfg = module_config(module)
    backend = getattr(module, BACKEND_ATTR, None)
    static = module_static(module, cfg)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if isinstance(key, CacheHandle):
        _check_cache_fits(module, key.layer)
        q_static = None if static is None else static.get("q")
        out = key.layer.attend(query, attention_mask, bool(is_causal), scaling, cfg, key, backend, q_static)
    else:
        q_len = query.shape[2]
        causal = bool(is_causal) and attention_mask is None and q_len > 1
        if causal and key.shape[2] > q_len:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = quantized_attention(
            query,
            key,
            value,
            config=cfg,
            attn_mask=attention_mask,
            is_causal=causal,
            scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1],
            backend=backend,
            static_scales=static,
        )
    return out.transpose(1, 2).contiguous(), None
