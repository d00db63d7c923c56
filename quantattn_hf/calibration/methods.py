"""Static scales from calibration statistics: `absmax`, `percentile`, and `mse` (search over clipping ratios).

Each method picks, per group of the operand's mode (per head and channel in `channel` mode, per head
in `block` mode, one for `tensor` mode), the range a static scale covers. Per-token (`row`) operands
get none: a per-token scale is a reduction over the token's own channels, with no cross-token max
for a static scale to remove, and one scale per head cannot follow each token; they stay dynamic.
With `subtract_mean` the range is that of x less its own block's mean (the block means stay dynamic:
a sum, no max reduction), measured over the operand's block size. `mse` quantises the sampled tokens
(less their block means) with `quant.quantize` itself for every candidate range and keeps, per
group, the one with the least squared error, so it measures exactly what the kernels will compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..config import OperandQuant, QuantConfig, resolve_config
from ..quant import ASYMMETRIC_RANGE, SYMMETRIC_QMAX, TINY, StaticQuant, quantize
from .schema import Calibration, static_operands, takes_static
from .stats import CalibrationStats, OperandStats, quantile

METHODS = ("absmax", "percentile", "mse")


@dataclass(frozen=True)
class Method:
    """A calibration method and its parameters (stored in the file as `method`)."""

    name: str = "mse"
    percentile: float = 99.9
    grid: int = 40
    min_ratio: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ValueError(f"method: unknown method {self.name!r}; expected one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile: must be in (50, 100], got {self.percentile}")
        if self.grid < 1 or not 0.0 < self.min_ratio <= 1.0:
            raise ValueError(f"grid >= 1 and 0 < min_ratio <= 1 needed, got {self.grid}, {self.min_ratio}")

    def to_dict(self) -> dict[str, Any]:
        """Only the parameters the method uses."""
        data = asdict(self)
        if self.name != "percentile":
            data.pop("percentile")
        if self.name != "mse":
            data.pop("grid")
            data.pop("min_ratio")
        return data


def resolve_method(method: Method | str) -> Method:
    """A `Method`, or a method name with default parameters."""
    return method if isinstance(method, Method) else Method(name=method)


def _reduce(t: torch.Tensor, mode: str, how: str) -> torch.Tensor:
    """Per head and channel [H, D] statistic reduced to the mode's groups: [H, D], [H, 1] or [1, 1]."""
    if mode == "channel":
        return t
    fn = torch.amax if how == "max" else torch.amin
    return fn(t, dim=1, keepdim=True) if mode == "block" else fn(t).view(1, 1)


def _group_values(sample: torch.Tensor, mode: str) -> torch.Tensor:
    """The [H, N, D] sample as [groups..., values]: [H, D, N], [H, 1, N*D] or [1, 1, H*N*D]."""
    h, n, d = sample.shape
    if mode == "channel":
        return sample.transpose(1, 2)
    if mode == "block":
        return sample.reshape(h, 1, n * d)
    return sample.reshape(1, 1, h * n * d)


def _as_static_shape(t: torch.Tensor) -> torch.Tensor:
    """A [G1, G2] group statistic as the [1, G1, 1, G2] tensor StaticQuant takes."""
    return t.reshape(1, t.shape[0], 1, t.shape[1]).to(torch.float32).contiguous()


def _symmetric(clip: torch.Tensor, spec: OperandQuant) -> StaticQuant:
    scale = clip.clamp_min(TINY) / SYMMETRIC_QMAX[spec.precision]
    return StaticQuant(_as_static_shape(scale))


def _asymmetric(lo: torch.Tensor, hi: torch.Tensor, spec: OperandQuant) -> StaticQuant:
    qmin, qmax = ASYMMETRIC_RANGE[spec.precision]
    scale = (hi - lo).clamp_min(TINY) / (qmax - qmin)
    zero = torch.round(qmin - lo / scale)
    return StaticQuant(_as_static_shape(scale), None, _as_static_shape(zero))


def _squared_error(sample: torch.Tensor, spec: OperandQuant, static: StaticQuant, version: int) -> torch.Tensor:
    """Squared quantisation error of the sample with `static`, summed per group."""
    x = sample.unsqueeze(0)
    err = (quantize(x, spec, version, static).dequantize(torch.float32) - x).square()[0]
    if spec.mode == "channel":
        return err.sum(dim=1)
    if spec.mode == "block":
        return err.sum(dim=(1, 2)).unsqueeze(1)
    return err.sum().view(1, 1)


