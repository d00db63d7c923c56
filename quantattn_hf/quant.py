"""The quantisation formulas (docs/quantization.md) and `QuantizedTensor`.

This module is the single source of truth for how an operand is quantised; every kernel's
quantiser is tested against `quantize` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import OperandQuant

TINY = 2.0**-60
FP8_MAX = 448.0
SYMMETRIC_QMAX = {"int8": 127.0, "int4": 7.0, "fp8_e4m3": FP8_MAX}
ASYMMETRIC_RANGE = {"int8": (-128.0, 127.0), "int4": (0.0, 15.0)}
STORAGE_DTYPES = {"int8": torch.int8, "int4": torch.uint8, "fp8_e4m3": torch.float8_e4m3fn}


def num_blocks(seq_len: int, block_size: int) -> int:
    """Number of token blocks of `block_size` covering `seq_len` tokens (0 = one block)."""
    if block_size == 0:
        return 1 if seq_len > 0 else 0
    return math.ceil(seq_len / block_size)


def effective_block(seq_len: int, block_size: int) -> int:
    """Tokens per block: `block_size`, or the whole sequence when it is 0."""
    return block_size if block_size > 0 else max(seq_len, 1)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (int values in -8..15) two per byte along the last dim, low nibble first."""
    if codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got {codes.shape[-1]}")
    nib = codes.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of `pack_int4`: int16 codes, two's complement when `signed`, else 0..15."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    if signed:
        lo, hi = lo - ((lo & 8) << 1), hi - ((hi & 8) << 1)
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _group_view(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """Pad S to whole blocks and view as [B, H, NB, T, D] (T tokens per block); returns pad count."""
    b, h, s, d = x.shape
    t = effective_block(s, block_size)
    nb = num_blocks(s, block_size)
    pad = nb * t - s
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
    return x.view(b, h, nb, t, d), pad


def _block_mean(view: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per block and channel mean of the valid tokens of a [B, H, NB, T, D] view: [B, H, NB, 1, D]."""
    count = valid.sum(dim=3, keepdim=True).clamp_min(1).to(torch.float32)
    return torch.where(valid, view, 0.0).sum(dim=3, keepdim=True) / count


def _valid_tokens(view: torch.Tensor, pad: int) -> torch.Tensor:
    """[1, 1, NB, T, 1] mask of the real (not padding) tokens of a [B, H, NB, T, D] view."""
    valid = torch.ones(view.shape[2] * view.shape[3], device=view.device, dtype=torch.bool)
    if pad:
        valid[-pad:] = False
    return valid.view(1, 1, view.shape[2], view.shape[3], 1)


def block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per token block and channel mean of a [B, H, S, D] tensor over the block's own tokens: [B, H, NB, D] float32.

    The means `subtract_mean` takes away, with dynamic and with static scales alike.
    """
    view, pad = _group_view(x.to(torch.float32), block_size)
    return _block_mean(view, _valid_tokens(view, pad)).squeeze(3)


def block_residual(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """`x` less its own block's mean (float32, [B, H, S, D]): what a mean-subtracting spec scales and rounds."""
    s = x.shape[2]
    mean = block_mean(x, block_size).repeat_interleave(effective_block(s, block_size), dim=2)[:, :, :s]
    return x.to(torch.float32) - mean


def _reduce_dims(spec: OperandQuant) -> tuple[int, ...]:
    """Dims of the [B, H, NB, T, D] view (or [B,H,S,D] for row/tensor) a group reduces over."""
    return {"tensor": (0, 1, 2, 3), "row": (3,), "channel": (3,), "block": (3, 4)}[spec.mode]


def group_shape(shape: tuple[int, ...], spec: OperandQuant) -> tuple[int, int, int, int]:
    """The compact shape of the scales (and zero points) of a [B, H, S, D] tensor held by `spec`."""
    b, h, s, d = shape
    nb = num_blocks(s, spec.block_size)
    return {"tensor": (1, 1, 1, 1), "row": (b, h, s, 1), "channel": (b, h, nb, d), "block": (b, h, nb, 1)}[spec.mode]


def _expand(stat: torch.Tensor, spec: OperandQuant, seq_len: int) -> torch.Tensor:
    """Broadcast a compact per-group statistic back to [B, H, S, D or 1]."""
    if spec.mode in ("channel", "block"):
        t = effective_block(seq_len, spec.block_size)
        return stat.repeat_interleave(t, dim=2)[:, :, :seq_len]
    return stat


@dataclass
class QuantizedTensor:
    """One operand in its held form: data, scale, zero point, block means and the spec used.

    `data` is the tensor as given for float precisions (unquantised); for int8 the codes (`int8`), for int4
    the packed nibbles (`uint8`, [..., D/2]), for fp8 `float8_e4m3fn`. `scale` and `zero_point`
    have the compact group shape of docs/quantization.md; `mean` is [B, H, NB, D] or None.
    """

    data: torch.Tensor
    scale: torch.Tensor | None
    zero_point: torch.Tensor | None
    mean: torch.Tensor | None
    spec: OperandQuant
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    strategy_version: int = 1

    @property
    def device(self) -> torch.device:
        return self.data.device

    def codes(self) -> torch.Tensor:
        """Integer or fp8 codes unpacked to [B, H, S, D] (float32 for fp8, int16 for int4)."""
        if self.spec.precision == "int4":
            return unpack_int4(self.data, signed=self.spec.strategy != "asymmetric")
        return self.data

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """x' of docs/quantization.md, in `dtype` (default: the dtype it was made from)."""
        out_dtype = dtype or self.dtype
        if not self.spec.quantized:
            return self.data.to(out_dtype)
        s = self.shape[2]
        q = self.codes().to(torch.float32)
        scale = _expand(self.scale, self.spec, s)
        if self.zero_point is not None:
            x = (q - _expand(self.zero_point, self.spec, s)) * scale
        else:
            x = q * scale
        if self.mean is not None:
            x = x + _expand(self.mean, self.spec, s)
        return x.to(out_dtype)

    def nbytes(self) -> int:
        """Bytes held: data plus scales, zero points and means."""
        parts = (self.data, self.scale, self.zero_point, self.mean)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def check_operand_shape(x: torch.Tensor, spec: OperandQuant, name: str = "x") -> None:
    """Raise a clear error for tensors `quantize` cannot take."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-d [B, H, S, D] tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if spec.precision == "int4" and x.shape[-1] % 2:
        raise ValueError(f"{name}: int4 needs an even head dim to pack two values per byte, got {x.shape[-1]}")


@dataclass(frozen=True)
class StaticQuant:
    """Calibrated statistics of one operand: used instead of measuring its range on every call.

    `scale` (and `zero_point` where the spec is asymmetric) broadcast against one group of every
    token block: [1 or B, H, 1, D] in `channel` mode, [1 or B, H, 1, 1] in `row`/`block` mode,
    [1, 1, 1, 1] in `tensor` mode. Values beyond the calibrated range are clipped. With
    `subtract_mean`, each block's own mean is taken away as in dynamic quantisation (a sum, no max
    reduction) and `scale` covers the residuals; a `mean` ([1 or B, H, 1, D], what schema-1/2
    calibration files hold) is taken away instead of the block means.
    """

    scale: torch.Tensor
    mean: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None


def static_stat(stat: torch.Tensor | None, name: str, target: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """A calibrated statistic checked and expanded to the compact group shape `target`."""
    if stat is None:
        raise ValueError(f"static {name}: missing, the spec needs it")
    if stat.dim() != 4 or stat.shape[2] != 1:
        raise ValueError(f"static {name}: expected [B|1, H, 1, D|1], got shape {tuple(stat.shape)}")
    for got, want in zip(stat.shape, target, strict=True):
        if got not in (1, want):
            raise ValueError(f"static {name}: shape {tuple(stat.shape)} does not broadcast to {list(target)}")
    return stat.to(device=x.device, dtype=torch.float32).expand(target).contiguous()


def _quantize_static(x: torch.Tensor, spec: OperandQuant, static: StaticQuant, version: int) -> QuantizedTensor:
    """Quantise with calibrated scale (and zero point): no max reduction; block means as `quantize` takes them."""
    d, s = x.shape[3], x.shape[2]
    target = group_shape(tuple(x.shape), spec)
    scale = static_stat(static.scale, "scale", target, x)
    zero = static_stat(static.zero_point, "zero_point", target, x) if spec.strategy == "asymmetric" else None
    xf = x.to(torch.float32)
    mean = None
    if spec.subtract_mean:
        if static.mean is None:
            mean = block_mean(xf, spec.block_size)
        else:
            mean = static_stat(static.mean, "mean", target[:3] + (d,), x)
        xf = xf - _expand(mean, spec, s)
    full_scale = _expand(scale, spec, s)
    if zero is not None:
        lo_q, hi_q = ASYMMETRIC_RANGE[spec.precision]
        q = torch.clamp(torch.round(xf / full_scale) + _expand(zero, spec, s), lo_q, hi_q)
    else:
        qmax = SYMMETRIC_QMAX[spec.precision]
        q = torch.clamp(xf / full_scale, -qmax, qmax)
        q = q if spec.precision == "fp8_e4m3" else torch.round(q)
    q = torch.nan_to_num(q, nan=0.0)
    bad = ~torch.isfinite(x.to(torch.float32))
    if bad.any():
        scale = _poison_groups(scale, bad, spec, s)
    data = pack_int4(q.to(torch.int16)) if spec.precision == "int4" else q.to(STORAGE_DTYPES[spec.precision])
    return QuantizedTensor(data, scale, zero, mean, spec, tuple(x.shape), x.dtype, version)


def _poison_groups(scale: torch.Tensor, bad: torch.Tensor, spec: OperandQuant, s: int) -> torch.Tensor:
    """NaN scales for the groups that hold a non-finite input (as dynamic quantisation gives)."""
    if spec.mode == "tensor":
        return torch.full_like(scale, float("nan"))
    if spec.mode == "row":
        return torch.where(bad.any(dim=-1, keepdim=True), float("nan"), scale)
    t = effective_block(s, spec.block_size)
    pad = scale.shape[2] * t - s
    padded = torch.nn.functional.pad(bad, (0, 0, 0, pad)).view(*bad.shape[:2], scale.shape[2], t, bad.shape[3])
    hit = padded.any(dim=3) if spec.mode == "channel" else padded.any(dim=(3, 4)).unsqueeze(-1)
    return torch.where(hit, float("nan"), scale)


def quantize(
    x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1, static: StaticQuant | None = None
) -> QuantizedTensor:
    """Quantise a [B, H, S, D] tensor by `spec` (docs/quantization.md, strategy_version 1).

    With `static`, the calibrated scale / mean / zero point are used instead of measured ones.
    """
    check_operand_shape(x, spec)
    shape = tuple(x.shape)
    if not spec.quantized:
        return QuantizedTensor(x, None, None, None, spec, shape, x.dtype, strategy_version)
    if static is not None:
        return _quantize_static(x, spec, static, strategy_version)
    s = shape[2]
    xf = x.to(torch.float32)
    grouped = spec.mode in ("channel", "block")
    if grouped:
        view, pad = _group_view(xf, spec.block_size)
        valid = _valid_tokens(view, pad)
    else:
        view, valid = xf, None
    dims = _reduce_dims(spec)

    mean = None
    if spec.subtract_mean:
        mean = _block_mean(view, valid)
        view = view - mean

    if spec.strategy == "asymmetric":
        lo_q, hi_q = ASYMMETRIC_RANGE[spec.precision]
        fill_hi = torch.where(valid, view, float("inf")) if valid is not None else view
        fill_lo = torch.where(valid, view, float("-inf")) if valid is not None else view
        mn = fill_hi.amin(dim=dims, keepdim=True)
        mx = fill_lo.amax(dim=dims, keepdim=True)
        bad = ~(torch.isfinite(mn) & torch.isfinite(mx))
        scale = (mx - mn).clamp_min(TINY) / (hi_q - lo_q)
        scale = torch.where(bad, float("nan"), scale)
        zero = torch.round(lo_q - mn / scale)
        zero = torch.where(bad, 0.0, zero)
        q = torch.clamp(torch.round(view / scale) + zero, lo_q, hi_q)
    else:
        qmax = SYMMETRIC_QMAX[spec.precision]
        mag = view.abs()
        if valid is not None:
            mag = torch.where(valid, mag, 0.0)
        amax = mag.amax(dim=dims, keepdim=True)
        scale = amax.clamp_min(TINY) / qmax
        scale = torch.where(torch.isfinite(amax), scale, float("nan"))
        zero = None
        scaled = torch.clamp(view / scale, -qmax, qmax)
        q = scaled if spec.precision == "fp8_e4m3" else torch.round(scaled)
    q = torch.nan_to_num(q, nan=0.0)

    if grouped:
        q = q.flatten(2, 3)[:, :, :s]
        scale = scale.squeeze(3)
        zero = zero.squeeze(3) if zero is not None else None
        mean = mean.squeeze(3) if mean is not None else None
    if spec.precision == "int4":
        data = pack_int4(q.to(torch.int16))
    else:
        data = q.to(STORAGE_DTYPES[spec.precision])
    return QuantizedTensor(data, scale.contiguous(), zero, mean, spec, shape, x.dtype, strategy_version)
