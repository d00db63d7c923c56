"""The reference backend: plain PyTorch that defines what every kernel computes.

Quantisation is `quant.quantize`; attention dequantises the operands to float32 and follows
docs/quantization.md step by step. It runs on any device torch runs on.
"""

from __future__ import annotations

import torch

from ..config import OperandQuant
from ..quant import FP8_MAX, QuantizedTensor, quantize
from .base import AttentionCall, Backend


def round_p(p: torch.Tensor, spec: OperandQuant) -> torch.Tensor:
    """Round the softmax numerator P (in [0, 1]) to the P precision, back in float32."""
    if spec.precision == "fp8_e4m3":
        return (p * FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32) / FP8_MAX
    if spec.precision in ("fp16", "bf16"):
        return p.to(spec.float_dtype).to(torch.float32)
    return p


def causal_keep(sq: int, sk: int, device: torch.device) -> torch.Tensor:
    """Bottom-right aligned causal mask [Sq, Sk]: key j is kept for query i when j <= i + Sk - Sq."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    return j <= i + (sk - sq)


CHUNK_ELEMENTS = 1 << 24


def attention_from_dequantized(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttentionCall,
    p_spec: OperandQuant,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of docs/quantization.md over float tensors [B,H,S,D]; returns (out, lse float32).

    Query rows are processed in chunks so the score matrix never exceeds CHUNK_ELEMENTS.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    rows = max(1, CHUNK_ELEMENTS // max(1, b * h * sk))
    outs, lses = [], []
    for start in range(0, sq, rows):
        stop = min(sq, start + rows)
        out, lse = _attention_rows(q[:, :, start:stop], k, v, call, p_spec, start)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attention_rows(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, p_spec: OperandQuant, start: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query rows start..start+len(q) of the attention (masks and causal offset sliced to them)."""
    sq, sk = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    neg_inf = torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)
    if call.attn_mask is not None:
        mask = call.attn_mask[:, :, start : start + sq]
        if mask.dtype == torch.bool:
            scores = torch.where(mask, scores, neg_inf)
        else:
            scores = scores + mask.to(q.dtype)
    if call.is_causal:
        keep = causal_keep(call.q_len, sk, q.device)[start : start + sq]
        scores = torch.where(keep, scores, neg_inf)
    m = scores.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m_safe)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(round_p(p, p_spec).to(q.dtype), v) / denom
    lse = (m_safe + torch.log(denom)).squeeze(-1)
    empty = denom == 0
    if empty.any():
        out = torch.where(empty, fully_masked_value(q.dtype, q.device), out)
    return out, lse.to(torch.float32)


def fully_masked_value(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What torch SDPA returns for a query row whose keys are all masked, on this torch."""
    q = torch.ones(1, 1, 1, 2, dtype=torch.float32)
    mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool)
    value = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)[0, 0, 0, 0]
    return value.to(dtype=dtype, device=device)


class ReferenceBackend(Backend):
    """Plain PyTorch; serves every call on every device."""

    name = "reference"

    def available(self) -> bool:
        return True

    def unsupported_reason(self, call: AttentionCall) -> str | None:
        return None

    def quantize(self, x: torch.Tensor, spec: OperandQuant, strategy_version: int = 1) -> QuantizedTensor:
        return quantize(x, spec, strategy_version)

    def attention(
        self, q: QuantizedTensor, k: QuantizedTensor, v: QuantizedTensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.float64 if call.dtype == torch.float64 else torch.float32
        return attention_from_dequantized(
            q.dequantize(dtype), k.dequantize(dtype), v.dequantize(dtype), call, call.config.p
        )
