"""Host side of a held operand for the kernels: pointers, strides and the compile-time codes of tiles.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...quant import QuantizedTensor

PREC_FLOAT, PREC_INT8, PREC_INT4, PREC_UINT4, PREC_FP8 = 0, 1, 2, 3, 4
MODE_NONE, MODE_TENSOR, MODE_ROW, MODE_CHANNEL, MODE_BLOCK = 0, 1, 2, 3, 4
MODE_CODES = {"tensor": MODE_TENSOR, "row": MODE_ROW, "channel": MODE_CHANNEL, "block": MODE_BLOCK}
WHOLE_SEQUENCE = 1 << 30


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Strides of a 4-d tensor with 0 along its size-1 dims (so it broadcasts); unrolled, as it runs per launch."""
    n0, n1, n2, n3 = t.shape
    s0, s1, s2, s3 = t.stride()
    return (0 if n0 == 1 else s0, 0 if n1 == 1 else s1, 0 if n2 == 1 else s2, 0 if n3 == 1 else s3)


@dataclass
class KernelOperand:
    """One operand as the kernels take it: tensors, strides, group length and codes."""

    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    mean: torch.Tensor
    data_strides: tuple[int, int, int, int]
    scale_strides: tuple[int, int, int, int]
    mean_strides: tuple[int, int, int, int]
    group: int
    prec: int
    mode: int
    has_zero: bool
    has_mean: bool

    @classmethod
    def from_held(cls, t: QuantizedTensor) -> KernelOperand:
        """Encode a QuantizedTensor (or an unquantised one) for the kernels."""
        data = t.data
        spec = t.spec
        if not spec.quantized:
            return cls(
                data, data, data, data, _strides4(data), (0,) * 4, (0,) * 4, 1, PREC_FLOAT, MODE_NONE, False, False
            )
        if spec.precision == "int4":
            prec = PREC_UINT4 if spec.strategy == "asymmetric" else PREC_INT4
        else:
            prec = {"int8": PREC_INT8, "fp8_e4m3": PREC_FP8}[spec.precision]
        scale = t.scale.contiguous()
        zero = t.zero_point.contiguous() if t.zero_point is not None else scale
        mean = t.mean if t.mean is not None else scale
        group = spec.block_size if spec.block_size > 0 else WHOLE_SEQUENCE
        return cls(
            data,
            scale,
            zero,
            mean,
            _strides4(data),
            _strides4(scale),
            _strides4(mean),
            group,
            prec,
            MODE_CODES[spec.mode],
            t.zero_point is not None,
            t.mean is not None,
        )

    def args(self) -> tuple:
        """Runtime kernel arguments, in the order the kernels declare them."""
        return (
            self.data,
            self.scale,
            self.zero,
            self.mean,
            *self.data_strides,
            *self.scale_strides,
            *self.mean_strides,
            self.group,
        )

    def constexprs(self, prefix: str) -> dict[str, int | bool]:
        """Compile-time codes named `<prefix>_PREC` and so on."""
        return {
            f"{prefix}_PREC": self.prec,
            f"{prefix}_MODE": self.mode,
            f"{prefix}_HAS_ZERO": self.has_zero,
            f"{prefix}_HAS_MEAN": self.has_mean,
        }

    @property
    def int8_rows(self) -> bool:
        """Symmetric int8 with one scale per row/block/tensor: usable in the int8 Q·Kᵀ path."""
        return self.prec == PREC_INT8 and self.mode in (MODE_TENSOR, MODE_ROW, MODE_BLOCK) and not self.has_zero

    @property
    def fp8_channels(self) -> bool:
        """FP8 with one scale per channel over the whole sequence (or per tensor): the FP8 P·V path."""
        whole = self.mode == MODE_TENSOR or (self.mode == MODE_CHANNEL and self.scale.shape[2] == 1)
        return self.prec == PREC_FP8 and whole and not self.has_zero and not self.has_mean


def qkv_launch_parts(q: KernelOperand, k: KernelOperand, v: KernelOperand) -> tuple[tuple, dict[str, int | bool]]:
    """(runtime arguments, compile-time codes) of Q, K and V, as the attention kernels forward and backward take
    them."""
    return (*q.args(), *k.args(), *v.args()), {**q.constexprs("Q"), **k.constexprs("K"), **v.constexprs("V")}
