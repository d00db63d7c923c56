"""`TritonBackend`: the fused quantiser, prefill attention and split-KV decode as one backend."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ...config import OperandQuant
from ...quant import QuantizedTensor, StaticQuant
from ..base import AttentionCall, Backend
from ..reference import fully_masked_value

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DECODE_MAX_Q = 16
DECODE_MAX_ROWS = 128


@functools.cache
def _fill_value() -> float:
    """Output of a query row with no unmasked key: what torch SDPA gives on this torch (computed once)."""
    return float(fully_masked_value(torch.float32, torch.device("cpu")))


class TritonBackend(Backend):
    """Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)."""

    name = "triton"

    def available(self) -> bool:
        if importlib.util.find_spec("triton") is None:
            return False
        return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"

    def unsupported_reason(self, call: AttentionCall) -> str | None:
        if call.dtype not in DTYPES:
            return f"dtype {call.dtype} (fp16, bf16 and fp32 are served)"
        for name, dim in (("query/key", call.head_dim), ("value", call.head_dim_v)):
            if not MIN_HEAD_DIM <= dim <= MAX_HEAD_DIM:
                return f"{name} head dim {dim} (served: {MIN_HEAD_DIM} to {MAX_HEAD_DIM})"
        device = torch.device(call.device)
        if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return None
        return f"tensors on {device.type} (CUDA, or the CPU under TRITON_INTERPRET=1)"

    def quantize(self, x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1) -> QuantizedTensor:
        from .quantize import quantize_fused

        return quantize_fused(x, spec, strategy_version)

    def quantize_static(
        self, x: torch.Tensor, spec: OperandQuant, strategy_version: int, static: StaticQuant
    ) -> QuantizedTensor:
        from .quantize import quantize_static_fused

        return quantize_static_fused(x, spec, strategy_version, static)

    def attention(
        self, q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from .launch import run_attention

        if os.environ.get("TRITON_INTERPRET") == "1":
            from .interpreter_compat import patch_interpreter

            patch_interpreter()

        return run_attention(q, k, v, call, _fill_value(), decode=self.use_decode(call))

    @staticmethod
    def use_decode(call: AttentionCall) -> bool:
        """Split-KV decode for up to 16 query tokens whose packed GQA rows fit one tile."""
        return call.q_len <= DECODE_MAX_Q and call.groups * call.q_len <= DECODE_MAX_ROWS
