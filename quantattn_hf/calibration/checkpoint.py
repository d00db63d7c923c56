"""Calibration files and calibrated checkpoints: write, read, and load back ready to run.

A calibration file is a safetensors file with no tensors and the calibration in its metadata. A
calibrated checkpoint is the model's weights (a single safetensors file, or a diffusers /
transformers `save_pretrained` directory) with the same metadata entries added to its safetensors
files; any safetensors loader still reads the weights, and `load_calibrated` also turns the
quantised attention on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import safetensors.torch

from .fingerprint import check_fingerprint
from .header import read_metadata, update_metadata
from .observe import is_pipeline
from .schema import KEY_FORMAT, KEY_SHA256, Calibration, CalibrationError, parse_metadata
from .use import attached_calibration, enable, remember


def save_calibration(calibration: Calibration, path: str | os.PathLike) -> Path:
    """Write a calibration-only `.safetensors` file (no tensors; everything in the metadata)."""
    path = Path(path)
    safetensors.torch.save_file({}, str(path), metadata=calibration.to_metadata())
    return path


def _calibrated_files(directory: Path) -> list[tuple[Path, dict[str, str]]]:
    found = []
    for file in sorted(directory.rglob("*.safetensors")):
        metadata = read_metadata(file)
        if KEY_FORMAT in metadata:
            found.append((file, metadata))
    return found


def read_calibration(path: str | os.PathLike) -> Calibration:
    """The calibration in a `.safetensors` file, or in the safetensors files of a `save_pretrained` directory."""
    path = Path(path)
    if path.is_dir():
        found = _calibrated_files(path)
        if not found:
            raise CalibrationError(f"{path}: no .safetensors file in this directory carries a quantattn calibration")
        if len({m.get(KEY_SHA256) for _, m in found}) > 1:
            raise CalibrationError(f"{path}: its safetensors files carry different calibrations")
        path, metadata = found[0]
    elif not path.exists():
        raise CalibrationError(f"{path}: no such file or directory")
    else:
        metadata = read_metadata(path)
    try:
        return parse_metadata(metadata)
    except CalibrationError as exc:
        raise CalibrationError(f"{path}: {exc}") from None


def _state_dict_files(directory: Path, target: Any, calibration: Calibration) -> list[Path]:
    """The weight files under a save_pretrained directory that belong to the calibrated model(s)."""
    if is_pipeline(target):
        prefixes = sorted({name.split(".", 1)[0] for name in calibration.layers})
        return [f for p in prefixes for f in sorted((directory / p).glob("*.safetensors"))]
    return sorted(directory.glob("*.safetensors"))


def save_calibrated(target: Any, path: str | os.PathLike, calibration: Calibration | None = None) -> Path:
    """Write weights and calibration together: one `.safetensors` file (a model), else a save_pretrained directory.

    `calibration` defaults to the one the target runs with (from `load_calibrated` / `apply(calibration=...)`).
    """
    calibration = calibration or attached_calibration(target)
    if calibration is None:
        raise CalibrationError("save_calibrated: this model has no calibration; pass calibration=")
    check_fingerprint(calibration, target)
    metadata = calibration.to_metadata()
    path = Path(path)
    if path.suffix == ".safetensors":
        if is_pipeline(target):
            raise CalibrationError("save_calibrated: save a pipeline to a directory, not to one file")
        safetensors.torch.save_model(target, str(path), metadata={"format": "pt", **metadata})
        return path
    if not hasattr(target, "save_pretrained"):
        raise CalibrationError(f"save_calibrated: a {type(target).__name__} has no save_pretrained; use a file path")
    target.save_pretrained(str(path), safe_serialization=True)
    files = _state_dict_files(path, target, calibration)
    if not files:
        raise CalibrationError(f"save_calibrated: save_pretrained wrote no .safetensors weights under {path}")
    for file in files:
        update_metadata(file, metadata)
    return path


def load_calibrated(target: Any, path: str | os.PathLike, *, strict: bool = True, **from_pretrained_kwargs: Any) -> Any:
    """A calibrated checkpoint loaded and running quantised attention with its static scales; returns the model.

    `target` is a model or pipeline class (then `target.from_pretrained(path, **kwargs)` loads the
    directory), or an instance (a `.safetensors` file's weights are loaded into it; for a directory
    its weights are taken as already loaded).
    """
    path = Path(path)
    if isinstance(target, type):
        if not path.is_dir():
            raise CalibrationError(f"load_calibrated: {target.__name__}.from_pretrained needs a directory, got {path}")
        target = target.from_pretrained(str(path), **from_pretrained_kwargs)
    calibration = read_calibration(path)
    check_fingerprint(calibration, target, strict=strict)
    if path.is_file():
        if is_pipeline(target):
            raise CalibrationError("load_calibrated: a pipeline loads from a save_pretrained directory")
        device = next((p.device for p in target.parameters()), "cpu")
        missing, unexpected = safetensors.torch.load_model(target, str(path), strict=False, device=str(device))
        if missing or unexpected:
            raise CalibrationError(
                f"{path}: the weights do not fit this model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unexpected)[:3]})"
            )
    enable(target, calibration, strict=strict)
    remember(target, calibration)
    return target
