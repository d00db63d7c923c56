"""Backward on CUDA by cuDNN's fused attention backward over the dequantised operands.

The backward's gradient is attention's over the dequantised operands (straight-through estimator, as
`reference_backward` defines it), given the forward's output and log-sum-exp. cuDNN's backward computes
exactly that when handed x' as dense tensors, at cuDNN's speed. The held K/V (and Q where it is quantised)
are dequantised by `triton.dequantize.HeadDequantizer` head range by head range ("chunks"), so their dense
copies exist for one chunk at a time. The chunk count keeps the backward's peak memory at SDPA's or below
(SDPA's autograd keeps dense Q/K/V from the forward on): one chunk where that fits, else, among the counts
that fit, one whose chunks fill the GPU's waves best. `QUANTATTN_CUDNN_BACKWARD=0` leaves the backward to the
Triton kernels (`triton_backward`); `QUANTATTN_CUDNN_BACKWARD=n` fixes n chunks.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from ..quant import QuantizedTensor
from .base import AttentionCall
from .triton.dequantize import HeadDequantizer

ENV = "QUANTATTN_CUDNN_BACKWARD"
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
# cuDNN's backward runs one program per key tile of this many tokens and head (inferred from a one-off probe
# timing it by chunk count on the H100, docs/benchmarks.md); used only to rank chunk counts by whole waves.
KEY_TILE = 128


def _fixed_chunks() -> int | None:
    """QUANTATTN_CUDNN_BACKWARD as a chunk count: None for 'auto' (unset), 0 for off, else n."""
    setting = os.environ.get(ENV, "auto").strip().lower()
    if setting == "auto":
        return None
    if not setting.isdigit():
        raise ValueError(f"{ENV} must be 'auto', 0 or a positive chunk count, got {setting!r}")
    return int(setting)


def _device_facts(device: torch.device) -> tuple[str | None, int]:
    """(why cuDNN's backward cannot run on this GPU or None, its multiprocessor count)."""
    return _facts_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _facts_of(index: int) -> tuple[str | None, int]:
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available", 0
    props = torch.cuda.get_device_properties(index)
    return ("a GPU older than sm80" if props.major < 8 else None), props.multi_processor_count


def unsupported_reason(call: AttentionCall, grad_lse: torch.Tensor | None) -> str | None:
    """None when cuDNN's backward serves `call`, else why not (the Triton kernels then run)."""
    if _fixed_chunks() == 0:
        return f"{ENV}=0"
    device = torch.device(call.device)
    if device.type != "cuda":
        return f"tensors on {device.type}"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN attention is disabled (torch.backends.cuda.enable_cudnn_sdp)"
    reason = _device_facts(device)[0]
    if reason is not None:
        return reason
    if call.dtype not in DTYPES:
        return f"dtype {call.dtype} (fp16 and bf16 are served)"
    if call.head_dim != call.head_dim_v or call.head_dim % 8 or call.head_dim > MAX_HEAD_DIM:
        return f"head dims {call.head_dim}/{call.head_dim_v} (equal, a multiple of 8, at most {MAX_HEAD_DIM})"
    if call.attn_mask is not None:
        return "an attention mask"
    if call.is_causal and call.q_len != call.kv_len:
        return "causal with q_len != kv_len (cuDNN's causal mask is top-left, quantattn's bottom-right)"
    if grad_lse is not None:
        return "a gradient of the log-sum-exp"
    return None


def chunk_count(call: AttentionCall, held_bytes: int, dequant_bytes: int, sms: int) -> int:
    """Head chunks (over K/V heads) for the backward: the fewest whose peak stays at SDPA's or below.

    Against SDPA's backward, which keeps dense Q, K, V (`dense` bytes) and runs cuDNN once over all heads,
    this one keeps the held operands (`held_bytes`) and, per chunk, the dense copies of the quantised ones
    (`dequant_bytes` over all heads), the chunk's gradients before they are copied into the whole ones and
    cuDNN's fp32 dQ accumulator. One chunk needs no copy of gradients. Among the counts that fit, the one
    with the fewest waves of `KEY_TILE`-key programs in total (then the fewest chunks) is taken.
    """
    fixed = _fixed_chunks()
    if fixed:
        return min(fixed, call.kv_heads)
    size = call.dtype.itemsize
    b, hq, hkv = call.batch, call.q_heads, call.kv_heads
    dense = size * (b * hq * call.q_len * call.head_dim + b * hkv * call.kv_len * (call.head_dim + call.head_dim_v))
    accumulator = 4 * b * hq * call.q_len * call.head_dim
    if held_bytes + dequant_bytes <= dense:
        return 1
    headroom = dense - held_bytes + accumulator
    need = hkv if headroom <= 0 else math.ceil((dequant_bytes + dense + accumulator) / headroom)
    need = min(max(need, 2), hkv)
    tiles = math.ceil(call.kv_len / KEY_TILE) * b * call.groups

    def waves(n: int) -> int:
        return n * math.ceil(tiles * math.ceil(hkv / n) / sms)

    return min(range(need, hkv + 1), key=lambda n: (waves(n), n))


def dense_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cuDNN's backward of attention over dense [B, H, S, D] operands (GQA: fewer K/V heads), given the output
    and the [B, Hq, Sq] natural-log lse: (dQ, dK, dV)."""
    sq, sk = q.shape[2], k.shape[2]
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.unsqueeze(-1), None, None, None, None, None, sq, sk, 0.0, is_causal, scale=scale
    )


def attention_backward(
    q: QuantizedTensor,
    k: QuantizedTensor,
    v: QuantizedTensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    call: AttentionCall,
    need_dkv: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dQ, dK, dV) in the call's dtype; dK and dV are empty (0,) tensors without `need_dkv`."""
    if grad_lse is not None:
        raise ValueError("cuDNN's attention backward takes no gradient of the log-sum-exp")
    b, hq, hkv, groups = call.batch, call.q_heads, call.kv_heads, call.groups
    sq, sk, dtype = call.q_len, call.kv_len, call.dtype
    dequant = sum(t.shape[0] * t.shape[1] * t.shape[2] * t.shape[3] for t in (q, k, v) if t.spec.quantized)
    held = sum(t.nbytes() for t in (q, k, v))
    sms = _device_facts(grad_out.device)[1] if grad_out.is_cuda else 1
    n = chunk_count(call, held, dequant * out.element_size(), sms)
    grad_out = grad_out.contiguous()
    bounds = [hkv * i // n for i in range(n + 1)]
    grads: list[torch.Tensor] = []
    dense_q, dense_kv = HeadDequantizer([q], dtype), HeadDequantizer([k, v], dtype)
    for h0, h1 in zip(bounds[:-1], bounds[1:], strict=True):
        qs, ks = slice(h0 * groups, h1 * groups), slice(h0, h1)
        (qd,), (kd, vd) = dense_q(qs), dense_kv(ks)
        part = dense_backward(grad_out[:, qs], qd, kd, vd, out[:, qs], lse[:, qs], call.is_causal, call.scale)
        del qd, kd, vd
        if n == 1:  # contiguous as the op's fake implementation declares (cuDNN follows BSHD-strided inputs)
            grads = [g.contiguous() for g in part]
            break
        if not grads:
            grads = [
                grad_out.new_empty((b, hq, sq, call.head_dim)),
                *(grad_out.new_empty((b, hkv, sk, d) if need_dkv else (0,)) for d in (call.head_dim, call.head_dim_v)),
            ]
        grads[0][:, qs].copy_(part[0])
        if need_dkv:
            grads[1][:, ks].copy_(part[1])
            grads[2][:, ks].copy_(part[2])
        del part
    if not need_dkv:
        grads[1:] = [grad_out.new_empty((0,)), grad_out.new_empty((0,))]
    return grads[0], grads[1], grads[2]
