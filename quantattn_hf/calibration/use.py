"""Putting a calibration to work: per-layer entries for the diffusers processors, static scales for transformers.

diffusers: `apply(pipe, config, calibration=...)` calls `load_layer_calibration`, and each
processor hands its attention to its `LayerCalibration`. transformers: `attach_static_scales` sets
`quantattn_static_scales` on each calibrated attention module (read by the "quantattn" attention
function) and, by layer index, on the model (read by `QuantizedKVCache`).

A calibration holds no scales for per-token (`mode="row"`) operands, e.g. V of the kv presets: they
are absent from every `static_scales` mapping handed on, so `quantized_attention` and the cache
quantise them dynamically, per token, while the other operands use the static scales.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..attention import quantized_attention
from ..config import OperandQuant, QuantConfig
from ..quant import StaticQuant
from .fingerprint import check_fingerprint
from .observe import is_pipeline, models_of
from .schema import Calibration, CalibrationError

STATIC_ATTR = "quantattn_static_scales"
STATIC_CONFIG_ATTR = "quantattn_static_config"
CALIBRATION_ATTR = "quantattn_calibration"


def _static_key(spec: OperandQuant) -> OperandQuant:
    """The parts of a spec static scales depend on: the block size only with `subtract_mean` (the scale covers x
    less its own block's mean)."""
    return spec if spec.subtract_mean else dataclasses.replace(spec, block_size=1)


def check_config(used: QuantConfig, calibrated: QuantConfig, where: str = "calibration") -> None:
    """Raise unless `used` quantises Q, K and V as the calibration's config does (block size may differ for an
    operand without `subtract_mean`)."""
    for op in ("q", "k", "v"):
        a, b = getattr(used, op), getattr(calibrated, op)
        if _static_key(a) != _static_key(b):
            raise CalibrationError(
                f"{where}: operand {op!r} is configured as {a.to_dict()}, but was calibrated for {b.to_dict()}; "
                "use the calibration's config (Calibration.config)"
            )
    if used.strategy_version != calibrated.strategy_version:
        raise CalibrationError(
            f"{where}: strategy_version {used.strategy_version} differs from the calibration's "
            f"{calibrated.strategy_version}"
        )


def _on_device(static: dict[str, StaticQuant], device: torch.device) -> dict[str, StaticQuant]:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return {op: StaticQuant(move(s.scale), move(s.mean), move(s.zero_point)) for op, s in static.items()}


class LayerCalibration:
    """The static scales of one attention layer (per-token operands: none, dynamic) and their config; computes it."""

    def __init__(self, name: str, config: QuantConfig, static: dict[str, StaticQuant]) -> None:
        self.name = name
        self.config = config
        self.static = static
        self._by_device: dict[torch.device, dict[str, StaticQuant]] = {}

    def scales_on(self, device: torch.device) -> dict[str, StaticQuant]:
        """The static scales on `device` (copied there once)."""
        if device not in self._by_device:
            self._by_device[device] = _on_device(self.static, device)
        return self._by_device[device]

    def attention(
        self,
        processor: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        layout: str = "BHSD",
        **kwargs: Any,
    ) -> torch.Tensor:
        """`quantized_attention` with this layer's static scales, the rest dynamic (a diffusers processor calls it)."""
        config = getattr(processor, "config", None) or self.config
        check_config(config, self.config, f"layer {self.name!r}")
        return quantized_attention(
            query,
            key,
            value,
            config=config,
            attn_mask=attn_mask,
            layout=layout,
            backend=getattr(processor, "backend", None),
            static_scales=self.scales_on(query.device),
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"LayerCalibration({self.name!r}, operands={sorted(self.static)})"


def as_calibration(source: Calibration | str | os.PathLike) -> Calibration:
    """A `Calibration`, read from a file or directory when given a path."""
    if isinstance(source, Calibration):
        return source
    if isinstance(source, (str, os.PathLike)):
        from .checkpoint import read_calibration

        return read_calibration(source)
    raise TypeError(f"calibration: expected a Calibration or a path, got {type(source).__name__}")


def load_calibration(
    source: Calibration | str | os.PathLike, target: Any, *, strict: bool = True
) -> dict[str, dict[str, StaticQuant]]:
    """{layer name: {'q'|'k'|'v': StaticQuant}} of a calibration checked against `target` (model or pipeline)."""
    calibration = as_calibration(source)
    check_fingerprint(calibration, target, strict=strict)
    return calibration.static_scales()


def load_layer_calibration(
    source: Calibration | str | os.PathLike, target: Any, *, strict: bool = True
) -> dict[str, LayerCalibration]:
    """{layer name: LayerCalibration} for `quantattn_hf.integrations.diffusers.apply(calibration=...)`."""
    calibration = as_calibration(source)
    check_fingerprint(calibration, target, strict=strict)
    remember(target, calibration)
    return {name: LayerCalibration(name, calibration.config, ops) for name, ops in calibration.layers.items()}


def remember(target: Any, calibration: Calibration) -> None:
    """Note on the target which calibration it runs with, for `save_calibrated`."""
    object.__setattr__(target, CALIBRATION_ATTR, calibration)


def attached_calibration(target: Any) -> Calibration | None:
    """The calibration `load_calibrated` / `apply(calibration=...)` put on the target, if any."""
    return getattr(target, CALIBRATION_ATTR, None)


def attach_static_scales(target: Any, calibration: Calibration, *, strict: bool = True) -> None:
    """Set `quantattn_static_scales` on each calibrated module and {layer_idx: scales} on each model."""
    modules = check_fingerprint(calibration, target, strict=strict)
    by_index: dict[int, dict[str, StaticQuant]] = {}
    for name, module in modules.items():
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        static = _on_device(calibration.layers[name], device)
        setattr(module, STATIC_ATTR, static)
        setattr(module, STATIC_CONFIG_ATTR, calibration.config)
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int):
            by_index[idx] = static
    for _, model in models_of(target):
        setattr(model, STATIC_ATTR, by_index)
    remember(target, calibration)


def module_static_scales(module: torch.nn.Module, config: QuantConfig) -> dict[str, StaticQuant] | None:
    """The static scales attached to an attention module, if any, checked against the config it runs with."""
    static = getattr(module, STATIC_ATTR, None)
    if static is None:
        return None
    check_config(config, getattr(module, STATIC_CONFIG_ATTR), "static scales of this attention module")
    return static


def enable(target: Any, calibration: Calibration | str | os.PathLike, *, strict: bool = True) -> Any:
    """Run `target`'s attention quantised with the calibration's config and static scales; returns it."""
    calibration = as_calibration(source=calibration)
    models = models_of(target)
    if is_pipeline(target) or any(type(m).__module__.startswith("diffusers") for _, m in models):
        from ..integrations.diffusers import apply

        apply(target, calibration.config, calibration=calibration)
    else:
        from ..integrations.transformers import configure

        check_fingerprint(calibration, target, strict=strict)
        configure(target, calibration.config)
        attach_static_scales(target, calibration, strict=strict)
    return target
