"""A model's fingerprint (class, config hash, attention layers) and the check that a calibration fits a model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

from .observe import attention_layers, models_of
from .schema import Calibration, CalibrationError

VOLATILE_CONFIG_KEYS = frozenset(
    {
        "transformers_version",
        "torch_dtype",
        "dtype",
        "architectures",
        "name_or_path",
        "attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
    }
)


def _canonical(value: Any) -> Any:
    """Config values without private or run-time keys (they change on save/reload, not the model)."""
    if isinstance(value, dict):
        return {
            str(k): _canonical(v)
            for k, v in value.items()
            if not str(k).startswith("_") and str(k) not in VOLATILE_CONFIG_KEYS
        }
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def config_sha256(model: torch.nn.Module) -> str:
    """SHA-256 of the model's config (diffusers or transformers); of its parameter names and shapes without one."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        data: Any = config.to_dict()
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data = {name: list(p.shape) for name, p in model.state_dict().items()}
    text = json.dumps(_canonical(data), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(target: Any) -> dict[str, Any]:
    """{"class", "models": {prefix: {"class", "config_sha256"}}} of a model or pipeline (layers come from stats)."""
    return {
        "class": type(target).__name__,
        "models": {
            prefix: {"class": type(model).__name__, "config_sha256": config_sha256(model)}
            for prefix, model in models_of(target)
        },
    }


def check_fingerprint(calibration: Calibration, target: Any, strict: bool = True) -> dict[str, torch.nn.Module]:
    """Raise `CalibrationError` unless the calibration was made for `target`; returns its layers by name.

    strict: classes and config hashes must match; otherwise only the layer names must exist.
    """
    found = model_fingerprint(target)
    want = calibration.fingerprint
    if strict:
        if want.get("class") != found["class"]:
            raise CalibrationError(
                f"calibration is for a {want.get('class')!r}, not this {found['class']!r} (a file for another model)"
            )
        for prefix, model in want.get("models", {}).items():
            have = found["models"].get(prefix)
            where = f"component {prefix!r}" if prefix else "the model"
            if have is None:
                raise CalibrationError(f"calibration covers {where}, which this {found['class']!r} does not have")
            if have["class"] != model.get("class"):
                raise CalibrationError(
                    f"calibration: {where} is a {have['class']!r}, the file is for {model.get('class')!r}"
                )
            if have["config_sha256"] != model.get("config_sha256"):
                raise CalibrationError(
                    f"calibration: {where} ({have['class']}) has a different config than the calibrated one "
                    f"(config sha256 {have['config_sha256'][:12]}, the file's {str(model.get('config_sha256'))[:12]}): "
                    "a file for another model"
                )
    layers = attention_layers(target)
    missing = [name for name in calibration.layers if name not in layers]
    if missing:
        raise CalibrationError(
            f"calibration: {len(missing)} layer(s) not in this model, e.g. {missing[:3]} (a file for another model)"
        )
    return {name: layers[name] for name in calibration.layers}
