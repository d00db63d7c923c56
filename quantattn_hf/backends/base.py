"""What a backend is: the call it serves, and the interface every backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..config import OperandQuant, QuantConfig
from ..quant import QuantizedTensor, StaticQuant, quantize


@dataclass(frozen=True)
class AttentionCall:
    """One checked attention call in canonical form: BHSD shapes, mask broadcast to [B,Hq,Sq,Sk]."""

    config: QuantConfig
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    head_dim_v: int
    dtype: torch.dtype
    device: torch.device
    scale: float
    is_causal: bool
    attn_mask: torch.Tensor | None

    @property
    def groups(self) -> int:
        """Query heads per K/V head (1 without GQA)."""
        return self.q_heads // self.kv_heads


class Backend(ABC):
    """A set of kernels: a quantiser and attention over quantised operands."""

    name: str = "backend"

    @abstractmethod
    def available(self) -> bool:
        """Whether this backend can run at all on this machine."""

    @abstractmethod
    def unsupported_reason(self, call: AttentionCall) -> str | None:
        """None when the backend serves `call`, else a short reason (the op then falls back)."""

    @abstractmethod
    def quantize(self, x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1) -> QuantizedTensor:
        """Quantise a [B, H, S, D] tensor exactly as `quant.quantize` defines."""

    def quantize_static(
        self, x: torch.Tensor, spec: OperandQuant, strategy_version: int, static: StaticQuant
    ) -> QuantizedTensor:
        """Quantise with calibrated statistics, as `quant.quantize(..., static=...)` defines (backends may fuse it)."""
        return quantize(x, spec, strategy_version, static)

    @abstractmethod
    def attention(
        self, q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention over held operands: (out [B,Hq,Sq,Dv] float32 or the query dtype, lse [B,Hq,Sq] float32)."""
