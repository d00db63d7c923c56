"""Run a model or pipeline over calibration inputs, with a progress bar, and turn what it saw into a `Calibration`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import QuantConfig, resolve_config
from .fingerprint import model_fingerprint
from .methods import Method, calibrated_operands, compute_calibration
from .observe import is_pipeline, models_of, observe
from .schema import Calibration
from .stats import DEFAULT_MAX_SAMPLES, CalibrationStats


def default_run(target: Any, item: Any) -> Any:
    """One calibration step: a pipeline is called with the prompt; a model with the dict's kwargs or the tensor."""
    if is_pipeline(target):
        return target(item)
    if isinstance(item, Mapping):
        return target(**item)
    return target(item)


def collect(
    target: Any,
    inputs: Iterable[Any],
    run: Callable[[Any, Any], Any] | None = None,
    *,
    stats: CalibrationStats | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    progress: bool = True,
) -> CalibrationStats:
    """Statistics of every attention layer of `target` over `inputs` (each passed to `run(target, item)`)."""
    stats = stats if stats is not None else CalibrationStats(max_samples=max_samples, seed=seed)
    run = run or default_run
    total = len(inputs) if hasattr(inputs, "__len__") else None
    with observe(target, stats), torch.no_grad():
        for item in tqdm(inputs, total=total, desc="calibrating", unit="input", disable=not progress):
            run(target, item)
    return stats


def calibrate(
    target: Any,
    inputs: Iterable[Any],
    config: QuantConfig | str | None = None,
    method: Method | str = "mse",
    run: Callable[[Any, Any], Any] | None = None,
    *,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    seed: int = 0,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> Calibration:
    """Measure once over `inputs` and compute static scales for `config` (default kv-int8) by `method`.

    `device` runs the percentile / mse work (default: where the target's first model is).
    """
    calibrated_operands(resolve_config(config))
    stats = collect(target, inputs, run, max_samples=max_samples, seed=seed, progress=progress)
    if device is None:
        device = next((p.device for _, m in models_of(target) for p in m.parameters()), None)
    return compute_calibration(stats, resolve_config(config), method, model_fingerprint(target), device)
