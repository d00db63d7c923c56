"""Run a model or pipeline over calibration inputs, with a progress bar, and turn what it saw into a `Calibration`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import QuantConfig, resolve_config
from .fingerprint import model_fingerprint
from .methods import Method, calibrated_operands, compute_calibration
from .observe import is_pipeline, models_of, observe
from .schema import Calibration, static_operands
from .stats import DEFAULT_MAX_SAMPLES, DEFAULT_SPAN, CalibrationStats


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
    span: int = DEFAULT_SPAN,
    progress: bool = True,
) -> CalibrationStats:
    """Statistics of every attention layer of `target` over `inputs` (each passed to `run(target, item)`).

    `span`: the sample is of aligned runs of this many tokens; a config whose mean-subtracting operands have a
    block size that does not divide it (other than 0) cannot be computed from these statistics.
    """
    stats = stats if stats is not None else CalibrationStats(max_samples=max_samples, seed=seed, span=span)
    run = run or default_run
    total = len(inputs) if hasattr(inputs, "__len__") else None
    with observe(target, stats), torch.no_grad():
        for item in tqdm(inputs, total=total, desc="calibrating", unit="input", disable=not progress):
            run(target, item)
    return stats


def span_for(config: QuantConfig) -> int:
    """The sample span for `config`: the least multiple of 64 that each mean-subtracting operand's block divides."""
    specs = [getattr(config, op) for op in static_operands(config)]
    return math.lcm(DEFAULT_SPAN, *(s.block_size for s in specs if s.subtract_mean and s.block_size > 0))


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
    config = resolve_config(config)
    calibrated_operands(config)
    stats = collect(target, inputs, run, max_samples=max_samples, seed=seed, span=span_for(config), progress=progress)
    if device is None:
        device = next((p.device for _, m in models_of(target) for p in m.parameters()), None)
    return compute_calibration(stats, config, method, model_fingerprint(target), device)