def _pick(candidates: list[StaticQuant], errors: list[torch.Tensor]) -> StaticQuant:
    """Per group, the candidate with the least error (the first on ties)."""
    best = torch.stack(errors).argmin(dim=0)
    index = best.view(1, 1, best.shape[0], 1, best.shape[1])

    def gather(name: str) -> torch.Tensor | None:
        parts = [getattr(c, name) for c in candidates]
        return None if parts[0] is None else torch.gather(torch.stack(parts), 0, index)[0]

    return StaticQuant(gather("scale"), zero_point=gather("zero_point"))


def operand_static(
    stats: OperandStats,
    spec: OperandQuant,
    method: Method | str,
    strategy_version: int = 1,
    device: torch.device | str | None = None,
) -> StaticQuant:
    """The static scale (and zero point, if asymmetric) of one operand, by `method`; no mean: with
    `subtract_mean` the scale covers x less its own block's mean, which `quantize` takes away at run time.

    `device` is where the percentile and mse work on the sample runs (default the CPU); results are on the CPU.
    """
    method = resolve_method(method)
    if not spec.quantized:
        raise ValueError("operand_static: the operand is not quantised by its spec")
    if not takes_static(spec):
        raise ValueError("operand_static: a per-token (mode 'row') operand takes dynamic scales, not static ones")
    if stats.count == 0:
        raise ValueError("operand_static: no finite data was recorded for this operand")
    mode = spec.mode
    if spec.strategy == "asymmetric":
        sample = stats.sample if device is None else stats.sample.to(device)
        lo, hi = _reduce(stats.amin, mode, "min"), _reduce(stats.amax, mode, "max")
        if method.name == "percentile":
            vals = _group_values(sample, mode)
            lo = torch.maximum(lo, quantile(vals, 1.0 - method.percentile / 100.0).cpu())
            hi = torch.minimum(hi, quantile(vals, method.percentile / 100.0).cpu())
        if method.name != "mse":
            return _asymmetric(lo, hi, spec)
        center, half = (hi + lo) / 2, (hi - lo) / 2
        candidates = [_asymmetric(center - r * half, center + r * half, spec) for r in _ratios(method)]
    else:
        if spec.subtract_mean:
            # the scale covers x less its own block's mean (taken away at run time); the search quantises those
            absmax_hd, sample = stats.residuals(spec.block_size)
            spec = dataclasses.replace(spec, subtract_mean=False)
        else:
            absmax_hd, sample = torch.maximum(stats.amax, -stats.amin), stats.sample
        sample = sample if device is None else sample.to(device)
        absmax = _reduce(absmax_hd, mode, "max")
        if method.name == "percentile":
            clip = torch.minimum(absmax, quantile(_group_values(sample.abs(), mode), method.percentile / 100.0).cpu())
            return _symmetric(clip, spec)
        if method.name == "absmax":
            return _symmetric(absmax, spec)
        candidates = [_symmetric(r * absmax, spec) for r in _ratios(method)]
    errors = [_squared_error(sample, spec, c, strategy_version).cpu() for c in candidates]
    return _pick(candidates, errors)


def _ratios(method: Method) -> list[float]:
    """Clipping ratios of the absmax range, largest first (ties keep the wider range)."""
    if method.grid == 1:
        return [1.0]
    step = (1.0 - method.min_ratio) / (method.grid - 1)
    return [1.0 - i * step for i in range(method.grid)]


def calibrated_operands(config: QuantConfig) -> tuple[str, ...]:
    """The operands a calibration for `config` holds static scales for; raises if there are none."""
    operands = static_operands(config)
    if not operands:
        raise ValueError(
            "calibration: the config quantises no operand in groups spanning tokens "
            "(per-token, mode 'row', operands stay dynamic); nothing to calibrate"
        )
    return operands


def compute_calibration(
    stats: CalibrationStats,
    config: QuantConfig | str,
    method: Method | str = "mse",
    fingerprint: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> Calibration:
    """Static scales for every recorded layer and every operand the config (or preset) quantises in groups
    that span tokens; per-token (`row`) operands get none and are quantised dynamically at use.

    `device`: where the percentile / mse work runs (a GPU makes the mse search of a large model fast).
    """
    method = resolve_method(method)
    config = resolve_config(config)
    if not stats.layers:
        raise ValueError("compute_calibration: no attention call was recorded; nothing to calibrate")
    operands = calibrated_operands(config)
    version = config.strategy_version
    layers = {
        name: {op: operand_static(ops[op], getattr(config, op), method, version, device) for op in operands}
        for name, ops in sorted(stats.layers.items())
    }
    fp = dict(fingerprint or {"class": "", "models": {}})
    fp["layers"] = stats.shapes()
    return Calibration(config=config, fingerprint=fp, layers=layers, method=method.to_dict())
