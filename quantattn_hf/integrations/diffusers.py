"""`apply` / `remove`: swap every attention layer of a diffusers pipeline (or one model) for a quantised one.

Layer names are module paths, prefixed with the component name for a pipeline
(`transformer.transformer_blocks.0.attn`, `unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2`);
`include` / `exclude` are shell-style patterns (fnmatch) over those names.
"""

from __future__ import annotations

import fnmatch
import importlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ..config import QuantConfig, resolve_config
from .diffusers_processors import (
    DispatchQuantAttnProcessor,
    FluxQuantAttnProcessor,
    JointQuantAttnProcessor,
    QuantAttnProcessor,
    QuantAttnProcessorBase,
    quant_processor_for,
)


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a `torch.compile` wrapper (so layer names carry no `_orig_mod.`)."""
    return getattr(model, "_orig_mod", model)


def _components(pipe_or_model: Any) -> list[tuple[str, torch.nn.Module]]:
    """(prefix, model) pairs: every nn.Module component of a pipeline, or the model itself."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [("", _unwrapped(pipe_or_model))]
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"expected a diffusers pipeline or a torch.nn.Module, got {type(pipe_or_model).__name__}")
    return [(f"{name}.", _unwrapped(comp)) for name, comp in components.items() if isinstance(comp, torch.nn.Module)]


def attention_layers(pipe_or_model: Any) -> Iterator[tuple[str, torch.nn.Module]]:
    """(layer name, module) for every diffusers attention module (one with get/set_processor)."""
    for prefix, model in _components(pipe_or_model):
        for path, module in model.named_modules():
            if path and hasattr(module, "set_processor") and hasattr(module, "get_processor"):
                yield prefix + path, module


def _patterns(value: str | list[str] | tuple[str, ...] | None, what: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    patterns = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{what}: expected a pattern or a list of patterns (str)")
    return patterns


def _selected(name: str, include: tuple[str, ...] | None, exclude: tuple[str, ...] | None) -> bool:
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude))


def _load_calibration(calibration: Any, pipe_or_model: Any) -> Mapping[str, Any]:
    """Per-layer calibration entries from `quantattn_hf.calibration.load_layer_calibration` (issue 7)."""
    try:
        module = importlib.import_module("quantattn_hf.calibration")
    except ModuleNotFoundError:
        module = None
    loader = getattr(module, "load_layer_calibration", None)
    if loader is None:
        raise NotImplementedError(
            "calibration: static scales need quantattn_hf.calibration.load_layer_calibration, "
            "which this version of quantattn-hf does not have yet; apply without calibration for dynamic scales"
        )
    return loader(calibration, pipe_or_model)


def apply(
    pipe_or_model: Any,
    config: QuantConfig | str | None = None,
    *,
    calibration: Any = None,
    include: str | list[str] | tuple[str, ...] | None = None,
    exclude: str | list[str] | tuple[str, ...] | None = None,
    backend: str | None = None,
) -> dict[str, QuantAttnProcessorBase]:
    """Swap the attention of every selected layer of a pipeline or model; returns {layer name: processor}.

    `config` is a QuantConfig or a preset name (default: the calibration's config, else
    kv-int8). `include` / `exclude` are fnmatch patterns over layer names (e.g.
    `exclude="*attn2"` keeps SD cross-attention unquantised). Applying again replaces the config
    and keeps the original processors for `remove`. Layers whose processor kind is not supported
    stay as they are, with one warning. `backend` names the quantattn backend (default: by
    device). `calibration` is handed to `quantattn_hf.calibration.load_layer_calibration(
    calibration, pipe_or_model)`, which returns {layer name: entry}; each entry becomes its
    processor's `calibration` (see `QuantAttnProcessorBase`).
    """
    include_p, exclude_p = _patterns(include, "include"), _patterns(exclude, "exclude")
    entries = None if calibration is None else _load_calibration(calibration, pipe_or_model)
    if config is None and entries:
        config = getattr(next(iter(entries.values())), "config", None)
    cfg = resolve_config(config)
    swapped: dict[str, QuantAttnProcessorBase] = {}
    skipped: list[str] = []
    for name, module in attention_layers(pipe_or_model):
        if not _selected(name, include_p, exclude_p):
            continue
        current = module.get_processor()
        original = current.original if isinstance(current, QuantAttnProcessorBase) else current
        processor = quant_processor_for(original, cfg, layer_name=name, backend=backend)
        if processor is None:
            skipped.append(f"{name} ({type(original).__name__})")
            continue
        if entries is not None:
            processor.calibration = entries.get(name)
        module.set_processor(processor)
        swapped[name] = processor
    if skipped:
        warnings.warn(
            f"quantattn-hf: {len(skipped)} attention layer(s) left unquantised, processor kind not supported: "
            + ", ".join(skipped[:8])
            + (" ..." if len(skipped) > 8 else ""),
            RuntimeWarning,
            stacklevel=2,
        )
    return swapped


def remove(pipe_or_model: Any) -> list[str]:
    """Put the original processors back on every quantised layer; returns the names of the layers restored."""
    restored = []
    for name, module in attention_layers(pipe_or_model):
        processor = module.get_processor()
        if isinstance(processor, QuantAttnProcessorBase):
            module.set_processor(processor.restored())
            restored.append(name)
    return restored


def quantized_layers(pipe_or_model: Any) -> dict[str, QuantAttnProcessorBase]:
    """{layer name: processor} for the layers that currently run quantised attention."""
    return {
        name: module.get_processor()
        for name, module in attention_layers(pipe_or_model)
        if isinstance(module.get_processor(), QuantAttnProcessorBase)
    }


__all__ = [
    "DispatchQuantAttnProcessor",
    "FluxQuantAttnProcessor",
    "JointQuantAttnProcessor",
    "QuantAttnProcessor",
    "QuantAttnProcessorBase",
    "apply",
    "attention_layers",
    "quantized_layers",
    "remove",
]
