"""The reference backward of quantised attention: plain PyTorch over dequantised operands.

Quantisation (of Q, K, V and of P) is a straight-through estimator: the gradients are those of
attention over the dequantised operands, recomputed FlashAttention-2 style from the saved
log-sum-exp, `delta = rowsum(dO * O) - dlse`, and chunked over query rows so that no full
[Sq, Sk] score matrix is ever held.
"""

from __future__ import annotations

import torch

from .base import AttentionCall
from .reference import causal_keep

CHUNK_ELEMENTS = 1 << 23


def row_delta(
    grad_out: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, grad_lse: torch.Tensor | None
) -> torch.Tensor:
    """FlashAttention-2's `delta = rowsum(dO * O)`, minus dlse; 0 for fully masked rows (lse = -inf)."""
    delta = (grad_out.to(torch.float32) * out.to(torch.float32)).sum(dim=-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(torch.float32)
    return torch.where(torch.isfinite(lse), delta, 0.0)


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    call: AttentionCall,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) of attention over float q [B,Hq,Sq,D], k [B,Hkv,Sk,D], v [B,Hkv,Sk,Dv].

    GQA gradients are summed into the shared K/V heads; rows whose keys are all masked get zero
    gradients. Results are in the compute dtype (float64 for float64 q, else float32).
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = hq // hkv
    delta = row_delta(grad_out, out, lse, grad_lse).to(compute)
    live_lse = torch.where(torch.isfinite(lse), lse, float("inf")).to(compute)
    dq = torch.empty(b, hq, sq, d, dtype=compute, device=q.device)
    dk = torch.zeros(b, hkv, sk, d, dtype=compute, device=q.device)
    dvv = torch.zeros(b, hkv, sk, dv, dtype=compute, device=q.device)
    rows = max(1, chunk_elements // max(1, b * hq * sk))
    kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
    for i0 in range(0, sq, rows):
        i1 = min(sq, i0 + rows)
        c = i1 - i0

        def grouped(t: torch.Tensor, i0: int = i0, i1: int = i1, c: int = c) -> torch.Tensor:
            """Rows i0:i1 of a [B, Hq, Sq, X] tensor as [B, Hkv, G * c, X]: one matmul per K/V head."""
            return t[:, :, i0:i1].reshape(b, hkv, g * c, t.shape[-1])

        qc = grouped(q)
        s = torch.matmul(qc, kt) * call.scale
        keep = None
        if call.attn_mask is not None:
            mask = grouped(call.attn_mask)
            if mask.dtype == torch.bool:
                keep = mask
            else:
                s = s + mask.to(compute)
        if call.is_causal:
            causal = causal_keep(sq, sk, q.device)[i0:i1].repeat(g, 1)
            keep = causal if keep is None else keep & causal
        p = torch.exp(s - grouped(live_lse.unsqueeze(-1)))
        if keep is not None:
            p = torch.where(keep, p, 0.0)
        do = grouped(grad_out.to(compute))
        dvv += torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vt) - grouped(delta.unsqueeze(-1)))
        dq[:, :, i0:i1] = (torch.matmul(ds, k) * call.scale).view(b, hq, c, d)
        dk += torch.matmul(ds.transpose(-1, -2), qc) * call.scale
    return dq, dk, dvv
